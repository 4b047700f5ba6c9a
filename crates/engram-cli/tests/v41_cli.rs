//! `engram forward`, `hash` and `hash-params` on the DeepSeek-V4.1 golden layer.

mod common;
use common::*;
use engram::tensors::TensorFile;

fn v41(name: &str) -> std::path::PathBuf {
    golden(&format!("v41/{name}"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn forward_every_stage_of_both_layers_and_chunked() {
    let (cfg, w, cases) = (
        v41("v41_small.config.json"),
        v41("v41_small.weights.safetensors"),
        v41("v41_small.cases.safetensors"),
    );
    let g = TensorFile::open(&cases).unwrap();
    for layer in ["1", "14"] {
        let out = tmp(&format!("v41-fwd-{layer}.safetensors"));
        let (code, _, err) = engram(&[
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--inputs",
            s(&cases),
            "--layer",
            layer,
            "--all-stages",
            "--out",
            s(&out),
        ]);
        assert_eq!(code, 0, "{err}");
        let o = TensorFile::open(&out).unwrap();
        assert_eq!(
            o.info("output").unwrap().0,
            safetensors::Dtype::BF16,
            "output in the input's dtype"
        );
        let key = |n: &str| format!("l{layer}.{n}");
        assert_eq!(
            o.i64("hash_ids", None).unwrap().data,
            g.i64(&key("hash_ids"), None).unwrap().data
        );
        for name in ["embeddings", "kv"] {
            assert_eq!(
                bits(&o.f32(name, None).unwrap().data),
                bits(&g.f32(&key(name), None).unwrap().data),
                "layer {layer} {name}"
            );
        }
        let (got, want) = (
            o.f32("output", None).unwrap().data,
            g.f32(&key("output"), None).unwrap().data,
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a.to_bits() >> 16) as i32 - (b.to_bits() >> 16) as i32).abs())
            .max()
            .unwrap();
        assert!(worst <= 2, "layer {layer}: output off by {worst} bf16 ulp");
        // Chunks of 7 with carried state write the same output, and a state file.
        let out2 = tmp(&format!("v41-fwd-{layer}-chunked.safetensors"));
        let st = tmp(&format!("v41-state-{layer}.safetensors"));
        let (code, _, err) = engram(&[
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--inputs",
            s(&cases),
            "--layer",
            layer,
            "--chunk",
            "7",
            "--out",
            s(&out2),
            "--state-out",
            s(&st),
        ]);
        assert_eq!(code, 0, "{err}");
        let o2 = TensorFile::open(&out2).unwrap();
        assert_eq!(bits(&o2.f32("output", None).unwrap().data), bits(&got));
        let states = TensorFile::open(&st).unwrap();
        assert_eq!(states.i64("position", None).unwrap().data, vec![30, 30]);
    }
}

#[test]
fn hash_and_hash_params_match_the_reference() {
    let cfg = v41("v41_small.config.json");
    let cases = v41("v41_small.cases.safetensors");
    let g = TensorFile::open(&cases).unwrap();
    let out = tmp("v41-hash.safetensors");
    let (code, _, err) = engram(&[
        "hash",
        "--config",
        s(&cfg),
        "--inputs",
        s(&cases),
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    let h = TensorFile::open(&out).unwrap();
    let params = tmp("v41-params.safetensors");
    let (code, _, err) = engram(&["hash-params", "--config", s(&cfg), "--out", s(&params)]);
    assert_eq!(code, 0, "{err}");
    let p = TensorFile::open(&params).unwrap();
    for l in [1, 14] {
        assert_eq!(
            h.i64(&format!("layer{l}"), Some(&[2, 30, 6])).unwrap().data,
            g.i64(&format!("l{l}.hash_ids"), None).unwrap().data
        );
        for n in ["primes", "offsets", "multipliers"] {
            assert_eq!(
                p.i64(&format!("layer{l}.{n}"), None).unwrap().data,
                g.i64(&format!("l{l}.{n}"), None).unwrap().data,
                "layer {l} {n}"
            );
        }
    }
}

#[test]
fn v41_errors_are_one_line() {
    let cfg = v41("v41_small.config.json");
    let w = v41("v41_small.weights.safetensors");
    let cases = v41("v41_small.cases.safetensors");
    let out = tmp("v41-err.safetensors");
    let base = [
        "forward",
        "--config",
        s(&cfg),
        "--weights",
        s(&w),
        "--inputs",
        s(&cases),
        "--out",
        s(&out),
    ];
    expect_error(&base, "--layer");
    let mut a = base.to_vec();
    a.extend(["--layer", "3"]);
    expect_error(&a, "[1, 14]");
    let mut a = base.to_vec();
    a.extend(["--layer", "1", "--tokenizer", "/nonexistent/tokenizer.json"]);
    expect_error(&a, "tokenizer");
    // `forward` (layer 1) with a copy of the config, `from` replaced by `to` (once).
    let text = std::fs::read_to_string(&cfg).unwrap();
    let with_config = |name: &str, from: &str, to: &str, needle: &str| {
        assert_eq!(text.matches(from).count(), 1, "{from} in the golden config");
        let c = tmp(name);
        std::fs::write(&c, text.replace(from, to)).unwrap();
        let mut a = base.to_vec();
        a[2] = s(&c);
        a.extend(["--layer", "1"]);
        expect_error(&a, needle)
    };
    // The checkpoint's tokenizer must give engram_compressed_vocab_size canonical ids.
    let line = with_config("v41-bad-vocab.json", "98627", "99092", "99092");
    assert!(
        line.contains("98627") && line.contains("--tokenizer") && line.contains("v41-bad-vocab"),
        "{line}"
    );
    // Row counts that are not the sum of the layer's primes: the file named too.
    let line = with_config(
        "v41-bad-rows.json",
        "6126",
        "6127",
        "engram_num_embeddings[0]",
    );
    assert!(
        line.contains("v41-bad-rows.json") && line.contains("6126"),
        "{line}"
    );
    // --out may not be (a file of) the checkpoint.
    let wcopy = tmp("v41-w-copy.safetensors");
    std::fs::copy(&w, &wcopy).unwrap();
    let before = std::fs::read(&wcopy).unwrap();
    let mut a = base.to_vec();
    a[4] = s(&wcopy);
    a[8] = s(&wcopy);
    a.extend(["--layer", "1"]);
    expect_error(&a, "same file as --weights");
    assert_eq!(
        std::fs::read(&wcopy).unwrap(),
        before,
        "the checkpoint is untouched"
    );
    // Inputs whose shapes only add up: transposed hidden states and mask.
    let g = TensorFile::open(&cases).unwrap();
    let ids = g.i64("input_ids", None).unwrap().data;
    let h = g.f32("hidden_states", None).unwrap().data;
    let bad_in = tmp("v41-transposed.safetensors");
    let mut wr = engram::tensors::TensorWriter::new();
    wr.i64("input_ids", &[2, 30], &ids);
    wr.f32("hidden_states", &[30, 2, 4, 256], &h);
    wr.write(&bad_in).unwrap();
    let mut a = base.to_vec();
    a[6] = s(&bad_in);
    a.extend(["--layer", "1"]);
    expect_error(&a, "hidden_states");
    // --dtype is refused, even typed as its default (as the V4.1 bench refuses it).
    for dt in ["bf16", "f32"] {
        let mut a = base.to_vec();
        a.extend(["--layer", "1", "--dtype", dt]);
        expect_error(&a, "--dtype");
    }
    // --out may not be the --tokenizer file either.
    let tok = tmp("v41-tok-as-out.json");
    std::fs::write(&tok, "{}").unwrap();
    let mut a = base.to_vec();
    a[8] = s(&tok);
    a.extend(["--layer", "1", "--tokenizer", s(&tok)]);
    expect_error(&a, "same file as --tokenizer");
    assert_eq!(std::fs::read(&tok).unwrap(), b"{}");
    // ... nor the tokenizer_config.json the tokenizer reads beside its file.
    let dir = tmp_dir("v41-tok-dir");
    let (tj, tc) = (
        dir.join("tokenizer.json"),
        dir.join("tokenizer_config.json"),
    );
    std::fs::write(&tj, "{}").unwrap();
    std::fs::write(&tc, "{}").unwrap();
    let mut a = base.to_vec();
    a[8] = s(&tc);
    a.extend(["--layer", "1", "--tokenizer", s(&tj)]);
    expect_error(&a, "same file as --tokenizer");
    assert_eq!(std::fs::read(&tc).unwrap(), b"{}");
    // A token_mask of another dtype is refused by `hash` as by `forward` (read byte by byte,
    // int64 ones would be a mask of 8 entries per token).
    let m64: Vec<i64> = vec![1; 60];
    let bad_mask = tmp("v41-mask-i64.safetensors");
    let mut wr = engram::tensors::TensorWriter::new();
    wr.i64("input_ids", &[2, 30], &ids);
    wr.i64("token_mask", &[2, 30], &m64);
    wr.write(&bad_mask).unwrap();
    expect_error(
        &[
            "hash",
            "--config",
            s(&cfg),
            "--inputs",
            s(&bad_mask),
            "--out",
            s(&tmp("v41-hash-bad.safetensors")),
        ],
        "token_mask",
    );
    // A mask value other than 0 or 1 (read as text before), and --random-hidden beside the
    // inputs' hidden states (ignored before).
    let (_, at) = TensorFile::open(&cases)
        .unwrap()
        .raw("token_mask")
        .unwrap()
        .location()
        .unwrap();
    let mut bytes = std::fs::read(&cases).unwrap();
    bytes[at as usize + 3] = 2;
    let mask2 = tmp("v41-mask-2.safetensors");
    std::fs::write(&mask2, &bytes).unwrap();
    let mut a = base.to_vec();
    a[6] = s(&mask2);
    a.extend(["--layer", "1"]);
    expect_error(&a, "expected 0 or 1 (1 = text), found 2 at flat index 3");
    let mut a = base.to_vec();
    a.extend(["--layer", "1", "--random-hidden", "3"]);
    expect_error(&a, "--random-hidden");
    // Any --chunk, the largest included, is one-shot output.
    let mut a = base.to_vec();
    a.extend(["--layer", "1"]);
    let (code, _, err) = engram(&a);
    assert_eq!(code, 0, "{err}");
    let whole = TensorFile::open(&out)
        .unwrap()
        .f32("output", None)
        .unwrap()
        .data;
    a.extend(["--chunk", "18446744073709551615"]);
    let (code, _, err) = engram(&a);
    assert_eq!(code, 0, "{err}");
    let chunked = TensorFile::open(&out)
        .unwrap()
        .f32("output", None)
        .unwrap()
        .data;
    assert_eq!(bits(&chunked), bits(&whole));
    // --runs has a ceiling (each run's time is kept).
    expect_error(
        &[
            "bench",
            "--config",
            s(&cfg),
            "--layer",
            "1",
            "--runs",
            "4611686018427387904",
        ],
        "--runs",
    );
    // The global --tokenizer reaches demo-layer commands too.
    expect_error(
        &["tokenize", "hi", "--tokenizer", "/nonexistent/tok.json"],
        "/nonexistent/tok.json",
    );
    // A number out of range in a V4.1 config: the JSON error, not the demo schema's first
    // unknown field; a field given twice (JSON keeps the last) is named; a V4.1 config
    // without `engram_layer_ids` is said to lack it.
    let (eps, dim) = ("\"norm_eps\": 1e-20", "\"dim\": 256,");
    with_config(
        "v41-range.json",
        eps,
        "\"norm_eps\": 1e999",
        "number out of range",
    );
    let twice = format!("{dim} \"dim\": 512,");
    with_config(
        "v41-dup.json",
        dim,
        &twice,
        "field `dim`: expected once, found twice",
    );
    with_config(
        "v41-nolayers.json",
        "\"engram_layer_ids\"",
        "\"engram_layer_list\"",
        "recognised by `engram_layer_ids`, which this one lacks",
    );
    // A misspelt optional input (`token_masks`) would be ignored, every token taken as text.
    let g = TensorFile::open(&cases).unwrap();
    let (ids, hidden) = (
        g.i64("input_ids", None).unwrap(),
        g.f32("hidden_states", None).unwrap(),
    );
    let mask = g.raw("token_mask").unwrap();
    let mask: Vec<i64> = mask.data().iter().map(|&m| m as i64).collect();
    let typo = tmp("v41-typo.safetensors");
    let mut wr = engram::tensors::TensorWriter::new();
    wr.i64("input_ids", &ids.shape, &ids.data)
        .f32("hidden_states", &hidden.shape, &hidden.data)
        .i64("token_masks", &ids.shape, &mask);
    wr.write(&typo).unwrap();
    let mut a = base.to_vec();
    a[6] = s(&typo);
    a.extend(["--layer", "1"]);
    let e = expect_error(&a, "tensor `token_masks`");
    assert!(e.contains("expected `token_mask`"), "{e}");
    // hash-params wants a V4.1 config.
    expect_error(
        &[
            "hash-params",
            "--config",
            s(&golden("small.config.json")),
            "--out",
            s(&tmp("hp.safetensors")),
        ],
        "DeepSeek-V4.1",
    );
}

#[test]
fn bench_runs_a_v41_config_and_reports_the_projection_share() {
    let cfg = v41("v41_small.config.json");
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&cfg),
        "--layer",
        "14",
        "--tokens",
        "64",
        "--runs",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["variant"], "deepseek-v4.1");
    assert_eq!(v["columns"], 6);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    let share = v["projection_fma_peak_share"].as_f64().unwrap();
    assert!(share > 0.0 && share.is_finite(), "{v}");
    assert_eq!(
        v["projection_mflop_per_token"].as_f64().unwrap(),
        2.0 * 192.0 * 1280.0 / 1e6
    );
}

#[test]
fn table_io_direct_and_a_cache_write_the_same_output() {
    let (cfg, w, cases) = (
        v41("v41_small.config.json"),
        v41("v41_small.weights.safetensors"),
        v41("v41_small.cases.safetensors"),
    );
    let mut outs = Vec::new();
    for extra in [
        &[][..],
        &["--table-io", "direct"],
        &["--table-io", "direct", "--table-cache", "4k"],
        &["--table-cache", "1"],
    ] {
        let out = tmp(&format!("v41-io-{}.safetensors", outs.len()));
        let mut args = vec![
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--inputs",
            s(&cases),
            "--layer",
            "1",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = engram(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        // Rows read through a cache: counted in bytes from a direct file, said to be
        // uncounted from a mapped one (not "0 bytes").
        if extra.contains(&"--table-cache") {
            let direct = extra.contains(&"direct");
            let counted = err
                .split(" read (")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if direct {
                assert!(counted.is_some_and(|n| n > 0), "{extra:?}: {err}");
            } else {
                assert!(err.contains("bytes not counted"), "{extra:?}: {err}");
            }
        }
        outs.push(bits(
            &TensorFile::open(&out)
                .unwrap()
                .f32("output", None)
                .unwrap()
                .data,
        ));
    }
    assert!(outs.windows(2).all(|p| p[0] == p[1]));
    expect_error(
        &[
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--inputs",
            s(&cases),
            "--layer",
            "1",
            "--out",
            s(&tmp("v41-io-bad.safetensors")),
            "--table-cache",
            "12Q",
        ],
        "12Q",
    );
    // The demo layer over the same stores writes the same output.
    let small = golden("small.config.json");
    let sw = golden("small.weights.safetensors");
    let mut demo = Vec::new();
    for extra in [&[][..], &["--table-io", "direct", "--table-cache", "1k"]] {
        let out = tmp(&format!("demo-io-{}.safetensors", demo.len()));
        let mut args = vec![
            "forward",
            "--config",
            s(&small),
            "--weights",
            s(&sw),
            "--text",
            "Engram rows",
            "--random-hidden",
            "1",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = engram(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        demo.push(bits(
            &TensorFile::open(&out)
                .unwrap()
                .f32("output", None)
                .unwrap()
                .data,
        ));
    }
    assert_eq!(demo[0], demo[1]);
}

#[test]
fn bench_reports_the_row_store_counters() {
    let (code, out, err) = engram(&[
        "bench",
        "--config",
        s(&golden("small.config.json")),
        "--weights",
        s(&golden("small.weights.safetensors")),
        "--tokens",
        "64",
        "--runs",
        "2",
        "--table-io",
        "direct",
        "--table-cache",
        "16k",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let rs = &v["row_store"];
    assert_eq!(rs["table_io"], "direct");
    assert_eq!(rs["table_cache_bytes"], 16384);
    let hit = rs["hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit), "{rs}");
    assert!(
        rs["rows_read"].as_u64().unwrap() > 0 && rs["bytes_read"].as_u64().unwrap() >= 4096,
        "{rs}"
    );
}

#[test]
fn bench_takes_its_ids_from_a_text_file() {
    let text = tmp("bench-text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let (cfg, w) = (
        golden("small.config.json"),
        golden("small.weights.safetensors"),
    );
    let base = [
        "bench",
        "--config",
        s(&cfg),
        "--weights",
        s(&w),
        "--runs",
        "1",
        "--table-cache",
        "256k",
        "--json",
        "--text-file",
        s(&text),
    ];
    let mut a = base.to_vec();
    a.extend(["--tokens", "64"]);
    let (code, out, err) = engram(&a);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    // The repeated sentence reuses its rows: the cache hits.
    assert!(v["row_store"]["hit_rate"].as_f64().unwrap() > 0.5, "{v}");
    assert_eq!(v["row_store"]["warm"], false);
    let mut a = base.to_vec();
    a.extend(["--tokens", "100000"]);
    expect_error(&a, "tokens (B·L)");
}

/// Headers that declare billions of values (files of a few KB, sparse): every count is
/// checked against the run, or the run's memory planned, before a tensor is read. These
/// aborted in an allocation of 32 GiB or more.
#[test]
fn declared_counts_are_checked_before_anything_is_read() {
    let cfg = v41("v41_small.config.json");
    let w = v41("v41_small.weights.safetensors");
    let dir = tmp_dir("v41-sparse");
    let out = dir.join("out.safetensors");
    let n = 1usize << 32;
    // `forward` on layer 1 with these inputs, plus `extra`.
    let run = |inputs: &std::path::Path, extra: &[&str]| -> Vec<String> {
        [
            "forward",
            "--config",
            s(&cfg),
            "--weights",
            s(&w),
            "--layer",
            "1",
            "--inputs",
            s(inputs),
            "--out",
            s(&out),
        ]
        .iter()
        .chain(extra)
        .map(|x| x.to_string())
        .collect()
    };
    let forward = |inputs: &std::path::Path, extra: &[&str], needle: &str| {
        let a = run(inputs, extra);
        expect_error(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    // A state file of 2^32 states for a run of one sequence.
    let g = TensorFile::open(v41("v41_small.cases.safetensors")).unwrap();
    let ids = g.i64("input_ids", None).unwrap();
    let first = dir.join("one.safetensors");
    let hidden = g.f32("hidden_states", None).unwrap();
    let l = ids.shape[1];
    let mut wr = engram::tensors::TensorWriter::new();
    wr.i64("input_ids", &[1, l], &ids.data[..l]).f32(
        "hidden_states",
        &[1, l, hidden.shape[2], hidden.shape[3]],
        &hidden.data[..l * hidden.shape[2] * hidden.shape[3]],
    );
    wr.write(&first).unwrap();
    let st = dir.join("state.safetensors");
    let a = run(&first, &["--state-out", s(&st)]);
    let (code, _, err) = engram(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(&out).unwrap();
    let meta: Vec<(String, String)> = TensorFile::open(&st)
        .unwrap()
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let huge_state = dir.join("huge-state.safetensors");
    sparse(
        &huge_state,
        &[("history", "I64", &[n, 3], 8), ("position", "I64", &[n], 8)],
        &meta,
    );
    let e = forward(&first, &["--state-in", s(&huge_state)], "tensor `position`");
    assert!(
        e.contains("expected 1 states") && e.contains(&format!("[{n}]")),
        "{e}"
    );
    // input_ids of 2^32 tokens with hidden states of 2: the shapes are named.
    let mismatch = dir.join("mismatch.safetensors");
    sparse(
        &mismatch,
        &[
            ("input_ids", "I64", &[1, n], 8),
            ("hidden_states", "BF16", &[1, 2, 4, 256], 2),
        ],
        &[],
    );
    forward(&mismatch, &[], "tensor `hidden_states`");
    // Consistent, and far past the memory: the plan refuses.
    let both = dir.join("both.safetensors");
    sparse(
        &both,
        &[
            ("input_ids", "I64", &[1, n], 8),
            ("hidden_states", "BF16", &[1, n, 4, 256], 2),
        ],
        &[],
    );
    forward(&both, &[], "not enough memory");
    // 2^32 offsets on 60 tokens: as many sequence states.
    let offsets = dir.join("offsets.safetensors");
    sparse(
        &offsets,
        &[
            ("input_ids", "I64", &[60], 8),
            ("hidden_states", "BF16", &[60, 4, 256], 2),
            ("offsets", "I64", &[n], 8),
        ],
        &[],
    );
    forward(&offsets, &[], "not enough memory");
    // `hash` of 2^32 ids.
    let ids_only = dir.join("ids.safetensors");
    sparse(&ids_only, &[("input_ids", "I64", &[1, n], 8)], &[]);
    expect_error(
        &[
            "hash",
            "--config",
            s(&cfg),
            "--inputs",
            s(&ids_only),
            "--out",
            s(&out),
        ],
        "not enough memory",
    );
    assert!(!out.exists(), "no output from a refused run");
}
