//! Careless and hostile input: nothing a user types may destroy a file, crash the engine or
//! exhaust the machine. Each case asserts the exit code, the one-line message (naming what
//! differs) and that every input file is unchanged.

mod common;

use common::{bytes, case_inputs, engram, expect_error, golden, s, tmp, tmp_dir};
use engram::tensors::{TensorFile, TensorWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Copies of the small layer's config and weights, and the seed_text inputs, in a fresh
/// folder (the golden files themselves are never given as outputs).
struct Setup {
    dir: PathBuf,
    cfg: PathBuf,
    weights: PathBuf,
    inputs: PathBuf,
}

/// The folder goes with the test (its largest file is a 550 MB table).
impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn new(name: &str) -> Self {
        let dir = tmp_dir(name);
        let (cfg, weights, inputs) = (
            dir.join("config.json"),
            dir.join("weights.safetensors"),
            dir.join("inputs.safetensors"),
        );
        std::fs::copy(golden("small.config.json"), &cfg).unwrap();
        std::fs::copy(golden("small.weights.safetensors"), &weights).unwrap();
        let (case, _) = case_inputs("seed_text");
        std::fs::copy(case, &inputs).unwrap();
        Setup {
            dir,
            cfg,
            weights,
            inputs,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `forward` on the small layer with `--inputs`, plus `extra`.
    fn forward(&self, inputs: &Path, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "forward",
            "--config",
            s(&self.cfg),
            "--weights",
            s(&self.weights),
            "--inputs",
            s(inputs),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    }

    /// A config file: the small config with `patch` (JSON object) merged in.
    fn config_with(&self, name: &str, patch: &str) -> PathBuf {
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&self.cfg).unwrap()).unwrap();
        let p: serde_json::Value = serde_json::from_str(patch).unwrap();
        for (k, v) in p.as_object().unwrap() {
            c[k] = v.clone();
        }
        let path = self.path(name);
        std::fs::write(&path, c.to_string()).unwrap();
        path
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|x| x.as_str()).collect()
}

/// Runs a failing command and checks that the given files kept their bytes.
fn fails_leaving(args: &[&str], needle: &str, unchanged: &[&Path]) -> String {
    let before: Vec<Vec<u8>> = unchanged.iter().map(|p| bytes(p)).collect();
    let line = expect_error(args, needle);
    for (p, b) in unchanged.iter().zip(before) {
        assert!(bytes(p) == b, "{args:?} changed {}", p.display());
    }
    line
}

#[test]
fn outputs_never_overwrite_inputs_or_each_other() {
    let t = Setup::new("overwrite");
    let (w, inp, cfg) = (&t.weights, &t.inputs, &t.cfg);
    let keep: [&Path; 3] = [w, inp, cfg];
    for (extra, needle) in [
        (vec!["--out", s(w)], "--weights"),
        (vec!["--out", s(inp)], "--inputs"),
        (vec!["--out", s(cfg)], "--config"),
        (
            vec!["--out", s(&t.path("o.st")), "--state-out", s(w)],
            "--state-out",
        ),
        (
            vec![
                "--out",
                s(&t.path("same.st")),
                "--state-out",
                s(&t.path("./same.st")),
            ],
            "one output would overwrite the other",
        ),
    ] {
        let args = t.forward(inp, &extra);
        let line = fails_leaving(&strs(&args), needle, &keep);
        assert!(line.contains("same file"), "{line}");
    }
    assert!(!t.path("same.st").exists() && !t.path("o.st").exists());
    // A symbolic link to the weights is the weights.
    #[cfg(unix)]
    {
        let link = t.path("link.st");
        std::os::unix::fs::symlink(w, &link).unwrap();
        let args = t.forward(inp, &["--out", s(&link)]);
        fails_leaving(&strs(&args), "same file as --weights", &keep);
    }
    fails_leaving(
        &["hash", "--inputs", s(inp), "--out", s(inp)],
        "same file as --inputs",
        &keep,
    );
    fails_leaving(
        &["init", "--config", s(cfg), "--out", s(cfg)],
        "same file as --config",
        &keep,
    );
    fails_leaving(
        &["compression", "--config", s(cfg), "--out", s(cfg)],
        "same file as --config",
        &keep,
    );
    // Outputs into a directory or a missing folder are refused before any work.
    let args = t.forward(inp, &["--out", s(&t.dir)]);
    fails_leaving(&strs(&args), "found a directory", &keep);
    let args = t.forward(inp, &["--out", s(&t.path("no/such/out.st"))]);
    fails_leaving(&strs(&args), "found no folder", &keep);
    // A "folder" that is a file (the input itself) is named as a file.
    let under_file = inp.join("out.st");
    let args = t.forward(inp, &["--out", s(&under_file)]);
    fails_leaving(&strs(&args), "found a file, not a folder,", &keep);
    // A device or a FIFO would be replaced by the rename: refused before any work.
    #[cfg(unix)]
    {
        let args = t.forward(inp, &["--out", "/dev/null"]);
        fails_leaving(&strs(&args), "a device, FIFO or socket", &keep);
        // A read-only file (a golden file, mode 0444) would be replaced by the rename too,
        // as root or in a folder the user may write into.
        use std::os::unix::fs::PermissionsExt;
        let ro = t.path("read-only.st");
        std::fs::write(&ro, b"keep me").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let args = t.forward(inp, &["--out", s(&ro)]);
        fails_leaving(&strs(&args), "a read-only file (mode 0444)", &[&ro]);
        let line = fails_leaving(
            &["init", "--config", s(cfg), "--out", s(&ro)],
            "make it writable",
            &[&ro],
        );
        assert!(line.contains("--out"), "{line}");
    }
}

