//! The DeepSeek-V4.1 Engram layer: fp8 table rows gathered by row id, one block-scaled fp8
//! `wkv` projection to every branch's key and one shared value, an RMS-normalised gate per
//! branch, and `out = h + gate · value` (no ShortConv, no biases). Dead tokens get gate 0 and
//! `h + 0 · value`, as in the reference (their hidden state, with -0.0 turned into +0.0).

use super::checkpoint::Checkpoint;
use super::config::V41Config;
use super::fp8::{self, e4m3_to_f32, e8m0_to_f32, round_bf16, Fp8Table, BLOCK};
use super::hashing::{V41Hashing, DEAD};
use crate::compression::CompressedTokenizer;
use crate::dtype::DType;
use crate::error::{EngramError, Result};
use crate::fused::proj::Projection;
use crate::rows::{direct::DirectRows, RowStore, TableIo};
use crate::tensors::RawTensor;
use rayon::prelude::*;
use safetensors::Dtype;
use std::sync::{Arc, OnceLock};

/// Metadata key of the tokenizer compression's fingerprint in a states file.
const COMPRESSION_KEY: &str = "engram_compression";

/// Gate clamp: `sqrt(max(|dot|, 1e-6))`.
const GATE_CLAMP: f32 = 1e-6;

/// Which implementation runs a V4.1 forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V41Path {
    /// Plain loops, the reference's block-scaled fp8 GEMM as written.
    Reference,
    /// Tiles on every core, the packed bf16 GEMM microkernels (same values; the projection
    /// sums in another order, so a kv value can move by one bf16 ulp).
    Fused,
}

/// One layer's weights: the table stays in its file; `wkv` stays fp8 until packed.
#[derive(Debug, Clone)]
pub struct V41Weights {
    /// `embed.weight` + `embed.scale`, in the store chosen at load time.
    pub table: Arc<dyn RowStore>,
    /// `wkv.weight` F8_E4M3 `[(hc+1)·dim, memory width]`.
    pub wkv: RawTensor,
    /// `wkv.scale` F8_E8M0 `[(hc+1)·dim / 32, memory width / 32]`.
    pub wkv_scale: RawTensor,
    /// `q_weight` `[hc, dim]` (bf16, widened).
    pub q_weight: Vec<f32>,
    /// `k_weight` `[hc, dim]`.
    pub k_weight: Vec<f32>,
}

fn expect(name: &str, t: &RawTensor, dtype: Dtype, shape: &[usize]) -> Result<()> {
    if t.dtype != dtype {
        return Err(EngramError::DType {
            name: name.into(),
            expected: format!("{dtype:?}"),
            found: format!("{:?}", t.dtype),
        });
    }
    if t.shape != shape {
        return Err(EngramError::Shape {
            name: name.into(),
            expected: shape.to_vec(),
            found: t.shape.clone(),
        });
    }
    Ok(())
}

fn bf16_vec(name: &str, t: &RawTensor, shape: &[usize]) -> Result<Vec<f32>> {
    expect(name, t, Dtype::BF16, shape)?;
    let v: Vec<f32> = t
        .data()
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    if let Some(index) = crate::ops::first_non_finite(&v) {
        return Err(EngramError::NonFinite {
            name: name.into(),
            index,
            value: v[index],
        });
    }
    Ok(v)
}

/// The first NaN among fp8 bytes (`nan(b)`: the format's NaN test), as the tensor's error.
fn fp8_finite(name: &str, t: &RawTensor, nan: impl Fn(u8) -> bool + Sync) -> Result<()> {
    use rayon::prelude::*;
    let data = t.data();
    // In chunks on every core: `wkv` is 157 MB in the real model.
    let first = data
        .par_chunks(1 << 20)
        .enumerate()
        .find_map_first(|(i, c)| c.iter().position(|&b| nan(b)).map(|k| (i << 20) + k));
    match first {
        Some(index) => Err(EngramError::NonFinite {
            name: name.into(),
            index,
            value: f32::NAN,
        }),
        None => Ok(()),
    }
}

/// Refuses a `wkv` whose dequantised weights (code · its block's scale) overflow f32: a
/// finite code times a finite e8m0 scale up to 2^127 can reach infinity, and the projection
/// would then give NaN keys and outputs without a word. Per block of 32 × 32 codes the
/// largest magnitude decides (e4m3's magnitude orders as its low seven bits).
fn wkv_dequantises_finite(
    p: &str,
    wkv: &RawTensor,
    scale: &RawTensor,
    n: usize,
    k: usize,
) -> Result<()> {
    use rayon::prelude::*;
    let (codes, scales) = (wkv.data(), scale.data());
    let kb = k / BLOCK;
    let first = (0..n).into_par_iter().find_map_first(|o| {
        let row = &codes[o * k..(o + 1) * k];
        row.chunks(BLOCK).enumerate().find_map(|(j, b)| {
            let s = e8m0_to_f32(scales[(o / BLOCK) * kb + j]);
            let top = b.iter().map(|&c| c & 0x7F).max().unwrap_or(0);
            if (e4m3_to_f32(top) * s).is_finite() {
                return None;
            }
            let i = b
                .iter()
                .position(|&c| !(e4m3_to_f32(c) * s).is_finite())
                .unwrap_or(0);
            Some((o * k + j * BLOCK + i, e4m3_to_f32(b[i]) * s))
        })
    });
    match first {
        Some((index, value)) => Err(EngramError::NonFinite {
            name: format!("{p}.wkv.weight (dequantised with wkv.scale)"),
            index,
            value,
        }),
        None => Ok(()),
    }
}

