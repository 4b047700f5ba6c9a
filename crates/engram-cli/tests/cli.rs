//! The `engram` binary end to end: outputs against the golden data, and errors as one
//! message with a non-zero exit code.

mod common;

use common::{case_inputs, engram, expect_error, forward_small, golden, max_err, s, tmp};
use engram::tensors::{TensorFile, TensorWriter};

#[test]
fn forward_both_paths_and_chunked_match_golden() {
    for case in ["batch2", "long"] {
        let (inp, g) = case_inputs(case);
        // Stages the golden file lacks for a case (`long` has gates and output only) are
        // checked against an unchunked reference run.
        let whole = tmp(&format!("{case}.whole.out.safetensors"));
        let (code, _, err) = forward_small(&inp, &whole, &["--path", "reference"]);
        assert_eq!(code, 0, "{err}");
        let whole = TensorFile::open(&whole).unwrap();
        let want_stage = |stage: &str| {
            g.f32(&format!("{case}.{stage}"), None)
                .or_else(|_| whole.f32(stage, None))
                .unwrap()
        };
        for args in [
            vec!["--path", "reference"],
            vec!["--path", "fused"],
            vec!["--chunk", "5"],
            vec!["--path", "reference", "--chunk", "11"],
            vec!["--chunk", "5", "--all-stages"],
        ] {
            let out = tmp(&format!("{case}.out.safetensors"));
            let (code, _, err) = forward_small(&inp, &out, &args);
            assert_eq!(code, 0, "{args:?}: {err}");
            let o = TensorFile::open(&out).unwrap();
            assert_eq!(
                o.i64("hash_ids", None).unwrap().data,
                g.i64(&format!("{case}.hash_ids"), None).unwrap().data
            );
            for stage in ["gates", "output"] {
                let got = o.f32(stage, None).unwrap();
                let want = g.f32(&format!("{case}.{stage}"), None).unwrap();
                assert_eq!(got.shape, want.shape, "{stage} shape");
                assert!(
                    max_err(&got.data, &want.data) <= 1e-4,
                    "{case} {args:?} {stage}"
                );
            }
            // The reference path writes every stage, chunked or not; the fused path with
            // --all-stages adds gated_value and short_conv, chunked too.
            let extra: &[&str] = if args.contains(&"reference") {
                &["embeddings", "value", "keys", "gated_value", "short_conv"]
            } else if args.contains(&"--all-stages") {
                &["gated_value", "short_conv"]
            } else {
                &[]
            };
            for stage in extra {
                let got = o.f32(stage, None).unwrap();
                let want = want_stage(stage);
                assert_eq!(got.shape, want.shape, "{case} {args:?} {stage} shape");
                assert!(
                    max_err(&got.data, &want.data) <= 1e-4,
                    "{case} {args:?} {stage}"
                );
            }
        }
    }
}

