//! Where a layer's table rows live: the options shared by `forward`, `bench` and `demo`.

use anyhow::{Context, Result};
use clap::Args;
use engram::rows::{parse_size, TableOptions};

/// `--table-io`, `--table-cache`, `--table-cache-policy`, `--io-depth`.
#[derive(Args, Debug, Clone, Default)]
pub struct TableArgs {
    /// Where the table's rows come from: `mmap` (default: the page cache decides what stays
    /// resident), `ram` (copied into memory at load) or `direct` (read from the file with
    /// O_DIRECT on demand, no page cache). Outputs are the same bit for bit.
    #[arg(long, value_name = "IO")]
    pub table_io: Option<String>,
    /// A hot-row cache of this size in front of the table (e.g. 512M, 2G); it counts the rows
    /// and their bookkeeping.
    #[arg(long, value_name = "SIZE")]
    pub table_cache: Option<String>,
    /// The cache's eviction policy: s3fifo (default), clock or lru.
    #[arg(long, value_name = "POLICY")]
    pub table_cache_policy: Option<String>,
    /// Reads kept in flight by `--table-io direct` (reader threads; default 64).
    #[arg(long, value_name = "N")]
    pub io_depth: Option<usize>,
    /// Rows from a Redis Cluster (`redis://HOST:PORT`, any node) holding this table, written
    /// there by `engram table push`; the weights file still names the table.
    #[arg(long, value_name = "URL")]
    pub table_store: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Timeouts and batching of a remote row store.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Seconds to connect to a node or wait for one reply (default 2).
    #[arg(long, value_name = "S")]
    pub store_timeout: Option<f64>,
    /// Seconds a failed round trip is retried (a node down, a failover) before the run fails
    /// (default 30).
    #[arg(long, value_name = "S")]
    pub store_deadline: Option<f64>,
    /// Rows per round trip (default 1024: one tile of the demo layer).
    #[arg(long, value_name = "N")]
    pub store_batch: Option<usize>,
    /// Round trips in flight at once when a gather spans several batches (one connection per
    /// node each; default 4).
    #[arg(long, value_name = "N")]
    pub store_connections: Option<usize>,
}

impl StoreArgs {
    /// The options these flags ask for.
    pub fn options(&self) -> Result<engram::rows::redis::RedisOptions> {
        let mut o = engram::rows::redis::RedisOptions::default();
        let secs = |v: f64, flag: &str| -> Result<std::time::Duration> {
            if !(v.is_finite() && (0.001..=1e6).contains(&v)) {
                anyhow::bail!("{flag}: expected seconds from 0.001 to 1e6, found {v:?}");
            }
            Ok(std::time::Duration::from_secs_f64(v))
        };
        if let Some(v) = self.store_timeout {
            o.timeout = secs(v, "--store-timeout")?;
        }
        if let Some(v) = self.store_deadline {
            o.deadline = secs(v, "--store-deadline")?;
        }
        if let Some(n) = self.store_batch {
            let max = engram::rows::redis::MAX_BATCH;
            if n == 0 || n > max {
                anyhow::bail!("--store-batch: expected 1 to {max} rows per round trip, found {n}");
            }
            o.batch = n;
        }
        if let Some(n) = self.store_connections {
            if !(1..=256).contains(&n) {
                anyhow::bail!(
                    "--store-connections: expected 1 to 256 round trips in flight, found {n}"
                );
            }
            o.connections = n;
        }
        Ok(o)
    }
}

