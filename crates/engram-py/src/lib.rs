//! `engram._engram`: the engine behind the `engram` Python package. Thin: every computation
//! is the Rust library's; this file converts arrays, releases the GIL while the engine works
//! and turns library errors into Python exceptions (`OSError` for files, `ValueError` for
//! everything else a caller can get wrong).

use engram::v41::{Checkpoint, V41Config, V41Layer, V41Path, V41State};
use engram::{
    CompressedTokenizer, DType, Engram, EngramConfig, EngramError, EngramState, ForwardPath,
    NgramHashMapping, Stages, Tokenizer,
};
use numpy::{
    IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Arc;
use std::time::Instant;

fn err(e: EngramError) -> PyErr {
    match e {
        EngramError::Io { .. } => PyOSError::new_err(e.to_string()),
        e => PyValueError::new_err(e.to_string()),
    }
}

fn verr(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn tokenizer(path: Option<&str>) -> PyResult<Tokenizer> {
    match path {
        Some(p) => Tokenizer::from_name_or_path(p),
        None => Tokenizer::bundled(),
    }
    .map_err(err)
}

/// A config given as JSON text or as a file path.
fn config_json(config: &str, is_path: bool) -> PyResult<serde_json::Value> {
    let text = if is_path {
        engram::files::read_limited_string(
            std::path::Path::new(config),
            engram::files::MAX_CONFIG_BYTES,
            "config",
        )
        .map_err(err)?
    } else {
        config.to_string()
    };
    serde_json::from_str(&text).map_err(|e| verr(format!("config: invalid JSON ({e})")))
}

enum Inner {
    Demo(Engram, ForwardPath),
    V41(V41Layer, V41Path),
}

/// One Engram layer (the demo variant or a DeepSeek-V4.1 layer).
#[pyclass(module = "engram._engram", name = "Layer", frozen)]
struct Layer {
    inner: Inner,
    pool: Option<rayon::ThreadPool>,
    /// Seconds the engine spent inside the last call (for overhead measurements).
    last: std::sync::Mutex<f64>,
    /// The hidden states of the call running now, copied from the caller's array: kept
    /// between calls, so that a prefill's copy (64 MB for 4096 tokens of the demo layer)
    /// does not fault in fresh pages every call. A call that finds it taken (another
    /// thread's call on this layer) copies into a buffer of its own.
    hidden: std::sync::Mutex<Vec<f32>>,
    /// What a state must match to run on this layer, in words ([`identity_of`]), computed
    /// once (the tokenizer fingerprint hashes the whole compression table).
    identity: String,
    /// The key of `identity` that states carry ([`owner_key`]).
    key: Arc<str>,
}

/// A sequence's streaming state.
#[pyclass(module = "engram._engram", name = "State")]
#[derive(Clone)]
struct State {
    inner: StateInner,
    /// The key of the layer the state belongs to ([`owner_key`]): set by `new_state` and by
    /// the first call that succeeds, kept through pickling, compared on every call. `None`
    /// for a state made by `State()` or unpickled from bytes written before the field
    /// existed, or with a key version this build does not know.
    owner: Option<Arc<str>>,
}

#[derive(Clone)]
enum StateInner {
    Demo(EngramState),
    V41(V41State),
    /// Lent to a running call (a state serves one call at a time).
    Busy,
}

/// The stand-in while a state is lent to the engine.
fn placeholder() -> StateInner {
    StateInner::Busy
}

fn busy() -> PyErr {
    verr("states: this State is in use by a call running in another thread (each sequence's state serves one call at a time)")
}

impl State {
    fn to_bytes(&self) -> PyResult<Vec<u8>> {
        let mut b = Vec::new();
        match &self.inner {
            StateInner::Demo(s) => {
                b.push(1u8);
                b.extend((s.position()).to_le_bytes());
                b.extend((s.row_width() as u64).to_le_bytes());
                b.extend((s.ngram_history().len() as u64).to_le_bytes());
                s.ngram_history()
                    .iter()
                    .for_each(|x| b.extend(x.to_le_bytes()));
                let c = s.conv_history();
                b.extend((c.len() as u64).to_le_bytes());
                c.iter().for_each(|x| b.extend(x.to_le_bytes()));
            }
            StateInner::V41(s) => {
                b.push(2u8);
                b.extend(s.position.to_le_bytes());
                b.extend((s.history.len() as u64).to_le_bytes());
                s.history.iter().for_each(|x| b.extend(x.to_le_bytes()));
            }
            // Lent to a call in another thread: there is nothing consistent to write.
            StateInner::Busy => return Err(busy()),
        }
        // Appended, so that bytes written before the owner existed still read (as `None`).
        if let Some(o) = &self.owner {
            b.extend((o.len() as u64).to_le_bytes());
            b.extend(o.as_bytes());
        }
        Ok(b)
    }

    fn from_bytes(b: &[u8]) -> PyResult<State> {
        let bad = || verr("state: not a state written by engram (truncated or foreign bytes)");
        // Reads `n` bytes at the cursor, or fails on truncated input.
        let mut at = 1usize;
        let mut take = |n: usize| -> PyResult<&[u8]> {
            let end = at.checked_add(n).ok_or_else(bad)?;
            let v = b.get(at..end).ok_or_else(bad)?;
            at = end;
            Ok(v)
        };
        let u64_of = |v: &[u8]| u64::from_le_bytes(v.try_into().expect("8 bytes taken"));
        let tag = *b.first().ok_or_else(bad)?;
        let pos = u64_of(take(8)?);
        // As the CLI's state files (an int64 position) bound it.
        if pos > i64::MAX as u64 {
            return Err(verr(format!(
                "state: position: expected a position below 2^63, found {pos}"
            )));
        }
        let inner = match tag {
            1 => {
                let rw = u64_of(take(8)?) as usize;
                let n = u64_of(take(8)?) as usize;
                let hist: Vec<i64> = (0..n.min(1 << 20))
                    .map(|_| take(8).map(|v| u64_of(v) as i64))
                    .collect::<PyResult<_>>()?;
                let m = u64_of(take(8)?) as usize;
                if m > b.len() {
                    return Err(bad());
                }
                let conv: Vec<f32> = (0..m)
                    .map(|_| take(4).map(|v| f32::from_le_bytes(v.try_into().expect("4 bytes"))))
                    .collect::<PyResult<_>>()?;
                if let Some(i) = conv.iter().position(|x| !x.is_finite()) {
                    return Err(verr(format!(
                        "state: conv history value {i}: expected a finite number, found {}",
                        conv[i]
                    )));
                }
                StateInner::Demo(EngramState::from_parts(hist, conv, rw, pos))
            }
            2 => {
                let n = u64_of(take(8)?) as usize;
                let history: Vec<i64> = (0..n.min(1 << 20))
                    .map(|_| take(8).map(|v| u64_of(v) as i64))
                    .collect::<PyResult<_>>()?;
                StateInner::V41(V41State {
                    history,
                    position: pos,
                })
            }
            _ => return Err(bad()),
        };
        // Bytes written before the owner existed end here; later ones append it.
        let owner = match take(8) {
            // The end, or a few stray bytes (foreign).
            Err(_) if take(1).is_ok() => return Err(bad()),
            Err(_) => None,
            Ok(v) => {
                let n = usize::try_from(u64_of(v)).map_err(|_| bad())?;
                let o = take(n)?.to_vec();
                if take(1).is_ok() {
                    return Err(bad());
                }
                let o = String::from_utf8(o).map_err(|_| bad())?;
                // A key of another version cannot be compared: the state counts as unowned.
                o.starts_with(OWNER_KEY_VERSION).then(|| Arc::from(o))
            }
        };
        Ok(State { inner, owner })
    }
}

#[pymethods]
impl State {
    /// Tokens consumed so far.
    #[getter]
    fn position(&self) -> u64 {
        match &self.inner {
            StateInner::Demo(s) => s.position(),
            StateInner::V41(s) => s.position,
            StateInner::Busy => 0,
        }
    }

    fn __getstate__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.to_bytes()?))
    }

    fn __setstate__(&mut self, b: &[u8]) -> PyResult<()> {
        *self = State::from_bytes(b)?;
        Ok(())
    }

    fn __getnewargs__(&self) -> (Vec<u8>,) {
        (Vec::new(),)
    }

    #[new]
    #[pyo3(signature = (data=None))]
    fn new(data: Option<Vec<u8>>) -> PyResult<State> {
        match data {
            Some(d) if !d.is_empty() => State::from_bytes(&d),
            _ => Ok(State {
                inner: StateInner::V41(V41State {
                    history: Vec::new(),
                    position: 0,
                }),
                owner: None,
            }),
        }
    }

    /// Writes the state to `path` (atomically).
    fn save(&self, path: std::path::PathBuf) -> PyResult<()> {
        let bytes = self.to_bytes()?;
        engram::atomic::write_atomic(&path, |w| {
            use std::io::Write;
            w.write_all(&bytes)
        })
        .map_err(err)
    }

    /// Reads a state written by `save`.
    #[staticmethod]
    fn load(path: std::path::PathBuf) -> PyResult<State> {
        let b = engram::files::read_limited(&path, 1 << 30, "state").map_err(err)?;
        State::from_bytes(&b)
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            StateInner::Demo(s) => format!("State(demo, position={})", s.position()),
            StateInner::V41(s) => format!("State(v41, position={})", s.position),
            StateInner::Busy => "State(in use by a running call)".into(),
        }
    }
}

