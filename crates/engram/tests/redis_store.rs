//! The Redis Cluster row store against a live cluster (`ENGRAM_REDIS_CLUSTER=redis://HOST:PORT`;
//! `bash scripts/redis_cluster.sh start DIR` starts one; `.ci/run` does, and sets
//! `ENGRAM_REQUIRE_REDIS=1` so that a missing cluster fails instead of skipping): outputs bit
//! for bit those of the mapped table on the golden cases of both layers, with no, tiny and
//! large caches; an interrupted push resumes; a table that differs, or is incomplete, is
//! refused before any output.

mod common;
use common::*;
use engram::rows::cache::SLOT_OVERHEAD;
use engram::rows::redis::{self, RawRows, RedisOptions, RedisRows, TableId};
use engram::rows::{CachePolicy, RowStore, TableOptions};
use engram::tensors::TensorFile;
use engram::v41::{config::V41Config, Checkpoint, V41Layer, V41Path};
use engram::{DType, Engram, ForwardPath};

fn cluster() -> Option<String> {
    match std::env::var("ENGRAM_REDIS_CLUSTER") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("ENGRAM_REQUIRE_REDIS").as_deref() != Ok("1"),
                "ENGRAM_REQUIRE_REDIS=1 but ENGRAM_REDIS_CLUSTER is not set"
            );
            eprintln!("skipped: no Redis Cluster (set ENGRAM_REDIS_CLUSTER=redis://HOST:PORT)");
            None
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn store_opts(url: &str, cache: Option<u64>) -> TableOptions {
    TableOptions {
        cache_bytes: cache,
        cache_policy: CachePolicy::S3Fifo,
        store: Some(url.into()),
        store_options: RedisOptions {
            batch: 37, // several round trips per tile
            ..Default::default()
        },
        ..Default::default()
    }
}

fn demo_raw(w: &std::path::Path) -> (RawRows, TableId) {
    let cfg = small_config();
    let rows = mapping(&cfg).layer(cfg.layer_id).unwrap().table_rows() as usize;
    let f = TensorFile::open(w).unwrap();
    let raw = RawRows::dense(f.raw(engram::weights::TABLE).unwrap(), rows, cfg.head_dim()).unwrap();
    let id = TableId::new("demo", cfg.layer_id, &cfg.to_json_string(), &raw);
    (raw, id)
}

fn push_all(url: &str, raw: &RawRows, id: &TableId) {
    let r = redis::push(
        url,
        raw,
        id,
        &RedisOptions::default(),
        None,
        false,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(r.complete, "{r:?}");
    assert_eq!(r.table_digest.as_deref(), Some(id.table_digest.as_str()));
}

#[test]
fn both_layers_over_the_cluster_equal_the_mapped_table() {
    let Some(url) = cluster() else { return };
    // Demo layer: every golden case, f32 and bf16, both paths.
    let w = golden("small.weights.safetensors");
    let (raw, id) = demo_raw(&w);
    push_all(&url, &raw, &id);
    let cfg = small_config();
    let base = Engram::load(cfg.clone(), &w).unwrap();
    let f = TensorFile::open(golden("small.stages.safetensors")).unwrap();
    for cache in [None, Some(64 * 4 + SLOT_OVERHEAD), Some(1 << 20)] {
        let e = Engram::load_with_table(cfg.clone(), &w, store_opts(&url, cache)).unwrap();
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
                    assert_eq!(
                        bits(&got.output),
                        bits(&want.output),
                        "{cache:?} {dtype:?} {case} {path:?}"
                    );
                }
            }
        }
        let s = e.weights().table.store_stats().unwrap();
        assert!(s.misses > 0 && s.reads > 0, "{s:?}");
    }
    // Many tiles (the store is gathered ahead of compute).
    let (ids, hidden) = random_inputs(&cfg, 1500, 7);
    let want = base
        .forward(&ids, &hidden, 1, 1500, ForwardPath::Fused)
        .unwrap();
    let e = Engram::load_with_table(cfg.clone(), &w, store_opts(&url, Some(4096))).unwrap();
    let got = e
        .forward(&ids, &hidden, 1, 1500, ForwardPath::Fused)
        .unwrap();
    assert_eq!(bits(&got.output), bits(&want.output));

    // V4.1 layer: fp8 rows (codes + scales), dead spans, chunked.
    let v = golden("v41/v41_small.weights.safetensors");
    let vcfg = V41Config::from_json_file(golden("v41/v41_small.config.json")).unwrap();
    let ck = Checkpoint::open(&v).unwrap();
    let rows = vcfg.num_embeddings[vcfg.layer_index(14).unwrap()] as usize;
    let raw = RawRows::fp8(
        ck.raw("layers.14.engram.embed.weight").unwrap(),
        ck.raw("layers.14.engram.embed.scale").unwrap(),
        rows,
        vcfg.head_dim,
    )
    .unwrap();
    let id = TableId::new("deepseek-v4.1", 14, &format!("{vcfg:?}"), &raw);
    push_all(&url, &raw, &id);
    let cases = TensorFile::open(golden("v41/v41_small.cases.safetensors")).unwrap();
    let ids = cases.i64("input_ids", None).unwrap().data;
    let hidden = cases.f32("hidden_states", None).unwrap().data;
    let mask: Vec<bool> = cases
        .raw("token_mask")
        .unwrap()
        .data()
        .iter()
        .map(|&m| m != 0)
        .collect();
    let layer = |o: TableOptions| V41Layer::load_with(&vcfg, compression(), &ck, 14, o).unwrap();
    let base = layer(TableOptions::default());
    for cache in [None, Some(1), Some(1 << 20)] {
        let l = layer(store_opts(&url, cache));
        for path in [V41Path::Reference, V41Path::Fused] {
            let want = base
                .forward(&ids, &hidden, Some(&mask), 2, 30, true, path, true)
                .unwrap();
            let got = l
                .forward(&ids, &hidden, Some(&mask), 2, 30, true, path, true)
                .unwrap();
            assert_eq!(bits(&got.output), bits(&want.output), "{cache:?} {path:?}");
            let mut st = vec![l.new_state(), l.new_state()];
            let c = l
                .forward_chunked(
                    &mut st,
                    &ids,
                    &hidden,
                    Some(&mask),
                    &[0, 30, 60],
                    7,
                    true,
                    path,
                    false,
                )
                .unwrap();
            assert_eq!(
                bits(&c.output),
                bits(&want.output),
                "{cache:?} {path:?} chunked"
            );
        }
    }
}

