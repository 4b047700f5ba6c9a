//! Weights of one Engram layer, read and written by their PyTorch state-dict names.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::tensors::{dtype_name, FileBytes, TensorFile, TensorWriter};
use half::{bf16, f16};
use safetensors::Dtype;
use std::path::Path;
use std::sync::Arc;

/// State-dict name of the multi-head embedding table.
pub const TABLE: &str = "multi_head_embedding.embedding.weight";
/// State-dict name of the head offsets buffer.
pub const OFFSETS: &str = "multi_head_embedding.offsets";

/// Storage of the embedding table: owned, or a view into a memory-mapped file.
#[derive(Clone)]
enum TableData {
    F32(Arc<Vec<f32>>),
    Bf16(Arc<Vec<bf16>>),
    Mapped {
        mmap: FileBytes,
        start: usize,
        dtype: Dtype,
    },
    /// Rows from a row store (direct I/O, a cache): read on demand, decoded to f32.
    Store(Arc<dyn crate::rows::RowStore>),
}

/// The multi-head embedding table `[rows, d]` (all heads stacked; head h starts at offset_h).
#[derive(Clone)]
pub struct EmbeddingTable {
    data: TableData,
    rows: usize,
    dim: usize,
}

impl std::fmt::Debug for EmbeddingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EmbeddingTable[{} x {}, {}]",
            self.rows,
            self.dim,
            self.dtype_name()
        )
    }
}

impl crate::tensors::RowSource for EmbeddingTable {
    fn rows(&self) -> usize {
        self.rows
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.try_row_into(r, out)
    }
}

impl crate::rows::RowStore for EmbeddingTable {
    fn rows(&self) -> usize {
        self.rows
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        self.try_row_into(r, out)
    }
    fn prefetch(&self, rows: &[usize]) {
        for &r in rows {
            self.prefetch_row(r);
        }
    }
    fn stats(&self) -> crate::rows::StoreStats {
        self.store_stats().unwrap_or_default()
    }
    fn bf16_exact(&self) -> bool {
        match &self.data {
            TableData::Bf16(_) => true,
            TableData::Mapped { dtype, .. } => *dtype == Dtype::BF16,
            TableData::Store(s) => s.bf16_exact(),
            TableData::F32(_) => false,
        }
    }
}

impl EmbeddingTable {
    /// An owned f32 table.
    pub fn from_f32(data: Vec<f32>, rows: usize, dim: usize) -> Result<Self> {
        if rows.checked_mul(dim) != Some(data.len()) {
            return Err(EngramError::Shape {
                name: TABLE.into(),
                expected: vec![rows, dim],
                found: vec![data.len()],
            });
        }
        Ok(EmbeddingTable {
            data: TableData::F32(Arc::new(data)),
            rows,
            dim,
        })
    }