pub use crate::rows::TableOptions;

impl V41Weights {
    /// Reads `layers.{layer}.engram.*` from a checkpoint (one file or a sharded folder),
    /// checking every dtype and shape; the table keeps `rows` rows, memory-mapped.
    pub fn load(ck: &Checkpoint, cfg: &V41Config, layer: u64, rows: usize) -> Result<Self> {
        Self::load_with(ck, cfg, layer, rows, TableOptions::default())
    }

    /// [`V41Weights::load`] with the table in the store `opts` names.
    pub fn load_with(
        ck: &Checkpoint,
        cfg: &V41Config,
        layer: u64,
        rows: usize,
        opts: TableOptions,
    ) -> Result<Self> {
        let p = format!("layers.{layer}.engram");
        let (kvw, mw, hc, dim) = (cfg.kv_width(), cfg.memory_width(), cfg.hc_mult, cfg.dim);
        let (codes, scales) = (
            ck.raw(&format!("{p}.embed.weight"))?,
            ck.raw(&format!("{p}.embed.scale"))?,
        );
        // Dtypes and shapes are checked here whatever the store.
        let mapped = Fp8Table::new(
            &format!("{p}.embed.weight"),
            codes.clone(),
            scales.clone(),
            rows,
            cfg.head_dim,
        )?;
        let store: Arc<dyn RowStore> = match (&opts.store, opts.io) {
            (Some(url), _) => {
                let raw = crate::rows::redis::RawRows::fp8(codes, scales, rows, cfg.head_dim)?;
                let id = crate::rows::redis::TableId::new(
                    "deepseek-v4.1",
                    layer,
                    &format!("{cfg:?}"),
                    &raw,
                );
                Arc::new(crate::rows::redis::RedisRows::open(
                    url,
                    &id,
                    opts.store_options,
                )?)
            }
            (None, TableIo::Mmap) => Arc::new(mapped),
            (None, TableIo::Ram) => Arc::new(mapped.to_ram()?),
            (None, TableIo::Direct) => {
                let d = DirectRows::open_fp8(&codes, &scales, rows, cfg.head_dim)?;
                Arc::new(match opts.io_depth {
                    Some(n) => d.with_io_depth(n),
                    None => d,
                })
            }
        };
        let table = opts.cached(store)?;
        let wkv = ck.raw(&format!("{p}.wkv.weight"))?;
        expect(&format!("{p}.wkv.weight"), &wkv, Dtype::F8_E4M3, &[kvw, mw])?;
        let wkv_scale = ck.raw(&format!("{p}.wkv.scale"))?;
        expect(
            &format!("{p}.wkv.scale"),
            &wkv_scale,
            Dtype::F8_E8M0,
            &[kvw / BLOCK, mw / BLOCK],
        )?;
        fp8_finite(&format!("{p}.wkv.weight"), &wkv, |b| {
            crate::rows::fp8::e4m3_to_f32(b).is_nan()
        })?;
        fp8_finite(&format!("{p}.wkv.scale"), &wkv_scale, |b| {
            crate::rows::fp8::e8m0_to_f32(b).is_nan()
        })?;
        wkv_dequantises_finite(&p, &wkv, &wkv_scale, kvw, mw)?;
        let q_weight = bf16_vec(
            &format!("{p}.q_weight"),
            &ck.raw(&format!("{p}.q_weight"))?,
            &[hc, dim],
        )?;
        let k_weight = bf16_vec(
            &format!("{p}.k_weight"),
            &ck.raw(&format!("{p}.k_weight"))?,
            &[hc, dim],
        )?;
        Ok(V41Weights {
            table,
            wkv,
            wkv_scale,
            q_weight,
            k_weight,
        })
    }
}

/// What later tokens of a sequence need: its last N-1 canonical ids ([`DEAD`] kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V41State {
    /// Oldest first; all [`DEAD`] at a sequence's start.
    pub history: Vec<i64>,
    /// Tokens consumed.
    pub position: u64,
}

