//! The demo variant's model: what the layer is (config, hash parameters, weights), apart from
//! how it runs. Backends (the reference loops, the fused CPU path, CUDA) read it; it reads none
//! of them.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::hashing::{LayerHashParams, NgramHashMapping};
use crate::state::EngramState;
use crate::weights::{EngramWeights, TABLE};
use std::sync::Arc;

/// The demo variant's model: config, hash mapping (compression, multipliers, primes), this
/// layer's hash parameters and its weights, with the model-level operations every backend
/// shares (fresh states, hashing a chunk, gathering rows). Knows no backend.
#[derive(Debug, Clone)]
pub struct DemoModel {
    pub(crate) cfg: EngramConfig,
    pub(crate) hashing: Arc<NgramHashMapping>,
    pub(crate) layer: LayerHashParams,
    pub(crate) weights: EngramWeights,
}

impl DemoModel {
    /// Builds the layer `cfg.layer_id` from a hash mapping and weights, checking that the
    /// weights fit the config.
    pub fn new(
        cfg: EngramConfig,
        hashing: Arc<NgramHashMapping>,
        weights: EngramWeights,
    ) -> Result<Self> {
        cfg.validate()?;
        let layer = hashing.layer(cfg.layer_id)?.clone();
        let offsets: Vec<i64> = layer.offsets().iter().map(|&o| o as i64).collect();
        let rows = layer.table_rows() as usize;
        if weights.table.rows() != rows || weights.table.dim() != cfg.head_dim() {
            return Err(EngramError::Shape {
                name: TABLE.into(),
                expected: vec![rows, cfg.head_dim()],
                found: vec![weights.table.rows(), weights.table.dim()],
            });
        }
        if weights.offsets != offsets {
            return Err(EngramError::invalid(
                "multi_head_embedding.offsets",
                format!("{offsets:?}"),
                format!("{:?}", weights.offsets),
            ));
        }
        let (d, dm, hc) = (cfg.hidden_size, cfg.memory_width(), cfg.hc_mult);
        let checks: Vec<(String, usize, usize)> = [
            (
                "value_proj.weight".to_string(),
                weights.value_proj_weight.len(),
                d * dm,
            ),
            (
                "value_proj.bias".to_string(),
                weights.value_proj_bias.len(),
                d,
            ),
            (
                "short_conv.conv.weight".to_string(),
                weights.conv_weight.len(),
                hc * d * cfg.kernel_size,
            ),
            ("key_projs".to_string(), weights.key_projs_weight.len(), hc),
            (
                "key_projs (bias)".to_string(),
                weights.key_projs_bias.len(),
                hc,
            ),
            ("norm1".to_string(), weights.norm1.len(), hc),
            ("norm2".to_string(), weights.norm2.len(), hc),
            ("short_conv.norms".to_string(), weights.conv_norms.len(), hc),
        ]
        .into_iter()
        .collect();
        for (name, found, want) in checks {
            if found != want {
                return Err(EngramError::Shape {
                    name,
                    expected: vec![want],
                    found: vec![found],
                });
            }
        }
        for i in 0..hc {
            for (name, v, want) in [
                (
                    format!("key_projs.{i}.weight"),
                    &weights.key_projs_weight[i],
                    d * dm,
                ),
                (format!("key_projs.{i}.bias"), &weights.key_projs_bias[i], d),
                (format!("norm1.{i}.weight"), &weights.norm1[i], d),
                (format!("norm2.{i}.weight"), &weights.norm2[i], d),
                (
                    format!("short_conv.norms.{i}.weight"),
                    &weights.conv_norms[i],
                    d,
                ),
            ] {
                if v.len() != want {
                    return Err(EngramError::Shape {
                        name,
                        expected: vec![want],
                        found: vec![v.len()],
                    });
                }
            }
        }
        Ok(DemoModel {
            cfg,
            hashing,
            layer,
            weights,
        })
    }

    /// The config.
    pub fn config(&self) -> &EngramConfig {
        &self.cfg
    }

    /// The hash mapping (all layers).
    pub fn hashing(&self) -> &Arc<NgramHashMapping> {
        &self.hashing
    }

    /// Hash parameters of this layer.
    pub fn layer_params(&self) -> &LayerHashParams {
        &self.layer
    }

    /// The weights.
    pub fn weights(&self) -> &EngramWeights {
        &self.weights
    }

    /// The state of a sequence that has not started.
    pub fn new_state(&self) -> EngramState {
        let c = self.cfg.hc_mult * self.cfg.hidden_size;
        EngramState {
            ngram_history: vec![self.hashing.pad_canonical(); self.cfg.max_ngram_size - 1],
            conv_ring: vec![0.0; self.cfg.conv_history() * c],
            conv_head: 0,
            position: 0,
            row_width: c,
        }
    }

