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
