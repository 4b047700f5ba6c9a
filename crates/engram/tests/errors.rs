//! Every error path: bad input gives an error that names what was wrong, never a panic.

mod common;
use common::*;
use engram::tensors::TensorWriter;
use engram::{Engram, EngramConfig, EngramError, ForwardPath};
use std::path::PathBuf;

/// (name, shape, float data, int data) of one tensor of a weights file.
type Named = (String, Vec<usize>, Vec<f32>, Vec<i64>);

/// A file of this test binary's scratch folder, under the target folder: the same paths every
/// run, so runs overwrite rather than pile up files (names are unique per test).
fn tmp(name: &str) -> PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("engram-err");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs a call that must fail on `threads` threads, on copies of `states`: asserts that every
/// copy is left as it was and returns the error.
fn fails_keeping_states(
    e: &Engram,
    states: &[engram::EngramState],
    (ids, hidden, offsets): (&[i64], &[f32], &[usize]),
    path: ForwardPath,
    threads: usize,
) -> EngramError {
    let mut st = states.to_vec();
    let err = with_threads(threads, || {
        e.forward_ragged(&mut st, ids, hidden, offsets, path)
            .unwrap_err()
    });
    for (s, (a, b)) in st.iter().zip(states).enumerate() {
        assert!(
            a == b,
            "{path:?}, {threads} threads: sequence {s}'s state changed ({err})"
        );
    }
    err
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (
            r#"{"max_ngram_size": 1, "engram_vocab_size": []}"#,
            "max_ngram_size",
        ),
        (r#"{"engram_vocab_size": [646400]}"#, "engram_vocab_size"),
        (r#"{"n_embed_per_ngram": 500}"#, "n_embed_per_ngram"),
        (r#"{"layer_id": 3}"#, "layer_id"),
        (r#"{"hidden_size": 0}"#, "hidden_size"),
        (r#"{"hc_mult": 0}"#, "hc_mult"),
        (r#"{"layer_ids": [1, 1]}"#, "layer_ids"),
        (r#"{"vocab_size": 0}"#, "vocab_size"),
        (r#"{"num_layers": 0}"#, "num_layers"),
        (r#"{"pad_id": -1}"#, "pad_id"),
        (r#"{"kernel_size": 0}"#, "kernel_size"),
        (r#"{"engram_vocab_size": [1, 5]}"#, "engram_vocab_size"),
        (r#"{"hiden_size": 8}"#, "hiden_size"),
        (r#"{"hidden_size": "big"}"#, "hidden_size"),
    ];
    for (json, field) in cases {
        let e = EngramConfig::from_json_str(json).unwrap_err();
        assert!(e.to_string().contains(field), "{json}: {e}");
    }
    // A syntax error after an unknown field is the syntax error (it was the field), and a
    // file's errors name the file.
    for (json, wanted) in [
        (
            r#"{"dim": 256, "hc_mult": 4,}"#,
            "invalid JSON (key must be a string at line 1",
        ),
        (
            r#"{"dim": 256, "norm_eps": NaN}"#,
            "invalid JSON (expected value at line 1",
        ),
        (r#"{"hidden_size": "1024"}"#, "config field `hidden_size`"),
        (r#"{"hidden_size": 0}"#, "config field `hidden_size`"),
        ("42", "expected a JSON object, found invalid type: integer"),
    ] {
        let p = tmp("config-syntax.json");
        std::fs::write(&p, json).unwrap();
        let e = EngramConfig::from_json_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(wanted) && e.contains(&*p.to_string_lossy()),
            "{json}: {e}"
        );
    }
}

#[test]
fn config_json_round_trip() {
    let cfg = small_config();
    let back = EngramConfig::from_json_str(&cfg.to_json_string()).unwrap();
    assert_eq!(back, cfg);
    let text = std::fs::read_to_string(golden("small.config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let out: serde_json::Value = serde_json::from_str(&cfg.to_json_string()).unwrap();
    for (k, val) in v.as_object().unwrap() {
        assert_eq!(&out[k], val, "field {k} keeps its name and value");
    }
    assert_eq!(
        EngramConfig::from_json_str("{}").unwrap(),
        EngramConfig::default()
    );
    // Whitespace may follow the object; anything else is an error.
    EngramConfig::from_json_str("{}\n  ").unwrap();
    for bad in ["{} garbage", "{}{}", "{\"seed\": 1} 2"] {
        let e = EngramConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(e.contains("trailing"), "{bad}: {e}");
    }
    // serde reads a struct from an array too: `[]` was the default config.
    for bad in ["[]", "[[1999, 2503], 3]", &"[".repeat(200)] {
        let e = EngramConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(e.contains("a JSON object, found an array"), "{bad}: {e}");
    }
    for bad in ["3", "\"x\"", "true", "null"] {
        assert!(EngramConfig::from_json_str(bad).is_err(), "{bad}");
    }
    // A byte-order mark before the object is not an error.
    assert_eq!(
        EngramConfig::from_json_str("\u{feff}{\"seed\": 0}").unwrap(),
        EngramConfig::default()
    );
}

#[test]
fn id_out_of_range_names_position() {
    let e = small_engram();
    let mut ids = vec![5i64; 6];
    ids[4] = 128815;
    let hidden = vec![0.1f32; 6 * 4096];
    for &path in ForwardPath::ALL {
        let err = e.forward(&ids, &hidden, 2, 3, path).unwrap_err();
        match err {
            EngramError::IdOutOfRange {
                batch,
                position,
                id,
                vocab,
            } => {
                assert_eq!((batch, position, id, vocab), (1, 1, 128815, 128815));
            }
            other => panic!("{other}"),
        }
    }
    // Negative ids pass through, as in the reference.
    let ids = vec![-3i64, 7, 9];
    let r = e
        .forward(&ids, &hidden[..3 * 4096], 1, 3, ForwardPath::Reference)
        .unwrap();
    let f = e
        .forward(&ids, &hidden[..3 * 4096], 1, 3, ForwardPath::Fused)
        .unwrap();
    assert_eq!(r.hash_ids, f.hash_ids);
    assert!(r.hash_ids.iter().all(|&h| h >= 0));
}

#[test]
fn hidden_states_shape_and_nan() {
    let e = small_engram();
    let ids = vec![5i64; 3];
    let err = e
        .forward(&ids, &vec![0.0; 3 * 4096 - 1], 1, 3, ForwardPath::Fused)
        .unwrap_err();
    assert!(
        matches!(&err, EngramError::Shape { name, .. } if name == "hidden_states"),
        "{err}"
    );
    let mut h = vec![0.0f32; 3 * 4096];
    h[4097] = f32::NAN;
    let err = e.forward(&ids, &h, 1, 3, ForwardPath::Fused).unwrap_err();
    assert!(
        matches!(err, EngramError::NonFinite { index: 4097, .. }),
        "{err}"
    );
    let err = e.forward(&ids, &h, 0, 3, ForwardPath::Fused).unwrap_err();
    assert!(err.to_string().contains("input_ids"), "{err}");
    // B·L past usize (2^62 · 4 wraps to 0, the length of the empty arrays given): a shape
    // error, not a wrapped check followed by 2^62 states.
    for path in [ForwardPath::Fused, ForwardPath::Reference] {
        let err = e.forward(&[], &[], 1 << 62, 4, path).unwrap_err();
        assert!(
            matches!(&err, EngramError::Shape { name, .. } if name == "input_ids"),
            "{err}"
        );
    }
}

/// A prefill of several tiles that fails in the last row of a sequence (a NaN hidden state)
/// leaves every state as it was, on one thread (one range: its rings took more than R rows,
/// over several tiles, before the failure) and on two (the range that finished first is put
/// back too).
#[test]
fn a_prefill_that_fails_in_its_last_row_keeps_every_state() {
    let e = small_engram();
    let c = e.config().hc_mult * e.config().hidden_size;
    let lens = [700usize, 300];
    let total: usize = lens.iter().sum();
    let offsets = [0, lens[0], total];
    let mut states = vec![e.new_state(), e.new_state()];
    let warm_h = vec![0.5f32; 10 * c];
    e.forward_ragged(
        &mut states,
        &[21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
        &warm_h,
        &[0, 5, 10],
        ForwardPath::Fused,
    )
    .unwrap();
    let ids: Vec<i64> = (0..total as i64).map(|i| (i * 7919) % 1000 + 3).collect();
    let mut hidden: Vec<f32> = (0..total * c)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 2.0)
        .collect();
    for at in [lens[0] * c - 1, total * c - 1] {
        let keep = hidden[at];
        hidden[at] = f32::NAN;
        for threads in [1, 2] {
            let call = (&ids[..], &hidden[..], &offsets[..]);
            let err = fails_keeping_states(&e, &states, call, ForwardPath::Fused, threads);
            assert!(
                matches!(&err, EngramError::NonFinite { index, .. } if *index == at),
                "{threads} threads, {at}: {err}"
            );
        }
        hidden[at] = keep;
    }
}

/// A decode step (one token for each of many sequences) checks its hidden states in the
/// gate too: the first NaN or infinity in row order is the error, in either range of the
/// two-thread split, and every state (conv history, n-gram history, position) is as it
/// was, including those of the range that finished before the other failed.
#[test]
fn a_decode_step_finds_a_nan_in_the_gate_and_keeps_every_state() {
    let e = small_engram();
    let c = e.config().hc_mult * e.config().hidden_size;
    let nseq = 64;
    let offsets: Vec<usize> = (0..=nseq).collect();
    // Warm states: three tokens each.
    let mut states: Vec<_> = (0..nseq).map(|_| e.new_state()).collect();
    let warm_ids: Vec<i64> = (0..3 * nseq as i64).map(|i| (i * 131) % 900 + 3).collect();
    let warm_h: Vec<f32> = (0..3 * nseq * c)
        .map(|i| ((i * 13 % 97) as f32 / 97.0 - 0.5) * 2.0)
        .collect();
    let warm_off: Vec<usize> = (0..=nseq).map(|s| 3 * s).collect();
    e.forward_ragged(
        &mut states,
        &warm_ids,
        &warm_h,
        &warm_off,
        ForwardPath::Fused,
    )
    .unwrap();
    let ids: Vec<i64> = (0..nseq as i64).map(|i| (i * 7919) % 1000 + 3).collect();
    let hidden: Vec<f32> = (0..nseq * c)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 2.0)
        .collect();
    for at in [3, 20 * c + 9, (nseq - 1) * c + c - 1] {
        for bad in [f32::NAN, f32::NEG_INFINITY] {
            let mut h = hidden.clone();
            h[at] = bad;
            if at + 2 * c < h.len() {
                h[at + 2 * c] = f32::INFINITY; // a later one is not reported
                h[(nseq - 1) * c] = f32::NAN; // nor one in the other range
            }
            let call = (&ids[..], &h[..], &offsets[..]);
            let err = fails_keeping_states(&e, &states, call, ForwardPath::Fused, 2);
            assert!(
                matches!(&err, EngramError::NonFinite { name, index, .. } if name == "hidden_states" && *index == at),
                "{at} {bad}: {err}"
            );
        }
    }
    // The same states then step as if nothing had failed, on both paths alike.
    let mut fused = states.clone();
    let f = with_threads(2, || {
        e.forward_ragged(&mut fused, &ids, &hidden, &offsets, ForwardPath::Fused)
            .unwrap()
    });
    let mut reference = states.clone();
    let r = e
        .forward_ragged(
            &mut reference,
            &ids,
            &hidden,
            &offsets,
            ForwardPath::Reference,
        )
        .unwrap();
    assert_eq!(f.hash_ids, r.hash_ids);
    let (worst, at) = max_abs_diff(&f.output, &r.output);
    assert!(
        worst < 1e-4,
        "fused against reference after the errors: {worst} at {at}"
    );
}

/// A prefill-shaped fused call checks its hidden states in the gate, not in a pass of its
/// own: the error is the same (the first NaN or infinity in row order, in either range of
/// the two-thread split, in a branch's body or its last element), the states are as they
/// were, and large finite values whose squares overflow are no error.
#[test]
fn nan_found_in_the_gate_names_the_first_and_keeps_the_states() {
    let e = small_engram();
    let c = e.config().hc_mult * e.config().hidden_size;
    let lens = [70usize, 130];
    let total: usize = lens.iter().sum();
    let offsets = [0, lens[0], total];
    let ids: Vec<i64> = (0..total as i64).map(|i| (i * 7919) % 1000 + 3).collect();
    let hidden: Vec<f32> = (0..total * c)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 2.0)
        .collect();
    // States with history: a first chunk of each sequence.
    let mut states = vec![e.new_state(), e.new_state()];
    let warm_ids = vec![11i64, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22];
    let warm_h = vec![0.25f32; 12 * c];
    e.forward_ragged(
        &mut states,
        &warm_ids,
        &warm_h,
        &[0, 5, 12],
        ForwardPath::Fused,
    )
    .unwrap();
    let before: Vec<_> = states
        .iter()
        .map(|s| (s.conv_history(), s.ngram_history().to_vec(), s.position()))
        .collect();
    let bad_at = [
        0,                       // first value of the call
        5 * c + 3,               // a row of the first sequence
        (lens[0] + 40) * c + 17, // a row of the second sequence (the other range)
        (total - 1) * c + c - 1, // the last value of the last row
    ];
    // One set of states through every failed call: each must leave it as it was.
    let mut st = states.clone();
    for &at in &bad_at {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut h = hidden.clone();
            h[at] = bad;
            if at + 3 * c < h.len() {
                h[at + 3 * c] = f32::NAN; // a later one is not reported
            }
            let err = e
                .forward_ragged(&mut st, &ids, &h, &offsets, ForwardPath::Fused)
                .unwrap_err();
            assert!(
                matches!(&err, EngramError::NonFinite { name, index, .. } if name == "hidden_states" && *index == at),
                "{at} {bad}: {err}"
            );
            for (s, b) in st.iter().zip(&before) {
                assert!(s.conv_history() == b.0, "{at}: conv history changed");
                assert_eq!((s.ngram_history(), s.position()), (&b.1[..], b.2));
            }
        }
    }
    // After the errors, those states run on as if nothing had happened.
    let after_errors = e
        .forward_ragged(&mut st, &ids, &hidden, &offsets, ForwardPath::Fused)
        .unwrap();
    let mut fresh = states.clone();
    let clean = e
        .forward_ragged(&mut fresh, &ids, &hidden, &offsets, ForwardPath::Fused)
        .unwrap();
    assert!(after_errors.output == clean.output);
    // A bad id and a NaN in one call: both paths report the id (ids are checked first).
    let mut h = hidden.clone();
    h[0] = f32::NAN;
    let mut bad_ids = ids.clone();
    bad_ids[5] = 1 << 40;
    for path in [ForwardPath::Fused, ForwardPath::Reference] {
        let err = fails_keeping_states(&e, &states, (&bad_ids, &h, &offsets), path, 2);
        assert!(
            matches!(err, EngramError::IdOutOfRange { .. }),
            "{path:?}: {err}"
        );
    }
    // Finite values whose squares overflow f32: no error, on either path.
    let mut h = hidden.clone();
    h[(lens[0] + 2) * c + 5] = 3e38;
    for path in [ForwardPath::Fused, ForwardPath::Reference] {
        let mut st = states.clone();
        e.forward_ragged(&mut st, &ids, &h, &offsets, path).unwrap();
    }
}

#[test]
fn ragged_offsets_and_state_checked() {
    let e = small_engram();
    let ids = vec![5i64; 4];
    let h = vec![0.0f32; 4 * 4096];
    let mut st = vec![e.new_state(), e.new_state()];
    for bad in [vec![0, 3], vec![0, 3, 2], vec![1, 2, 4], vec![0, 2, 5]] {
        let err = e
            .forward_ragged(&mut st, &ids, &h, &bad, ForwardPath::Fused)
            .unwrap_err();
        assert!(err.to_string().contains("offsets"), "{bad:?}: {err}");
    }
    let mut wrong = engram::EngramState::from_parts(vec![1, 2, 3], vec![0.0; 10], 4096, 0);
    let err = e
        .forward_chunk(&mut wrong, &ids, &h, ForwardPath::Fused)
        .unwrap_err();
    assert!(err.to_string().contains("state.ngram_history"), "{err}");
}

#[test]
fn weights_file_errors_name_the_tensor() {
    let cfg = small_config();
    let m = mapping(&cfg);
    let good = engram::tensors::TensorFile::open(golden("small.weights.safetensors")).unwrap();
    let names = good.names();
    let load_all = |skip: Option<&str>| -> Vec<Named> {
        names
            .iter()
            .filter(|n| Some(n.as_str()) != skip)
            .map(|n| {
                let (dt, shape) = good.info(n).unwrap();
                if dt == safetensors::Dtype::I64 {
                    (n.clone(), shape, vec![], good.i64(n, None).unwrap().data)
                } else {
                    (n.clone(), shape, good.f32(n, None).unwrap().data, vec![])
                }
            })
            .collect()
    };
    let write = |path: &PathBuf, tensors: &[Named], extra: Option<(&str, Vec<usize>, Vec<f32>)>| {
        let mut w = TensorWriter::new();
        for (n, s, f, i) in tensors {
            if i.is_empty() {
                w.f32(n, s, f);
            } else {
                w.i64(n, s, i);
            }
        }
        if let Some((n, s, f)) = &extra {
            w.f32(n, s, f);
        }
        w.write(path).unwrap();
    };
    let load = |p: &PathBuf| {
        Engram::load_with(cfg.clone(), m.clone(), p)
            .unwrap_err()
            .to_string()
    };
    // Missing tensor.
    let p = tmp("missing.safetensors");
    write(&p, &load_all(Some("norm2.3.weight")), None);
    let e = load(&p);
    assert!(e.contains("norm2.3.weight") && e.contains("missing"), "{e}");
    // Extra tensor.
    let p = tmp("extra.safetensors");
    write(
        &p,
        &load_all(None),
        Some(("key_projs.9.weight", vec![2], vec![0.0, 1.0])),
    );
    let e = load(&p);
    assert!(
        e.contains("key_projs.9.weight") && e.contains("unexpected"),
        "{e}"
    );
    // Wrong shape.
    let mut t = load_all(Some("value_proj.bias"));
    t.push((
        "value_proj.bias".into(),
        vec![1023],
        vec![0.0; 1023],
        vec![],
    ));
    let p = tmp("shape.safetensors");
    write(&p, &t, None);
    let e = load(&p);
    assert!(
        e.contains("value_proj.bias")
            && e.contains("[1024]")
            && e.contains("[1023]")
            && e.contains("shape.safetensors"),
        "{e}"
    );
    // Wrong dtype: an int64 tensor where floats belong.
    let mut t = load_all(Some("norm1.0.weight"));
    t.push(("norm1.0.weight".into(), vec![1024], vec![], vec![1; 1024]));
    let p = tmp("dtype.safetensors");
    write(&p, &t, None);
    let e = load(&p);
    assert!(
        e.contains("norm1.0.weight") && e.contains("i64") && e.contains("dtype.safetensors"),
        "{e}"
    );
    // NaN in a projection.
    let mut t = load_all(Some("key_projs.1.bias"));
    let mut b = vec![0.0f32; 1024];
    b[7] = f32::INFINITY;
    t.push(("key_projs.1.bias".into(), vec![1024], b, vec![]));
    let p = tmp("nan.safetensors");
    write(&p, &t, None);
    let e = load(&p);
    assert!(
        e.contains("key_projs.1.bias") && e.contains("index 7") && e.contains("nan.safetensors"),
        "{e}"
    );
    // Unreadable and malformed files.
    let e = load(&tmp("does-not-exist.safetensors"));
    assert!(e.contains("does-not-exist"), "{e}");
    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
    let e = load(&p);
    assert!(e.contains("not a valid safetensors"), "{e}");
    let p = tmp("short.safetensors");
    std::fs::write(&p, b"\x01").unwrap();
    assert!(load(&p).contains("not a valid safetensors"));
}

#[test]
fn weights_save_load_round_trip_f32_and_bf16() {
    let cfg = small_config();
    let e = small_engram();
    let p = tmp("roundtrip.safetensors");
    e.weights().save(&p, &cfg, false).unwrap();
    let back = Engram::load_with(cfg.clone(), mapping(&cfg), &p).unwrap();
    assert!(back.weights().table.is_mapped());
    let (mut a, mut b) = (vec![0.0; 64], vec![0.0; 64]);
    for r in [0, 1234, e.weights().table.rows() - 1] {
        e.weights().table.row_into(r, &mut a);
        back.weights().table.row_into(r, &mut b);
        assert_eq!(a, b);
    }
    assert_eq!(
        e.weights().key_projs_weight,
        back.weights().key_projs_weight
    );
    // bf16 file: widened on load, outputs within bf16 tolerance.
    e.weights().save(&p, &cfg, true).unwrap();
    let b16 = Engram::load_with(cfg.clone(), mapping(&cfg), &p).unwrap();
    assert_eq!(b16.weights().table.dtype_name(), "bf16");
    let ids = vec![0i64, 22898, 19737, 270];
    let h = engram::rng::torch::TorchGenerator::manual_seed(3).randn(4 * 4096);
    let x = e.forward(&ids, &h, 1, 4, ForwardPath::Reference).unwrap();
    let y = b16.forward(&ids, &h, 1, 4, ForwardPath::Fused).unwrap();
    assert!(max_abs_diff(&x.output, &y.output).0 < 0.03);
}

#[test]
fn tokenizer_paths() {
    let err = engram::Tokenizer::from_name_or_path("/no/such/tokenizer").unwrap_err();
    assert!(err.to_string().contains("/no/such/tokenizer"), "{err}");
    // A folder with tokenizer.json (+ config) loads like the bundled copy.
    let dir = std::env::temp_dir().join(format!("engram-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundled = tokenizer();
    std::fs::write(
        dir.join("tokenizer.json"),
        bundled.inner().to_string(false).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<｜begin▁of▁sentence｜>"}"#,
    )
    .unwrap();
    let t = engram::Tokenizer::from_name_or_path(dir.to_str().unwrap()).unwrap();
    assert_eq!(
        t.encode("Hello world", true).unwrap(),
        bundled.encode("Hello world", true).unwrap()
    );
    assert_eq!(t.len(), 128815);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn init_refuses_tables_beyond_memory() {
    let cfg = EngramConfig {
        engram_vocab_size: vec![1 << 39, 1 << 39],
        ..EngramConfig::default()
    };
    let m = mapping(&cfg);
    let err = engram::init::torch_default_weights(&cfg, &m, 0, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("engram_vocab_size"), "{err}");
}

#[test]
fn f16_weights_are_widened() {
    // Every float tensor of the small state dict as float16, written with the safetensors
    // crate itself.
    let cfg = small_config();
    let good = engram::tensors::TensorFile::open(golden("small.weights.safetensors")).unwrap();
    let mut blobs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for n in good.names() {
        let (dt, shape) = good.info(&n).unwrap();
        if dt == safetensors::Dtype::I64 {
            let v = good.i64(&n, None).unwrap().data;
            blobs.push((
                n,
                dt,
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        } else {
            let v = good.f32(&n, None).unwrap().data;
            let b = v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            blobs.push((n, safetensors::Dtype::F16, shape, b));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = blobs
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let p = tmp("f16.safetensors");
    safetensors::serialize_to_file(views, None, &p).unwrap();
    let e16 = Engram::load_with(cfg.clone(), mapping(&cfg), &p).unwrap();
    assert_eq!(e16.weights().table.dtype_name(), "f16");
    let want = half::f16::from_f32(small_engram().weights().value_proj_bias[5]).to_f32();
    assert_eq!(e16.weights().value_proj_bias[5], want);
    let ids = vec![0i64, 22898, 19737, 270];
    let h = engram::rng::torch::TorchGenerator::manual_seed(3).randn(4 * 4096);
    let x = small_engram()
        .forward(&ids, &h, 1, 4, ForwardPath::Reference)
        .unwrap();
    for &path in ForwardPath::ALL {
        let y = e16.forward(&ids, &h, 1, 4, path).unwrap();
        assert!(max_abs_diff(&x.output, &y.output).0 < 0.03, "{path:?}");
    }
}

/// A NaN or an infinity in a table row the layer reads is an error naming the table and the
/// element, the same one on every path and dtype, from a bf16 or an f32 table: rows copied
/// in place (f32), widened to f32 (bf16 table, f32 layer), rounded to bf16 (f32 table, bf16
/// layer) and gathered as they lie into the bf16 dot kernels' pairs (AVX512-BF16 and BFDOT
/// hosts). The bad value sits deep in the call (token 20 of 40, head 3, element 37), so a
/// check that looked at the first rows or the first values of a row only would miss it.
#[test]
fn a_non_finite_table_row_is_the_same_error_on_every_path_and_dtype() {
    let cfg = small_config();
    let m = mapping(&cfg);
    let (ids, hidden) = random_inputs(&cfg, 40, 9);
    let (h, dh) = (cfg.num_heads(), cfg.head_dim());
    let (w0, _) = engram::init::torch_default_weights(&cfg, &m, 3, &mut |_| {}).unwrap();
    let rows = w0.table.rows();
    // The row token 20 reads for head 3 (hashes are exact on every path).
    let e0 = Engram::new(cfg.clone(), m.clone(), w0.clone()).unwrap();
    let st = e0
        .forward_detailed(&ids, &hidden, 1, 40, ForwardPath::Reference)
        .unwrap();
    let row = (st.hash_ids[20 * h + 3] + w0.offsets[3]) as usize;
    // No earlier token reads that row (the first read decides the error).
    assert!(
        (0..20 * h + 3).all(|k| (st.hash_ids[k] + w0.offsets[k % h]) as usize != row),
        "pick another token"
    );
    let mut seen = Vec::new();
    for (f32_table, bad) in [(false, 0x7fc0u16), (true, 0xff80)] {
        let mut w = w0.clone();
        let mut bits: Vec<u16> = (0..rows * dh).map(|i| 0x3f80 + (i % 64) as u16).collect();
        bits[row * dh + 37] = bad; // NaN in the bf16 table, -inf in the f32 one
        w.table = if f32_table {
            let v = bits
                .iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect();
            engram::weights::EmbeddingTable::from_f32(v, rows, dh).unwrap()
        } else {
            engram::weights::EmbeddingTable::from_bf16_bits(bits, rows, dh).unwrap()
        };
        let e = Engram::new(cfg.clone(), m.clone(), w).unwrap();
        let mut here = Vec::new();
        for dtype in [engram::DType::F32, engram::DType::Bf16] {
            let e = e.clone().with_dtype(dtype);
            for path in [ForwardPath::Fused, ForwardPath::Reference] {
                let err = e.forward(&ids, &hidden, 1, 40, path).unwrap_err();
                let EngramError::NonFinite { name, index, .. } = &err else {
                    panic!("{f32_table} {dtype:?} {path:?}: {err}")
                };
                assert!(name.contains("embedding"), "{err}");
                assert_eq!(*index, row * dh + 37, "{dtype:?} {path:?}: {err}");
                here.push(err.to_string());
            }
        }
        assert!(here.windows(2).all(|p| p[0] == p[1]), "{here:#?}");
        seen.push(here.remove(0));
    }
    assert_ne!(seen[0], seen[1], "the NaN and the infinity are told apart");
}

/// A decode step (one token for each of 128 sequences, two ranges on two threads) whose
/// second range reads a NaN table row fails after the first range has pushed its rows into
/// its sequences' conv histories: every state is put back as it was, and runs on as if the
/// step had never been tried. The reference path, which runs the sequences one after
/// another, leaves them as they were as well.
#[test]
fn a_failed_decode_step_keeps_every_state() {
    let cfg = small_config();
    let m = mapping(&cfg);
    let (h, dh) = (cfg.num_heads(), cfg.head_dim());
    let (w0, _) = engram::init::torch_default_weights(&cfg, &m, 3, &mut |_| {}).unwrap();
    let rows = w0.table.rows();
    let values: Vec<f32> = (0..rows * dh)
        .map(|i| (i % 64) as f32 / 64.0 - 0.5)
        .collect();
    let mut w = w0.clone();
    w.table = engram::weights::EmbeddingTable::from_f32(values.clone(), rows, dh).unwrap();
    let good = Engram::new(cfg.clone(), m.clone(), w.clone()).unwrap();
    let nseq = 128;
    // Warm states: a few tokens each, so that every conv history holds rows.
    let (warm_ids, warm_h) = random_inputs(&cfg, nseq * 5, 21);
    let warm_off: Vec<usize> = (0..=nseq).map(|s| 5 * s).collect();
    let mut states: Vec<_> = (0..nseq).map(|_| good.new_state()).collect();
    good.forward_ragged(
        &mut states,
        &warm_ids,
        &warm_h,
        &warm_off,
        ForwardPath::Fused,
    )
    .unwrap();
    // The step, and the row the last sequence's token reads for head 0.
    let (ids, hidden) = random_inputs(&cfg, nseq, 22);
    let off: Vec<usize> = (0..=nseq).collect();
    let step = good
        .forward_ragged(
            &mut states.clone(),
            &ids,
            &hidden,
            &off,
            ForwardPath::Reference,
        )
        .unwrap();
    let row = (step.hash_ids[(nseq - 1) * h] + w.offsets[0]) as usize;
    let mut bad_values = values;
    bad_values[row * dh + 5] = f32::NAN;
    w.table = engram::weights::EmbeddingTable::from_f32(bad_values, rows, dh).unwrap();
    let bad = Engram::new(cfg.clone(), m, w).unwrap();
    // The reference path too: it runs sequence after sequence, the last one failing.
    for path in [ForwardPath::Fused, ForwardPath::Reference] {
        let err = fails_keeping_states(&bad, &states, (&ids, &hidden, &off), path, 2);
        assert!(
            matches!(err, EngramError::NonFinite { .. }),
            "{path:?}: {err}"
        );
    }
    let mut st = states.clone();
    let _ = with_threads(2, || {
        bad.forward_ragged(&mut st, &ids, &hidden, &off, ForwardPath::Fused)
    });
    let again = good
        .forward_ragged(&mut st, &ids, &hidden, &off, ForwardPath::Fused)
        .unwrap();
    let want = good
        .forward_ragged(&mut states, &ids, &hidden, &off, ForwardPath::Fused)
        .unwrap();
    assert!(again.output == want.output);
}

/// A row id past a table in memory (f32 or bf16) is an error naming the row id, not a
/// panic: the fused gathers fall back to `try_row_into` for the error of a row they refuse.
#[test]
fn a_row_past_an_in_memory_table_is_an_error() {
    let f32_table =
        engram::weights::EmbeddingTable::from_f32((0..12).map(|i| i as f32).collect(), 3, 4)
            .unwrap();
    let bits = (0..12)
        .map(|i| half::bf16::from_f32(i as f32).to_bits())
        .collect();
    let bf16_table = engram::weights::EmbeddingTable::from_bf16_bits(bits, 3, 4).unwrap();
    for t in [&f32_table, &bf16_table] {
        let mut out = [0.0f32; 4];
        t.try_row_into(2, &mut out).unwrap();
        assert_eq!(out, [8.0, 9.0, 10.0, 11.0]);
        for r in [3, usize::MAX] {
            let err = t.try_row_into(r, &mut out).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("row id") && msg.contains("3 rows") && msg.contains(&r.to_string()),
                "{msg}"
            );
        }
    }
}

/// States are checked where they enter a call and a file: history ids past the tokenizer's
/// canonical ids, a position that would pass 2^64, a state of the wrong shape (which would
/// misalign every state after it in the file), and a file of another pad or tokenizer.
#[test]
fn states_are_checked_on_call_save_and_restore() {
    let e = small_engram();
    let ids = vec![5i64; 4];
    let h = vec![0.25f32; 4 * 4096];
    let vprime = e.hashing().compressed().num_compressed() as i64;
    let fresh = e.new_state();
    let conv = fresh.conv_history();
    let mut wild = engram::EngramState::from_parts(vec![1, vprime], conv.clone(), 4096, 0);
    let err = e
        .forward_chunk(&mut wild, &ids, &h, ForwardPath::Fused)
        .unwrap_err()
        .to_string();
    assert!(err.contains("state.ngram_history[1]"), "{err}");
    let mut late = engram::EngramState::from_parts(
        fresh.ngram_history().to_vec(),
        conv.clone(),
        4096,
        u64::MAX - 2,
    );
    for path in [ForwardPath::Fused, ForwardPath::Reference] {
        let err = e
            .forward_chunk(&mut late, &ids, &h, path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("state position"), "{err}");
    }
    // Saving over a good file: a bad state leaves it as it was.
    let file = tmp("states-checked.safetensors");
    let mut good = vec![e.new_state(), e.new_state()];
    e.forward_ragged(&mut good, &ids, &h, &[0, 2, 4], ForwardPath::Fused)
        .unwrap();
    engram::state_io::save_states(&file, &e, &good).unwrap();
    let saved = std::fs::read(&file).unwrap();
    let short = vec![
        good[0].clone(),
        engram::EngramState::from_parts(vec![1], conv.clone(), 4096, 2),
    ];
    let err = engram::state_io::save_states(&file, &e, &short)
        .unwrap_err()
        .to_string();
    assert!(err.contains("states[1]"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    // A position past the file's int64 is refused, not written as a negative one.
    let far = vec![engram::EngramState::from_parts(
        fresh.ngram_history().to_vec(),
        conv.clone(),
        4096,
        1 << 63,
    )];
    let err = engram::state_io::save_states(&file, &e, &far)
        .unwrap_err()
        .to_string();
    assert!(err.contains("states[0].position"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    // A writer whose shape disagrees with its data refuses before it writes.
    let err = TensorWriter::new()
        .i64("x", &[3], &[1, 2])
        .write(&file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    for name in ["x", "__metadata__"] {
        let err = TensorWriter::new()
            .i64("x", &[1], &[1])
            .i64(name, &[1], &[2])
            .write(&file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already taken") || err.contains("reserved"),
            "{err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), saved);
    }
    // Restoring: the file's config and tokenizer fingerprint must be this layer's.
    let f = engram::tensors::TensorFile::open(&file).unwrap();
    let meta = f.metadata().clone();
    let (hist, conv, pos) = (
        f.i64("ngram_history", None).unwrap(),
        f.f32("conv_history", None).unwrap(),
        f.i64("position", None).unwrap(),
    );
    let edited = |key: &str, value: String| {
        let p = tmp("states-edited.safetensors");
        let mut w = TensorWriter::new();
        w.i64("ngram_history", &hist.shape, &hist.data)
            .f32("conv_history", &conv.shape, &conv.data)
            .i64("position", &pos.shape, &pos.data);
        for (k, v) in &meta {
            w.meta(k, if k == key { value.clone() } else { v.clone() });
        }
        w.write(&p).unwrap();
        engram::state_io::load_states(&p, &e)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let cfg = meta["engram_config"].replace("\"pad_id\": 2", "\"pad_id\": 0");
    assert_ne!(cfg, meta["engram_config"]);
    let err = edited("engram_config", cfg);
    assert!(err.contains("pad_id 0"), "{err}");
    let err = edited("engram_compression", "5 canonical ids, sha256 00".into());
    assert!(err.contains("a tokenizer of 5 canonical ids"), "{err}");
    assert_eq!(engram::state_io::load_states(&file, &e).unwrap().len(), 2);
    // A tensor a state file does not hold (it was ignored).
    let extra = tmp("states-extra.safetensors");
    let mut w = TensorWriter::new();
    w.i64("ngram_history", &hist.shape, &hist.data)
        .f32("conv_history", &conv.shape, &conv.data)
        .i64("position", &pos.shape, &pos.data)
        .i64("foo", &[1], &[7]);
    for (k, v) in &meta {
        w.meta(k, v.clone());
    }
    w.write(&extra).unwrap();
    let err = engram::state_io::load_states(&extra, &e)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `foo`") && err.contains("extra"),
        "{err}"
    );
    // A position that its history contradicts: fewer tokens read than the history holds
    // leaves pads and zero conv rows at its start.
    let pad = fresh.ngram_history()[0];
    let ring = fresh.conv_history();
    let width = 4096; // HC·D of the default layer, whose R = (kernel_size - 1)·N = 9 rows
    assert_eq!(ring.len(), 9 * width);
    let with = |hist: Vec<i64>, conv: Vec<f32>, position: u64| {
        let p = tmp("states-position.safetensors");
        let st = vec![
            e.new_state(),
            engram::EngramState::from_parts(hist, conv, width, position),
        ];
        engram::state_io::save_states(&p, &e, &st).unwrap();
        engram::state_io::load_states(&p, &e).map(|s| s.len())
    };
    let zeros = vec![0.0f32; ring.len()];
    assert_eq!(with(vec![pad, pad], zeros.clone(), 0).unwrap(), 2);
    let err = with(vec![pad, 5], zeros.clone(), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ngram_history[1, 1]") && err.contains("position 0"),
        "{err}"
    );
    assert_eq!(with(vec![pad, 5], zeros.clone(), 1).unwrap(), 2);
    let mut late_row = zeros.clone();
    late_row[8 * width + 3] = 0.5;
    let err = with(vec![pad, 5], late_row.clone(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ngram_history[1, 1]"), "{err}");
    let err = with(vec![pad, pad], late_row.clone(), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conv_history[1, 8, 3]") && err.contains("0.5"),
        "{err}"
    );
    assert_eq!(with(vec![pad, 5], late_row, 1).unwrap(), 2);
}

/// A header whose tensors each pass `safetensors`' checked per-tensor validation, but whose
/// offsets end near 2^64: the crate's own end check would overflow (a panic in this test
/// profile, which has overflow checks). Refused with the tensor named instead.
#[test]
fn data_offsets_past_the_file_are_refused_before_they_overflow() {
    let step: u64 = (1 << 61) - 1;
    let mut header = serde_json::Map::new();
    for k in 0..8u64 {
        header.insert(
            format!("t{k}"),
            serde_json::json!({"dtype": "U8", "shape": [step], "data_offsets": [k * step, (k + 1) * step]}),
        );
    }
    let json = serde_json::Value::Object(header).to_string().into_bytes();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&json);
    bytes.extend([0u8; 16]);
    let Err(e) = engram::tensors::TensorFile::from_bytes("crafted.safetensors", bytes) else {
        panic!("a header past the file was accepted");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("crafted.safetensors") && msg.contains("data_offsets") && msg.contains("`t"),
        "{msg}"
    );
}

/// A safetensors file from a header written as JSON text (so that a name can appear twice)
/// and `data` zero bytes after it, opened from bytes; the error's text.
fn crafted_header_error(header: &str, data: usize) -> String {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; data]);
    match engram::tensors::TensorFile::from_bytes("crafted.safetensors", bytes) {
        Ok(_) => panic!("accepted: {header}"),
        Err(e) => e.to_string(),
    }
}

/// Each malformed entry of a header is named with what was expected and what was found
/// (the `safetensors` crate says "invalid shape, data type, or offset for tensor" without a
/// name, and reports a duplicate name as another tensor's offset).
#[test]
fn malformed_header_entries_name_the_tensor_expected_and_found() {
    let cases: [(&str, usize, &[&str]); 9] = [
        // A shape whose non-zero dimensions overflow 64 bits, whatever the order of its zero:
        // no product of its dimensions computed later may overflow either.
        (
            r#"{"a":{"dtype":"F32","shape":[0,9223372036854775808,9223372036854775808],"data_offsets":[0,0]}}"#,
            0,
            &[
                "`a`",
                "non-zero dimensions multiply to a size that fits in 64 bits",
            ],
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[9223372036854775808,9223372036854775808,0],"data_offsets":[0,0]}}"#,
            0,
            &[
                "`a`",
                "non-zero dimensions multiply to a size that fits in 64 bits",
            ],
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            16,
            &["`a`", "once", "twice"],
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
            &["`a`", "spanning 12 bytes", "[3] of f32", "found 8"],
        ),
        (
            r#"{"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            &["`a`", "dtype", "F99"],
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#,
            8,
            &["`a`", "begin <= end", "[8, 0]"],
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            6,
            &[
                "`b`",
                "start at byte 4",
                "right after `a`",
                "found 2",
                "overlapping",
            ],
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            6,
            &["`a`", "start at byte 0", "found 2", "gap"],
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            6,
            &["`a`", "file's end", "6 bytes", "end at 4"],
        ),
    ];
    for (header, data, wanted) in cases {
        let msg = crafted_header_error(header, data);
        assert!(msg.starts_with("crafted.safetensors: "), "{msg}");
        for w in wanted {
            assert!(msg.contains(w), "{header}: `{w}` missing from: {msg}");
        }
    }
    // The frame: missing fields, no tensors but data, a header that is not a JSON object.
    for (header, data, wanted) in [
        (
            r#"{"a":{"shape":[2],"data_offsets":[0,8]}}"#,
            8,
            "tensor `a`: expected fields dtype, shape and data_offsets, found no `dtype`",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2]}}"#,
            8,
            "found no `data_offsets`",
        ),
        (r#"{"a":5}"#, 0, "found no `dtype`"),
        (
            r#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#,
            8,
            "found no `shape`",
        ),
        (
            r#"{}"#,
            4,
            "expected no data after a header without tensors, found 4 bytes",
        ),
        (r#"[1, 2]"#, 0, "expected a JSON object of tensors"),
        (r#"{"a":"#, 0, "expected a JSON object of tensors"),
    ] {
        let msg = crafted_header_error(header, data);
        assert!(msg.contains(wanted), "{header}: {msg}");
    }
    let raw_error = |bytes: Vec<u8>| match engram::tensors::TensorFile::from_bytes("raw.st", bytes)
    {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let msg = raw_error(vec![1, 2, 3]);
    assert!(
        msg.contains("raw.st") && msg.contains("at least 8 bytes") && msg.contains("found 3"),
        "{msg}"
    );
    let mut long = 1_000_000u64.to_le_bytes().to_vec();
    long.extend(b"{}");
    let msg = raw_error(long);
    assert!(
        msg.contains("at most the 2 bytes after it, found 1000000"),
        "{msg}"
    );
    let msg = raw_error((1u64 << 63).to_le_bytes().to_vec());
    assert!(
        msg.contains("at most 100000000 bytes, found 9223372036854775808"),
        "{msg}"
    );
    // A shape whose byte count overflows 64 bits.
    let msg = crafted_header_error(
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
        8,
    );
    assert!(msg.contains("`a`") && msg.contains("64 bits"), "{msg}");
    // Zero-sized tensors and a well-formed pair still open.
    let ok = r#"{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}}"#;
    let mut bytes = (ok.len() as u64).to_le_bytes().to_vec();
    bytes.extend(ok.as_bytes());
    bytes.extend([0u8; 12]);
    let f = engram::tensors::TensorFile::from_bytes("ok.safetensors", bytes).unwrap();
    assert_eq!(f.names().len(), 3);
}
