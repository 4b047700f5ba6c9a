//! Rows in a Redis Cluster: one key per row holding the row's bytes as the checkpoint stores
//! them (f32 or bf16 values; fp8 codes followed by their e8m0 scales), fetched by their
//! deterministic ids in pipelines: one round trip per node for a batch of rows, every node's
//! pipeline sent before any reply is read, several batches at once on separate lanes. Reads
//! go over [`super::resp`]'s lean connections (replies parsed in place into the row buffer);
//! the few control commands (meta, push, `CLUSTER NODES`) over the `redis` crate.
//!
//! **Key scheme.** A table is named by `tid`, 12 hex digits of SHA-256 over the variant, the
//! layer, a digest of the config as the engine reads it, the table's shape and format, and
//! the SHA-256 of every row's bytes in the local file (so loading reads the table once, about
//! a second per GB here). Its keys:
//! - `eg:<tid>:<row>` (`row` in decimal; no hash tag, so rows spread over every slot): the
//!   row's stored bytes;
//! - `eg:<tid>:meta`: a hash: `variant`, `layer`, `rows`, `dim`, `format`, `row_bytes`,
//!   `config_digest`, `pushed` (rows written, in order: a push resumes there), `complete` (1
//!   once every row was read back equal to the file's), `table_digest` (SHA-256 of every row's
//!   bytes in order, recomputed from the store, set with `complete`);
//! - `eg:tables`: the set of tids the store holds.
//!
//! Two tables never share keys: a different config, layer, variant or table gives another
//! tid. A store that lacks the tid, or holds it incomplete, is refused when the layer loads.
//!
//! **Faults.** A read's every socket wait is bounded by `timeout` (and by what is left of
//! `deadline`); a control request runs on a thread of its own and is waited for at most until
//! `deadline`. So a node that stops answering cannot hold a run longer. A failed try (a node
//! down, a failover moving slots) drops its connection (its replies may be out of step) and
//! asks again on a new one, with back-off, after reading the slot map anew; `MOVED` refreshes
//! the map, `ASK` is followed with `ASKING`. At the deadline the call fails with an error
//! naming the node, the cause and the nodes the cluster marks as failing. A row is never
//! invented: a missing key or a value of the wrong length is an error.

use super::fp8::BLOCK;
use super::resp::{self, SlotMap};
use super::{RowStore, StoreStats};
use crate::error::{EngramError, Result};
use crate::tensors::RawTensor;
use redis::cluster::{ClusterClient, ClusterConnection};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Timeouts, retries and batching of a Redis store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOptions {
    /// Connecting to a node, and waiting for one reply.
    pub timeout: Duration,
    /// How long a failed round trip is retried before the gather fails.
    pub deadline: Duration,
    /// Rows per round trip (per pipeline); the default, 1,024, is a tile of the demo layer
    /// (64 rows × 16 heads).
    pub batch: usize,
    /// Batches in flight at once (one connection each).
    pub connections: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
            batch: 1024,
            connections: 4,
        }
    }
}

/// How a row's bytes encode its values (the name this module's API has always used).
pub use super::RowFormat as RawFormat;

/// A table's rows as stored bytes, read from its (memory-mapped) file: what a push writes
/// and what the digest covers.
#[derive(Debug, Clone)]
pub struct RawRows {
    format: RawFormat,
    codes: RawTensor,
    scales: Option<RawTensor>,
    rows: usize,
    dim: usize,
}

impl RawRows {
    /// A dense f32 or bf16 table `[rows, dim]` (the demo layer's).
    pub fn dense(t: RawTensor, rows: usize, dim: usize) -> Result<Self> {
        let format = match t.dtype {
            safetensors::Dtype::F32 => RawFormat::F32,
            safetensors::Dtype::BF16 => RawFormat::Bf16,
            d => {
                return Err(EngramError::invalid(
                    "table for a remote store",
                    "an f32, bf16 or fp8 table",
                    format!("{d:?}"),
                ))
            }
        };
        if Some(t.data().len()) != rows.checked_mul(format.row_bytes(dim)) {
            return Err(EngramError::Shape {
                name: "table (dense rows)".into(),
                expected: vec![rows, dim],
                found: t.shape.clone(),
            });
        }
        Ok(RawRows {
            format,
            codes: t,
            scales: None,
            rows,
            dim,
        })
    }

    /// An fp8 table: e4m3 `codes` `[rows, dim]` and e8m0 `scales` `[rows, dim/32]`.
    pub fn fp8(codes: RawTensor, scales: RawTensor, rows: usize, dim: usize) -> Result<Self> {
        super::fp8::Fp8Table::new("embed.weight", codes.clone(), scales.clone(), rows, dim)?;
        Ok(RawRows {
            format: RawFormat::Fp8,
            codes,
            scales: Some(scales),
            rows,
            dim,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The encoding of a row's bytes.
    pub fn format(&self) -> RawFormat {
        self.format
    }

    /// Row `r`'s stored bytes appended to `out` (`r < rows`).
    pub fn row(&self, r: usize, out: &mut Vec<u8>) {
        let d = self.dim;
        match (&self.scales, self.format) {
            (Some(s), _) => {
                let b = d / BLOCK;
                out.extend_from_slice(&self.codes.data()[r * d..(r + 1) * d]);
                out.extend_from_slice(&s.data()[r * b..(r + 1) * b]);
            }
            (None, f) => {
                let n = f.row_bytes(d);
                out.extend_from_slice(&self.codes.data()[r * n..(r + 1) * n]);
            }
        }
    }

    /// SHA-256 over every row's bytes, in order (what the final check of a push recomputes
    /// from the store). Reads the whole table once.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut buf = Vec::new();
        for r in 0..self.rows {
            buf.clear();
            self.row(r, &mut buf);
            h.update(&buf);
        }
        h.finalize().into()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The name of one table in a store (see the module's key scheme).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableId {
    /// `demo` or `deepseek-v4.1`.
    pub variant: String,
    /// The layer.
    pub layer: u64,
    /// SHA-256 (hex, 16 digits) of the config as the engine reads it.
    pub config_digest: String,
    /// [`RawRows::digest`] (hex, 64 digits).
    pub table_digest: String,
    /// Rows, values per row and their encoding.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// How rows are encoded.
    pub format: RawFormat,
}

impl TableId {
    /// The id of `raw`, layer `layer` of a `variant` config whose canonical text is `config`.
    pub fn new(variant: &str, layer: u64, config: &str, raw: &RawRows) -> Self {
        TableId {
            variant: variant.into(),
            layer,
            config_digest: hex(&Sha256::digest(config.as_bytes())[..8]),
            table_digest: hex(&raw.digest()),
            rows: raw.rows,
            dim: raw.dim,
            format: raw.format,
        }
    }

    /// 12 hex digits naming the table.
    pub fn tid(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.variant.as_str(),
            &self.layer.to_string(),
            &self.config_digest,
            self.format.name(),
            &self.rows.to_string(),
            &self.dim.to_string(),
            &self.table_digest,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex(&h.finalize()[..6])
    }

    fn row_key(tid: &str, r: usize) -> String {
        format!("eg:{tid}:{r}")
    }

    fn meta_key(tid: &str) -> String {
        format!("eg:{tid}:meta")
    }
}

/// The registry of tables a store holds.
const TABLES_KEY: &str = "eg:tables";

fn store_err(url: &str, message: impl Into<String>) -> EngramError {
    EngramError::Store {
        store: shown_url(url),
        message: message.into(),
    }
}

/// A store's URL for messages: a password in it (`redis://user:PASSWORD@host:port`) shown as
/// `***`.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((user, host)) if !user.is_empty() => {
            let name = user.split_once(':').map_or("", |(n, _)| n);
            if user.contains(':') {
                format!("{scheme}://{name}:***@{host}")
            } else {
                // `redis://PASSWORD@host` (a password alone).
                format!("{scheme}://***@{host}")
            }
        }
        _ => url.to_string(),
    }
}

/// The most rows one round trip may carry.
pub const MAX_BATCH: usize = 1 << 16;

/// A cluster client with this store's timeouts and few internal retries (ours bound the time).
fn client(url: &str, o: &RedisOptions) -> Result<ClusterClient> {
    ClusterClient::builder(vec![url])
        .connection_timeout(o.timeout)
        .response_timeout(o.timeout)
        .retries(2)
        .build()
        .map_err(|e| store_err(url, format!("not a Redis Cluster URL: {e}")))
}

/// Checks that `url` names a Redis Cluster node (`redis://HOST:PORT`) without connecting:
/// the error a command gives before it prints or reads anything.
pub fn check_url(url: &str, o: &RedisOptions) -> Result<()> {
    client(url, o).map(|_| ())
}

type Request<T> = Arc<dyn Fn(&mut ClusterConnection) -> redis::RedisResult<T> + Send + Sync>;

/// One try: `f` on `con` (or on a new connection) on a thread of its own, waited for at most
/// `limit` (a node that stops answering cannot hold a try longer). The connection comes back
/// only when the try succeeded in time; after any error it is dropped, never reused, as its
/// replies may be out of step.
fn bounded<T: Send + 'static>(
    client: &ClusterClient,
    con: Option<ClusterConnection>,
    limit: Duration,
    f: Request<T>,
) -> (Option<ClusterConnection>, redis::RedisResult<T>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let client = client.clone();
    std::thread::spawn(move || {
        let con = match con {
            Some(c) => Ok(c),
            None => client.get_connection(),
        };
        let out = match con {
            Ok(mut c) => {
                let r = f(&mut c);
                let ok = r.is_ok();
                (ok.then_some(c), r)
            }
            Err(e) => (None, Err(e)),
        };
        let _ = tx.send(out);
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => (
            None,
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {:.1} s", limit.as_secs_f64()),
            ))),
        ),
    }
}