#[test]
fn an_interrupted_push_resumes_and_another_table_is_refused() {
    let Some(url) = cluster() else { return };
    // Another table: the golden weights with one row changed (a fresh name in the store each
    // run, so the push really starts from zero).
    let dir = tmp_dir("redis-other-table");
    let w = dir.join("w.safetensors");
    let mut bytes = std::fs::read(golden("small.weights.safetensors")).unwrap();
    let (raw0, id0) = demo_raw(&golden("small.weights.safetensors"));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u32;
    {
        let f = TensorFile::open(golden("small.weights.safetensors")).unwrap();
        let (_, at) = f
            .raw(engram::weights::TABLE)
            .unwrap()
            .location()
            .map(|(p, a)| (p.to_path_buf(), a))
            .unwrap();
        // Row 5, first value: a run-unique f32.
        let v = 0.25f32 + (stamp % 1_000_000) as f32 * 1e-7;
        bytes[at as usize + 5 * 64 * 4..at as usize + 5 * 64 * 4 + 4]
            .copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&w, &bytes).unwrap();
    let (raw, id) = demo_raw(&w);
    assert_ne!(id.tid(), id0.tid(), "one changed value names another table");
    let o = RedisOptions::default();
    // Interrupted after 1,000 rows.
    let r = redis::push(&url, &raw, &id, &o, Some(1000), false, &mut |_, _, _| {}).unwrap();
    assert!(
        !r.complete && r.written == 1000 && r.resumed_from == 0,
        "{r:?}"
    );
    let cfg = small_config();
    let e = Engram::load_with_table(cfg.clone(), &w, store_opts(&url, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("incomplete") && e.contains("1000 of"), "{e}");
    // Resumed: starts at row 1,000, then checks every row.
    let mut phases = std::collections::BTreeSet::new();
    let r = redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, p| {
        phases.insert(p.to_string());
    })
    .unwrap();
    assert!(
        r.complete && r.resumed_from == 1000 && r.written == raw.rows() - 1000,
        "{r:?}"
    );
    assert!(phases.contains("writing") && phases.contains("checking"));
    // Pushing again writes nothing.
    let r = redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, _| {}).unwrap();
    assert_eq!((r.written, r.complete), (0, true));
    // The resumed table serves the changed file's rows, bit for bit.
    let base = Engram::load(cfg.clone(), &w).unwrap();
    let e = Engram::load_with_table(cfg.clone(), &w, store_opts(&url, None)).unwrap();
    let (ids, hidden) = random_inputs(&cfg, 300, 3);
    assert_eq!(
        bits(
            &e.forward(&ids, &hidden, 1, 300, ForwardPath::Fused)
                .unwrap()
                .output
        ),
        bits(
            &base
                .forward(&ids, &hidden, 1, 300, ForwardPath::Fused)
                .unwrap()
                .output
        )
    );
    // A table the store does not hold: refused at load, naming what it holds.
    let mut other = bytes.clone();
    let f = TensorFile::open(&w).unwrap();
    let at = f.raw(engram::weights::TABLE).unwrap().location().unwrap().1 as usize;
    other[at + 9 * 256..at + 9 * 256 + 4]
        .copy_from_slice(&(-1.5f32 - stamp as f32 * 1e-9).to_le_bytes());
    let w2 = dir.join("w2.safetensors");
    std::fs::write(&w2, &other).unwrap();
    let e = Engram::load_with_table(cfg.clone(), &w2, store_opts(&url, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no table") && e.contains(&id.tid()), "{e}");
    let _ = (raw0, id0);
    // The store's rows decode as the file's.
    let st = RedisRows::open(&url, &id, o).unwrap();
    let mut a = vec![0f32; 64 * 3];
    st.gather(&[0, 5, raw.rows() - 1], &mut a).unwrap();
    let mut want = vec![0f32; 64];
    base.weights().table.row_into(5, &mut want);
    assert_eq!(bits(&a[64..128]), bits(&want));
    assert!(
        st.gather(&[raw.rows()], &mut [0f32; 64]).is_err(),
        "a row past the end"
    );
    // A row deleted, or holding other bytes, under a complete table: an error naming the
    // row, never a zero or misread row.
    let client = ::redis::cluster::ClusterClient::new(vec![url.as_str()]).unwrap();
    let mut con = client.get_connection().unwrap();
    let tid = id.tid();
    ::redis::cmd("DEL")
        .arg(format!("eg:{tid}:7"))
        .query::<()>(&mut con)
        .unwrap();
    ::redis::cmd("SET")
        .arg(format!("eg:{tid}:8"))
        .arg(&b"short"[..])
        .query::<()>(&mut con)
        .unwrap();
    let e = st
        .gather(&[0, 7], &mut [0f32; 128])
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 7 is missing"), "{e}");
    let e = st.gather(&[8], &mut [0f32; 64]).unwrap_err().to_string();
    assert!(e.contains("row 8 holds 5 bytes"), "{e}");
    // A plain push of the damaged table trusts its mark; a push with the recheck finds the
    // lost row, unmarks the table and rewinds to the row; the next push rewrites from there
    // and completes.
    let r = redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, _| {}).unwrap();
    assert_eq!((r.written, r.complete), (0, true));
    let e = redis::push(&url, &raw, &id, &o, None, true, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 7 is missing") && e.contains("rewrite from row 7"),
        "{e}"
    );
    let e = RedisRows::open(&url, &id, o).unwrap_err().to_string();
    assert!(e.contains("incomplete"), "{e}");
    let r = redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, _| {}).unwrap();
    assert!(r.complete && r.resumed_from == 7, "{r:?}");
    let mut row8 = vec![0f32; 64];
    RedisRows::open(&url, &id, o)
        .unwrap()
        .gather(&[7, 8], &mut [0f32; 128])
        .unwrap();
    RedisRows::open(&url, &id, o)
        .unwrap()
        .gather(&[8], &mut row8)
        .unwrap();
    let mut want8 = vec![0f32; 64];
    base.weights().table.row_into(8, &mut want8);
    assert_eq!(bits(&row8), bits(&want8));
    // The recheck of the repaired table passes and writes nothing. Then a row changed at
    // its right length, which reads cannot see, is found by the recheck alone.
    let r = redis::push(&url, &raw, &id, &o, None, true, &mut |_, _, _| {}).unwrap();
    assert!(r.complete && r.written == 0, "{r:?}");
    assert_eq!(r.table_digest.as_deref(), Some(id.table_digest.as_str()));
    ::redis::cmd("SET")
        .arg(format!("eg:{tid}:9"))
        .arg(vec![7u8; 256])
        .query::<()>(&mut con)
        .unwrap();
    let e = redis::push(&url, &raw, &id, &o, None, true, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 9 reads back with bytes that differ"), "{e}");
    let r = redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, _| {}).unwrap();
    assert!(r.complete && r.resumed_from == 9, "{r:?}");
}