#[test]
fn absurd_configs_are_refused_naming_the_field() {
    let t = Setup::new("absurd");
    let big = u64::MAX.to_string();
    for (patch, field, what) in [
        (format!("{{\"hc_mult\": {big}}}"), "hc_mult", "at most"),
        (format!("{{\"kernel_size\": {big}}}"), "kernel_size", "at most"),
        (
            "{\"hidden_size\": 100000000000}".to_string(),
            "hidden_size",
            "at most",
        ),
        (
            "{\"n_head_per_ngram\": 4096, \"n_embed_per_ngram\": 4096, \"layer_ids\": [1, 15, 2, 3, 4, 5, 6, 7, 8, 9]}".to_string(),
            "layer_ids",
            "hash heads over all layers",
        ),
    ] {
        let c = t.config_with("absurd.json", &patch);
        let keep: [&Path; 2] = [&c, &t.weights];
        for args in [
            strs(&t.forward(&t.inputs, &["--out", s(&t.path("o.st"))]))
                .into_iter()
                .map(|a| if a == s(&t.cfg) { s(&c) } else { a })
                .collect::<Vec<_>>(),
            vec!["weights", s(&t.weights), "--config", s(&c)],
            vec!["hash", "--config", s(&c), "--text", "x", "--out", s(&t.path("h.st"))],
        ] {
            let line = fails_leaving(&args, &format!("config field `{field}`"), &keep);
            assert!(line.contains(what), "{line}");
        }
    }
    // A pad id past the tokenizer: `hash` and `compression` refuse it alike, and
    // `compression --out` writes nothing.
    let c = t.config_with("pad.json", "{\"pad_id\": 1000000000}");
    let lookup = t.path("lookup.st");
    for args in [
        vec![
            "hash",
            "--config",
            s(&c),
            "--text",
            "x",
            "--out",
            s(&t.path("h.st")),
        ],
        vec!["compression", "--config", s(&c), "--out", s(&lookup)],
    ] {
        let line = fails_leaving(&args, "config field `pad_id`", &[&c]);
        assert!(
            line.contains("below the tokenizer size") && line.contains("1000000000"),
            "{line}"
        );
    }
    assert!(!lookup.exists());
    // A table of 5e8 rows per order: more memory than any test machine has; init refuses
    // before allocating and names the table and the sizes.
    let c = t.config_with(
        "huge.json",
        "{\"engram_vocab_size\": [500000000, 500000000]}",
    );
    let out = t.path("huge.st");
    let line = fails_leaving(
        &["init", "--config", s(&c), "--out", s(&out)],
        "not enough memory",
        &[&c],
    );
    assert!(
        line.contains("embedding table") && line.contains("available"),
        "{line}"
    );
    assert!(!out.exists());
    // `forward --table-io ram` copies the table into memory: the same plan refuses it
    // before the table is read (memory-mapped, the run goes on to the file's table shape).
    let fwd = |io: &str| {
        strs(&t.forward(&t.inputs, &["--out", s(&out), "--table-io", io]))
            .into_iter()
            .map(|a| if a == s(&t.cfg) { s(&c) } else { a })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let line = fails_leaving(&strs(&fwd("ram")), "not enough memory", &[&c, &t.weights]);
    assert!(line.contains("embedding table"), "{line}");
    let line = expect_error(&strs(&fwd("mmap")), "multi_head_embedding.embedding.weight");
    assert!(!line.contains("not enough memory"), "{line}");
    assert!(!out.exists());
    // Truncated JSON names the file and the parser's position, not a field `?`.
    let trunc = t.path("trunc.json");
    std::fs::write(&trunc, "{\"max_ngram_size\": 3, \"engram_vocab_size\": [12").unwrap();
    let line = expect_error(
        &[
            "hash",
            "--config",
            s(&trunc),
            "--text",
            "x",
            "--out",
            s(&out),
        ],
        "trunc.json",
    );
    assert!(line.contains("EOF") && !line.contains('?'), "{line}");
}

#[test]
fn closed_stdout_ends_quietly() {
    // Thousands of lines: far more than a pipe holds, so the writer meets the closed end.
    let text = "word ".repeat(20_000);
    for args in [vec!["tokenize", text.as_str()], vec!["--help"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_engram"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 16];
        use std::io::Read;
        let out = child.stdout.as_mut().unwrap();
        out.read_exact(&mut first).unwrap();
        drop(child.stdout.take());
        let res = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!err.contains("panicked"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert!(
                res.status.success() || res.status.signal() == Some(13),
                "{:?}: {err}",
                res.status
            );
        }
    }
}

/// stdout or stderr on a full disk: one error line (where stderr takes it) and exit 2, not a
/// panic's backtrace and exit 101.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_on_stdout_or_stderr_is_an_error_not_a_panic() {
    let full = || std::fs::File::create("/dev/full").unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(["tokenize", "hello"])
        .stdout(full())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        "error: failed printing to stdout: No space left on device (os error 28)"
    );
    // An error that cannot be printed still exits 2.
    let res = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args([
            "tokenize",
            "--tokenizer",
            "/nonexistent/tokenizer.json",
            "x",
        ])
        .stdout(Stdio::piped())
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
}

#[test]
fn thread_counts_are_capped_with_one_warning() {
    let (code, out, err) = engram(&["--threads", "5000", "tokenize", "--json", "hi"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("input_ids"));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: --threads 5000 capped at"),
        "{err}"
    );
    expect_error(&["--threads", "0", "tokenize", "hi"], "--threads");
    // The same count from RAYON_NUM_THREADS names the variable; one that is not a number
    // is an error naming it (rayon alone would ignore it); 0 is rayon's "every core".
    let big = [("RAYON_NUM_THREADS", "5000")];
    let (code, _, err) = common::engram_env(&["tokenize", "--json", "hi"], &big);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("warning: RAYON_NUM_THREADS 5000 capped at") && err.lines().count() == 1,
        "{err}"
    );
    common::expect_error_env(
        &["tokenize", "hi"],
        &[("RAYON_NUM_THREADS", "four")],
        "environment variable RAYON_NUM_THREADS: expected a whole number of threads",
    );
    let (code, _, err) = common::engram_env(&["tokenize", "hi"], &[("RAYON_NUM_THREADS", "0")]);
    assert_eq!((code, err.as_str()), (0, ""));
}

/// Writes an inputs file with `input_ids` of `shape` (zeros) and matching hidden states.
fn inputs_of_shape(p: &Path, ids_shape: &[usize], hidden_shape: &[usize]) {
    let n: usize = ids_shape.iter().product();
    let m: usize = hidden_shape.iter().product();
    let (ids, h) = (vec![0i64; n], vec![0.5f32; m]);
    let mut w = TensorWriter::new();
    w.i64("input_ids", ids_shape, &ids)
        .f32("hidden_states", hidden_shape, &h);
    w.write(p).unwrap();
}

