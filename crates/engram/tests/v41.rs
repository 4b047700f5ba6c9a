//! The DeepSeek-V4.1 layer against what the checkpoint's own reference code produced
//! (`testdata/golden/v41`, copied from shared/golden/v41): config spellings, the published
//! geometry, every stage of both layers on both paths, chunking, dead spans across chunks,
//! sharded checkpoints, a sparse real-size table, and the errors.

mod common;
use common::*;
use engram::tensors::TensorFile;
use engram::v41::{
    config::V41Config, fp8, hashing::layer_params, Checkpoint, V41Layer, V41Path, DEAD,
};

fn v41(name: &str) -> std::path::PathBuf {
    golden(&format!("v41/{name}"))
}

fn cfg() -> V41Config {
    V41Config::from_json_file(v41("v41_small.config.json")).unwrap()
}

fn layer(l: u64) -> V41Layer {
    let ck = Checkpoint::open(v41("v41_small.weights.safetensors")).unwrap();
    V41Layer::load(&cfg(), compression(), &ck, l).unwrap()
}

struct Case {
    ids: Vec<i64>,
    hidden: Vec<f32>,
    mask: Vec<bool>,
    b: usize,
    l: usize,
}

fn case() -> (TensorFile, Case) {
    let f = TensorFile::open(v41("v41_small.cases.safetensors")).unwrap();
    let ids = f.i64("input_ids", Some(&[2, 30])).unwrap().data;
    let hidden = f.f32("hidden_states", Some(&[2, 30, 4, 256])).unwrap().data;
    let raw = f.raw("token_mask").unwrap();
    let mask = raw.data().iter().map(|&m| m != 0).collect();
    (
        f,
        Case {
            ids,
            hidden,
            mask,
            b: 2,
            l: 30,
        },
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Count of values whose bits differ, and the largest difference in bf16 ulps.
fn ulps(got: &[f32], want: &[f32]) -> (usize, u32) {
    assert_eq!(got.len(), want.len());
    let mut same = 0;
    let mut worst = 0;
    for (a, b) in got.iter().zip(want) {
        let (x, y) = ((a.to_bits() >> 16) as i32, (b.to_bits() >> 16) as i32);
        let d = if (x < 0) == (y < 0) {
            (x - y).unsigned_abs()
        } else {
            u32::MAX
        };
        if a.to_bits() == b.to_bits() {
            same += 1;
        }
        worst = worst.max(if a == b { 0 } else { d.min(1 << 16) });
    }
    (got.len() - same, worst)
}

#[test]
fn config_spellings_and_published_geometry() {
    let c = cfg();
    assert_eq!(
        (c.dim, c.hc_mult, c.columns(), c.memory_width()),
        (256, 4, 6, 192)
    );
    let text = std::fs::read_to_string(v41("v41_small.config.json")).unwrap();
    let hf = text
        .replace("\"dim\"", "\"hidden_size\"")
        .replace("\"norm_eps\"", "\"rms_norm_eps\"")
        .replace("\"engram_pad_id\"", "\"engram_pad_token_id\"");
    assert_eq!(V41Config::from_json_str(&hf).unwrap(), c);
    // The published V4.1 geometry, from the config alone.
    let real = V41Config::from_json_str(
        r#"{"dim": 5120, "hc_mult": 4, "norm_eps": 1e-20, "engram_layer_ids": [1, 14],
        "engram_vocab_size": 16000000, "engram_num_embeddings": [384006168, 384016682],
        "engram_max_ngram_size": 4, "engram_pad_id": 2, "engram_compressed_vocab_size": 99092,
        "engram_n_heads": 8, "engram_head_dim": 256}"#,
    )
    .unwrap();
    let f = TensorFile::open(v41("v41_small.cases.safetensors")).unwrap();
    for (p, l) in layer_params(&real).unwrap().iter().zip([1, 14]) {
        let primes: Vec<i64> = p.params.head_sizes().iter().map(|&x| x as i64).collect();
        assert_eq!(
            primes,
            f.i64(&format!("real.l{l}.primes"), None).unwrap().data
        );
        assert_eq!(
            p.offsets,
            f.i64(&format!("real.l{l}.offsets"), None).unwrap().data
        );
        assert_eq!(
            p.params.multipliers,
            f.i64(&format!("real.l{l}.multipliers"), None).unwrap().data
        );
    }
    for (p, l) in layer_params(&c).unwrap().iter().zip([1, 14]) {
        let primes: Vec<i64> = p.params.head_sizes().iter().map(|&x| x as i64).collect();
        assert_eq!(primes, f.i64(&format!("l{l}.primes"), None).unwrap().data);
        assert_eq!(
            p.offsets,
            f.i64(&format!("l{l}.offsets"), None).unwrap().data
        );
        assert_eq!(
            p.params.multipliers,
            f.i64(&format!("l{l}.multipliers"), None).unwrap().data
        );
    }
}

#[test]
fn every_stage_of_both_layers_on_both_paths() {
    let (f, c) = case();
    for l in [1u64, 14] {
        let layer = layer(l);
        for path in [V41Path::Reference, V41Path::Fused] {
            let s = layer
                .forward(&c.ids, &c.hidden, Some(&c.mask), c.b, c.l, true, path, true)
                .unwrap();
            let tag = format!("layer {l} {path:?}");
            assert_eq!(
                s.hash_ids,
                f.i64(&format!("l{l}.hash_ids"), None).unwrap().data,
                "{tag} hash_ids"
            );
            let emb = f.f32(&format!("l{l}.embeddings"), None).unwrap().data;
            assert_eq!(
                bits(s.embeddings.as_ref().unwrap()),
                bits(&emb),
                "{tag} embeddings"
            );
            let kv = f.f32(&format!("l{l}.kv"), None).unwrap().data;
            let (same_kv, ulp_kv) = ulps(s.kv.as_ref().unwrap(), &kv);
            let gates = f.f32(&format!("l{l}.gates"), None).unwrap().data;
            let (gerr, _) = max_abs_diff(&s.gates, &gates);
            let out = f.f32(&format!("l{l}.output"), None).unwrap().data;
            let (same_out, ulp_out) = ulps(&s.output, &out);
            let (oerr, _) = max_abs_diff(&s.output, &out);
            println!(
                "v41 {tag}: hash_ids exact, embeddings exact, kv {same_kv} of {} differ (max {ulp_kv} ulp), gates max |err| {gerr:.2e}, output {same_out} of {} differ (max {ulp_out} bf16 ulp, max |err| {oerr:.2e})",
                kv.len(),
                out.len()
            );
            assert!(ulp_kv <= 1, "{tag} kv off by {ulp_kv} ulp");
            assert!(gerr <= 1e-3, "{tag} gates {gerr}");
            // Within 2^-6 relative: a bf16 output differs by at most 2 ulps.
            assert!(ulp_out <= 2, "{tag} output off by {ulp_out} ulp");
            // Dead tokens: gate 0 and the hidden state back bit for bit.
            for (t, &alive) in c.mask.iter().enumerate() {
                if !alive {
                    assert!(s.gates[t * 4..t * 4 + 4].iter().all(|&g| g == 0.0));
                    assert_eq!(
                        bits(&s.output[t * 1024..(t + 1) * 1024]),
                        bits(&c.hidden[t * 1024..(t + 1) * 1024])
                    );
                }
            }
        }
    }
}

/// Random chunk splits (dead spans crossing chunk boundaries included) equal one shot, on
/// both paths; the reference's own hash cache agreed for 1+29, 9+1+1+19, 7+7+7+9.
#[test]
fn chunked_equals_one_shot() {
    let (_, c) = case();
    let layer = layer(14);
    let w = 4 * 256;
    for path in [V41Path::Reference, V41Path::Fused] {
        let whole = layer
            .forward(
                &c.ids,
                &c.hidden,
                Some(&c.mask),
                c.b,
                c.l,
                true,
                path,
                false,
            )
            .unwrap();
        let mut seed = 0x2545F4914F6CDD1Du64;
        for splits in [
            vec![1, 29],
            vec![9, 1, 1, 19],
            vec![7, 7, 7, 9],
            vec![8, 3, 19],
        ]
        .into_iter()
        .chain((0..4).map(|_| {
            // A random split of 30.
            let mut v = Vec::new();
            let mut left = 30;
            while left > 0 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = 1 + (seed % left as u64) as usize;
                v.push(n);
                left -= n;
            }
            v
        })) {
            for s in 0..c.b {
                let mut st = layer.new_state();
                let mut at = 0;
                let mut hashes = Vec::new();
                let mut out = Vec::new();
                for &n in &splits {
                    let r = s * c.l + at;
                    let part = layer
                        .forward_ragged(
                            std::slice::from_mut(&mut st),
                            &c.ids[r..r + n],
                            &c.hidden[r * w..(r + n) * w],
                            Some(&c.mask[r..r + n]),
                            &[0, n],
                            true,
                            path,
                            false,
                        )
                        .unwrap();
                    hashes.extend(part.hash_ids);
                    out.extend(part.output);
                    at += n;
                }
                assert_eq!(
                    hashes,
                    whole.hash_ids[s * 30 * 6..(s + 1) * 30 * 6],
                    "{splits:?}"
                );
                assert_eq!(
                    bits(&out),
                    bits(&whole.output[s * 30 * w..(s + 1) * 30 * w]),
                    "{path:?} {splits:?}"
                );
                assert_eq!(st.position, 30);
            }
        }
    }
}

