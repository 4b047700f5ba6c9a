//! Safetensors files: memory-mapped reading with checked names, shapes and dtypes, and writing.

use crate::error::{EngramError, Result};
use memmap2::Mmap;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A float tensor decoded to f32, with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Row-major data.
    pub data: Vec<f32>,
}

/// An int64 tensor with its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I64Tensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Row-major data.
    pub data: Vec<i64>,
}

/// The bytes of a tensor file: memory-mapped, or owned (files given as bytes, e.g. by a
/// fuzzer or a test). Cheap to clone; a table keeps its file's bytes alive this way.
#[derive(Clone)]
pub(crate) enum FileBytes {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// A tensor's undecoded bytes inside its (memory-mapped) file; keeps the file alive.
#[derive(Clone)]
pub struct RawTensor {
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    bytes: FileBytes,
    start: usize,
    len: usize,
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

/// (device, inode) of an open file (None where the platform has no such notion).
pub fn file_identity(f: &std::fs::File) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        f.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        None
    }
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RawTensor({:?} {:?}, {} bytes)",
            self.dtype, self.shape, self.len
        )
    }
}

impl RawTensor {
    /// The bytes, row-major.
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    /// The tensor's bytes copied into process memory (the allocation checked against free
    /// memory); the copy no longer reads the file.
    /// `what` names the copy in an out-of-memory error.
    pub fn to_owned_bytes(&self, what: &str) -> Result<RawTensor> {
        let mut v: Vec<u8> =
            crate::alloc::try_zeroed(self.len, &format!("{what}: {}", self.path.display()), true)?;
        v.copy_from_slice(self.data());
        Ok(RawTensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            bytes: FileBytes::Owned(Arc::new(v)),
            start: 0,
            len: self.len,
            path: self.path.clone(),
            identity: None,
        })
    }

    /// (device, inode) of the file the tensor was mapped from.
    pub fn file_identity(&self) -> Option<(u64, u64)> {
        self.identity
    }

    /// The file the tensor is in and the offset of its first byte there (None for a file
    /// given as bytes).
    pub fn location(&self) -> Option<(&Path, u64)> {
        match self.bytes {
            FileBytes::Mapped(_) => Some((&self.path, self.start as u64)),
            FileBytes::Owned(_) => None,
        }
    }
}

/// A memory-mapped, validated safetensors file.
pub struct TensorFile {
    path: PathBuf,
    mmap: FileBytes,
    metadata: HashMap<String, String>,
    /// The header, parsed and validated once in `open` (a lookup per tensor afterwards: a
    /// checkpoint shard has thousands of tensors).
    header: safetensors::tensor::Metadata,
    /// Where the data buffer starts (8 + the header's length).
    data_start: usize,
    /// (device, inode) of the mapped file, to tell it from a file put at its path later.
    identity: Option<(u64, u64)>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .finish()
    }
}

pub(crate) fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