#[test]
fn conflicting_and_empty_inputs_are_errors() {
    let t = Setup::new("conflict");
    let out = t.path("o.st");
    let keep: [&Path; 3] = [&t.weights, &t.inputs, &t.cfg];
    // --random-hidden would silently replace the file's hidden states.
    let args = t.forward(&t.inputs, &["--out", s(&out), "--random-hidden", "3"]);
    let line = fails_leaving(&strs(&args), "--random-hidden conflicts", &keep);
    assert!(line.contains("hidden_states") && line.contains("inputs.safetensors"));
    let args = t.forward(&t.inputs, &["--out", s(&out), "--text", "hello"]);
    fails_leaving(&strs(&args), "--text conflicts with --inputs", &keep);
    // 2^32 ids declared beside hidden states of 2 tokens (a sparse file): the shapes are
    // named, not the memory the count would need.
    let n = 1usize << 32;
    let sparse_in = t.path("sparse.st");
    common::sparse(
        &sparse_in,
        &[
            ("input_ids", "I64", &[1, n], 8),
            ("hidden_states", "F32", &[1, 2, 4, 1024], 4),
        ],
        &[],
    );
    let args = t.forward(&sparse_in, &["--out", s(&out)]);
    let line = fails_leaving(&strs(&args), "tensor `hidden_states`", &keep);
    assert!(line.contains(&format!("[1, {n}, 4, 1024]")), "{line}");
    // L = 0 and B = 0, with and without --chunk, for forward and hash; the shape as found.
    let empty = t.path("empty.st");
    for (ids, hidden, shown) in [
        (vec![1, 0], vec![1, 0, 4, 1024], "[1, 0]"),
        (vec![0, 5], vec![0, 5, 4, 1024], "[0, 5]"),
    ] {
        inputs_of_shape(&empty, &ids, &hidden);
        for extra in [vec![], vec!["--chunk", "4"]] {
            let mut e = vec!["--out", s(&out)];
            e.extend(extra);
            let args = t.forward(&empty, &e);
            let line = fails_leaving(&strs(&args), shown, &keep);
            assert!(
                line.contains("input_ids") && line.contains("L >= 1"),
                "{line}"
            );
        }
        let line = expect_error(&["hash", "--inputs", s(&empty), "--out", s(&out)], shown);
        assert!(line.contains("input_ids"), "{line}");
    }
    assert!(!out.exists());
    // Ragged offsets: 2-D is named as such; bad values are shown.
    let g = TensorFile::open(golden("small.stages.safetensors")).unwrap();
    let ids = g.i64("seed_text.input_ids", None).unwrap().data;
    let h = g.f32("seed_text.hidden_states", None).unwrap().data;
    let ragged = t.path("ragged.st");
    for (off, shape, needle) in [
        (
            vec![0i64, 7, 7, 14],
            vec![2usize, 2],
            "expected 1 dim [S+1] with S >= 1, found shape [2, 2]",
        ),
        (vec![0i64, 9, 3, 14], vec![4], "found [0, 9, 3, 14]"),
        (vec![0i64, 14, 15], vec![3], "from 0 to 14"),
    ] {
        let mut w = TensorWriter::new();
        w.i64("input_ids", &[14], &ids)
            .f32("hidden_states", &[14, 4, 1024], &h)
            .i64("offsets", &shape, &off);
        w.write(&ragged).unwrap();
        let args = t.forward(&ragged, &["--out", s(&out)]);
        let line = fails_leaving(&strs(&args), needle, &keep);
        assert!(line.contains("offsets"), "{line}");
    }
    // A directory given as weights.
    let args: Vec<String> = t
        .forward(&t.inputs, &["--out", s(&out)])
        .into_iter()
        .map(|a| {
            if a == s(&t.weights) {
                s(&t.dir).to_string()
            } else {
                a
            }
        })
        .collect();
    fails_leaving(
        &strs(&args),
        "expected a safetensors file, found a directory",
        &keep,
    );
}

#[test]
fn state_files_are_checked() {
    let t = Setup::new("states");
    let (out, st) = (t.path("o.st"), t.path("state.st"));
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-out", s(&st)]);
    let (code, _, err) = engram(&strs(&args));
    assert_eq!(code, 0, "{err}");
    let f = TensorFile::open(&st).unwrap();
    let hist = f.i64("ngram_history", None).unwrap();
    let conv = f.f32("conv_history", None).unwrap();
    let rewrite = |name: &str, pos: i64, meta: Option<&str>| -> PathBuf {
        let p = t.path(name);
        let mut w = TensorWriter::new();
        let position = [pos];
        w.i64("ngram_history", &hist.shape, &hist.data)
            .f32("conv_history", &conv.shape, &conv.data)
            .i64("position", &[1], &position);
        if let Some(m) = meta {
            w.meta("engram_config", m);
        }
        w.write(&p).unwrap();
        p
    };
    let meta = f.metadata()["engram_config"].clone();
    let negative = rewrite("neg.st", -3, Some(&meta));
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-in", s(&negative)]);
    let line = fails_leaving(&strs(&args), "position[0]", &[&negative]);
    assert!(
        line.contains("non-negative") && line.contains("-3"),
        "{line}"
    );
    // A run whose state cannot be saved (its position passes the file's int64) leaves
    // --out as it was: both outputs are written before either is put in place.
    let far = rewrite("far.st", i64::MAX, Some(&meta));
    let st2 = t.path("state2.st");
    let args = t.forward(
        &t.inputs,
        &[
            "--out",
            s(&out),
            "--state-in",
            s(&far),
            "--state-out",
            s(&st2),
        ],
    );
    fails_leaving(&strs(&args), "states[0].position", &[&far, &out]);
    assert!(!st2.exists());
    let bare = rewrite("bare.st", 14, None);
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-in", s(&bare)]);
    fails_leaving(&strs(&args), "`engram_config` metadata", &[&bare]);
    // Another config (another hash seed: the same weights load) names the field.
    let c = t.config_with("seed1.json", "{\"seed\": 1}");
    let args: Vec<String> = t
        .forward(&t.inputs, &["--out", s(&out), "--state-in", s(&st)])
        .into_iter()
        .map(|a| if a == s(&t.cfg) { s(&c).to_string() } else { a })
        .collect();
    let line = fails_leaving(&strs(&args), "seed 0 (this layer: 1)", &[&st]);
    assert!(!line.contains("layer 15"), "{line}");
    // A file of another number of states is refused by its count, before it is decoded.
    let two = t.path("two.st");
    let mut w = TensorWriter::new();
    let (h2, c2) = (
        [hist.data.clone(), hist.data.clone()].concat(),
        [conv.data.clone(), conv.data.clone()].concat(),
    );
    let mut hs = hist.shape.clone();
    hs[0] = 2;
    let mut cs = conv.shape.clone();
    cs[0] = 2;
    w.i64("ngram_history", &hs, &h2)
        .f32("conv_history", &cs, &c2)
        .i64("position", &[2], &[14, 14])
        .meta("engram_config", meta.clone());
    w.write(&two).unwrap();
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-in", s(&two)]);
    let line = fails_leaving(&strs(&args), "expected 1 states", &[&two]);
    assert!(line.contains("`position` [2]"), "{line}");
}

