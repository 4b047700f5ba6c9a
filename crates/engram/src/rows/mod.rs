//! Where a table's rows live, chosen at load time and invisible to the math: in the
//! memory-mapped file ([`fp8::Fp8Table`]), read from the file with direct I/O
//! ([`direct::DirectRows`]), behind a hot-row cache with a byte budget ([`cache::CachedRows`]).
//! A layer asks one question of a store: the decoded values of these rows.

pub mod cache;
pub mod direct;
pub mod fp8;

use crate::error::Result;

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
    /// the reads together.
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        let d = self.dim();
        for (r, o) in rows.iter().zip(out.chunks_exact_mut(d)) {
            self.row_into(*r, o)?;
        }
        Ok(())
    }
    /// A hint: these rows will be asked for soon.
    fn prefetch(&self, _rows: &[usize]) {}
    /// Forgets every row held in memory (a cache starts cold again).
    fn clear(&self) {}
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
}

/// How a layer's table is stored, chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableIo {
    /// Memory-mapped (the page cache decides what stays resident).
    #[default]
    Mmap,
    /// Read with `O_DIRECT` (no page cache), rows on demand.
    Direct,
}

impl std::str::FromStr for TableIo {
    type Err = crate::EngramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mmap" => Ok(TableIo::Mmap),
            "direct" => Ok(TableIo::Direct),
            o => Err(crate::EngramError::invalid(
                "table-io",
                "`mmap` or `direct`",
                o,
            )),
        }
    }
}

/// Where a layer's table rows come from (chosen at load time; the outputs are the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// Memory-mapped or direct I/O.
    pub io: TableIo,
    /// A hot-row cache of this many bytes in front of the store.
    pub cache_bytes: Option<u64>,
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
