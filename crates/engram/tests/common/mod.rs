//! Shared helpers of the integration tests: golden files, one compression table per process.
#![allow(dead_code)]

use engram::tensors::TensorFile;
use engram::{CompressedTokenizer, EngramConfig, NgramHashMapping, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/golden")
        .join(name)
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

/// The golden `small` layer (layer 15, small tables) with its reference weights.
pub fn small_engram() -> engram::Engram {
    let cfg = small_config();
    engram::Engram::load_with(
        cfg.clone(),
        mapping(&cfg),
        golden("small.weights.safetensors"),
    )
    .unwrap()
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
        .fold(
            (0.0, 0),
            |m, v| if v.0 > m.0 || v.0.is_nan() { v } else { m },
        )
}

/// A layer with PyTorch-default random weights for `cfg`, norm weights redrawn in
/// [0.25, 1.75) so that a norm bug shows.
pub fn random_engram(cfg: &EngramConfig, seed: u64) -> engram::Engram {
    let m = mapping(cfg);
    let (mut w, mut g) = engram::init::torch_default_weights(cfg, &m, seed, &mut |_| {}).unwrap();
    for v in w
        .norm1
        .iter_mut()
        .chain(w.norm2.iter_mut())
        .chain(w.conv_norms.iter_mut())
    {
        g.uniform_f32(v, 0.25, 1.75);
    }
    engram::Engram::new(cfg.clone(), m, w).unwrap()
}

/// Deterministic raw ids in 0..vocab and randn hidden states.
pub fn random_inputs(cfg: &EngramConfig, rows: usize, seed: u64) -> (Vec<i64>, Vec<f32>) {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v = compression().num_raw() as u64;
    let ids = (0..rows)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A few repeats and small ids, so that n-grams recur.
            if x.is_multiple_of(7) {
                (x >> 32) as i64 % 5
            } else {
                (x % v) as i64
            }
        })
        .collect();
    let hidden = engram::rng::torch::TorchGenerator::manual_seed(seed)
        .randn(rows * cfg.hc_mult * cfg.hidden_size);
    (ids, hidden)
}

/// Runs `f` on a rayon pool of `n` threads.
pub fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

/// A test's own folder, removed with everything in it when dropped (also when the test
/// fails), so that runs do not pile up files.
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh folder for one test, removed at the end of it.
pub fn tmp_dir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("engram-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}