/// A connection to the cluster, remade after any error, whose requests are retried with
/// back-off (50 ms doubling to 1 s) until the deadline and never outlive it.
struct Link {
    wire: Wire,
    o: RedisOptions,
    client: ClusterClient,
    con: Option<ClusterConnection>,
}

impl Link {
    /// The seed node must first answer `CLUSTER SLOTS` to [`resp`]'s bounded parser, by the
    /// deadline: a server that is not a Redis Cluster node, or one whose reply announces an
    /// absurd length, is refused there, before the `redis` crate (whose parser allocates what
    /// a reply announces) reads from it.
    fn new(url: &str, o: &RedisOptions) -> Result<Self> {
        let client = client(url, o)?;
        Ok(Link {
            wire: Wire::open(url, o)?,
            o: *o,
            client,
            con: None,
        })
    }

    fn run<T: Send + 'static>(
        &mut self,
        f: impl Fn(&mut ClusterConnection) -> redis::RedisResult<T> + Send + Sync + 'static,
    ) -> Result<T> {
        let f: Request<T> = Arc::new(f);
        let t0 = Instant::now();
        let mut wait = Duration::from_millis(50);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let left = self.o.deadline.saturating_sub(t0.elapsed());
            let (back, r) = bounded(&self.client, self.con.take(), left, f.clone());
            self.con = back;
            match r {
                Ok(v) => return Ok(v),
                // An answer that no retry changes (OOM under `noeviction`, a key of the wrong
                // type, a refused command) fails at once.
                Err(e) if matches!(e.retry_method(), redis::RetryMethod::NoRetry) => {
                    return Err(store_err(
                        &self.wire.url,
                        format!("the store answered: {}", clip(&e.to_string())),
                    ))
                }
                Err(_) if t0.elapsed() + wait < self.o.deadline => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(store_err(
                        &self.wire.url,
                        format!(
                            "{} ({tries} tries over {:.1} s; {})",
                            clip(&e.to_string()),
                            t0.elapsed().as_secs_f64(),
                            cluster_health(&self.wire, &self.o)
                        ),
                    ))
                }
            }
        }
    }
}

/// An error text cut to its first 300 characters (a pipeline's error lists every command's).
fn clip(s: &str) -> String {
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}… ({} characters)", &s[..i], s.chars().count()),
        None => s.to_string(),
    }
}

/// What the seed node says of the cluster (`CLUSTER NODES`), for an error message: the nodes
/// it marks as failing and the slots no node serves. One connection, read by [`resp`]'s
/// bounded parser, each wait at most a second (or `timeout` where shorter) and no read
/// started past that.
fn cluster_health(wire: &Wire, o: &RedisOptions) -> String {
    let limit = o.timeout.min(Duration::from_secs(1));
    let got = (|| -> std::io::Result<resp::Value> {
        let mut c = resp::Conn::connect(&wire.seed, &wire.auth, limit)?;
        c.set_deadline(Some(Instant::now() + limit));
        let mut cmd = Vec::new();
        resp::push_command(&mut cmd, &[b"CLUSTER", b"NODES"]);
        c.send(&cmd)?;
        // A line per node: 16 MiB is far more than any real cluster's.
        c.value(1, 1 << 24, &mut (1 << 21))
    })();
    let url = &wire.url;
    let text = match got {
        Ok(resp::Value::Bulk(b)) => String::from_utf8_lossy(&b).into_owned(),
        // An error reply is an answer (a Redis without cluster mode says so here).
        Ok(resp::Value::Error(e)) => return format!("{url} answers CLUSTER NODES with: {e}"),
        Ok(v) => {
            return format!(
                "{url} answers CLUSTER NODES with {}",
                clip(&format!("{v:?}"))
            )
        }
        Err(e) => return format!("{url} itself does not answer: {e}"),
    };
    let mut bad = Vec::new();
    let mut served = vec![false; resp::SLOTS];
    for l in text.lines() {
        let w: Vec<&str> = l.split(' ').collect();
        let (Some(addr), Some(flags)) = (w.get(1), w.get(2)) else {
            continue;
        };
        if flags.contains("fail") || flags.contains("noaddr") {
            bad.push(format!(
                "{} ({flags})",
                addr.split('@').next().unwrap_or(addr)
            ));
        }
        // Slot ranges `a-b` or `a` from the ninth field on (`[...]` marks a migration).
        for r in w.iter().skip(8).filter(|r| !r.starts_with('[')) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                if a <= b && b < resp::SLOTS {
                    served[a..=b].fill(true);
                }
            }
        }
    }
    let unserved = served.iter().filter(|s| !**s).count();
    let mut parts = Vec::new();
    if !bad.is_empty() {
        parts.push(format!("failing: {}", bad.join(", ")));
    }
    if unserved > 0 {
        parts.push(format!(
            "{unserved} of {} slots served by no node",
            resp::SLOTS
        ));
    }
    if parts.is_empty() {
        "no node is marked failing".into()
    } else {
        parts.join("; ")
    }
}

/// What a store says of one table (its `meta` hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableMeta {
    /// Every field of the hash.
    pub fields: std::collections::BTreeMap<String, String>,
}

impl TableMeta {
    fn get(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(String::as_str)
    }

