//! The weights PyTorch creates for `Engram(layer_id)` after `torch.manual_seed(seed)`,
//! reproduced bit for bit (x86-64 with AVX2), with no Python and no file.
//!
//! Construction order of the reference module: `multi_head_embedding` (normal_),
//! `short_conv.conv` (kaiming_uniform_, no bias), `short_conv.norms` (ones, no draw),
//! `value_proj` (weight, then bias), `key_projs.{i}` (each weight, then bias), `norm1`, `norm2`
//! (ones, no draw).

use crate::config::EngramConfig;
use crate::dtype::DType;
use crate::error::{EngramError, Result};
use crate::hashing::NgramHashMapping;
use crate::rng::torch::TorchGenerator;
use crate::weights::{EmbeddingTable, EngramWeights};

/// Initialises the layer `cfg.layer_id` as PyTorch would; returns the weights and the
/// generator, positioned where the reference's next draw (e.g. `torch.randn`) would start.
/// `progress` receives the number of table elements filled so far (for a progress bar).
pub fn torch_default_weights(
    cfg: &EngramConfig,
    hashing: &NgramHashMapping,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<(EngramWeights, TorchGenerator)> {
    torch_default_weights_as(cfg, hashing, seed, DType::F32, progress)
}

/// [`torch_default_weights`] with the table stored as `table_dtype`. For `Bf16` the normals
/// are rounded to bf16 chunk by chunk, so the f32 table (4 bytes a weight) is never held;
/// the other weights stay f32.
pub fn torch_default_weights_as(
    cfg: &EngramConfig,
    hashing: &NgramHashMapping,
    seed: u64,
    table_dtype: DType,
    progress: &mut dyn FnMut(usize),
) -> Result<(EngramWeights, TorchGenerator)> {
    let layer = hashing.layer(cfg.layer_id)?;
    let rows = layer.table_rows() as usize;
    // 2^36 floats = 256 GiB: beyond any machine this runs on; refuse instead of aborting in
    // the allocator.
    const MAX_TABLE_ELEMS: u128 = 1 << 36;
    let elems = rows as u128 * cfg.head_dim() as u128;
    if elems > MAX_TABLE_ELEMS {
        return Err(EngramError::config(
            "engram_vocab_size",
            format!(
                "a table of at most 2^36 floats to initialise in memory (head_dim {})",
                cfg.head_dim()
            ),
            format!("{rows} rows = {elems} floats"),
        ));
    }
    let (d, dm, hc, taps) = (
        cfg.hidden_size,
        cfg.memory_width(),
        cfg.hc_mult,
        cfg.kernel_size,
    );
    let mut g = TorchGenerator::manual_seed(seed);
    let n = rows * cfg.head_dim();
    let table = match table_dtype {
        DType::F32 => {
            let mut table = crate::alloc::zeroed_f32(n, "the embedding table", true)?;
            g.normal_f32_with_progress(&mut table, 0.0, 1.0, progress);
            EmbeddingTable::from_f32(table, rows, cfg.head_dim())?
        }
        DType::Bf16 => {
            let mut table = crate::alloc::zeroed_u16(n, "the embedding table", true)?;
            g.normal_f32_chunked(n, 0.0, 1.0, &mut |off, v| {
                for (o, x) in table[off..off + v.len()].iter_mut().zip(v) {
                    *o = half::bf16::from_f32(*x).to_bits();
                }
                progress(v.len());
            });
            EmbeddingTable::from_bf16_bits(table, rows, cfg.head_dim())?
        }
    };
    // Depthwise Conv1d weight [HC·D, 1, K]: fan_in = 1·K. These buffers are allocated
    // fallibly too: a library caller may not have planned memory first.
    let mut conv_weight = crate::alloc::zeroed_f32(hc * d * taps, "the conv weight", false)?;
    g.kaiming_uniform_f32(&mut conv_weight, taps);
    let linear = |g: &mut TorchGenerator, what: &str| -> Result<(Vec<f32>, Vec<f32>)> {
        let mut w = crate::alloc::zeroed_f32(d * dm, what, false)?;
        let mut b = crate::alloc::zeroed_f32(d, what, false)?;
        g.kaiming_uniform_f32(&mut w, dm);
        g.linear_bias_f32(&mut b, dm);
        Ok((w, b))
    };
    let (value_proj_weight, value_proj_bias) = linear(&mut g, "value_proj")?;
    let (key_projs_weight, key_projs_bias) = (0..hc)
        .map(|_| linear(&mut g, "key_projs"))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let ones = vec![vec![1.0f32; d]; hc];
    let weights = EngramWeights {
        table,
        offsets: layer.offsets().iter().map(|&o| o as i64).collect(),
        value_proj_weight,
        value_proj_bias,
        key_projs_weight,
        key_projs_bias,
        norm1: ones.clone(),
        norm2: ones.clone(),
        conv_weight,
        conv_norms: ones,
    };
    Ok((weights, g))
}

/// The demo's mock hidden states: `torch.randn(1, ceil(L/32)·32, HC, D)` from `g`, cut to the
/// first `len` positions: [1, len, HC, D].
pub fn demo_hidden_states(g: &mut TorchGenerator, cfg: &EngramConfig, len: usize) -> Vec<f32> {
    let padded = len.div_ceil(32) * 32;
    let row = cfg.hc_mult * cfg.hidden_size;
    let mut h = g.randn(padded * row);
    h.truncate(len * row);
    h
}