impl TableArgs {
    /// The row-store options these flags ask for.
    pub fn options(&self) -> Result<TableOptions> {
        let o = TableOptions {
            io: match &self.table_io {
                // The library's error names table-io.
                Some(s) => s.parse()?,
                None => Default::default(),
            },
            cache_bytes: self
                .table_cache
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("--table-cache")?,
            cache_policy: match &self.table_cache_policy {
                // The library's error names table-cache-policy.
                Some(s) => s.parse()?,
                None => Default::default(),
            },
            io_depth: self.io_depth,
            store: self.table_store.clone(),
            store_options: self.store.options()?,
        };
        let st = &self.store;
        if o.store.is_none()
            && (st.store_timeout.is_some()
                || st.store_deadline.is_some()
                || st.store_batch.is_some()
                || st.store_connections.is_some())
        {
            anyhow::bail!(
                "--store-timeout / --store-deadline / --store-batch / --store-connections: expected --table-store URL with them, found none"
            );
        }
        if o.store.is_some() && o.io != engram::rows::TableIo::Mmap {
            anyhow::bail!(
                "--table-store: rows come from the store; expected no --table-io with it, found --table-io {}",
                o.io.name()
            );
        }
        if let Some(n) = o.io_depth {
            let max = engram::rows::MAX_IO_DEPTH;
            if n == 0 || n > max {
                anyhow::bail!("--io-depth: expected 1 to {max} reads in flight, found {n}");
            }
        }
        if o.cache_bytes == Some(0) {
            anyhow::bail!(
                "--table-cache: expected a size above 0 (leave it out for no cache), found 0"
            );
        }
        if self.table_cache_policy.is_some() && o.cache_bytes.is_none() {
            anyhow::bail!("--table-cache-policy: expected --table-cache SIZE with it, found none");
        }
        if self.io_depth.is_some() && o.io != engram::rows::TableIo::Direct {
            let found = match (&o.store, &self.table_io) {
                (Some(_), _) => "--table-store".to_string(),
                (None, Some(_)) => format!("--table-io {}", o.io.name()),
                (None, None) => format!("no --table-io (the default, {})", o.io.name()),
            };
            anyhow::bail!("--io-depth: expected --table-io direct with it, found {found}");
        }
        Ok(o)
    }
}

/// `row_store` in `engram bench --json`: the options and the counters over the timed runs
/// (`run_s`: their summed wall time).
pub fn row_store_json(
    o: &TableOptions,
    warm: bool,
    st: &engram::rows::StoreStats,
    run_s: f64,
) -> serde_json::Value {
    serde_json::json!({
        "table_io": if o.store.is_some() { "redis".to_string() } else { format!("{:?}", o.io).to_lowercase() },
        "table_store": o.store,
        "store_batch": o.store.as_ref().map(|_| o.store_options.batch),
        "table_cache_bytes": o.cache_bytes,
        "table_cache_policy": o.cache_bytes.map(|_| format!("{:?}", o.cache_policy).to_lowercase()),
        "io_depth": o.io_depth.unwrap_or(engram::rows::DEFAULT_IO_DEPTH),
        "warm": warm,
        "hit_rate": st.hit_rate(),
        "rows_read": st.misses,
        "rows_read_per_s": st.misses as f64 / run_s,
        "bytes_read": st.bytes_read,
        "reads_per_s": st.reads as f64 / run_s,
        "io_depth_mean": st.io_depth_mean(),
    })
}

/// `engram table ...`.
#[derive(clap::Subcommand)]
pub enum TableCommand {
    /// Write a layer's table rows into a Redis Cluster (resumable; every row read back and
    /// checked at the end).
    Push(PushArgs),
    /// The tables a Redis Cluster holds.
    Info(InfoArgs),
    /// Hit rates of the hot-row cache policies on a text's real row ids (the layer's hashes
    /// of the text, streamed through the engine's own cache in token order; no table read):
    /// what a cache of each size would serve from memory.
    CacheSim(CacheSimArgs),
}