    fn num(&self, k: &str) -> usize {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// A field as the store holds it, for a message (`?` where it is missing): a value that
    /// is not a number shows as it is, not as the 0 [`TableMeta::num`] compares.
    fn shown(&self, k: &str) -> String {
        let v = self.get(k).unwrap_or("?");
        let mut t: String = v.chars().take(80).collect();
        if t.len() < v.len() {
            t.push('…');
        }
        format!("{t:?}").trim_matches('"').to_string()
    }
}

fn read_meta(con: &mut ClusterConnection, tid: &str) -> redis::RedisResult<TableMeta> {
    let fields: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(TableId::meta_key(tid))
        .query(con)?;
    Ok(TableMeta { fields })
}

/// Every table a store holds: (tid, meta).
pub fn list_tables(url: &str, o: &RedisOptions) -> Result<Vec<(String, TableMeta)>> {
    let mut link = Link::new(url, o)?;
    let mut tids: Vec<String> = link.run(|c| redis::cmd("SMEMBERS").arg(TABLES_KEY).query(c))?;
    tids.sort();
    let mut out = Vec::new();
    for t in tids {
        let t2 = t.clone();
        let m = link.run(move |c| read_meta(c, &t2))?;
        out.push((t, m));
    }
    Ok(out)
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The table's name in the store.
    pub tid: String,
    /// Rows written by this push (0 when the store already held the whole table).
    pub written: usize,
    /// The row this push started from (a resumed push starts past row 0).
    pub resumed_from: usize,
    /// Whether every row is in the store and was read back equal (the final check).
    pub complete: bool,
    /// SHA-256 of every row's bytes, in order (hex), when complete.
    pub table_digest: Option<String>,
}

/// Writes `raw` into the store as table `id`, resuming where an earlier push stopped, then
/// reads every row back and compares it with the file (the final check) before marking the
/// table complete. `stop_after`: write at most this many rows, then return incomplete (an
/// interrupted push, for tests). `recheck`: on a table the store marks complete, run the
/// final check anyway (rows changed or lost since, at their right length, are found only
/// so; a bad row unmarks the table and rewinds the push to it). `progress(done, total,
/// phase)` is called after each batch.
pub fn push(
    url: &str,
    raw: &RawRows,
    id: &TableId,
    o: &RedisOptions,
    stop_after: Option<usize>,
    recheck: bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<PushReport> {
    if o.batch == 0 || o.batch > MAX_BATCH {
        return Err(EngramError::invalid(
            "store batch",
            format!("1 to {MAX_BATCH} rows per round trip"),
            o.batch,
        ));
    }
    let mut link = Link::new(url, o)?;
    let tid = id.tid();
    let meta_key = TableId::meta_key(&tid);
    let t2 = tid.clone();
    let meta = link.run(move |c| read_meta(c, &t2))?;
    let rows = raw.rows;
    if meta.fields.is_empty() {
        let fields = [
            ("variant", id.variant.clone()),
            ("layer", id.layer.to_string()),
            ("rows", rows.to_string()),
            ("dim", raw.dim.to_string()),
            ("format", raw.format.name().to_string()),
            ("row_bytes", raw.format.row_bytes(raw.dim).to_string()),
            ("config_digest", id.config_digest.clone()),
            ("pushed", "0".into()),
            ("complete", "0".into()),
        ];
        let mut hset = redis::cmd("HSET");
        hset.arg(&meta_key);
        for (k, v) in &fields {
            hset.arg(*k).arg(v);
        }
        let mut sadd = redis::cmd("SADD");
        sadd.arg(TABLES_KEY).arg(&tid);
        link.run(move |c| {
            hset.query::<()>(c)?;
            sadd.query::<()>(c)
        })?;
    } else if meta.num("rows") != rows || meta.get("format") != Some(raw.format.name()) {
        return Err(store_err(
            url,
            format!(
                "table {tid}: the store's meta says {} rows of {:?}, the file has {rows} of {}",
                meta.shown("rows"),
                meta.get("format").unwrap_or("?"),
                raw.format.name()
            ),
        ));
    }
    let complete = meta.get("complete") == Some("1");
    if complete && !recheck {
        return Ok(PushReport {
            tid,
            written: 0,
            resumed_from: rows,
            complete: true,
            table_digest: meta.get("table_digest").map(str::to_string),
        });
    }
    let start = if complete {
        rows
    } else {
        meta.num("pushed").min(rows)
    };
    let end = stop_after.map_or(rows, |n| (start + n).min(rows));
    let mut buf = Vec::new();
    let mut at = start;
    while at < end {
        let b = (at + o.batch.max(1)).min(end);
        let mut pipe = redis::cluster::cluster_pipe();
        for r in at..b {
            buf.clear();
            raw.row(r, &mut buf);
            pipe.cmd("SET")
                .arg(TableId::row_key(&tid, r))
                .arg(&buf[..])
                .ignore();
        }
        let mut mark = redis::cmd("HSET");
        mark.arg(&meta_key).arg("pushed").arg(b);
        link.run(move |c| {
            pipe.query::<()>(c)?;
            mark.query::<()>(c)
        })?;
        at = b;
        progress(at, rows, "writing");
    }
    if end < rows {
        return Ok(PushReport {
            tid,
            written: end - start,
            resumed_from: start,
            complete: false,
            table_digest: None,
        });
    }
    // The final check: every row read back equals the file's, and the digest of them all.
    let wire = Wire::open(url, o)?;
    let mut lane = Lane::default();
    let want = raw.format.row_bytes(raw.dim);
    let mut h = Sha256::new();
    let mut at = 0;
    while at < rows {
        let b = (at + o.batch.max(1)).min(rows);
        let keys: Vec<usize> = (at..b).collect();
        // None: equal to the file's row; Some(why): not.
        let mut verdict: Vec<Option<String>> = vec![None; keys.len()];
        let mut file_row = Vec::new();
        get_rows(&wire, &mut lane, o, &tid, &keys, want, &mut |i, got| {
            file_row.clear();
            raw.row(keys[i], &mut file_row);
            verdict[i] = match got {
                Got::Row(v) if v == file_row.as_slice() => None,
                Got::Row(_) => Some("reads back with bytes that differ from the file's".into()),
                Got::Len(n) => Some(format!(
                    "reads back as {n} bytes, the file's row has {}",
                    file_row.len()
                )),
                Got::Missing => Some(
                    "is missing after the push (lost in a failover, or evicted: a store that \
                     holds tables needs maxmemory-policy noeviction)"
                        .into(),
                ),
            };
            Ok(())
        })?;
        for (r, v) in (at..b).zip(verdict) {
            buf.clear();
            raw.row(r, &mut buf);
            let Some(bad) = v else {
                h.update(&buf);
                continue;
            };
            // The next push rewrites from this row on (a complete table no longer is).
            let mut rewind = redis::cmd("HSET");
            rewind
                .arg(&meta_key)
                .arg("pushed")
                .arg(r)
                .arg("complete")
                .arg(0);
            link.run(move |c| rewind.query::<()>(c))?;
            return Err(store_err(
                url,
                format!("table {tid}: row {r} {bad}; push again to rewrite from row {r}"),
            ));
        }
        at = b;
        progress(at, rows, "checking");
    }
    let digest = hex(&h.finalize());
    if digest != id.table_digest {
        return Err(store_err(
            url,
            format!(
                "table {tid}: the rows read back digest to {digest}, the file's to {}",
                id.table_digest
            ),
        ));
    }
    let mut done = redis::cmd("HSET");
    done.arg(&meta_key)
        .arg("complete")
        .arg(1)
        .arg("table_digest")
        .arg(&digest);
    link.run(move |c| done.query::<()>(c))?;
    Ok(PushReport {
        tid,
        written: end - start,
        resumed_from: start,
        complete: true,
        table_digest: Some(digest),
    })
}

/// The cluster as the reads see it: where to ask for the slot map, how to log in, and the
/// map last read. Reads go over [`resp`]'s lean pipelined connections; the control commands
/// (meta, push, `CLUSTER NODES`) over the `redis` crate.
struct Wire {
    url: String,
    seed: String,
    auth: resp::Auth,
    map: Mutex<Arc<SlotMap>>,
}

impl Wire {
    /// Reads the slot map from the node at `url` (or fails with the reason).
    fn open(url: &str, o: &RedisOptions) -> Result<Self> {
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(|e| store_err(url, format!("not a Redis URL: {e}")))?;
        let seed = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            a => {
                return Err(store_err(
                    url,
                    format!("expected a plain TCP node (redis://HOST:PORT), found {a:?}"),
                ))
            }
        };
        let r = info.redis_settings();
        let wire = Wire {
            url: shown_url(url),
            seed,
            auth: resp::Auth {
                username: r.username().map(str::to_string),
                password: r.password().map(str::to_string),
            },
            map: Mutex::new(Arc::new(SlotMap::empty())),
        };
        // Asked again with back-off until the deadline (a node restarting, a failover).
        let t0 = Instant::now();
        let end = deadline_after(t0, o.deadline);
        let mut wait = Duration::from_millis(50);
        let mut tries = 0u32;
        loop {
            tries += 1;
            match wire.refresh(o.timeout, end) {
                Ok(()) => return Ok(wire),
                // Every node asked answered with an error that no retry changes (a Redis
                // without cluster mode): refused at once.
                Err((_, transient)) if transient && Instant::now() + wait < end => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err((e, _)) => {
                    return Err(store_err(
                        url,
                        format!(
                            "no slot map: {e} ({tries} tries over {:.1} s)",
                            t0.elapsed().as_secs_f64()
                        ),
                    ))
                }
            }
        }
    }

    fn map(&self) -> Arc<SlotMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads `CLUSTER SLOTS` from the seed node, or else from any node of the last map;
    /// every wait at most `timeout` and none past `end`. The error says why for each node,
    /// and whether a retry might change it (false when every node answered with an error
    /// other than a transient one: `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`,
    /// `BUSY`).
    fn refresh(&self, timeout: Duration, end: Instant) -> std::result::Result<(), (String, bool)> {
        let mut transient = false;
        let mut ask = vec![self.seed.clone()];
        ask.extend(
            self.map()
                .nodes
                .iter()
                .filter(|n| **n != self.seed)
                .cloned(),
        );
        let mut why = Vec::new();
        for addr in ask {
            let Some(limit) = wait_limit(timeout, end) else {
                why.push("the deadline passed".to_string());
                transient = true;
                break;
            };
            let host = addr.rsplit_once(':').map_or("", |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            // A read that waited its whole limit reports as `WouldBlock` on Unix.
            let io = |e: std::io::Error| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no reply within {:.1} s", limit.as_secs_f64())
                }
                _ => e.to_string(),
            };
            // Whether a retry might get another answer from this node: anything but an
            // error reply other than a transient one.
            let mut node_transient = true;
            let got = (|| -> std::result::Result<SlotMap, String> {
                let mut c = resp::Conn::connect(&addr, &self.auth, limit).map_err(io)?;
                c.set_deadline(Some(end));
                let mut cmd = Vec::new();
                resp::push_command(&mut cmd, &[b"CLUSTER", b"SLOTS"]);
                c.send(&cmd).map_err(io)?;
                // A few values per range and node: 2^20 is far more than any real map.
                let v = c.value(4, 1024, &mut (1 << 20)).map_err(io)?;
                if let resp::Value::Error(e) = &v {
                    let passing = ["LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "BUSY"];
                    node_transient = passing.iter().any(|t| e.starts_with(t));
                }
                let m = SlotMap::from_cluster_slots(&v, host)?;
                if m.nodes.is_empty() {
                    return Err("no slot is served (not a cluster, or not one yet)".into());
                }
                Ok(m)
            })();
            match got {
                Ok(m) => {
                    *self.map.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(m);
                    return Ok(());
                }
                Err(e) => {
                    transient |= node_transient;
                    why.push(format!("{addr}: {e}"))
                }
            }
        }
        Err((why.join("; "), transient))
    }
}

/// The longest one socket wait may last: `timeout`, cut to what is left before `end`; `None`
/// once `end` has passed.
/// `t0 + d`, or a century from `t0` where `d` is past what an `Instant` holds
/// (`Duration::MAX` means no deadline).
fn deadline_after(t0: Instant, d: Duration) -> Instant {
    t0.checked_add(d)
        .unwrap_or_else(|| t0 + Duration::from_secs(100 * 365 * 86_400))
}

fn wait_limit(timeout: Duration, end: Instant) -> Option<Duration> {
    let left = end.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then(|| timeout.min(left))
}

/// One lane's connections (one per node) and scratch: a gather in flight owns one lane.
#[derive(Default)]
struct Lane {
    conns: std::collections::HashMap<String, resp::Conn>,
    cmd: Vec<u8>,
    /// The call's keys, end to end (`key_end[i]` ends row `i`'s), written once per call.
    keys: Vec<u8>,
    key_end: Vec<usize>,
    row: Vec<u8>,
    slots: Vec<u16>,
}

impl Lane {
    /// The connection to `addr`, made if needed, waiting at most `timeout` per read or write
    /// and never past `end`.
    fn conn(
        &mut self,
        addr: &str,
        auth: &resp::Auth,
        timeout: Duration,
        end: Instant,
    ) -> std::io::Result<&mut resp::Conn> {
        let limit = wait_limit(timeout, end).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the deadline passed")
        })?;
        if !self.conns.contains_key(addr) {
            let c = resp::Conn::connect(addr, auth, limit)?;
            self.conns.insert(addr.to_string(), c);
        }
        let c = self.conns.get_mut(addr).expect("inserted above");
        c.set_timeout(limit)?;
        c.set_deadline(Some(end));
        Ok(c)
    }

    /// Writes every row's key `eg:<tid>:<row>` and its slot, once for all of a call's tries.
    fn set_keys(&mut self, tid: &str, rows: &[usize]) {
        use std::io::Write;
        self.keys.clear();
        self.key_end.clear();
        self.slots.clear();
        for &r in rows {
            let start = self.keys.len();
            let _ = write!(self.keys, "eg:{tid}:{r}");
            self.slots.push(resp::key_slot(&self.keys[start..]));
            self.key_end.push(self.keys.len());
        }
    }

    /// Row `i`'s key (after [`Lane::set_keys`]).
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.key_end[i - 1] };
        &self.keys[start..self.key_end[i]]
    }
}

