//! `EngramConfig`: the reference's configuration, with its JSON names and defaults.

use crate::error::{EngramError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Sanity limits on config fields, far above any published Engram model (the demo: N = 3,
/// K = 8, HC = 4, D = 1024), so that a mistyped value is refused before it drives an
/// allocation or a long loop.
pub mod limits {
    /// Largest `max_ngram_size`.
    pub const MAX_NGRAM: usize = 64;
    /// Largest `n_head_per_ngram`.
    pub const MAX_HEADS_PER_NGRAM: usize = 4096;
    /// Largest `hc_mult`.
    pub const MAX_HC: usize = 1024;
    /// Largest `kernel_size`.
    pub const MAX_KERNEL: usize = 1024;
    /// Largest `hidden_size` and `n_embed_per_ngram`.
    pub const MAX_WIDTH: usize = 1 << 20;
    /// Most entries of `layer_ids`.
    pub const MAX_LAYERS: usize = 4096;
    /// Most hash heads over all layers (a prime is searched for each).
    pub const MAX_ALL_HEADS: u64 = 1 << 16;
}

/// Sizes derived from a config ([`EngramConfig::sizes`]), all checked against overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSizes {
    /// H = (N-1)·K.
    pub heads: u64,
    /// Dm = (N-1)·E.
    pub memory_width: u64,
    /// HC·D, the width of a hidden-state row.
    pub row_width: u64,
    /// (1 + HC)·D·Dm, the projection weights.
    pub proj_weights: u64,
    /// R = (kernel_size - 1)·N rows of conv history.
    pub conv_history: u64,
    /// R·HC·D floats of conv history per sequence state.
    pub state_floats: u64,
    /// An estimate of the table rows, each head's prime taken within 1024 of its base: an
    /// upper bound for configs with few layers, short of the truth for many (each layer's
    /// primes lie above the earlier layers'). Used for overflow checks; memory plans use
    /// the exact count, [`crate::hashing::table_rows`].
    pub table_rows_estimate: u64,
    /// `table_rows_estimate` × head_dim.
    pub table_elems_estimate: u64,
}

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
        let text =
            crate::files::read_limited_string(path, crate::files::MAX_CONFIG_BYTES, "config")?;
        let cfg = Self::from_json_str(&text).map_err(|e| match e {
            EngramError::ConfigJson { source, .. } => EngramError::ConfigJson {
                path: path.display().to_string(),
                source,
            },
            EngramError::Invalid {
                name,
                expected,
                found,
            } if name == "config" => EngramError::Invalid {
                name: format!("config {}", path.display()),
                expected,
                found,
            },
            // A field's error names the file too.
            field @ EngramError::Config { .. } => EngramError::InFile {
                path: format!("config {}", path.display()),
                source: Box::new(field),
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates a JSON config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        // A byte-order mark (some editors on Windows write one) is not the config's.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // serde reads a struct from a JSON array too (`[]` would be the default config);
        // other kinds of document fail in the parser below.
        if text.trim_start().starts_with('[') {
            return Err(EngramError::invalid("config", "a JSON object", "an array"));
        }
        // Syntax first: a trailing comma or a NaN after an unknown field (a V4.1 config's
        // `dim`) was reported as that field.
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|source| {
            EngramError::ConfigJson {
                path: "<string>".into(),
                source,
            }
        })?;
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: EngramConfig = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            // Truncated or malformed JSON has no field to name: report the parser's position.
            let syntax = matches!(
                inner.classify(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
            );
            if syntax {
                EngramError::ConfigJson {
                    path: "<string>".into(),
                    source: inner,
                }
            } else if field.is_empty() || field == "." || field == "?" {
                // Valid JSON of another kind than an object (`42`, `null`).
                EngramError::invalid("config", "a JSON object", inner.to_string())
            } else {
                EngramError::Config {
                    field,
                    expected: "a value of the field's type".into(),
                    found: inner.to_string(),
                }
            }
        })?;
        // Text after the object (`{...} garbage`, a second object) is an error, not ignored.
        de.end().map_err(|source| EngramError::ConfigJson {
            path: "<string>".into(),
            source,
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
        // The backbone's fields, unused by the layer, still describe a model.
        positive("vocab_size", self.vocab_size)?;
        positive("num_layers", self.num_layers)?;
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
        self.sizes()?;
        Ok(())
    }

    /// Every size the layer derives from the config, computed with checked arithmetic. The
    /// error names the field that makes a size overflow or pass a sanity limit, before
    /// anything is allocated.
    pub fn sizes(&self) -> Result<LayerSizes> {
        for (field, v, max) in [
            ("max_ngram_size", self.max_ngram_size, limits::MAX_NGRAM),
            (
                "n_head_per_ngram",
                self.n_head_per_ngram,
                limits::MAX_HEADS_PER_NGRAM,
            ),
            ("hc_mult", self.hc_mult, limits::MAX_HC),
            ("kernel_size", self.kernel_size, limits::MAX_KERNEL),
            ("hidden_size", self.hidden_size, limits::MAX_WIDTH),
            (
                "n_embed_per_ngram",
                self.n_embed_per_ngram,
                limits::MAX_WIDTH,
            ),
            ("layer_ids", self.layer_ids.len(), limits::MAX_LAYERS),
        ] {
            if v > max {
                return Err(EngramError::config(
                    field,
                    format!("at most {max} (a sanity limit far above any published model)"),
                    v,
                ));
            }
        }
        let too_big = |field: &str, what: &str| {
            EngramError::config(
                field,
                format!("a value for which {what} fits in 64-bit arithmetic"),
                "a value that overflows it",
            )
        };
        let mul = |field: &str, what: &str, a: u64, b: u64| {
            a.checked_mul(b).ok_or_else(|| too_big(field, what))
        };
        // Public: a config that was never validated may hold zeros here.
        let n1 = (self.max_ngram_size as u64)
            .checked_sub(1)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                EngramError::config("max_ngram_size", "an integer >= 2", self.max_ngram_size)
            })?;
        let taps = (self.kernel_size as u64).checked_sub(1).ok_or_else(|| {
            EngramError::config("kernel_size", "an integer >= 1", self.kernel_size)
        })?;
        let heads = mul(
            "n_head_per_ngram",
            "heads (max_ngram_size - 1) x n_head_per_ngram",
            n1,
            self.n_head_per_ngram as u64,
        )?;
        let all_heads = heads.saturating_mul(self.layer_ids.len() as u64);
        if all_heads > limits::MAX_ALL_HEADS {
            return Err(EngramError::config(
                "layer_ids",
                format!(
                    "at most {} hash heads over all layers (primes are drawn for each)",
                    limits::MAX_ALL_HEADS
                ),
                format!(
                    "{} layers x {heads} heads = {all_heads}",
                    self.layer_ids.len()
                ),
            ));
        }
        let memory_width = mul(
            "n_embed_per_ngram",
            "the memory width (max_ngram_size - 1) x n_embed_per_ngram",
            n1,
            self.n_embed_per_ngram as u64,
        )?;
        let row_width = mul(
            "hc_mult",
            "a row hc_mult x hidden_size",
            self.hc_mult as u64,
            self.hidden_size as u64,
        )?;
        let proj_what = "the projections (1 + hc_mult) x hidden_size x memory_width";
        let proj_weights = mul(
            "hidden_size",
            proj_what,
            self.hc_mult as u64 + 1,
            self.hidden_size as u64,
        )
        .and_then(|x| mul("hidden_size", proj_what, x, memory_width))?;
        let conv_history = mul(
            "kernel_size",
            "the conv history (kernel_size - 1) x max_ngram_size",
            taps,
            self.max_ngram_size as u64,
        )?;
        let state_floats = mul(
            "kernel_size",
            "a state's conv history (kernel_size - 1) x max_ngram_size x hc_mult x hidden_size",
            conv_history,
            row_width,
        )?;
        // Each head's table has a prime number of rows just above its base size.
        let mut table_rows: u64 = 0;
        for &v in &self.engram_vocab_size {
            let per = mul(
                "engram_vocab_size",
                "the table rows (sum of sizes) x n_head_per_ngram",
                v + 1024,
                self.n_head_per_ngram as u64,
            )?;
            table_rows = table_rows
                .checked_add(per)
                .ok_or_else(|| too_big("engram_vocab_size", "the table rows"))?;
        }
        let table_elems = mul(
            "engram_vocab_size",
            "the table's elements (rows x head_dim)",
            table_rows,
            self.head_dim() as u64,
        )?;
        if table_elems.checked_mul(4).is_none() {
            return Err(too_big("engram_vocab_size", "the table's bytes"));
        }
        if proj_weights.checked_mul(8).is_none() || state_floats.checked_mul(8).is_none() {
            return Err(too_big("hidden_size", "the weights' bytes"));
        }
        Ok(LayerSizes {
            heads,
            memory_width,
            row_width,
            proj_weights,
            conv_history,
            state_floats,
            table_rows_estimate: table_rows,
            table_elems_estimate: table_elems,
        })
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