#[test]
fn sharded_checkpoint_reads_the_same_and_names_missing_keys() {
    let dir = tmp_dir("v41-sharded");
    let src = TensorFile::open(v41("v41_small.weights.safetensors")).unwrap();
    // Two shards by layer, written with the safetensors crate from the raw bytes.
    let mut index = serde_json::Map::new();
    for (shard, l) in [
        ("model-00001-of-00002.safetensors", 1),
        ("model-00002-of-00002.safetensors", 14),
    ] {
        let names: Vec<String> = src
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&format!("layers.{l}.")))
            .collect();
        let raws: Vec<_> = names.iter().map(|n| src.raw(n).unwrap()).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
            .iter()
            .zip(&raws)
            .map(|(n, r)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), r.data())
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(shard)).unwrap();
        for n in names {
            index.insert(n, serde_json::Value::String(shard.into()));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": index}).to_string(),
    )
    .unwrap();
    let (_, c) = case();
    let ck = Checkpoint::open(&dir).unwrap();
    let from_shards = V41Layer::load(&cfg(), compression(), &ck, 14).unwrap();
    let a = from_shards
        .forward(
            &c.ids,
            &c.hidden,
            Some(&c.mask),
            2,
            30,
            true,
            V41Path::Reference,
            false,
        )
        .unwrap();
    let b = layer(14)
        .forward(
            &c.ids,
            &c.hidden,
            Some(&c.mask),
            2,
            30,
            true,
            V41Path::Reference,
            false,
        )
        .unwrap();
    assert_eq!(bits(&a.output), bits(&b.output));
    // A key the index lacks, and a shard that lost a key.
    let mut text = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    text = text.replace(
        "\"layers.14.engram.q_weight\"",
        "\"layers.14.engram.q_weight_gone\"",
    );
    std::fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
    let e =
        V41Layer::load(&cfg(), compression(), &Checkpoint::open(&dir).unwrap(), 14).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("layers.14.engram.q_weight") && msg.contains("index.json"),
        "{msg}"
    );
    // A weight_map that is there but a list: said so, not "no weight_map".
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": []}"#,
    )
    .unwrap();
    let Err(e) = Checkpoint::open(&dir) else {
        panic!("a list as weight_map accepted");
    };
    assert!(e.to_string().contains("a weight_map that is a list"), "{e}");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}"#,
    )
    .unwrap();
    let Err(e) = Checkpoint::open(&dir) else {
        panic!("a key given twice accepted");
    };
    assert!(e.to_string().contains("key `weight_map.a`"), "{e}");
}