/// What a node holds for one asked row.
enum Got<'a> {
    /// The row's bytes (of the expected length).
    Row(&'a [u8]),
    /// No such key.
    Missing,
    /// A value of this many bytes (not a row of this table).
    Len(usize),
}

/// One reply to a `GET`, read in place.
enum Reply {
    Row,
    Missing,
    Len(usize),
    Error(String),
}

fn read_reply(c: &mut resp::Conn, want: usize, row: &mut Vec<u8>) -> std::io::Result<Reply> {
    Ok(match c.head()? {
        resp::Head::Bulk(n) if n == want => {
            row.resize(want, 0);
            c.payload(row)?;
            Reply::Row
        }
        // A value of another length is drained (the stream stays in step) unless it is
        // large; then the connection is given up.
        resp::Head::Bulk(n) if n <= want.saturating_mul(16).max(1 << 16) => {
            c.skip(n)?;
            Reply::Len(n)
        }
        resp::Head::Bulk(n) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a value of {n} bytes where a row has {want}"),
            ))
        }
        resp::Head::Nil => Reply::Missing,
        resp::Head::Error(e) => Reply::Error(e),
        h => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected a row's bytes, found {h:?}"),
            ))
        }
    })
}

/// Reads rows `rows` of table `tid` (`want` bytes each): every node's share as one pipeline
/// of `GET`s, all nodes' pipelines sent before any reply is read; each reply goes to
/// `sink(i, got)` (`i` indexes `rows`; order across nodes is not `rows`' order). A row that
/// could not be read (a node down, a slot moving: `MOVED` refreshes the map, `ASK` is
/// followed, `TRYAGAIN`/`CLUSTERDOWN` wait) is asked again, with back-off (50 ms doubling to
/// 1 s), until `o.deadline`; then the call fails naming the node, the cause and the nodes the
/// cluster marks as failing. Rows read in a failed try are kept: each reply is framed and
/// matched to its request, and a connection is dropped at its first error.
fn get_rows(
    wire: &Wire,
    lane: &mut Lane,
    o: &RedisOptions,
    tid: &str,
    rows: &[usize],
    want: usize,
    sink: &mut dyn FnMut(usize, Got<'_>) -> Result<()>,
) -> Result<()> {
    let t0 = Instant::now();
    let end = deadline_after(t0, o.deadline);
    let mut wait = Duration::from_millis(50);
    let mut tries = 0u32;
    let mut pending: Vec<usize> = (0..rows.len()).collect();
    let mut map_err = String::new();
    lane.set_keys(tid, rows);
    loop {
        tries += 1;
        let mut t = Try::default();
        let map = wire.map();
        let mut per: Vec<Vec<usize>> = vec![Vec::new(); map.nodes.len()];
        for &i in &pending {
            match map.node_of(lane.slots[i]) {
                Some(n) => per[n].push(i),
                None => t.failed(i, format!("slot {} is served by no node", lane.slots[i])),
            }
        }
        let mut asks: Vec<(String, Vec<usize>)> = Vec::new();
        // Every node's pipeline goes out before any reply is read.
        let mut sent = vec![false; per.len()];
        for (n, idx) in per.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let addr = &map.nodes[n];
            let mut cmd = std::mem::take(&mut lane.cmd);
            cmd.clear();
            for &i in idx {
                resp::push_command(&mut cmd, &[b"GET", lane.key(i)]);
            }
            let res = lane
                .conn(addr, &wire.auth, o.timeout, end)
                .and_then(|c| c.send(&cmd));
            lane.cmd = cmd;
            match res {
                Ok(()) => sent[n] = true,
                Err(e) => {
                    lane.conns.remove(addr);
                    t.failed_all(idx, format!("{addr}: {e}"));
                }
            }
        }
        for (n, idx) in per.iter().enumerate() {
            if !sent[n] {
                continue;
            }
            let addr = &map.nodes[n];
            let out = read_replies(lane, addr, false, o.timeout, end, idx, want, sink, &mut t);
            match out {
                Ok(a) => {
                    for (i, to) in a {
                        match asks.iter_mut().find(|(n, _)| *n == to) {
                            Some((_, v)) => v.push(i),
                            None => asks.push((to, vec![i])),
                        }
                    }
                }
                Err(Abort::Sink(e)) => {
                    // The rest of this node's replies are unread: no connection is reused.
                    lane.conns.clear();
                    return Err(e);
                }
                Err(Abort::Fatal(i, e)) => {
                    lane.conns.clear();
                    return Err(fatal_get(addr, lane.key(i), &e));
                }
            }
        }
        for (to, idx) in asks {
            // `ASKING` then the `GET`, per row, all in one pipeline to the importing node.
            let mut cmd = Vec::new();
            for &i in &idx {
                resp::push_command(&mut cmd, &[b"ASKING"]);
                resp::push_command(&mut cmd, &[b"GET", lane.key(i)]);
            }
            let sent = lane
                .conn(&to, &wire.auth, o.timeout, end)
                .and_then(|c| c.send(&cmd));
            if let Err(e) = sent {
                lane.conns.remove(&to);
                t.failed_all(&idx, format!("{to}: {e}"));
                continue;
            }
            let out = read_replies(lane, &to, true, o.timeout, end, &idx, want, sink, &mut t);
            match out {
                Ok(_) => {}
                Err(Abort::Sink(e)) => {
                    lane.conns.clear();
                    return Err(e);
                }
                Err(Abort::Fatal(i, e)) => {
                    lane.conns.clear();
                    return Err(fatal_get(&to, lane.key(i), &e));
                }
            }
        }
        if t.retry.is_empty() {
            return Ok(());
        }
        if t0.elapsed() + wait >= o.deadline {
            return Err(store_err(
                &wire.url,
                format!(
                    "{}{map_err} ({} of {} rows unread after {tries} tries over {:.1} s; {})",
                    t.why,
                    t.retry.len(),
                    rows.len(),
                    t0.elapsed().as_secs_f64(),
                    cluster_health(wire, o)
                ),
            ));
        }
        // A slot that moved is asked again at once, once; anything else waits first.
        if !(t.only_moved && tries == 1) {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(1));
        }
        if t.refresh {
            map_err = match wire.refresh(o.timeout, end) {
                Ok(()) => String::new(),
                Err((e, _)) => format!("; reading the slot map: {e}"),
            };
        }
        pending = t.retry;
    }
}

