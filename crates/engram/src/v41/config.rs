//! The DeepSeek-V4.1 model config: the Engram fields of the checkpoint's
//! `inference/config.json` or of its Hugging Face `config.json` (both spellings), the rest of
//! the model's fields ignored.

use crate::config::limits;
use crate::error::{EngramError, Result};
use serde_json::Value;
use std::path::Path;

/// The Engram part of a DeepSeek-V4.1 config.
#[derive(Debug, Clone, PartialEq)]
pub struct V41Config {
    /// `dim` / `hidden_size`: the residual width.
    pub dim: usize,
    /// `hc_mult`: branches of the residual stream.
    pub hc_mult: usize,
    /// `norm_eps` / `rms_norm_eps` (1e-20 in V4.1).
    pub norm_eps: f32,
    /// `engram_layer_ids`: the blocks that carry an Engram (their primes come in this order).
    pub layer_ids: Vec<u64>,
    /// `engram_vocab_size`: where every order's prime search starts (+1).
    pub vocab_size: u64,
    /// `engram_num_embeddings`: table rows per layer (= the sum of the layer's primes).
    pub num_embeddings: Vec<u64>,
    /// `engram_max_ngram_size`: N (orders 2..N).
    pub max_ngram_size: usize,
    /// `engram_pad_id` / `engram_pad_token_id`: raw id that pads blocked n-gram slots.
    pub pad_id: i64,
    /// `engram_compressed_vocab_size`: canonical ids the tokenizer must produce.
    pub compressed_vocab_size: u64,
    /// `engram_n_heads`: hash heads per order.
    pub n_heads: usize,
    /// `engram_head_dim`: columns of a table row.
    pub head_dim: usize,
}

/// Whether a parsed JSON config is a V4.1 model config (it names `engram_layer_ids`).
pub fn is_v41(v: &Value) -> bool {
    v.get("engram_layer_ids").is_some()
}

