//! `EngramConfig`: the reference's configuration, with its JSON names and defaults.

use crate::error::{EngramError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Configuration of one Engram layer and of the n-gram hashing shared by all Engram layers.
///
/// Field names and defaults are those of the reference (`EngramConfig` and the backbone
/// config of `engram_demo_v1.py`), plus `layer_id`, the layer this config builds.
///
/// ```
/// let cfg = engram::EngramConfig::default();
/// assert_eq!(cfg.memory_width(), 1024); // (max_ngram_size - 1) * n_embed_per_ngram
/// assert_eq!(cfg.num_heads(), 16);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngramConfig {
    /// Tokenizer: `deepseek-v3` / `deepseek-ai/DeepSeek-V3` (bundled) or a path.
    pub tokenizer_name_or_path: String,
    /// One base table size per n-gram order 2..=N (length N-1).
    pub engram_vocab_size: Vec<u64>,
    /// N, the largest n-gram order; also the dilation of the short convolution.
    pub max_ngram_size: usize,
    /// E, embedding width per n-gram order.
    pub n_embed_per_ngram: usize,
    /// K, hash heads per n-gram order.
    pub n_head_per_ngram: usize,
    /// Layers carrying an Engram; multipliers and primes are drawn for all, in this order.
    pub layer_ids: Vec<u64>,
    /// The layer this config builds (must be in `layer_ids`).
    pub layer_id: u64,
    /// Raw token id that pads n-gram history before the sequence start.
    pub pad_id: i64,
    /// Hash seed.
    pub seed: u64,
    /// Taps of the short convolution.
    pub kernel_size: usize,
    /// D, hidden size of the backbone.
    pub hidden_size: usize,
    /// HC, number of hyper-connection branches.
    pub hc_mult: usize,
    /// Backbone vocabulary (unused by the layer itself).
    pub vocab_size: usize,
    /// Backbone depth (unused by the layer itself).
    pub num_layers: usize,
}

impl Default for EngramConfig {
    fn default() -> Self {
        EngramConfig {
            tokenizer_name_or_path: "deepseek-ai/DeepSeek-V3".to_string(),
            engram_vocab_size: vec![129280 * 5, 129280 * 5],
            max_ngram_size: 3,
            n_embed_per_ngram: 512,
            n_head_per_ngram: 8,
            layer_ids: vec![1, 15],
            layer_id: 1,
            pad_id: 2,
            seed: 0,
            kernel_size: 4,
            hidden_size: 1024,
            hc_mult: 4,
            vocab_size: 129280,
            num_layers: 30,
        }
    }
}

impl EngramConfig {
    /// Reads a JSON config; missing fields take their defaults, unknown fields are an error.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| EngramError::io(path, e))?;
        let cfg = Self::from_json_str(&text).map_err(|e| match e {
            EngramError::ConfigJson { source, .. } => EngramError::ConfigJson {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates a JSON config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: EngramConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if field.is_empty() || field == "." {
                EngramError::ConfigJson {
                    path: "<string>".into(),
                    source: inner,
                }
            } else {
                EngramError::Config {
                    field,
                    expected: "a value of the field's type".into(),
                    found: inner.to_string(),
                }
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as pretty JSON with the reference's field names.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(EngramError::config(field, "a positive integer", v))
            } else {
                Ok(())
            }
        };
        positive("max_ngram_size", self.max_ngram_size)?;
        if self.max_ngram_size < 2 {
            return Err(EngramError::config(
                "max_ngram_size",
                "at least 2 (n-grams of order 2..=N)",
                self.max_ngram_size,
            ));
        }
        positive("n_embed_per_ngram", self.n_embed_per_ngram)?;
        positive("n_head_per_ngram", self.n_head_per_ngram)?;
        positive("kernel_size", self.kernel_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("hc_mult", self.hc_mult)?;
        if !self.n_embed_per_ngram.is_multiple_of(self.n_head_per_ngram) {
            return Err(EngramError::config(
                "n_embed_per_ngram",
                format!("a multiple of n_head_per_ngram ({})", self.n_head_per_ngram),
                self.n_embed_per_ngram,
            ));
        }
        if self.engram_vocab_size.len() != self.max_ngram_size - 1 {
            return Err(EngramError::config(
                "engram_vocab_size",
                format!(
                    "a list of max_ngram_size - 1 = {} sizes",
                    self.max_ngram_size - 1
                ),
                &self.engram_vocab_size,
            ));
        }
        if let Some(v) = self
            .engram_vocab_size
            .iter()
            .find(|&&v| !(2..1 << 40).contains(&v))
        {
            return Err(EngramError::config(
                "engram_vocab_size",
                "sizes in 2..2^40",
                v,
            ));
        }
        if self.layer_ids.is_empty() {
            return Err(EngramError::config(
                "layer_ids",
                "a non-empty list",
                &self.layer_ids,
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.layer_ids.iter().find(|l| !seen.insert(**l)) {
            return Err(EngramError::config(
                "layer_ids",
                "distinct layer ids",
                format!("{dup} twice in {:?}", self.layer_ids),
            ));
        }
        if !self.layer_ids.contains(&self.layer_id) {
            return Err(EngramError::config(
                "layer_id",
                format!("one of layer_ids {:?}", self.layer_ids),
                self.layer_id,
            ));
        }
        if self.pad_id < 0 {
            return Err(EngramError::config(
                "pad_id",
                "a non-negative token id",
                self.pad_id,
            ));
        }
        if self.tokenizer_name_or_path.is_empty() {
            return Err(EngramError::config(
                "tokenizer_name_or_path",
                "`deepseek-v3` or a path",
                &self.tokenizer_name_or_path,
            ));
        }
        Ok(())
    }

    /// H = (N-1)·K, the number of hash heads of a layer.
    pub fn num_heads(&self) -> usize {
        (self.max_ngram_size - 1) * self.n_head_per_ngram
    }

    /// d = E / K, the row width of the embedding table.
    pub fn head_dim(&self) -> usize {
        self.n_embed_per_ngram / self.n_head_per_ngram
    }

    /// Dm = (N-1)·E, the width of the concatenated embeddings.
    pub fn memory_width(&self) -> usize {
        (self.max_ngram_size - 1) * self.n_embed_per_ngram
    }

    /// Rows of history the causal convolution reads: (kernel_size-1)·dilation, dilation = N.
    pub fn conv_history(&self) -> usize {
        (self.kernel_size - 1) * self.max_ngram_size
    }
}