/// `engram table cache-sim`.
#[derive(Args)]
pub struct CacheSimArgs {
    /// The text whose tokens are hashed (natural traffic).
    #[arg(long, value_name = "FILE")]
    text_file: std::path::PathBuf,
    /// Config JSON of a demo-layer config; the full default config when omitted.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Which layer of layer_ids.
    #[arg(long)]
    layer: Option<u64>,
    /// Cache sizes as shares of the table (bf16 rows): e.g. 1%,10%,50%, or sizes (512M).
    #[arg(long, default_value = "1%,10%,50%", value_delimiter = ',')]
    budgets: Vec<String>,
    /// Use only the first N tokens of the text.
    #[arg(long)]
    tokens: Option<usize>,
    /// One JSON object per policy and budget.
    #[arg(long)]
    json: bool,
}

/// A store of `rows` zero rows of `dim` values (bf16-exact): the cache's bookkeeping and
/// memory are real, the rows cost nothing to read.
#[derive(Debug)]
struct Zeros {
    rows: usize,
    dim: usize,
}

impl engram::rows::RowStore for Zeros {
    fn rows(&self) -> usize {
        self.rows
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn bf16_exact(&self) -> bool {
        true
    }
    fn row_into(&self, _r: usize, out: &mut [f32]) -> engram::Result<()> {
        out.fill(0.0);
        Ok(())
    }
}

pub fn table(c: TableCommand) -> Result<std::process::ExitCode> {
    match c {
        TableCommand::CacheSim(a) => cache_sim(a),
        TableCommand::Push(a) => push(a),
        TableCommand::Info(a) => info(a),
    }
}

/// `engram table push`.
#[derive(Args)]
pub struct PushArgs {
    /// The weights (demo state dict) or checkpoint (V4.1 file or sharded folder).
    #[arg(long)]
    weights: std::path::PathBuf,
    /// Config JSON (a demo-layer or DeepSeek-V4.1 config); the default demo config when omitted.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Which layer (V4.1: required; demo: the config's layer_id unless given).
    #[arg(long)]
    layer: Option<u64>,
    /// The cluster: `redis://HOST:PORT` of any node.
    #[arg(long, value_name = "URL")]
    store: String,
    /// On a table the store already marks complete, read every row back and compare it with
    /// the file anyway (finds rows changed or lost since; a bad row unmarks the table, and
    /// the next push rewrites from it).
    #[arg(long)]
    recheck: bool,
    #[command(flatten)]
    opts: StoreArgs,
}

/// `engram table info`.
#[derive(Args)]
pub struct InfoArgs {
    /// The cluster: `redis://HOST:PORT` of any node.
    #[arg(long, value_name = "URL")]
    store: String,
    /// One JSON object per table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    opts: StoreArgs,
}

/// The table rows of the layer `a` names, and their id in a store.
fn raw_table(
    weights: &std::path::Path,
    config: &Option<std::path::PathBuf>,
    layer: Option<u64>,
) -> Result<(engram::rows::redis::RawRows, engram::rows::redis::TableId)> {
    use engram::rows::redis::{RawRows, TableId};
    if let Some(v) = crate::v41::detect(config.as_deref())? {
        let layer = layer.ok_or_else(|| {
            anyhow::anyhow!(
                "--layer: a DeepSeek-V4.1 config has Engram layers {:?}; say which one",
                v.layer_ids
            )
        })?;
        let ck = engram::v41::Checkpoint::open(weights)?;
        let rows = v.num_embeddings[v.layer_index(layer)?] as usize;
        let p = format!("layers.{layer}.engram");
        let raw = RawRows::fp8(
            ck.raw(&format!("{p}.embed.weight"))?,
            ck.raw(&format!("{p}.embed.scale"))?,
            rows,
            v.head_dim,
        )?;
        let id = TableId::new("deepseek-v4.1", layer, &format!("{v:?}"), &raw);
        return Ok((raw, id));
    }
    let mut cfg = crate::commands::load_config(config)?;
    crate::commands::set_layer(&mut cfg, layer)?;
    cfg.validate()?;
    let m = engram::NgramHashMapping::new(&cfg, engram::layer::compression_for(&cfg)?)?;
    let rows = m.layer(cfg.layer_id)?.table_rows() as usize;
    let f = engram::tensors::TensorFile::open(weights)?;
    let raw = RawRows::dense(f.raw(engram::weights::TABLE)?, rows, cfg.head_dim())?;
    let id = TableId::new("demo", cfg.layer_id, &cfg.to_json_string(), &raw);
    Ok((raw, id))
}

fn push(a: PushArgs) -> Result<std::process::ExitCode> {
    let o = a.opts.options()?;
    engram::rows::redis::check_url(&a.store, &o)?;
    let (raw, id) = raw_table(&a.weights, &a.config, a.layer)?;
    let tid = id.tid();
    eprintln!(
        "table {tid}: {} layer {}, {} rows x {} ({:?}, {:.2} GB) -> {}",
        id.variant,
        id.layer,
        raw.rows(),
        raw.dim(),
        raw.format(),
        (raw.rows() * raw.format().row_bytes(raw.dim())) as f64 / 1e9,
        engram::rows::redis::shown_url(&a.store)
    );
    let bar = crate::demo::progress(raw.rows() as u64, "rows");
    let t0 = std::time::Instant::now();
    let r = engram::rows::redis::push(
        &a.store,
        &raw,
        &id,
        &o,
        None,
        a.recheck,
        &mut |done, _, phase| {
            bar.set_message(phase.to_string());
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    if r.written == 0 && r.complete && a.recheck {
        println!(
            "table {tid} is in the store, complete; read every row back: equal; sha256 {}",
            r.table_digest.as_deref().unwrap_or("?")
        );
    } else if r.written == 0 && r.complete {
        println!(
            "table {tid} is already in the store, complete (digest {})",
            r.table_digest.as_deref().unwrap_or("?")
        );
    } else {
        println!(
            "table {tid}: wrote rows {}..{} ({} rows, {:.1} s), read every row back: equal; sha256 {}",
            r.resumed_from,
            r.resumed_from + r.written,
            r.written,
            t0.elapsed().as_secs_f64(),
            r.table_digest.as_deref().unwrap_or("?")
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> Result<std::process::ExitCode> {
    let o = a.opts.options()?;
    let tables = engram::rows::redis::list_tables(&a.store, &o)?;
    if tables.is_empty() && !a.json {
        println!(
            "{}: no Engram tables",
            engram::rows::redis::shown_url(&a.store)
        );
    }
    for (tid, m) in tables {
        if a.json {
            let mut v = serde_json::Map::new();
            v.insert("tid".into(), tid.into());
            for (k, x) in m.fields {
                v.insert(k, x.into());
            }
            println!("{}", serde_json::Value::Object(v));
        } else {
            // What the store holds, as a listing shows names (escaped).
            let f = |k: &str| {
                m.fields
                    .get(k)
                    .map_or_else(|| "?".into(), |v| crate::commands::shown(v).into_owned())
            };
            let tid = crate::commands::shown(&tid);
            println!(
                "{tid}  {} layer {}  {} rows x {} {}  pushed {}  complete {}  config {}  sha256 {}",
                f("variant"),
                f("layer"),
                f("rows"),
                f("dim"),
                f("format"),
                f("pushed"),
                f("complete"),
                f("config_digest"),
                m.fields
                    .get("table_digest")
                    .map_or_else(|| "-".into(), |v| crate::commands::shown(v))
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn cache_sim(a: CacheSimArgs) -> Result<std::process::ExitCode> {
    use engram::rows::{cache::CachedRows, CachePolicy, RowStore};
    use std::sync::Arc;
    let mut cfg = crate::commands::load_config(&a.config)?;
    crate::commands::set_layer(&mut cfg, a.layer)?;
    cfg.validate()?;
    if a.tokens == Some(0) {
        anyhow::bail!("--tokens: expected at least 1 token, found 0");
    }
    let tok = engram::Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let mut ids = crate::commands::text_file_ids(&tok, &a.text_file, "--text-file", a.tokens)?;
    if let Some(n) = a.tokens {
        if n > ids.len() {
            anyhow::bail!(
                "--tokens: expected at most the text's {} tokens, found {n}",
                ids.len()
            );
        }
        ids.truncate(n);
    }
    if ids.is_empty() {
        anyhow::bail!(
            "--text-file {}: the text has no tokens",
            a.text_file.display()
        );
    }
    let comp = Arc::new(engram::CompressedTokenizer::build(&tok)?);
    let m = engram::NgramHashMapping::new(&cfg, comp)?;
    let layer = m.layer(cfg.layer_id)?;
    let offsets = layer.offsets();
    let h = m.num_heads();
    // Per token: its hash ids, its table rows and their sorted copy, 8 bytes a head each.
    let mut plan = engram::budget::MemoryPlan::new();
    plan.add_dims(
        "the text's row lookups",
        &[ids.len() as u64, h as u64, 3],
        8,
    )?;
    plan.check()?;
    let hashes = m.hash(cfg.layer_id, &ids, ids.len())?;
    let rows: Vec<usize> = hashes
        .chunks_exact(h)
        .flat_map(|hr| {
            hr.iter()
                .zip(&offsets)
                .map(|(&x, &o)| (x as u64 + o) as usize)
        })
        .collect();
    let table_rows = layer.table_rows() as usize;
    let dim = cfg.head_dim();
    let table_bytes = (table_rows * dim * 2) as u64;
    // Every budget parsed before the first line is printed.
    let budgets = a
        .budgets
        .iter()
        .map(|b| {
            let bytes = match b.trim().strip_suffix('%') {
                Some(p) => {
                    let p: f64 = p
                        .trim()
                        .parse()
                        .ok()
                        .filter(|p: &f64| (0.0..=100.0).contains(p))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--budgets: expected a share like 10% (0-100), found {b}"
                            )
                        })?;
                    (table_bytes as f64 * p / 100.0) as u64
                }
                None => parse_size(b).context("--budgets")?,
            };
            Ok((b.clone(), bytes))
        })
        .collect::<Result<Vec<(String, u64)>>>()?;
    let distinct = {
        let mut v = rows.clone();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    if !a.json {
        println!(
            "engram table cache-sim: {} tokens of {} -> {} row lookups ({} distinct rows: at most {:.1}% can hit); table {} rows x {dim} bf16 = {:.2} GB",
            ids.len(),
            a.text_file.display(),
            rows.len(),
            distinct,
            100.0 * (1.0 - distinct as f64 / rows.len() as f64),
            table_rows,
            table_bytes as f64 / 1e9
        );
        println!(
            "  {:<10} {:>12} {:>8} {:>8} {:>8}",
            "budget", "bytes", "s3fifo", "clock", "lru"
        );
    }
    let store: Arc<dyn RowStore> = Arc::new(Zeros {
        rows: table_rows,
        dim,
    });
    let mut out = vec![0f32; dim];
    for (b, bytes) in &budgets {
        let (b, bytes) = (b.as_str(), *bytes);
        let mut line = Vec::new();
        for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
            let c = CachedRows::with_policy(store.clone(), bytes, policy)?;
            for &r in &rows {
                c.row_into(r, &mut out)?;
            }
            let s = c.stats();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "policy": format!("{policy:?}").to_lowercase(), "budget": b,
                        "budget_bytes": bytes, "lookups": rows.len(), "distinct_rows": distinct,
                        "hit_rate": s.hit_rate(), "tokens": ids.len(),
                        "capacity_rows": c.capacity_rows(),
                    })
                );
            }
            line.push(s.hit_rate());
        }
        if !a.json {
            println!(
                "  {:<10} {:>12} {:>7.2}% {:>7.2}% {:>7.2}%",
                b,
                bytes,
                100.0 * line[0],
                100.0 * line[1],
                100.0 * line[2]
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