    pub(crate) fn check_state(&self, state: &EngramState) -> Result<()> {
        // Sizes of a fresh state, without building one (a decode step checks every state).
        let n1 = self.cfg.max_ngram_size - 1;
        let ring = self.cfg.conv_history() * self.cfg.hc_mult * self.cfg.hidden_size;
        if state.ngram_history.len() != n1 {
            return Err(EngramError::Shape {
                name: "state.ngram_history".into(),
                expected: vec![n1],
                found: vec![state.ngram_history.len()],
            });
        }
        // Canonical ids below V' (negative ids pass through, as the reference's do).
        let vprime = self.hashing.compressed().num_compressed() as i64;
        if let Some(k) = state.ngram_history.iter().position(|&h| h >= vprime) {
            return Err(EngramError::invalid(
                format!("state.ngram_history[{k}]"),
                format!("a canonical id below {vprime} (or a negative pass-through id)"),
                state.ngram_history[k],
            ));
        }
        if state.conv_ring.len() != ring || state.conv_head >= self.cfg.conv_history().max(1) {
            return Err(EngramError::Shape {
                name: "state.conv_history".into(),
                expected: vec![
                    self.cfg.conv_history(),
                    self.cfg.hc_mult * self.cfg.hidden_size,
                ],
                found: vec![state.conv_ring.len()],
            });
        }
        Ok(())
    }

    /// Hashes of a chunk from its canonical ids and the carried n-gram history:
    /// `[len, H]`. Updates `state.ngram_history`.
    pub(crate) fn hash_chunk(&self, state: &mut EngramState, canon: &[i64]) -> Vec<i64> {
        let n = self.cfg.max_ngram_size;
        let h = self.cfg.num_heads();
        let mut ext = state.ngram_history.clone();
        ext.extend_from_slice(canon);
        let mut out = vec![0i64; canon.len() * h];
        let mut hist = vec![0i64; n];
        for t in 0..canon.len() {
            for (k, hk) in hist.iter_mut().enumerate() {
                *hk = ext[t + n - 1 - k];
            }
            self.hashing
                .hash_position(&self.layer, &hist, &mut out[t * h..(t + 1) * h]);
        }
        state
            .ngram_history
            .copy_from_slice(&ext[ext.len() - (n - 1)..]);
        out
    }

    /// Gathers the concatenated head rows of every position: `[len, Dm]`. A non-finite table
    /// value is an error naming the row.
    pub(crate) fn gather(&self, hash_ids: &[i64], out: &mut [f32]) -> Result<()> {
        self.gather_from(&self.weights.table, hash_ids, out)
    }

    /// Hints the CPU to fetch the table rows of one position's hashes.
    #[inline]
    pub(crate) fn prefetch_rows(&self, table: &crate::weights::EmbeddingTable, hash_row: &[i64]) {
        for (j, &hid) in hash_row.iter().enumerate() {
            table.prefetch_row((hid + self.weights.offsets[j]) as usize);
        }
    }

    /// A tile's rows from a store-backed table in one batch (the store issues the reads
    /// together); `round_bf16` rounds them as a bf16 copy of the table would hold them.
    pub(crate) fn gather_tile(
        &self,
        table: &crate::weights::EmbeddingTable,
        hash_ids: &[i64],
        out: &mut [f32],
        round_bf16: bool,
    ) -> Result<()> {
        let h = self.cfg.num_heads();
        match table.store() {
            Some(store) => {
                let rows: Vec<usize> = hash_ids
                    .chunks_exact(h)
                    .flat_map(|hrow| {
                        hrow.iter()
                            .zip(&self.weights.offsets)
                            .map(|(&hid, &o)| (hid + o) as usize)
                    })
                    .collect();
                store.gather(&rows, out)?;
                if round_bf16 {
                    // As a bf16 copy of the table holds them (rounded before the check, as
                    // the copy's rows are).
                    for v in out.iter_mut() {
                        *v = half::bf16::from_f32(*v).to_f32();
                    }
                }
                if let Some(k) = crate::ops::first_non_finite(out) {
                    let dh = self.cfg.head_dim();
                    return Err(EngramError::NonFinite {
                        name: TABLE.into(),
                        index: rows[k / dh] * dh + k % dh,
                        value: out[k],
                    });
                }
                return Ok(());
            }
            None => self.gather_from(table, hash_ids, out)?,
        }
        if round_bf16 {
            for v in out.iter_mut() {
                *v = half::bf16::from_f32(*v).to_f32();
            }
        }
        Ok(())
    }

    /// [`DemoModel::gather_from`] from a table that lies in memory as f32 (`values`, see
    /// `EmbeddingTable::f32_values`): each row copied in place in 16-value pieces (no call
    /// per row where the head dim is a multiple of 16).
    pub(crate) fn gather_values(
        &self,
        values: &[f32],
        hash_ids: &[i64],
        out: &mut [f32],
    ) -> Result<()> {
        self.gather_rows(
            values,
            hash_ids,
            out,
            |v: f32| v.to_bits() & 0x7fff_ffff >= 0x7f80_0000,
            |v| v,
        )
    }

