//! Rows read straight from the table's file with `O_DIRECT` (no page cache): each row is one
//! aligned read of the 4 KiB blocks that hold its codes, issued by a
//! pool of reader threads (one per read in flight, [`super::DEFAULT_IO_DEPTH`] unless told
//! otherwise) so that many reads are in flight at once.
//!
//! Why threads and not io_uring: on this project's test machine `fio` reads as many 4 KiB
//! blocks per second from 64 `psync` threads as from one io_uring at depth 64 (README, row
//! stores); a blocking reader pool needs no extra crate and runs on every Unix.

use super::fp8::{check_row, decode_row, BLOCK};
use super::{RowFormat, RowStore, StoreStats};
use crate::error::{EngramError, Result};
use crate::tensors::RawTensor;
use rayon::prelude::*;
use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Alignment of direct reads (the largest logical block size in common use).
const ALIGN: usize = 4096;

/// A buffer aligned to [`ALIGN`], grown on demand (one per reader thread).
struct Aligned {
    ptr: *mut u8,
    cap: usize,
}

impl Aligned {
    fn get(&mut self, n: usize) -> &mut [u8] {
        if n == 0 {
            return &mut [];
        }
        if n > self.cap {
            self.free();
            let cap = n.next_multiple_of(ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, ALIGN).expect("aligned layout");
            // SAFETY: `layout` has a non-zero size (n > 0, rounded up to ALIGN); zeroed, so
            // the slice below is initialised.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = p;
            self.cap = cap;
        }
        // SAFETY: `ptr` holds `cap >= n > 0` initialised bytes owned by this buffer, borrowed
        // mutably through `&mut self` only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }
    }

    fn free(&mut self) {
        if self.cap > 0 {
            let layout =
                std::alloc::Layout::from_size_align(self.cap, ALIGN).expect("aligned layout");
            // SAFETY: `ptr` was allocated with this layout and is freed once.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
            self.cap = 0;
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        self.free();
    }
}

thread_local! {
    static BUF: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
}

/// A table read from its file on demand: fp8 (e4m3 codes + e8m0 scales), f32 or bf16.
pub struct DirectRows {
    /// fp8: e4m3 codes read from the file, e8m0 scales held in memory (1/32 of the codes'
    /// size; reading them would double the reads per row).
    format: RowFormat,
    file: File,
    path: PathBuf,
    /// Whether the file really is open with `O_DIRECT` (some file systems refuse it; then the
    /// reads go through the page cache).
    direct: bool,
    rows: usize,
    dim: usize,
    codes_at: u64,
    /// An fp8 table's scales, copied into memory at open.
    scales: Option<crate::tensors::RawTensor>,
    /// The file's length and modification time when opened: a change is an error.
    stamp: (u64, Option<std::time::SystemTime>),
    misses: AtomicU64,
    bytes: AtomicU64,
    reads: AtomicU64,
    depth_sum: AtomicU64,
    in_flight: AtomicU64,
    /// Reader threads (the queue depth a gather reaches), started on first use.
    io_depth: usize,
    pool: OnceLock<std::result::Result<rayon::ThreadPool, String>>,
}

impl std::fmt::Debug for DirectRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirectRows({}, {:?} [{} x {}], {}, {} reads in flight)",
            self.path.display(),
            self.format,
            self.rows,
            self.dim,
            if self.direct {
                "O_DIRECT"
            } else {
                "page cache: the file system refused O_DIRECT"
            },
            self.io_depth
        )
    }
}

fn open_direct(path: &Path) -> Result<(File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            return Ok((f, true));
        }
    }
    let f = File::open(path).map_err(|e| EngramError::io(path, e))?;
    Ok((f, false))
}

/// Refuses a file at `path` that is not the one the tensor was mapped from.
fn same_file(f: &File, path: &Path, t: &RawTensor) -> Result<()> {
    let (now, then) = (crate::tensors::file_identity(f), t.file_identity());
    if now.is_some() && then.is_some() && now != then {
        return Err(EngramError::invalid(
            format!("table file {}", path.display()),
            "the file the checkpoint was opened from",
            "another file, put at its path since",
        ));
    }
    Ok(())
}

