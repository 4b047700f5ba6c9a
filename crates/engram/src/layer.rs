//! The Engram layer: hashing, gathering, gating, short convolution (reference §3-6).

use crate::compression::CompressedTokenizer;
use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::fused::{DType, Driver, FusedOut, FusedWeights, SeqInput};
use crate::hashing::NgramHashMapping;
use crate::model::DemoModel;
use crate::ops;
use crate::state::EngramState;
use crate::tokenizer::Tokenizer;
use crate::weights::EngramWeights;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Every stage of a forward pass over `[B, L]`. Stages that a path does not materialise
/// are `None`.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    /// Batch size B.
    pub batch: usize,
    /// Sequence length L.
    pub len: usize,
    /// `hash_ids` `[B, L, H]` (before table offsets).
    pub hash_ids: Vec<i64>,
    /// `embeddings` `[B, L, Dm]`.
    pub embeddings: Option<Vec<f32>>,
    /// `value` `[B, L, D]` (value_proj output).
    pub value: Option<Vec<f32>>,
    /// `keys` `[B, L, HC, D]` (key_projs outputs, before RMSNorm).
    pub keys: Option<Vec<f32>>,
    /// `gates` `[B, L, HC]`.
    pub gates: Vec<f32>,
    /// `gated_value` `[B, L, HC, D]`.
    pub gated_value: Option<Vec<f32>>,
    /// `short_conv` `[B, L, HC, D]` (after SiLU).
    pub short_conv: Option<Vec<f32>>,
    /// `output` `[B, L, HC, D]` = gated_value + short_conv.
    pub output: Vec<f32>,
}

impl Stages {
    /// (name, shape, data) of every float stage present, in pipeline order.
    pub fn float_stages<'a>(
        &'a self,
        cfg: &EngramConfig,
    ) -> Vec<(&'static str, Vec<usize>, &'a [f32])> {
        let (b, l, hc, d) = (self.batch, self.len, cfg.hc_mult, cfg.hidden_size);
        let opt = |n: &'static str, s: Vec<usize>, x: &'a Option<Vec<f32>>| {
            x.as_ref().map(|x| (n, s, x.as_slice()))
        };
        [
            opt(
                "embeddings",
                vec![b, l, cfg.memory_width()],
                &self.embeddings,
            ),
            opt("value", vec![b, l, d], &self.value),
            opt("keys", vec![b, l, hc, d], &self.keys),
            Some(("gates", vec![b, l, hc], self.gates.as_slice())),
            opt("gated_value", vec![b, l, hc, d], &self.gated_value),
            opt("short_conv", vec![b, l, hc, d], &self.short_conv),
            Some(("output", vec![b, l, hc, d], self.output.as_slice())),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Appends the stages of another chunk (same B = 1 sequence) in time order.
    pub(crate) fn append_time(&mut self, other: Stages) {
        fn cat(a: &mut Option<Vec<f32>>, b: Option<Vec<f32>>) {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => a.extend(b),
                _ => *a = None,
            }
        }
        if self.batch == 0 {
            *self = other;
            return;
        }
        self.len += other.len;
        self.hash_ids.extend(other.hash_ids);
        self.gates.extend(other.gates);
        self.output.extend(other.output);
        cat(&mut self.embeddings, other.embeddings);
        cat(&mut self.value, other.value);
        cat(&mut self.keys, other.keys);
        cat(&mut self.gated_value, other.gated_value);
        cat(&mut self.short_conv, other.short_conv);
    }
}

/// Which implementation runs the float stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardPath {
    /// Plain loops, every stage kept ([`crate::ops`]).
    Reference,
    /// Tiled, fused, multicore kernels ([`crate::fused`]); keeps hash_ids, gates, output.
    #[default]
    Fused,
}

impl ForwardPath {
    /// Every path, for test suites that must run on all of them.
    pub const ALL: &'static [ForwardPath] = &[ForwardPath::Reference, ForwardPath::Fused];
}

impl std::str::FromStr for ForwardPath {
    type Err = EngramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(ForwardPath::Reference),
            "fused" => Ok(ForwardPath::Fused),
            other => Err(EngramError::invalid(
                "path",
                "`reference` or `fused`",
                other,
            )),
        }
    }
}