/// A table of the real shape `[384006168, 256]` (+ scales) as a sparse file of a few MB:
/// opens at once, reads back the written rows, and touching a row maps in only that row.
#[test]
fn sparse_real_size_table_reads_back_written_rows() {
    let rows: usize = 384_006_168;
    let dir = tmp_dir("v41-sparse");
    let path = dir.join("table.safetensors");
    let wname = "layers.1.engram.embed.weight";
    let sname = "layers.1.engram.embed.scale";
    let wbytes = rows * 256;
    let header = serde_json::json!({
        wname: {"dtype": "F8_E4M3", "shape": [rows, 256], "data_offsets": [0, wbytes]},
        sname: {"dtype": "F8_E8M0", "shape": [rows, 8], "data_offsets": [wbytes, wbytes + rows * 8]},
    })
    .to_string();
    let mut h = header.into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let base = 8 + h.len() as u64;
    f.set_len(base + (wbytes + rows * 8) as u64).unwrap();
    let probe = [0usize, 1, 123_456_789, rows - 1];
    for (i, &r) in probe.iter().enumerate() {
        let codes: Vec<u8> = (0..256).map(|j| ((j * 7 + i * 13) % 0x7E) as u8).collect();
        f.seek(SeekFrom::Start(base + (r * 256) as u64)).unwrap();
        f.write_all(&codes).unwrap();
        f.seek(SeekFrom::Start(base + (wbytes + r * 8) as u64))
            .unwrap();
        f.write_all(&[120 + i as u8; 8]).unwrap();
    }
    drop(f);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            on_disk < 64 << 20,
            "the test file is sparse ({on_disk} bytes on disk)"
        );
    }
    let rss = || -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/statm").ok()?;
        Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4096)
    };
    let before = rss();
    let ck = Checkpoint::open(&path).unwrap();
    let table = fp8::Fp8Table::new(
        wname,
        ck.raw(wname).unwrap(),
        ck.raw(sname).unwrap(),
        rows,
        256,
    )
    .unwrap();
    let mut row = vec![0.0f32; 256];
    for (i, &r) in probe.iter().enumerate() {
        table.row_into(r, &mut row);
        let scale = 2f32.powi(120 + i as i32 - 127);
        for (j, &v) in row.iter().enumerate() {
            let code = ((j * 7 + i * 13) % 0x7E) as u8;
            assert_eq!(
                v,
                fp8::round_bf16(fp8::e4m3_to_f32(code) * scale),
                "row {r} col {j}"
            );
        }
    }
    table.row_into(777, &mut row);
    assert!(
        row.iter().all(|&v| v == 0.0),
        "an unwritten row reads as zeros"
    );
    if let (Some(a), Some(b)) = (before, rss()) {
        assert!(
            b.saturating_sub(a) < 64 << 20,
            "RSS grew by {} bytes",
            b - a
        );
    }
}