/// An array whose data is not aligned for `T` is refused (no Rust view of it is sound).
fn check_aligned<T: numpy::Element>(a: &PyReadonlyArrayDyn<'_, T>, name: &str) -> PyResult<()> {
    let align = std::mem::align_of::<T>();
    if !(a.data() as usize).is_multiple_of(align) {
        return Err(verr(format!(
            "{name}: expected an array aligned to {align} bytes, found one at a misaligned \
             address (pass np.require(a, requirements=\"CA\"))"
        )));
    }
    Ok(())
}

/// The array's values, copied before the engine runs: the engine reads them with the GIL
/// released, when another Python thread could write to, resize or free the array. An
/// array whose data is not aligned for `T` is refused (no Rust view of it would be sound).
fn values_of<T: numpy::Element + Copy>(
    a: &PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<(Vec<T>, Vec<usize>)> {
    check_aligned(a, name)?;
    let shape = a.shape().to_vec();
    let v = match a.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    };
    Ok((v, shape))
}

/// Most floats a layer keeps in its input buffer between calls (256 MB): a larger call's
/// buffer is freed after it, so one long prefill does not pin its copy for good.
const KEEP_INPUT_FLOATS: usize = 1 << 26;

/// The layer's input buffer while a call uses it (trimmed when the call ends).
struct HeldInput<'a>(Option<std::sync::MutexGuard<'a, Vec<f32>>>);

impl Drop for HeldInput<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.0.as_mut() {
            if v.capacity() > KEEP_INPUT_FLOATS {
                **v = Vec::new();
            }
        }
    }
}