/// Every stage of a V4.1 forward over packed rows (ragged batches are packed, B = 1).
#[derive(Debug, Clone, Default)]
pub struct V41Stages {
    /// B.
    pub batch: usize,
    /// L.
    pub len: usize,
    /// Table row ids `[B, L, columns]` (offsets added).
    pub hash_ids: Vec<i64>,
    /// Dequantised rows `[B, L, memory width]` (bf16 values), when kept.
    pub embeddings: Option<Vec<f32>>,
    /// `kv` `[B, L, (hc+1)·dim]` (bf16 values: the keys of every branch, then the value), when
    /// kept.
    pub kv: Option<Vec<f32>>,
    /// Gates `[B, L, hc]` (0 for dead tokens).
    pub gates: Vec<f32>,
    /// Output `[B, L, hc, dim]`, rounded to bf16 when the input was bf16.
    pub output: Vec<f32>,
}

/// One V4.1 Engram layer.
pub struct V41Layer {
    cfg: V41Config,
    layer_id: u64,
    hashing: V41Hashing,
    weights: V41Weights,
    /// `f32(q_weight) · f32(k_weight)` `[hc, dim]`.
    w_gate: Vec<f32>,
    /// `wkv` dequantised into bf16 panels for the fused path, packed on first use.
    packed: OnceLock<Projection>,
}

impl std::fmt::Debug for V41Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "V41Layer(layer {}, {} rows)",
            self.layer_id,
            self.weights.table.rows()
        )
    }
}

impl V41Layer {
    /// Builds layer `layer` from its config, a compression table (whose canonical-id count
    /// must equal `engram_compressed_vocab_size`) and a checkpoint.
    pub fn load(
        cfg: &V41Config,
        compressed: Arc<CompressedTokenizer>,
        ck: &Checkpoint,
        layer: u64,
    ) -> Result<Self> {
        Self::load_with(cfg, compressed, ck, layer, TableOptions::default())
    }

    /// [`V41Layer::load`] with the table in the store `opts` names.
    pub fn load_with(
        cfg: &V41Config,
        compressed: Arc<CompressedTokenizer>,
        ck: &Checkpoint,
        layer: u64,
        opts: TableOptions,
    ) -> Result<Self> {
        let hashing = V41Hashing::new(cfg, compressed, layer)?;
        let rows = hashing.layer().table_rows() as usize;
        let weights = V41Weights::load_with(ck, cfg, layer, rows, opts)?;
        Self::new(cfg.clone(), layer, hashing, weights)
    }

    /// Builds from parts (checked by [`V41Weights::load`]).
    pub fn new(
        cfg: V41Config,
        layer_id: u64,
        hashing: V41Hashing,
        weights: V41Weights,
    ) -> Result<Self> {
        let w_gate = weights
            .q_weight
            .iter()
            .zip(&weights.k_weight)
            .map(|(q, k)| q * k)
            .collect();
        Ok(V41Layer {
            cfg,
            layer_id,
            hashing,
            weights,
            w_gate,
            packed: OnceLock::new(),
        })
    }

    /// The config.
    pub fn config(&self) -> &V41Config {
        &self.cfg
    }

    /// The layer id.
    pub fn layer_id(&self) -> u64 {
        self.layer_id
    }

    /// Compression and hash parameters.
    pub fn hashing(&self) -> &V41Hashing {
        &self.hashing
    }

    /// The weights.
    pub fn weights(&self) -> &V41Weights {
        &self.weights
    }

    /// A sequence that has not started.
    pub fn new_state(&self) -> V41State {
        V41State {
            history: vec![DEAD; self.hashing.history_len()],
            position: 0,
        }
    }

    /// The fused path's packed projection (bf16 panels; e4m3 · 2^e is exact in bf16).
    pub fn projection(&self) -> &Projection {
        self.packed.get_or_init(|| {
            let (n, k) = (self.cfg.kv_width(), self.cfg.memory_width());
            let codes = self.weights.wkv.data();
            let scales = self.weights.wkv_scale.data();
            let kb = k / BLOCK;
            let w = |o: usize, i: usize| -> f32 {
                e4m3_to_f32(codes[o * k + i]) * e8m0_to_f32(scales[(o / BLOCK) * kb + i / BLOCK])
            };
            Projection::pack_fn(
                n,
                k,
                DType::Bf16,
                crate::fused::proj::PanelKernel::for_isa(crate::fused::kernels::Isa::detect()),
                &w,
            )
        })
    }