/// The error of a `GET` answered with an error no retry helps (`WRONGTYPE`, `OOM`, `NOAUTH`,
/// ...): the node, the row's key and the reply, cut to its first 300 characters.
fn fatal_get(addr: &str, key: &[u8], e: &str) -> EngramError {
    store_err(
        addr,
        format!("GET {} answered {}", String::from_utf8_lossy(key), clip(e)),
    )
}

/// What one try of [`get_rows`] left to do.
struct Try {
    /// Rows (indices into the call's rows) to ask again.
    retry: Vec<usize>,
    /// The last failure, for the error at the deadline.
    why: String,
    /// Whether the slot map should be read again.
    refresh: bool,
    /// Whether every failure was a `MOVED` (asked again at once).
    only_moved: bool,
}

impl Default for Try {
    fn default() -> Self {
        Try {
            retry: Vec::new(),
            why: String::new(),
            refresh: false,
            only_moved: true,
        }
    }
}

impl Try {
    fn failed(&mut self, i: usize, why: String) {
        self.retry.push(i);
        self.why = why;
        self.refresh = true;
        self.only_moved = false;
    }

    fn failed_all(&mut self, idx: &[usize], why: String) {
        self.retry.extend_from_slice(idx);
        self.why = why;
        self.refresh = true;
        self.only_moved = false;
    }

    /// An error reply to row `i`'s `GET`: `Some(addr)` when it is to be asked there (`ASK`).
    fn redirected(
        &mut self,
        i: usize,
        node: &str,
        e: &str,
    ) -> std::result::Result<Option<String>, ()> {
        match resp::redirect(e) {
            resp::Redirect::Moved(_) => self.refresh = true,
            resp::Redirect::Ask(to) => return Ok(Some(resp::redirect_target(&to, node))),
            resp::Redirect::Retry => self.only_moved = false,
            resp::Redirect::Fatal => return Err(()),
        }
        self.retry.push(i);
        self.why = format!("{node}: {}", clip(e));
        Ok(None)
    }
}

/// Why reading a node's replies stopped the whole call.
enum Abort {
    /// The sink refused a row (its error).
    Sink(EngramError),
    /// The node answered row `.0`'s `GET` with an error no retry can help.
    Fatal(usize, String),
}