    /// An owned bf16 table from raw bf16 bit patterns.
    pub fn from_bf16_bits(bits: Vec<u16>, rows: usize, dim: usize) -> Result<Self> {
        if rows.checked_mul(dim) != Some(bits.len()) {
            return Err(EngramError::Shape {
                name: TABLE.into(),
                expected: vec![rows, dim],
                found: vec![bits.len()],
            });
        }
        Ok(EmbeddingTable {
            data: TableData::Bf16(Arc::new(bytemuck::cast_vec(bits))),
            rows,
            dim,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row width d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `f32`, `bf16` or `f16`.
    pub fn dtype_name(&self) -> &'static str {
        match &self.data {
            TableData::F32(_) => "f32",
            TableData::Bf16(_) => "bf16",
            TableData::Mapped { dtype, .. } => match dtype {
                Dtype::F32 => "f32",
                Dtype::BF16 => "bf16",
                _ => "f16",
            },
            TableData::Store(_) => "store",
        }
    }

    /// A table whose rows come from `store` (read on demand).
    pub fn from_store(store: Arc<dyn crate::rows::RowStore>) -> Self {
        EmbeddingTable {
            rows: store.rows(),
            dim: store.dim(),
            data: TableData::Store(store),
        }
    }

    /// The row store a store-backed table reads from.
    pub fn store(&self) -> Option<&Arc<dyn crate::rows::RowStore>> {
        match &self.data {
            TableData::Store(s) => Some(s),
            _ => None,
        }
    }

    /// Empties a store-backed table's cache (no effect on other tables).
    pub fn clear_cache(&self) {
        if let TableData::Store(s) = &self.data {
            s.clear();
        }
    }

    /// Whether the rows come from a row store.
    pub fn is_store(&self) -> bool {
        matches!(self.data, TableData::Store(_))
    }

    /// The row store's counters, for a store-backed table.
    pub fn store_stats(&self) -> Option<crate::rows::StoreStats> {
        match &self.data {
            TableData::Store(s) => Some(s.stats()),
            _ => None,
        }
    }

    /// [`EmbeddingTable::row_into`] that reports a row store's failure (I/O, a table file
    /// changed while in use) instead of NaN values, and a row past the table as an error
    /// naming it (where `row_into` would panic).
    #[inline]
    pub fn try_row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(EngramError::invalid(
                "row id",
                format!("below the table's {} rows", self.rows),
                r,
            ));
        }
        match &self.data {
            TableData::Store(s) => s.row_into(r, out),
            _ => {
                self.row_into(r, out);
                Ok(())
            }
        }
    }

    /// A mapped table's values as `T` `[rows · dim]`, when it is stored as `want`, starts
    /// at an offset aligned for `T` and the host is little-endian (the file's order).
    fn mapped_as<T: bytemuck::Pod>(&self, want: Dtype) -> Option<&[T]> {
        let TableData::Mapped { mmap, start, dtype } = &self.data else {
            return None;
        };
        if *dtype != want || !cfg!(target_endian = "little") {
            return None;
        }
        let n = self.rows.checked_mul(self.dim)?;
        let bytes = n.checked_mul(std::mem::size_of::<T>())?;
        let raw = mmap.get(*start..start.checked_add(bytes)?)?;
        bytemuck::try_cast_slice::<u8, T>(raw).ok()
    }

    /// The whole table as f32 `[rows · dim]`, when it lies in memory as f32 (owned, or mapped
    /// from a file at an offset that is a multiple of 4, on a little-endian host).
    pub(crate) fn f32_values(&self) -> Option<&[f32]> {
        match &self.data {
            TableData::F32(v) => Some(v.as_slice()),
            TableData::Mapped { .. } => self.mapped_as(Dtype::F32),
            _ => None,
        }
    }

