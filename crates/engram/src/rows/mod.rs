//! Where a table's rows live, chosen at load time and invisible to the math: in the
//! memory-mapped file ([`fp8::Fp8Table`]), read from the file with direct I/O
//! ([`direct::DirectRows`]), behind a hot-row cache with a byte budget ([`cache::CachedRows`]).
//! A layer asks one question of a store: the decoded values of these rows.

pub mod ahead;
pub mod cache;
pub mod direct;
pub mod fp8;
pub mod redis;
pub mod resp;

use crate::error::Result;

/// How a row's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// `dim` little-endian f32.
    F32,
    /// `dim` little-endian bf16.
    Bf16,
    /// `dim` e4m3 codes, then `dim/32` e8m0 scales.
    Fp8,
}

impl RowFormat {
    /// `f32`, `bf16` or `fp8`.
    pub fn name(self) -> &'static str {
        match self {
            RowFormat::F32 => "f32",
            RowFormat::Bf16 => "bf16",
            RowFormat::Fp8 => "fp8",
        }
    }

    /// Bytes of one row of `dim` values.
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            RowFormat::F32 => 4 * dim,
            RowFormat::Bf16 => 2 * dim,
            RowFormat::Fp8 => dim + dim / fp8::BLOCK,
        }
    }

    /// Decodes one row's bytes into `out` (`dim` values): the same values every store gives
    /// for them.
    pub fn decode(self, raw: &[u8], out: &mut [f32]) {
        match self {
            RowFormat::F32 => {
                for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            RowFormat::Bf16 => {
                // A bf16 is the high half of the f32 with the same bits.
                for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            RowFormat::Fp8 => {
                let d = out.len();
                fp8::decode_row(&raw[..d], &raw[d..], out);
            }
        }
    }
}

/// A table of rows `[rows, dim]`, decoded to f32 on the way out.
pub trait RowStore: Send + Sync + std::fmt::Debug {
    /// Rows.
    fn rows(&self) -> usize;
    /// Values per row.
    fn dim(&self) -> usize;
    /// Row `r` decoded into `out` (`dim` values). An I/O failure or a row that changed under
    /// the store is an error, never wrong values.
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()>;
    /// Rows `rows` decoded into `out` (`rows.len() · dim` values). Stores that read files issue
    /// the reads together, on threads of their own: a gather may run while every worker of
    /// the global rayon pool waits for it, so it must not need that pool.
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        let d = self.dim();
        check_gather_len(rows.len(), d, out.len())?;
        for (r, o) in rows.iter().zip(out.chunks_exact_mut(d)) {
            self.row_into(*r, o)?;
        }
        Ok(())
    }
    /// A hint: these rows will be asked for soon.
    fn prefetch(&self, _rows: &[usize]) {}
    /// Forgets every row held in memory (a cache starts cold again).
    fn clear(&self) {}
    /// Whether rows come from memory (RAM, a mapped file, a cache over those): a layer then
    /// gathers in place; a store that reads files (or a network) is gathered ahead of compute.
    fn in_memory(&self) -> bool {
        true
    }
    /// Whether every value this store gives is exactly a bf16 (a bf16 table, or fp8 rows
    /// decoded and rounded to bf16): a cache may then keep rows in 2 bytes per value.
    fn bf16_exact(&self) -> bool {
        false
    }
    /// Counters since the store was made: (hits, misses, bytes read from the file).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// `out` must hold `rows · dim` values.
pub(crate) fn check_gather_len(rows: usize, dim: usize, out: usize) -> Result<()> {
    if rows.checked_mul(dim) != Some(out) {
        return Err(crate::EngramError::invalid(
            "gather output",
            format!("{rows} rows of {dim} values"),
            format!("{out} values"),
        ));
    }
    Ok(())
}

/// What a store has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Rows served from memory (cache hits, or every row of a mapped/RAM store).
    pub hits: u64,
    /// Rows that needed a read from the file.
    pub misses: u64,
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Reads issued to the file (one per row read).
    pub reads: u64,
    /// Sum over reads of the reads in flight when each was issued (itself included):
    /// `depth_sum / reads` is the mean queue depth a read found.
    pub depth_sum: u64,
}

impl StoreStats {
    /// Counters from `before` to `self`.
    pub fn since(&self, before: &StoreStats) -> StoreStats {
        StoreStats {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            bytes_read: self.bytes_read - before.bytes_read,
            reads: self.reads - before.reads,
            depth_sum: self.depth_sum - before.depth_sum,
        }
    }

