//! Row stores: every store gives the memory-mapped store's outputs bit for bit (direct I/O,
//! caches of one row, one page and more, across chunk boundaries); a table file truncated or
//! changed during a run is an error, never wrong rows; a cache never holds more than its budget.

mod common;
use common::*;
use engram::rows::cache::{CachedRows, SLOT_OVERHEAD};
use engram::rows::{parse_size, CachePolicy, RowStore, TableIo};
use engram::tensors::TensorFile;
use engram::v41::{config::V41Config, Checkpoint, TableOptions, V41Layer, V41Path};

fn v41(name: &str) -> std::path::PathBuf {
    golden(&format!("v41/{name}"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

struct Inputs {
    ids: Vec<i64>,
    hidden: Vec<f32>,
    mask: Vec<bool>,
}

fn inputs() -> Inputs {
    let f = TensorFile::open(v41("v41_small.cases.safetensors")).unwrap();
    Inputs {
        ids: f.i64("input_ids", None).unwrap().data,
        hidden: f.f32("hidden_states", None).unwrap().data,
        mask: f
            .raw("token_mask")
            .unwrap()
            .data()
            .iter()
            .map(|&m| m != 0)
            .collect(),
    }
}

fn layer_at(weights: &std::path::Path, opts: TableOptions) -> V41Layer {
    let cfg = V41Config::from_json_file(v41("v41_small.config.json")).unwrap();
    V41Layer::load_with(
        &cfg,
        compression(),
        &Checkpoint::open(weights).unwrap(),
        14,
        opts,
    )
    .unwrap()
}

#[test]
fn every_store_equals_the_mapped_one_bit_for_bit() {
    let x = inputs();
    let w = v41("v41_small.weights.safetensors");
    let base = layer_at(&w, TableOptions::default())
        .forward(
            &x.ids,
            &x.hidden,
            Some(&x.mask),
            2,
            30,
            true,
            V41Path::Fused,
            true,
        )
        .unwrap();
    // One V4.1 row (32 values, kept as bf16) and its bookkeeping.
    let row_bytes = 32 * 2 + SLOT_OVERHEAD;
    for (io, cache) in [
        (TableIo::Direct, None),
        (TableIo::Direct, Some(row_bytes)), // one row
        (TableIo::Direct, Some(4096)),      // one page
        (TableIo::Direct, Some(64 << 10)),  // most of the touched rows
        (TableIo::Mmap, Some(row_bytes)),
    ] {
        let l = layer_at(
            &w,
            TableOptions {
                io,
                cache_bytes: cache,
                ..Default::default()
            },
        );
        for path in [V41Path::Reference, V41Path::Fused] {
            let s = l
                .forward(&x.ids, &x.hidden, Some(&x.mask), 2, 30, true, path, true)
                .unwrap();
            assert_eq!(
                bits(s.embeddings.as_ref().unwrap()),
                bits(base.embeddings.as_ref().unwrap()),
                "{io:?} {cache:?} {path:?}"
            );
            assert_eq!(
                bits(&s.output),
                bits(&base.output),
                "{io:?} {cache:?} {path:?}"
            );
            // Across chunk boundaries (7 tokens at a time), with the same store.
            let mut st = vec![l.new_state(), l.new_state()];
            let off = [0, 30, 60];
            let c = l
                .forward_chunked(
                    &mut st,
                    &x.ids,
                    &x.hidden,
                    Some(&x.mask),
                    &off,
                    7,
                    true,
                    path,
                    false,
                )
                .unwrap();
            assert_eq!(
                bits(&c.output),
                bits(&base.output),
                "{io:?} {cache:?} {path:?} chunked"
            );
        }
        let stats = l.weights().table.stats();
        assert!(stats.misses > 0, "{io:?} {cache:?}: {stats:?}");
        if cache.is_some() {
            assert!(
                stats.hits > 0,
                "{io:?} {cache:?}: the second pass must hit: {stats:?}"
            );
        }
        if io == TableIo::Direct {
            assert!(stats.bytes_read > 0);
        }
    }
}

#[test]
fn a_cache_never_holds_more_than_its_budget() {
    let w = v41("v41_small.weights.safetensors");
    let inner = layer_at(&w, TableOptions::default())
        .weights()
        .table
        .clone();
    for budget in [0u64, 1, 127, 128, 4096, 10_000, 1 << 20] {
        let c = CachedRows::new(inner.clone(), budget).unwrap();
        let mut out = vec![0f32; 32];
        let mut want = vec![0f32; 32];
        for r in (0..inner.rows()).chain((0..inner.rows()).step_by(7)) {
            c.row_into(r, &mut out).unwrap();
            inner.row_into(r, &mut want).unwrap();
            assert_eq!(bits(&out), bits(&want), "row {r}");
            assert!(c.held_bytes() <= budget, "{} > {budget}", c.held_bytes());
        }
        let s = c.stats();
        assert_eq!(
            s.hits + s.misses,
            (inner.rows() + inner.rows().div_ceil(7)) as u64
        );
        assert!(
            c.row_into(inner.rows(), &mut [0f32; 32]).is_err(),
            "a row past the end is an error, through the cache too"
        );
    }
    // A budget far beyond the table buys at most every row, rounded up to a multiple of the
    // 64 shards (it would otherwise size the cache's index for rows that do not exist, or
    // abort), and holds the whole table: a second pass over every row only hits.
    for budget in [1u64 << 40, u64::MAX] {
        let c = CachedRows::new(inner.clone(), budget).unwrap();
        assert!(
            c.capacity_rows() <= inner.rows().div_ceil(64) * 64,
            "{}",
            c.capacity_rows()
        );
        let mut out = vec![0f32; 32];
        for _ in 0..2 {
            for r in 0..inner.rows() {
                c.row_into(r, &mut out).unwrap();
            }
        }
        assert_eq!(c.stats().misses, inner.rows() as u64, "budget {budget}");
    }
}

#[test]
fn a_table_file_truncated_or_changed_during_a_run_is_an_error() {
    let x = inputs();
    let dir = tmp_dir("rows-truncated");
    let w = dir.join("w.safetensors");
    std::fs::copy(v41("v41_small.weights.safetensors"), &w).unwrap();
    let l = layer_at(
        &w,
        TableOptions {
            io: TableIo::Direct,
            cache_bytes: None,
            ..Default::default()
        },
    );
    assert!(l
        .forward(
            &x.ids,
            &x.hidden,
            Some(&x.mask),
            2,
            30,
            true,
            V41Path::Reference,
            false
        )
        .is_ok());
    // Truncated: shorter than the table.
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = l
        .forward(
            &x.ids,
            &x.hidden,
            Some(&x.mask),
            2,
            30,
            true,
            V41Path::Reference,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.safetensors") && (e.contains("truncated") || e.contains("modified")),
        "{e}"
    );
    // Same length, other bytes, later modification time.
    std::fs::copy(v41("v41_small.weights.safetensors"), &w).unwrap();
    let l = layer_at(
        &w,
        TableOptions {
            io: TableIo::Direct,
            cache_bytes: None,
            ..Default::default()
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xFF;
    std::fs::write(&w, &bytes).unwrap();
    let e = l
        .forward(
            &x.ids,
            &x.hidden,
            Some(&x.mask),
            2,
            30,
            true,
            V41Path::Reference,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("modified since"), "{e}");
}

#[test]
fn sizes_parse_with_units_and_errors_name_the_text() {
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("2g").unwrap(), 2 << 30);
    assert_eq!(parse_size("64k").unwrap(), 64 << 10);
    assert_eq!(parse_size("1000").unwrap(), 1000);
    assert!(parse_size("12Q").unwrap_err().to_string().contains("12Q"));
    assert!(parse_size("99999999999T").is_err());
    assert!("direct".parse::<TableIo>().is_ok() && "disk".parse::<TableIo>().is_err());
    assert_eq!("ram".parse::<TableIo>().unwrap(), TableIo::Ram);
    let e = "fifo".parse::<CachePolicy>().unwrap_err().to_string();
    assert!(e.contains("fifo") && e.contains("s3fifo"), "{e}");
}

/// Sequences many tiles long (the store's gathers run ahead of compute on their own thread):
/// every store, every cache policy and size, decode steps too, bit for bit equal to the
/// memory-mapped table; the cache stays within its budget.
#[test]
fn tiles_gathered_ahead_equal_the_mapped_table() {
    use engram::{DType, Engram, ForwardPath};
    let cfg = small_config();
    let w = golden("small.weights.safetensors");
    let base = Engram::load(cfg.clone(), &w).unwrap();
    let (b, l) = (3, 700);
    let vocab = base.hashing().compressed().num_raw() as u64;
    let mut x = 0x2545F4914F6CDD1Du64;
    let ids: Vec<i64> = (0..b * l)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Repeats, as text has: every third token from a small set.
            if i % 3 == 0 {
                (x % 50) as i64
            } else {
                (x % vocab) as i64
            }
        })
        .collect();
    let c = cfg.hc_mult * cfg.hidden_size;
    let hidden: Vec<f32> = (0..b * l * c)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let row = cfg.head_dim() as u64;
    let mut cases = vec![
        TableOptions {
            io: TableIo::Direct,
            io_depth: Some(3),
            ..Default::default()
        },
        TableOptions {
            io: TableIo::Ram,
            ..Default::default()
        },
    ];
    for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
        // Nothing (a pass-through), one row (f32 values and bookkeeping), four, a page and
        // ~500 rows (shards of several rows: the policies' queues really evict).
        let slot = row * 4 + SLOT_OVERHEAD;
        for cache in [1, slot, 4 * slot, 4096, 200 << 10] {
            cases.push(TableOptions {
                io: TableIo::Direct,
                cache_bytes: Some(cache),
                cache_policy: policy,
                io_depth: None,
                ..Default::default()
            });
        }
        cases.push(TableOptions {
            io: TableIo::Ram,
            cache_bytes: Some(4096),
            cache_policy: policy,
            io_depth: None,
            ..Default::default()
        });
    }
    for dtype in [DType::F32, DType::Bf16] {
        let b0 = base.clone().with_dtype(dtype);
        let want = b0.forward(&ids, &hidden, b, l, ForwardPath::Fused).unwrap();
        // Decode: five steps of all three sequences after a prefill of l - 5.
        let mut st0: Vec<_> = (0..b).map(|_| b0.new_state()).collect();
        let steps = |e: &Engram, st: &mut Vec<engram::EngramState>| -> Vec<u32> {
            let mut out = Vec::new();
            for t in l - 5..l {
                let sid: Vec<i64> = (0..b).map(|s| ids[s * l + t]).collect();
                let sh: Vec<f32> = (0..b)
                    .flat_map(|s| hidden[(s * l + t) * c..(s * l + t + 1) * c].to_vec())
                    .collect();
                let offs: Vec<usize> = (0..=b).collect();
                let r = e
                    .forward_ragged(st, &sid, &sh, &offs, ForwardPath::Fused)
                    .unwrap();
                out.extend(bits(&r.output));
            }
            out
        };
        let want_steps = steps(&b0, &mut st0);
        for opts in &cases {
            let e = Engram::load_with_table(cfg.clone(), &w, opts.clone())
                .unwrap()
                .with_dtype(dtype);
            let got = e.forward(&ids, &hidden, b, l, ForwardPath::Fused).unwrap();
            assert_eq!(got.hash_ids, want.hash_ids, "{opts:?}");
            assert_eq!(bits(&got.output), bits(&want.output), "{opts:?} {dtype:?}");
            assert_eq!(bits(&got.gates), bits(&want.gates), "{opts:?} {dtype:?}");
            let mut st: Vec<_> = (0..b).map(|_| e.new_state()).collect();
            assert_eq!(steps(&e, &mut st), want_steps, "{opts:?} {dtype:?} decode");
            if opts.cache_bytes.is_some() {
                let s = e.weights().table.store().unwrap();
                let held = format!("{s:?}");
                assert!(held.contains(&format!("{:?}", opts.cache_policy)), "{held}");
            }
            if opts.io == TableIo::Direct {
                let s = e.weights().table.store_stats().unwrap();
                assert!(s.reads > 0 && s.io_depth_mean() >= 1.0, "{opts:?}: {s:?}");
            }
        }
    }
}

/// The demo layer over the same stores: every golden case, both paths, f32 and bf16, bit for
/// bit equal to the memory-mapped table.
#[test]
fn demo_layer_over_every_store_equals_the_mapped_table() {
    use engram::rows::TableOptions;
    use engram::{DType, Engram, ForwardPath};
    let f = TensorFile::open(golden("small.stages.safetensors")).unwrap();
    let cfg = small_config();
    let w = golden("small.weights.safetensors");
    let base = Engram::load(cfg.clone(), &w).unwrap();
    for opts in [
        TableOptions {
            io: TableIo::Direct,
            cache_bytes: None,
            ..Default::default()
        },
        TableOptions {
            io: TableIo::Direct,
            cache_bytes: Some(64 * 4 + SLOT_OVERHEAD),
            ..Default::default()
        }, // one row
        TableOptions {
            io: TableIo::Mmap,
            cache_bytes: Some(4096),
            ..Default::default()
        },
        TableOptions {
            io: TableIo::Direct,
            cache_bytes: Some(1 << 20),
            ..Default::default()
        },
    ] {
        let e = Engram::load_with_table(cfg.clone(), &w, opts.clone()).unwrap();
        assert!(e.weights().table.is_store());
        for dtype in [DType::F32, DType::Bf16] {
            let (b0, e0) = (base.clone().with_dtype(dtype), e.clone().with_dtype(dtype));
            for case in ["seed_text", "batch2", "long"] {
                let ids = f.i64(&format!("{case}.input_ids"), None).unwrap();
                let (b, l) = (ids.shape[0], ids.shape[1]);
                let h = f.f32(&format!("{case}.hidden_states"), None).unwrap().data;
                for path in [ForwardPath::Reference, ForwardPath::Fused] {
                    if dtype == DType::Bf16 && path == ForwardPath::Reference {
                        continue; // the reference path reads the table as loaded
                    }
                    let want = b0.forward(&ids.data, &h, b, l, path).unwrap();
                    let got = e0.forward(&ids.data, &h, b, l, path).unwrap();
                    assert_eq!(got.hash_ids, want.hash_ids);
                    assert_eq!(
                        bits(&got.output),
                        bits(&want.output),
                        "{opts:?} {dtype:?} {case} {path:?}"
                    );
                }
            }
        }
        let s = e.weights().table.store_stats().unwrap();
        assert!(s.misses > 0, "{opts:?}: {s:?}");
    }
}

/// A direct store opens the very file the checkpoint mapped: one put at its path since (a
/// rename over it) is refused, not read at the old file's offsets.
#[test]
fn a_table_file_replaced_before_the_direct_store_opens_is_refused() {
    let dir = tmp_dir("rows-replaced");
    let w = dir.join("w.safetensors");
    std::fs::copy(v41("v41_small.weights.safetensors"), &w).unwrap();
    let ck = Checkpoint::open(&w).unwrap();
    let other = dir.join("other.safetensors");
    std::fs::copy(v41("v41_small.weights.safetensors"), &other).unwrap();
    std::fs::rename(&other, &w).unwrap();
    let cfg = V41Config::from_json_file(v41("v41_small.config.json")).unwrap();
    let opts = TableOptions {
        io: TableIo::Direct,
        cache_bytes: None,
        ..Default::default()
    };
    let e = V41Layer::load_with(&cfg, compression(), &ck, 14, opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another file"), "{e}");
}

/// The V4.1 layer over more than one tile (later tiles gathered ahead): direct I/O and
/// every cache policy equal the memory-mapped table bit for bit, dead spans included.
#[test]
fn v41_tiles_gathered_ahead_equal_the_mapped_table() {
    let x = inputs();
    let w = v41("v41_small.weights.safetensors");
    // The golden 2 × 30 tokens repeated: 2 × 300 rows, three tiles of 256.
    let reps = 10;
    let (b, l0) = (2, 30);
    let c = x.hidden.len() / (b * l0);
    let mut ids = Vec::new();
    let mut hidden = Vec::new();
    let mut mask = Vec::new();
    for s in 0..b {
        for _ in 0..reps {
            ids.extend_from_slice(&x.ids[s * l0..(s + 1) * l0]);
            hidden.extend_from_slice(&x.hidden[s * l0 * c..(s + 1) * l0 * c]);
            mask.extend_from_slice(&x.mask[s * l0..(s + 1) * l0]);
        }
    }
    let l = l0 * reps;
    let run = |opts: TableOptions| {
        layer_at(&w, opts)
            .forward(&ids, &hidden, Some(&mask), b, l, true, V41Path::Fused, true)
            .unwrap()
    };
    let base = run(TableOptions::default());
    for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
        for (io, cache) in [
            (TableIo::Direct, Some(1)),
            (TableIo::Direct, Some(8 << 10)),
            (TableIo::Direct, Some(2000 * (32 * 2 + SLOT_OVERHEAD))), // 64 shards of 31
            (TableIo::Ram, Some(4096)),
        ] {
            let got = run(TableOptions {
                io,
                cache_bytes: cache,
                cache_policy: policy,
                io_depth: None,
                ..Default::default()
            });
            assert_eq!(
                bits(got.embeddings.as_ref().unwrap()),
                bits(base.embeddings.as_ref().unwrap()),
                "{io:?} {cache:?} {policy:?}"
            );
            assert_eq!(bits(&got.output), bits(&base.output), "{io:?} {policy:?}");
        }
    }
}

/// A table file truncated under a run whose tiles are gathered ahead: an error naming the
/// file from the call, never rows of zeros.
#[test]
fn a_truncated_table_fails_a_run_gathered_ahead() {
    use engram::{Engram, ForwardPath};
    let dir = tmp_dir("rows-truncated-ahead");
    let w = dir.join("w.safetensors");
    std::fs::copy(golden("small.weights.safetensors"), &w).unwrap();
    let cfg = small_config();
    let e = Engram::load_with_table(
        cfg.clone(),
        &w,
        TableOptions {
            io: TableIo::Direct,
            ..Default::default()
        },
    )
    .unwrap();
    let (b, l) = (2, 600);
    let ids: Vec<i64> = (0..b * l).map(|i| (i * 37 % 1000) as i64).collect();
    let hidden = vec![0.5f32; b * l * cfg.hc_mult * cfg.hidden_size];
    assert!(e.forward(&ids, &hidden, b, l, ForwardPath::Fused).is_ok());
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let err = e
        .forward(&ids, &hidden, b, l, ForwardPath::Fused)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("w.safetensors") && (err.contains("truncated") || err.contains("modified")),
        "{err}"
    );
}
