//! What the fuzz targets share: a tiny layer (2 branches of width 8, 3-grams, 2 heads per
//! order), built once per process from the bundled tokenizer and PyTorch-default weights.

use engram::{CompressedTokenizer, Engram, EngramConfig, NgramHashMapping, Tokenizer};
use std::sync::{Arc, OnceLock};

/// The tiny layer's config.
pub fn tiny_config() -> EngramConfig {
    EngramConfig {
        engram_vocab_size: vec![101, 103],
        max_ngram_size: 3,
        n_embed_per_ngram: 8,
        n_head_per_ngram: 2,
        layer_ids: vec![1, 2],
        layer_id: 1,
        kernel_size: 3,
        hidden_size: 8,
        hc_mult: 2,
        ..EngramConfig::default()
    }
}

/// The tiny layer (built on first use).
pub fn tiny_layer() -> &'static Engram {
    static LAYER: OnceLock<Engram> = OnceLock::new();
    LAYER.get_or_init(|| {
        let cfg = tiny_config();
        let tok = Tokenizer::bundled().expect("bundled tokenizer");
        let comp = Arc::new(CompressedTokenizer::build(&tok).expect("compression"));
        let hashing = Arc::new(NgramHashMapping::new(&cfg, comp).expect("hashing"));
        let (w, _) =
            engram::init::torch_default_weights(&cfg, &hashing, 7, &mut |_| {}).expect("weights");
        Engram::new(cfg, hashing, w).expect("layer")
    })
}

/// A reader of fuzz bytes: numbers from the front, zeros when exhausted.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next 8 bytes as a little-endian i64.
    pub fn i64(&mut self) -> i64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        i64::from_le_bytes(v)
    }
}
