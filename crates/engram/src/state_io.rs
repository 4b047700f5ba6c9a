//! Saving and restoring the streaming states of a batch (safetensors).
//!
//! Layout for S sequences: `ngram_history` int64 `[S, N-1]`, `conv_history` f32 `[S, R, HC·D]`
//! (oldest row first), `position` int64 `[S]`; metadata `engram_config` holds the config JSON
//! and `engram_compression` the tokenizer compression's fingerprint. A restore requires the
//! config and checks that the layer it is restored into agrees on every field that shapes a
//! state or its ids, and on the fingerprint where the file has one; the error names each
//! field that differs.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::layer::Engram;
use crate::state::EngramState;
use crate::tensors::{TensorFile, TensorWriter};
use std::path::Path;

/// Metadata key of the compression table's fingerprint (files written before it existed
/// restore without that check).
const COMPRESSION_KEY: &str = "engram_compression";

/// Writes the states of a batch.
pub fn save_states(path: impl AsRef<Path>, e: &Engram, states: &[EngramState]) -> Result<()> {
    stage_states(path, e, states)?.commit()
}

/// [`save_states`] up to the rename ([`crate::atomic::Staged`]): for a command that
/// commits several outputs only once all of them are written.
pub fn stage_states(
    path: impl AsRef<Path>,
    e: &Engram,
    states: &[EngramState],
) -> Result<crate::atomic::Staged> {
    let cfg = e.config();
    let (n1, r, c) = (
        cfg.max_ngram_size - 1,
        cfg.conv_history(),
        cfg.hc_mult * cfg.hidden_size,
    );
    let mut hist = Vec::with_capacity(states.len() * n1);
    let mut conv = Vec::with_capacity(states.len() * r * c);
    let mut pos = Vec::with_capacity(states.len());
    for (i, s) in states.iter().enumerate() {
        // A state of another shape would misalign every state after it in the file.
        e.check_state(s).map_err(|err| match err {
            EngramError::Shape {
                name,
                expected,
                found,
            } => EngramError::Shape {
                name: format!("states[{i}]: {name}"),
                expected,
                found,
            },
            err => err,
        })?;
        hist.extend_from_slice(s.ngram_history());
        conv.extend(s.conv_history());
        // The file holds int64 positions: one past that is refused, not wrapped negative.
        pos.push(i64::try_from(s.position()).map_err(|_| {
            EngramError::invalid(
                format!("states[{i}].position"),
                "a position below 2^63 (the file's int64)",
                s.position(),
            )
        })?);
    }
    let mut w = TensorWriter::new();
    w.i64("ngram_history", &[states.len(), n1], &hist);
    w.f32("conv_history", &[states.len(), r, c], &conv);
    w.i64("position", &[states.len()], &pos);
    w.meta("engram_config", cfg.to_json_string());
    w.meta(COMPRESSION_KEY, e.hashing().compressed().fingerprint());
    w.stage(path)
}

/// Reads the states of a batch for layer `e`.
pub fn load_states(path: impl AsRef<Path>, e: &Engram) -> Result<Vec<EngramState>> {
    load_states_from(&TensorFile::open(path)?, e)
}

/// A tensor of a state file other than `names` (a state file holds those alone): an error
/// naming it.
pub(crate) fn extra_tensor(f: &TensorFile, names: &[&str]) -> Result<()> {
    let mut all = f.names();
    all.sort();
    match all.into_iter().find(|n| !names.contains(&n.as_str())) {
        Some(n) => Err(EngramError::invalid(
            format!("tensor `{n}` in states {}", f.path().display()),
            format!("only {} in a state file", names.join(", ")),
            "an extra tensor",
        )),
        None => Ok(()),
    }
}

/// Reads the states of a batch for layer `e` from an opened file.
pub fn load_states_from(f: &TensorFile, e: &Engram) -> Result<Vec<EngramState>> {
    load_checked(f, e).map_err(|err| f.in_file(err))
}