#[test]
fn ragged_inputs_and_state_files() {
    let g = TensorFile::open(golden("small.stages.safetensors")).unwrap();
    // Pack seed_text (14) and long (137) without padding.
    let (a_ids, b_ids) = (
        g.i64("seed_text.input_ids", None).unwrap().data,
        g.i64("long.input_ids", None).unwrap().data,
    );
    let (a_h, b_h) = (
        g.f32("seed_text.hidden_states", None).unwrap().data,
        g.f32("long.hidden_states", None).unwrap().data,
    );
    let ids: Vec<i64> = a_ids.iter().chain(&b_ids).copied().collect();
    let h: Vec<f32> = a_h.iter().chain(&b_h).copied().collect();
    let inp = tmp("ragged.safetensors");
    let offsets = [0i64, 14, 151];
    let mut tw = TensorWriter::new();
    tw.i64("input_ids", &[151], &ids)
        .f32("hidden_states", &[151, 4, 1024], &h)
        .i64("offsets", &[3], &offsets);
    tw.write(&inp).unwrap();
    let out = tmp("ragged.out.safetensors");
    let (code, _, err) = forward_small(&inp, &out, &["--all-stages"]);
    assert_eq!(code, 0, "{err}");
    let o = TensorFile::open(&out)
        .unwrap()
        .f32("output", Some(&[1, 151, 4, 1024]))
        .unwrap()
        .data;
    let want: Vec<f32> = g
        .f32("seed_text.output", None)
        .unwrap()
        .data
        .into_iter()
        .chain(g.f32("long.output", None).unwrap().data)
        .collect();
    assert!(max_err(&o, &want) <= 1e-4);
    // --all-stages keeps gated_value and short_conv from a ragged input too: as the
    // reference path computes them on the same input.
    let ref_out = tmp("ragged.ref.out.safetensors");
    let (code, _, err) = forward_small(&inp, &ref_out, &["--path", "reference"]);
    assert_eq!(code, 0, "{err}");
    for stage in ["gated_value", "short_conv"] {
        let got = TensorFile::open(&out).unwrap().f32(stage, None).unwrap();
        let want = TensorFile::open(&ref_out)
            .unwrap()
            .f32(stage, None)
            .unwrap();
        assert_eq!(got.shape, [1, 151, 4, 1024], "{stage}");
        assert!(max_err(&got.data, &want.data) <= 1e-4, "{stage}");
    }
    // Chunks of 7 over sequences of 14 and 137 tokens (the first runs out after two
    // chunks): every stage back in place, fused with --all-stages and reference.
    for (args, stages) in [
        (
            vec!["--chunk", "7", "--all-stages"],
            &["output", "gated_value", "short_conv"][..],
        ),
        (
            vec!["--path", "reference", "--chunk", "7"],
            &[
                "embeddings",
                "value",
                "keys",
                "gated_value",
                "short_conv",
                "output",
            ][..],
        ),
    ] {
        let chunked = tmp("ragged.chunked.out.safetensors");
        let (code, _, err) = forward_small(&inp, &chunked, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        for stage in stages {
            let got = TensorFile::open(&chunked)
                .unwrap()
                .f32(stage, None)
                .unwrap();
            let want = TensorFile::open(&ref_out)
                .unwrap()
                .f32(stage, None)
                .unwrap();
            assert_eq!(got.shape, want.shape, "{args:?} {stage}");
            assert!(max_err(&got.data, &want.data) <= 1e-4, "{args:?} {stage}");
        }
    }
    // Stop after the first 60 tokens of `long`, save the state, resume from the file.
    let c = 4096;
    let part = |lo: usize, hi: usize, name: &str| {
        let p = tmp(name);
        let mut tw = TensorWriter::new();
        tw.i64("input_ids", &[1, hi - lo], &b_ids[lo..hi]).f32(
            "hidden_states",
            &[1, hi - lo, 4, 1024],
            &b_h[lo * c..hi * c],
        );
        tw.write(&p).unwrap();
        p
    };
    let (p1, p2) = (
        part(0, 60, "p1.safetensors"),
        part(60, 137, "p2.safetensors"),
    );
    let (st, o1, o2) = (
        tmp("state.safetensors"),
        tmp("o1.safetensors"),
        tmp("o2.safetensors"),
    );
    let (code, _, err) = forward_small(&p1, &o1, &["--state-out", s(&st)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = forward_small(&p2, &o2, &["--state-in", s(&st), "--all-stages"]);
    assert_eq!(code, 0, "{err}");
    // --all-stages after a state file: the resumed rows' short_conv, as the reference path
    // computes it from the same state.
    let o2r = tmp("o2.ref.safetensors");
    let (code, _, err) = forward_small(&p2, &o2r, &["--state-in", s(&st), "--path", "reference"]);
    assert_eq!(code, 0, "{err}");
    let sc = TensorFile::open(&o2)
        .unwrap()
        .f32("short_conv", None)
        .unwrap();
    let want_sc = TensorFile::open(&o2r)
        .unwrap()
        .f32("short_conv", None)
        .unwrap();
    assert_eq!(sc.shape, [1, 77, 4, 1024]);
    assert!(max_err(&sc.data, &want_sc.data) <= 1e-4);
    let mut got = TensorFile::open(&o1)
        .unwrap()
        .f32("output", None)
        .unwrap()
        .data;
    got.extend(
        TensorFile::open(&o2)
            .unwrap()
            .f32("output", None)
            .unwrap()
            .data,
    );
    assert!(max_err(&got, &g.f32("long.output", None).unwrap().data) <= 1e-4);
}

#[test]
fn hash_and_tokenize_commands() {
    let g = TensorFile::open(golden("hashing_full_config.safetensors")).unwrap();
    let ids = g.i64("code.input_ids", None).unwrap();
    let inp = tmp("hash.in.safetensors");
    let mut tw = TensorWriter::new();
    tw.i64("input_ids", &ids.shape, &ids.data);
    tw.write(&inp).unwrap();
    let out = tmp("hash.out.safetensors");
    let (code, _, err) = engram(&["hash", "--inputs", s(&inp), "--out", s(&out)]);
    assert_eq!(code, 0, "{err}");
    let o = TensorFile::open(&out).unwrap();
    for l in [1, 15] {
        assert_eq!(
            o.i64(&format!("layer{l}"), None).unwrap().data,
            g.i64(&format!("code.hash.layer{l}"), None).unwrap().data
        );
    }
    let (code, stdout, _) = engram(&[
        "tokenize",
        "--json",
        "Only Alexander the Great could tame the horse Bucephalus.",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let want = g.i64("seed_text.input_ids", None).unwrap().data;
    assert_eq!(v["input_ids"], serde_json::json!(want));
}

#[test]
fn demo_passes_in_f32_and_bf16() {
    for dtype in ["f32", "bf16"] {
        let (code, stdout, err) = engram(&["demo", "--dtype", dtype]);
        assert_eq!(code, 0, "{dtype}: {stdout}\n{err}");
        assert!(stdout.contains("14 tokens"), "{stdout}");
        assert!(stdout.contains("PASS"), "{stdout}");
        // The seed demo's first values (golden/README orientation values).
        assert!(
            stdout.contains("[-1.4979, 1.3056, 1.3625, 0.9532]"),
            "{stdout}"
        );
    }
}

#[test]
fn errors_exit_non_zero_with_one_message() {
    let cfg = golden("small.config.json");
    let w = golden("small.weights.safetensors");
    let (inp, _) = case_inputs("seed_text");
    let out = tmp("err.out.safetensors");
    // `engram forward` on the seed_text case, with some flags added or replaced.
    let fwd = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--inputs",
            s(&inp),
            "--out",
            s(&out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        for pair in extra.chunks(2) {
            match v.iter().position(|x| x == pair[0]) {
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        v
    };
    let owned = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let no_config: Vec<String> = fwd(&[])
        .into_iter()
        .filter(|a| a != "--config" && a != s(&cfg))
        .collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            fwd(&["--weights", "/nope/w.safetensors"]),
            "/nope/w.safetensors",
        ),
        (fwd(&["--path", "fast"]), "path"),
        (fwd(&["--chunk", "0"]), "--chunk"),
        (fwd(&["--dtype", "f8"]), "dtype"),
        // The default config does not fit the small weights.
        (no_config, "multi_head_embedding"),
        (fwd(&["--inputs", s(&w)]), "input_ids"),
        (
            owned(&[
                "hash",
                "--config",
                "/nope/c.json",
                "--text",
                "x",
                "--out",
                s(&out),
            ]),
            "/nope/c.json",
        ),
        (
            owned(&["demo", "--layer", "4"]),
            "--layer: expected one of the config's layer_ids [1, 15], found 4",
        ),
        (owned(&["bench", "--tokens", "0"]), "--tokens"),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        expect_error(&args, needle);
    }
}

#[test]
fn bench_reports_limits_and_shares() {
    let (code, out, err) = engram(&["bench", "--mem-bw", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in ["dram_read_gb_s", "llc_read_gb_s"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {out}");
    }
    // A decode bench on the small layer: the floor, the step's ratio to it and the share of
    // the FMA peak are reported and consistent.
    let cfg = golden("small.config.json");
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&cfg),
        "--decode",
        "--batch",
        "2",
        "--tokens",
        "4",
        "--runs",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (step, floor) = (
        v["step_latency_ms"].as_f64().unwrap(),
        v["step_floor_ms"].as_f64().unwrap(),
    );
    assert!(floor > 0.0 && step > 0.0, "{out}");
    let ratio = v["step_over_floor"].as_f64().unwrap();
    assert!(
        (ratio - step / floor).abs() < 1e-6 * ratio.max(1.0),
        "{out}"
    );
    assert!(v["fma_peak_share"].as_f64().unwrap() > 0.0, "{out}");
    assert!(v["fma_peak_gflops_before"].as_f64().unwrap() > 0.0, "{out}");
    assert!(!v["kernel"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(v["fresh_output"], false, "{out}");
    // The floor's bandwidth: a buffer of the weights' own size read warm (they fit the
    // last-level cache here), not half the cache.
    assert_eq!(v["working_set_bytes"], v["weight_bytes"], "{out}");
    assert_eq!(
        v["working_set_read_gb_s"], v["floor_bandwidth_gb_s"],
        "{out}"
    );
    for key in ["floor_bandwidth_gb_s", "dram_read_gb_s", "llc_read_gb_s"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {out}");
    }
    // The bandwidth measurement's buffer (8 × the last-level cache, 1 to 4 GiB and at most a
    // quarter of the free memory) is left out of the small layer's peak RSS.
    #[cfg(target_os = "linux")]
    {
        assert_eq!(v["peak_rss_includes_bw_buffer"], false, "{out}");
        let rss = v["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss > 0 && rss < 256 << 20, "{out}");
    }
    // Prefill with a fresh output vector per call, as `forward` gives.
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&cfg),
        "--tokens",
        "40",
        "--runs",
        "1",
        "--fresh-output",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["fresh_output"], true, "{out}");
    assert_eq!(v["vec_buffers"], false, "{out}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    // Hidden states and output in plain Vecs, prefill and decode: reported as such.
    for mode in [&[][..], &["--decode", "--batch", "2"][..]] {
        let mut args = vec![
            "bench",
            "--config",
            s(&cfg),
            "--tokens",
            "24",
            "--runs",
            "1",
        ];
        args.extend_from_slice(mode);
        args.extend_from_slice(&["--vec-buffers", "--json"]);
        let (code, out, err) = engram(&args);
        assert_eq!(code, 0, "{mode:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["vec_buffers"], true, "{out}");
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    }
}

/// A --chunk past the sequence streams the whole sequence as one chunk (it once sized its
/// buffer by the chunk: 16 TB here), and --runs has a ceiling.
#[test]
fn bench_chunk_and_runs_are_bounded() {
    let cfg = golden("small.config.json");
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&cfg),
        "--tokens",
        "8",
        "--chunk",
        "1000000000000",
        "--runs",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chunks of 8"), "{out}");
    expect_error(
        &["bench", "--config", s(&cfg), "--runs", "1000001"],
        "--runs",
    );
}

/// `bench --gather-only`: the run's rows through the row store and nothing else; one row per
/// token and head, counted by the store. Without a store it is one error line.
#[test]
fn bench_gather_only_times_the_store_alone() {
    let (cfg, w) = (
        golden("small.config.json"),
        golden("small.weights.safetensors"),
    );
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&cfg),
        "--weights",
        s(&w),
        "--table-io",
        "direct",
        "--tokens",
        "50",
        "--batch",
        "2",
        "--runs",
        "2",
        "--gather-only",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["mode"], "gather-only", "{out}");
    let heads = v["rows"].as_u64().unwrap() / 100;
    assert!(
        heads >= 1 && v["rows"].as_u64().unwrap() == 100 * heads,
        "{out}"
    );
    assert!(v["rows_per_s"].as_f64().unwrap() > 0.0, "{out}");
    // Two timed runs, each reading every row from the file (no cache).
    assert_eq!(
        v["row_store"]["rows_read"].as_u64(),
        Some(2 * 100 * heads),
        "{out}"
    );
    expect_error(
        &[
            "bench",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--gather-only",
        ],
        "--gather-only: expected a row store",
    );
}

/// Without a GPU, every `--device cuda` command fails at once with one line that says why;
/// a bad device name is one line too.
#[test]
fn device_cuda_without_a_gpu_is_one_error_line() {
    if engram_cuda::probe().is_ok() {
        eprintln!("skipped: this machine has a GPU (the golden_cuda suite covers it)");
        return;
    }
    for args in [
        &["demo", "--device", "cuda"][..],
        &["bench", "--device", "cuda", "--tokens", "8", "--runs", "1"],
        &["bench", "--device", "cuda", "--suite"],
    ] {
        expect_error(args, "--device cuda: CUDA library");
    }
    // A bad value is clap's usage error (its first line names the flag and the choices).
    let (code, _, err) = engram(&["demo", "--device", "tpu"]);
    assert_eq!(code, 2);
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("expected cpu or cuda"),
        "{err}"
    );
    expect_error(
        &["bench", "--suite", "--tokens", "8"],
        "--suite: only with --device cuda",
    );
}

/// A library that loads under a CUDA library's name but lacks its entry points (another
/// library, or one older than CUDA 13) is one error line naming the library and the first
/// entry point it lacks, where `cudarc` would panic at its first call.
#[cfg(target_os = "linux")]
#[test]
fn a_cuda_library_without_its_entry_points_is_one_error_line() {
    // A shared library this test has loaded that is none of CUDA's: libgcc_s, Rust's
    // unwinder on linux-gnu.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libgcc_s.so"))
        .expect("libgcc_s is loaded");
    let dir = common::tmp_dir("fake_cuda_libs");
    for name in ["libnvrtc.so.13", "libcuda.so.1", "libcublas.so.13"] {
        std::fs::copy(lib, dir.join(name)).unwrap();
    }
    // First on the path, so that a real CUDA installation behind it is not found first.
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", s(&dir)),
        _ => s(&dir).to_string(),
    };
    let env = [("LD_LIBRARY_PATH", path.as_str())];
    common::expect_error_env(
        &["cuda-kernels", "--arch", "sm_90"],
        &env,
        "CUDA library libnvrtc lacks nvrtcVersion",
    );
    for args in [
        &["demo", "--device", "cuda"][..],
        &["bench", "--device", "cuda", "--tokens", "8", "--runs", "1"],
    ] {
        common::expect_error_env(args, &env, "CUDA library libcuda lacks cuInit");
    }
}

/// `engram cuda-kernels` compiles every kernel with NVRTC (CI puts it on the library path)
/// and prints one line per kernel; without NVRTC it says which library is missing.
#[test]
fn cuda_kernels_lists_every_kernel_or_names_the_missing_library() {
    let (code, out, err) = engram(&["cuda-kernels", "--arch", "sm_90"]);
    if engram_cuda::kernels::nvrtc_present() {
        assert_eq!(code, 0, "{err}");
        for k in engram_cuda::kernels::KERNELS {
            let line = out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(*k))
                .unwrap_or_else(|| panic!("no line for {k}: {out}"));
            assert!(
                line.contains("registers") && line.contains("0 B spills"),
                "{line}"
            );
        }
        expect_error(&["cuda-kernels", "--arch", "sm_9x!"], "compute capability");
    } else {
        assert_ne!(code, 0);
        assert!(err.contains("libnvrtc"), "{err}");
    }
}

/// `ENGRAM_BF16_DOT` names the AVX-512 bf16 kernel: 0 the widening one always, 1
/// `vdpbf16ps` wherever the CPU runs AVX-512 with AVX512-BF16, `amx` the AMX one where the
/// CPU has AMX-BF16, which is also the default there.
#[test]
fn bf16_dot_env_picks_the_avx512_bf16_kernel() {
    let cfg = golden("small.config.json");
    let run = |dot: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_engram"));
        match dot {
            Some(d) => cmd.env("ENGRAM_BF16_DOT", d),
            None => cmd.env_remove("ENGRAM_BF16_DOT"),
        };
        let out = cmd
            .args([
                "bench",
                "--config",
                s(&cfg),
                "--dtype",
                "bf16",
                "--tokens",
                "24",
                "--runs",
                "1",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kernel"].as_str().unwrap().to_string()
    };
    let widened = run(Some("0"));
    assert!(!widened.contains("vdpbf16ps"), "{widened}");
    let dot = run(Some("1"));
    // The AVX-512 kernels run (ENGRAM_ISA not lowered) and the CPU has AVX512-BF16.
    let has_dot =
        widened.starts_with("avx512") && engram::fused::proj::bf16_dot_chains(1).is_some();
    assert_eq!(dot.contains("vdpbf16ps"), has_dot, "{dot}");
    if !has_dot {
        assert_eq!(dot, widened);
    }
    // AMX where the CPU has it, named or by default (`amx` is refused elsewhere: see
    // `unknown_tuning_env_values_are_refused`).
    let amx = engram::fused::proj::amx_ready();
    let has_amx = widened.starts_with("avx512") && amx;
    let default = run(None);
    assert_eq!(default.contains("tdpbf16ps"), has_amx, "{default}");
    if amx {
        let named = run(Some("amx"));
        assert_eq!(named.contains("tdpbf16ps"), has_amx, "{named}");
    }
}

/// A value of `ENGRAM_ISA`, `ENGRAM_TILE` or `ENGRAM_BF16_DOT` the kernels do not know is one
/// error line naming the variable, what it takes and what it found, exit 2, before any work;
/// the values they know run.
#[test]
fn unknown_tuning_env_values_are_refused() {
    let cfg = golden("small.config.json");
    let isas = if cfg!(target_arch = "x86_64") {
        "avx512, avx2 or generic"
    } else if cfg!(target_arch = "aarch64") {
        "neon or generic"
    } else {
        "generic"
    };
    // `amx` is a value only where the CPU has AMX-BF16 (and the OS grants it).
    let amx = engram::fused::proj::amx_ready();
    let bf16_kernels = if amx {
        "0, 1 or amx"
    } else {
        "0 or 1 (amx needs AMX-BF16 and the OS's permission for the tile state)"
    };
    let run = |var: &str, val: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_engram"))
            .args(["bench", "--config", s(&cfg), "--tokens", "8", "--runs", "1"])
            .args(["--json"])
            .env(var, val)
            .output()
            .unwrap()
    };
    for (var, val, expected) in [
        ("ENGRAM_ISA", "avx", isas),
        ("ENGRAM_ISA", "", isas),
        (
            "ENGRAM_TILE",
            "sixty-four",
            "a whole number of rows from 1 to 65536",
        ),
        ("ENGRAM_TILE", "0", "a whole number of rows from 1 to 65536"),
        (
            "ENGRAM_TILE",
            "65537",
            "a whole number of rows from 1 to 65536",
        ),
        ("ENGRAM_BF16_DOT", "yes", bf16_kernels),
    ] {
        let out = run(var, val);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={val}: {err}");
        assert!(out.stdout.is_empty(), "{var}={val}: ran anyway");
        assert_eq!(
            err.trim_end(),
            format!("error: environment variable {var}: expected {expected}, found {val:?}"),
        );
    }
    for (var, val) in [
        ("ENGRAM_ISA", "generic"),
        ("ENGRAM_TILE", "7"),
        ("ENGRAM_BF16_DOT", "0"),
        ("ENGRAM_BF16_DOT", "amx"),
    ] {
        let out = run(var, val);
        let err = String::from_utf8_lossy(&out.stderr);
        if val == "amx" && !amx {
            assert_eq!(out.status.code(), Some(2), "{var}={val}: {err}");
            assert_eq!(
                err.trim_end(),
                format!(
                    "error: environment variable {var}: expected {bf16_kernels}, found \"amx\""
                )
            );
            continue;
        }
        assert!(out.status.success(), "{var}={val}: {err}");
    }
}