/// The float array's values copied into `out` (its capacity reused); its shape.
fn floats_into(
    a: &PyReadonlyArrayDyn<'_, f32>,
    name: &str,
    out: &mut Vec<f32>,
) -> PyResult<Vec<usize>> {
    check_aligned(a, name)?;
    out.clear();
    match a.as_slice() {
        Ok(s) => out.extend_from_slice(s),
        Err(_) => out.extend(a.as_array().iter().copied()),
    }
    Ok(a.shape().to_vec())
}

/// `[B, L]` or `[T]` int64 ids.
fn ids_of(a: &PyReadonlyArrayDyn<'_, i64>) -> PyResult<(Vec<i64>, Vec<usize>)> {
    values_of(a, "input_ids")
}

fn mask_of(
    m: Option<PyReadonlyArrayDyn<'_, bool>>,
    shape: &[usize],
) -> PyResult<Option<Vec<bool>>> {
    let Some(m) = m else { return Ok(None) };
    if m.shape() != shape {
        return Err(verr(format!(
            "token_mask: expected shape {shape:?} (that of input_ids), found {:?}",
            m.shape()
        )));
    }
    Ok(Some(m.as_array().iter().copied().collect()))
}

/// Moves `v` into a NumPy array of `shape` (no copy).
fn put<'py, T: numpy::Element>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    name: &str,
    v: Vec<T>,
    shape: &[usize],
) -> PyResult<()> {
    let a = numpy::ndarray::Array::from_shape_vec(numpy::ndarray::IxDyn(shape), v)
        .map_err(|e| verr(format!("{name}: {e}")))?;
    d.set_item(name, a.into_pyarray(py))
}

fn put_f32<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    name: &str,
    v: Vec<f32>,
    shape: &[usize],
) -> PyResult<()> {
    put(py, d, name, v, shape)
}

fn put_i64<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    name: &str,
    v: Vec<i64>,
    shape: &[usize],
) -> PyResult<()> {
    put(py, d, name, v, shape)
}

impl Layer {
    /// Runs `f` on the layer's pool with the GIL released. A panic (a bug: the engine
    /// returns errors for every bad input) comes back as a RuntimeError, so that callers
    /// still put lent states back.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce() -> engram::Result<T> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let t0 = Instant::now();
            // Unwind-safe enough: after a panic the caller only puts states back and
            // raises; nothing reads what the panicking call was writing.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &self.pool {
                Some(p) => p.install(f),
                None => f(),
            }));
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = t0.elapsed().as_secs_f64();
            match r {
                Ok(r) => r.map_err(err),
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "engram: internal error (please report it): {what}"
                    )))
                }
            }
        })
    }

    fn demo_dict<'py>(
        &self,
        py: Python<'py>,
        e: &Engram,
        s: Stages,
        lead: &[usize],
    ) -> PyResult<Bound<'py, PyDict>> {
        let cfg = e.config();
        let d = PyDict::new(py);
        let shape = |tail: &[usize]| -> Vec<usize> { lead.iter().chain(tail).copied().collect() };
        let (h, hc, dd, dm) = (
            cfg.num_heads(),
            cfg.hc_mult,
            cfg.hidden_size,
            cfg.memory_width(),
        );
        put_i64(py, &d, "hash_ids", s.hash_ids, &shape(&[h]))?;
        put_f32(py, &d, "gates", s.gates, &shape(&[hc]))?;
        put_f32(py, &d, "output", s.output, &shape(&[hc, dd]))?;
        for (name, v, tail) in [
            ("embeddings", s.embeddings, vec![dm]),
            ("value", s.value, vec![dd]),
            ("keys", s.keys, vec![hc, dd]),
            ("gated_value", s.gated_value, vec![hc, dd]),
            ("short_conv", s.short_conv, vec![hc, dd]),
        ] {
            if let Some(v) = v {
                put_f32(py, &d, name, v, &shape(&tail))?;
            }
        }
        Ok(d)
    }

    fn v41_dict<'py>(
        &self,
        py: Python<'py>,
        l: &V41Layer,
        s: engram::v41::V41Stages,
        lead: &[usize],
    ) -> PyResult<Bound<'py, PyDict>> {
        let cfg = l.config();
        let d = PyDict::new(py);
        let shape = |tail: &[usize]| -> Vec<usize> { lead.iter().chain(tail).copied().collect() };
        put_i64(py, &d, "hash_ids", s.hash_ids, &shape(&[cfg.columns()]))?;
        put_f32(py, &d, "gates", s.gates, &shape(&[cfg.hc_mult]))?;
        put_f32(py, &d, "output", s.output, &shape(&[cfg.hc_mult, cfg.dim]))?;
        if let Some(e) = s.embeddings {
            put_f32(py, &d, "embeddings", e, &shape(&[cfg.memory_width()]))?;
        }
        if let Some(k) = s.kv {
            put_f32(py, &d, "kv", k, &shape(&[cfg.kv_width()]))?;
        }
        Ok(d)
    }

    /// A state of another layer would continue that layer's sequence with this one's weights
    /// (the shapes can agree): refused, naming this layer.
    fn check_owners(&self, states: &[Bound<'_, State>]) -> PyResult<()> {
        for (i, s) in states.iter().enumerate() {
            if s.borrow().owner.as_ref().is_some_and(|o| *o != self.key) {
                return Err(verr(format!(
                    "states[{i}]: expected a state of this layer ({}), found a state of another layer (its sequence started on another layer or another config)",
                    self.identity
                )));
            }
        }
        Ok(())
    }

    /// Unowned states become this layer's after a call on them succeeded.
    fn adopt(&self, states: &[Bound<'_, State>]) {
        for s in states {
            s.borrow_mut().owner.get_or_insert_with(|| self.key.clone());
        }
    }

    fn widths(&self) -> (usize, usize) {
        match &self.inner {
            Inner::Demo(e, _) => (e.config().hc_mult, e.config().hidden_size),
            Inner::V41(l, _) => (l.config().hc_mult, l.config().dim),
        }
    }
}

/// What a state must match to continue on this layer, as (name, value) pairs: for the demo
/// layer, the config fields its state depends on (those `engram forward --state-in`
/// compares); for a DeepSeek-V4.1 layer, whose state is canonical ids only, the layer, N
/// and `pad_id`; for both, the tokenizer's compression.
fn state_fields(inner: &Inner) -> (&'static str, Vec<(&'static str, String)>) {
    match inner {
        Inner::Demo(e, _) => {
            let c = e.config();
            (
                "demo",
                vec![
                    ("layer", c.layer_id.to_string()),
                    ("max_ngram_size", c.max_ngram_size.to_string()),
                    ("kernel_size", c.kernel_size.to_string()),
                    ("hc_mult", c.hc_mult.to_string()),
                    ("hidden_size", c.hidden_size.to_string()),
                    ("seed", c.seed.to_string()),
                    ("pad_id", c.pad_id.to_string()),
                    ("engram_vocab_size", format!("{:?}", c.engram_vocab_size)),
                    ("tokenizer", e.hashing().compressed().fingerprint()),
                ],
            )
        }
        Inner::V41(l, _) => (
            "DeepSeek-V4.1",
            vec![
                ("layer", l.layer_id().to_string()),
                ("max_ngram_size", l.config().max_ngram_size.to_string()),
                ("pad_id", l.config().pad_id.to_string()),
                ("tokenizer", l.hashing().compressed().fingerprint()),
            ],
        ),
    }
}