    /// The whole table as bf16 bits `[rows · dim]`, when it lies in memory as bf16 (owned, or
    /// mapped from a file at an even offset), on a little-endian host: rows the fused path
    /// gathers without widening.
    pub(crate) fn bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            // The kernels' pairs put element 2p in the low half of a u32: bf16 rows as
            // they lie only on a little-endian host.
            TableData::Bf16(v) if cfg!(target_endian = "little") => {
                Some(bytemuck::cast_slice::<bf16, u16>(v.as_slice()))
            }
            TableData::Mapped { .. } => self.mapped_as(Dtype::BF16),
            _ => None,
        }
    }

    /// The table copied into process memory (bf16 stays bf16, f32 and f16 become f32); an
    /// owned table is shared, not copied. The allocation is checked against free memory.
    pub fn to_ram(&self) -> Result<EmbeddingTable> {
        let n = self.rows * self.dim;
        let data = match &self.data {
            TableData::F32(_) | TableData::Bf16(_) => return Ok(self.clone()),
            TableData::Mapped { dtype, .. } if *dtype == Dtype::BF16 => {
                let mut v: Vec<bf16> =
                    crate::alloc::try_zeroed(n, "the table in RAM (--table-io ram)", true)?;
                let mut row = vec![0.0; self.dim];
                for (r, o) in v.chunks_exact_mut(self.dim.max(1)).enumerate() {
                    self.row_into(r, &mut row);
                    for (o, x) in o.iter_mut().zip(&row) {
                        *o = bf16::from_f32(*x); // exact: the values are bf16
                    }
                }
                TableData::Bf16(Arc::new(v))
            }
            _ => {
                let mut v: Vec<f32> =
                    crate::alloc::try_zeroed(n, "the table in RAM (--table-io ram)", true)?;
                for (r, o) in v.chunks_exact_mut(self.dim.max(1)).enumerate() {
                    self.try_row_into(r, o)?;
                }
                TableData::F32(Arc::new(v))
            }
        };
        Ok(EmbeddingTable {
            data,
            rows: self.rows,
            dim: self.dim,
        })
    }

    /// Whether the table is memory-mapped (not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, TableData::Mapped { .. })
    }

    /// A bf16 copy (round to nearest even), for the bf16 path.
    pub fn to_bf16(&self) -> Result<EmbeddingTable> {
        let mut v: Vec<bf16> =
            crate::alloc::try_zeroed(self.rows * self.dim, "a bf16 copy of the table", true)?;
        let mut row = vec![0.0; self.dim];
        for r in 0..self.rows {
            self.try_row_into(r, &mut row)?;
            for (o, x) in v[r * self.dim..(r + 1) * self.dim].iter_mut().zip(&row) {
                *o = bf16::from_f32(*x);
            }
        }
        Ok(EmbeddingTable {
            data: TableData::Bf16(Arc::new(v)),
            rows: self.rows,
            dim: self.dim,
        })
    }

    /// Asks the CPU to start loading row `r` into cache (no effect where unsupported).
    #[inline]
    pub fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (ptr, bytes) = match &self.data {
                TableData::Store(st) => {
                    st.prefetch(&[r]);
                    return;
                }
                TableData::F32(v) => (v.as_ptr() as *const u8, 4),
                TableData::Bf16(v) => (v.as_ptr() as *const u8, 2),
                TableData::Mapped { mmap, start, dtype } => (
                    mmap[*start..].as_ptr(),
                    if *dtype == Dtype::F32 { 4 } else { 2 },
                ),
            };
            if r >= self.rows {
                return;
            }
            let row_bytes = self.dim * bytes;
            let mut off = 0;
            while off < row_bytes {
                // SAFETY: r < rows, so [r·row_bytes, (r+1)·row_bytes) lies inside the table's
                // storage; prefetch never faults and changes no data.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        ptr.add(r * row_bytes + off) as *const i8,
                    )
                };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = r;
    }

    /// Checks every element for NaN and infinity (a full scan of the table, in parallel);
    /// `progress` receives the rows scanned. The error names the first bad row and column.
    pub fn check_finite(&self, progress: &(dyn Fn(usize) + Sync)) -> Result<()> {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 14;
        let blocks = self.rows.div_ceil(BLOCK);
        let bad = (0..blocks).into_par_iter().find_map_first(|b| {
            let mut row = vec![0.0f32; self.dim];
            let end = ((b + 1) * BLOCK).min(self.rows);
            for r in b * BLOCK..end {
                if let Err(e) = self.try_row_into(r, &mut row) {
                    return Some(Err(e)); // the store's own error, not a NaN
                }
                if let Some(c) = row.iter().position(|x| !x.is_finite()) {
                    return Some(Ok((r, c, row[c])));
                }
            }
            progress(end - b * BLOCK);
            None
        });
        match bad {
            Some(Err(e)) => Err(e),
            Some(Ok((r, c, value))) => Err(EngramError::NonFinite {
                name: format!("{TABLE} (row {r}, column {c})"),
                index: r * self.dim + c,
                value,
            }),
            None => Ok(()),
        }
    }

    /// Copies row `r` (widened to f32) into `out` (length d). `r < rows` is the caller's
    /// contract (hash ids are reduced modulo the head sizes).
    #[inline]
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let d = self.dim;
        match &self.data {
            // A store that fails gives NaN here; every reader of rows that can fail (the
            // gather, the bf16 copy, the writer) goes through `try_row_into` instead.
            TableData::Store(s) => {
                if s.row_into(r, out).is_err() {
                    out.fill(f32::NAN);
                }
            }
            TableData::F32(v) => out.copy_from_slice(&v[r * d..(r + 1) * d]),
            TableData::Bf16(v) => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorises
                // (`bf16::to_f32` also quiets signalling NaNs, a branch per value; a NaN
                // stays a NaN either way, and the gather refuses it).
                for (o, x) in out.iter_mut().zip(&v[r * d..(r + 1) * d]) {
                    *o = f32::from_bits(u32::from(x.to_bits()) << 16);
                }
            }
            TableData::Mapped { mmap, start, dtype } => {
                let es = if *dtype == Dtype::F32 { 4 } else { 2 };
                let bytes = &mmap[start + r * d * es..start + (r + 1) * d * es];
                match dtype {
                    Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                        Ok(s) if cfg!(target_endian = "little") => out.copy_from_slice(s),
                        _ => {
                            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            }
                        }
                    },
                    Dtype::BF16 => {
                        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                            *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                        }
                    }
                    _ => {
                        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                            *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                        }
                    }
                }
            }
        }
    }
}