/// One Engram layer: the demo variant's model (config, hash mapping, weights) and how it
/// runs (the fused path's storage type and packed weights). It dereferences to its
/// [`DemoModel`], whose accessors (`config`, `hashing`, `weights`, ...) it offers directly.
#[derive(Debug, Clone)]
pub struct Engram {
    model: DemoModel,
    dtype: DType,
    /// Packed weights of the fused path, built on first use.
    fused: OnceLock<Arc<FusedWeights>>,
}

/// Loads the tokenizer named by the config and builds its compression table.
pub fn compression_for(cfg: &EngramConfig) -> Result<Arc<CompressedTokenizer>> {
    let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    Ok(Arc::new(CompressedTokenizer::build(&tok)?))
}

impl std::ops::Deref for Engram {
    type Target = DemoModel;
    fn deref(&self) -> &DemoModel {
        &self.model
    }
}

impl Engram {
    /// Builds the layer `cfg.layer_id` from a hash mapping and weights, checking that the
    /// weights fit the config.
    pub fn new(
        cfg: EngramConfig,
        hashing: Arc<NgramHashMapping>,
        weights: EngramWeights,
    ) -> Result<Self> {
        Ok(Engram {
            model: DemoModel::new(cfg, hashing, weights)?,
            dtype: DType::F32,
            fused: OnceLock::new(),
        })
    }

    /// [`Engram::load`] with the table in the store `opts` names (direct I/O, a hot-row
    /// cache); outputs are the same as with the memory-mapped table.
    pub fn load_with_table(
        cfg: EngramConfig,
        weights_path: impl AsRef<Path>,
        opts: crate::rows::TableOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let hashing = Arc::new(NgramHashMapping::new(&cfg, compression_for(&cfg)?)?);
        let layer = hashing.layer(cfg.layer_id)?;
        let offsets: Vec<i64> = layer.offsets().iter().map(|&o| o as i64).collect();
        let rows = layer.table_rows() as usize;
        let w = EngramWeights::load_with_table(weights_path, &cfg, &offsets, rows, opts)?;
        Self::new(cfg, hashing, w)
    }

    /// The model (config, hash mapping, weights) this layer runs.
    pub fn model(&self) -> &DemoModel {
        &self.model
    }

    /// Loads everything a config names: tokenizer (compression), hash mapping, weights file.
    pub fn load(cfg: EngramConfig, weights_path: impl AsRef<Path>) -> Result<Self> {
        cfg.validate()?;
        let hashing = Arc::new(NgramHashMapping::new(&cfg, compression_for(&cfg)?)?);
        Self::load_with(cfg, hashing, weights_path)
    }

    /// Loads the weights for a config, reusing a hash mapping.
    pub fn load_with(
        cfg: EngramConfig,
        hashing: Arc<NgramHashMapping>,
        weights_path: impl AsRef<Path>,
    ) -> Result<Self> {
        let layer = hashing.layer(cfg.layer_id)?;
        let offsets: Vec<i64> = layer.offsets().iter().map(|&o| o as i64).collect();
        let w = EngramWeights::load(weights_path, &cfg, &offsets, layer.table_rows() as usize)?;
        Self::new(cfg, hashing, w)
    }