    /// `[B, L]` fresh sequences: raw `ids`, `hidden` `[B, L, hc, dim]` (bf16 values when
    /// `bf16_out`, whose output is then rounded to bf16), optional `mask` `[B, L]` (false =
    /// dead).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ids: &[i64],
        hidden: &[f32],
        mask: Option<&[bool]>,
        batch: usize,
        len: usize,
        bf16_out: bool,
        path: V41Path,
        keep: bool,
    ) -> Result<V41Stages> {
        let mut states: Vec<V41State> = (0..batch).map(|_| self.new_state()).collect();
        let offsets: Vec<usize> = (0..=batch).map(|b| b * len).collect();
        let mut s = self.forward_ragged(
            &mut states,
            ids,
            hidden,
            mask,
            &offsets,
            bf16_out,
            path,
            keep,
        )?;
        s.batch = batch;
        s.len = len;
        Ok(s)
    }

    /// Ragged batch: sequence s has rows `offsets[s]..offsets[s+1]` of the packed inputs and
    /// its own state (read and updated). Returns packed stages (B = 1, L = T).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_ragged(
        &self,
        states: &mut [V41State],
        ids: &[i64],
        hidden: &[f32],
        mask: Option<&[bool]>,
        offsets: &[usize],
        bf16_out: bool,
        path: V41Path,
        keep: bool,
    ) -> Result<V41Stages> {
        self.check_call(states, ids, hidden, mask, offsets)?;
        let (hc, dim) = (self.cfg.hc_mult, self.cfg.dim);
        let total = ids.len();
        // Canonical ids (DEAD where masked) and row ids, sequence by sequence, on copies of
        // the states: they change only when the whole call has succeeded.
        let cols = self.hashing.columns();
        let mut hash_ids = vec![0i64; total * cols];
        let mut next: Vec<V41State> = Vec::with_capacity(states.len());
        for (s, st) in states.iter().enumerate() {
            let (a, b) = (offsets[s], offsets[s + 1]);
            let in_seq = |e: EngramError| match e {
                EngramError::Invalid {
                    name,
                    expected,
                    found,
                } => EngramError::Invalid {
                    name: format!("sequence {s}: {name}"),
                    expected,
                    found,
                },
                e => e,
            };
            let canon = self
                .hashing
                .canonical(&ids[a..b], mask.map(|m| &m[a..b]))
                .map_err(in_seq)?;
            let mut n = st.clone();
            n.position = n.position.checked_add((b - a) as u64).ok_or_else(|| {
                in_seq(EngramError::invalid(
                    "state position",
                    "below 2^64 after this call",
                    st.position,
                ))
            })?;
            let h = self.hashing.hash_chunk(&mut n.history, &canon);
            hash_ids[a * cols..b * cols].copy_from_slice(&h);
            next.push(n);
        }
        let alive = |t: usize| mask.is_none_or(|m| m[t]);
        let (kvw, mw) = (self.cfg.kv_width(), self.cfg.memory_width());
        let mut gates = vec![0.0f32; total * hc];
        let mut output = vec![0.0f32; total * hc * dim];
        let mut emb_keep = keep.then(|| vec![0.0f32; total * mw]);
        let mut kv_keep = keep.then(|| vec![0.0f32; total * kvw]);
        // Tiles of rows: gather + requantise, project, gate. The fused path projects a tile
        // with every core (each weight read once per tile). When the rows come from a file
        // (direct I/O) and there is more than one tile, later tiles are gathered on a thread
        // of their own while earlier tiles compute (the reads overlap the projection).
        const TILE: usize = 256;
        let table = &self.weights.table;
        let in_memory = table.in_memory();
        let gather_rows = |r0: usize, r1: usize, out: &mut [f32]| -> Result<()> {
            let ids = &hash_ids[r0 * cols..r1 * cols];
            if in_memory {
                // Rows from memory: each token's rows on a worker (page faults of a mapped
                // table overlap).
                return out
                    .par_chunks_mut(mw)
                    .zip(ids.par_chunks(cols))
                    .try_for_each(|(o, id)| {
                        let rows: Vec<usize> = id.iter().map(|&r| r as usize).collect();
                        table.gather(&rows, o)
                    });
            }
            let rows: Vec<usize> = ids.iter().map(|&r| r as usize).collect();
            table.gather(&rows, out)
        };
        let ahead = total > TILE && !in_memory;
        let mut x = vec![0.0f32; if ahead { 0 } else { TILE.min(total) * mw }];
        let mut kv = vec![0.0f32; TILE.min(total) * kvw];
        std::thread::scope(|sc| -> Result<()> {
            let feed =
                ahead.then(|| crate::rows::ahead::Feed::spawn(sc, total, TILE, mw, gather_rows));
            for t0 in (0..total).step_by(TILE) {
                let rows = TILE.min(total - t0);
                let mut fed = match &feed {
                    Some(f) => Some(f.next()?),
                    None => {
                        gather_rows(t0, t0 + rows, &mut x[..rows * mw])?;
                        None
                    }
                };
                let x = match fed.as_mut() {
                    Some(b) => &mut b[..rows * mw],
                    None => &mut x[..rows * mw],
                };
                // A row read that dequantises to a non-finite value (a NaN code, e4m3fn
                // 0x7F / 0xFF; a NaN scale, e8m0 0xFF; or a scale that overflows) is named,
                // as the demo layer's table values are, rather than carried to the output.
                if let Some(k) = crate::ops::first_non_finite(x) {
                    let (dh, col) = (self.cfg.head_dim, (k % mw) / self.cfg.head_dim);
                    let row = hash_ids[(t0 + k / mw) * cols + col] as usize;
                    return Err(EngramError::NonFinite {
                        name: format!(
                            "layers.{}.engram.embed.weight (dequantised with embed.scale)",
                            self.layer_id
                        ),
                        index: row * dh + k % dh,
                        value: x[k],
                    });
                }
                let kv = &mut kv[..rows * kvw];
                if let Some(e) = emb_keep.as_mut() {
                    e[t0 * mw..(t0 + rows) * mw].copy_from_slice(x);
                }
                match path {
                    V41Path::Reference => self.project_reference(x, kv),
                    V41Path::Fused => {
                        x.par_chunks_mut(mw).for_each(|xr| {
                            for b in xr.chunks_mut(BLOCK) {
                                fp8::requantize_block(b);
                            }
                        });
                        self.projection()
                            .matmul(x, rows, kv, rayon::current_num_threads());
                        kv.par_iter_mut().for_each(|v| *v = round_bf16(*v));
                    }
                }
                if let (Some(f), Some(b)) = (&feed, fed) {
                    f.give_back(b);
                }
                if let Some(k) = kv_keep.as_mut() {
                    k[t0 * kvw..(t0 + rows) * kvw].copy_from_slice(kv);
                }
                let g = &mut gates[t0 * hc..(t0 + rows) * hc];
                let o = &mut output[t0 * hc * dim..(t0 + rows) * hc * dim];
                g.par_chunks_mut(hc)
                    .zip(o.par_chunks_mut(hc * dim))
                    .enumerate()
                    .for_each(|(r, (g, o))| {
                        let t = t0 + r;
                        let h = &hidden[t * hc * dim..(t + 1) * hc * dim];
                        self.gate_token(h, &kv[r * kvw..(r + 1) * kvw], alive(t), bf16_out, g, o);
                    });
                // Finite weights and inputs whose products pass f32's range (fp8 scales
                // near 2^127, hidden states near bf16's largest value) give inf or NaN in
                // the projection or the output: named, not written out.
                for (stage, v, width) in [("kv", &kv[..], kvw), ("output", &o[..], hc * dim)] {
                    if let Some(k) = crate::ops::first_non_finite(v) {
                        return Err(EngramError::NonFinite {
                            name: format!(
                                "{stage} of token {} (values past f32's range: check \
                                 layers.{}.engram.wkv.scale, embed.scale and hidden_states)",
                                t0 + k / width,
                                self.layer_id
                            ),
                            index: t0 * width + k,
                            value: v[k],
                        });
                    }
                }
            }
            Ok(())
        })?;
        states.clone_from_slice(&next);
        Ok(V41Stages {
            batch: 1,
            len: total,
            hash_ids,
            embeddings: emb_keep,
            kv: kv_keep,
            gates,
            output,
        })
    }

    /// Everything a call checks before it hashes: offsets, lengths, finite hidden values,
    /// every state.
    fn check_call(
        &self,
        states: &[V41State],
        ids: &[i64],
        hidden: &[f32],
        mask: Option<&[bool]>,
        offsets: &[usize],
    ) -> Result<()> {
        let (hc, dim) = (self.cfg.hc_mult, self.cfg.dim);
        let total = ids.len();
        crate::error::check_offsets(offsets, states.len(), total)?;
        if hidden.len() != total * hc * dim {
            return Err(EngramError::Shape {
                name: "hidden_states".into(),
                expected: vec![total, hc, dim],
                found: vec![hidden.len()],
            });
        }
        if let Some(m) = mask {
            if m.len() != total {
                return Err(EngramError::Shape {
                    name: "token_mask".into(),
                    expected: vec![total],
                    found: vec![m.len()],
                });
            }
        }
        if let Some(index) = hidden.iter().position(|x| !x.is_finite()) {
            return Err(EngramError::NonFinite {
                name: "hidden_states".into(),
                index,
                value: hidden[index],
            });
        }
        for (s, st) in states.iter().enumerate() {
            self.check_state(s, st)?;
        }
        Ok(())
    }

    /// A state this layer can continue: N-1 history entries, each [`DEAD`] or a canonical
    /// id below V' (anything else would hash to rows of no n-gram).
    fn check_state(&self, s: usize, st: &V41State) -> Result<()> {
        let n1 = self.hashing.history_len();
        if st.history.len() != n1 {
            return Err(EngramError::Shape {
                name: format!("states[{s}].history"),
                expected: vec![n1],
                found: vec![st.history.len()],
            });
        }
        let vprime = self.hashing.compressed().num_compressed() as i64;
        if let Some(k) = st
            .history
            .iter()
            .position(|&h| h != DEAD && !(0..vprime).contains(&h))
        {
            return Err(EngramError::invalid(
                format!("states[{s}].history[{k}]"),
                format!("a canonical id below {vprime} or DEAD (i64::MIN)"),
                st.history[k],
            ));
        }
        // Fewer than N-1 tokens read leave DEAD in the slots before the sequence's start.
        let before = (n1 as u64).saturating_sub(st.position) as usize;
        if let Some(k) = st.history[..before].iter().position(|&h| h != DEAD) {
            return Err(EngramError::invalid(
                format!("states[{s}].history[{k}]"),
                format!(
                    "DEAD (i64::MIN) at position {} (fewer than {n1} tokens read)",
                    st.position
                ),
                st.history[k],
            ));
        }
        Ok(())
    }

    /// The reference's fp8 GEMM, plainly: each token's rows re-quantised per 32 values
    /// (scale 2^ceil(log2(amax/448))), then for every output, per 32-wide k block an f32 sum
    /// of code products times both block scales, blocks accumulated in f32, rounded to bf16.
    fn project_reference(&self, x: &[f32], kv: &mut [f32]) {
        let (n, k) = (self.cfg.kv_width(), self.cfg.memory_width());
        let kb = k / BLOCK;
        let codes = self.weights.wkv.data();
        let wscale = self.weights.wkv_scale.data();
        kv.par_chunks_mut(n)
            .zip(x.par_chunks(k))
            .for_each(|(y, xr)| {
                let mut xq = xr.to_vec();
                let mut xs = vec![0.0f32; kb];
                for (b, blk) in xq.chunks_mut(BLOCK).enumerate() {
                    xs[b] = fp8::requantize_block(blk);
                    for v in blk.iter_mut() {
                        *v /= xs[b]; // the block's e4m3 code values
                    }
                }
                for (o, yo) in y.iter_mut().enumerate() {
                    let wrow = &codes[o * k..(o + 1) * k];
                    let mut acc = 0.0f32;
                    for b in 0..kb {
                        let mut s = 0.0f32;
                        for i in b * BLOCK..(b + 1) * BLOCK {
                            s += xq[i] * e4m3_to_f32(wrow[i]);
                        }
                        acc += s * xs[b] * e8m0_to_f32(wscale[(o / BLOCK) * kb + b]);
                    }
                    *yo = round_bf16(acc);
                }
            });
    }

    /// Gates and output of one token: per branch h, `rstd = rsqrt(mean(h²)+eps) ·
    /// rsqrt(mean(key²)+eps)`, `dot = Σ h·w·key · rstd / sqrt(dim)`, `g = sigmoid(copysign(
    /// sqrt(max(|dot|, 1e-6)), dot))` (0 for a dead token), `out = h + g · value` in f32.
    fn gate_token(
        &self,
        h: &[f32],
        kv: &[f32],
        alive: bool,
        bf16_out: bool,
        g: &mut [f32],
        o: &mut [f32],
    ) {
        let (hc, dim) = (self.cfg.hc_mult, self.cfg.dim);
        let eps = self.cfg.norm_eps;
        let value = &kv[hc * dim..];
        for b in 0..hc {
            let hb = &h[b * dim..(b + 1) * dim];
            let key = &kv[b * dim..(b + 1) * dim];
            let gate = if alive {
                let w = &self.w_gate[b * dim..(b + 1) * dim];
                let (mut hh, mut kk, mut dot) = (0.0f32, 0.0f32, 0.0f32);
                for j in 0..dim {
                    hh += hb[j] * hb[j];
                    kk += key[j] * key[j];
                    dot += hb[j] * w[j] * key[j];
                }
                let rstd =
                    (1.0 / (hh / dim as f32 + eps).sqrt()) * (1.0 / (kk / dim as f32 + eps).sqrt());
                let d = dot * rstd / (dim as f32).sqrt();
                // `f32::max` would turn a NaN (from an fp8 NaN code in a row) into the clamp;
                // the reference's max keeps it.
                let s = if d.is_nan() {
                    d
                } else {
                    d.abs().max(GATE_CLAMP).sqrt().copysign(d)
                };
                1.0 / (1.0 + (-s).exp())
            } else {
                0.0
            };
            g[b] = gate;
            let ob = &mut o[b * dim..(b + 1) * dim];
            // A dead token's gate is 0 and the sum is still formed, as in the reference:
            // h + 0·value turns -0.0 into +0.0 and passes a NaN value through.
            for j in 0..dim {
                let y = hb[j] + gate * value[j];
                ob[j] = if bf16_out { round_bf16(y) } else { y };
            }
        }
    }
}

