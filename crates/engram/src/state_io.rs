//! Saving and restoring the streaming states of a batch (safetensors).
//!
//! Layout for S sequences: `ngram_history` int64 `[S, N-1]`, `conv_history` f32 `[S, R, HC·D]`
//! (oldest row first), `position` int64 `[S]`; metadata `engram_config` holds the config JSON,
//! and a restore checks that the layer it is restored into has the same shape-defining
//! fields.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::layer::{Engram, EngramState};
use crate::tensors::{TensorFile, TensorWriter};
use std::path::Path;

/// Writes the states of a batch.
pub fn save_states(path: impl AsRef<Path>, e: &Engram, states: &[EngramState]) -> Result<()> {
    let cfg = e.config();
    let (n1, r, c) = (
        cfg.max_ngram_size - 1,
        cfg.conv_history(),
        cfg.hc_mult * cfg.hidden_size,
    );
    let mut hist = Vec::with_capacity(states.len() * n1);
    let mut conv = Vec::with_capacity(states.len() * r * c);
    let mut pos = Vec::with_capacity(states.len());
    for s in states {
        hist.extend_from_slice(s.ngram_history());
        conv.extend(s.conv_history());
        pos.push(s.position() as i64);
    }
    let mut w = TensorWriter::new();
    w.i64("ngram_history", &[states.len(), n1], &hist);
    w.f32("conv_history", &[states.len(), r, c], &conv);
    w.i64("position", &[states.len()], &pos);
    w.meta("engram_config", cfg.to_json_string());
    w.write(path)
}

/// Reads the states of a batch for layer `e`.
pub fn load_states(path: impl AsRef<Path>, e: &Engram) -> Result<Vec<EngramState>> {
    let f = TensorFile::open(path)?;
    let cfg = e.config();
    if let Some(j) = f.metadata().get("engram_config") {
        let saved: EngramConfig =
            serde_json::from_str(j).map_err(|source| EngramError::ConfigJson {
                path: format!("{} (engram_config metadata)", f.path().display()),
                source,
            })?;
        let key = |c: &EngramConfig| {
            (
                c.max_ngram_size,
                c.kernel_size,
                c.hidden_size,
                c.hc_mult,
                c.layer_id,
                c.seed,
                c.engram_vocab_size.clone(),
            )
        };
        if key(&saved) != key(cfg) {
            return Err(EngramError::invalid(
                format!("states in {}", f.path().display()),
                format!("states of layer {} with this config", cfg.layer_id),
                format!(
                    "states saved for a different config (layer {})",
                    saved.layer_id
                ),
            ));
        }
    }
    let (n1, r, c) = (
        cfg.max_ngram_size - 1,
        cfg.conv_history(),
        cfg.hc_mult * cfg.hidden_size,
    );
    let pos = f.i64("position", None)?;
    if pos.shape.len() != 1 {
        return Err(EngramError::Shape {
            name: "position".into(),
            expected: vec![pos.data.len()],
            found: pos.shape,
        });
    }
    let s = pos.shape[0];
    let hist = f.i64("ngram_history", Some(&[s, n1]))?.data;
    let conv = f.f32("conv_history", Some(&[s, r, c]))?.data;
    if let Some(index) = conv.iter().position(|x| !x.is_finite()) {
        return Err(EngramError::NonFinite {
            name: "conv_history".into(),
            index,
            value: conv[index],
        });
    }
    let vprime = e.hashing().compressed().num_compressed() as i64;
    if let Some(i) = hist.iter().position(|&h| h >= vprime) {
        return Err(EngramError::invalid(
            format!("ngram_history[{}, {}]", i / n1.max(1), i % n1.max(1)),
            format!("a canonical id below {vprime} (or a negative pass-through id)"),
            hist[i],
        ));
    }
    Ok((0..s)
        .map(|i| {
            EngramState::from_parts(
                hist[i * n1..(i + 1) * n1].to_vec(),
                conv[i * r * c..(i + 1) * r * c].to_vec(),
                c,
                pos.data[i].max(0) as u64,
            )
        })
        .collect())
}
