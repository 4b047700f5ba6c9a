//! The demo layer on the GPU: weights uploaded once, a per-shape workspace, device-resident
//! streaming state, and one enqueue of five launches per call (hash + gather, the projection
//! through cuBLAS, gates, conv + output, state advance), which a CUDA graph can capture.

use crate::device::{Gpu, Kernels};
use crate::error::{blas, drv, CudaError, Result};
use cudarc::cublas::{result as cublas_result, sys as cublas_sys};
use cudarc::driver::{
    sys as cu_sys, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use engram::{DType, Engram, EngramState, Stages};
use half::bf16;
use std::sync::Arc;

/// Tokens per block of `hash_gather` (the `HASH_TOKENS` of the kernel source).
const HASH_TOKENS: usize = 4;

/// Which conv + output kernel a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvKernel {
    /// `conv_out`: one thread per 8 channels over all rows (checked against the golden
    /// files on an H200; slow: its conv-weight loads are strided).
    #[default]
    Strided,
    /// `conv_rows`: one block per row, tap-major conv weights (coalesced); the same
    /// arithmetic, meant to be bit-identical to `Strided`. Not yet run on a GPU: the next
    /// device check measures it and compares it with `Strided`.
    Rows,
}

/// One Engram layer's weights on the GPU.
pub struct CudaEngram {
    gpu: Arc<Gpu>,
    dtype: DType,
    /// Dimensions: HC, D, Dm, H, N, K (heads per order), KC, d, W = (HC+1)·D.
    hc: usize,
    d: usize,
    dm: usize,
    heads: usize,
    n: usize,
    k_heads: usize,
    kc: usize,
    row_d: usize,
    w: usize,
    vocab: usize,
    pad_canonical: i64,
    eps: f32,
    table: CudaSlice<u8>,
    lookup: CudaSlice<i64>,
    mult: CudaSlice<i64>,
    primes: CudaSlice<i64>,
    offsets: CudaSlice<i64>,
    /// `[W, Dm]`: value_proj rows, then key_projs.0..HC-1 (the activation type).
    proj_w: CudaSlice<u8>,
    /// `[W]`: value_proj.bias, then key_projs.{i}.bias.
    bias: CudaSlice<f32>,
    norm1: CudaSlice<f32>,
    norm2: CudaSlice<f32>,
    conv_norm: CudaSlice<f32>,
    /// `short_conv.conv.weight` `[HC·D, KC]`.
    conv_w: CudaSlice<f32>,
    /// The same, tap-major `[KC, HC·D]` (for `conv_rows`).
    conv_wt: CudaSlice<f32>,
    conv_kernel: ConvKernel,
    err: CudaSlice<i32>,
}

impl std::fmt::Debug for CudaEngram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaEngram({:?}, {} rows x {}, {:?})",
            self.gpu.info.name,
            self.table.len() / self.row_d / self.elem(),
            self.row_d,
            self.dtype
        )
    }
}

/// Streaming state of `batch` sequences on the device (see `kernels/engram.cu`).
pub struct DeviceState {
    batch: usize,
    ngram: CudaSlice<i64>,
    conv: CudaSlice<f32>,
    pos: CudaSlice<i64>,
}