/// [`state_fields`] in words, for error messages: `demo layer 15 (max_ngram_size 3, ...)`.
fn identity_of(inner: &Inner) -> String {
    let (variant, fields) = state_fields(inner);
    let rest: Vec<String> = fields[1..]
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    format!("{variant} layer {} ({})", fields[0].1, rest.join(", "))
}

/// The version prefix of owner keys: a build that changes what a key hashes changes it, and
/// keys of other versions count as no owner (never as a mismatch).
const OWNER_KEY_VERSION: &str = "engram-state-owner/1:";

/// The key states carry: a hash of [`state_fields`]' values (not of the wording of
/// [`identity_of`], which may change), under [`OWNER_KEY_VERSION`].
fn owner_key(inner: &Inner) -> Arc<str> {
    use sha2::{Digest, Sha256};
    let (variant, fields) = state_fields(inner);
    let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
    let fields = format!("{variant}|{}", values.join("|"));
    let d = Sha256::digest(fields.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("{OWNER_KEY_VERSION}{hex}"))
}

fn pool(threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    threads
        .map(|n| {
            if n == 0 {
                return Err(verr("threads: expected at least 1"));
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| verr(format!("threads: {e}")))
        })
        .transpose()
}

/// Refuses to build `copies` copies of a demo layer's weights (a table of `table_rows` rows)
/// that do not fit in memory now.
fn check_memory(cfg: &EngramConfig, table_rows: u64, copies: u64) -> PyResult<()> {
    let mut plan = engram::budget::MemoryPlan::new();
    let (d, w) = (
        cfg.hidden_size as u64,
        ((cfg.hc_mult + 1) * cfg.hidden_size) as u64,
    );
    plan.add_dims("the table", &[table_rows, cfg.head_dim() as u64, copies], 4)
        .map_err(err)?;
    plan.add_dims(
        "the projections",
        &[w, cfg.memory_width() as u64, copies],
        4,
    )
    .map_err(err)?;
    plan.add_dims(
        "norms and conv",
        &[
            d,
            (4 * cfg.hc_mult + cfg.kernel_size * cfg.hc_mult) as u64,
            copies,
        ],
        4,
    )
    .map_err(err)?;
    plan.check().map_err(err)
}

fn demo_path(path: &str) -> PyResult<ForwardPath> {
    path.parse().map_err(err)
}

fn v41_path(path: &str) -> PyResult<V41Path> {
    match path {
        "fused" => Ok(V41Path::Fused),
        "reference" => Ok(V41Path::Reference),
        o => Err(verr(format!(
            "path: expected \"fused\" or \"reference\", found {o:?}"
        ))),
    }
}

