//! Shared helpers of the integration tests: golden files, one compression table per process.
#![allow(dead_code)]

use engram::tensors::TensorFile;
use engram::{CompressedTokenizer, EngramConfig, NgramHashMapping, Tokenizer};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(name)
}

pub fn open(name: &str) -> TensorFile {
    TensorFile::open(golden(name)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::bundled().expect("bundled tokenizer loads"))
}

pub fn compression() -> Arc<CompressedTokenizer> {
    static C: OnceLock<Arc<CompressedTokenizer>> = OnceLock::new();
    C.get_or_init(|| Arc::new(CompressedTokenizer::build(tokenizer()).unwrap()))
        .clone()
}

pub fn small_config() -> EngramConfig {
    EngramConfig::from_json_file(golden("small.config.json")).unwrap()
}

pub fn mapping(cfg: &EngramConfig) -> Arc<NgramHashMapping> {
    Arc::new(NgramHashMapping::new(cfg, compression()).unwrap())
}

/// Largest |a - b| and its index.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs(), i))
        .fold((0.0, 0), |m, v| if v.0 > m.0 || v.0.is_nan() { v } else { m })
}