/// A master of the cluster: (node id, `host:port`, its slot ranges).
type Master = (String, String, Vec<(u16, u16)>);

fn masters(url: &str) -> Vec<Master> {
    let mut c = ::redis::Client::open(url)
        .unwrap()
        .get_connection()
        .unwrap();
    let nodes: String = ::redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap();
    nodes
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail"))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let addr = f[1].split('@').next().unwrap().to_string();
            let ranges = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect();
            (f[0].to_string(), addr, ranges)
        })
        .collect()
}

fn node(addr: &str) -> ::redis::Connection {
    ::redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Moves every key of `slot` from `src` to `dst` (`MIGRATE`), `only` first when given.
fn migrate_keys(src: &str, dst: &str, slot: u16, only: Option<&str>) {
    let mut s = node(src);
    let (host, port) = dst.rsplit_once(':').unwrap();
    loop {
        let keys: Vec<String> = match only {
            Some(k) => vec![k.to_string()],
            None => ::redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000)
                .query(&mut s)
                .unwrap(),
        };
        if keys.is_empty() {
            return;
        }
        let _: () = ::redis::cmd("MIGRATE")
            .arg(host)
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut s)
            .unwrap();
        if only.is_some() {
            return;
        }
    }
}

/// `CLUSTER SETSLOT slot args…` on the node at `addr`.
fn setslot(addr: &str, slot: u16, args: &[&str]) {
    let _: () = ::redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(args)
        .query(&mut node(addr))
        .unwrap();
}