/// How many replies are read between looks at the clock (a node that trickles its replies
/// cannot hold a try past its end).
const CLOCK_EVERY: usize = 64;

/// Reads the replies to the `GET`s of rows `idx` (sent on the lane's connection to `addr`,
/// each after an `ASKING` when `asking`) into `sink`; rows to ask again go to `t`, rows to ask
/// elsewhere (`ASK`) are returned. Any failure, or anything but `+OK` to an `ASKING`, gives
/// the connection up (its replies may be out of step) and leaves the rest to ask again.
#[allow(clippy::too_many_arguments)]
fn read_replies(
    lane: &mut Lane,
    addr: &str,
    asking: bool,
    timeout: Duration,
    end: Instant,
    idx: &[usize],
    want: usize,
    sink: &mut dyn FnMut(usize, Got<'_>) -> Result<()>,
    t: &mut Try,
) -> std::result::Result<Vec<(usize, String)>, Abort> {
    let mut asks = Vec::new();
    let mut row = std::mem::take(&mut lane.row);
    let Some(c) = lane.conns.get_mut(addr) else {
        t.failed_all(idx, format!("{addr}: no connection"));
        return Ok(asks);
    };
    let mut failure: Option<(usize, String)> = None;
    for (k, &i) in idx.iter().enumerate() {
        let reply = (|| -> std::io::Result<std::result::Result<Reply, String>> {
            if k % CLOCK_EVERY == 0 {
                let l = wait_limit(timeout, end).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "the deadline passed")
                })?;
                c.set_timeout(l)?;
            }
            if asking {
                match c.head()? {
                    resp::Head::Simple(_) => {}
                    h => return Ok(Err(format!("ASKING answered {h:?}"))),
                }
            }
            Ok(Ok(read_reply(c, want, &mut row)?))
        })();
        let got = match reply {
            Ok(Ok(Reply::Row)) => sink(i, Got::Row(&row)),
            Ok(Ok(Reply::Missing)) => sink(i, Got::Missing),
            Ok(Ok(Reply::Len(l))) => sink(i, Got::Len(l)),
            Ok(Ok(Reply::Error(e))) if asking => {
                // The slot may have moved on: ask again after reading the map.
                t.failed(i, format!("{addr}: {}", clip(&e)));
                Ok(())
            }
            Ok(Ok(Reply::Error(e))) => match t.redirected(i, addr, &e) {
                Ok(Some(to)) => {
                    asks.push((i, to));
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(()) => {
                    lane.row = row;
                    return Err(Abort::Fatal(i, e));
                }
            },
            Ok(Err(e)) => {
                failure = Some((k, e));
                break;
            }
            Err(e) => {
                failure = Some((k, e.to_string()));
                break;
            }
        };
        if let Err(e) = got {
            lane.row = row;
            return Err(Abort::Sink(e));
        }
    }
    lane.row = row;
    if let Some((k, e)) = failure {
        lane.conns.remove(addr);
        t.failed_all(&idx[k..], format!("{addr}: {e}"));
    }
    Ok(asks)
}

/// A table's rows in a Redis Cluster, decoded on the way out.
pub struct RedisRows {
    url: String,
    tid: String,
    format: RawFormat,
    rows: usize,
    dim: usize,
    opts: RedisOptions,
    wire: Wire,
    lanes: Mutex<Vec<Lane>>,
    misses: AtomicU64,
    bytes: AtomicU64,
    trips: AtomicU64,
    depth_sum: AtomicU64,
    in_flight: AtomicU64,
}

impl std::fmt::Debug for RedisRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RedisRows({}, table {}, {} [{} x {}], {} rows per round trip)",
            self.url,
            self.tid,
            self.format.name(),
            self.rows,
            self.dim,
            self.opts.batch
        )
    }
}

impl RedisRows {
    /// Opens table `id` in the cluster at `url` (`redis://HOST:PORT`): refused unless the
    /// store holds it complete, with the shape and format of `id`.
    pub fn open(url: &str, id: &TableId, opts: RedisOptions) -> Result<Self> {
        if opts.batch == 0 || opts.batch > MAX_BATCH {
            return Err(EngramError::invalid(
                "store batch",
                format!("1 to {MAX_BATCH} rows per round trip"),
                opts.batch,
            ));
        }
        let mut link = Link::new(url, &opts)?;
        let tid = id.tid();
        let t2 = tid.clone();
        let meta = link.run(move |c| read_meta(c, &t2))?;
        if meta.fields.is_empty() {
            let held: Vec<String> = list_tables(url, &opts)?
                .into_iter()
                .map(|(t, m)| {
                    format!(
                        "{t} ({} layer {}, {} rows)",
                        m.get("variant").unwrap_or("?"),
                        m.get("layer").unwrap_or("?"),
                        m.get("rows").unwrap_or("?")
                    )
                })
                .collect();
            return Err(store_err(
                url,
                format!(
                    "holds no table {tid} ({} layer {}, config {}, table sha256 {}); it holds {}; write it with `engram table push`",
                    id.variant,
                    id.layer,
                    id.config_digest,
                    id.table_digest.get(..16).unwrap_or(&id.table_digest),
                    if held.is_empty() { "none".to_string() } else { held.join(", ") }
                ),
            ));
        }
        if meta.get("complete") != Some("1") {
            return Err(store_err(
                url,
                format!(
                    "table {tid} is incomplete: {} of {} rows pushed and checked; resume with `engram table push`",
                    meta.shown("pushed"),
                    meta.shown("rows")
                ),
            ));
        }
        if meta.num("rows") != id.rows
            || meta.num("dim") != id.dim
            || meta.get("format") != Some(id.format.name())
            || meta.get("table_digest") != Some(id.table_digest.as_str())
        {
            return Err(store_err(
                url,
                format!(
                    "table {tid}: expected {} rows x {} {} (sha256 {}), the store has {} x {} {} (sha256 {})",
                    id.rows,
                    id.dim,
                    id.format.name(),
                    id.table_digest,
                    meta.shown("rows"),
                    meta.shown("dim"),
                    meta.shown("format"),
                    meta.shown("table_digest")
                ),
            ));
        }
        Ok(RedisRows {
            url: shown_url(url),
            tid,
            format: id.format,
            rows: id.rows,
            dim: id.dim,
            opts,
            wire: Wire::open(url, &opts)?,
            lanes: Mutex::new(Vec::new()),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            trips: AtomicU64::new(0),
            depth_sum: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        })
    }

    /// The table's name in the store.
    pub fn tid(&self) -> &str {
        &self.tid
    }