#[pymethods]
impl Layer {
    /// `forward(input_ids [B, L] int64, hidden_states [B, L, HC, D] float32, token_mask=None,
    /// all_stages=False, bf16_output=False) -> dict` of NumPy arrays; fresh sequences.
    #[pyo3(signature = (input_ids, hidden_states, token_mask=None, all_stages=false, bf16_output=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        hidden_states: PyReadonlyArrayDyn<'py, f32>,
        token_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        all_stages: bool,
        bf16_output: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ids, ishape) = ids_of(&input_ids)?;
        let [b, l] = ishape[..] else {
            return Err(verr(format!(
                "input_ids: expected shape [B, L], found {ishape:?}"
            )));
        };
        let (hc, d) = self.widths();
        let mut held = HeldInput(self.hidden.try_lock().ok());
        let mut own = Vec::new();
        let hidden: &mut Vec<f32> = held.0.as_deref_mut().unwrap_or(&mut own);
        let hshape = floats_into(&hidden_states, "hidden_states", hidden)?;
        let hidden: &[f32] = hidden;
        if hshape != [b, l, hc, d] {
            return Err(verr(format!(
                "hidden_states: expected shape {:?}, found {hshape:?}",
                [b, l, hc, d]
            )));
        }
        let mask = mask_of(token_mask, &[b, l])?;
        match &self.inner {
            Inner::Demo(e, path) => {
                if mask.is_some() {
                    return Err(verr("token_mask: the demo layer has no dead tokens (a DeepSeek-V4.1 layer does)"));
                }
                let s = self.run(py, || {
                    if all_stages {
                        e.forward_detailed(&ids, hidden, b, l, *path)
                    } else {
                        e.forward(&ids, hidden, b, l, *path)
                    }
                })?;
                self.demo_dict(py, e, s, &[b, l])
            }
            Inner::V41(layer, path) => {
                let s = self.run(py, || {
                    layer.forward(
                        &ids,
                        hidden,
                        mask.as_deref(),
                        b,
                        l,
                        bf16_output,
                        *path,
                        all_stages,
                    )
                })?;
                self.v41_dict(py, layer, s, &[b, l])
            }
        }
    }

    /// A sequence that has not started.
    fn new_state(&self) -> State {
        let inner = match &self.inner {
            Inner::Demo(e, _) => StateInner::Demo(e.new_state()),
            Inner::V41(l, _) => StateInner::V41(l.new_state()),
        };
        State {
            inner,
            owner: Some(self.key.clone()),
        }
    }

    /// `forward_ragged(states, input_ids [T], hidden_states [T, HC, D], offsets [S+1],
    /// token_mask=None, bf16_output=False) -> dict`: sequence s has rows offsets[s]..offsets[s+1]
    /// and its own state, which is updated.
    #[pyo3(signature = (states, input_ids, hidden_states, offsets, token_mask=None, bf16_output=false))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn forward_ragged<'py>(
        &self,
        py: Python<'py>,
        states: Vec<Bound<'py, State>>,
        input_ids: PyReadonlyArrayDyn<'py, i64>,
        hidden_states: PyReadonlyArrayDyn<'py, f32>,
        offsets: PyReadonlyArray1<'py, i64>,
        token_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
        bf16_output: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (ids, ishape) = ids_of(&input_ids)?;
        if ishape.len() != 1 {
            return Err(verr(format!(
                "input_ids: expected shape [T], found {ishape:?}"
            )));
        }
        let t = ids.len();
        let (hc, d) = self.widths();
        let mut held = HeldInput(self.hidden.try_lock().ok());
        let mut own = Vec::new();
        let hidden: &mut Vec<f32> = held.0.as_deref_mut().unwrap_or(&mut own);
        let hshape = floats_into(&hidden_states, "hidden_states", hidden)?;
        let hidden: &[f32] = hidden;
        if hshape != [t, hc, d] {
            return Err(verr(format!(
                "hidden_states: expected shape {:?}, found {hshape:?}",
                [t, hc, d]
            )));
        }
        if !(offsets.data() as usize).is_multiple_of(std::mem::align_of::<i64>()) {
            return Err(verr(
                "offsets: expected an array aligned to 8 bytes, found one at a misaligned address",
            ));
        }
        let off: Vec<usize> = offsets
            .as_array()
            .iter()
            .map(|&o| {
                usize::try_from(o)
                    .map_err(|_| verr(format!("offsets: expected values >= 0, found {o}")))
            })
            .collect::<PyResult<_>>()?;
        let mask = mask_of(token_mask, &[t])?;
        let mut seen = std::collections::HashSet::new();
        if !states.iter().all(|s| seen.insert(s.as_ptr() as usize)) {
            return Err(verr(
                "states: the same State object appears twice; each sequence needs its own",
            ));
        }
        match &self.inner {
            Inner::Demo(e, path) => {
                if mask.is_some() {
                    return Err(verr("token_mask: the demo layer has no dead tokens (a DeepSeek-V4.1 layer does)"));
                }
                for s in &states {
                    match s.borrow().inner {
                        StateInner::Demo(_) => {}
                        StateInner::Busy => return Err(busy()),
                        StateInner::V41(_) => {
                            return Err(verr("states: a DeepSeek-V4.1 state given to a demo layer"))
                        }
                    }
                }
                self.check_owners(&states)?;
                // Moved out of the Python objects for the call and back after it (no copy).
                let mut st: Vec<EngramState> = states
                    .iter()
                    .map(
                        |s| match std::mem::replace(&mut s.borrow_mut().inner, placeholder()) {
                            StateInner::Demo(x) => x,
                            _ => unreachable!("checked above, under the GIL"),
                        },
                    )
                    .collect();
                let r = self.run(py, || e.forward_ragged(&mut st, &ids, hidden, &off, *path));
                for (o, n) in states.iter().zip(st) {
                    o.borrow_mut().inner = StateInner::Demo(n);
                }
                let r = r?;
                self.adopt(&states);
                self.demo_dict(py, e, r, &[t])
            }
            Inner::V41(layer, path) => {
                for s in &states {
                    match s.borrow().inner {
                        StateInner::V41(_) => {}
                        StateInner::Busy => return Err(busy()),
                        StateInner::Demo(_) => {
                            return Err(verr(
                                "states: a demo-layer state given to a DeepSeek-V4.1 layer",
                            ))
                        }
                    }
                }
                self.check_owners(&states)?;
                let mut st: Vec<V41State> = states
                    .iter()
                    .map(
                        |s| match std::mem::replace(&mut s.borrow_mut().inner, placeholder()) {
                            StateInner::V41(x) => x,
                            _ => unreachable!("checked above, under the GIL"),
                        },
                    )
                    .collect();
                let r = self.run(py, || {
                    layer.forward_ragged(
                        &mut st,
                        &ids,
                        hidden,
                        mask.as_deref(),
                        &off,
                        bf16_output,
                        *path,
                        false,
                    )
                });
                for (o, n) in states.iter().zip(st) {
                    o.borrow_mut().inner = StateInner::V41(n);
                }
                let r = r?;
                self.adopt(&states);
                self.v41_dict(py, layer, r, &[t])
            }
        }
    }

    /// Seconds the engine itself spent in the last call (the rest of a call's time is the
    /// Python binding's overhead).
    #[getter]
    fn last_engine_seconds(&self) -> f64 {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// "demo" or "deepseek-v4.1".
    #[getter]
    fn variant(&self) -> &'static str {
        match &self.inner {
            Inner::Demo(..) => "demo",
            Inner::V41(..) => "deepseek-v4.1",
        }
    }

    /// (hc_mult, hidden width).
    #[getter]
    fn shape(&self) -> (usize, usize) {
        self.widths()
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            Inner::Demo(e, p) => format!(
                "Layer(demo, layer_id={}, hc_mult={}, hidden_size={}, table={}x{}, path={p:?}, dtype={:?})",
                e.config().layer_id,
                e.config().hc_mult,
                e.config().hidden_size,
                e.weights().table.rows(),
                e.weights().table.dim(),
                e.dtype()
            ),
            Inner::V41(l, p) => format!("Layer(deepseek-v4.1, layer={}, dim={}, path={p:?})", l.layer_id(), l.config().dim),
        }
    }
}