/// The header's entries in file order, duplicates kept (`serde_json::Value`'s map keeps
/// only the last of two equal keys, and so does `safetensors`, which then reports a gap in
/// the offsets under another tensor's name).
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(HeaderEntries(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Checks each tensor of the header before `safetensors` reads it, so that an error names the
/// tensor with what was expected and what was found: a name given twice, an unknown dtype,
/// `data_offsets` that run backwards, span other than shape × dtype size, leave a gap or
/// overlap the previous tensor's, or end past the file. (The crate reports the size case
/// without a name, a duplicate as another tensor's offset, and adds the offsets' end to the
/// header length unchecked, which a crafted header makes overflow: a panic in builds with
/// overflow checks, as the fuzz targets and tests are.) The file's frame is checked first:
/// its 8-byte header length, within the file and `safetensors`' limit, then a JSON object,
/// then each entry's three fields. Fields of another type than expected (a string shape,
/// say) are left to `safetensors`, whose errors describe them.
fn check_header(path: &Path, bytes: &[u8]) -> Result<()> {
    const MAX_HEADER: u64 = 100_000_000; // safetensors' own limit
    let file = |message: String| EngramError::SafeTensors {
        path: path.display().to_string(),
        message,
    };
    let Some(n) = bytes.get(..8) else {
        return Err(file(format!(
            "expected at least 8 bytes (the header's length), found {}",
            bytes.len()
        )));
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(file(format!(
            "expected a header length of at most {MAX_HEADER} bytes, found {n}"
        )));
    }
    let Some(data_len) = (bytes.len() as u64 - 8).checked_sub(n) else {
        return Err(file(format!(
            "expected a header length of at most the {} bytes after it, found {n}",
            bytes.len() - 8
        )));
    };
    let entries = match serde_json::from_slice(&bytes[8..8 + n as usize]) {
        Ok(HeaderEntries(entries)) => entries,
        Err(e) => {
            return Err(file(format!(
                "expected a JSON object of tensors as the header, found {e}"
            )))
        }
    };
    let bad = |name: &str, message: String| file(format!("tensor `{name}`: {message}"));
    if entries.iter().all(|(k, _)| k == "__metadata__") && data_len > 0 {
        return Err(file(format!(
            "expected no data after a header without tensors, found {data_len} bytes"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    // (begin, end, name) of every tensor whose offsets could be read.
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    let mut all_spans = true;
    for (name, info) in entries.iter().filter(|(k, _)| k != "__metadata__") {
        if !seen.insert(name.as_str()) {
            return Err(bad(
                name,
                "expected each tensor name once in the header, found it twice".into(),
            ));
        }
        if let Some(field) = ["dtype", "shape", "data_offsets"]
            .into_iter()
            .find(|f| info.get(f).is_none())
        {
            return Err(bad(
                name,
                format!("expected fields dtype, shape and data_offsets, found no `{field}`"),
            ));
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)));
        let Some((begin, end)) = offsets else {
            all_spans = false;
            continue;
        };
        if end > data_len {
            return Err(bad(
                name,
                format!(
                    "expected data_offsets within the {data_len} bytes after the header, found an end at {end}"
                ),
            ));
        }
        if end < begin {
            return Err(bad(
                name,
                format!(
                    "expected data_offsets [begin, end] with begin <= end, found [{begin}, {end}]"
                ),
            ));
        }
        let dtype = info
            .get("dtype")
            .map(|d| serde_json::from_value::<Dtype>(d.clone()));
        if let Some(Err(_)) = dtype {
            return Err(bad(
                name,
                format!(
                    "expected a safetensors dtype (F32, BF16, I64, ...), found {}",
                    info["dtype"]
                ),
            ));
        }
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>());
        if let (Some(Ok(dtype)), Some(shape)) = (dtype, shape) {
            // Bits, checked: a shape whose product overflows cannot match any span. Its
            // non-zero dimensions are multiplied first, so that the check does not depend on
            // their order ([0, 2^63, 2^63] and [2^63, 2^63, 0] are both refused), and every
            // product of its dimensions computed later fits.
            let bits = shape
                .iter()
                .filter(|&&d| d != 0)
                .try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d))
                .map(|b| if shape.contains(&0) { 0 } else { b });
            let found = end - begin;
            let shape_text = format!("{shape:?} of {}", dtype_name(dtype));
            match bits {
                Some(bits) if bits % 8 == 0 && bits / 8 == found => {}
                Some(bits) if bits % 8 != 0 => {
                    return Err(bad(
                        name,
                        format!("expected a whole number of bytes, found {bits} bits ({shape_text})"),
                    ))
                }
                Some(bits) => {
                    return Err(bad(
                        name,
                        format!(
                            "expected data_offsets spanning {} bytes ({shape_text}), found {found} ([{begin}, {end}])",
                            bits / 8
                        ),
                    ))
                }
                None => {
                    return Err(bad(
                        name,
                        format!(
                            "expected a shape whose non-zero dimensions multiply to a size that fits in 64 bits, found {shape_text} for {found} bytes"
                        ),
                    ))
                }
            }
        }
        spans.push((begin, end, name.as_str()));
    }
    // The data is the tensors back to back from byte 0, in offset order, to the file's end
    // (checked when every entry's offsets could be read).
    if !all_spans {
        return Ok(());
    }
    spans.sort_unstable();
    let mut at = (0u64, None::<&str>);
    for &(begin, end, name) in &spans {
        if begin != at.0 {
            let after = at.1.map_or("at the start of the data".to_string(), |p| {
                format!("right after `{p}`")
            });
            let what = if begin < at.0 {
                "overlapping"
            } else {
                "leaving a gap"
            };
            return Err(bad(
                name,
                format!(
                    "expected its data to start at byte {} ({after}), found {begin} ({what})",
                    at.0
                ),
            ));
        }
        at = (end, Some(name));
    }
    if let (end, Some(last)) = at {
        if end != data_len {
            return Err(bad(
                last,
                format!(
                    "expected the last tensor's data to end at the file's end ({data_len} bytes after the header), found an end at {end}"
                ),
            ));
        }
    }
    Ok(())
}

impl TensorFile {
    /// Maps the file and parses its header (bounds and offsets are checked by `safetensors`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| EngramError::io(&path, e))?;
        if !meta.is_file() {
            return Err(EngramError::invalid(
                path.display().to_string(),
                "a safetensors file",
                if meta.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                },
            ));
        }
        let file = std::fs::File::open(&path).map_err(|e| EngramError::io(&path, e))?;
        // SAFETY: the map is read-only; the file is not expected to change while mapped (as
        // with every memory-mapped weight loader). Truncation by another process would fault,
        // which is the documented hazard of memory-mapping.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| {
            // ENODEV: a file of a kind that cannot be mapped (`/proc/self/mem`, some
            // pseudo-file systems), though its metadata says regular file.
            if e.raw_os_error() == Some(19) {
                EngramError::invalid(
                    path.display().to_string(),
                    "a safetensors file that can be memory-mapped",
                    "a file whose file system does not map it (a /proc or device file?)",
                )
            } else if e.raw_os_error() == Some(12) {
                // ENOMEM: no address space left for the file (`ulimit -v`, or too many maps).
                EngramError::invalid(
                    path.display().to_string(),
                    format!(
                        "room in the address space to map its {}",
                        crate::budget::human(meta.len())
                    ),
                    "none: mmap failed with ENOMEM (an address-space limit, `ulimit -v`?)",
                )
            } else {
                EngramError::io(&path, e)
            }
        })?;
        let identity = file_identity(&file);
        // Table rows are read at random: ask the kernel not to read ahead around each row
        // when the file is not cached (a hint; failure to apply it changes nothing).
        #[cfg(unix)]
        let _ = mmap.advise(memmap2::Advice::Random);
        let mut f = Self::parse(path, FileBytes::Mapped(Arc::new(mmap)))?;
        f.identity = identity;
        Ok(f)
    }

    /// A safetensors file given as bytes; `name` stands for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), FileBytes::Owned(Arc::new(bytes)))
    }

    fn parse(path: PathBuf, mmap: FileBytes) -> Result<Self> {
        check_header(&path, &mmap[..])?;
        let (n, header) =
            SafeTensors::read_metadata(&mmap[..]).map_err(|e| EngramError::SafeTensors {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        // Full validation (offsets, lengths, overlaps) happens in deserialize.
        SafeTensors::deserialize(&mmap[..]).map_err(|e| EngramError::SafeTensors {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(TensorFile {
            path,
            mmap,
            metadata,
            header,
            // `read_metadata` checked 8 + n against the buffer's length.
            data_start: 8 + n,
            identity: None,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub(crate) fn bytes(&self) -> &FileBytes {
        &self.mmap
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.header.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// A tensor's bytes where they lie in the file (no copy, no decoding): for formats the
    /// caller decodes itself, such as fp8 tables read a row at a time.
    pub fn raw(&self, name: &str) -> Result<RawTensor> {
        let v = self.view(name)?;
        let data = v.data();
        let start = data.as_ptr() as usize - self.mmap.as_ptr() as usize;
        Ok(RawTensor {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            bytes: self.mmap.clone(),
            start,
            len: data.len(),
            path: self.path.clone(),
            identity: self.identity,
        })
    }

    /// (dtype, shape) of a tensor.
    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let v = self.view(name)?;
        Ok((v.dtype(), v.shape().to_vec()))
    }

    /// A tensor's view, from the header parsed in `open` (its offsets were validated there
    /// against the data buffer).
    pub(crate) fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let missing = || EngramError::MissingTensor {
            name: name.to_string(),
            context: format!(" in {}", self.path.display()),
        };
        let info = self.header.info(name).ok_or_else(missing)?;
        let (s, e) = info.data_offsets;
        let bytes = self
            .mmap
            .get(self.data_start + s..self.data_start + e)
            .ok_or_else(missing)?;
        TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(|err| {
            EngramError::SafeTensors {
                path: self.path.display().to_string(),
                message: format!("tensor `{name}`: {err}"),
            }
        })
    }

    /// `e` with this file's path, where it is a tensor error that does not name it.
    pub fn in_file(&self, e: EngramError) -> EngramError {
        match e {
            EngramError::Shape { .. }
            | EngramError::DType { .. }
            | EngramError::NonFinite { .. } => EngramError::InFile {
                path: self.path.display().to_string(),
                source: Box::new(e),
            },
            e => e,
        }
    }

    /// Refuses tensor `name` unless its shape is `expected`, from the header alone (nothing is
    /// read): the error [`TensorFile::f32`] and [`TensorFile::i64`] give for it.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let v = self.view(name)?;
        check_shape(name, v.shape(), Some(expected)).map_err(|e| self.in_file(e))
    }

    /// A float tensor (f32, or bf16/f16 widened) whose shape must equal `expected` when given.
    pub fn f32(&self, name: &str, expected: Option<&[usize]>) -> Result<F32Tensor> {
        let v = self.view(name)?;
        check_shape(name, v.shape(), expected).map_err(|e| self.in_file(e))?;
        let data = decode_f32(name, v.dtype(), v.data()).map_err(|e| self.in_file(e))?;
        Ok(F32Tensor {
            shape: v.shape().to_vec(),
            data,
        })
    }

    /// An int64 tensor (int32 widened) whose shape must equal `expected` when given.
    pub fn i64(&self, name: &str, expected: Option<&[usize]>) -> Result<I64Tensor> {
        let v = self.view(name)?;
        check_shape(name, v.shape(), expected).map_err(|e| self.in_file(e))?;
        let data = match v.dtype() {
            Dtype::I64 => v
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => v
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            d => {
                return Err(self.in_file(EngramError::DType {
                    name: name.into(),
                    expected: "int64 (or int32)".into(),
                    found: dtype_name(d),
                }))
            }
        };
        Ok(I64Tensor {
            shape: v.shape().to_vec(),
            data,
        })
    }
}

pub(crate) fn check_shape(name: &str, found: &[usize], expected: Option<&[usize]>) -> Result<()> {
    match expected {
        Some(e) if e != found => Err(EngramError::Shape {
            name: name.into(),
            expected: e.to_vec(),
            found: found.to_vec(),
        }),
        _ => Ok(()),
    }
}

/// Little-endian bytes of f32 / bf16 / f16 to f32.
pub(crate) fn decode_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        d => {
            return Err(EngramError::DType {
                name: name.into(),
                expected: "float32, bfloat16 or float16".into(),
                found: dtype_name(d),
            })
        }
    })
}

/// A matrix that can hand out its rows as f32 (a table written row by row, never widened
/// whole). Implemented by the weights' embedding table; `tensors` knows nothing else of it.
pub trait RowSource {
    /// Rows.
    fn rows(&self) -> usize;
    /// Row width.
    fn dim(&self) -> usize;
    /// Writes row `r` into `out` (`dim` values).
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()>;
}

/// Where a tensor's bytes come from when it is written.
enum Data<'a> {
    F32(&'a [f32]),
    F32AsBf16(&'a [f32]),
    I64(&'a [i64]),
    Table {
        table: &'a dyn RowSource,
        bf16: bool,
    },
}

impl Data<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Data::F32(_) | Data::Table { bf16: false, .. } => Dtype::F32,
            Data::F32AsBf16(_) | Data::Table { bf16: true, .. } => Dtype::BF16,
            Data::I64(_) => Dtype::I64,
        }
    }

    fn byte_len(&self) -> usize {
        match self {
            Data::F32(v) => v.len() * 4,
            Data::F32AsBf16(v) => v.len() * 2,
            Data::I64(v) => v.len() * 8,
            Data::Table { table, bf16 } => table.rows() * table.dim() * if *bf16 { 2 } else { 4 },
        }
    }

    fn write(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        let flush = |buf: &mut Vec<u8>, w: &mut dyn std::io::Write| -> std::io::Result<()> {
            w.write_all(buf)?;
            buf.clear();
            Ok(())
        };
        match self {
            Data::F32(v) => {
                for c in v.chunks(1 << 14) {
                    buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
                    flush(&mut buf, w)?;
                }
            }
            Data::F32AsBf16(v) => {
                for c in v.chunks(1 << 14) {
                    buf.extend(
                        c.iter()
                            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()),
                    );
                    flush(&mut buf, w)?;
                }
            }
            Data::I64(v) => {
                for c in v.chunks(1 << 13) {
                    buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
                    flush(&mut buf, w)?;
                }
            }
            Data::Table { table, bf16 } => {
                let mut row = vec![0.0f32; table.dim()];
                for r in 0..table.rows() {
                    table
                        .row_into(r, &mut row)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    if *bf16 {
                        buf.extend(
                            row.iter()
                                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()),
                        );
                    } else {
                        buf.extend(row.iter().flat_map(|x| x.to_le_bytes()));
                    }
                    if buf.len() >= 1 << 16 {
                        flush(&mut buf, w)?;
                    }
                }
                flush(&mut buf, w)?;
            }
        }
        Ok(())
    }
}