#[test]
fn weights_check_finds_non_finite_tables() {
    let t = Setup::new("nan");
    let f = TensorFile::open(&t.weights).unwrap();
    let nan = t.path("nan.st");
    let mut tensors = Vec::new();
    for name in f.names() {
        let (dtype, shape) = f.info(&name).unwrap();
        if dtype == safetensors::Dtype::I64 {
            tensors.push((
                name.clone(),
                shape,
                None,
                Some(f.i64(&name, None).unwrap().data),
            ));
        } else {
            let mut v = f.f32(&name, None).unwrap().data;
            if name == "multi_head_embedding.embedding.weight" {
                v[5 * 64 + 7] = f32::NAN;
            }
            tensors.push((name.clone(), shape, Some(v), None));
        }
    }
    let mut w = TensorWriter::new();
    for (name, shape, fv, iv) in &tensors {
        match (fv, iv) {
            (Some(v), _) => w.f32(name, shape, v),
            (_, Some(v)) => w.i64(name, shape, v),
            _ => unreachable!(),
        };
    }
    w.write(&nan).unwrap();
    let line = expect_error(
        &["weights", s(&nan), "--config", s(&t.cfg)],
        "multi_head_embedding.embedding.weight (row 5, column 7)",
    );
    assert!(line.contains("non-finite"), "{line}");
    let (code, out, err) = engram(&["weights", s(&t.weights), "--config", s(&t.cfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("all values finite"), "{out}");
}

/// A mapped weights file cut short while `engram weights` scans its table: the SIGBUS of the
/// first page past the new end is one error line and exit 1, not "Bus error" and a core
/// dump. The file is sparse (a ~530 MB table of zeros, no disk written); it is truncated
/// once the process has it mapped. A run that finishes its scan first is tried again.
#[cfg(target_os = "linux")]
#[test]
fn a_mapped_file_cut_short_is_one_error_line() {
    let t = Setup::new("bus");
    let c = t.config_with(
        "mid.json",
        "{\"engram_vocab_size\": [129280, 129280], \"layer_id\": 1}",
    );
    let cfg = engram::EngramConfig::from_json_file(&c).unwrap();
    let map =
        engram::NgramHashMapping::new(&cfg, engram::layer::compression_for(&cfg).unwrap()).unwrap();
    let layer = map.layer(cfg.layer_id).unwrap();
    let rows = layer.table_rows() as usize;
    let offsets: Vec<u8> = layer
        .offsets()
        .iter()
        .flat_map(|&o| (o as i64).to_le_bytes())
        .collect();
    // The small layer's tensors, the table's rows those of this config, all zero but the
    // table's head offsets.
    let f = TensorFile::open(&t.weights).unwrap();
    let mut header = serde_json::Map::new();
    let (mut at, mut offsets_at) = (0usize, 0usize);
    for name in f.names() {
        if name == "multi_head_embedding.offsets" {
            offsets_at = at;
        }
        let (dtype, mut shape) = f.info(&name).unwrap();
        if name == engram::weights::TABLE {
            shape[0] = rows;
        }
        let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [at, at + bytes],
            }),
        );
        at += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let full = (8 + text.len() + at) as u64;
    let w = t.path("sparse.st");
    {
        let mut file = std::fs::File::create(&w).unwrap();
        use std::io::Write;
        file.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
        file.write_all(&text).unwrap();
        file.set_len(full).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&offsets, (8 + text.len() + offsets_at) as u64)
            .unwrap();
    }
    let mut caught = false;
    for _ in 0..5 {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&w)
            .unwrap()
            .set_len(full)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_engram"))
            .args(["weights", s(&w), "--config", s(&c)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Cut once 16 MB of the mapping are in memory: the scan has begun (the header
        // checks, which would refuse a short file, are behind it).
        let smaps = format!("/proc/{}/smaps", child.id());
        let resident_kb = || -> u64 {
            let text = std::fs::read_to_string(&smaps).unwrap_or_default();
            let mut lines = text.lines().skip_while(|l| !l.ends_with(s(&w)));
            lines
                .find_map(|l| l.strip_prefix("Rss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            if resident_kb() > 16 << 10 {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&w)
                    .unwrap()
                    .set_len(4096)
                    .unwrap();
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            continue; // the scan won the race
        }
        assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: a memory-mapped input file")
                && err.contains("truncated or became unreadable"),
            "{err}"
        );
        caught = true;
        break;
    }
    assert!(caught, "every scan finished before the file was cut");
}

/// A `demo --table-io direct` killed outright leaves its folder of weights in the temporary
/// folder (`engram-demo-PID`); the next such demo removes it once its process is gone.
#[cfg(target_os = "linux")]
#[test]
fn a_dead_demos_folder_is_removed_by_the_next() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let stray = std::env::temp_dir().join(format!("engram-demo-{pid}"));
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("weights.safetensors"), b"left by a killed run").unwrap();
    let (code, out, err) = engram(&[
        "demo",
        "--config",
        s(&golden("small.config.json")),
        "--table-io",
        "direct",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!stray.exists(), "{} is still there", stray.display());
}

/// Kills `engram init` while it writes over an existing file: the old file must survive.
#[test]
fn a_killed_write_leaves_the_old_file() {
    let t = Setup::new("kill");
    // ~530 MB of table: the write takes long enough to be caught half way.
    let c = t.config_with(
        "mid.json",
        "{\"engram_vocab_size\": [129280, 129280], \"layer_id\": 1}",
    );
    let out = t.path("weights-out.st");
    std::fs::write(&out, b"the old file").unwrap();
    let tmp_files = || -> Vec<PathBuf> {
        std::fs::read_dir(&t.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains(engram::atomic::TMP_MARKER)
            })
            .collect()
    };
    // `init` caught half way through its write.
    let start = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_engram"));
        cmd.args(["init", "--config", s(&c), "--out", s(&out)])
            .stderr(Stdio::null());
        // The signals below at their default action, whatever this test inherited (under
        // `nohup` SIGHUP comes ignored, and a signal ignored at start stays ignored).
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only `signal`, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let found = tmp_files()
                .into_iter()
                .find(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) > 1 << 20);
            if let Some(p) = found {
                break (child, p);
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "init ended before its write was caught"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no temporary file appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    // Interrupted (Ctrl-C), terminated or hung up: the process ends by the signal, the old
    // file is as it was and no temporary file is left.
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        use std::os::unix::process::ExitStatusExt;
        let (mut child, _) = start();
        // SAFETY: a signal to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig), "{status:?}");
        assert_eq!(bytes(&out), b"the old file");
        assert_eq!(tmp_files(), Vec::<PathBuf>::new(), "signal {sig}");
    }
    #[cfg(unix)]
    {
        // A signal ignored at start stays ignored (`nohup`): the write goes on and lands.
        let sh = |script: &str| {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{script}; exec {} init --config {} --out {}",
                    env!("CARGO_BIN_EXE_engram"),
                    s(&c),
                    s(&out)
                ))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let child = sh("trap '' HUP");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while tmp_files().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // SAFETY: a signal to our own child, which has not been waited for yet.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(TensorFile::open(&out).is_ok());
        std::fs::write(&out, b"the old file").unwrap();
        // Past the file-size limit (`ulimit -f`): an error naming the file, not SIGXFSZ.
        let o = sh("ulimit -f 1000").wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("weights-out.st"), "{err}");
        assert_eq!(bytes(&out), b"the old file");
        assert_eq!(tmp_files(), Vec::<PathBuf>::new());
    }
    // Killed outright: the temporary file is all that is left beside the old file.
    let (mut child, tmp_file) = start();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(bytes(&out), b"the old file");
    assert_eq!(tmp_files(), std::slice::from_ref(&tmp_file));
    // The next write to the same destination removes it once it is ten minutes old (its
    // process is gone), and works.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(11 * 60);
    std::fs::File::options()
        .write(true)
        .open(&tmp_file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let (code, _, err) = engram(&["init", "--config", s(&c), "--out", s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(TensorFile::open(&out).is_ok());
    assert_eq!(tmp_files(), Vec::<PathBuf>::new());
}

#[test]
fn named_files_that_are_not_what_they_claim() {
    let t = Setup::new("named");
    // A malformed tokenizer.json (the tokenizers crate panics on it): one error line.
    let tok_dir = t.path("tok");
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::write(
        tok_dir.join("tokenizer.json"),
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": Null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let c = t.config_with(
        "tok.json",
        &format!("{{\"tokenizer_name_or_path\": {:?}}}", s(&tok_dir)),
    );
    expect_error(
        &["tokenize", "a", "--config", s(&c)],
        "malformed tokenizer.json",
    );
    // A device or a folder as a config: refused at once, not read forever.
    #[cfg(unix)]
    expect_error(
        &["tokenize", "a", "--config", "/dev/zero"],
        "expected a regular file, found a device",
    );
    expect_error(
        &["tokenize", "a", "--config", s(&t.dir)],
        "expected a regular file, found a directory",
    );
    // A file that says it is regular but cannot be mapped.
    #[cfg(target_os = "linux")]
    expect_error(
        &["weights", "/proc/self/mem"],
        "/proc/self/mem: expected a safetensors file that can be memory-mapped",
    );
}

/// The memory check counts the address-space limit (`ulimit -v`, as containers and batch
/// schedulers set), not only the machine's free memory: a run that needs more than the
/// limit is refused with one line instead of aborting in the allocator.
#[cfg(target_os = "linux")]
#[test]
fn the_address_space_limit_counts_as_memory() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000 && exec {} bench --tokens 100000",
            env!("CARGO_BIN_EXE_engram")
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // The plan's refusal, not the allocator's (which would also exit 2 in one line).
    assert!(err.contains("not enough memory: this needs"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A file larger than the address space left cannot be mapped: named with its size.
    let dir = common::tmp_dir("as-limit");
    let big = dir.join("big.safetensors");
    common::sparse(&big, &[("x", "F32", &[3 << 28], 4)], &[]);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1000000 && exec {} weights {}",
            env!("CARGO_BIN_EXE_engram"),
            s(&big)
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("room in the address space to map its 3.0 GiB") && err.contains("ENOMEM"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under an address-space limit too tight for what the plan does not count (the bundled
/// tokenizer being parsed, thread stacks), an allocation fails unhandled deep in a crate:
/// that is one `error: out of memory` line and exit 1, the old output file untouched and no
/// staged file left, never an abort. Limits from 100 to 500 MB: each run fails in one line
/// or succeeds, and at least one fails in the allocator.
#[cfg(target_os = "linux")]
#[test]
fn an_allocation_failing_unhandled_is_one_error_line() {
    let st = Setup::new("oom-line");
    let out = st.path("out.safetensors");
    std::fs::write(&out, b"old output").unwrap();
    let mut in_allocator = 0;
    for mb in (100..=500).step_by(25) {
        let run = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v {} && exec {} forward --config {} --weights {} --text 'hello world' \
                 --random-hidden 1 --out {}",
                mb * 1000,
                env!("CARGO_BIN_EXE_engram"),
                s(&st.cfg),
                s(&st.weights),
                s(&out)
            ))
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        let code = run.status.code();
        if code == Some(0) {
            assert!(TensorFile::open(&out).is_ok(), "{mb} MB: {err}");
            std::fs::write(&out, b"old output").unwrap();
            continue;
        }
        assert!(
            matches!(code, Some(1 | 2)),
            "{mb} MB: {:?}: {err}",
            run.status
        );
        assert_eq!(err.trim().lines().count(), 1, "{mb} MB: {err}");
        assert!(err.starts_with("error: "), "{mb} MB: {err}");
        assert!(!err.contains("memory allocation of"), "{mb} MB: {err}");
        if err.starts_with("error: out of memory: an allocation of ") {
            assert_eq!(code, Some(1), "{err}");
            assert!(
                err.contains(&format!("`ulimit -v` {} KiB", mb * 1000)),
                "{err}"
            );
            in_allocator += 1;
        }
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"old output",
            "{mb} MB: {err}"
        );
        let strays: Vec<_> = std::fs::read_dir(&st.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".engram-tmp-"))
            .collect();
        assert!(strays.is_empty(), "{mb} MB: {strays:?}");
    }
    assert!(in_allocator > 0, "no limit reached the allocator's failure");
}

#[test]
fn flags_that_would_be_dropped_are_refused() {
    let d = tmp_dir("dropped-flags");
    let cfg = golden("small.config.json");
    let v41 = golden("v41/v41_small.config.json");
    let array = d.join("array.json");
    std::fs::write(&array, "[]").unwrap();
    let broken_v41 = d.join("broken_v41.json");
    std::fs::write(&broken_v41, r#"{"engram_layer_ids": [2], "dim": "wide"}"#).unwrap();
    let out = d.join("o.safetensors");
    let small_w = golden("small.weights.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // The demo's generated table is in no store (the flag was ignored: PASS, exit 0).
        (
            vec![
                "demo",
                "--config",
                s(&cfg),
                "--table-store",
                "redis://127.0.0.1:1",
            ],
            "expected --weights W with it",
        ),
        // A bench without --weights reads no store: the flags given are named.
        (
            vec![
                "bench",
                "--config",
                s(&cfg),
                "--table-store",
                "redis://127.0.0.1:1",
                "--store-deadline",
                "1",
            ],
            "--table-store, --store-deadline: give --weights",
        ),
        // The limits' measurements take no layer flags (each used to run alone, silently).
        (vec!["bench", "--fma-peak", "--mem-bw"], "--mem-bw"),
        (vec!["bench", "--mem-bw", "--decode"], "--decode"),
        (vec!["bench", "--decode", "--chunk", "4"], "--chunk"),
        // --layer picks a V4.1 layer; with a demo config it was ignored.
        (
            vec!["bench", "--config", s(&cfg), "--layer", "99"],
            "--layer 99",
        ),
        // A JSON array parsed as the default config.
        (
            vec![
                "hash",
                "--config",
                s(&array),
                "--text",
                "hi",
                "--out",
                s(&out),
            ],
            "a JSON object",
        ),
        // A V4.1 config where a demo-layer one is needed: named as such, not `dim`.
        (
            vec!["tokenize", "--config", s(&v41), "hi"],
            "found a DeepSeek-V4.1 config",
        ),
        (
            vec!["compression", "--config", s(&broken_v41)],
            "found a DeepSeek-V4.1 config",
        ),
        (vec!["bench", "--warm"], "--warm"),
        (
            vec![
                "bench",
                "--config",
                s(&cfg),
                "--weights",
                s(&small_w),
                "--table-cache",
                "0",
            ],
            "--table-cache",
        ),
        // The URL is checked before the table's line is printed (one line in all).
        (
            vec![
                "table",
                "push",
                "--config",
                s(&cfg),
                "--weights",
                s(&small_w),
                "--store",
                "notaurl",
            ],
            "notaurl",
        ),
        (vec!["bench", "--fma-peak", "--tokens", "0"], "--tokens"),
        // A typed default is a flag given too (it was compared with the default and passed).
        (vec!["bench", "--fma-peak", "--tokens", "4096"], "--tokens"),
        (vec!["bench", "--mem-bw", "--dtype", "f32"], "--dtype"),
        (vec!["bench", "--fma-peak", "--device", "cpu"], "--device"),
        (
            vec!["bench", "--fma-peak", "--tokenizer", "/nope.json"],
            "--tokenizer",
        ),
        (
            vec!["bench", "--fma-peak", "--table-io", "mmap"],
            "--table-io",
        ),
        (
            vec!["bench", "--vec-buffers", "--chunk", "8"],
            "--vec-buffers",
        ),
        // A chunked prefill gives every chunk a fresh output and runs random ids: both
        // options were dropped.
        (
            vec!["bench", "--fresh-output", "--chunk", "8"],
            "--fresh-output: a chunked prefill",
        ),
        (
            vec!["bench", "--text-file", s(&cfg), "--chunk", "8"],
            "a chunked prefill runs random ids",
        ),
        // The row-store timing does no layer math: these were dropped (a typed default too).
        (
            vec![
                "bench",
                "--config",
                s(&cfg),
                "--weights",
                s(&small_w),
                "--table-cache",
                "1M",
                "--gather-only",
                "--dtype",
                "f32",
            ],
            "--dtype: --gather-only times the row store alone",
        ),
        (
            vec!["bench", "--gather-only", "--path", "reference"],
            "--path: --gather-only",
        ),
        (
            vec!["bench", "--gather-only", "--fresh-output"],
            "--fresh-output: --gather-only",
        ),
        // --chunk ran a chunked prefill instead of the row-store timing.
        (
            vec!["bench", "--gather-only", "--chunk", "8"],
            "--chunk: --gather-only",
        ),
        (
            vec!["bench", "--gather-only", "--decode"],
            "--decode: --gather-only",
        ),
        (
            vec!["bench", "--gather-only", "--vec-buffers"],
            "--vec-buffers: --gather-only",
        ),
        (
            vec!["bench", "--gather-only", "--suite"],
            "--suite: --gather-only",
        ),
        (
            vec!["bench", "--gather-only", "--device", "cuda"],
            "--device: --gather-only",
        ),
        (
            vec![
                "bench",
                "--config",
                s(&v41),
                "--layer",
                "1",
                "--dtype",
                "f32",
            ],
            "--dtype",
        ),
        (
            vec![
                "bench",
                "--config",
                s(&v41),
                "--layer",
                "1",
                "--table-io",
                "mmap",
            ],
            "give --weights",
        ),
        // Commands that read no tokenizer refuse one (it was dropped silently).
        (
            vec!["compare", "--tokenizer", "t.json", s(&small_w), s(&small_w)],
            "--tokenizer: compare reads no tokenizer",
        ),
        (
            vec!["weights", s(&small_w), "--tokenizer", "t.json"],
            "--tokenizer: weights without --config",
        ),
        // Options the V4.1 bench does not run were dropped silently.
        (
            vec!["bench", "--config", s(&v41), "--path", "reference"],
            "--path reference",
        ),
        (
            vec!["bench", "--config", s(&v41), "--vec-buffers"],
            "--vec-buffers",
        ),
        (
            vec![
                "bench",
                "--config",
                s(&cfg),
                "--path",
                "reference",
                "--dtype",
                "bf16",
            ],
            "--path fused",
        ),
        (
            vec!["weights", s(&small_w), "--config", s(&v41)],
            "found a DeepSeek-V4.1 config",
        ),
        // Named without NVRTC too (it said NVRTC was missing).
        (vec!["cuda-kernels", "--arch", "foo"], "compute capability"),
        // clap's errors in one line, with what they list (the missing arguments).
        (vec!["compare"], "not provided: <A>, <B>"),
        (
            vec!["compare", "--tol", "NaN", s(&small_w), s(&small_w)],
            "tolerance",
        ),
        // A negative tolerance as a separate argument: named as the tolerance, not as an
        // unexpected option.
        (
            vec!["compare", "--tol", "-1", s(&small_w), s(&small_w)],
            "expected a finite tolerance of 0 or more, found -1",
        ),
    ];
    for (args, needle) in cases {
        expect_error(&args, needle);
    }
    assert!(!out.exists());
    // `forward` on the small layer with `extra` added.
    let (inputs, _) = case_inputs("seed_text");
    let forward = |extra: &[&str], needle: &str| {
        let mut args = vec![
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&small_w),
            "--inputs",
            s(&inputs),
            "--out",
            s(&out),
        ];
        args.extend(extra);
        expect_error(&args, needle);
    };
    // A --io-depth past the cap (it started that many reader threads, ~60x slower).
    forward(
        &["--table-io", "direct", "--io-depth", "100000000"],
        "1 to 1024",
    );
    // --io-depth without --table-io direct: what was given instead, as the user gave it.
    forward(
        &["--io-depth", "3", "--table-store", "redis://127.0.0.1:1"],
        "--io-depth: expected --table-io direct with it, found --table-store",
    );
    forward(
        &["--io-depth", "3"],
        "found no --table-io (the default, mmap)",
    );
    // --no-bos applies to --text; with an inputs file it did nothing.
    forward(&["--no-bos"], "--no-bos");
    // The same for a V4.1 layer (checked before its own path).
    expect_error(
        &[
            "forward",
            "--config",
            s(&v41),
            "--weights",
            s(&golden("v41/v41_small.weights.safetensors")),
            "--layer",
            "14",
            "--inputs",
            s(&inputs),
            "--out",
            s(&out),
            "--no-bos",
        ],
        "--no-bos",
    );
    // Store options without a store did nothing.
    forward(&["--store-batch", "3"], "--table-store");
    // A server that answers garbage: the Redis client's error holds newlines, the line
    // does not.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            use std::io::Write;
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n!!\nmore\n");
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    expect_error(
        &["table", "info", "--store", &url, "--store-deadline", "1"],
        &url,
    );
    assert!(!out.exists());
    // Every budget is parsed before the table's first line is printed.
    let text = d.join("t.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog sat too").unwrap();
    let (code, stdout, err) = engram(&[
        "table",
        "cache-sim",
        "--config",
        s(&cfg),
        "--text-file",
        s(&text),
        "--budgets=1%,abc",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(stdout.is_empty(), "printed before the error: {stdout}");
    assert!(err.contains("abc"), "{err}");
    // --tokens 0 is named as the option, not as a text without tokens.
    expect_error(
        &[
            "table",
            "cache-sim",
            "--config",
            s(&cfg),
            "--text-file",
            s(&text),
            "--tokens",
            "0",
        ],
        "--tokens: expected at least 1",
    );
}

#[test]
fn compare_takes_every_dtype_and_non_finite_values() {
    let d = tmp_dir("compare-dtypes");
    let write = |name: &str, v: &[f32]| {
        let p = d.join(name);
        let mut w = TensorWriter::new();
        w.f32("x", &[v.len()], v);
        w.write(&p).unwrap();
        p
    };
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let a = write("a.st", &[1.0, inf, -inf, nan, 3e38]);
    let same = write("same.st", &[1.0, inf, -inf, nan, 3e38]);
    let (code, out, err) = engram(&["compare", s(&a), s(&same)]);
    // Equal infinities and NaN against NaN are no difference (they gave NaN and FAIL).
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("max 0.000e0"), "{out}");
    assert!(!out.contains("not compared"), "{out}");
    // A tensor only one file has: listed; a FAIL with --all.
    let more = d.join("more.st");
    let (xs, zero) = ([1.0, inf, -inf, nan, 3e38], [0.0f32]);
    let mut w = TensorWriter::new();
    w.f32("x", &[5], &xs).f32("output", &[1], &zero);
    w.write(&more).unwrap();
    for (x, y) in [(&a, &more), (&more, &a)] {
        let (code, out, err) = engram(&["compare", s(x), s(y)]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains(&format!("not compared, only in {}: `output`", s(&more))),
            "{out}"
        );
        let (code, out, _) = engram(&["compare", s(x), s(y), "--all"]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("`output`  FAIL") && out.ends_with("FAIL\n"),
            "{out}"
        );
    }
    // Finite values apart by more than f32's range: the difference stays finite (was inf).
    let far = write("far.st", &[1.0, inf, -inf, nan, -3e38]);
    let (code, out, _) = engram(&["compare", s(&a), s(&far)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("max 6.000e38"), "{out}");
    // An infinity against a number, or NaN against a number, fails.
    for other in [[1.0, 0.0, -inf, nan, 3e38], [1.0, inf, -inf, 0.0, 3e38]] {
        let p = write("other.st", &other);
        let (code, out, _) = engram(&["compare", s(&a), s(&p)]);
        assert_eq!(code, 1, "{other:?}: {out}");
        assert!(out.contains("FAIL"), "{out}");
    }
    // u8 (an int, by value) and fp8 tensors (bit for bit) of the V4.1 goldens: they were
    // an error. One byte flipped in a copy is one differing element.
    let flip = |file: &Path, tensor: &str| -> (i32, String) {
        let (code, out, err) = engram(&["compare", s(file), s(file)]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(tensor) && out.ends_with("PASS\n"), "{out}");
        let (_, offset) = TensorFile::open(file)
            .unwrap()
            .raw(tensor)
            .unwrap()
            .location()
            .unwrap();
        let mut bytes = std::fs::read(file).unwrap();
        bytes[offset as usize] ^= 1;
        let flipped = d.join("flipped.st");
        std::fs::write(&flipped, &bytes).unwrap();
        let (code, out, _) = engram(&["compare", s(file), s(&flipped)]);
        let line = out.lines().find(|l| l.starts_with(tensor)).unwrap();
        (code, line.to_string())
    };
    // The demo layer has no token mask: one in its inputs was ignored.
    let (inputs, _) = case_inputs("seed_text");
    let f = TensorFile::open(&inputs).unwrap();
    let (ids, h) = (
        f.i64("input_ids", None).unwrap(),
        f.f32("hidden_states", None).unwrap(),
    );
    let n = ids.data.len();
    let ids_bytes: Vec<u8> = ids.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let h_bytes: Vec<u8> = h.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mask = vec![1u8; n];
    let view = |dtype, shape: &[usize], bytes| {
        safetensors::tensor::TensorView::new(dtype, shape.to_vec(), bytes).unwrap()
    };
    let views = [
        (
            "input_ids",
            view(safetensors::Dtype::I64, &ids.shape, &ids_bytes),
        ),
        (
            "hidden_states",
            view(safetensors::Dtype::F32, &h.shape, &h_bytes),
        ),
        (
            "token_mask",
            view(safetensors::Dtype::U8, &ids.shape, &mask),
        ),
    ];
    let masked = d.join("masked.st");
    std::fs::write(&masked, safetensors::serialize(views, None).unwrap()).unwrap();
    let demo_out = d.join("demo-out.st");
    // `forward` on the small demo layer.
    let demo_forward = |inputs: &Path, out: &str, needle: &str| {
        expect_error(
            &[
                "forward",
                "--config",
                s(&golden("small.config.json")),
                "--weights",
                s(&golden("small.weights.safetensors")),
                "--inputs",
                s(inputs),
                "--out",
                out,
            ],
            needle,
        );
    };
    demo_forward(&masked, s(&demo_out), "tensor `token_mask` in");
    assert!(!demo_out.exists());
    // An output path ending in / (a file of that name exists): refused before the run.
    std::fs::write(&demo_out, b"keep").unwrap();
    let slash = format!("{}/", demo_out.display());
    demo_forward(&inputs, &slash, "found a path ending in /");
    assert_eq!(std::fs::read(&demo_out).unwrap(), b"keep");
    let (code, line) = flip(&golden("v41/v41_small.cases.safetensors"), "token_mask");
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("int: 1 differing") && line.ends_with("FAIL"),
        "{line}"
    );
    let (code, line) = flip(
        &golden("v41/v41_small.weights.safetensors"),
        "layers.1.engram.wkv.weight",
    );
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("F8_E4M3: elements differing: 1 ") && line.ends_with("FAIL"),
        "{line}"
    );
    // f64 takes the tolerance (it was compared bit for bit), against f32 as well; an int
    // tensor against a float one is a dtype mismatch.
    let raw = |name: &str, dtype: safetensors::Dtype, bytes: Vec<u8>| {
        let p = d.join(name);
        let n = bytes.len() / (dtype.bitsize() / 8);
        let view = safetensors::tensor::TensorView::new(dtype, vec![n], &bytes).unwrap();
        std::fs::write(&p, safetensors::serialize([("x", view)], None).unwrap()).unwrap();
        p
    };
    let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let a64 = raw("a64.st", safetensors::Dtype::F64, f64s(&[1.0, 2.0]));
    let b64 = raw("b64.st", safetensors::Dtype::F64, f64s(&[1.0, 2.0 + 1e-9]));
    let (code, out, err) = engram(&["compare", s(&a64), s(&b64)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("max 1.000e-9"), "{out}");
    let f32s = write("f32.st", &[1.0, 2.0]);
    let (code, out, err) = engram(&["compare", s(&a64), s(&f32s)]);
    assert_eq!(code, 0, "{out}{err}");
    let i32s = raw(
        "i32.st",
        safetensors::Dtype::I32,
        [1i32, 2].iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    let (code, out, _) = engram(&["compare", s(&f32s), s(&i32s)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("dtype F32 vs I32"), "{out}");
    // Ints of any width by value: i32 [1, 2] against i16 [1, 2] and u8 [1, 3].
    let i16s = raw(
        "i16.st",
        safetensors::Dtype::I16,
        [1i16, 2].iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    let (code, out, err) = engram(&["compare", s(&i32s), s(&i16s)]);
    assert_eq!(code, 0, "{out}{err}");
    let u8s = raw("u8.st", safetensors::Dtype::U8, vec![1, 3]);
    let (code, out, _) = engram(&["compare", s(&i32s), s(&u8s)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("int: 1 differing"), "{out}");
    // Signs extend: i8 [-1, -128] equals i64 [-1, -128]; u64 max is not i64 -1.
    let i8s = raw("i8.st", safetensors::Dtype::I8, vec![0xff, 0x80]);
    let i64s = raw(
        "i64.st",
        safetensors::Dtype::I64,
        [-1i64, -128].iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    let (code, out, err) = engram(&["compare", s(&i8s), s(&i64s)]);
    assert_eq!(code, 0, "{out}{err}");
    let u64s = raw(
        "u64.st",
        safetensors::Dtype::U64,
        [u64::MAX, 128u64.wrapping_neg()]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    );
    let (code, out, _) = engram(&["compare", s(&i64s), s(&u64s)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("int: 2 differing"), "{out}");
}

/// Options and tensors that a command would misread: named as what they are.
#[test]
fn ragged_hash_inputs_and_cache_sim_layers_are_named() {
    let cfg = golden("small.config.json");
    let ragged = tmp("hash-ragged.safetensors");
    let mut w = TensorWriter::new();
    w.i64("input_ids", &[3], &[5, 6, 7])
        .i64("offsets", &[3], &[0, 1, 3]);
    w.write(&ragged).unwrap();
    let out = tmp("hash-ragged.out.safetensors");
    expect_error(
        &[
            "hash",
            "--config",
            s(&cfg),
            "--inputs",
            s(&ragged),
            "--out",
            s(&out),
        ],
        "tensor `offsets` in",
    );
    assert!(!out.exists());
    let text = tmp("cache-sim-layer.txt");
    std::fs::write(&text, "the memory of the layer").unwrap();
    expect_error(
        &[
            "table",
            "cache-sim",
            "--config",
            s(&cfg),
            "--text-file",
            s(&text),
            "--layer",
            "7",
        ],
        "--layer: expected one of the config's layer_ids [1, 15], found 7",
    );
}

/// Tensor names with control characters or bidirectional marks are listed escaped: one line
/// per tensor, no escape sequence reaching the terminal, no name drawn reordered.
#[test]
fn control_characters_in_tensor_names_are_escaped() {
    let p = tmp("ctl-names.safetensors");
    let mut w = TensorWriter::new();
    w.f32("a\nb\u{1b}[31mred", &[2], &[0.0, 1.0]);
    w.f32("key\u{202e}thgiew\u{2066}.x\u{2069}", &[2], &[0.0, 1.0]);
    w.write(&p).unwrap();
    for args in [vec!["weights", s(&p)], vec!["compare", s(&p), s(&p)]] {
        let (code, out, err) = engram(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!out.contains('\u{1b}'), "{args:?}: {out:?}");
        assert!(out.contains("a\\nb\\u{1b}[31mred"), "{args:?}: {out:?}");
        for mark in ['\u{202e}', '\u{2066}', '\u{2069}'] {
            assert!(!out.contains(mark), "{args:?}: {out:?}");
        }
        assert!(
            out.contains("key\\u{202e}thgiew\\u{2066}.x\\u{2069}"),
            "{args:?}: {out:?}"
        );
    }
}

/// `table cache-sim` on a table of about 10^9 rows: a cache of half of it is refused under
/// an address-space limit with one error line naming the cache, not an allocator abort
/// (its bookkeeping is allocated up front; without a limit its zero pages come lazily).
#[test]
fn cache_sim_bookkeeping_past_the_memory_is_an_error() {
    let t = Setup::new("cache-sim-mem");
    let c = t.config_with(
        "big.json",
        "{\"engram_vocab_size\": [500000000, 500000000]}",
    );
    let text = t.path("text.txt");
    std::fs::write(&text, "the memory of the layer, and of the cache").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000 && exec {} table cache-sim --config {} --text-file {} --budgets 50%",
            env!("CARGO_BIN_EXE_engram"),
            s(&c),
            s(&text)
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("memory for the row cache's") && err.contains("not enough memory"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A negative number given to an option (`--chunk -1`, which clap takes for an unknown flag
/// `-1`) names the option and the value.
#[test]
fn negative_values_name_their_option() {
    for (args, flag) in [
        (vec!["forward", "--chunk", "-1"], "--chunk"),
        (vec!["bench", "--tokens", "-5"], "--tokens"),
        (
            vec![
                "table",
                "info",
                "--store",
                "redis://x:1",
                "--store-timeout",
                "-1.5",
            ],
            "--store-timeout",
        ),
        (vec!["hash", "--layer", "-3", "--text", "x"], "--layer"),
    ] {
        let line = expect_error(&args, flag);
        let value = args[args.iter().position(|a| *a == flag).unwrap() + 1];
        assert!(
            line.contains(&format!("{flag}: expected a value >= 0, found {value}")),
            "{line}"
        );
    }
    // A text is not a number: the way to give it.
    let line = expect_error(&["forward", "--text", "-1"], "--text");
    assert!(line.contains("is given as --text=-1"), "{line}");
}

/// `hash-params` on a config that is not JSON gives the parser's words (not "expected a
/// DeepSeek-V4.1 config"), as `forward` does.
#[test]
fn hash_params_names_a_json_error() {
    let d = tmp_dir("hash-params-json");
    let cfg = d.join("trunc.json");
    std::fs::write(&cfg, "{\"engram_layer_ids\": [1").unwrap();
    let out = d.join("p.st");
    let line = expect_error(
        &["hash-params", "--config", s(&cfg), "--out", s(&out)],
        "trunc.json: expected JSON, found EOF",
    );
    assert!(line.contains("line 1 column"), "{line}");
    assert!(!out.exists());
}

/// A state file of the other variant (a DeepSeek-V4.1 layer's given to a demo layer, and
/// the reverse) is named as such, not as a stray tensor or an empty field.
#[test]
fn state_files_of_the_other_variant_are_named() {
    let t = Setup::new("states-variant");
    let (out, demo_st, v41_st) = (t.path("o.st"), t.path("demo.st"), t.path("v41.st"));
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-out", s(&demo_st)]);
    let (code, _, err) = engram(&strs(&args));
    assert_eq!(code, 0, "{err}");
    let (v41_cfg, v41_w) = (
        golden("v41/v41_small.config.json"),
        golden("v41/v41_small.weights.safetensors"),
    );
    let v41 = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "forward",
            "--config",
            s(&v41_cfg),
            "--weights",
            s(&v41_w),
            "--layer",
            "14",
            "--text",
            "the states of a layer",
            "--random-hidden",
            "1",
            "--out",
            s(&out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let (code, _, err) = engram(&strs(&v41(&["--state-out", s(&v41_st)])));
    assert_eq!(code, 0, "{err}");
    let args = t.forward(&t.inputs, &["--out", s(&out), "--state-in", s(&v41_st)]);
    let line = fails_leaving(&strs(&args), "states in", &[&v41_st]);
    assert!(
        line.contains("the states of a \"deepseek-v4.1\" layer"),
        "{line}"
    );
    let line = fails_leaving(
        &strs(&v41(&["--state-in", s(&demo_st)])),
        "states in",
        &[&demo_st],
    );
    assert!(line.contains("the states of a demo layer"), "{line}");
}