/// Row-store options: `table_io` "ram", "mmap" or "direct", `table_cache` a size like
/// "512M", `policy` "s3fifo", "clock" or "lru", `io_depth` reads in flight (direct).
fn table_options(
    io: Option<&str>,
    cache: Option<&str>,
    policy: Option<&str>,
    io_depth: Option<usize>,
    store: Option<&str>,
) -> PyResult<engram::rows::TableOptions> {
    if let Some(n) = io_depth {
        let max = engram::rows::MAX_IO_DEPTH;
        if n == 0 || n > max {
            return Err(verr(format!(
                "io_depth: expected 1 to {max} reads in flight, found {n}"
            )));
        }
    }
    let cache_bytes = cache
        .map(engram::rows::parse_size)
        .transpose()
        .map_err(err)?;
    if cache_bytes == Some(0) {
        return Err(verr(
            "table_cache: expected a size above 0 (None for no cache), found 0",
        ));
    }
    Ok(engram::rows::TableOptions {
        io: io.unwrap_or("mmap").parse().map_err(err)?,
        cache_bytes,
        cache_policy: policy.unwrap_or("s3fifo").parse().map_err(err)?,
        io_depth,
        store: store.map(str::to_string),
        ..Default::default()
    })
}

/// `load(config, is_path, weights, layer, dtype, path, tokenizer, threads, table_io,
/// table_cache, table_cache_policy, io_depth, table_store) -> Layer`.
#[pyfunction]
#[pyo3(signature = (config, is_path, weights, layer=None, dtype="f32", path="fused", tokenizer=None, threads=None, table_io=None, table_cache=None, table_cache_policy=None, io_depth=None, table_store=None))]
#[allow(clippy::too_many_arguments)]
fn load(
    py: Python<'_>,
    config: &str,
    is_path: bool,
    weights: &str,
    layer: Option<u64>,
    dtype: &str,
    path: &str,
    tokenizer: Option<&str>,
    threads: Option<usize>,
    table_io: Option<&str>,
    table_cache: Option<&str>,
    table_cache_policy: Option<&str>,
    io_depth: Option<usize>,
    table_store: Option<&str>,
) -> PyResult<Layer> {
    engram::fused::check_env().map_err(err)?;
    let v = config_json(config, is_path)?;
    let pool = pool(threads)?;
    let table = table_options(
        table_io,
        table_cache,
        table_cache_policy,
        io_depth,
        table_store,
    )?;
    let inner = if engram::v41::config::is_v41(&v) {
        if dtype != "f32" {
            return Err(verr(format!(
                "dtype {dtype:?}: a DeepSeek-V4.1 layer keeps its fp8 weights (its output follows the hidden states' dtype)"
            )));
        }
        let cfg = V41Config::from_value(&v).map_err(err)?;
        let layer = layer.ok_or_else(|| {
            verr(format!(
                "layer: a DeepSeek-V4.1 config carries several Engram layers {:?}; say which one",
                cfg.layer_ids
            ))
        })?;
        let p = v41_path(path)?;
        let tok = tokenizer.map(str::to_string);
        let weights = weights.to_string();
        let l = py
            .allow_threads(move || -> engram::Result<V41Layer> {
                let t = match tok {
                    Some(p) => Tokenizer::from_name_or_path(&p)?,
                    None => Tokenizer::bundled()?,
                };
                let comp = Arc::new(CompressedTokenizer::build(&t)?);
                V41Layer::load_with(&cfg, comp, &Checkpoint::open(&weights)?, layer, table)
            })
            .map_err(err)?;
        Inner::V41(l, p)
    } else {
        let mut cfg: EngramConfig = EngramConfig::from_json_str(&v.to_string()).map_err(err)?;
        if let Some(l) = layer {
            if !cfg.layer_ids.contains(&l) {
                return Err(verr(format!(
                    "layer: expected one of the config's layer_ids {:?}, found {l}",
                    cfg.layer_ids
                )));
            }
            cfg.layer_id = l;
        }
        if let Some(t) = tokenizer {
            cfg.tokenizer_name_or_path = t.to_string();
        }
        let dt: DType = dtype.parse().map_err(err)?;
        let p = demo_path(path)?;
        if p == ForwardPath::Reference && dt != DType::F32 {
            return Err(verr(format!(
                "dtype {dtype:?}: the fused path's storage; expected path=\"fused\" with it (the reference runs in f32)"
            )));
        }
        let weights = weights.to_string();
        let e = py
            .allow_threads(move || Engram::load_with_table(cfg, &weights, table))
            .map_err(err)?
            .with_dtype(dt);
        Inner::Demo(e, p)
    };
    Ok(Layer {
        identity: identity_of(&inner),
        key: owner_key(&inner),
        inner,
        pool,
        last: std::sync::Mutex::new(0.0),
        hidden: Default::default(),
    })
}