impl DeviceState {
    /// Sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Kernel arguments of one call.
struct Args {
    t: usize,
    b: i32,
    l: i32,
    ids: u64,
    ngram: u64,
    pos: u64,
    conv_ring: u64,
    emb: u64,
    kv: u64,
    hidden: u64,
    out: u64,
    gates: u64,
    cscale: u64,
    hash: u64,
    gated: u64,
    short_conv: u64,
}

/// Device buffers for calls of `batch` sequences × `len` tokens.
pub struct Workspace {
    batch: usize,
    len: usize,
    ids: CudaSlice<i64>,
    hidden: CudaSlice<u8>,
    emb: CudaSlice<u8>,
    kv: CudaSlice<u8>,
    gates: CudaSlice<f32>,
    cscale: CudaSlice<f32>,
    out: CudaSlice<u8>,
    /// Kept only for a stage-by-stage run.
    hash: Option<CudaSlice<i64>>,
    gated: Option<CudaSlice<f32>>,
    short_conv: Option<CudaSlice<f32>>,
}

impl Workspace {
    /// (B, L).
    pub fn shape(&self) -> (usize, usize) {
        (self.batch, self.len)
    }
}

fn unsupported(field: &'static str, expected: &str, found: impl ToString) -> CudaError {
    CudaError::Unsupported {
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// The raw device address of a buffer, as a kernel argument.
fn ptr<T>(s: &CudaSlice<T>, gpu: &Gpu) -> u64 {
    let (p, _sync) = s.device_ptr(&gpu.stream);
    p
}

fn opt_ptr<T>(s: &Option<CudaSlice<T>>, gpu: &Gpu) -> u64 {
    s.as_ref().map_or(0, |s| ptr(s, gpu))
}

fn bf16_bytes(x: &[f32]) -> Vec<u8> {
    let v: Vec<u16> = x.iter().map(|&f| bf16::from_f32(f).to_bits()).collect();
    bytemuck::cast_slice(&v).to_vec()
}

fn no_sequences(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(engram::EngramError::invalid("state", "at least one sequence", 0).into());
    }
    Ok(())
}

fn i32_of(x: usize, field: &'static str) -> Result<i32> {
    i32::try_from(x).map_err(|_| unsupported(field, "below 2^31", x))
}

impl CudaEngram {
    /// Uploads `layer`'s weights: the table and projections in `dtype` (bf16 rounds to
    /// nearest even), norms, biases and the conv in f32, the hash parameters as int64.
    pub fn new(gpu: Arc<Gpu>, layer: &Engram, dtype: DType) -> Result<Self> {
        let cfg = layer.config();
        let (hc, d, dm) = (cfg.hc_mult, cfg.hidden_size, cfg.memory_width());
        let (heads, n, k_heads) = (cfg.num_heads(), cfg.max_ngram_size, cfg.n_head_per_ngram);
        let (kc, row_d) = (cfg.kernel_size, cfg.head_dim());
        let elem = match dtype {
            DType::F32 => 4,
            DType::Bf16 => 2,
        };
        if d % 8 != 0 {
            return Err(unsupported("hidden_size", "a multiple of 8", d));
        }
        if (row_d * elem) % 16 != 0 {
            return Err(unsupported(
                "n_embed_per_ngram / n_head_per_ngram",
                "a table row of a multiple of 16 bytes",
                format!("{row_d} columns of {elem} bytes"),
            ));
        }
        if heads * HASH_TOKENS * 8 > 48 << 10 {
            return Err(unsupported("hash heads", "at most 1536", heads));
        }
        if kc == 0 {
            return Err(unsupported("kernel_size", "at least 1", kc));
        }
        let w = (hc + 1) * d;
        for (v, f) in [(w, "hc_mult"), (dm, "memory width")] {
            i32_of(v, f)?;
        }
        let stream = gpu.stream.clone();
        let up_f32 = |v: &[f32], what: &'static str| stream.clone_htod(v).map_err(drv(what));
        let up_i64 = |v: &[i64], what: &'static str| stream.clone_htod(v).map_err(drv(what));
        let wts = layer.weights();
        let params = layer.layer_params();
        let lookup = up_i64(layer.hashing().compressed().lookup(), "compression table")?;
        let mult = up_i64(&params.multipliers, "multipliers")?;
        let primes: Vec<i64> = params.head_sizes().iter().map(|&p| p as i64).collect();
        let primes = up_i64(&primes, "primes")?;
        let offsets = up_i64(&wts.offsets, "offsets")?;

        // Projection weights [W, Dm]: value rows, then each branch's key rows.
        let mut proj = Vec::with_capacity(w * dm);
        proj.extend_from_slice(&wts.value_proj_weight);
        for k in &wts.key_projs_weight {
            proj.extend_from_slice(k);
        }
        let proj_w = match dtype {
            DType::F32 => stream.clone_htod(bytemuck::cast_slice::<f32, u8>(&proj)),
            DType::Bf16 => stream.clone_htod(&bf16_bytes(&proj)),
        }
        .map_err(drv("projection weights"))?;
        let mut bias = wts.value_proj_bias.clone();
        for b in &wts.key_projs_bias {
            bias.extend_from_slice(b);
        }
        let bias = up_f32(&bias, "biases")?;
        let norm1 = up_f32(&wts.norm1.concat(), "norm1")?;
        let norm2 = up_f32(&wts.norm2.concat(), "norm2")?;
        let conv_norm = up_f32(&wts.conv_norms.concat(), "short_conv.norms")?;
        let conv_w = up_f32(&wts.conv_weight, "short_conv.conv.weight")?;
        let c = hc * d;
        let mut wt = vec![0f32; kc * c];
        for (ch, taps) in wts.conv_weight.chunks_exact(kc).enumerate() {
            for (k, &x) in taps.iter().enumerate() {
                wt[k * c + ch] = x;
            }
        }
        let conv_wt = up_f32(&wt, "short_conv.conv.weight (tap-major)")?;

        // The table, in slabs of rows converted on the host (never a second full copy).
        let rows = wts.table.rows();
        let mut table = stream
            .alloc_zeros::<u8>(rows * row_d * elem)
            .map_err(drv("allocating the table"))?;
        const SLAB: usize = 1 << 16;
        let mut row = vec![0f32; row_d];
        let mut host: Vec<u8> = Vec::with_capacity(SLAB * row_d * elem);
        for start in (0..rows).step_by(SLAB) {
            let end = (start + SLAB).min(rows);
            host.clear();
            for r in start..end {
                wts.table.try_row_into(r, &mut row)?;
                match dtype {
                    DType::F32 => host.extend_from_slice(bytemuck::cast_slice(&row)),
                    DType::Bf16 => host.extend_from_slice(&bf16_bytes(&row)),
                }
            }
            let mut dst = table.slice_mut(start * row_d * elem..end * row_d * elem);
            stream
                .memcpy_htod(&host, &mut dst)
                .map_err(drv("uploading the table"))?;
        }
        let err = stream.alloc_zeros::<i32>(1).map_err(drv("error flag"))?;
        stream.synchronize().map_err(drv("upload"))?;
        Ok(CudaEngram {
            dtype,
            hc,
            d,
            dm,
            heads,
            n,
            k_heads,
            kc,
            row_d,
            w,
            vocab: layer.hashing().compressed().num_raw(),
            pad_canonical: layer.hashing().pad_canonical(),
            eps: f32::EPSILON,
            table,
            lookup,
            mult,
            primes,
            offsets,
            proj_w,
            bias,
            norm1,
            norm2,
            conv_norm,
            conv_w,
            conv_wt,
            conv_kernel: ConvKernel::default(),
            err,
            gpu,
        })
    }

    /// Uses `k` for the conv + output stage.
    pub fn with_conv_kernel(mut self, k: ConvKernel) -> Self {
        self.conv_kernel = k;
        self
    }

    /// Switches the conv + output kernel in place.
    pub fn set_conv_kernel(&mut self, k: ConvKernel) {
        self.conv_kernel = k;
    }

    /// The conv + output kernel in use.
    pub fn conv_kernel(&self) -> ConvKernel {
        self.conv_kernel
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Activation and weight type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn elem(&self) -> usize {
        match self.dtype {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    fn kernels(&self) -> &Kernels {
        match self.dtype {
            DType::F32 => &self.gpu.f32_kernels,
            DType::Bf16 => &self.gpu.bf16_kernels,
        }
    }

    /// Bytes of the projection weights (read once per call).
    pub fn weight_bytes(&self) -> usize {
        self.proj_w.len()
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
        what: &'static str,
    ) -> Result<CudaSlice<T>> {
        self.gpu
            .stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(drv(what))
    }

    /// Fresh states (sequence starts) for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> Result<DeviceState> {
        no_sequences(batch)?;
        let hist = self.n - 1;
        let r = (self.kc - 1) * self.n;
        let ngram = self
            .gpu
            .stream
            .clone_htod(&vec![self.pad_canonical; batch * hist])
            .map_err(drv("n-gram state"))?;
        Ok(DeviceState {
            batch,
            ngram,
            conv: self.alloc(batch * r * self.hc * self.d, "conv state")?,
            pos: self.alloc(batch, "positions")?,
        })
    }

    /// Device states holding `states` (from the CPU engine or [`CudaEngram::download_states`]).
    pub fn upload_states(&self, states: &[EngramState]) -> Result<DeviceState> {
        no_sequences(states.len())?;
        let hist = self.n - 1;
        let r = (self.kc - 1) * self.n;
        let c = self.hc * self.d;
        let mut ngram = vec![0i64; states.len() * hist];
        let mut conv = vec![0f32; states.len() * r * c];
        let mut pos = Vec::with_capacity(states.len());
        for (b, s) in states.iter().enumerate() {
            let p = s.position();
            let h = s.ngram_history();
            let ch = s.conv_history();
            if h.len() != hist || ch.len() != r * c {
                return Err(CudaError::Engram(engram::EngramError::Shape {
                    name: "state".into(),
                    expected: vec![hist, r * c],
                    found: vec![h.len(), ch.len()],
                }));
            }
            // Oldest-first entry j is absolute position p - hist + j: slot (p + j) mod hist.
            for (j, &id) in h.iter().enumerate() {
                ngram[b * hist + (p as usize + j) % hist] = id;
            }
            for j in 0..r {
                let slot = (p as usize + j) % r;
                conv[(b * r + slot) * c..(b * r + slot + 1) * c]
                    .copy_from_slice(&ch[j * c..(j + 1) * c]);
            }
            pos.push(p as i64);
        }
        let st = &self.gpu.stream;
        Ok(DeviceState {
            batch: states.len(),
            ngram: st.clone_htod(&ngram).map_err(drv("n-gram state"))?,
            conv: if conv.is_empty() {
                self.alloc(1, "conv state")?
            } else {
                st.clone_htod(&conv).map_err(drv("conv state"))?
            },
            pos: st.clone_htod(&pos).map_err(drv("positions"))?,
        })
    }

    /// The states as the CPU engine holds them (oldest first).
    pub fn download_states(&self, state: &DeviceState) -> Result<Vec<EngramState>> {
        let st = &self.gpu.stream;
        let hist = self.n - 1;
        let r = (self.kc - 1) * self.n;
        let c = self.hc * self.d;
        let ngram = st.clone_dtoh(&state.ngram).map_err(drv("n-gram state"))?;
        let conv = st.clone_dtoh(&state.conv).map_err(drv("conv state"))?;
        let pos = st.clone_dtoh(&state.pos).map_err(drv("positions"))?;
        Ok((0..state.batch)
            .map(|b| {
                let p = pos[b] as usize;
                let h = (0..hist)
                    .map(|j| ngram[b * hist + (p + j) % hist])
                    .collect();
                let mut ch = Vec::with_capacity(r * c);
                for j in 0..r {
                    let slot = (p + j) % r;
                    ch.extend_from_slice(&conv[(b * r + slot) * c..(b * r + slot + 1) * c]);
                }
                EngramState::from_parts(h, ch, c, p as u64)
            })
            .collect())
    }

    /// Buffers for calls of `batch` × `len` tokens; `keep` also keeps the hashes, gated value
    /// and short conv for a stage-by-stage check.
    pub fn workspace(&self, batch: usize, len: usize, keep: bool) -> Result<Workspace> {
        if batch == 0 || len == 0 {
            return Err(CudaError::Engram(engram::EngramError::invalid(
                "input_ids",
                "a [B, L] array with B, L >= 1",
                format!("[{batch}, {len}]"),
            )));
        }
        let t = batch
            .checked_mul(len)
            .ok_or_else(|| unsupported("tokens", "B·L below 2^31", "an overflow"))?;
        i32_of(t, "tokens (B·L)")?;
        let (e, c) = (self.elem(), self.hc * self.d);
        Ok(Workspace {
            batch,
            len,
            ids: self.alloc(t, "input ids")?,
            hidden: self.alloc(t * c * e, "hidden states")?,
            emb: self.alloc(t * self.dm * e, "embeddings")?,
            kv: self.alloc(t * self.w * e, "projections")?,
            gates: self.alloc(t * self.hc, "gates")?,
            cscale: self.alloc(t * self.hc, "conv norms")?,
            out: self.alloc(t * c * e, "output")?,
            hash: keep
                .then(|| self.alloc(t * self.heads, "hash ids"))
                .transpose()?,
            gated: keep.then(|| self.alloc(t * c, "gated value")).transpose()?,
            short_conv: keep.then(|| self.alloc(t * c, "short conv")).transpose()?,
        })
    }

    /// Copies `[B, L]` raw ids and `[B, L, HC, D]` f32 hidden states into `ws` (converted to
    /// the activation type), after checking them on the host.
    pub fn load_inputs(&self, ws: &mut Workspace, ids: &[i64], hidden: &[f32]) -> Result<()> {
        let t = ws.batch * ws.len;
        let c = self.hc * self.d;
        if ids.len() != t {
            return Err(engram::EngramError::Shape {
                name: "input_ids".into(),
                expected: vec![ws.batch, ws.len],
                found: vec![ids.len()],
            }
            .into());
        }
        if hidden.len() != t * c {
            return Err(engram::EngramError::Shape {
                name: "hidden_states".into(),
                expected: vec![ws.batch, ws.len, self.hc, self.d],
                found: vec![hidden.len()],
            }
            .into());
        }
        if let Some(index) = hidden.iter().position(|x| !x.is_finite()) {
            return Err(engram::EngramError::NonFinite {
                name: "hidden_states".into(),
                index,
                value: hidden[index],
            }
            .into());
        }
        if ids.iter().any(|&i| i >= self.vocab as i64) {
            return Err(CudaError::IdOutOfRange { vocab: self.vocab });
        }
        let st = &self.gpu.stream;
        st.memcpy_htod(ids, &mut ws.ids).map_err(drv("input ids"))?;
        match self.dtype {
            DType::F32 => st.memcpy_htod(bytemuck::cast_slice::<f32, u8>(hidden), &mut ws.hidden),
            DType::Bf16 => st.memcpy_htod(&bf16_bytes(hidden), &mut ws.hidden),
        }
        .map_err(drv("hidden states"))
    }

    /// Fills `ws`'s inputs on the device with random ids below `vocab` and normal-ish hidden
    /// states (for benchmarks: device-resident inputs, never zeros).
    pub fn fill_random(&self, ws: &mut Workspace, seed: u64) -> Result<()> {
        let t = ws.batch * ws.len;
        let c = self.hc * self.d;
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ids: Vec<i64> = (0..t)
            .map(|_| (next() % self.vocab as u64) as i64)
            .collect();
        let hidden: Vec<f32> = (0..t * c)
            .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4)
            .collect();
        self.load_inputs(ws, &ids, &hidden)
    }

    /// Enqueues one call on the stream (no host synchronisation): reads `ws`'s inputs and
    /// `state`, writes `ws`'s output and advances `state` by `len` tokens per sequence.
    pub fn enqueue(&self, ws: &mut Workspace, state: &mut DeviceState) -> Result<()> {
        let a = self.args(ws, state)?;
        let st = &self.gpu.stream;
        self.launch_hash(&a, st)?;
        self.project(a.emb, a.kv, a.t)?;
        self.launch_gate(&a, 0, a.t, st)?;
        self.launch_conv(&a, 0, a.t, st)?;
        self.launch_advance(&a, st)
    }

    /// [`CudaEngram::enqueue`] with the rows cut into `chunks` pieces: the projection GEMM
    /// of piece c+1 (main stream) can run while the gates and conv of piece c run on a second
    /// stream. Same results as `enqueue` (each row's GEMM is the same arithmetic).
    pub fn enqueue_pipelined(
        &self,
        ws: &mut Workspace,
        state: &mut DeviceState,
        chunks: usize,
    ) -> Result<()> {
        let a = self.args(ws, state)?;
        let (main, side) = (&self.gpu.stream, &self.gpu.side);
        let chunks = chunks.clamp(1, a.t);
        self.launch_hash(&a, main)?;
        let per = a.t.div_ceil(chunks);
        let mut r0 = 0;
        while r0 < a.t {
            let r1 = (r0 + per).min(a.t);
            let e = self.elem() as u64;
            self.project(
                a.emb + (r0 * self.dm) as u64 * e,
                a.kv + (r0 * self.w) as u64 * e,
                r1 - r0,
            )?;
            let done = main.record_event(None).map_err(drv("event"))?;
            side.wait(&done).map_err(drv("stream wait"))?;
            // Rows r0..r1 read kv rows up to R before r0: written by earlier GEMMs, which
            // the side stream already waited for.
            self.launch_gate(&a, r0, r1, side)?;
            self.launch_conv(&a, r0, r1, side)?;
            r0 = r1;
        }
        let done = side.record_event(None).map_err(drv("event"))?;
        main.wait(&done).map_err(drv("stream wait"))?;
        self.launch_advance(&a, main)
    }

    /// One call with CUDA events between the stages: milliseconds of (hash + gather,
    /// projection GEMM, gates, conv + output, state advance).
    pub fn enqueue_profiled(
        &self,
        ws: &mut Workspace,
        state: &mut DeviceState,
    ) -> Result<[f64; 5]> {
        let a = self.args(ws, state)?;
        let st = &self.gpu.stream;
        let flags = Some(cu_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut ev = vec![st.record_event(flags).map_err(drv("event"))?];
        self.launch_hash(&a, st)?;
        ev.push(st.record_event(flags).map_err(drv("event"))?);
        self.project(a.emb, a.kv, a.t)?;
        ev.push(st.record_event(flags).map_err(drv("event"))?);
        self.launch_gate(&a, 0, a.t, st)?;
        ev.push(st.record_event(flags).map_err(drv("event"))?);
        self.launch_conv(&a, 0, a.t, st)?;
        ev.push(st.record_event(flags).map_err(drv("event"))?);
        self.launch_advance(&a, st)?;
        ev.push(st.record_event(flags).map_err(drv("event"))?);
        ev[5].synchronize().map_err(drv("event"))?;
        let mut out = [0f64; 5];
        for (i, o) in out.iter_mut().enumerate() {
            *o = ev[i].elapsed_ms(&ev[i + 1]).map_err(drv("elapsed"))? as f64;
        }
        Ok(out)
    }

    /// Every kernel argument of one call: dimensions and raw device addresses.
    fn args(&self, ws: &Workspace, state: &DeviceState) -> Result<Args> {
        if state.batch != ws.batch {
            return Err(engram::EngramError::invalid(
                "state",
                format!("{} sequences (the batch)", ws.batch),
                state.batch,
            )
            .into());
        }
        let g = &*self.gpu;
        Ok(Args {
            t: ws.batch * ws.len,
            b: ws.batch as i32,
            l: ws.len as i32,
            ids: ptr(&ws.ids, g),
            ngram: ptr(&state.ngram, g),
            pos: ptr(&state.pos, g),
            conv_ring: ptr(&state.conv, g),
            emb: ptr(&ws.emb, g),
            kv: ptr(&ws.kv, g),
            hidden: ptr(&ws.hidden, g),
            out: ptr(&ws.out, g),
            gates: ptr(&ws.gates, g),
            cscale: ptr(&ws.cscale, g),
            hash: opt_ptr(&ws.hash, g),
            gated: opt_ptr(&ws.gated, g),
            short_conv: opt_ptr(&ws.short_conv, g),
        })
    }

    fn dims(&self) -> (i32, i32, i32, i32, i32, i32) {
        (
            self.hc as i32,
            self.d as i32,
            self.n as i32,
            self.k_heads as i32,
            self.kc as i32,
            self.row_d as i32,
        )
    }

    /// §1-4: hash + gather of every row.
    fn launch_hash(&self, a: &Args, st: &CudaStream) -> Result<()> {
        let g = &*self.gpu;
        let (_, _, n, kh, _, rd) = self.dims();
        let vocab = self.vocab as i64;
        let (lookup, mult, primes, offsets, table, err) = (
            ptr(&self.lookup, g),
            ptr(&self.mult, g),
            ptr(&self.primes, g),
            ptr(&self.offsets, g),
            ptr(&self.table, g),
            ptr(&self.err, g),
        );
        let cfg = LaunchConfig {
            grid_dim: (a.t.div_ceil(HASH_TOKENS) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (HASH_TOKENS * self.heads * 8) as u32,
        };
        let mut l = st.launch_builder(&self.kernels().hash_gather);
        l.arg(&a.ids)
            .arg(&lookup)
            .arg(&vocab)
            .arg(&mult)
            .arg(&primes)
            .arg(&offsets);
        l.arg(&a.ngram)
            .arg(&a.pos)
            .arg(&a.b)
            .arg(&a.l)
            .arg(&n)
            .arg(&kh)
            .arg(&rd);
        l.arg(&table).arg(&a.emb).arg(&a.hash).arg(&err);
        // SAFETY: the arguments match `hash_gather_*`'s parameters in type and order; every
        // buffer holds what the kernel indexes for this (B, L) (sized in `workspace`).
        unsafe { l.launch(cfg) }.map_err(drv("hash_gather"))?;
        Ok(())
    }

    /// §5: gates and the conv norm factor of rows r0..r1.
    fn launch_gate(&self, a: &Args, r0: usize, r1: usize, st: &CudaStream) -> Result<()> {
        let g = &*self.gpu;
        let (hc, d, ..) = self.dims();
        let (bias, norm1, norm2) = (ptr(&self.bias, g), ptr(&self.norm1, g), ptr(&self.norm2, g));
        let cfg = LaunchConfig {
            grid_dim: ((r1 - r0) as u32, self.hc.div_ceil(4) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (eps, eps_conv, row0) = (self.eps, 1e-5f32, r0 as i64);
        let mut l = st.launch_builder(&self.kernels().gate);
        l.arg(&a.kv)
            .arg(&a.hidden)
            .arg(&bias)
            .arg(&norm1)
            .arg(&norm2)
            .arg(&a.gates);
        l.arg(&a.cscale)
            .arg(&row0)
            .arg(&hc)
            .arg(&d)
            .arg(&eps)
            .arg(&eps_conv);
        // SAFETY: as above, for `gate_*`; rows r0..r1 lie within the workspace.
        unsafe { l.launch(cfg) }.map_err(drv("gate"))?;
        Ok(())
    }

    /// §6: conv, SiLU, residual for rows r0..r1.
    fn launch_conv(&self, a: &Args, r0: usize, r1: usize, st: &CudaStream) -> Result<()> {
        let g = &*self.gpu;
        let (hc, d, n, _, kc, _) = self.dims();
        let (bias, cnorm, conv_w) = (
            ptr(&self.bias, g),
            ptr(&self.conv_norm, g),
            ptr(&self.conv_w, g),
        );
        if self.conv_kernel == ConvKernel::Rows {
            let conv_wt = ptr(&self.conv_wt, g);
            let cfg = LaunchConfig {
                grid_dim: ((r1 - r0) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let row0 = r0 as i64;
            let mut l = st.launch_builder(&self.kernels().conv_rows);
            l.arg(&a.kv)
                .arg(&bias)
                .arg(&a.gates)
                .arg(&a.cscale)
                .arg(&cnorm)
                .arg(&conv_wt);
            l.arg(&a.conv_ring)
                .arg(&a.pos)
                .arg(&a.out)
                .arg(&a.gated)
                .arg(&a.short_conv);
            l.arg(&row0).arg(&a.l).arg(&hc).arg(&d).arg(&kc).arg(&n);
            // SAFETY: the arguments match `conv_rows_*`'s parameters in type and order; rows
            // r0..r1 lie within the workspace; `conv_wt` is [KC, HC·D].
            unsafe { l.launch(cfg) }.map_err(drv("conv_rows"))?;
            return Ok(());
        }
        let pieces = (r1 - r0) * self.hc * self.d / 8;
        let cfg = LaunchConfig {
            grid_dim: (pieces.div_ceil(256).min(1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (row0, rows) = (r0 as i64, (r1 - r0) as i64);
        let mut l = st.launch_builder(&self.kernels().conv_out);
        l.arg(&a.kv)
            .arg(&bias)
            .arg(&a.gates)
            .arg(&a.cscale)
            .arg(&cnorm)
            .arg(&conv_w);
        l.arg(&a.conv_ring)
            .arg(&a.pos)
            .arg(&a.out)
            .arg(&a.gated)
            .arg(&a.short_conv);
        l.arg(&row0)
            .arg(&rows)
            .arg(&a.b)
            .arg(&a.l)
            .arg(&hc)
            .arg(&d)
            .arg(&kc)
            .arg(&n);
        // SAFETY: as above, for `conv_out_*`; rows r0..r1 lie within the workspace.
        unsafe { l.launch(cfg) }.map_err(drv("conv_out"))?;
        Ok(())
    }

    /// Streaming state: the call's tail into the rings, positions += L.
    fn launch_advance(&self, a: &Args, st: &CudaStream) -> Result<()> {
        let g = &*self.gpu;
        let (hc, d, n, _, kc, _) = self.dims();
        let vocab = self.vocab as i64;
        let (lookup, bias, cnorm) = (
            ptr(&self.lookup, g),
            ptr(&self.bias, g),
            ptr(&self.conv_norm, g),
        );
        let cfg = LaunchConfig {
            grid_dim: (a.b as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = st.launch_builder(&self.kernels().advance_state);
        l.arg(&a.ids)
            .arg(&lookup)
            .arg(&vocab)
            .arg(&a.kv)
            .arg(&bias)
            .arg(&a.gates);
        l.arg(&a.cscale)
            .arg(&cnorm)
            .arg(&a.ngram)
            .arg(&a.conv_ring)
            .arg(&a.pos);
        l.arg(&a.l).arg(&hc).arg(&d).arg(&kc).arg(&n);
        // SAFETY: as above, for `advance_state_*`.
        unsafe { l.launch(cfg) }.map_err(drv("advance_state"))?;
        Ok(())
    }

    /// kv `[T, W]` = emb `[T, Dm]` · proj_wᵀ: one cuBLAS GEMM, f32 with plain f32 math or
    /// bf16 inputs with f32 accumulation.
    fn project(&self, emb: u64, kv: u64, t: usize) -> Result<()> {
        use cublas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        let ty = match self.dtype {
            DType::F32 => cudaDataType::CUDA_R_32F,
            DType::Bf16 => cudaDataType::CUDA_R_16BF,
        };
        let (m, n, k) = (self.w as i32, t as i32, self.dm as i32);
        let (alpha, beta) = (1f32, 0f32);
        let w = ptr(&self.proj_w, &self.gpu);
        // SAFETY: the handle is bound to our stream; A = proj_w is [W, Dm] row-major, i.e.
        // column-major Dm x W (lda = Dm, transposed); B = emb is column-major Dm x T
        // (ldb = Dm); C = kv is column-major W x T (ldc = W), i.e. row-major [T, W]. Scalars
        // are host f32 as CUBLAS_COMPUTE_32F expects.
        unsafe {
            cublas_result::gemm_ex(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                w as *const _,
                ty,
                k,
                emb as *const _,
                ty,
                k,
                (&beta as *const f32).cast(),
                kv as *mut _,
                ty,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(blas("gemm_ex (projection)"))
    }

    /// Captures one [`CudaEngram::enqueue`] into a CUDA graph; each replay runs one step on
    /// the same buffers (the state advances on the device). The graph holds the raw
    /// addresses of `ws` and `state`: replay it only while both live.
    pub fn capture(&self, ws: &mut Workspace, state: &mut DeviceState) -> Result<CudaGraph> {
        let st = &self.gpu.stream;
        st.begin_capture(cu_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("begin capture"))?;
        let enq = self.enqueue(ws, state);
        let graph = st
            .end_capture(cu_sys::CUgraphInstantiate_flags(0))
            .map_err(drv("end capture"))?;
        enq?;
        graph.ok_or(CudaError::Driver {
            what: "end capture",
            detail: "the capture produced no graph".into(),
        })
    }

    /// The output `[B, L, HC, D]` as f32.
    pub fn read_output(&self, ws: &Workspace) -> Result<Vec<f32>> {
        self.to_f32(&ws.out)
    }

    fn to_f32(&self, s: &CudaSlice<u8>) -> Result<Vec<f32>> {
        let bytes = self.gpu.stream.clone_dtoh(s).map_err(drv("download"))?;
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        })
    }

    fn check_err(&self) -> Result<()> {
        let e = self
            .gpu
            .stream
            .clone_dtoh(&self.err)
            .map_err(drv("error flag"))?;
        if e[0] != 0 {
            // SAFETY: `err` is a live 4-byte allocation of this stream; zero is a valid i32.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr(&self.err, &self.gpu),
                    0,
                    4,
                    self.gpu.stream.cu_stream(),
                )
            }
            .map_err(drv("error flag"))?;
            return Err(CudaError::IdOutOfRange { vocab: self.vocab });
        }
        Ok(())
    }

    /// Runs one chunk of `len` tokens for each of the `state.batch()` sequences (host in,
    /// host out) and returns its stages. With `keep`, every stage is read back: the hashes,
    /// embeddings, value and keys (the GEMM's output plus the biases, added here), gates,
    /// gated value, short conv and output.
    pub fn forward_chunk(
        &self,
        state: &mut DeviceState,
        ids: &[i64],
        hidden: &[f32],
        len: usize,
        keep: bool,
    ) -> Result<Stages> {
        let mut ws = self.workspace(state.batch, len, keep)?;
        self.load_inputs(&mut ws, ids, hidden)?;
        self.enqueue(&mut ws, state)?;
        self.gpu.synchronize()?;
        self.check_err()?;
        self.stages(&ws)
    }

    /// `[B, L]` fresh sequences in one call (the reference's semantics).
    pub fn forward(
        &self,
        ids: &[i64],
        hidden: &[f32],
        batch: usize,
        len: usize,
        keep: bool,
    ) -> Result<Stages> {
        let mut state = self.new_state(batch)?;
        self.forward_chunk(&mut state, ids, hidden, len, keep)
    }

    /// Reads a finished call's stages back.
    pub fn stages(&self, ws: &Workspace) -> Result<Stages> {
        let st = &self.gpu.stream;
        let (b, l) = (ws.batch, ws.len);
        let t = b * l;
        let mut s = Stages {
            batch: b,
            len: l,
            gates: st.clone_dtoh(&ws.gates).map_err(drv("gates"))?[..t * self.hc].to_vec(),
            output: self.read_output(ws)?[..t * self.hc * self.d].to_vec(),
            ..Default::default()
        };
        if let Some(h) = &ws.hash {
            s.hash_ids = st.clone_dtoh(h).map_err(drv("hash ids"))?[..t * self.heads].to_vec();
            s.embeddings = Some(self.to_f32(&ws.emb)?[..t * self.dm].to_vec());
            let kv = self.to_f32(&ws.kv)?;
            let bias = st.clone_dtoh(&self.bias).map_err(drv("biases"))?;
            let (d, w) = (self.d, self.w);
            let mut value = Vec::with_capacity(t * d);
            let mut keys = Vec::with_capacity(t * self.hc * d);
            for row in kv.chunks_exact(w).take(t) {
                value.extend(row[..d].iter().zip(&bias[..d]).map(|(x, b)| x + b));
                keys.extend(row[d..].iter().zip(&bias[d..]).map(|(x, b)| x + b));
            }
            s.value = Some(value);
            s.keys = Some(keys);
            let c = t * self.hc * self.d;
            s.gated_value = ws
                .gated
                .as_ref()
                .map(|g| st.clone_dtoh(g).map(|v| v[..c].to_vec()))
                .transpose()
                .map_err(drv("gated value"))?;
            s.short_conv = ws
                .short_conv
                .as_ref()
                .map(|g| st.clone_dtoh(g).map(|v| v[..c].to_vec()))
                .transpose()
                .map_err(drv("short conv"))?;
        }
        Ok(s)
    }

    /// Times `reps` runs of `f` (after `warmup` runs) with CUDA events; returns every run's
    /// milliseconds.
    pub fn time_ms(
        &self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f64>> {
        let st = &self.gpu.stream;
        for _ in 0..warmup {
            f()?;
        }
        st.synchronize().map_err(drv("warm-up"))?;
        let flags = Some(cu_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut out = Vec::with_capacity(reps);
        for _ in 0..reps {
            let a = st.record_event(flags).map_err(drv("event"))?;
            f()?;
            let z = st.record_event(flags).map_err(drv("event"))?;
            z.synchronize().map_err(drv("event"))?;
            out.push(a.elapsed_ms(&z).map_err(drv("elapsed"))? as f64);
        }
        self.check_err()?;
        Ok(out)
    }

    /// Measures device-to-device copy bandwidth (bytes read + written per second) over
    /// `bytes`-sized buffers: the memory floor of this GPU, in the same process.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let st = &self.gpu.stream;
        let src = self.alloc::<u8>(bytes, "copy source")?;
        let mut dst = self.alloc::<u8>(bytes, "copy target")?;
        let ms = self.time_ms(2, reps, || {
            st.memcpy_dtod(&src, &mut dst).map_err(drv("device copy"))
        })?;
        Ok(2.0 * bytes as f64 / (median(&ms) * 1e-3))
    }

    /// Milliseconds of the projection GEMM alone on `t` tokens (the matrix floor).
    pub fn gemm_ms(&self, ws: &Workspace, reps: usize) -> Result<Vec<f64>> {
        let t = ws.batch * ws.len;
        let (emb, kv) = (ptr(&ws.emb, &self.gpu), ptr(&ws.kv, &self.gpu));
        self.time_ms(3, reps, || self.project(emb, kv, t))
    }

    /// FLOPs of one call's projection on `t` tokens.
    pub fn projection_flops(&self, t: usize) -> f64 {
        2.0 * t as f64 * self.dm as f64 * self.w as f64
    }
}

/// Median of a non-empty list.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}
