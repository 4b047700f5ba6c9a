//! A master of the Redis Cluster killed during a forward run: the run gives the mapped table's
//! outputs bit for bit, or an error naming the store, never other numbers; once the replica
//! has taken over, runs succeed again. Destructive (it kills a master), so it runs only
//! with `ENGRAM_REDIS_FAILOVER=1` as well as `ENGRAM_REDIS_CLUSTER` (`.ci/run` runs it last).

mod common;
use common::*;
use engram::rows::redis::{self, RawRows, RedisOptions, TableId};
use engram::rows::TableOptions;
use engram::tensors::TensorFile;
use engram::{Engram, ForwardPath};
use std::time::{Duration, Instant};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn cluster_ok(url: &str) -> bool {
    let Ok(c) = ::redis::Client::open(url) else {
        return false;
    };
    let Ok(mut con) = c.get_connection_with_timeout(Duration::from_secs(1)) else {
        return false;
    };
    let info: String = ::redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut con)
        .unwrap_or_default();
    info.contains("cluster_state:ok")
}

#[test]
fn a_master_killed_mid_run_gives_the_same_output_or_a_clear_error() {
    let (Ok(url), Ok("1")) = (
        std::env::var("ENGRAM_REDIS_CLUSTER"),
        std::env::var("ENGRAM_REDIS_FAILOVER").as_deref(),
    ) else {
        eprintln!("skipped: set ENGRAM_REDIS_CLUSTER and ENGRAM_REDIS_FAILOVER=1 (destructive)");
        return;
    };
    let cfg = small_config();
    let w = golden("small.weights.safetensors");
    let rows = mapping(&cfg).layer(cfg.layer_id).unwrap().table_rows() as usize;
    let f = TensorFile::open(&w).unwrap();
    let raw = RawRows::dense(f.raw(engram::weights::TABLE).unwrap(), rows, cfg.head_dim()).unwrap();
    let id = TableId::new("demo", cfg.layer_id, &cfg.to_json_string(), &raw);
    let o = RedisOptions {
        deadline: Duration::from_secs(30),
        batch: 64,
        ..Default::default()
    };
    assert!(
        redis::push(&url, &raw, &id, &o, None, false, &mut |_, _, _| {})
            .unwrap()
            .complete
    );
    let opts = TableOptions {
        store: Some(url.clone()),
        store_options: o,
        ..Default::default()
    };
    let base = Engram::load(cfg.clone(), &w).unwrap();
    let e = Engram::load_with_table(cfg.clone(), &w, opts).unwrap();
    let n = 20_000;
    let (ids, hidden) = random_inputs(&cfg, n, 11);
    let want = base
        .forward(&ids, &hidden, 1, n, ForwardPath::Fused)
        .unwrap();
    // A master other than the node the URL names (new connections start there).
    let entry_port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let mut con = ::redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let nodes: String = ::redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut con)
        .unwrap();
    let victim = nodes
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail"))
        .filter_map(|l| {
            l.split(' ')
                .nth(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse::<u16>()
                .ok()
        })
        .find(|&p| p != entry_port)
        .expect("a second master");
    let mut v = ::redis::Client::open(format!("redis://127.0.0.1:{victim}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = ::redis::cmd("INFO").arg("server").query(&mut v).unwrap();
    let pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("process_id in INFO server");
    let t0 = Instant::now();
    let (outcome, run_s, killed_s) = std::thread::scope(|s| {
        let run = s.spawn(|| {
            let r = e.forward(&ids, &hidden, 1, n, ForwardPath::Fused);
            (r, t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        // SIGKILL: the node dies as a crashed host would, mid-reply.
        let st = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -9 {pid}");
        let killed = t0.elapsed();
        let (r, took) = run.join().unwrap();
        (r, took, killed)
    });
    assert!(
        killed_s < run_s,
        "the master went down after the run had finished ({killed_s:?} >= {run_s:?}): nothing was tested"
    );
    match &outcome {
        Ok(got) => assert_eq!(
            bits(&got.output),
            bits(&want.output),
            "same output through the failover"
        ),
        Err(err) => assert!(err.to_string().contains("row store"), "{err}"),
    }
    eprintln!(
        "master 127.0.0.1:{victim} shut down {killed_s:?} into a run of {run_s:?}: {}",
        match &outcome {
            Ok(_) => "the run finished with the same output".to_string(),
            Err(err) => format!("the run failed cleanly: {err}"),
        }
    );
    // The replica takes over; then runs succeed again, with the same numbers.
    let t0 = Instant::now();
    while !cluster_ok(&url) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cluster_ok(&url), "the cluster recovers within 30 s");
    let again = e.forward(&ids, &hidden, 1, n, ForwardPath::Fused).unwrap();
    assert_eq!(bits(&again.output), bits(&want.output));
}