fn load_checked(f: &TensorFile, e: &Engram) -> Result<Vec<EngramState>> {
    let cfg = e.config();
    // A DeepSeek-V4.1 layer's states (its own tensors and metadata): named as such.
    if let Some(v) = f.metadata().get("engram_variant") {
        return Err(EngramError::invalid(
            format!("states in {}", f.path().display()),
            "the states of a demo layer (written by `--state-out` / `save_states` on one)",
            format!("the states of a {v:?} layer (`engram_variant` metadata)"),
        ));
    }
    extra_tensor(f, &["ngram_history", "conv_history", "position"])?;
    let j = f.metadata().get("engram_config").ok_or_else(|| {
        EngramError::invalid(
            format!("states in {}", f.path().display()),
            "`engram_config` metadata (a file written by `--state-out` / `save_states`)",
            "no such metadata",
        )
    })?;
    let saved: EngramConfig = serde_json::from_str(j).map_err(|e| {
        EngramError::invalid(
            format!("states in {}: metadata engram_config", f.path().display()),
            "a demo layer's config",
            e.to_string(),
        )
    })?;
    // Every field that shapes a state or the ids in it must agree.
    let fields: [(&str, String, String); 8] = [
        (
            "layer_id",
            saved.layer_id.to_string(),
            cfg.layer_id.to_string(),
        ),
        (
            "max_ngram_size",
            saved.max_ngram_size.to_string(),
            cfg.max_ngram_size.to_string(),
        ),
        (
            "kernel_size",
            saved.kernel_size.to_string(),
            cfg.kernel_size.to_string(),
        ),
        (
            "hidden_size",
            saved.hidden_size.to_string(),
            cfg.hidden_size.to_string(),
        ),
        (
            "hc_mult",
            saved.hc_mult.to_string(),
            cfg.hc_mult.to_string(),
        ),
        ("seed", saved.seed.to_string(), cfg.seed.to_string()),
        // A fresh history holds the pad's canonical id.
        ("pad_id", saved.pad_id.to_string(), cfg.pad_id.to_string()),
        (
            "engram_vocab_size",
            format!("{:?}", saved.engram_vocab_size),
            format!("{:?}", cfg.engram_vocab_size),
        ),
    ];
    let differ: Vec<String> = fields
        .iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} (this layer: {b})"))
        .collect();
    // Canonical ids come from the tokenizer: the saved ids must mean the same tokens.
    let here = e.hashing().compressed().fingerprint();
    let differ: Vec<String> = differ
        .into_iter()
        .chain(
            f.metadata()
                .get(COMPRESSION_KEY)
                .filter(|saved| **saved != here)
                .map(|saved| format!("a tokenizer of {saved} (this layer: {here})")),
        )
        .collect();
    if !differ.is_empty() {
        return Err(EngramError::invalid(
            format!("states in {}", f.path().display()),
            "states saved with this layer's config",
            format!("states saved with {}", differ.join(", ")),
        ));
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
            format!(
                "ngram_history[{}, {}] in {}",
                i / n1.max(1),
                i % n1.max(1),
                f.path().display()
            ),
            format!("a canonical id below {vprime} (or a negative pass-through id)"),
            hist[i],
        ));
    }
    if let Some(i) = pos.data.iter().position(|&p| p < 0) {
        return Err(EngramError::invalid(
            format!("position[{i}] in {}", f.path().display()),
            "a non-negative token count",
            pos.data[i],
        ));
    }
    // A state p < N-1 tokens in still holds the pad in its first N-1-p history slots, and one
    // p < R tokens in holds zeros in its first R-p conv rows (the sequence's implicit left
    // padding): anything else was not written by a run from the sequence's start.
    let pad = e.hashing().pad_canonical();
    for (i, &p) in pos.data.iter().enumerate() {
        let p = p as u64;
        let pads = (n1 as u64).saturating_sub(p) as usize;
        if let Some(j) = hist[i * n1..i * n1 + pads].iter().position(|&h| h != pad) {
            return Err(EngramError::invalid(
                format!("ngram_history[{i}, {j}] in {}", f.path().display()),
                format!(
                    "the pad's canonical id {pad} at position {p} (fewer than {n1} tokens read)"
                ),
                hist[i * n1 + j],
            ));
        }
        let zeros = (r as u64).saturating_sub(p) as usize * c;
        let rows = &conv[i * r * c..i * r * c + zeros];
        if let Some(k) = rows.iter().position(|&x| x != 0.0) {
            return Err(EngramError::invalid(
                format!(
                    "conv_history[{i}, {}, {}] in {}",
                    k / c,
                    k % c,
                    f.path().display()
                ),
                format!("0 at position {p} (fewer than {r} tokens read)"),
                rows[k],
            ));
        }
    }
    Ok((0..s)
        .map(|i| {
            EngramState::from_parts(
                hist[i * n1..(i + 1) * n1].to_vec(),
                conv[i * r * c..(i + 1) * r * c].to_vec(),
                c,
                pos.data[i] as u64,
            )
        })
        .collect())
}