    /// [`DemoModel::gather_from`] for the bf16 dot kernels: the rows' bf16 bits, as they
    /// lie in the table (`bits`, see `EmbeddingTable::bf16_bits`), copied into `out` as
    /// the kernels take x (`[T][Dm/2]` pairs, see `fused::proj::Projection::matmul_pairs`),
    /// with no widening to f32 and back. The head dim must be even.
    pub(crate) fn gather_pairs(
        &self,
        bits: &[u16],
        hash_ids: &[i64],
        out: &mut [u32],
    ) -> Result<()> {
        debug_assert!(self.cfg.head_dim().is_multiple_of(2));
        // All exponent bits set: an infinity or a NaN.
        self.gather_rows(
            bits,
            hash_ids,
            bytemuck::cast_slice_mut(out),
            |b: u16| b & 0x7f80 == 0x7f80,
            |b| half::bf16::from_bits(b).to_f32(),
        )
    }

    /// Copies each token's rows of `table` (`[rows · dh]` values) into `out` (`[T][Dm]`),
    /// refusing a row with a value that is `bad` (reported as `value`).
    fn gather_rows<T: Copy>(
        &self,
        table: &[T],
        hash_ids: &[i64],
        out: &mut [T],
        bad: impl Fn(T) -> bool,
        value: impl Fn(T) -> f32,
    ) -> Result<()> {
        let (h, dh) = (self.cfg.num_heads(), self.cfg.head_dim());
        for (t, hrow) in hash_ids.chunks_exact(h).enumerate() {
            for (j, &hid) in hrow.iter().enumerate() {
                let row = (hid + self.weights.offsets[j]) as usize;
                let src = row
                    .checked_mul(dh)
                    .and_then(|a| table.get(a..a.checked_add(dh)?))
                    .ok_or_else(|| {
                        EngramError::invalid(
                            "row id",
                            format!("below the table's {} rows", table.len() / dh.max(1)),
                            row,
                        )
                    })?;
                // In 16-value pieces (moves in place, where a slice copy calls memcpy).
                let dst = &mut out[(t * h + j) * dh..(t * h + j + 1) * dh];
                let (d16, d_rest) = dst.as_chunks_mut::<16>();
                let (s16, s_rest) = src.as_chunks::<16>();
                for (d, s) in d16.iter_mut().zip(s16) {
                    *d = *s;
                }
                d_rest.copy_from_slice(s_rest);
                if src.iter().fold(false, |a, &b| a | bad(b)) {
                    let k = src.iter().position(|&b| bad(b)).unwrap_or(0);
                    return Err(EngramError::NonFinite {
                        name: TABLE.into(),
                        index: row * dh + k,
                        value: value(src[k]),
                    });
                }
            }
        }
        Ok(())
    }

    /// [`DemoModel::gather`] from a given copy of the table (e.g. the fused path's bf16 one).
    pub(crate) fn gather_from(
        &self,
        table: &crate::weights::EmbeddingTable,
        hash_ids: &[i64],
        out: &mut [f32],
    ) -> Result<()> {
        let h = self.cfg.num_heads();
        let dh = self.cfg.head_dim();
        for (t, hrow) in hash_ids.chunks_exact(h).enumerate() {
            for (j, &hid) in hrow.iter().enumerate() {
                let row = (hid + self.weights.offsets[j]) as usize;
                let dst = &mut out[(t * h + j) * dh..(t * h + j + 1) * dh];
                table.try_row_into(row, dst)?;
                if let Some(k) = crate::ops::first_non_finite(dst) {
                    return Err(EngramError::NonFinite {
                        name: TABLE.into(),
                        index: row * dh + k,
                        value: dst[k],
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{CompressedTokenizer, EngramConfig, NgramHashMapping, Tokenizer};
    use std::sync::Arc;

    /// The conv ring's head names one of its R rows: R is refused (an index past the ring's
    /// rows, which `conv_segment` would have sliced out of bounds) and R - 1 is not. The
    /// check had let any head below R·C through.
    #[test]
    fn a_conv_head_past_the_rings_rows_is_refused() {
        let cfg = EngramConfig {
            engram_vocab_size: vec![97, 137],
            n_head_per_ngram: 2,
            n_embed_per_ngram: 16,
            hidden_size: 16,
            hc_mult: 2,
            layer_ids: vec![3],
            layer_id: 3,
            ..EngramConfig::default()
        };
        let tok = Tokenizer::bundled().unwrap();
        let comp = Arc::new(CompressedTokenizer::build(&tok).unwrap());
        let hashing = Arc::new(NgramHashMapping::new(&cfg, comp).unwrap());
        let (w, _) = crate::init::torch_default_weights(&cfg, &hashing, 1, &mut |_| {}).unwrap();
        let m = super::DemoModel::new(cfg.clone(), hashing, w).unwrap();
        let r = cfg.conv_history();
        assert!(r > 1);
        let mut st = m.new_state();
        st.conv_head = r - 1;
        assert!(m.check_state(&st).is_ok());
        st.conv_head = r;
        let err = m.check_state(&st).unwrap_err().to_string();
        assert!(err.contains("state.conv_history"), "{err}");
    }
}