fn stamp(f: &File, path: &Path) -> Result<(u64, Option<std::time::SystemTime>)> {
    let m = f.metadata().map_err(|e| EngramError::io(path, e))?;
    Ok((m.len(), m.modified().ok()))
}

impl DirectRows {
    /// Opens the file holding `codes` (`[rows, dim]` e4m3, as located by a checkpoint);
    /// `scales` (`[rows, dim/32]` e8m0) are copied into memory.
    pub fn open_fp8(
        codes: &RawTensor,
        scales: &RawTensor,
        rows: usize,
        dim: usize,
    ) -> Result<Self> {
        // Dtypes and shapes, as the mapped table checks them.
        super::fp8::Fp8Table::new("embed.weight", codes.clone(), scales.clone(), rows, dim)?;
        if !dim.is_multiple_of(BLOCK) {
            return Err(EngramError::invalid(
                "table-io direct",
                format!("rows of a multiple of {BLOCK} values"),
                dim,
            ));
        }
        let Some((path, codes_at)) = codes.location() else {
            return Err(EngramError::invalid(
                "table-io direct",
                "a table in a file on disk",
                "a table given as bytes",
            ));
        };
        let scales = scales.to_owned_bytes("the fp8 table's scales (--table-io direct)")?;
        Self::open(
            RowFormat::Fp8,
            codes,
            path,
            codes_at,
            Some(scales),
            rows,
            dim,
        )
    }

    /// Opens the file holding a dense f32 or bf16 table `[rows, dim]` (a demo-layer table).
    pub fn open_dense(t: &RawTensor, rows: usize, dim: usize) -> Result<Self> {
        let format = match t.dtype {
            safetensors::Dtype::F32 => RowFormat::F32,
            safetensors::Dtype::BF16 => RowFormat::Bf16,
            d => {
                return Err(EngramError::invalid(
                    "table-io direct",
                    "an f32, bf16 or fp8 table",
                    format!("{d:?}"),
                ))
            }
        };
        // The reads go by `rows` and `dim`: they must be the tensor's own, or rows would
        // come from the bytes of neighbouring tensors.
        let elem = if format == RowFormat::F32 { 4 } else { 2 };
        let bytes = rows.checked_mul(dim).and_then(|n| n.checked_mul(elem));
        if t.shape != [rows, dim] || bytes != Some(t.data().len()) {
            return Err(EngramError::Shape {
                name: "table-io direct: the table".into(),
                expected: vec![rows, dim],
                found: t.shape.clone(),
            });
        }
        let Some((path, at)) = t.location() else {
            return Err(EngramError::invalid(
                "table-io direct",
                "a table in a file on disk",
                "a table given as bytes",
            ));
        };
        Self::open(format, t, path, at, None, rows, dim)
    }

    /// Opens `path` (the file `t` was mapped from: another file put at its path is refused)
    /// for rows at `codes_at`.
    fn open(
        format: RowFormat,
        t: &RawTensor,
        path: &Path,
        codes_at: u64,
        scales: Option<RawTensor>,
        rows: usize,
        dim: usize,
    ) -> Result<Self> {
        let (file, direct) = open_direct(path)?;
        same_file(&file, path, t)?;
        let stamp = stamp(&file, path)?;
        Ok(DirectRows {
            format,
            file,
            path: path.to_path_buf(),
            direct,
            rows,
            dim,
            codes_at,
            scales,
            stamp,
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            depth_sum: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            io_depth: super::DEFAULT_IO_DEPTH,
            pool: OnceLock::new(),
        })
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Keeps up to `n` reads in flight (at least 1, at most [`super::MAX_IO_DEPTH`] reader
    /// threads).
    pub fn with_io_depth(mut self, n: usize) -> Self {
        self.io_depth = n.clamp(1, super::MAX_IO_DEPTH);
        self
    }

    fn readers(&self) -> Result<&rayon::ThreadPool> {
        self.pool
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.io_depth)
                    .thread_name(|i| format!("engram-io-{i}"))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| {
                EngramError::invalid(
                    "table-io direct",
                    format!("{} reader threads", self.io_depth),
                    format!("none could start: {e}"),
                )
            })
    }