/// The demo layer with PyTorch's default weights after `torch.manual_seed(seed)`.
#[pyfunction]
#[pyo3(signature = (config, is_path, seed, dtype="f32", path="fused", threads=None))]
fn torch_default(
    py: Python<'_>,
    config: &str,
    is_path: bool,
    seed: u64,
    dtype: &str,
    path: &str,
    threads: Option<usize>,
) -> PyResult<Layer> {
    engram::fused::check_env().map_err(err)?;
    let v = config_json(config, is_path)?;
    if engram::v41::config::is_v41(&v) {
        return Err(verr(
            "torch_default: only the demo layer has a PyTorch default initialisation",
        ));
    }
    let cfg: EngramConfig = EngramConfig::from_json_str(&v.to_string()).map_err(err)?;
    let dt: DType = dtype.parse().map_err(err)?;
    let p = demo_path(path)?;
    let m = py
        .allow_threads(|| -> engram::Result<_> {
            let comp = engram::layer::compression_for(&cfg)?;
            Ok(Arc::new(NgramHashMapping::new(&cfg, comp)?))
        })
        .map_err(err)?;
    check_memory(&cfg, m.layer(cfg.layer_id).map_err(err)?.table_rows(), 1)?;
    let e = py
        .allow_threads(move || -> engram::Result<Engram> {
            let (w, _) = engram::init::torch_default_weights(&cfg, &m, seed, &mut |_| {})?;
            Engram::new(cfg, m, w)
        })
        .map_err(err)?
        .with_dtype(dt);
    let inner = Inner::Demo(e, p);
    Ok(Layer {
        identity: identity_of(&inner),
        key: owner_key(&inner),
        inner,
        pool: pool(threads)?,
        last: std::sync::Mutex::new(0.0),
        hidden: Default::default(),
    })
}

/// The demo layer from state-dict arrays (the reference's names; float32, offsets int64).
#[pyfunction]
#[pyo3(signature = (config, tensors, path="fused", threads=None))]
fn from_state_dict(
    config: &str,
    tensors: &Bound<'_, PyDict>,
    path: &str,
    threads: Option<usize>,
) -> PyResult<Layer> {
    engram::fused::check_env().map_err(err)?;
    let v = config_json(config, false)?;
    let cfg: EngramConfig = EngramConfig::from_json_str(&v.to_string()).map_err(err)?;
    let get = |name: &str| -> PyResult<Vec<f32>> {
        let a = tensors
            .get_item(name)?
            .ok_or_else(|| verr(format!("state dict: missing `{name}`")))?;
        let a: PyReadonlyArrayDyn<'_, f32> = a
            .extract()
            .map_err(|_| verr(format!("`{name}`: expected a float32 array")))?;
        Ok(values_of(&a, name)?.0)
    };
    let comp = engram::layer::compression_for(&cfg).map_err(err)?;
    let m = Arc::new(NgramHashMapping::new(&cfg, comp).map_err(err)?);
    let layer = m.layer(cfg.layer_id).map_err(err)?;
    let (rows, dim) = (layer.table_rows() as usize, cfg.head_dim());
    let hc = cfg.hc_mult;
    let offsets_name = "multi_head_embedding.offsets";
    let offsets: Vec<i64> = match tensors.get_item(offsets_name)? {
        Some(a) => {
            let a: PyReadonlyArrayDyn<'_, i64> = a
                .extract()
                .map_err(|_| verr(format!("`{offsets_name}`: expected an int64 array")))?;
            values_of(&a, offsets_name)?.0
        }
        None => layer.offsets().iter().map(|&o| o as i64).collect(),
    };
    let per = |prefix: &str, suffix: &str| -> PyResult<Vec<Vec<f32>>> {
        (0..hc)
            .map(|i| get(&format!("{prefix}.{i}.{suffix}")))
            .collect()
    };
    let w = engram::EngramWeights {
        table: engram::weights::EmbeddingTable::from_f32(
            get("multi_head_embedding.embedding.weight")?,
            rows,
            dim,
        )
        .map_err(err)?,
        offsets,
        value_proj_weight: get("value_proj.weight")?,
        value_proj_bias: get("value_proj.bias")?,
        key_projs_weight: per("key_projs", "weight")?,
        key_projs_bias: per("key_projs", "bias")?,
        norm1: per("norm1", "weight")?,
        norm2: per("norm2", "weight")?,
        conv_weight: get("short_conv.conv.weight")?,
        conv_norms: per("short_conv.norms", "weight")?,
    };
    let e = Engram::new(cfg, m, w).map_err(err)?;
    let inner = Inner::Demo(e, demo_path(path)?);
    Ok(Layer {
        identity: identity_of(&inner),
        key: owner_key(&inner),
        inner,
        pool: pool(threads)?,
        last: std::sync::Mutex::new(0.0),
        hidden: Default::default(),
    })
}