/// All parameters of one Engram layer, in the reference's layout.
#[derive(Debug, Clone)]
pub struct EngramWeights {
    /// `multi_head_embedding.embedding.weight` `[rows, d]`.
    pub table: EmbeddingTable,
    /// `multi_head_embedding.offsets` `[H]`.
    pub offsets: Vec<i64>,
    /// `value_proj.weight` `[D, Dm]`.
    pub value_proj_weight: Vec<f32>,
    /// `value_proj.bias` `[D]`.
    pub value_proj_bias: Vec<f32>,
    /// `key_projs.{i}.weight` `[D, Dm]`, one per branch.
    pub key_projs_weight: Vec<Vec<f32>>,
    /// `key_projs.{i}.bias` `[D]`.
    pub key_projs_bias: Vec<Vec<f32>>,
    /// `norm1.{i}.weight` `[D]` (keys).
    pub norm1: Vec<Vec<f32>>,
    /// `norm2.{i}.weight` `[D]` (queries).
    pub norm2: Vec<Vec<f32>>,
    /// `short_conv.conv.weight` `[HC·D, 1, K]` stored as `[HC·D, K]`.
    pub conv_weight: Vec<f32>,
    /// `short_conv.norms.{i}.weight` `[D]`.
    pub conv_norms: Vec<Vec<f32>>,
}

/// (name, shape) of every parameter the layer expects, in state-dict order.
pub fn expected_tensors(cfg: &EngramConfig, table_rows: usize) -> Vec<(String, Vec<usize>)> {
    let (d, dm, hc) = (cfg.hidden_size, cfg.memory_width(), cfg.hc_mult);
    let mut v = vec![
        (OFFSETS.to_string(), vec![cfg.num_heads()]),
        (TABLE.to_string(), vec![table_rows, cfg.head_dim()]),
        (
            "short_conv.conv.weight".into(),
            vec![hc * d, 1, cfg.kernel_size],
        ),
    ];
    for i in 0..hc {
        v.push((format!("short_conv.norms.{i}.weight"), vec![d]));
    }
    v.push(("value_proj.weight".into(), vec![d, dm]));
    v.push(("value_proj.bias".into(), vec![d]));
    for i in 0..hc {
        v.push((format!("key_projs.{i}.weight"), vec![d, dm]));
        v.push((format!("key_projs.{i}.bias"), vec![d]));
    }
    for i in 0..hc {
        v.push((format!("norm1.{i}.weight"), vec![d]));
    }
    for i in 0..hc {
        v.push((format!("norm2.{i}.weight"), vec![d]));
    }
    v
}