    /// Share of lookups served from memory.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }

    /// Mean number of reads in flight that a read found when issued (0 without reads).
    pub fn io_depth_mean(&self) -> f64 {
        if self.reads == 0 {
            0.0
        } else {
            self.depth_sum as f64 / self.reads as f64
        }
    }
}

/// How a layer's table is stored, chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableIo {
    /// Memory-mapped (the page cache decides what stays resident).
    #[default]
    Mmap,
    /// Copied into process memory at load (the table must fit in RAM).
    Ram,
    /// Read with `O_DIRECT` (no page cache), rows on demand.
    Direct,
}

impl TableIo {
    /// The name `--table-io` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            TableIo::Mmap => "mmap",
            TableIo::Ram => "ram",
            TableIo::Direct => "direct",
        }
    }
}

impl std::str::FromStr for TableIo {
    type Err = crate::EngramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mmap" => Ok(TableIo::Mmap),
            "ram" => Ok(TableIo::Ram),
            "direct" => Ok(TableIo::Direct),
            o => Err(crate::EngramError::invalid(
                "table-io",
                "`ram`, `mmap` or `direct`",
                o,
            )),
        }
    }
}

/// Which rows a hot-row cache keeps when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// S3-FIFO (Yang et al., SOSP 2023): new rows enter a small FIFO and reach the main one
    /// only if read again; rows evicted from the small queue are remembered (keys only) so
    /// that their next read admits them straight to the main queue. Resists one-off scans.
    #[default]
    S3Fifo,
    /// CLOCK (second chance): a row read since the hand last passed survives one sweep.
    Clock,
    /// Least recently used.
    Lru,
}

impl std::str::FromStr for CachePolicy {
    type Err = crate::EngramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "s3fifo" | "s3-fifo" => Ok(CachePolicy::S3Fifo),
            "clock" => Ok(CachePolicy::Clock),
            "lru" => Ok(CachePolicy::Lru),
            o => Err(crate::EngramError::invalid(
                "table-cache-policy",
                "`s3fifo`, `clock` or `lru`",
                o,
            )),
        }
    }
}

/// Reads a direct store keeps in flight unless told otherwise (the queue depth at which
/// `fio` measures a disk's random-read limit).
pub const DEFAULT_IO_DEPTH: usize = 64;

/// The most reads a direct store keeps in flight (one reader thread each).
pub const MAX_IO_DEPTH: usize = 1024;

/// Where a layer's table rows come from (chosen at load time; the outputs are the same).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// In RAM, memory-mapped, or direct I/O.
    pub io: TableIo,
    /// A hot-row cache of this many bytes in front of the store.
    pub cache_bytes: Option<u64>,
    /// The cache's eviction policy.
    pub cache_policy: CachePolicy,
    /// Reads in flight for the direct store (reader threads); `None`: [`DEFAULT_IO_DEPTH`].
    pub io_depth: Option<usize>,
    /// Rows from a Redis Cluster at this URL (`redis://HOST:PORT`) instead of the file; the
    /// file still names and fingerprints the table ([`redis::TableId`]).
    pub store: Option<String>,
    /// Timeouts, retries and batching of a remote store.
    pub store_options: redis::RedisOptions,
}

impl TableOptions {
    /// `store` behind the cache these options ask for (or `store` itself). A cache holds
    /// at most every row of the table, and must fit in the memory available now.
    pub fn cached(
        &self,
        store: std::sync::Arc<dyn RowStore>,
    ) -> Result<std::sync::Arc<dyn RowStore>> {
        Ok(match self.cache_bytes {
            Some(b) => {
                let (rows, slot_bytes) = cache::CachedRows::capacity_for(store.as_ref(), b);
                let mut plan = crate::budget::MemoryPlan::new();
                plan.add(
                    "the row cache (--table-cache / table_cache)",
                    rows as u64,
                    slot_bytes,
                )?;
                plan.check()?;
                std::sync::Arc::new(cache::CachedRows::with_policy(store, b, self.cache_policy)?)
            }
            None => store,
        })
    }
}

/// Parses a byte size: `512M`, `2G`, `64k`, `1000` (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            crate::EngramError::invalid("size", "a byte count like 512M, 2G, 64k or 1000", s)
        })
}