/// The state-dict arrays of a demo layer (for modules that hold them as tensors).
#[pyfunction]
fn state_dict<'py>(py: Python<'py>, layer: &Layer) -> PyResult<Bound<'py, PyDict>> {
    let Inner::Demo(e, _) = &layer.inner else {
        return Err(verr("state_dict: only for the demo layer"));
    };
    let w = e.weights();
    check_memory(e.config(), w.table.rows() as u64, 1)?; // the arrays are a copy of the weights
    let (cfg, d) = (e.config(), PyDict::new(py));
    let (rows, dim) = (w.table.rows(), w.table.dim());
    let mut table = vec![0f32; rows * dim];
    // Rows from a store can fail (a file, a remote store): an error, never NaN rows.
    py.allow_threads(|| {
        table
            .chunks_exact_mut(dim)
            .enumerate()
            .try_for_each(|(r, row)| w.table.try_row_into(r, row))
    })
    .map_err(err)?;
    put_f32(
        py,
        &d,
        "multi_head_embedding.embedding.weight",
        table,
        &[rows, dim],
    )?;
    put_i64(
        py,
        &d,
        "multi_head_embedding.offsets",
        w.offsets.clone(),
        &[w.offsets.len()],
    )?;
    for (name, shape, data) in w.float_tensors(cfg) {
        put_f32(py, &d, &name, data.to_vec(), &shape)?;
    }
    Ok(d)
}

/// Token ids of `text` (BOS first unless `bos=False`).
#[pyfunction]
#[pyo3(signature = (text, bos=true, tokenizer=None))]
fn tokenize<'py>(
    py: Python<'py>,
    text: &str,
    bos: bool,
    tokenizer: Option<&str>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let t = self::tokenizer(tokenizer)?;
    Ok(PyArray1::from_vec(py, t.encode(text, bos).map_err(err)?))
}

/// The compression table: canonical id of every raw token id.
#[pyfunction]
#[pyo3(signature = (tokenizer=None))]
fn compression_table<'py>(
    py: Python<'py>,
    tokenizer: Option<&str>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let t = self::tokenizer(tokenizer)?;
    let c = py
        .allow_threads(|| CompressedTokenizer::build(&t))
        .map_err(err)?;
    Ok(PyArray1::from_slice(py, c.lookup()))
}

/// n-gram hashes of `[B, L]` ids for every layer of a config: {layer_id: [B, L, H]};
/// `tokenizer` overrides the config's (demo) or the bundled one (V4.1).
#[pyfunction]
#[pyo3(signature = (config, is_path, input_ids, tokenizer=None))]
fn hash<'py>(
    py: Python<'py>,
    config: &str,
    is_path: bool,
    input_ids: PyReadonlyArrayDyn<'py, i64>,
    tokenizer: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let v = config_json(config, is_path)?;
    let (ids, shape) = ids_of(&input_ids)?;
    // As `forward` and the CLI's `hash`: an empty batch or sequence is refused.
    let (b, l) = match shape[..] {
        [b, l] if b >= 1 && l >= 1 => (b, l),
        _ => {
            return Err(verr(format!(
                "input_ids: expected shape [B, L] with B, L >= 1, found {shape:?}"
            )))
        }
    };
    let d = PyDict::new(py);
    if engram::v41::config::is_v41(&v) {
        let cfg = V41Config::from_value(&v).map_err(err)?;
        let t = self::tokenizer(tokenizer)?;
        let comp = Arc::new(
            py.allow_threads(|| CompressedTokenizer::build(&t))
                .map_err(err)?,
        );
        for &layer in &cfg.layer_ids {
            let h = engram::v41::V41Hashing::new(&cfg, comp.clone(), layer).map_err(err)?;
            let mut rows = Vec::with_capacity(ids.len() * h.columns());
            for s in 0..b {
                let canon = h.canonical(&ids[s * l..(s + 1) * l], None).map_err(err)?;
                let mut hist = vec![engram::v41::DEAD; h.history_len()];
                rows.extend(h.hash_chunk(&mut hist, &canon));
            }
            put_i64(py, &d, &layer.to_string(), rows, &[b, l, h.columns()])?;
        }
        return Ok(d);
    }
    let mut cfg: EngramConfig = EngramConfig::from_json_str(&v.to_string()).map_err(err)?;
    if let Some(t) = tokenizer {
        cfg.tokenizer_name_or_path = t.to_string();
    }
    let comp = py
        .allow_threads(|| engram::layer::compression_for(&cfg))
        .map_err(err)?;
    let m = NgramHashMapping::new(&cfg, comp).map_err(err)?;
    for layer in m.layers() {
        let h = m.hash(layer.layer_id, &ids, l).map_err(err)?;
        put_i64(
            py,
            &d,
            &layer.layer_id.to_string(),
            h,
            &[b, l, m.num_heads()],
        )?;
    }
    Ok(d)
}

#[pymodule]
fn _engram(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Layer>()?;
    m.add_class::<State>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(torch_default, m)?)?;
    m.add_function(wrap_pyfunction!(from_state_dict, m)?)?;
    m.add_function(wrap_pyfunction!(state_dict, m)?)?;
    m.add_function(wrap_pyfunction!(tokenize, m)?)?;
    m.add_function(wrap_pyfunction!(compression_table, m)?)?;
    m.add_function(wrap_pyfunction!(hash, m)?)?;
    Ok(())
}
