//! DeepSeek-V4.1 n-gram hashing: the demo's multipliers and prime search (one base for every
//! order), table row ids with offsets added, and dead (non-text) tokens that block every
//! n-gram reaching back across them.

use super::config::V41Config;
use crate::compression::CompressedTokenizer;
use crate::error::{EngramError, Result};
use crate::hashing::{draw_layer_params, LayerHashParams};
use std::sync::Arc;

/// A dead token's canonical id in the n-gram history (`token_mask` false: an image span).
/// Positions before a sequence's start are dead too, which blocks exactly as the reference's
/// `p < shift` does.
pub const DEAD: i64 = i64::MIN;

/// Hash parameters of one V4.1 layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V41LayerParams {
    /// Multipliers, primes.
    pub params: LayerHashParams,
    /// Row offset of every column: exclusive cumulative sum of the primes, column order.
    pub offsets: Vec<i64>,
}

impl V41LayerParams {
    /// Rows of the layer's table (the sum of its primes).
    pub fn table_rows(&self) -> u64 {
        self.params.table_rows()
    }
}

/// Every layer's parameters, from the config alone (no tokenizer: the multipliers are drawn
/// against `engram_compressed_vocab_size`). Each layer's primes must sum to its
/// `engram_num_embeddings` entry.
pub fn layer_params(cfg: &V41Config) -> Result<Vec<V41LayerParams>> {
    cfg.validate()?;
    let bases = vec![cfg.vocab_size; cfg.max_ngram_size - 1];
    let layers = draw_layer_params(
        &cfg.layer_ids,
        &bases,
        cfg.n_heads,
        cfg.max_ngram_size,
        0,
        cfg.compressed_vocab_size,
    );
    layers
        .into_iter()
        .enumerate()
        .map(|(i, params)| {
            // Checked: a config may take bases up to i64::MAX / 2, whose primes can sum
            // past what a row id (int64) holds.
            let rows = params
                .head_sizes()
                .iter()
                .try_fold(0u64, |a, &p| a.checked_add(p))
                .filter(|&r| r <= i64::MAX as u64)
                .ok_or_else(|| {
                    EngramError::config(
                        "engram_vocab_size",
                        format!(
                            "a base whose {} primes per layer sum to fewer than 2^63 rows",
                            params.head_sizes().len()
                        ),
                        cfg.vocab_size,
                    )
                })?;
            if rows != cfg.num_embeddings[i] {
                return Err(EngramError::config(
                    format!("engram_num_embeddings[{i}]"),
                    format!("the sum of layer {}'s primes, {rows}", params.layer_id),
                    cfg.num_embeddings[i],
                ));
            }
            let offsets = params.offsets().iter().map(|&o| o as i64).collect();
            Ok(V41LayerParams { params, offsets })
        })
        .collect()
}

/// Compression plus one layer's hash parameters: canonical ids -> table row ids.
#[derive(Debug, Clone)]
pub struct V41Hashing {
    compressed: Arc<CompressedTokenizer>,
    pad: i64,
    n: usize,
    heads: usize,
    layer: V41LayerParams,
}

impl V41Hashing {
    /// Checks the tokenizer against the config (its canonical-id count must equal
    /// `engram_compressed_vocab_size`: every multiplier was drawn against it) and builds
    /// layer `layer`'s hashing.
    pub fn new(cfg: &V41Config, compressed: Arc<CompressedTokenizer>, layer: u64) -> Result<Self> {
        if compressed.num_compressed() as u64 != cfg.compressed_vocab_size {
            return Err(EngramError::config(
                "engram_compressed_vocab_size",
                format!(
                    "the tokenizer's canonical-id count, {} (pass the checkpoint's own tokenizer with --tokenizer)",
                    compressed.num_compressed()
                ),
                cfg.compressed_vocab_size,
            ));
        }
        let pad = compressed.canonical_pad("engram_pad_id", cfg.pad_id)?;
        let i = cfg.layer_index(layer)?;
        let layer = layer_params(cfg)?.swap_remove(i);
        Ok(V41Hashing {
            compressed,
            pad,
            n: cfg.max_ngram_size,
            heads: cfg.n_heads,
            layer,
        })
    }