fn field<'a>(v: &'a Value, names: &[&'static str]) -> Result<(&'static str, &'a Value)> {
    let present: Vec<(&'static str, &Value)> = names
        .iter()
        .filter_map(|n| v.get(*n).map(|x| (*n, x)))
        .collect();
    if let [(a, x), (b, y), ..] = present[..] {
        if x != y {
            return Err(EngramError::config(
                format!("{a} / {b}"),
                "one value (the two spellings name the same field)",
                format!("{x} and {y}"),
            ));
        }
    }
    if let Some(&(n, x)) = present.first() {
        return Ok((n, x));
    }
    Err(EngramError::config(
        names.join(" / "),
        "present in a DeepSeek-V4.1 config",
        "missing",
    ))
}

fn uint(v: &Value, names: &[&'static str], min: u64, max: u64) -> Result<u64> {
    let (name, x) = field(v, names)?;
    match x.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(EngramError::config(
            name,
            format!("an integer in {min}..={max}"),
            x.to_string(),
        )),
    }
}

fn uint_list(v: &Value, names: &[&'static str], min: u64) -> Result<Vec<u64>> {
    let (name, x) = field(v, names)?;
    let bad = || {
        EngramError::config(
            name,
            format!(
                "a non-empty list of at most {} integers >= {min}",
                limits::MAX_LAYERS
            ),
            x.to_string(),
        )
    };
    let list = x.as_array().ok_or_else(bad)?;
    if list.len() > limits::MAX_LAYERS {
        return Err(EngramError::config(
            name,
            format!("a list of at most {} integers", limits::MAX_LAYERS),
            list.len(),
        ));
    }
    if list.is_empty() {
        return Err(bad());
    }
    list.iter()
        .map(|e| e.as_u64().filter(|&n| n >= min).ok_or_else(bad))
        .collect()
}

/// The model's own fields, checked where the config has them (an Engram-only config may
/// leave them out): its vocabulary (`vocab_size`) and its depth (`n_layers` /
/// `num_hidden_layers`) are not zero. The Engram layer ids are not checked against the
/// depth: the hashing does not depend on it, and a block past it (a multi-token
/// prediction layer) could carry an Engram.
fn check_model_fields(v: &Value) -> Result<()> {
    if v.get("vocab_size").is_some() {
        uint(v, &["vocab_size"], 1, i64::MAX as u64)?;
    }
    if v.get("n_layers").is_some() || v.get("num_hidden_layers").is_some() {
        uint(v, &["n_layers", "num_hidden_layers"], 1, u32::MAX as u64)?;
    }
    Ok(())
}

impl V41Config {
    /// Reads the Engram fields of a model config (JSON text).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let v: Value = serde_json::from_str(text).map_err(|e| {
            EngramError::config("config", "a JSON object", format!("invalid JSON ({e})"))
        })?;
        Self::from_value(&v)
    }

    /// Reads a model config file (at most 16 MiB).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let text = crate::files::read_limited_string(
            path.as_ref(),
            crate::files::MAX_CONFIG_BYTES,
            "config",
        )?;
        Self::from_json_str(&text)
    }

    /// Reads the Engram fields of a parsed model config, checking each.
    pub fn from_value(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(EngramError::config(
                "config",
                "a JSON object",
                v.to_string(),
            ));
        }
        let w = limits::MAX_WIDTH as u64;
        let (eps_name, eps) = field(v, &["norm_eps", "rms_norm_eps"])?;
        let norm_eps = match eps.as_f64() {
            Some(x) if x > 0.0 && x < 1.0 && (x as f32) > 0.0 => x as f32,
            _ => {
                return Err(EngramError::config(
                    eps_name,
                    "a number in (0, 1) that is positive in f32",
                    eps.to_string(),
                ))
            }
        };
        let (vname, vocab) = field(v, &["engram_vocab_size"])?;
        let vocab_size = match vocab {
            Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.as_u64() == a[0].as_u64()) => {
                a[0].as_u64()
            }
            x => x.as_u64(),
        }
        .filter(|&n| (2..=i64::MAX as u64 / 2).contains(&n))
        .ok_or_else(|| {
            EngramError::config(
                vname,
                "an integer from 2 to 2^62 - 1 (one base for every order)",
                vocab.to_string(),
            )
        })?;
        let cfg = V41Config {
            dim: uint(v, &["dim", "hidden_size"], 1, w)? as usize,
            hc_mult: uint(v, &["hc_mult"], 1, limits::MAX_HC as u64)? as usize,
            norm_eps,
            layer_ids: uint_list(v, &["engram_layer_ids"], 0)?,
            vocab_size,
            num_embeddings: uint_list(v, &["engram_num_embeddings"], 1)?,
            max_ngram_size: uint(v, &["engram_max_ngram_size"], 2, limits::MAX_NGRAM as u64)?
                as usize,
            pad_id: uint(
                v,
                &["engram_pad_id", "engram_pad_token_id"],
                0,
                i64::MAX as u64,
            )? as i64,
            compressed_vocab_size: uint(v, &["engram_compressed_vocab_size"], 1, i64::MAX as u64)?,
            n_heads: uint(
                v,
                &["engram_n_heads"],
                1,
                limits::MAX_HEADS_PER_NGRAM as u64,
            )? as usize,
            head_dim: uint(v, &["engram_head_dim"], 1, w)? as usize,
        };
        cfg.validate()?;
        if let Value::Array(a) = vocab {
            // A list gives one base per n-gram order 2..=N.
            if a.len() != cfg.max_ngram_size - 1 {
                return Err(EngramError::config(
                    vname,
                    format!(
                        "one size per n-gram order 2..={} ({} entries) or a single integer",
                        cfg.max_ngram_size,
                        cfg.max_ngram_size - 1
                    ),
                    vocab.to_string(),
                ));
            }
        }
        check_model_fields(v)?;
        Ok(cfg)
    }

    /// Cross-field checks: one row count per layer, widths in 32-blocks, prime budget.
    pub fn validate(&self) -> Result<()> {
        if self.num_embeddings.len() != self.layer_ids.len() {
            return Err(EngramError::config(
                "engram_num_embeddings",
                format!(
                    "one entry per engram_layer_ids entry ({})",
                    self.layer_ids.len()
                ),
                format!("{} entries", self.num_embeddings.len()),
            ));
        }
        if !self.head_dim.is_multiple_of(32) {
            return Err(EngramError::config(
                "engram_head_dim",
                "a multiple of 32 (one fp8 scale per 32 values)",
                self.head_dim,
            ));
        }
        if !self.dim.is_multiple_of(32) {
            return Err(EngramError::config(
                "dim",
                "a multiple of 32 (wkv's 32x32 scale blocks)",
                self.dim,
            ));
        }
        let heads = (self.layer_ids.len() as u64).saturating_mul(self.columns() as u64);
        if heads > limits::MAX_ALL_HEADS {
            return Err(EngramError::config(
                "engram_layer_ids",
                format!(
                    "at most {} hash heads over all layers",
                    limits::MAX_ALL_HEADS
                ),
                heads,
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(l) = self.layer_ids.iter().find(|l| !seen.insert(**l)) {
            return Err(EngramError::config(
                "engram_layer_ids",
                "distinct layer ids",
                format!("{l} twice"),
            ));
        }
        Ok(())
    }

    /// Columns per token: (N-1)·n_heads.
    pub fn columns(&self) -> usize {
        (self.max_ngram_size - 1) * self.n_heads
    }

    /// Memory width: columns · head_dim.
    pub fn memory_width(&self) -> usize {
        self.columns() * self.head_dim
    }

    /// `wkv`'s output width: (hc_mult + 1)·dim (the keys of every branch, then the value).
    pub fn kv_width(&self) -> usize {
        (self.hc_mult + 1) * self.dim
    }

    /// Index of `layer` in `layer_ids`, or an error naming the choices.
    pub fn layer_index(&self, layer: u64) -> Result<usize> {
        self.layer_ids
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| {
                EngramError::config(
                    "--layer",
                    format!("one of engram_layer_ids {:?}", self.layer_ids),
                    layer,
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFERENCE: &str = r#"{"dim": 5120, "hc_mult": 4, "norm_eps": 1e-20, "vocab_size": 129280,
        "n_layers": 61, "moe_inter_dim": 2048,
        "engram_layer_ids": [1, 14], "engram_vocab_size": 16000000,
        "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
        "engram_pad_id": 2, "engram_compressed_vocab_size": 99092, "engram_n_heads": 8,
        "engram_head_dim": 256}"#;

    #[test]
    fn both_spellings_read_the_same_config() {
        let a = V41Config::from_json_str(INFERENCE).unwrap();
        let hf = INFERENCE
            .replace("\"dim\"", "\"hidden_size\"")
            .replace("\"norm_eps\"", "\"rms_norm_eps\"")
            .replace("\"engram_pad_id\"", "\"engram_pad_token_id\"");
        let b = V41Config::from_json_str(&hf).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            (a.columns(), a.memory_width(), a.kv_width()),
            (24, 6144, 25600)
        );
        assert_eq!(a.norm_eps, 1e-20);
        assert!(is_v41(&serde_json::from_str(INFERENCE).unwrap()));
        // A list of one base per order 2..=N is the same config.
        let listed = INFERENCE.replace(
            "\"engram_vocab_size\": 16000000",
            "\"engram_vocab_size\": [16000000, 16000000, 16000000]",
        );
        assert_eq!(V41Config::from_json_str(&listed).unwrap(), a);
    }

    #[test]
    fn errors_name_the_field() {
        for (from, to, field) in [
            (
                "\"engram_head_dim\": 256",
                "\"engram_head_dim\": 48",
                "engram_head_dim",
            ),
            (
                "[384006168, 384016682]",
                "[384006168]",
                "engram_num_embeddings",
            ),
            (
                "\"engram_n_heads\": 8",
                "\"engram_n_heads\": -1",
                "engram_n_heads",
            ),
            ("\"dim\": 5120", "\"dmodel\": 5120", "dim / hidden_size"),
            ("[1, 14]", "[1, 1]", "engram_layer_ids"),
            (
                "\"dim\": 5120",
                "\"dim\": 5120, \"hidden_size\": 4096",
                "dim / hidden_size",
            ),
            ("\"norm_eps\": 1e-20", "\"norm_eps\": 0", "norm_eps"),
            ("\"vocab_size\": 129280", "\"vocab_size\": 0", "vocab_size"),
            (
                "\"engram_vocab_size\": 16000000",
                "\"engram_vocab_size\": [16000000]",
                "one size per n-gram order 2..=4 (3 entries)",
            ),
            ("\"n_layers\": 61", "\"n_layers\": 0", "n_layers"),
            (
                "\"n_layers\": 61",
                "\"num_hidden_layers\": 0",
                "num_hidden_layers",
            ),
        ] {
            let e = V41Config::from_json_str(&INFERENCE.replace(from, to)).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
        // Too many layer ids: the bound and the count, not the list's text.
        let ids: Vec<String> = (0..=limits::MAX_LAYERS).map(|i| i.to_string()).collect();
        let e = V41Config::from_json_str(
            &INFERENCE.replace("[1, 14]", &format!("[{}]", ids.join(", "))),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("engram_layer_ids")
                && e.contains("a list of at most 4096 integers, found 4097"),
            "{e}"
        );
        let c = V41Config::from_json_str(INFERENCE).unwrap();
        assert!(c
            .layer_index(3)
            .unwrap_err()
            .to_string()
            .contains("[1, 14]"));
    }
}
