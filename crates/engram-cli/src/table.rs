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
}

impl TableArgs {
    /// The row-store options these flags ask for.
    pub fn options(&self) -> Result<TableOptions> {
        let o = TableOptions {
            io: match &self.table_io {
                Some(s) => s.parse().context("--table-io")?,
                None => Default::default(),
            },
            cache_bytes: self
                .table_cache
                .as_deref()
                .map(parse_size)
                .transpose()
                .context("--table-cache")?,
            cache_policy: match &self.table_cache_policy {
                Some(s) => s.parse().context("--table-cache-policy")?,
                None => Default::default(),
            },
            io_depth: self.io_depth,
        };
        if o.io_depth == Some(0) {
            anyhow::bail!("--io-depth: expected at least 1 read in flight, found 0");
        }
        if self.table_cache_policy.is_some() && o.cache_bytes.is_none() {
            anyhow::bail!("--table-cache-policy: expected --table-cache SIZE with it, found none");
        }
        if self.io_depth.is_some() && o.io != engram::rows::TableIo::Direct {
            anyhow::bail!(
                "--io-depth: expected --table-io direct with it, found {:?}",
                o.io
            );
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
        "table_io": format!("{:?}", o.io).to_lowercase(),
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
    }
}

fn cache_sim(a: CacheSimArgs) -> Result<std::process::ExitCode> {
    use engram::rows::{cache::CachedRows, CachePolicy, RowStore};
    use std::sync::Arc;
    let mut cfg = crate::commands::load_config(&a.config)?;
    if let Some(l) = a.layer {
        cfg.layer_id = l;
    }
    cfg.validate()?;
    let text = engram::files::read_limited_string(&a.text_file, 1 << 30, "--text-file")?;
    let tok = engram::Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let mut ids = tok.encode(&text, false)?;
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
    let hashes = m.hash(cfg.layer_id, &ids, ids.len())?;
    let h = m.num_heads();
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
    for b in &a.budgets {
        let bytes = match b.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p: &f64| (0.0..=100.0).contains(p))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--budgets: expected a share like 10% (0-100), found {b}")
                    })?;
                (table_bytes as f64 * p / 100.0) as u64
            }
            None => parse_size(b).context("--budgets")?,
        };
        let mut line = Vec::new();
        for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
            let c = CachedRows::with_policy(store.clone(), bytes, policy);
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