    /// One batch: one pipeline per node, decoded into `out` (`rows.len() · dim` values).
    fn batch(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        super::check_gather_len(rows.len(), self.dim, out.len())?;
        let mut lane = self
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let depth = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.depth_sum.fetch_add(depth, Ordering::Relaxed);
        self.trips.fetch_add(1, Ordering::Relaxed);
        let want = self.format.row_bytes(self.dim);
        let (dim, format, tid, url) = (self.dim, self.format, &self.tid, &self.url);
        let got = get_rows(
            &self.wire,
            &mut lane,
            &self.opts,
            tid,
            rows,
            want,
            &mut |i, got| match got {
                Got::Row(v) => {
                    format.decode(v, &mut out[i * dim..(i + 1) * dim]);
                    Ok(())
                }
                Got::Len(n) => Err(store_err(
                    url,
                    format!(
                        "table {tid}: row {} holds {n} bytes, expected {want}",
                        rows[i]
                    ),
                )),
                Got::Missing => Err(store_err(
                    url,
                    format!("table {tid}: row {} is missing", rows[i]),
                )),
            },
        );
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The lane dropped any connection that failed; the rest are sound.
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(lane);
        got?;
        self.bytes
            .fetch_add((want * rows.len()) as u64, Ordering::Relaxed);
        self.misses.fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl RowStore for RedisRows {
    fn rows(&self) -> usize {
        self.rows
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn in_memory(&self) -> bool {
        false
    }
    fn bf16_exact(&self) -> bool {
        self.format != RawFormat::F32
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.gather(&[r], out)
    }
    /// Batches of `batch` rows, up to `connections` of them in flight at once.
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        super::check_gather_len(rows.len(), self.dim, out.len())?;
        if let Some(&r) = rows.iter().find(|&&r| r >= self.rows) {
            super::fp8::check_row(r, self.rows)?;
        }
        let b = self.opts.batch.clamp(1, MAX_BATCH);
        let per = b
            .checked_mul(self.dim)
            .ok_or_else(|| EngramError::invalid("store batch", "rows x dim within memory", b))?;
        let jobs: Vec<(&[usize], &mut [f32])> = rows.chunks(b).zip(out.chunks_mut(per)).collect();
        if jobs.len() <= 1 {
            return jobs.into_iter().try_for_each(|(r, o)| self.batch(r, o));
        }
        let lanes = self.opts.connections.clamp(1, jobs.len());
        let mut per_lane: Vec<Vec<(&[usize], &mut [f32])>> =
            (0..lanes).map(|_| Vec::new()).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            per_lane[i % lanes].push(j);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = per_lane
                .into_iter()
                .map(|lane| {
                    s.spawn(move || lane.into_iter().try_for_each(|(r, o)| self.batch(r, o)))
                })
                .collect();
            // Every lane joined before any result is looked at.
            let results: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(store_err(&self.url, "a fetching thread panicked")))
                })
                .collect();
            results.into_iter().collect::<Result<()>>()
        })
    }
    fn stats(&self) -> StoreStats {
        StoreStats {
            hits: 0,
            misses: self.misses.load(Ordering::Relaxed),
            bytes_read: self.bytes.load(Ordering::Relaxed),
            reads: self.trips.load(Ordering::Relaxed),
            depth_sum: self.depth_sum.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    type Handler = Arc<dyn Fn(&[Vec<u8>]) -> Option<Vec<u8>> + Send + Sync>;

    /// A scripted node on loopback: each command (an array of bulk strings) gets
    /// `handler(args)` as its reply, or none (`None`: the node stays silent).
    fn fake_node(handler: Handler) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let h = handler.clone();
                std::thread::spawn(move || {
                    let Ok(mut c) = resp::Conn::over(s) else {
                        return;
                    };
                    let _ = c.set_timeout(Duration::from_secs(30));
                    loop {
                        let Ok(resp::Head::Array(n)) = c.head() else {
                            return;
                        };
                        let mut args = Vec::new();
                        for _ in 0..n {
                            let Ok(resp::Head::Bulk(len)) = c.head() else {
                                return;
                            };
                            let mut a = vec![0u8; len];
                            if c.payload(&mut a).is_err() {
                                return;
                            }
                            args.push(a);
                        }
                        if let Some(reply) = h(&args) {
                            if c.send(&reply).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn slots_reply(addr: &str) -> Vec<u8> {
        let (host, port) = addr.rsplit_once(':').unwrap();
        format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n${}\r\n{host}\r\n:{port}\r\n",
            host.len()
        )
        .into_bytes()
    }

    /// Row `r`'s 4 bytes: `R` and three digits.
    fn row_reply(key: &[u8]) -> Vec<u8> {
        let r: usize = std::str::from_utf8(key)
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        format!("$4\r\nR{r:03}\r\n").into_bytes()
    }

    fn wire(addr: &str) -> Wire {
        let o = RedisOptions {
            timeout: Duration::from_millis(300),
            deadline: Duration::from_secs(5),
            ..Default::default()
        };
        Wire::open(&format!("redis://{addr}"), &o).unwrap()
    }

    fn read(w: &Wire, lane: &mut Lane, o: &RedisOptions, rows: &[usize]) -> Result<Vec<String>> {
        let mut got = vec![String::new(); rows.len()];
        get_rows(w, lane, o, "t", rows, 4, &mut |i, g| {
            got[i] = match g {
                Got::Row(v) => String::from_utf8_lossy(v).into_owned(),
                Got::Missing => "missing".into(),
                Got::Len(n) => format!("len {n}"),
            };
            Ok(())
        })?;
        Ok(got)
    }

    /// A node importing a slot that refuses `ASKING` once (`LOADING`): the connection is given
    /// up, so the `GET` reply it still owes is never read as another row's.
    #[test]
    fn a_refused_asking_never_shifts_replies() {
        // The first ASKING and the GET after it are refused, as a node still loading does.
        let (ask_no, get_no) = (Arc::new(AtomicUsize::new(1)), Arc::new(AtomicUsize::new(1)));
        let refuse = |n: &AtomicUsize| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
                .is_ok()
        };
        let b = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            let loading = b"-LOADING Redis is loading the dataset in memory\r\n".to_vec();
            Some(match a[0].as_slice() {
                b"ASKING" if refuse(&ask_no) => loading,
                b"ASKING" => b"+OK\r\n".to_vec(),
                b"GET" if refuse(&get_no) => loading,
                b"GET" => row_reply(&a[1]),
                _ => b"-ERR unknown\r\n".to_vec(),
            })
        }));
        let a_addr = Arc::new(Mutex::new(String::new()));
        let a2 = a_addr.clone();
        let b2 = b.clone();
        let a = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            Some(match a[0].as_slice() {
                b"CLUSTER" => slots_reply(&a2.lock().unwrap()),
                // Rows 7 and 8 are being migrated to B and are there already.
                b"GET" if a[1].ends_with(b":7") || a[1].ends_with(b":8") => {
                    format!("-ASK 1 {b2}\r\n").into_bytes()
                }
                b"GET" => row_reply(&a[1]),
                _ => b"-ERR unknown\r\n".to_vec(),
            })
        }));
        *a_addr.lock().unwrap() = a.clone();
        let w = wire(&a);
        let o = RedisOptions {
            timeout: Duration::from_millis(300),
            deadline: Duration::from_secs(5),
            ..Default::default()
        };
        let mut lane = Lane::default();
        assert_eq!(read(&w, &mut lane, &o, &[7, 1]).unwrap(), ["R007", "R001"]);
        assert_eq!(
            read(&w, &mut lane, &o, &[7, 8, 2]).unwrap(),
            ["R007", "R008", "R002"]
        );
    }

    /// Rows sent by `ASK` to a node that accepts and never answers: the call fails by its
    /// deadline (one try's waits are cut to what is left of it), naming the node.
    #[test]
    fn a_silent_node_cannot_hold_a_read_past_its_deadline() {
        let c = fake_node(Arc::new(|_: &[Vec<u8>]| None));
        let a_addr = Arc::new(Mutex::new(String::new()));
        let a2 = a_addr.clone();
        let c2 = c.clone();
        let a = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            Some(match a[0].as_slice() {
                b"CLUSTER" => slots_reply(&a2.lock().unwrap()),
                _ => format!("-ASK 1 {c2}\r\n").into_bytes(),
            })
        }));
        *a_addr.lock().unwrap() = a.clone();
        let w = wire(&a);
        let o = RedisOptions {
            timeout: Duration::from_millis(200),
            deadline: Duration::from_millis(600),
            ..Default::default()
        };
        let rows: Vec<usize> = (0..40).collect();
        let t0 = Instant::now();
        let e = read(&w, &mut Lane::default(), &o, &rows)
            .unwrap_err()
            .to_string();
        let took = t0.elapsed();
        assert!(e.contains(&c), "{e}");
        // Bounded by the deadline plus one wait and the final CLUSTER NODES probe, not by
        // rows × timeout (8 s here).
        assert!(took < Duration::from_secs(4), "{took:?}: {e}");
    }

    /// A `GET` answered with an error no retry helps fails at once, naming the row's key, with
    /// a long reply cut short.
    #[test]
    fn a_fatal_get_names_the_row_key() {
        let a_addr = Arc::new(Mutex::new(String::new()));
        let a2 = a_addr.clone();
        let a = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            Some(match a[0].as_slice() {
                b"CLUSTER" => slots_reply(&a2.lock().unwrap()),
                b"GET" if a[1].ends_with(b":3") => {
                    format!("-WRONGTYPE {}\r\n", "x".repeat(2000)).into_bytes()
                }
                b"GET" => row_reply(&a[1]),
                _ => b"-ERR unknown\r\n".to_vec(),
            })
        }));
        *a_addr.lock().unwrap() = a.clone();
        let w = wire(&a);
        let o = RedisOptions {
            timeout: Duration::from_millis(300),
            deadline: Duration::from_secs(20),
            ..Default::default()
        };
        let t0 = Instant::now();
        let e = read(&w, &mut Lane::default(), &o, &[1, 3, 5])
            .unwrap_err()
            .to_string();
        assert!(e.contains("GET eg:t:3 answered WRONGTYPE"), "{e}");
        assert!(e.contains("(2010 characters)") && e.len() < 600, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{e}");
    }

    /// `list_tables`' error against the node at `addr`, and how long it took.
    fn tables_error(addr: &str, timeout: Duration, deadline: Duration) -> (String, Duration) {
        let o = RedisOptions {
            timeout,
            deadline,
            ..Default::default()
        };
        let t0 = Instant::now();
        let e = list_tables(&format!("redis://{addr}"), &o).unwrap_err();
        (e.to_string(), t0.elapsed())
    }

    /// A server that answers `PING` and every other command with an error, as a Redis
    /// without cluster mode does: the store's error carries the server's own words (not a
    /// missing reply) and comes at once, not after retries until the deadline.
    #[test]
    fn a_server_that_answers_with_an_error_is_named_with_its_words() {
        let a = fake_node(Arc::new(|a: &[Vec<u8>]| {
            Some(match a[0].as_slice() {
                b"PING" => b"+PONG\r\n".to_vec(),
                _ => b"-ERR This instance has cluster support disabled\r\n".to_vec(),
            })
        }));
        let (e, took) = tables_error(&a, Duration::from_millis(200), Duration::from_secs(20));
        // The first probe of the node quotes its answer.
        assert!(
            e.contains("answers CLUSTER SLOTS with") && e.contains("cluster support disabled"),
            "{e}"
        );
        assert!(!e.contains("does not answer"), "{e}");
        assert!(e.contains(&a), "{e}");
        assert!(took < Duration::from_secs(4), "{e}");
    }

    /// A server whose first reply announces a bulk string of 2^63 bytes and then streams
    /// bytes without end (not Redis, or a hostile node): the control commands refuse it by
    /// the deadline, from the first probe's bounded parser, instead of reading and
    /// allocating until memory runs out.
    #[test]
    fn an_endless_reply_is_refused_by_the_deadline() {
        use std::io::{Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut first = [0u8; 64];
                    let _ = s.read(&mut first);
                    let _ = s.write_all(b"$9223372036854775807\r\n");
                    let chunk = vec![b'x'; 1 << 16];
                    while s.write_all(&chunk).is_ok() {}
                });
            }
        });
        let (e, took) = tables_error(&addr, Duration::from_millis(200), Duration::from_secs(1));
        assert!(
            e.contains("a bulk reply of 9223372036854775807 bytes"),
            "{e}"
        );
        assert!(e.contains(&addr), "{e}");
        assert!(took < Duration::from_secs(4), "{e}");
    }

    /// An answer no retry changes (`WRONGTYPE` here; `OOM` under `noeviction` alike) fails
    /// the control command at once, in the server's words, instead of being retried until
    /// the deadline.
    #[test]
    fn an_answer_no_retry_changes_fails_at_once() {
        let me = Arc::new(Mutex::new(String::new()));
        let me2 = me.clone();
        let a = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            Some(match a[0].to_ascii_uppercase().as_slice() {
                b"CLUSTER" => slots_reply(&me2.lock().unwrap()),
                b"PING" => b"+PONG\r\n".to_vec(),
                b"SMEMBERS" => {
                    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
                        .to_vec()
                }
                _ => b"-ERR unknown command\r\n".to_vec(),
            })
        }));
        *me.lock().unwrap() = a.clone();
        let (e, took) = tables_error(&a, Duration::from_millis(500), Duration::from_secs(20));
        assert!(
            e.contains("the store answered") && e.contains("WRONGTYPE"),
            "{e}"
        );
        assert!(took < Duration::from_secs(5), "{e}");
    }

    /// `CLUSTER NODES` read for an error message: failing nodes and unserved slots named.
    #[test]
    fn cluster_health_names_failing_nodes_and_unserved_slots() {
        let me = Arc::new(Mutex::new(String::new()));
        let me2 = me.clone();
        let a = fake_node(Arc::new(move |a: &[Vec<u8>]| {
            Some(match a[0].as_slice() {
                b"CLUSTER" if a[1].eq_ignore_ascii_case(b"SLOTS") => {
                    slots_reply(&me2.lock().unwrap())
                }
                b"CLUSTER" => {
                    let t = "n1 10.0.0.1:7000@17000 master - 0 0 1 connected 0-8000 \
                             [8001->-n2]\nn2 10.0.0.2:7001@17001 master,fail - 0 0 2 \
                             connected 9000-16383\n";
                    format!("${}\r\n{t}\r\n", t.len()).into_bytes()
                }
                _ => b"-ERR unknown command\r\n".to_vec(),
            })
        }));
        *me.lock().unwrap() = a.clone();
        let w = wire(&a);
        let h = cluster_health(&w, &RedisOptions::default());
        assert_eq!(
            h,
            "failing: 10.0.0.2:7001 (master,fail); 999 of 16384 slots served by no node"
        );
    }

    /// A password in a store's URL never reaches a message.
    #[test]
    fn passwords_are_not_shown() {
        for (url, shown) in [
            ("redis://u:secret@h:1", "redis://u:***@h:1"),
            ("redis://:secret@h:1", "redis://:***@h:1"),
            ("redis://secret@h:1", "redis://***@h:1"),
            ("redis://h:1", "redis://h:1"),
            ("h:1", "h:1"),
        ] {
            assert_eq!(shown_url(url), shown);
        }
        let e = store_err("redis://u:secret@h:1", "x").to_string();
        assert!(!e.contains("secret") && e.contains("u:***@h:1"), "{e}");
    }

    /// A meta field that is not a number shows as the store holds it (escaped, cut), not as
    /// the 0 it compares as.
    #[test]
    fn meta_fields_show_as_stored() {
        let mut m = TableMeta::default();
        m.fields.insert("rows".into(), "abc".into());
        m.fields.insert("dim".into(), "x\n".repeat(50));
        assert_eq!((m.num("rows"), m.shown("rows")), (0, "abc".to_string()));
        assert_eq!(m.shown("format"), "?");
        let dim = m.shown("dim");
        assert!(dim.starts_with("x\\nx\\n") && dim.ends_with('…'), "{dim}");
    }
}