    /// The layer's parameters.
    pub fn layer(&self) -> &V41LayerParams {
        &self.layer
    }

    /// The compression table.
    pub fn compressed(&self) -> &CompressedTokenizer {
        &self.compressed
    }

    /// Canonical id of the pad token.
    pub fn pad_canonical(&self) -> i64 {
        self.pad
    }

    /// Columns per token.
    pub fn columns(&self) -> usize {
        (self.n - 1) * self.heads
    }

    /// N - 1: the n-gram history a sequence carries.
    pub fn history_len(&self) -> usize {
        self.n - 1
    }

    /// Canonical ids of one sequence's tokens, [`DEAD`] where `mask` is false (dead tokens'
    /// ids are never looked up). An id outside the tokenizer is an error naming it.
    pub fn canonical(&self, ids: &[i64], mask: Option<&[bool]>) -> Result<Vec<i64>> {
        ids.iter()
            .enumerate()
            .map(|(t, &id)| {
                if mask.is_some_and(|m| !m[t]) {
                    return Ok(DEAD);
                }
                if id < 0 {
                    return Err(EngramError::invalid(
                        format!("input_ids[{t}]"),
                        format!(
                            "a token id in 0..{} (mark non-text tokens with token_mask)",
                            self.compressed.num_raw()
                        ),
                        id,
                    ));
                }
                self.compressed.compress_id(id).ok_or_else(|| {
                    EngramError::invalid(
                        format!("input_ids[{t}]"),
                        format!(
                            "an id below the tokenizer size {}",
                            self.compressed.num_raw()
                        ),
                        id,
                    )
                })
            })
            .collect()
    }

    /// Row ids of one position: `hist[k]` is the canonical id at p - k (newest first, `hist[0]`
    /// the token itself, [`DEAD`] for dead or before-start), `out` gets the
    /// (N-1)·heads table row ids (offsets added).
    #[inline]
    #[allow(clippy::needless_range_loop)] // i walks tok, the multipliers and the primes together
    pub fn hash_position(&self, hist: &[i64], out: &mut [i64]) {
        let p = &self.layer.params;
        let mut blocked = false;
        let mut tok = [0i64; crate::config::limits::MAX_NGRAM];
        for (shift, t) in tok.iter_mut().enumerate().take(self.n) {
            blocked |= hist[shift] == DEAD;
            *t = if blocked { self.pad } else { hist[shift] };
        }
        let mut rolling = tok[0].wrapping_mul(p.multipliers[0]);
        for i in 1..self.n {
            rolling ^= tok[i].wrapping_mul(p.multipliers[i]);
            for (h, &prime) in p.primes[i - 1].iter().enumerate() {
                let col = (i - 1) * self.heads + h;
                out[col] = rolling.rem_euclid(prime as i64) + self.layer.offsets[col];
            }
        }
    }

    /// Row ids `[len, columns]` of a chunk of canonical ids, continuing from `history` (the
    /// last N-1 canonical ids before the chunk, oldest first; all [`DEAD`] at a sequence's
    /// start), which is updated.
    pub fn hash_chunk(&self, history: &mut [i64], canon: &[i64]) -> Vec<i64> {
        let (n1, cols) = (self.n - 1, self.columns());
        let mut ext = history.to_vec();
        ext.extend_from_slice(canon);
        let mut out = vec![0i64; canon.len() * cols];
        let mut hist = vec![0i64; self.n];
        for t in 0..canon.len() {
            for (k, hk) in hist.iter_mut().enumerate() {
                *hk = ext[t + n1 - k];
            }
            self.hash_position(&hist, &mut out[t * cols..(t + 1) * cols]);
        }
        history.copy_from_slice(&ext[ext.len() - n1..]);
        out
    }
}