impl V41Layer {
    /// Every sequence in chunks of `chunk` tokens with carried state (all sequences' i-th
    /// chunks as one ragged call), reassembled in the packed order of `offsets`: the same
    /// outputs as one call.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_chunked(
        &self,
        states: &mut [V41State],
        ids: &[i64],
        hidden: &[f32],
        mask: Option<&[bool]>,
        offsets: &[usize],
        chunk: usize,
        bf16_out: bool,
        path: V41Path,
        keep: bool,
    ) -> Result<V41Stages> {
        if chunk == 0 {
            return Err(EngramError::invalid("chunk", "a chunk length >= 1", 0));
        }
        let total = ids.len();
        let (hc, dim) = (self.cfg.hc_mult, self.cfg.dim);
        let w = hc * dim;
        let (cols, mw, kvw) = (
            self.hashing.columns(),
            self.cfg.memory_width(),
            self.cfg.kv_width(),
        );
        // Every chunk's call is checked again, but a later chunk's failure must not leave
        // the earlier chunks applied: check the whole call first and work on copies.
        self.check_call(states, ids, hidden, mask, offsets)?;
        let mut work = states.to_vec();
        let mut out = V41Stages {
            batch: 1,
            len: total,
            hash_ids: vec![0; total * cols],
            embeddings: keep.then(|| vec![0.0; total * mw]),
            kv: keep.then(|| vec![0.0; total * kvw]),
            gates: vec![0.0; total * hc],
            output: vec![0.0; total * w],
        };
        let longest = offsets
            .windows(2)
            .map(|p| p[1].saturating_sub(p[0]))
            .max()
            .unwrap_or(0);
        let mut start = 0;
        while start < longest {
            // Rows (in the packed order) of every sequence's chunk at `start`.
            let mut rows: Vec<(usize, usize)> = Vec::new();
            let (mut cid, mut chid, mut cmask) = (Vec::new(), Vec::new(), Vec::new());
            let mut coff = vec![0usize];
            for s in 0..work.len() {
                let (a, b) = (offsets[s], offsets[s + 1]);
                // Saturating: `chunk` may be anything up to usize::MAX.
                let lo = a.saturating_add(start).min(b);
                let hi = lo.saturating_add(chunk).min(b);
                rows.push((lo, hi));
                cid.extend_from_slice(&ids[lo..hi]);
                chid.extend_from_slice(&hidden[lo * w..hi * w]);
                if let Some(m) = mask {
                    cmask.extend_from_slice(&m[lo..hi]);
                }
                coff.push(cid.len());
            }
            let part = self.forward_ragged(
                &mut work,
                &cid,
                &chid,
                mask.map(|_| cmask.as_slice()),
                &coff,
                bf16_out,
                path,
                keep,
            )?;
            for (s, &(lo, hi)) in rows.iter().enumerate() {
                let p = coff[s];
                let n = hi - lo;
                out.hash_ids[lo * cols..hi * cols]
                    .copy_from_slice(&part.hash_ids[p * cols..(p + n) * cols]);
                out.gates[lo * hc..hi * hc].copy_from_slice(&part.gates[p * hc..(p + n) * hc]);
                out.output[lo * w..hi * w].copy_from_slice(&part.output[p * w..(p + n) * w]);
                if let (Some(o), Some(e)) = (out.embeddings.as_mut(), part.embeddings.as_ref()) {
                    o[lo * mw..hi * mw].copy_from_slice(&e[p * mw..(p + n) * mw]);
                }
                if let (Some(o), Some(e)) = (out.kv.as_mut(), part.kv.as_ref()) {
                    o[lo * kvw..hi * kvw].copy_from_slice(&e[p * kvw..(p + n) * kvw]);
                }
            }
            start = start.saturating_add(chunk);
        }
        states.clone_from_slice(&work);
        Ok(out)
    }

    /// Writes the states of a batch: `history` int64 `[S, N-1]` (dead = i64::MIN),
    /// `position` int64 `[S]`; metadata names the variant and the layer.
    pub fn save_states(
        &self,
        path: impl AsRef<std::path::Path>,
        states: &[V41State],
    ) -> Result<()> {
        self.stage_states(path, states)?.commit()
    }

    /// [`V41Layer::save_states`] up to the rename ([`crate::atomic::Staged`]).
    pub fn stage_states(
        &self,
        path: impl AsRef<std::path::Path>,
        states: &[V41State],
    ) -> Result<crate::atomic::Staged> {
        for (s, st) in states.iter().enumerate() {
            self.check_state(s, st)?;
        }
        let n1 = self.hashing.history_len();
        let hist: Vec<i64> = states
            .iter()
            .flat_map(|s| s.history.iter().copied())
            .collect();
        // The file holds int64 positions: one past that is refused, not wrapped negative.
        let pos: Vec<i64> = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                i64::try_from(s.position).map_err(|_| {
                    EngramError::invalid(
                        format!("states[{i}].position"),
                        "a position below 2^63 (the file's int64)",
                        s.position,
                    )
                })
            })
            .collect::<Result<_>>()?;
        let mut w = crate::tensors::TensorWriter::new();
        w.i64("history", &[states.len(), n1], &hist);
        w.i64("position", &[states.len()], &pos);
        w.meta("engram_variant", "deepseek-v4.1");
        w.meta("engram_layer", self.layer_id.to_string());
        w.meta("engram_max_ngram_size", self.cfg.max_ngram_size.to_string());
        w.meta(COMPRESSION_KEY, self.hashing.compressed().fingerprint());
        w.stage(path)
    }

    /// Reads states written by [`V41Layer::save_states`] for this layer.
    pub fn load_states(&self, path: impl AsRef<std::path::Path>) -> Result<Vec<V41State>> {
        self.load_states_checked(path.as_ref(), None)
    }

    /// [`V41Layer::load_states`] for a run of `sequences` sequences: a file holding another
    /// number of states is refused from its header, before its tensors are read.
    pub fn load_states_for(
        &self,
        path: impl AsRef<std::path::Path>,
        sequences: usize,
    ) -> Result<Vec<V41State>> {
        self.load_states_checked(path.as_ref(), Some(sequences))
    }

    fn load_states_checked(
        &self,
        path: &std::path::Path,
        sequences: Option<usize>,
    ) -> Result<Vec<V41State>> {
        let f = crate::tensors::TensorFile::open(path)?;
        let where_ = format!("states in {}", f.path().display());
        let meta = |k: &str| f.metadata().get(k).cloned().unwrap_or_default();
        if meta("engram_variant") != "deepseek-v4.1" {
            // A demo layer's states carry its config instead: say so.
            let found = match f.metadata().get("engram_variant") {
                None if f.metadata().contains_key("engram_config") => {
                    "the states of a demo layer (`engram_config` metadata)".to_string()
                }
                None => "no such metadata".to_string(),
                Some(v) => format!("{v:?}"),
            };
            return Err(EngramError::invalid(
                where_,
                "`engram_variant: deepseek-v4.1` metadata (written by --state-out on a V4.1 layer)",
                found,
            ));
        }
        if meta("engram_layer") != self.layer_id.to_string() {
            return Err(EngramError::invalid(
                where_,
                format!("states of layer {}", self.layer_id),
                format!("layer {}", meta("engram_layer")),
            ));
        }
        let here = self.hashing.compressed().fingerprint();
        for (key, want) in [
            ("engram_max_ngram_size", self.cfg.max_ngram_size.to_string()),
            (COMPRESSION_KEY, here),
        ] {
            // Files from before a key existed have no entry for it.
            if let Some(saved) = f.metadata().get(key).filter(|v| **v != want) {
                return Err(EngramError::invalid(
                    format!("{where_}: metadata {key}"),
                    want,
                    saved,
                ));
            }
        }
        crate::state_io::extra_tensor(&f, &["history", "position"])?;
        let n1 = self.hashing.history_len();
        // Errors of the file's contents name the file.
        let in_file = |e: EngramError| EngramError::InFile {
            path: f.path().display().to_string(),
            source: Box::new(e),
        };
        // Shapes from the header first: a count from a damaged or foreign file is never
        // allocated before it is checked.
        let (_, pshape) = f.info("position")?;
        let (_, hshape) = f.info("history")?;
        let s = match (&pshape[..], sequences) {
            ([s], Some(want)) if *s != want => {
                return Err(in_file(EngramError::invalid(
                    "tensor `position`",
                    format!("{want} states (one per sequence, position [{want}])"),
                    format!("position {pshape:?}"),
                )))
            }
            ([s], _) => *s,
            _ => {
                return Err(in_file(EngramError::invalid(
                    "tensor `position`",
                    format!(
                        "shape [S] (S states){}",
                        match sequences {
                            Some(n) => format!(", S = {n}"),
                            None => String::new(),
                        }
                    ),
                    format!("{pshape:?}"),
                )))
            }
        };
        if hshape != [s, n1] {
            return Err(in_file(EngramError::invalid(
                "tensor `history`",
                format!(
                    "shape [{s}, {n1}] (one row of the last max_ngram_size - 1 = {n1} ids per \
                     state; `position` is [{s}])"
                ),
                format!("{hshape:?}"),
            )));
        }
        let mut plan = crate::budget::MemoryPlan::new();
        plan.add_dims(
            format!("the {s} states in {}", f.path().display()),
            &[s as u64, n1 as u64 + 1],
            16,
        )?;
        plan.check()?;
        let pos = f.i64("position", Some(&[s]))?;
        let hist = f.i64("history", Some(&[s, n1]))?;
        hist.data
            .chunks_exact(n1.max(1))
            .zip(&pos.data)
            .enumerate()
            .map(|(s, (h, &p))| {
                if p < 0 {
                    return Err(in_file(EngramError::invalid(
                        format!("position[{s}]"),
                        "a count >= 0",
                        p,
                    )));
                }
                let st = V41State {
                    history: h.to_vec(),
                    position: p as u64,
                };
                self.check_state(s, &st).map_err(in_file)?;
                Ok(st)
            })
            .collect()
    }
}