    /// Storage type of the fused path's table and projections.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets the fused path's storage type. `Bf16` packs the projections in bf16 and gathers
    /// from a bf16 table (a bf16 weights file is used as it is, anything else is copied
    /// once); the reference path keeps reading the table as loaded.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self.fused = OnceLock::new();
        self
    }

    /// The fused path's packed weights (packed on first use; fails only when memory for a
    /// bf16 copy of the table cannot be had).
    pub fn fused_weights(&self) -> Result<&FusedWeights> {
        if let Some(f) = self.fused.get() {
            return Ok(f);
        }
        let packed = Arc::new(FusedWeights::pack(&self.model, self.dtype)?);
        // Two threads may pack at once; either result is the same.
        Ok(self.fused.get_or_init(|| packed))
    }

    /// Checks `[B, L]` ids and `[B, L, HC, D]` hidden states: sizes, finiteness.
    pub fn check_inputs(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
    ) -> Result<()> {
        self.check_shapes(input_ids, hidden, batch, len)?;
        check_finite(hidden)
    }

    fn check_shapes(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
    ) -> Result<()> {
        if batch == 0 || len == 0 {
            return Err(EngramError::invalid(
                "input_ids",
                "a [B, L] array with B, L >= 1",
                format!("[{batch}, {len}]"),
            ));
        }
        // Checked products: a huge B or L must not wrap around to a length that matches.
        let tokens = batch.checked_mul(len);
        if tokens != Some(input_ids.len()) {
            return Err(EngramError::Shape {
                name: "input_ids".into(),
                expected: vec![batch, len],
                found: vec![input_ids.len()],
            });
        }
        let (hc, d) = (self.cfg.hc_mult, self.cfg.hidden_size);
        if tokens.and_then(|t| t.checked_mul(hc * d)) != Some(hidden.len()) {
            return Err(EngramError::Shape {
                name: "hidden_states".into(),
                expected: vec![batch, len, hc, d],
                found: vec![hidden.len()],
            });
        }
        Ok(())
    }

    /// Whole-batch forward: `input_ids` `[B, L]` raw ids, `hidden` `[B, L, HC, D]`.
    /// Every sequence starts fresh (the reference's semantics).
    pub fn forward(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
        path: ForwardPath,
    ) -> Result<Stages> {
        self.forward_batch(input_ids, hidden, batch, len, path, false, None)
    }

    /// [`Engram::forward`] writing the output `[B, L, HC, D]` into `output`, a buffer the
    /// caller keeps across calls (a serving loop's activations), instead of a fresh vector:
    /// no allocation, no page faults on first touch, no unmapping afterwards. The returned
    /// stages hold `hash_ids` and `gates`; their `output` is empty. Every element of
    /// `output` is overwritten; its length must be B·L·HC·D. After an error its contents
    /// are unspecified (a prefill that meets a NaN may have written part of it).
    ///
    /// ```no_run
    /// # fn main() -> engram::Result<()> {
    /// let e = engram::Engram::load(engram::EngramConfig::default(), "weights.safetensors")?;
    /// let (b, l) = (1, 4096);
    /// let c = e.config().hc_mult * e.config().hidden_size;
    /// let mut out = vec![0.0f32; b * l * c];
    /// # let (ids, hidden) = (vec![0i64; b * l], vec![0.0f32; b * l * c]);
    /// e.forward_into(&ids, &hidden, b, l, engram::ForwardPath::Fused, &mut out)?;
    /// # Ok(()) }
    /// ```
    pub fn forward_into(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
        path: ForwardPath,
        output: &mut [f32],
    ) -> Result<Stages> {
        self.forward_batch(input_ids, hidden, batch, len, path, false, Some(output))
    }

    /// [`Engram::forward`] that also keeps `gated_value` and `short_conv` on the fused path
    /// (an extra `[B, L, HC, D]` buffer; for inspection and the demo).
    pub fn forward_detailed(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
        path: ForwardPath,
    ) -> Result<Stages> {
        self.forward_batch(input_ids, hidden, batch, len, path, true, None)
    }

    /// B fresh sequences of length L as a ragged call, reshaped to [B, L, ...].
    #[allow(clippy::too_many_arguments)]
    fn forward_batch(
        &self,
        input_ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
        path: ForwardPath,
        keep: bool,
        into: Option<&mut [f32]>,
    ) -> Result<Stages> {
        // Shapes in [B, L] terms for the error; the ragged call below checks finiteness.
        self.check_shapes(input_ids, hidden, batch, len)?;
        let mut states: Vec<EngramState> = (0..batch).map(|_| self.new_state()).collect();
        let offsets: Vec<usize> = (0..=batch).map(|b| b * len).collect();
        let mut s =
            self.forward_ragged_with(&mut states, input_ids, hidden, &offsets, path, keep, into)?;
        s.batch = batch;
        s.len = len;
        Ok(s)
    }

    /// Runs one chunk of one sequence (any length >= 1), reading and updating its state.
    /// Returns the chunk's stages with B = 1.
    pub fn forward_chunk(
        &self,
        state: &mut EngramState,
        ids: &[i64],
        hidden: &[f32],
        path: ForwardPath,
    ) -> Result<Stages> {
        self.forward_ragged(
            std::slice::from_mut(state),
            ids,
            hidden,
            &[0, ids.len()],
            path,
        )
    }

    /// Ragged batch: sequence s has rows `offsets[s]..offsets[s+1]` of the packed `ids`
    /// `[T]` and `hidden` `[T, HC, D]` (`cu_seqlens` style; empty sequences allowed) and its own
    /// state, which is read and updated. Returns packed stages (B = 1, L = T).
    ///
    /// On an error every state is as it was. Inputs are checked in this order: shapes,
    /// states, ids, then the hidden states' values; the fused path checks those values where
    /// its gate reads them, so a non-finite table row or a row store's error in the same or
    /// an earlier tile is the error reported there (the reference path reports the hidden
    /// state).
    pub fn forward_ragged(
        &self,
        states: &mut [EngramState],
        ids: &[i64],
        hidden: &[f32],
        offsets: &[usize],
        path: ForwardPath,
    ) -> Result<Stages> {
        self.forward_ragged_with(states, ids, hidden, offsets, path, false, None)
    }

    /// [`Engram::forward_ragged`] that also keeps `gated_value` and `short_conv` on the fused
    /// path (as [`Engram::forward_detailed`] does for fresh `[B, L]` batches).
    pub fn forward_ragged_detailed(
        &self,
        states: &mut [EngramState],
        ids: &[i64],
        hidden: &[f32],
        offsets: &[usize],
        path: ForwardPath,
    ) -> Result<Stages> {
        self.forward_ragged_with(states, ids, hidden, offsets, path, true, None)
    }

    /// [`Engram::forward_ragged`] writing the output `[T, HC, D]` into `output` (see
    /// [`Engram::forward_into`]); the returned stages' `output` is empty.
    pub fn forward_ragged_into(
        &self,
        states: &mut [EngramState],
        ids: &[i64],
        hidden: &[f32],
        offsets: &[usize],
        path: ForwardPath,
        output: &mut [f32],
    ) -> Result<Stages> {
        self.forward_ragged_with(states, ids, hidden, offsets, path, false, Some(output))
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_ragged_with(
        &self,
        states: &mut [EngramState],
        ids: &[i64],
        hidden: &[f32],
        offsets: &[usize],
        path: ForwardPath,
        keep: bool,
        into: Option<&mut [f32]>,
    ) -> Result<Stages> {
        let total = ids.len();
        crate::error::check_offsets(offsets, states.len(), total)?;
        let c = self.cfg.hc_mult * self.cfg.hidden_size;
        if let Some(o) = &into {
            if o.len() != total * c {
                return Err(EngramError::invalid(
                    "output",
                    format!(
                        "a buffer of {} floats ([{total}, {}, {}])",
                        total * c,
                        self.cfg.hc_mult,
                        self.cfg.hidden_size
                    ),
                    format!("{} floats", o.len()),
                ));
            }
        }
        if total == 0 {
            // Every sequence empty: nothing to compute, no state changes.
            for st in states.iter() {
                self.check_state(st)?;
            }
            if !hidden.is_empty() {
                return Err(EngramError::Shape {
                    name: "hidden_states".into(),
                    expected: vec![0, self.cfg.hc_mult, self.cfg.hidden_size],
                    found: vec![hidden.len()],
                });
            }
            return Ok(Stages {
                batch: 1,
                ..Default::default()
            });
        }
        // Checked in this order on both paths: shapes, states, ids, then the hidden states'
        // values. The fused path checks those values where the gate reads them (a scan here
        // would be another pass over them: 0.07-0.08 ms of a B = 64 decode step on Zen 4,
        // most of it handing the blocks to the pool and waiting) and puts the states back
        // if it fails; the reference path scans them here. (In the gate, a non-finite
        // table row in the same or an earlier tile is reported first.)
        let check_in_gate = path == ForwardPath::Fused;
        self.check_shapes(ids, hidden, 1, total)?;
        for (s, st) in states.iter().enumerate() {
            self.check_state(st)?;
            let len = (offsets[s + 1] - offsets[s]) as u64;
            if st.position.checked_add(len).is_none() {
                return Err(EngramError::invalid(
                    format!("sequence {s}: state position"),
                    format!("below 2^64 - {len} (the tokens of this call)"),
                    st.position,
                ));
            }
        }
        // Compress every sequence; errors name the sequence and its own position.
        let mut canon = Vec::with_capacity(states.len());
        for (s, st) in states.iter().enumerate() {
            let seq = &ids[offsets[s]..offsets[s + 1]];
            canon.push(
                self.hashing
                    .compressed()
                    .compress(seq, seq.len().max(1))
                    .map_err(|e| relocate_id_error(e, s, st.position as usize))?,
            );
        }
        if !check_in_gate {
            check_finite(hidden)?;
        }
        match path {
            ForwardPath::Reference => {
                let mut all = Stages::default();
                // On copies, written back once every sequence has run: a sequence that
                // fails (a NaN table row) leaves every state as it was, the ones before it
                // and its own n-gram history (hashed before the gather) included.
                let mut next = states.to_vec();
                for (s, st) in next.iter_mut().enumerate() {
                    if canon[s].is_empty() {
                        continue;
                    }
                    let h = &hidden[offsets[s] * c..offsets[s + 1] * c];
                    all.append_time(self.reference_chunk(st, &canon[s], h)?);
                }
                states.clone_from_slice(&next);
                all.batch = 1;
                if let Some(o) = into {
                    o.copy_from_slice(&all.output);
                    all.output = Vec::new();
                }
                Ok(all)
            }
            ForwardPath::Fused => {
                let n1 = self.cfg.max_ngram_size - 1;
                let seqs: Vec<SeqInput<'_>> = states
                    .iter()
                    .zip(&canon)
                    .enumerate()
                    .map(|(s, (st, cn))| {
                        let mut ext = st.ngram_history.clone();
                        ext.extend_from_slice(cn);
                        SeqInput {
                            ext,
                            hidden: &hidden[offsets[s] * c..offsets[s + 1] * c],
                        }
                    })
                    .collect();
                let (h, hc) = (self.cfg.num_heads(), self.cfg.hc_mult);
                let mut hash_ids = vec![0i64; total * h];
                let mut gates = vec![0.0f32; total * hc];
                // The caller's buffer, or a fresh one (zero pages until the conv writes them).
                let mut fresh = match into {
                    Some(_) => Vec::new(),
                    None => crate::alloc::zeroed_f32(total * c, "the output", false)?,
                };
                let output: &mut [f32] = match into {
                    Some(o) => o,
                    None => &mut fresh,
                };
                let mut gated = if keep {
                    vec![0.0f32; total * c]
                } else {
                    Vec::new()
                };
                let fw = self.fused_weights()?;
                let out = FusedOut {
                    hash_ids: &mut hash_ids,
                    gates: &mut gates,
                    out: &mut *output,
                    gated: keep.then_some(gated.as_mut_slice()),
                };
                // A run that fails part-way (non-finite hidden states or table rows, a row
                // store's error, in one range after another range's rows are pushed) puts
                // the conv histories back itself.
                Driver::new(&self.model, fw)
                    .check_hidden(check_in_gate)
                    .run(&seqs, states, out)?;
                for (st, sq) in states.iter_mut().zip(&seqs) {
                    st.ngram_history
                        .copy_from_slice(&sq.ext[sq.ext.len() - n1..]);
                    st.position += (sq.ext.len() - n1) as u64;
                }
                let (gated_value, short_conv) = if keep {
                    let sc = output.iter().zip(&gated).map(|(o, g)| o - g).collect();
                    (Some(gated), Some(sc))
                } else {
                    (None, None)
                };
                Ok(Stages {
                    batch: 1,
                    len: total,
                    hash_ids,
                    gates,
                    output: fresh,
                    gated_value,
                    short_conv,
                    ..Default::default()
                })
            }
        }
    }

    fn reference_chunk(
        &self,
        state: &mut EngramState,
        canon: &[i64],
        hidden: &[f32],
    ) -> Result<Stages> {
        let cfg = &self.cfg;
        let (len, hc, d, dm) = (
            canon.len(),
            cfg.hc_mult,
            cfg.hidden_size,
            cfg.memory_width(),
        );
        let w = &self.weights;
        // §3 hashes, §4 gather.
        let hash_ids = self.hash_chunk(state, canon);
        let mut emb = vec![0.0f32; len * dm];
        self.gather(&hash_ids, &mut emb)?;
        // §5 projections and gates.
        let value = ops::linear(&emb, &w.value_proj_weight, &w.value_proj_bias, dm);
        let mut keys = vec![0.0f32; len * hc * d];
        let mut gates = vec![0.0f32; len * hc];
        let mut gated = vec![0.0f32; len * hc * d];
        for i in 0..hc {
            let k_i = ops::linear(&emb, &w.key_projs_weight[i], &w.key_projs_bias[i], dm);
            for t in 0..len {
                let key = &k_i[t * d..(t + 1) * d];
                let q = &hidden[(t * hc + i) * d..(t * hc + i + 1) * d];
                keys[(t * hc + i) * d..(t * hc + i + 1) * d].copy_from_slice(key);
                let g = ops::gate(key, q, &w.norm1[i], &w.norm2[i]);
                gates[t * hc + i] = g;
                for j in 0..d {
                    gated[(t * hc + i) * d + j] = g * value[t * d + j];
                }
            }
        }
        // §6 short conv: RMSNorm per branch, then the causal dilated depthwise conv over
        // [history ++ chunk] rows of HC·D channels.
        let hist_rows = cfg.conv_history();
        let c = hc * d;
        let mut normed = state.conv_history();
        normed.reserve(len * c);
        for t in 0..len {
            for i in 0..hc {
                let x = &gated[(t * hc + i) * d..(t * hc + i + 1) * d];
                normed.extend(ops::rms_norm(x, &w.conv_norms[i], ops::RMS_EPS_CONV));
            }
        }
        let y = ops::causal_conv(
            &normed,
            &w.conv_weight,
            c,
            cfg.kernel_size,
            cfg.max_ngram_size,
            hist_rows,
        );
        let short_conv: Vec<f32> = y.iter().map(|&v| ops::silu(v)).collect();
        let output: Vec<f32> = gated.iter().zip(&short_conv).map(|(a, b)| a + b).collect();
        state
            .conv_ring
            .copy_from_slice(&normed[normed.len() - hist_rows * c..]);
        state.conv_head = 0;
        state.position += len as u64;
        Ok(Stages {
            batch: 1,
            len,
            hash_ids,
            embeddings: Some(emb),
            value: Some(value),
            keys: Some(keys),
            gates,
            gated_value: Some(gated),
            short_conv: Some(short_conv),
            output,
        })
    }
}

/// The first non-finite hidden state is an error naming its index. The scan runs on every
/// core in blocks (a prefill's hidden states are tens of MB), and reports the first in order.
fn check_finite(hidden: &[f32]) -> Result<()> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let first_bad =
        |(b, blk): (usize, &[f32])| crate::ops::first_non_finite(blk).map(|i| b * BLOCK + i);
    // One block (a small call, such as a reference-path decode step) is checked here:
    // handing it to the pool costs more.
    let bad = if hidden.len() <= BLOCK {
        first_bad((0, hidden))
    } else {
        hidden
            .par_chunks(BLOCK)
            .enumerate()
            .find_map_first(first_bad)
    };
    match bad {
        Some(index) => Err(EngramError::NonFinite {
            name: "hidden_states".into(),
            index,
            value: hidden[index],
        }),
        None => Ok(()),
    }
}

/// Rewrites an id error's (batch, position) to the caller's coordinates.
fn relocate_id_error(e: EngramError, batch: usize, pos_offset: usize) -> EngramError {
    match e {
        EngramError::IdOutOfRange {
            position,
            id,
            vocab,
            ..
        } => EngramError::IdOutOfRange {
            batch,
            position: position + pos_offset,
            id,
            vocab,
        },
        other => other,
    }
}