/// Writes a safetensors file tensor by tensor, streaming each tensor's bytes from where
/// they are (no copy of a multi-GB table).
#[derive(Default)]
pub struct TensorWriter<'a> {
    tensors: Vec<(String, Vec<usize>, Data<'a>)>,
    metadata: std::collections::BTreeMap<String, String>,
}

impl<'a> TensorWriter<'a> {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an f32 tensor ([`TensorWriter::write`] refuses a shape that disagrees with the
    /// data's length).
    pub fn f32(&mut self, name: &str, shape: &[usize], data: &'a [f32]) -> &mut Self {
        self.tensors
            .push((name.into(), shape.to_vec(), Data::F32(data)));
        self
    }

    /// Adds a tensor stored as bf16 (rounded to nearest even).
    pub fn bf16(&mut self, name: &str, shape: &[usize], data: &'a [f32]) -> &mut Self {
        self.tensors
            .push((name.into(), shape.to_vec(), Data::F32AsBf16(data)));
        self
    }

    /// Adds an int64 tensor.
    pub fn i64(&mut self, name: &str, shape: &[usize], data: &'a [i64]) -> &mut Self {
        self.tensors
            .push((name.into(), shape.to_vec(), Data::I64(data)));
        self
    }

    /// Adds an embedding table, streamed row by row (f32 or bf16).
    pub(crate) fn table(&mut self, name: &str, table: &'a dyn RowSource, bf16: bool) -> &mut Self {
        self.tensors.push((
            name.into(),
            vec![table.rows(), table.dim()],
            Data::Table { table, bf16 },
        ));
        self
    }

    /// Adds a `__metadata__` entry.
    pub fn meta(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Writes the file: 8-byte header length, JSON header padded to 8 bytes, then the data
    /// of every tensor in the order added. The write is atomic ([`crate::atomic`]): the
    /// file appears complete or not at all, and an existing file survives a failed write.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        self.stage(path)?.commit()
    }

    /// [`TensorWriter::write`] up to the rename: the file is written and synced beside
    /// `path`, which [`crate::atomic::Staged::commit`] replaces.
    pub fn stage(&self, path: impl AsRef<Path>) -> Result<crate::atomic::Staged> {
        let path = path.as_ref();
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(self.metadata));
        }
        // A shape that disagrees with its data would make a file no reader accepts (and
        // the atomic rename would put it in place of a good one): refuse before writing.
        let mut names = std::collections::HashSet::new();
        for (name, shape, data) in &self.tensors {
            // A repeated name (or the metadata key) would leave bytes no header entry covers.
            if name == "__metadata__" || !names.insert(name.as_str()) {
                return Err(EngramError::invalid(
                    format!("tensor `{name}` (writing {})", path.display()),
                    "a name used once, other than __metadata__",
                    if name == "__metadata__" {
                        "the name reserved for the metadata"
                    } else {
                        "a name already taken"
                    },
                ));
            }
            let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let elem_bytes = match data.dtype() {
                Dtype::BF16 => 2,
                Dtype::I64 => 8,
                _ => 4,
            };
            if elems.and_then(|n| n.checked_mul(elem_bytes)) != Some(data.byte_len()) {
                return Err(EngramError::Shape {
                    name: format!("{name} (writing {})", path.display()),
                    expected: shape.clone(),
                    found: vec![data.byte_len() / elem_bytes],
                });
            }
        }
        let mut off = 0usize;
        for (name, shape, data) in &self.tensors {
            let len = data.byte_len();
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": format!("{:?}", data.dtype()),
                    "shape": shape,
                    "data_offsets": [off, off + len],
                }),
            );
            off += len;
        }
        let mut h = serde_json::to_vec(&header).expect("header serialises");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        crate::atomic::stage(path, |w| {
            use std::io::Write;
            w.write_all(&(h.len() as u64).to_le_bytes())?;
            w.write_all(&h)?;
            for (_, _, data) in &self.tensors {
                data.write(w)?;
            }
            Ok(())
        })
    }
}