fn check_finite(name: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(EngramError::NonFinite {
            name: name.into(),
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

impl EngramWeights {
    /// Loads a state-dict safetensors file. `offsets` are the head offsets the hash mapping
    /// computed; the file's `multi_head_embedding.offsets` must equal them. The table stays
    /// memory-mapped; the other tensors (a few MB) are decoded to f32.
    pub fn load(
        path: impl AsRef<Path>,
        cfg: &EngramConfig,
        offsets: &[i64],
        rows: usize,
    ) -> Result<Self> {
        Self::load_from(&TensorFile::open(path)?, cfg, offsets, rows)
    }

    /// [`EngramWeights::load`] from an opened file; errors name the file.
    pub fn load_from(
        file: &TensorFile,
        cfg: &EngramConfig,
        offsets: &[i64],
        rows: usize,
    ) -> Result<Self> {
        Self::load_checked(file, cfg, offsets, rows).map_err(|e| file.in_file(e))
    }

    fn load_checked(
        file: &TensorFile,
        cfg: &EngramConfig,
        offsets: &[i64],
        rows: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        let ctx = format!(" in {}", file.path().display());
        let expected = expected_tensors(cfg, rows);
        for name in file.names() {
            if !expected.iter().any(|(n, _)| *n == name) {
                return Err(EngramError::UnexpectedTensor { name, context: ctx });
            }
        }
        for (name, shape) in &expected {
            let (_, found) = file.info(name)?;
            if &found != shape {
                return Err(EngramError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found,
                });
            }
        }
        let file_offsets = file.i64(OFFSETS, None)?.data;
        if file_offsets != offsets {
            return Err(EngramError::invalid(
                format!("tensor `{OFFSETS}`"),
                format!("the offsets of this config's head sizes {offsets:?}"),
                format!("{file_offsets:?}"),
            ));
        }
        let table = {
            let view = file.view(TABLE)?;
            let dtype = view.dtype();
            if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(EngramError::DType {
                    name: TABLE.into(),
                    expected: "float32, bfloat16 or float16".into(),
                    found: dtype_name(dtype),
                });
            }
            let base = file.bytes().as_ptr() as usize;
            let start = view.data().as_ptr() as usize - base;
            EmbeddingTable {
                data: TableData::Mapped {
                    mmap: file.bytes().clone(),
                    start,
                    dtype,
                },
                rows,
                dim: cfg.head_dim(),
            }
        };
        let get = |name: &str| -> Result<Vec<f32>> {
            let t = file.f32(name, None)?;
            check_finite(name, &t.data)?;
            Ok(t.data)
        };
        let hc = cfg.hc_mult;
        let per = |fmt: &dyn Fn(usize) -> String| -> Result<Vec<Vec<f32>>> {
            (0..hc).map(|i| get(&fmt(i))).collect()
        };
        Ok(EngramWeights {
            table,
            offsets: file_offsets,
            value_proj_weight: get("value_proj.weight")?,
            value_proj_bias: get("value_proj.bias")?,
            key_projs_weight: per(&|i| format!("key_projs.{i}.weight"))?,
            key_projs_bias: per(&|i| format!("key_projs.{i}.bias"))?,
            norm1: per(&|i| format!("norm1.{i}.weight"))?,
            norm2: per(&|i| format!("norm2.{i}.weight"))?,
            conv_weight: get("short_conv.conv.weight")?,
            conv_norms: per(&|i| format!("short_conv.norms.{i}.weight"))?,
        })
    }

    /// [`EngramWeights::load`] with the table in the store `opts` names: read with direct
    /// I/O, and/or behind a hot-row cache (the default options keep it memory-mapped).
    pub fn load_with_table(
        path: impl AsRef<Path>,
        cfg: &EngramConfig,
        offsets: &[i64],
        table_rows: usize,
        opts: crate::rows::TableOptions,
    ) -> Result<Self> {
        use crate::rows::{direct::DirectRows, RowStore, TableIo};
        let path = path.as_ref();
        let mut w = Self::load(path, cfg, offsets, table_rows)?;
        if let Some(url) = &opts.store {
            let f = TensorFile::open(path)?;
            let raw =
                crate::rows::redis::RawRows::dense(f.raw(TABLE)?, table_rows, cfg.head_dim())?;
            let id =
                crate::rows::redis::TableId::new("demo", cfg.layer_id, &cfg.to_json_string(), &raw);
            let store = crate::rows::redis::RedisRows::open(url, &id, opts.store_options)?;
            w.table = EmbeddingTable::from_store(opts.cached(Arc::new(store))?);
            return Ok(w);
        }
        let store: Arc<dyn RowStore> = match opts.io {
            TableIo::Mmap if opts.cache_bytes.is_none() => return Ok(w),
            TableIo::Ram if opts.cache_bytes.is_none() => {
                w.table = w.table.to_ram()?;
                return Ok(w);
            }
            TableIo::Mmap => Arc::new(w.table.clone()),
            TableIo::Ram => Arc::new(w.table.to_ram()?),
            TableIo::Direct => {
                let f = TensorFile::open(path)?;
                let d = DirectRows::open_dense(&f.raw(TABLE)?, table_rows, cfg.head_dim())?;
                Arc::new(match opts.io_depth {
                    Some(n) => d.with_io_depth(n),
                    None => d,
                })
            }
        };
        w.table = EmbeddingTable::from_store(opts.cached(store)?);
        Ok(w)
    }

    /// Every float tensor but the table, by state-dict name, with its shape (PyTorch layout),
    /// in the order [`EngramWeights::save`] writes them.
    pub fn float_tensors<'a>(&'a self, cfg: &EngramConfig) -> Vec<(String, Vec<usize>, &'a [f32])> {
        let (d, dm) = (cfg.hidden_size, cfg.memory_width());
        let mut v: Vec<(String, Vec<usize>, &'a [f32])> = vec![
            (
                "value_proj.weight".into(),
                vec![d, dm],
                &self.value_proj_weight,
            ),
            ("value_proj.bias".into(), vec![d], &self.value_proj_bias),
        ];
        for i in 0..cfg.hc_mult {
            v.push((
                format!("key_projs.{i}.weight"),
                vec![d, dm],
                &self.key_projs_weight[i],
            ));
            v.push((
                format!("key_projs.{i}.bias"),
                vec![d],
                &self.key_projs_bias[i],
            ));
            v.push((format!("norm1.{i}.weight"), vec![d], &self.norm1[i]));
            v.push((format!("norm2.{i}.weight"), vec![d], &self.norm2[i]));
            v.push((
                format!("short_conv.norms.{i}.weight"),
                vec![d],
                &self.conv_norms[i],
            ));
        }
        v.push((
            "short_conv.conv.weight".into(),
            vec![cfg.hc_mult * d, 1, cfg.kernel_size],
            &self.conv_weight,
        ));
        v
    }

    /// Writes the weights as a state-dict safetensors file (float tensors in `f32` or `bf16`).
    pub fn save(&self, path: impl AsRef<Path>, cfg: &EngramConfig, bf16_out: bool) -> Result<()> {
        let tensors = self.float_tensors(cfg);
        let mut w = TensorWriter::new();
        w.table(TABLE, &self.table, bf16_out);
        w.i64(OFFSETS, &[self.offsets.len()], &self.offsets);
        for (name, shape, data) in &tensors {
            if bf16_out {
                w.bf16(name, shape, data);
            } else {
                w.f32(name, shape, data);
            }
        }
        w.write(path)
    }
}