#[test]
fn errors_name_what_differs() {
    // The tokenizer's compression count must equal engram_compressed_vocab_size.
    let text = std::fs::read_to_string(v41("v41_small.config.json"))
        .unwrap()
        .replace("98627", "99092");
    let c = V41Config::from_json_str(&text).unwrap();
    let ck = Checkpoint::open(v41("v41_small.weights.safetensors")).unwrap();
    let msg = V41Layer::load(&c, compression(), &ck, 1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("98627") && msg.contains("99092") && msg.contains("--tokenizer"),
        "{msg}"
    );
    // engram_num_embeddings must be the sum of the layer's primes.
    let text = std::fs::read_to_string(v41("v41_small.config.json"))
        .unwrap()
        .replace("6126", "6127");
    let c = V41Config::from_json_str(&text).unwrap();
    let msg = layer_params(&c).unwrap_err().to_string();
    assert!(
        msg.contains("engram_num_embeddings[0]") && msg.contains("6126"),
        "{msg}"
    );
    // A layer the config does not carry.
    let msg = V41Layer::load(&cfg(), compression(), &ck, 3)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("[1, 14]"), "{msg}");
    // A dead token's id is never looked up; a live id outside the tokenizer is an error.
    let l = layer(1);
    let h = vec![0.5f32; 2 * 1024];
    assert!(l
        .forward(
            &[0, 99_999_999],
            &h,
            Some(&[true, false]),
            1,
            2,
            true,
            V41Path::Reference,
            false
        )
        .is_ok());
    let msg = l
        .forward(
            &[0, 99_999_999],
            &h,
            None,
            1,
            2,
            true,
            V41Path::Reference,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(msg.contains("input_ids[1]"), "{msg}");
    assert_eq!(l.new_state().history, vec![DEAD; 3]);
    // A negative id is not a token (dead tokens are marked by the mask, not by the id).
    let msg = l
        .forward(&[0, -5], &h, None, 1, 2, true, V41Path::Reference, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("input_ids[1]") && msg.contains("token_mask"),
        "{msg}"
    );
    // A call that fails leaves every state as it was (sequence 0 was fine, 1 was not).
    let mut st = vec![l.new_state(), l.new_state()];
    let before = st.clone();
    let h2 = vec![0.5f32; 4 * 1024];
    let e = l
        .forward_ragged(
            &mut st,
            &[0, 1, 2, 99_999_999],
            &h2,
            None,
            &[0, 2, 4],
            true,
            V41Path::Fused,
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("sequence 1"), "{e}");
    assert_eq!(st, before);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Any split of both sequences into chunks (dead spans falling anywhere relative to the
    /// cuts) gives the one-shot output bit for bit, on both paths.
    #[test]
    fn any_chunk_split_equals_one_shot(
        cuts in proptest::collection::vec(1usize..12, 1..12),
        fused in proptest::bool::ANY,
    ) {
        use std::sync::OnceLock;
        static L: OnceLock<V41Layer> = OnceLock::new();
        let layer = L.get_or_init(|| layer(1));
        let (_, c) = case();
        let path = if fused { V41Path::Fused } else { V41Path::Reference };
        let whole = layer.forward(&c.ids, &c.hidden, Some(&c.mask), 2, 30, true, path, false).unwrap();
        let mut splits = Vec::new();
        let mut left = 30;
        for n in cuts {
            if left == 0 { break; }
            let n = n.min(left);
            splits.push(n);
            left -= n;
        }
        if left > 0 { splits.push(left); }
        let w = 1024;
        for s in 0..2 {
            let mut st = layer.new_state();
            let mut at = 0;
            let mut out = Vec::new();
            for &n in &splits {
                let r = s * 30 + at;
                let part = layer.forward_ragged(std::slice::from_mut(&mut st), &c.ids[r..r + n],
                    &c.hidden[r * w..(r + n) * w], Some(&c.mask[r..r + n]), &[0, n], true, path, false).unwrap();
                out.extend(part.output);
                at += n;
            }
            proptest::prop_assert_eq!(bits(&out), bits(&whole.output[s * 30 * w..(s + 1) * 30 * w]));
        }
    }
}

/// A chunked call checks the whole call before its first chunk and works on copies of the
/// states: bad offsets, short inputs or a bad id in a later chunk give an error and leave
/// every state as it was; any chunk length, up to usize::MAX, gives the one-shot outputs.
#[test]
fn chunked_calls_fail_whole_and_take_any_chunk() {
    let (_, c) = case();
    let l = layer(1);
    let w = 4 * 256;
    let run = |st: &mut [engram::v41::V41State], ids: &[i64], offs: &[usize], chunk: usize| {
        let h = vec![0.25f32; ids.len() * w];
        l.forward_chunked(st, ids, &h, None, offs, chunk, true, V41Path::Fused, false)
    };
    // A bad id in the second chunk: the first chunk must not stay applied.
    let mut st = vec![l.new_state()];
    let e = run(&mut st, &[5, -1], &[0, 2], 1).unwrap_err().to_string();
    assert!(e.contains("input_ids"), "{e}");
    assert_eq!(st, vec![l.new_state()]);
    // Offsets not from 0, or decreasing: errors, not a silent empty output or a panic.
    for offs in [&[2usize, 2][..], &[0, 3, 2]] {
        let mut st = vec![l.new_state(); offs.len() - 1];
        let e = run(&mut st, &[5, 6], offs, 1).unwrap_err().to_string();
        assert!(e.contains("offsets"), "{offs:?}: {e}");
    }
    // Hidden states shorter than the ids.
    let mut st = vec![l.new_state()];
    let e = l
        .forward_chunked(
            &mut st,
            &[5, 6],
            &vec![0.25f32; w],
            None,
            &[0, 2],
            1,
            true,
            V41Path::Fused,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_states"), "{e}");
    // Any chunk length, the largest included, equals the one-shot call.
    let whole = l
        .forward(
            &c.ids,
            &c.hidden,
            Some(&c.mask),
            2,
            30,
            true,
            V41Path::Fused,
            false,
        )
        .unwrap();
    for chunk in [7, 30, usize::MAX] {
        let mut st = vec![l.new_state(); 2];
        let got = l
            .forward_chunked(
                &mut st,
                &c.ids,
                &c.hidden,
                Some(&c.mask),
                &[0, 30, 60],
                chunk,
                true,
                V41Path::Fused,
                false,
            )
            .unwrap();
        assert_eq!(bits(&got.output), bits(&whole.output), "chunk {chunk}");
        assert!(st.iter().all(|s| s.position == 30));
    }
}

/// States are checked where they enter: a history entry that is neither DEAD nor a
/// canonical id, a history of the wrong length (which would write a file no reader takes
/// over a good one), a file of another tokenizer's ids.
#[test]
fn states_are_checked_on_call_save_and_load() {
    let l = layer(1);
    let dir = tmp_dir("v41-states");
    let h = vec![0.25f32; 1024];
    // One token (id 5) on the fused path from `states`.
    let step = |states: &mut Vec<engram::v41::V41State>| {
        l.forward_ragged(states, &[5], &h, None, &[0, 1], true, V41Path::Fused, false)
    };
    let mut bad = vec![l.new_state()];
    bad[0].history[1] = 1_000_000_000_000_000;
    let e = step(&mut bad).unwrap_err().to_string();
    assert!(e.contains("states[0].history[1]"), "{e}");
    // A canonical id where a state at position 0 can only hold DEAD.
    let mut early = vec![l.new_state()];
    early[0].history[2] = 5;
    let e = step(&mut early).unwrap_err().to_string();
    assert!(
        e.contains("states[0].history[2]") && e.contains("DEAD") && e.contains("position 0"),
        "{e}"
    );
    early[0].position = 1;
    step(&mut early).unwrap();
    // Saving: a good file first, then a bad state must leave it intact.
    let file = dir.join("s.safetensors");
    let mut good = vec![l.new_state(); 2];
    l.forward_ragged(
        &mut good,
        &[5, 6],
        &vec![0.25f32; 2 * 1024],
        None,
        &[0, 1, 2],
        true,
        V41Path::Fused,
        false,
    )
    .unwrap();
    l.save_states(&file, &good).unwrap();
    let saved = std::fs::read(&file).unwrap();
    let mut short = good.clone();
    short[0].history.pop();
    short[1].history.push(7);
    let e = l.save_states(&file, &short).unwrap_err().to_string();
    assert!(e.contains("states[0].history"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    let mut far = good.clone();
    far[1].position = 1 << 63;
    let e = l.save_states(&file, &far).unwrap_err().to_string();
    assert!(e.contains("states[1].position"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), saved);
    assert_eq!(l.load_states(&file).unwrap(), good);
    assert_eq!(l.load_states_for(&file, 2).unwrap(), good);
    // A run of 3 sequences: refused from the header, naming the count.
    let e = l.load_states_for(&file, 3).unwrap_err().to_string();
    assert!(
        e.contains("tensor `position`") && e.contains("expected 3 states") && e.contains("[2]"),
        "{e}"
    );
    // Loading: an out-of-range history value, and another tokenizer's fingerprint.
    let f = TensorFile::open(&file).unwrap();
    let hist = f.i64("history", None).unwrap().data;
    let pos = f.i64("position", None).unwrap().data;
    let meta = f.metadata().clone();
    let write = |hist: &[i64], key: &str, value: &str| {
        let mut w = engram::tensors::TensorWriter::new();
        w.i64("history", &[2, 3], hist).i64("position", &[2], &pos);
        for (k, v) in &meta {
            w.meta(k, if k == key { value } else { v.as_str() });
        }
        let p = dir.join("edited.safetensors");
        w.write(&p).unwrap();
        l.load_states(&p).map(|_| ()).unwrap_err().to_string()
    };
    let mut wild = hist.clone();
    wild[4] = -5;
    let e = write(&wild, "", "");
    assert!(
        e.contains("states[1].history[1]") && e.contains("edited.safetensors"),
        "{e}"
    );
    let e = write(&hist, "engram_compression", "99092 canonical ids, sha256 0");
    assert!(e.contains("engram_compression"), "{e}");
    // `position` and `history` disagreeing on the count: `history` is named with both.
    let mut w = engram::tensors::TensorWriter::new();
    w.i64("history", &[2, 3], &hist)
        .i64("position", &[3], &[0, 0, 0]);
    for (k, v) in &meta {
        w.meta(k, v.as_str());
    }
    let p = dir.join("counts.safetensors");
    w.write(&p).unwrap();
    let e = l.load_states(&p).unwrap_err().to_string();
    assert!(
        e.contains("tensor `history`") && e.contains("[3, 3]") && e.contains("`position` is [3]"),
        "{e}"
    );
    // A tensor a state file does not hold (it was ignored).
    let mut w = engram::tensors::TensorWriter::new();
    w.i64("history", &[2, 3], &hist)
        .i64("position", &[2], &pos)
        .i64("extra", &[1], &[1]);
    for (k, v) in &meta {
        w.meta(k, v.as_str());
    }
    let p = dir.join("extra.safetensors");
    w.write(&p).unwrap();
    let e = l.load_states(&p).unwrap_err().to_string();
    assert!(
        e.contains("tensor `extra`") && e.contains("extra tensor"),
        "{e}"
    );
}

/// A dead token's output is formed as `h + 0·value`, as in the reference: -0.0 comes out
/// as +0.0.
#[test]
fn dead_tokens_add_a_zero_gated_value() {
    let l = layer(1);
    let mut h = vec![0.25f32; 2 * 1024];
    h[1024..].iter_mut().for_each(|x| *x = -0.0);
    for path in [V41Path::Reference, V41Path::Fused] {
        let out = l
            .forward(&[5, 6], &h, Some(&[true, false]), 1, 2, true, path, false)
            .unwrap();
        assert_eq!(out.gates[4..], [0.0; 4]);
        // +0.0 wherever the value is not negative (a negative value keeps -0.0: -0 + -0).
        assert!(out.output[1024..].iter().any(|x| x.to_bits() == 0));
        assert!(out.output[1024..].iter().all(|x| *x == 0.0));
    }
}

/// Primes that would sum past an int64 row id are a config error naming the base.
#[test]
fn a_base_too_large_for_int64_row_ids_is_refused() {
    let text = std::fs::read_to_string(v41("v41_small.config.json"))
        .unwrap()
        .replace(
            "\"engram_vocab_size\": 1000",
            "\"engram_vocab_size\": 4611686018427387903",
        );
    let c = V41Config::from_json_str(&text).unwrap();
    let e = layer_params(&c).unwrap_err().to_string();
    assert!(e.contains("engram_vocab_size") && e.contains("2^63"), "{e}");
    // One past the config's own bound: the message states the bound the value broke.
    let text = text.replace("4611686018427387903", "4611686018427387904");
    let e = V41Config::from_json_str(&text).unwrap_err().to_string();
    assert!(
        e.contains("engram_vocab_size") && e.contains("from 2 to 2^62 - 1"),
        "{e}"
    );
}

/// The error of one sequence of two tokens (ids 5, 6) on `path`, which must fail.
fn two_tokens_fail(l: &V41Layer, st: &mut [engram::v41::V41State], path: V41Path) -> String {
    l.forward_ragged(
        st,
        &[5, 6],
        &vec![0.25f32; 2 * 1024],
        None,
        &[0, 2],
        true,
        path,
        false,
    )
    .unwrap_err()
    .to_string()
}

/// NaN in a layer's weights is named where it is met, as in the demo layer: `q_weight`
/// (bf16), `wkv` codes (e4m3fn 0x7F) and scales (e8m0 0xFF) when the layer loads, a table
/// row's code when a token gathers it (the table stays unread until then: 100 GB in the
/// real model). They gave NaN outputs.
#[test]
fn nan_weights_are_named() {
    let dir = tmp_dir("v41-nan");
    let src = v41("v41_small.weights.safetensors");
    let f = TensorFile::open(&src).unwrap();
    // A copy of the checkpoint with `bytes` written over tensor `name`'s first bytes.
    let poisoned = |name: &str, bytes: &[u8]| {
        let (_, at) = f
            .raw(name)
            .unwrap()
            .location()
            .map(|(p, o)| (p.to_path_buf(), o))
            .unwrap();
        let mut all = std::fs::read(&src).unwrap();
        all[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, all).unwrap();
        p
    };
    let bf16_nan = half::bf16::NAN.to_le_bytes();
    for (name, bytes) in [
        ("layers.1.engram.q_weight", &bf16_nan[..]),
        ("layers.1.engram.k_weight", &bf16_nan[..]),
        ("layers.1.engram.wkv.weight", &[0x7F][..]),
        ("layers.1.engram.wkv.weight", &[0xFF][..]),
        ("layers.1.engram.wkv.scale", &[0xFF][..]),
    ] {
        let p = poisoned(name, bytes);
        let ck = Checkpoint::open(&p).unwrap();
        let Err(e) = V41Layer::load(&cfg(), compression(), &ck, 1) else {
            panic!("{name}: NaN accepted");
        };
        let e = e.to_string();
        assert!(
            e.contains(name) && e.contains("NaN") && e.contains("index 0"),
            "{e}"
        );
        // The other layer's tensors are untouched: it loads.
        V41Layer::load(&cfg(), compression(), &ck, 14).unwrap();
    }
    // Finite codes and scales whose product overflows (e8m0 0xFE = 2^127 on the first
    // block): infinite weights, NaN outputs; named at load.
    let p = poisoned("layers.1.engram.wkv.scale", &[0xFE]);
    let ck = Checkpoint::open(&p).unwrap();
    let Err(e) = V41Layer::load(&cfg(), compression(), &ck, 1) else {
        panic!("an overflowing wkv scale accepted");
    };
    let e = e.to_string();
    assert!(
        e.contains("layers.1.engram.wkv.weight (dequantised with wkv.scale)") && e.contains("inf"),
        "{e}"
    );
    // The largest finite scale under which the block's codes stay finite loads (2^100).
    let p = poisoned("layers.1.engram.wkv.scale", &[127 + 100]);
    V41Layer::load(&cfg(), compression(), &Checkpoint::open(&p).unwrap(), 1).unwrap();
    // Every wkv scale 2^118: finite weights whose projection passes f32's range. Both paths
    // refuse to write the inf / NaN that follow (they gave an all-NaN output, exit 0).
    let n = f.raw("layers.1.engram.wkv.scale").unwrap().data().len();
    let p = poisoned("layers.1.engram.wkv.scale", &vec![127 + 118; n]);
    let l = V41Layer::load(&cfg(), compression(), &Checkpoint::open(&p).unwrap(), 1).unwrap();
    for path in [V41Path::Fused, V41Path::Reference] {
        let mut st = vec![l.new_state()];
        let e = two_tokens_fail(&l, &mut st, path);
        assert!(
            e.contains("kv of token 0") && e.contains("past f32's range"),
            "{path:?}: {e}"
        );
        assert_eq!(st[0].position, 0, "the state is left as it was");
    }
    // Every code (or scale) of layer 1's table NaN: the first row gathered is named.
    let table = "layers.1.engram.embed.weight";
    for tensor in [table, "layers.1.engram.embed.scale"] {
        let bytes = f.raw(tensor).unwrap().data().len();
        let p = poisoned(tensor, &vec![0xFF; bytes]);
        let l = V41Layer::load(&cfg(), compression(), &Checkpoint::open(&p).unwrap(), 1).unwrap();
        let mut st = vec![l.new_state()];
        for path in [V41Path::Fused, V41Path::Reference] {
            let e = two_tokens_fail(&l, &mut st, path);
            assert!(
                e.contains(table) && e.contains("embed.scale") && e.contains("NaN"),
                "{tensor} {path:?}: {e}"
            );
        }
        assert_eq!(
            st[0].position, 0,
            "a failed call leaves the state as it was"
        );
    }
}
