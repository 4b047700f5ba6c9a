//! Helpers shared by the CLI test files.
#![allow(dead_code)]

use engram::tensors::{TensorFile, TensorWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/golden")
        .join(name)
}

/// A path in the CLI tests' scratch folder, under the target folder: the same paths every
/// run, so runs overwrite rather than pile up files (names are unique across the tests).
pub fn tmp(name: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("engram-cli");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

pub fn engram(args: &[&str]) -> (i32, String, String) {
    engram_env(args, &[])
}

/// [`engram`] with these environment variables set.
pub fn engram_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `engram forward` on the golden `small` layer with these inputs and output, plus `extra`.
pub fn forward_small(inputs: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let (cfg, w) = (
        golden("small.config.json"),
        golden("small.weights.safetensors"),
    );
    let mut a = vec![
        "forward",
        "--config",
        s(&cfg),
        "--weights",
        s(&w),
        "--inputs",
        s(inputs),
        "--out",
        s(out),
    ];
    a.extend(extra);
    engram(&a)
}

/// Writes `input_ids` and `hidden_states` of a golden `small` case to an inputs file.
pub fn case_inputs(case: &str) -> (PathBuf, TensorFile) {
    let g = TensorFile::open(golden("small.stages.safetensors")).unwrap();
    let ids = g.i64(&format!("{case}.input_ids"), None).unwrap();
    let h = g.f32(&format!("{case}.hidden_states"), None).unwrap();
    let p = tmp(&format!("{case}.inputs.safetensors"));
    let mut w = TensorWriter::new();
    w.i64("input_ids", &ids.shape, &ids.data);
    w.f32("hidden_states", &h.shape, &h.data);
    w.write(&p).unwrap();
    (p, g)
}

pub fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `engram args` and checks that it failed the way every error must: a non-zero exit,
/// exactly one line on stderr starting with `error:` that contains `needle`, no panic.
/// Returns the line.
pub fn expect_error(args: &[&str], needle: &str) -> String {
    expect_error_env(args, &[], needle)
}

/// [`expect_error`] with these environment variables set.
pub fn expect_error_env(args: &[&str], env: &[(&str, &str)], needle: &str) -> String {
    let (code, _, err) = engram_env(args, env);
    assert_ne!(code, 0, "{args:?} should fail; stderr {err:?}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert!(
        err.matches("os error").count() <= 1,
        "{args:?}: cause repeated: {err}"
    );
    lines[0].to_string()
}

/// The bytes of a file, for checking that a command left it unchanged.
pub fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fresh folder for one test.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A safetensors file of a header and a hole (a few KB on disk): `tensors` as (name, dtype,
/// shape, element bytes), all zero, and `meta`.
pub fn sparse(
    path: &std::path::Path,
    tensors: &[(&str, &str, &[usize], usize)],
    meta: &[(&str, &str)],
) {
    let mut h = serde_json::Map::new();
    if !meta.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        h.insert("__metadata__".into(), m.into());
    }
    let mut at = 0usize;
    for (name, dtype, shape, es) in tensors {
        let n = shape.iter().product::<usize>() * es;
        h.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}),
        );
        at += n;
    }
    let mut text = serde_json::Value::Object(h).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    std::fs::write(path, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len((bytes.len() + at) as u64)
        .unwrap();
}