    /// `len` bytes at `off` of the file, through an aligned buffer.
    fn read(&self, off: u64, len: usize, out: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let start = off & !(ALIGN as u64 - 1);
        let end = (off + len as u64).next_multiple_of(ALIGN as u64);
        let want = (off - start) as usize + len;
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            let buf = b.get((end - start) as usize);
            let mut got = 0;
            let depth = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            self.depth_sum.fetch_add(depth, Ordering::Relaxed);
            self.reads.fetch_add(1, Ordering::Relaxed);
            let res = loop {
                if got >= want {
                    break Ok(());
                }
                match self.file.read_at(&mut buf[got..], start + got as u64) {
                    Ok(0) => break Ok(()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(EngramError::io(&self.path, e)),
                }
            };
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            res?;
            self.bytes.fetch_add(got as u64, Ordering::Relaxed);
            if got < want {
                return Err(EngramError::invalid(
                    format!("table file {}", self.path.display()),
                    format!("{want} bytes at offset {start}"),
                    format!("{got} (the file was truncated while in use)"),
                ));
            }
            let s = (off - start) as usize;
            out.copy_from_slice(&buf[s..s + len]);
            Ok(())
        })
    }

    fn check_unchanged(&self) -> Result<()> {
        let now = stamp(&self.file, &self.path)?;
        if now != self.stamp {
            return Err(EngramError::invalid(
                format!("table file {}", self.path.display()),
                format!("unchanged while in use ({} bytes)", self.stamp.0),
                format!("{} bytes, modified since it was opened", now.0),
            ));
        }
        Ok(())
    }

    fn fetch(&self, r: usize, out: &mut [f32]) -> Result<()> {
        check_row(r, self.rows)?;
        let d = self.dim;
        let mut raw = [0u8; 4 * 4096];
        match self.format {
            RowFormat::Fp8 => {
                let blocks = d / BLOCK;
                if d > 4096 {
                    return Err(EngramError::invalid(
                        "table-io direct",
                        "rows of at most 4096 values",
                        d,
                    ));
                }
                self.read(self.codes_at + (r * d) as u64, d, &mut raw[..d])?;
                let scales =
                    &self.scales.as_ref().expect("fp8 scales").data()[r * blocks..(r + 1) * blocks];
                decode_row(&raw[..d], scales, out);
            }
            RowFormat::F32 | RowFormat::Bf16 => {
                let n = self.format.row_bytes(d);
                if n > raw.len() {
                    return Err(EngramError::invalid(
                        "table-io direct",
                        "rows of at most 4096 values",
                        d,
                    ));
                }
                self.read(self.codes_at + (r * n) as u64, n, &mut raw[..n])?;
                self.format.decode(&raw[..n], out);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl RowStore for DirectRows {
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
        // fp8 rows are rounded to bf16 as decoded; a bf16 table's values are bf16.
        self.format != RowFormat::F32
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.check_unchanged()?;
        self.fetch(r, out)?;
        // A write that overlapped the read shows in the stamp afterwards.
        self.check_unchanged()
    }
    /// Every row's reads in flight at once, on the reader threads.
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        super::check_gather_len(rows.len(), self.dim, out.len())?;
        self.check_unchanged()?;
        let d = self.dim;
        self.readers()?.install(|| {
            rows.par_iter()
                .zip(out.par_chunks_mut(d))
                .with_max_len(1)
                .try_for_each(|(&r, o)| self.fetch(r, o))
        })?;
        self.check_unchanged()
    }
    fn stats(&self) -> StoreStats {
        StoreStats {
            hits: 0,
            misses: self.misses.load(Ordering::Relaxed),
            bytes_read: self.bytes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            depth_sum: self.depth_sum.load(Ordering::Relaxed),
        }
    }
}