/// Hands `slot` from master `src` to master `dst` (ids and addresses), as `redis-cli
/// --cluster reshard` does: importing/migrating, the keys moved, then the new owner told to
/// every master.
fn move_slot(all: &[Master], src: usize, dst: usize, slot: u16) {
    setslot(&all[dst].1, slot, &["IMPORTING", &all[src].0]);
    setslot(&all[src].1, slot, &["MIGRATING", &all[dst].0]);
    migrate_keys(&all[src].1, &all[dst].1, slot, None);
    for m in all {
        setslot(&m.1, slot, &["NODE", &all[dst].0]);
    }
}

/// Rows whose slot is being migrated (`ASK`, some keys moved and some not), then owned by
/// another master (`MOVED`, a stale slot map), then moved back: every gather returns the
/// file's rows.
#[test]
fn rows_follow_a_slot_that_moves_between_masters() {
    let Some(url) = cluster() else { return };
    let w = golden("small.weights.safetensors");
    let (raw, id) = demo_raw(&w);
    push_all(&url, &raw, &id);
    let o = RedisOptions {
        batch: 64,
        deadline: std::time::Duration::from_secs(20),
        ..Default::default()
    };
    let store = RedisRows::open(&url, &id, o).unwrap();
    let (n, d) = (raw.rows(), raw.dim());
    let all_rows: Vec<usize> = (0..n).collect();
    let mut want = vec![0f32; n * d];
    let mut buf = Vec::new();
    for r in 0..n {
        buf.clear();
        raw.row(r, &mut buf);
        raw.format().decode(&buf, &mut want[r * d..(r + 1) * d]);
    }
    let check = |what: &str| {
        let mut got = vec![f32::NAN; n * d];
        store.gather(&all_rows, &mut got).unwrap();
        assert!(
            bits(&got) == bits(&want),
            "{what}: rows differ from the file's"
        );
    };
    check("before");
    let key = format!("eg:{}:{}", store.tid(), 7);
    let mut seed = ::redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let slot: u16 = ::redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query(&mut seed)
        .unwrap();
    let all = masters(&url);
    let src = all
        .iter()
        .position(|m| m.2.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .expect("the slot's master");
    let dst = (src + 1) % all.len();
    // Migrating, with only row 7's key moved: the source answers ASK for it.
    setslot(&all[dst].1, slot, &["IMPORTING", &all[src].0]);
    setslot(&all[src].1, slot, &["MIGRATING", &all[dst].0]);
    migrate_keys(&all[src].1, &all[dst].1, slot, Some(&key));
    check("while the slot migrates (ASK)");
    // The rest moved and the slot handed over: the store's map is stale (MOVED).
    migrate_keys(&all[src].1, &all[dst].1, slot, None);
    for m in &all {
        setslot(&m.1, slot, &["NODE", &all[dst].0]);
    }
    check("after the slot moved (MOVED)");
    // And back, leaving the cluster as it was.
    move_slot(&all, dst, src, slot);
    check("after the slot moved back");
}
