//! The projection GEMM `y[M, N] = x[M, K] · W_allᵀ`, N = (1+HC)·D (value_proj and every
//! key_projs.i as one matrix), K = Dm. Weights are packed once, at load, for the kernel this
//! CPU runs ([`PanelKernel`]):
//!
//! | CPU | f32 | bf16 |
//! |---|---|---|
//! | AVX-512 | 6×64 microkernel on `[N/64][K][64]` panels | AMX `tdpbf16ps` on bf16 pairs `[N/64][K/2][64][2]` in blocks of 32 rows × 64 columns where the CPU has AMX-BF16 ([`amx_ready`]), else AVX512-BF16 `vdpbf16ps` on bf16 pairs `[N/64][K/2][64][2]` where it does at least the FLOPs of f32 FMAs ([`avx512_bf16_dot_pays`]), else the 6×64 microkernel on bf16 panels (columns c, c+16 of each 32 interleaved), widened to f32 in registers by an AND and a shift |
//! | AVX2 + FMA | 6×16 microkernel on `[N/16][K][16]` panels | the same on bf16 panels (columns c, c+8 interleaved), widened to f32 in registers by an AND and a shift |
//! | aarch64 (NEON) | 6×16 microkernel on `[N/16][K][16]` panels | BFDOT on bf16 pairs `[N/16][K/2][16][2]` where the CPU has BF16, else the 6×16 kernel on bf16 panels widened in registers |
//! | anything else | the `gemm` crate on `[K, N]` | the `gemm` crate on bf16-rounded values widened to f32 |
//!
//! Every microkernel computes each output as one FMA chain over k in order, from zero,
//! whatever the row count (AMX and the bf16 dot instructions: one chain of pair products): a row's projection is bit-identical however a sequence is split
//! into chunks, and the f32 result is the same bits on AVX-512, AVX2 and NEON. A decode step
//! (1-3 rows) runs several panels at once, so that 12 independent FMA chains are in flight;
//! each panel carries one row of padding so that panels read together do not share cache
//! sets. The kernels
//! compute only `[mr ≤ 6, NR·P]` blocks; one shared driver (`panel_driver`) handles the tails
//! and threading.

use super::kernels::Isa;
use super::DType;
use half::bf16;

/// Rows per microkernel call.
const MR: usize = 6;
/// The widest panel (AVX-512: 4 × 16 lanes); the AVX512-BF16 and AMX pairs layouts use it too.
const NR_MAX: usize = 64;
/// k pairs per AMX tile step: a tile row is 64 bytes, 16 pairs of x (A) or the pairs of 16
/// columns (B), so B has 16 rows of pairs.
const AMX_KT: usize = 16;

/// The packed-panel microkernel family a projection runs, fixed at pack time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelKernel {
    /// x86-64 AVX-512F: 64-column panels.
    Avx512,
    /// x86-64 AVX2 + FMA: 16-column panels.
    Avx2,
    /// aarch64 NEON: 16-column panels.
    Neon,
}

impl PanelKernel {
    /// Columns per panel.
    pub fn nr(self) -> usize {
        match self {
            PanelKernel::Avx512 => NR_MAX,
            PanelKernel::Avx2 | PanelKernel::Neon => 16,
        }
    }

    /// The kernel for an instruction set; `None` where only the `gemm` crate runs (x86-64
    /// without AVX2, or `ENGRAM_ISA=generic` on x86-64).
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Avx512 => Some(PanelKernel::Avx512),
            Isa::Avx2 => Some(PanelKernel::Avx2),
            Isa::Generic if cfg!(target_arch = "aarch64") => Some(PanelKernel::Neon),
            Isa::Generic => None,
        }
    }

    /// Every kernel this CPU can run (for tests that cover each).
    pub fn all_supported() -> Vec<Self> {
        Isa::all_supported()
            .into_iter()
            .filter_map(Self::for_isa)
            .collect()
    }

    /// Whether this CPU runs the kernel ([`Self::all_supported`] lists it).
    pub fn runs_here(self) -> bool {
        Self::all_supported().contains(&self)
    }
}

/// Packed weights start on a cache line (64 bytes), so that no vector load of a panel row
/// straddles two lines; advised for huge pages.
type Panels<T> = crate::alloc::LineAligned<T>;

#[derive(Debug, Clone)]
#[allow(dead_code)] // each target builds only its own kernels' variants
enum Packed {
    /// [K, N] row-major f32 (for the `gemm` crate) and [N, K] (PyTorch layout, for few rows).
    F32(Vec<f32>, Vec<f32>),
    /// `[N/NR][K][NR]` f32 panels for a microkernel.
    F32Panels(PanelKernel, Panels<f32>),
    /// `[N/64][K/2][64][2]` bf16 pairs for the AVX512-BF16 kernel (K padded to even).
    Bf16Pairs(Panels<bf16>),
    /// `[N/NR][K][NR]` bf16 panels, widened to f32 in registers.
    Bf16Panels(PanelKernel, Panels<bf16>),
    /// `[N/16][K/2][16][2]` bf16 pairs for the NEON BFDOT kernel (K padded to even).
    Bf16DotPairs(Panels<bf16>),
    /// `[N/64][K'/2 + 1][64][2]` bf16 pairs for the AMX kernel, K padded with zeros to K', a
    /// multiple of 32 (`AMX_KT` pairs: one tile row), one zero pair row of padding per panel.
    Bf16AmxPairs(Panels<bf16>),
    /// [K, N] f32 holding bf16-rounded values (the `gemm` crate fallback).
    Bf16AsF32(Vec<f32>),
}

/// Packed projection weights.
#[derive(Debug, Clone)]
pub struct Projection {
    k: usize,
    n: usize,
    packed: Packed,
    /// The column whose panel a one-thread call runs first (see [`Projection::run_from_col`]).
    first_col: usize,
}

fn has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AVX-512 bf16 products run on `vdpbf16ps` rather than the widening 6×64 kernel:
/// where the CPU has AVX512-BF16 and one core's `vdpbf16ps` chains do at least the FLOPs per
/// second of its f32 FMA chains, probed once per process (best of five interleaved runs of
/// each, well under a millisecond in all). `ENGRAM_BF16_DOT=0` or `1` skips the probe.
///
/// The instruction's rate differs by CPU. On the Zen 4 guest the dot kernel ran a 4096-token
/// bf16 prefill at 2.1× the f32 tokens/s. On the Emerald Rapids guest its chains did half
/// the FLOPs of f32 FMAs (about 160 against 320 GFLOP/s on two cores), and the widening
/// kernel ran the default projection faster (criterion, one thread: 8 rows 0.80 against 1.04
/// ms, 64 rows 5.2 against 11.5, 256 rows 20.2 against 49.2; a prefill's tiles on two
/// threads 184 against 312 ms; see `bench/results/cpu-2026-12-02-emr4/`).
pub fn avx512_bf16_dot_pays() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        if !has_avx512bf16() {
            return false;
        }
        match std::env::var("ENGRAM_BF16_DOT").as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            // Unset, or `amx` (then this decides only where AMX is refused).
            _ => bf16_dot_over_fma() >= 1.0,
        }
    })
}

/// Which instruction multiplies bf16 weights where the CPU offers a choice
/// ([`Projection::pack_for_via`]); each falls back to the next one down where the CPU lacks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Via {
    /// AMX `tdpbf16ps` on 16×32 tiles (x86-64 with AMX-BF16, the OS granting the tile state).
    Amx,
    /// The CPU's bf16 dot instruction: `vdpbf16ps` (AVX512-BF16) or BFDOT (Arm BF16).
    Dot,
    /// bf16 panels widened to f32 in registers, then the f32 FMA kernel.
    Widen,
}

/// The bf16 kernel [`Projection::pack_for`] packs for: AMX where the CPU has it
/// ([`amx_ready`]; on the AMX Xeon guest a 4096-token bf16 prefill ran at 4.0-4.2× the
/// widening kernel's tokens/s, `bench/results/cpu-2026-12-02-amx/`), else
/// the dot instruction, always on Arm (BFDOT), by [`avx512_bf16_dot_pays`] on AVX-512;
/// `ENGRAM_BF16_DOT` (`amx`, `1`, `0`) names one. The probe runs only for bf16.
fn bf16_via_by_default(dtype: DType, kernel: Option<PanelKernel>) -> Bf16Via {
    if dtype != DType::Bf16 || kernel != Some(PanelKernel::Avx512) {
        return Bf16Via::Dot;
    }
    match std::env::var("ENGRAM_BF16_DOT").as_deref() {
        Ok("amx") if amx_ready() => Bf16Via::Amx,
        Ok(_) if avx512_bf16_dot_pays() => Bf16Via::Dot,
        Ok(_) => Bf16Via::Widen,
        Err(_) if amx_ready() => Bf16Via::Amx,
        Err(_) if avx512_bf16_dot_pays() => Bf16Via::Dot,
        Err(_) => Bf16Via::Widen,
    }
}

/// Whether this process may run the AMX bf16 kernel: the CPU reports AMX-TILE and AMX-BF16
/// (CPUID leaf 7, EDX bits 24 and 22) and Linux granted the process the tile data state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, which a kernel without AMX support
/// refuses). Asked once per process.
pub fn amx_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            amx::request()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// FLOPs per second of one core's `vdpbf16ps` chains over its f32 FMA chains (both twelve
/// 16-lane chains; a `vdpbf16ps` lane does two multiply-adds, an FMA lane one).
fn bf16_dot_over_fma() -> f64 {
    use std::hint::black_box;
    use std::time::Instant;
    const ITERS: usize = 20_000;
    let (mut dot, mut fma) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        black_box(bf16_dot_chains(black_box(ITERS)));
        dot = dot.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        black_box(super::kernels::fma_chains(Isa::Avx512, black_box(ITERS)));
        fma = fma.min(t.elapsed().as_secs_f64());
    }
    2.0 * fma / dot.max(f64::MIN_POSITIVE)
}

/// Whether this CPU has the Armv8.6 BF16 instructions (BFDOT).
fn has_neon_bf16() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// `[N/nr][K/2 + 1][nr][2]` bf16 pairs of `W_allᵀ` for the bf16 dot kernels (`w(col, kk)`
/// is W_all[col][kk]): pairs along K (an odd K padded with zero), one zero pair row of
/// padding per panel; columns past N are zero.
fn pack_pairs(k: usize, n: usize, nr: usize, w: &dyn Fn(usize, usize) -> f32) -> Panels<bf16> {
    let (kp, np) = (k.div_ceil(2), n.div_ceil(nr) * nr);
    let mut pairs = Panels::new_huge(np / nr * (kp + 1) * nr * 2, bf16::ZERO);
    let v = pairs.as_mut_slice();
    for panel in 0..np / nr {
        for p in 0..kp {
            for c in 0..nr {
                let col = panel * nr + c;
                for h in 0..2 {
                    let row = 2 * p + h;
                    if col < n && row < k {
                        v[((panel * (kp + 1) + p) * nr + c) * 2 + h] = bf16::from_f32(w(col, row));
                    }
                }
            }
        }
    }
    pairs
}

/// The bits of `bf16::from_f32(x)` (round to nearest even; a NaN stays a NaN, quieted) in
/// integer steps without a branch, which the compiler vectorises: `with_x_pairs` converts a
/// tile's activations on every bf16 dot call, and the `half` crate's version, with its
/// branches, ran one value at a time.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let nan = (b >> 16) | 0x40;
    // Wrapping: a negative NaN's bits can overflow here; its result is discarded below.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

thread_local! {
    /// The activations of the bf16 dot kernels, kept between calls (taken for a call; a
    /// nested call on the same thread gets a fresh one).
    static X_PAIRS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// x as `[m][K/2]` u32 = (bf16 x[2p], bf16 x[2p+1]) (an odd K padded with zero): the
/// activations of the bf16 dot kernels, handed to `f` in this thread's buffer.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn with_x_pairs<R>(x: &[f32], m: usize, k: usize, f: impl FnOnce(&[u32]) -> R) -> R {
    let kp = k.div_ceil(2);
    let mut xp = X_PAIRS.with(|c| c.take());
    xp.resize(m * kp, 0);
    for (row, out) in x.chunks_exact(k).zip(xp.chunks_exact_mut(kp)) {
        let (pairs, odd) = row.as_chunks::<2>();
        for (o, p) in out.iter_mut().zip(pairs) {
            *o = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
        }
        if let Some(&last) = odd.first() {
            out[kp - 1] = bf16_bits(last);
        }
    }
    let r = f(&xp[..m * kp]);
    X_PAIRS.with(|c| c.set(xp));
    r
}

thread_local! {
    /// x rounded to bf16, kept between calls like [`X_PAIRS`].
    static X_ROUNDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on x rounded to bf16 and kept as f32 ([`bf16_rounded`]): the activations of
/// the kernels that widen bf16 panels (AVX-512, NEON) and of the `gemm` fallback, so that
/// they multiply what the bf16 dot kernels multiply. The buffer is kept per thread.
fn with_x_rounded<R>(x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
    let mut xr = X_ROUNDED.with(|c| c.take());
    xr.clear();
    xr.extend(x.iter().map(|&v| bf16_rounded(v)));
    let r = f(&xr);
    X_ROUNDED.with(|c| c.set(xr));
    r
}

/// `x` rounded to bf16 and widened back: [`bf16_bits`] in the high half of an f32.
#[inline(always)]
fn bf16_rounded(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// The column of a widening kernel's bf16 panel in slot `c` of a panel row. The x86-64
/// kernels widen a 32-bit lane's two bf16 with one AND and one shift, so each vector's
/// worth of bf16 (16 on AVX2, 32 on AVX-512) interleaves its first and second half of
/// columns (slot 2i: column i, 2i+1: column i + half); NEON widens in order.
fn widen_order(kr: PanelKernel, c: usize) -> usize {
    let group = match kr {
        PanelKernel::Neon => return c,
        PanelKernel::Avx2 => 16,
        PanelKernel::Avx512 => 32,
    };
    c / group * group + (c % group) / 2 + (c % 2) * (group / 2)
}

/// `[N/nr][K+1][nr]` panels of `W_allᵀ` (`get(kk, col)` is W_all[col][kk]): K rows and one
/// zero row of padding per panel (see `panel_slice`); columns past N are zero. Slot `c` of a
/// panel row holds column `order(c)` of the panel.
fn pack_panels<T: Copy + Default>(
    k: usize,
    n: usize,
    nr: usize,
    order: impl Fn(usize) -> usize,
    get: impl Fn(usize, usize) -> T,
) -> Panels<T> {
    let np = n.div_ceil(nr) * nr;
    let mut p = Panels::new_huge(np * (k + 1), T::default());
    let v = p.as_mut_slice();
    for panel in 0..np / nr {
        for kk in 0..k {
            for c in 0..nr {
                let col = panel * nr + order(c);
                if col < n {
                    v[(panel * (k + 1) + kk) * nr + c] = get(kk, col);
                }
            }
        }
    }
    p
}

impl Projection {
    /// Packs `mats` (each [D, K] in PyTorch layout, stacked along the output dim) for the
    /// fastest kernel this CPU runs.
    pub fn pack(mats: &[&[f32]], k: usize, dtype: DType) -> Self {
        Self::pack_for(mats, k, dtype, PanelKernel::for_isa(Isa::detect()))
    }

    /// [`Projection::pack`]; `own_kernels = false` keeps to the `gemm` crate for f32 (and the
    /// widened fallback for bf16), which is what CPUs without AVX2 run.
    pub fn pack_with(mats: &[&[f32]], k: usize, dtype: DType, own_kernels: bool) -> Self {
        let kernel = own_kernels
            .then(|| PanelKernel::for_isa(Isa::detect()))
            .flatten();
        Self::pack_for(mats, k, dtype, kernel)
    }

    /// Packs for a given microkernel (`None`: the `gemm` crate).
    ///
    /// # Panics
    /// If `k` is 0, or the kernel is not one this CPU runs ([`PanelKernel::runs_here`]).
    pub fn pack_for(mats: &[&[f32]], k: usize, dtype: DType, kernel: Option<PanelKernel>) -> Self {
        Self::pack_for_via(mats, k, dtype, kernel, bf16_via_by_default(dtype, kernel))
    }

    /// [`Projection::pack_for`] with the bf16 kernel named: [`Bf16Via::Amx`] packs bf16 for
    /// AMX where [`amx_ready`], [`Bf16Via::Dot`] (and `Amx` elsewhere) for the CPU's dot
    /// instruction (`vdpbf16ps`, BFDOT) wherever it has one, even where
    /// [`avx512_bf16_dot_pays`] found it slower, [`Bf16Via::Widen`] (and the others
    /// elsewhere) for the widening kernel: so that benches and tests can set them against
    /// each other on one CPU. AMX runs with the AVX-512 kernel family only.
    ///
    /// # Panics
    /// As [`Projection::pack_for`].
    pub fn pack_for_via(
        mats: &[&[f32]],
        k: usize,
        dtype: DType,
        kernel: Option<PanelKernel>,
        via: Bf16Via,
    ) -> Self {
        assert!(k >= 1, "a projection needs K >= 1");
        // Row `o` of the stacked matrices, without stacking them.
        let mut starts = Vec::with_capacity(mats.len());
        let mut n = 0;
        for m in mats {
            starts.push(n);
            n += m.len() / k;
        }
        let w = |o: usize, i: usize| -> f32 {
            let j = starts.partition_point(|&s| s <= o) - 1;
            mats[j][(o - starts[j]) * k + i]
        };
        Self::pack_fn_via(n, k, dtype, kernel, via, &w)
    }

    /// Packs the `[n, k]` matrix whose element (o, i) is `w(o, i)` (PyTorch layout: output o,
    /// input i), never holding it whole in f32 except for the `gemm`-crate fallback.
    ///
    /// # Panics
    /// If `k` is 0, or the kernel is not one this CPU runs ([`PanelKernel::runs_here`]): the
    /// kernels' instructions would be undefined there, and `matmul` relies on this check.
    pub fn pack_fn(
        n: usize,
        k: usize,
        dtype: DType,
        kernel: Option<PanelKernel>,
        w: &dyn Fn(usize, usize) -> f32,
    ) -> Self {
        Self::pack_fn_via(n, k, dtype, kernel, bf16_via_by_default(dtype, kernel), w)
    }

    /// [`Projection::pack_fn`] with the bf16 kernel named, as in [`Projection::pack_for_via`].
    fn pack_fn_via(
        n: usize,
        k: usize,
        dtype: DType,
        kernel: Option<PanelKernel>,
        via: Bf16Via,
        w: &dyn Fn(usize, usize) -> f32,
    ) -> Self {
        assert!(k >= 1, "a projection needs K >= 1");
        if let Some(kr) = kernel {
            assert!(
                kr.runs_here(),
                "the {kr:?} projection kernel does not run on this CPU (see PanelKernel::all_supported)"
            );
        }
        let kn = || {
            let mut kn = vec![0.0f32; k * n];
            for o in 0..n {
                for i in 0..k {
                    kn[i * n + o] = w(o, i);
                }
            }
            kn
        };
        let packed = match (dtype, kernel) {
            (DType::F32, Some(kr)) => {
                Packed::F32Panels(kr, pack_panels(k, n, kr.nr(), |c| c, |kk, col| w(col, kk)))
            }
            (DType::F32, None) => {
                let nk = (0..n * k).map(|j| w(j / k, j % k)).collect();
                Packed::F32(kn(), nk)
            }
            (DType::Bf16, Some(PanelKernel::Avx512)) if via == Bf16Via::Amx && amx_ready() => {
                // K padded with zero pairs to whole tiles: they add +0 to every output.
                let kpad = k.div_ceil(2 * AMX_KT) * 2 * AMX_KT;
                let padded = |col: usize, row: usize| if row < k { w(col, row) } else { 0.0 };
                Packed::Bf16AmxPairs(pack_pairs(kpad, n, NR_MAX, &padded))
            }
            (DType::Bf16, Some(PanelKernel::Avx512))
                if via != Bf16Via::Widen && has_avx512bf16() =>
            {
                Packed::Bf16Pairs(pack_pairs(k, n, NR_MAX, w))
            }
            (DType::Bf16, Some(PanelKernel::Neon)) if via != Bf16Via::Widen && has_neon_bf16() => {
                Packed::Bf16DotPairs(pack_pairs(k, n, 16, w))
            }
            (DType::Bf16, Some(kr)) => Packed::Bf16Panels(
                kr,
                pack_panels(
                    k,
                    n,
                    kr.nr(),
                    |c| widen_order(kr, c),
                    |kk, col| bf16::from_f32(w(col, kk)),
                ),
            ),
            (DType::Bf16, None) => {
                Packed::Bf16AsF32(kn().iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
            }
        };
        Projection {
            k,
            n,
            packed,
            first_col: 0,
        }
    }

    /// The same projection, its calls running the panels from the one holding column
    /// `col` to the last and then from the first (a rotation; each output the same bits).
    /// What a call writes last is what stays in L2 after it, so a caller puts there the
    /// columns it reads most: the demo layer starts after the value projection, so that its
    /// columns of y, read by both the gate and the conv, are the freshest when they run.
    /// (A prefill tile's y is 1.3 MB against 1 MB of L2 per core on our Zen 5 VM. In 14
    /// alternating pairs of `engram bench` processes, AVX-512 f32, 4096 tokens, this order
    /// had the higher tokens/s in 11, median +1.4%: gate 7.8 → 7.5 thread-ms per prefill,
    /// projection 0.169 → 0.168 s; a first test of the same order won 8 of 11.) A column
    /// past N is column N-1.
    pub fn run_from_col(mut self, col: usize) -> Self {
        self.first_col = col.min(self.n.saturating_sub(1));
        self
    }

    /// Output width N (= (1+HC)·D).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        match self.packed {
            Packed::F32(..) | Packed::F32Panels(..) => DType::F32,
            _ => DType::Bf16,
        }
    }

    /// Whether one of our microkernels runs on weights packed once (so that small tiles
    /// cost no re-packing, and each output is one FMA chain over k).
    pub fn uses_own_kernel(&self) -> bool {
        matches!(
            self.packed,
            Packed::Bf16Pairs(_)
                | Packed::Bf16Panels(..)
                | Packed::F32Panels(..)
                | Packed::Bf16DotPairs(_)
                | Packed::Bf16AmxPairs(_)
        )
    }

    /// Rows per call that the fused path gives this projection by default (its tile): 256
    /// for the AVX2 kernels, 64 for the others. A tile streams every panel from L3 once,
    /// in its first row block, and its later blocks read the panel from L2; more rows
    /// spread that first block over more blocks. Prefill of the demo layer on Zen 3 (512 KiB
    /// of L2, where a 64-row tile's y of 1.3 MiB does not stay in L2 anyway), three rounds of
    /// alternating processes: f32 0.736-0.742 of the FMA peak with 256 rows against
    /// 0.652-0.704 with 64, bf16 12,541-12,962 against 9,451-10,942 tok/s. The AVX-512
    /// kernels keep the 64 rows measured on Zen 5 (the widening bf16 one on Emerald Rapids:
    /// 24,148-24,968 tok/s with 64 rows, 23,029-25,093 with 128, three processes each).
    pub fn default_tile_rows(&self) -> usize {
        match &self.packed {
            Packed::F32Panels(PanelKernel::Avx2, _) | Packed::Bf16Panels(PanelKernel::Avx2, _) => {
                256
            }
            _ => 64,
        }
    }

    /// The name of the kernel that runs (for reports).
    pub fn kernel_name(&self) -> &'static str {
        match &self.packed {
            Packed::F32(..) => "gemm crate (f32)",
            Packed::F32Panels(PanelKernel::Avx512, _) => "avx512 6x64 (f32)",
            Packed::F32Panels(PanelKernel::Avx2, _) => "avx2 6x16 (f32)",
            Packed::F32Panels(PanelKernel::Neon, _) => "neon 6x16 (f32)",
            Packed::Bf16Pairs(_) => "avx512-bf16 6x64 (vdpbf16ps)",
            Packed::Bf16AmxPairs(_) => "amx-bf16 32x64 (tdpbf16ps)",
            Packed::Bf16Panels(PanelKernel::Neon, _) => "neon 6x16 (bf16 widened)",
            Packed::Bf16DotPairs(_) => "neon-bf16 6x16 (bfdot)",
            Packed::Bf16Panels(PanelKernel::Avx512, _) => "avx512 6x64 (bf16 widened)",
            Packed::Bf16Panels(PanelKernel::Avx2, _) => "avx2 6x16 (bf16 widened)",
            Packed::Bf16AsF32(_) => "gemm crate (bf16 widened)",
        }
    }

    /// Bytes of packed weights a product streams (the decode step's floor).
    pub fn weight_bytes(&self) -> usize {
        match &self.packed {
            Packed::F32(kn, _) => kn.len() * 4,
            Packed::F32Panels(_, v) => v.len() * 4,
            Packed::Bf16Pairs(v)
            | Packed::Bf16Panels(_, v)
            | Packed::Bf16DotPairs(v)
            | Packed::Bf16AmxPairs(v) => v.len() * 2,
            Packed::Bf16AsF32(v) => v.len() * 4,
        }
    }

    /// Whether [`Self::matmul_pairs`] applies: the bf16 dot kernels, which take x as bf16
    /// pairs (AVX512-BF16, BFDOT, AMX).
    pub fn takes_pairs(&self) -> bool {
        matches!(
            self.packed,
            Packed::Bf16Pairs(_) | Packed::Bf16DotPairs(_) | Packed::Bf16AmxPairs(_)
        )
    }

    /// [`Self::matmul`] from x already in bf16: `xp` `[rows][K/2]` u32, each the bf16 bits
    /// of `x[2p]` in its low half and of `x[2p+1]` in its high half (an odd K padded with zero):
    /// a bf16 table's rows as they lie in memory, gathered without widening. Only where
    /// [`Self::takes_pairs`]; it panics elsewhere.
    pub fn matmul_pairs(&self, xp: &[u32], rows: usize, y: &mut [f32], threads: usize) {
        let (k, n) = (self.k, self.n);
        // Checked products: a huge `rows` must not wrap around to a length that matches.
        assert_eq!(
            Some(xp.len()),
            rows.checked_mul(k.div_ceil(2)),
            "x pairs must be [rows, K/2]"
        );
        assert_eq!(Some(y.len()), rows.checked_mul(n), "y must be [rows, N]");
        if rows == 0 {
            return;
        }
        match &self.packed {
            #[cfg(target_arch = "x86_64")]
            Packed::Bf16Pairs(w) => {
                // SAFETY: `Bf16Pairs` is only built when the CPU has AVX512F and AVX512-BF16.
                unsafe {
                    bf16_avx512::matmul_pairs(
                        xp,
                        w.as_slice(),
                        y,
                        rows,
                        k,
                        n,
                        threads,
                        self.first_col,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Bf16AmxPairs(w) => {
                // SAFETY: `Bf16AmxPairs` is only built where `amx_ready()`: the CPU has
                // AMX-TILE and AMX-BF16 and the OS granted this process the tile state.
                unsafe {
                    amx::matmul_pairs(xp, w.as_slice(), y, rows, k, n, threads, self.first_col)
                }
            }
            #[cfg(target_arch = "aarch64")]
            Packed::Bf16DotPairs(w) => {
                // SAFETY: `Bf16DotPairs` is only built when the CPU reports BF16.
                unsafe {
                    neon_bf16::matmul_pairs(
                        xp,
                        w.as_slice(),
                        y,
                        rows,
                        k,
                        n,
                        threads,
                        self.first_col,
                    )
                }
            }
            _ => panic!("matmul_pairs needs the bf16 dot kernels (see takes_pairs)"),
        }
    }

    /// Runs this projection's microkernel (6 rows × one panel; for AMX a block of 32 rows ×
    /// one panel over 4 k tiles) `calls` times on operands
    /// that stay in L1 and returns the FLOPs done (None where the projection has no such
    /// kernel: the `gemm` fallback and the `vdpbf16ps` and BFDOT kernels): timed, the compute limit of the
    /// kernel's own instruction mix, its broadcasts and loads beside the FMAs, on this core
    /// at this moment. On a core whose other hardware thread runs someone else's loads,
    /// this falls below the register-only FMA peak while that peak does not.
    pub fn l1_microkernel(&self, calls: usize) -> Option<f64> {
        match &self.packed {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` panels are only packed when the CPU has AVX-512F (`pack_fn_via` checks).
            Packed::F32Panels(PanelKernel::Avx512, _) => {
                Some(unsafe { avx512::l1_calls::<f32>(calls) })
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Packed::Bf16Panels(PanelKernel::Avx512, _) => {
                Some(unsafe { avx512::l1_calls::<bf16>(calls) })
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` panels are only packed when the CPU has AVX2 and FMA (`pack_fn_via`
            // checks).
            Packed::F32Panels(PanelKernel::Avx2, _) => {
                Some(unsafe { avx2::l1_calls::<f32>(calls) })
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` bf16 panels are only packed when the CPU has AVX2 and FMA
            // (`pack_fn_via` checks).
            Packed::Bf16Panels(_, _) => Some(unsafe { avx2::l1_calls::<bf16>(calls) }),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Bf16AmxPairs` is only packed where `amx_ready()`.
            Packed::Bf16AmxPairs(_) => Some(unsafe { amx::l1_calls(calls) }),
            #[cfg(target_arch = "aarch64")]
            Packed::F32Panels(_, _) => Some(neon::l1_calls::<f32>(calls)),
            #[cfg(target_arch = "aarch64")]
            Packed::Bf16Panels(_, _) => Some(neon::l1_calls::<bf16>(calls)),
            _ => {
                let _ = calls;
                None
            }
        }
    }

    /// `y[rows, N] = x[rows, K] · W`, on `threads` threads.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32], threads: usize) {
        let (k, n) = (self.k, self.n);
        // Checked products: a huge `rows` must not wrap around to a length that matches (the
        // `gemm` crate would then write past y).
        assert_eq!(Some(x.len()), rows.checked_mul(k), "x must be [rows, K]");
        assert_eq!(Some(y.len()), rows.checked_mul(n), "y must be [rows, N]");
        if rows == 0 {
            return;
        }
        match &self.packed {
            Packed::F32(_, nk) if rows <= SMALL_M => small_m_f32(x, nk, y, rows, k, n, threads),
            Packed::F32(kn, _) => gemm_f32(x, kn, y, rows, k, n, threads),
            Packed::Bf16AsF32(w) => with_x_rounded(x, |xr| gemm_f32(xr, w, y, rows, k, n, threads)),
            #[cfg(target_arch = "x86_64")]
            Packed::F32Panels(PanelKernel::Avx512, w) => {
                // SAFETY: `Avx512` panels are only packed when the CPU has AVX-512F (`pack_fn_via`
                // checks).
                unsafe { avx512::matmul(x, w.as_slice(), y, rows, k, n, threads, self.first_col) }
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Bf16Panels(PanelKernel::Avx512, w) => {
                // x rounded to bf16 first, as the bf16 dot kernels see it.
                with_x_rounded(x, |xr| {
                    // SAFETY: `Avx512` bf16 panels are only packed when the CPU has AVX-512F
                    // (`pack_fn_via` checks).
                    unsafe {
                        avx512::matmul(xr, w.as_slice(), y, rows, k, n, threads, self.first_col)
                    }
                })
            }
            #[cfg(target_arch = "x86_64")]
            Packed::F32Panels(PanelKernel::Avx2, w) => {
                // SAFETY: `Avx2` panels are only packed when the CPU has AVX2 and FMA (`pack_fn_via`
                // checks).
                unsafe {
                    avx2::matmul(
                        x,
                        w.as_slice(),
                        y,
                        rows,
                        k,
                        n,
                        threads,
                        self.first_col,
                        false,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Bf16Panels(_, w) => {
                // SAFETY: the other bf16 panels on x86-64 are `Avx2` ones, only packed when
                // the CPU has AVX2 and FMA (`pack_fn_via` checks).
                // x is rounded to bf16 as it is packed.
                unsafe {
                    avx2::matmul(
                        x,
                        w.as_slice(),
                        y,
                        rows,
                        k,
                        n,
                        threads,
                        self.first_col,
                        true,
                    )
                }
            }
            // The bf16 dot kernels: x rounded into bf16 pairs first.
            Packed::Bf16Pairs(_) | Packed::Bf16DotPairs(_) | Packed::Bf16AmxPairs(_) => {
                with_x_pairs(x, rows, k, |xp| self.matmul_pairs(xp, rows, y, threads))
            }
            #[cfg(target_arch = "aarch64")]
            Packed::F32Panels(_, w) => {
                neon::matmul(x, w.as_slice(), y, rows, k, n, threads, self.first_col)
            }
            #[cfg(target_arch = "aarch64")]
            Packed::Bf16Panels(_, w) => with_x_rounded(x, |xr| {
                neon::matmul(xr, w.as_slice(), y, rows, k, n, threads, self.first_col)
            }),
            #[allow(unreachable_patterns)]
            _ => unreachable!("panels are only packed for kernels this target has"),
        }
    }
}

/// Up to this many rows (decode steps of small batches) the f32 product streams the weights
/// once itself instead of calling a GEMM that packs them first.
const SMALL_M: usize = 8;

/// `y = x · Wᵀ` for few rows, from W in PyTorch layout ([N, K]): each weight row is read
/// once, in order, and dotted with every row of x (which stay in L1); outputs are split
/// across threads.
fn small_m_f32(
    x: &[f32],
    w_nk: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    let isa = super::kernels::Isa::detect();
    let parts = threads.clamp(1, n.div_ceil(256));
    let width = n.div_ceil(parts);
    // yt: [n, m] (output-major), so that each part writes one contiguous block.
    let mut yt = vec![0.0f32; n * m];
    let run = |o0: usize, block: &mut [f32]| {
        for (i, out) in block.chunks_mut(m).enumerate() {
            let o = o0 + i;
            let wrow = &w_nk[o * k..(o + 1) * k];
            for (r, v) in out.iter_mut().enumerate() {
                *v = super::kernels::dot(isa, &x[r * k..(r + 1) * k], wrow);
            }
        }
    };
    if parts > 1 {
        use rayon::prelude::*;
        yt.par_chunks_mut(width * m)
            .enumerate()
            .for_each(|(p, b)| run(p * width, b));
    } else {
        run(0, &mut yt);
    }
    for o in 0..n {
        for r in 0..m {
            y[r * n + o] = yt[o * m + r];
        }
    }
}

fn gemm_f32(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: x is [m, k] row-major (row stride k, col stride 1), w is [k, n] row-major and y
    // is [m, n] row-major; the lengths were checked by the caller, so every index the strides
    // describe is in bounds. read_dst = false, so y's previous contents are not read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// One microkernel call, as the driver hands it out: rows `r0..r0+mr` of the call (its
/// row block `idx`, counted from 0) and panels `panel0..panel0+np`, into `y` (row stride
/// `ldy`).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Block {
    idx: usize,
    panel0: usize,
    np: usize,
    r0: usize,
    mr: usize,
    y: *mut f32,
    ldy: usize,
}

thread_local! {
    /// The driver's buffer for a block whose columns run past N (the column tail): MR rows of
/// the widest group.
    static TAIL_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of the row block that starts at row `r0` of a call of `m` rows (m > 0): MR at a
/// time, except that when the last block would have fewer than `min_tail` rows (and more
/// than none), the last two share their MR + m mod MR rows evenly, ⌈·/2⌉ then ⌊·/2⌋ (8
/// rows as 4 + 4, 32 as 6, 6, 6, 6, 4, 4). The number of blocks stays ⌈m/MR⌉.
/// [`panel_driver`] and the packing of x (AVX2's `pack_x`) cut alike.
///
/// A short last block has too few FMA chains to hide the FMA latency while its panel
/// comes from L2: a row is 2 chains on AVX2 (16-column panels, two ymm) and 4 on AVX-512.
/// Each kernel's `min_tail` follows what was measured: 4 rows on AVX2 in units of one
/// panel (bf16 panels, f32 ones of k ≥ 1536, and f32 calls of more than 2·MR rows), 2 on
/// the AVX-512 f32 kernel, 3 on the `vdpbf16ps` one, and 0 (never) on AVX2 f32 calls of 4
/// to 2·MR rows in units of four panels, whose second block runs several panels at once,
/// and on NEON (not measured). Zen 4 guest, two threads, decode steps in alternating pairs
/// of processes (medians; `bench/results/cpu-2026-12-01-zen4-r3/`), first with the rule
/// for 7 to 12 rows only:
/// - AVX2 bf16 B = 7 (6 + 1 → 4 + 3) 0.591 → 0.528 ms and 0.607 → 0.566; B = 8 (6 + 2 →
///   4 + 4) 0.615 → 0.562 and 0.590 → 0.525; B = 9 (6 + 3 → 5 + 4) 0.611 → 0.595;
///   B = 10 (6 + 4 → 5 + 5) 0.669 against 0.662, so 10 rows keep 6 + 4. In criterion
///   (`projection/avx2_6x16_(bf16_widened)/rows8/2threads`), 505, 558, 509 → 441, 440,
///   473 µs.
/// - AVX-512 f32 B = 7: 0.497 → 0.444, 0.533 → 0.471 and 0.510 → 0.526 ms; B = 8 was no
///   faster in halves (0.544 → 0.560 and 0.524 → 0.627 ms).
/// - `vdpbf16ps` B = 7: 0.269 → 0.235 and 0.277 → 0.240 ms; B = 8: 0.278 → 0.272 and
///   0.287 → 0.280; B = 9 0.310 against 0.305.
/// - AVX2 f32 in units of four, halves against blocks of MR: B = 7 0.546 → 0.597 ms, B = 8
///   0.637 → 0.693.
///
/// Then for every call, against the above (a range of 32 rows at B = 64 on two threads, of
/// 128 at B = 256, ends 6 + 2 → 4 + 4 on AVX2 and `vdpbf16ps`), five pairs each: AVX2 bf16
/// B = 64 3.900 → 3.841 ms, B = 256 14.432 → 14.260; AVX2 f32 B = 64 4.307 → 3.903, B = 256
/// 15.617 → 14.721; `vdpbf16ps` B = 64 2.135 → 1.974.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn block_rows(m: usize, r0: usize, min_tail: usize) -> usize {
    let rem = m % MR;
    // The last two blocks' rows, split evenly when the last would be short.
    let pair = MR + rem;
    if rem != 0 && rem < min_tail && m > MR && r0 == m - pair {
        pair.div_ceil(2)
    } else {
        (m - r0).min(MR)
    }
}

/// The shared driver of our microkernels. The columns are cut into panels of `nr`; a work
/// unit is a group of consecutive panels over all m rows, in blocks of at most MR rows:
/// `groups[m]` panels for calls of at most three rows (decode steps: the multi-panel
/// shapes, so that enough independent FMA chains are in flight while the weights stream
/// by), `groups[4]` for 4 to 2·MR rows (decode steps of one or two row blocks: each panel's
/// first block prefetches the unit's next panel into L2, see `block_kernel!`) and one
/// otherwise. A panel's weights
/// are read from memory once per call and stay in cache for its later row blocks. The
/// kernels see only `[mr ≤ MR, np·nr]` blocks, written straight into y; the driver handles
/// the row tail (smaller `mr`, or two even blocks: see [`block_rows`] and `min_tail`), the
/// column tail (a block into a buffer, then its valid columns copied) and threading over units (disjoint columns of y). Units run from the
/// one holding column `first_col` to the last, then from the first
/// ([`Projection::run_from_col`]).
///
/// Measured on AVX-512 f32, 64 rows, one thread: 2.89 ms, 89% of the FMA peak, with the
/// panel's weights read from L2; the same kernel reading them from L1 (wrong sums, for the
/// bound) took 2.54 ms, the peak. Cutting k into L1-sized blocks, continuing each FMA chain
/// from y between blocks, was slower all the same (3.1-3.5 ms for blocks of 16-32 KiB):
/// the block's rows of x and y then compete for L1 with the weights.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[allow(clippy::too_many_arguments)]
fn panel_driver(
    m: usize,
    n: usize,
    nr: usize,
    groups: [usize; 5],
    min_tail: usize,
    y: &mut [f32],
    threads: usize,
    first_col: usize,
    block: impl Fn(Block) + Sync,
) {
    assert_eq!(y.len(), m * n, "y must be [m, n]");
    let group = if m < 4 {
        groups[m]
    } else if m <= 2 * MR {
        groups[4]
    } else {
        1
    }
    .max(1);
    let panels = n.div_ceil(nr);
    let yaddr = y.as_mut_ptr() as usize;
    let work = |g: usize| {
        let panel0 = g * group;
        let np = group.min(panels - panel0);
        let (c0, w) = (panel0 * nr, np * nr);
        let cols = w.min(n - c0);
        let (mut r0, mut idx) = (0, 0);
        while r0 < m {
            let mr = block_rows(m, r0, min_tail);
            if cols == w {
                // Full panels: straight into y, columns [c0, c0 + w) of rows r0..r0+mr.
                // Each unit is handled once, so no two threads write the same element.
                block(Block {
                    idx,
                    panel0,
                    np,
                    r0,
                    mr,
                    y: (yaddr as *mut f32).wrapping_add(r0 * n + c0),
                    ldy: n,
                });
            } else {
                // The column tail: the block into a buffer of MR rows, then its valid columns.
                TAIL_BUF.with(|b| {
                    let mut buf = b.borrow_mut();
                    if buf.len() < MR * w {
                        buf.resize(MR * w, 0.0);
                    }
                    block(Block {
                        idx,
                        panel0,
                        np,
                        r0,
                        mr,
                        y: buf.as_mut_ptr(),
                        ldy: w,
                    });
                    // SAFETY: y is [m, n] (asserted above) and r0 + mr <= m; this unit alone
                    // writes columns [c0, c0 + cols) of its rows.
                    unsafe { copy_cols(&buf, w, mr, yaddr as *mut f32, n, r0, c0, cols) };
                });
            }
            r0 += mr;
            idx += 1;
        }
    };
    let units = panels.div_ceil(group);
    // The unit holding column `first_col` first (`Projection::run_from_col`).
    let start = (first_col / nr / group).min(units.saturating_sub(1));
    super::fanout::for_each_unit(units, threads, &|u| work((u + start) % units));
}

/// Copies the first `cols` columns of `rows` rows of `buf` (rows `ldb` apart) into y (rows
/// of `n`) at row `r0`, column `c0`: a column tail computed into a buffer.
///
/// # Safety
/// `y` is valid for rows `r0..r0 + rows` of `n` floats, `c0 + cols <= n`, and no one else
/// touches those columns of those rows meanwhile; `buf` holds `rows` rows of `ldb >= cols`.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[allow(clippy::too_many_arguments)]
unsafe fn copy_cols(
    buf: &[f32],
    ldb: usize,
    rows: usize,
    y: *mut f32,
    n: usize,
    r0: usize,
    c0: usize,
    cols: usize,
) {
    for r in 0..rows {
        // SAFETY: row r0 + r of y, columns c0..c0+cols, per the contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(y.add((r0 + r) * n + c0), cols) };
        dst.copy_from_slice(&buf[r * ldb..r * ldb + cols]);
    }
}

/// The body of each kernel module's `l1_calls`: `$calls` calls of `$kernel::<MR, 1, $t>`
/// over `$kc` k steps on buffers that stay in L1 (x `MR·$kc` floats read at stride `$ldx`
/// as the kernel takes it, w `$kc` rows of `$nr` elements `$zero`, y `MR` rows of `$nr`);
/// evaluates to the FLOPs done. Expands to unsafe calls: the caller's CPU must run the
/// kernel.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_macros)
)]
macro_rules! l1_calls {
    ($kernel:ident, $t:ty, $zero:expr, $nr:expr, $kc:expr, $ldx:expr, $calls:expr) => {{
        let (kc, mr, calls): (usize, usize, usize) = ($kc, super::MR, $calls);
        // Line-aligned, as packed panels are: an unaligned zmm load splits a cache line.
        let mut x = crate::alloc::LineAligned::new(kc * mr, 0.5f32);
        let w = crate::alloc::LineAligned::new(kc * $nr, $zero);
        let mut y = crate::alloc::LineAligned::new(super::MR * $nr, 0.0f32);
        for _ in 0..calls {
            $kernel::<{ super::MR }, 1, $t>(
                std::hint::black_box(x.as_mut_slice()),
                $ldx,
                kc,
                w.as_slice(),
                $nr,
                kc * $nr,
                y.as_mut_slice().as_mut_ptr(),
                $nr,
                super::NextPanel::NONE,
            );
            std::hint::black_box(y.as_mut_slice());
        }
        (2 * mr * $nr * kc * calls) as f64
    }};
}

/// Calls `$kernel::<R, P, _>(x, ldx, kc, w, ldw, lds, y, ldy, next)` for the block `$b` (a
/// [`Block`]) over `$kc` k steps: the decode shapes listed get one instance with R×P
/// accumulators in registers (no next-panel prefetch; AVX2's f32 shapes of 2 and 3 rows
/// prefetch their own panels ahead); any other block runs panel by panel with P = 1
/// (`$nr`: columns per panel). In a unit of several panels of 4 or more rows (AVX2's
/// `groups[4]`), each panel's first row block prefetches the unit's next panel into L2,
/// and a later row block of one or two rows runs four or two panels per call (P = 4, 2).
/// `$x` is the block's rows in the layout its kernel reads (row-major at stride `$ldx`, or
/// for AVX2 packed `[k][mr]` with `$ldx` = mr), `$w` starts at its first panel; `lds` is
/// elements per panel of `w`.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(unused_macros)
)]
macro_rules! block_kernel {
    ($kernel:ident, [$(($r:literal, $p:literal)),*], $b:expr, $kc:expr, $x:expr, $ldx:expr, $w:expr, $ldw:expr, $lds:expr, $nr:expr, $next:expr) => {{
        let (b, kc, x, ldx, w, ldw, lds): (super::Block, usize, _, usize, _, usize, usize) =
            ($b, $kc, $x, $ldx, $w, $ldw, $lds);
        let (y, ldy, next): (_, _, super::NextPanel) = (b.y, b.ldy, $next);
        match (b.mr, b.np) {
            $(($r, $p) => $kernel::<$r, $p, _>(x, ldx, kc, w, ldw, lds, y, ldy, super::NextPanel::NONE),)*
            _ => {
                // A later row block of one or two rows (the last of a call of 7 or 8 rows,
                // in AVX2's units of four f32 panels) finds the unit's panels in L2: it runs
                // them four (one row) or two (two rows) at a time, so that 8 FMA chains
                // hide the FMA latency where one panel gave it 2 or 4. Two threads of the
                // Zen 3 VM, 40 interleaved calls per build, two runs: 7 rows 885-898 µs →
                // 767-825 (median), 8 rows 890-936 → 822-850; 9 and 10 rows unchanged.
                // Running the three-row block of 9 rows as (3, 2) as well was slower
                // (1,421 → 1,499 and 978 → 1,106 µs) than one panel's 6 chains, so three
                // rows stay as they were.
                let several = b.r0 > 0 && b.mr <= 2;
                let mut p = 0;
                while p < b.np {
                    let (wp, yp) = (&w[p * lds..], y.add(p * $nr));
                    if several && b.mr == 1 && p + 4 <= b.np {
                        $kernel::<1, 4, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, super::NextPanel::NONE);
                        p += 4;
                        continue;
                    }
                    if several && b.mr == 2 && p + 2 <= b.np {
                        $kernel::<2, 2, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, super::NextPanel::NONE);
                        p += 2;
                        continue;
                    }
                    // A unit of several panels of 4 or more rows one at a time (`groups[4]`):
                    // the first row block of each, which reads it from L3 or memory,
                    // prefetches the next one of the unit into L2, a line per k step (the
                    // 64-column kernels: its first `kc` lines). Column-tail units of the
                    // decode shapes (1-3 rows) keep `next` as it is.
                    let next = if p + 1 < b.np && b.r0 == 0 && b.mr > 3 {
                        super::NextPanel::whole(&w[(p + 1) * lds..], lds, kc, next.l1_ahead)
                    } else {
                        next
                    };
                    match b.mr {
                        1 => $kernel::<1, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                        2 => $kernel::<2, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                        3 => $kernel::<3, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                        4 => $kernel::<4, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                        5 => $kernel::<5, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                        _ => $kernel::<6, 1, _>(x, ldx, kc, wp, ldw, lds, yp, ldy, next),
                    }
                    p += 1;
                }
            }
        }
    }};
}

/// The packed weights from column block `j0` (of `nr` columns, `kw` values per column and
/// k step) to the end: panels are `[k + 1][nr·kw]` each, one zero row of padding after the
/// k rows, so that consecutive panels are not a multiple of 4 KiB apart (the blocks of a
/// decode step are read together and would otherwise fall into the same cache sets).
/// Returns the slice, the row stride within a panel and the panel stride.
fn panel_slice<T>(w: &[T], j0: usize, k: usize, nr: usize, kw: usize) -> (&[T], usize, usize) {
    let (ldw, lds) = (nr * kw, (k + 1) * nr * kw);
    (&w[j0 * lds..], ldw, lds)
}

/// Cache lines of the panel that follows a block's panel, to be prefetched into L2 while
/// the block runs (`lines` lines from `at`, spread over its k steps), and, for kernels
/// that take it, how many rows of its own panel ahead a block prefetches into L1
/// (`l1_ahead`; 0: none).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct NextPanel {
    at: *const i8,
    lines: usize,
    // Read by the AVX2 kernel only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    l1_ahead: usize,
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl NextPanel {
    const NONE: NextPanel = NextPanel {
        at: std::ptr::null(),
        lines: 0,
        l1_ahead: 0,
    };

    /// Cache lines of a panel of `lds` elements of `T`.
    fn panel_lines<T>(lds: usize) -> usize {
        (lds * std::mem::size_of::<T>()).div_ceil(64)
    }

    /// All of the panel starting at `w` (its first `kc` lines: one per k step), with
    /// `l1_ahead` kept: a unit's next panel (`block_kernel!`).
    fn whole<T>(w: &[T], lds: usize, kc: usize, l1_ahead: usize) -> NextPanel {
        NextPanel {
            at: w.as_ptr().cast(),
            lines: Self::panel_lines::<T>(lds).min(kc),
            l1_ahead,
        }
    }

    /// Row block `b`'s share of the next panel (the first panel after the last: the next
    /// tile starts there). A prefill tile reads every panel from L3 in its first row block
    /// and from L2 in the later ones; the later blocks (all but the first) split the next
    /// panel's lines among them, so that the next first block finds it in L2 as well.
    /// Measured on AVX-512 f32 (Zen 5), 2 threads each on its own 64-row tiles as in a
    /// prefill (the `layer_tiles` case of `benches/projection.rs`): 86-87% of the FMA peak
    /// without, 90-92% with; in `engram bench` the projection's thread time per 4096-token
    /// run went from 0.180 to 0.166 s.
    ///
    /// One line per k step at most (`kc` steps), so that the kernels' inner loop gains a
    /// compare and a prefetch only (the AVX2 prefill kernel decides once per call); a share
    /// larger than that (calls of 7 to 12 rows, two row blocks, on the kernels with one
    /// panel per unit there) is cut short, which costs nothing but the prefetch. Units of
    /// several panels (AVX2's `groups[4]`) get none: `block_kernel!` prefetches within the
    /// unit instead.
    fn share<T>(w: &[T], b: &Block, m: usize, panels: usize, lds: usize, kc: usize) -> NextPanel {
        let blocks = m.div_ceil(MR);
        if b.np != 1 || blocks < 2 || b.idx == 0 {
            return NextPanel::NONE;
        }
        let lines = Self::panel_lines::<T>(lds);
        let per = lines.div_ceil(blocks - 1);
        let first = (b.idx - 1) * per;
        let next = (b.panel0 + 1) % panels;
        NextPanel {
            // Only ever prefetched, never read: `wrapping_add` keeps it defined even past w.
            at: w
                .as_ptr()
                .wrapping_add(next * lds)
                .cast::<i8>()
                .wrapping_add(first * 64),
            lines: per.min(lines.saturating_sub(first)).min(kc),
            l1_ahead: 0,
        }
    }

    /// Step `kk`'s line into L2.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline(always)]
    fn prefetch_l2(self, kk: usize) {
        if kk >= self.lines {
            return;
        }
        let at = self.at.wrapping_add(64 * kk);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing and never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(at)
        };
        #[cfg(target_arch = "aarch64")]
        // SAFETY: PRFM is a hint: it changes no register or memory and never faults.
        unsafe {
            std::arch::asm!("prfm pldl2keep, [{0}]", in(reg) at, options(nostack, preserves_flags, readonly))
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// Columns per panel: two ymm.
    const NR: usize = 16;
    /// Blocks per work unit for 1, 2, 3 rows (12 ymm accumulators in flight), and panels per
    /// unit for 4 to 12 rows on f32 panels ([`groups`]). Those calls (a decode step of B = 4
    /// to 7, or a range of a larger one) read each panel from L3 or memory in their first row block, and
    /// a unit of four lets that block prefetch the next panel into L2 on its own thread
    /// (called from outside the pool, as a decode step is, the units go to the threads one
    /// at a time, so the next unit is usually another thread's). Criterion, two threads of
    /// the Zen 3 VM, medians of 4 alternating rounds of
    /// `projection/avx2_6x16_(f32)/rows{4,8}/2threads`: 4 rows 677 µs with one panel per
    /// unit, 566 µs with four (three: 772, eight: 699); 8 rows 1,733 against 990 µs. bf16
    /// panels keep one: 8 rows read 752 µs with one and 906 with four (4 rows: 409 and
    /// 340), and B = 8 bf16 decode steps 0.934 → 1.147 ms in alternating processes. Units
    /// of one panel share a short last row block's rows with the one before
    /// (`super::block_rows`).
    const GROUPS: [usize; 5] = [1, 6, 3, 2, 4];
    /// The groups of a call on panels of `T` with `k` steps: four f32 panels per unit for
    /// 4 to 12 rows while they fit in 384 KiB (the later row block reads them from L2;
    /// k ≤ 1535), one otherwise.
    fn groups<T>(k: usize) -> [usize; 5] {
        let four = 4 * (k + 1) * NR * std::mem::size_of::<T>();
        if std::mem::size_of::<T>() == 4 && four <= 384 << 10 {
            GROUPS
        } else {
            [GROUPS[0], GROUPS[1], GROUPS[2], GROUPS[3], 1]
        }
    }
    /// Panel rows ahead that the multi-panel decode shapes of 2 and 3 rows prefetch into L1
    /// on f32 panels, each panel every k step. The hardware prefetchers alone kept too few
    /// lines in flight for three or two panels streaming from L3 or memory. Criterion, f32
    /// on two threads of the Zen 3 VM, medians of 4 alternating rounds: 2 rows 642 µs
    /// without, 414 µs at 32 rows ahead and 386 µs at 64; 3 rows 825, 677 and 529 µs. One
    /// row (six panels, six streams) and bf16 panels (half the bytes) showed no gain and do
    /// not prefetch: in criterion, one row read 361 against 324 µs (f32) and bf16 two rows
    /// 322 against 302, within the noise; in the layer, bf16 B = 1 steps read 0.164 →
    /// 0.198 ms in one alternating run (medians of 3) and 0.167 → 0.157 in another (of 5).
    const DECODE_AHEAD: usize = 64;
    /// Panel rows ahead that a prefill block (one panel) prefetches into L1 (a line per f32
    /// row, one per two bf16 rows; 4 KiB ahead in f32), on CPUs with an L1 data cache of 48 KiB or more (or of
    /// unknown size); none on smaller ones. The row blocks of a panel read its weights from
    /// L2. On Zen 5 (48 KiB) the hardware prefetchers alone left the kernel waiting on
    /// them: 64 rows × 5120 × 1024 took 5.8-6.1 ms on one thread without, 5.2-5.4 ms with
    /// (95% of the AVX2 FMA peak; 32 to 128 rows ahead all did). On Zen 3 (32 KiB) the
    /// prefetched lines crowd out the block's packed x and the current rows: two threads
    /// on 64-row tiles of that shape ran 13% faster without (16 rows ahead: 1% slower).
    ///
    /// A panel's first row block, which streams it from L3 or memory (a call of 4 or more
    /// rows, such as a B = 8 decode step, or the first panel of a prefill tile), prefetches
    /// [`PREFETCH_FIRST`] rows ahead on every CPU. (Calls of 1-3 rows run their full panel
    /// groups through the multi-panel shapes; those of 2 and 3 rows prefetch
    /// [`DECODE_AHEAD`] rows ahead on f32 panels.) B = 8 f32 decode
    /// steps on Zen 3 (before units of four panels), alternating processes: 1.35-1.90 ms (median 1.61) so, 1.56-2.36 ms
    /// (median of four 2.16) with no L1 prefetch at all, and 1.51-2.05 ms (1.78) before x
    /// was packed.
    fn prefetch_rows() -> usize {
        static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *ROWS.get_or_init(|| match l1d_bytes() {
            Some(b) if b < 48 << 10 => 0,
            _ => PREFETCH_FIRST,
        })
    }

    /// The L1 data cache's size in bytes from CPUID (AMD's leaf 0x8000_0005, else the
    /// deterministic cache parameters of leaf 4), or None where the CPU reports neither.
    pub(super) fn l1d_bytes() -> Option<usize> {
        // `__cpuid_count` is a safe fn in newer Rust and an unsafe one in 1.89, our
        // rust-version.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; it only reads identification registers.
        let leaf = |l: u32, sub: u32| unsafe { __cpuid_count(l, sub) };
        let vendor = leaf(0, 0);
        // "AuthenticAMD" and "HygonGenuine" start "Auth" and "Hygo".
        let amd_like = vendor.ebx == u32::from_le_bytes(*b"Auth")
            || vendor.ebx == u32::from_le_bytes(*b"Hygo");
        if amd_like && leaf(0x8000_0000, 0).eax >= 0x8000_0005 {
            let kib = leaf(0x8000_0005, 0).ecx >> 24;
            return (kib > 0).then_some(kib as usize * 1024);
        }
        if vendor.eax >= 4 {
            for i in 0..16 {
                let c = leaf(4, i);
                let kind = c.eax & 0x1f;
                if kind == 0 {
                    break;
                }
                // Level 1, data cache (kind 1).
                if (c.eax >> 5) & 0x7 == 1 && kind == 1 {
                    let ways = ((c.ebx >> 22) & 0x3ff) as usize + 1;
                    let partitions = ((c.ebx >> 12) & 0x3ff) as usize + 1;
                    let line = (c.ebx & 0xfff) as usize + 1;
                    let sets = c.ecx as usize + 1;
                    // A hypervisor that zeroes the fields reports nothing usable.
                    return (line >= 32).then_some(ways * partitions * line * sets);
                }
            }
        }
        None
    }

    /// Whether the CPU has PREFETCHW (CPUID 0x8000_0001, ECX bit 8: AMD since K8, Intel
    /// since Broadwell).
    fn has_prefetchw() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            // `__cpuid` is a safe fn in newer Rust and an unsafe one in 1.89, our
            // rust-version.
            #[allow(unused_unsafe)]
            // SAFETY: CPUID exists on every x86-64 CPU; it only reads identification
            // registers (a leaf past the maximum returns other data, checked first).
            let leaf = |l: u32| unsafe { __cpuid(l) };
            leaf(0x8000_0000).eax >= 0x8000_0001 && leaf(0x8000_0001).ecx & (1 << 8) != 0
        })
    }

    /// Panel rows ahead that a panel's first row block prefetches into L1 (see
    /// [`prefetch_rows`]).
    const PREFETCH_FIRST: usize = 64;

    thread_local! {
        /// The packed x of the calls on this thread ([`pack_x`]), reused across calls.
        static XPACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// x `[m, k]` as the kernels read it, into `out`: in the row blocks that
    /// [`super::block_rows`] cuts (`min_tail` as the driver gets it), the block of rows
    /// `r0..r0+mr` at `r0·k` as `[k][mr]`, so that a k step's broadcasts read one run of
    /// `mr` floats from one stream (row-major x is `mr` streams 4 KiB apart, which on a
    /// 32 KiB L1 land in the same sets). With `round`, each value rounded to bf16 on the
    /// way (the widening bf16 kernels' activations, as the AVX512-BF16 kernel and the
    /// `gemm` fallback see them). Two threads on 64-row tiles of the demo layer's shape
    /// (Zen 3): 15% faster than row-major x.
    fn pack_x(x: &[f32], m: usize, k: usize, round: bool, min_tail: usize, out: &mut Vec<f32>) {
        // Every element is written below: only growth is zero-filled.
        out.resize(m * k, 0.0);
        let mut r0 = 0;
        while r0 < m {
            let mr = super::block_rows(m, r0, min_tail);
            let dst = &mut out[r0 * k..(r0 + mr) * k];
            for r in 0..mr {
                let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    dst[kk * mr + r] = if round { super::bf16_rounded(v) } else { v };
                }
            }
            r0 += mr;
        }
    }

    /// A panel element: f32 as it is, or bf16 widened to f32 in registers.
    pub trait Elem: Copy + Sync {
        /// Loads a panel row (16 elements at `p`) as columns 0..8 and 8..16 in f32.
        ///
        /// # Safety
        /// `p` must point to 16 readable elements; the CPU must have AVX2.
        unsafe fn load16(p: *const Self) -> [__m256; 2];
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> [__m256; 2] {
            // SAFETY: per the trait contract.
            unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
        }
    }

    impl Elem for bf16 {
        /// The row is packed with columns c and c+8 in one 32-bit lane (low and high half):
        /// bf16 → f32 is the bits moved to the high half, so columns 0..8 are the lanes
        /// shifted left by 16 and columns 8..16 the lanes with the low half cleared (two
        /// plain integer ops, no shuffles).
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> [__m256; 2] {
            // SAFETY: per the trait contract.
            unsafe {
                let raw = _mm256_loadu_si256(p as *const __m256i);
                let hi = _mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
                [
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw)),
                    _mm256_castsi256_ps(hi),
                ]
            }
        }
    }

    /// Every (panel group, row block) through the 16-column kernels, x packed first
    /// ([`pack_x`]; rounded to bf16 on the way with `round`, as bf16 panels need).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul<T: Elem>(
        x: &[f32],
        w: &[T],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
        round: bool,
    ) {
        assert!(
            w.len() >= n.div_ceil(NR) * (k + 1) * NR,
            "w must hold every panel"
        );
        assert_eq!(x.len(), m * k, "x must be [m, k]");
        // Taken out of the thread-local for the call (and put back after), so that a call
        // that starts on this thread while this one waits on the pool gets its own.
        let mut packed = XPACK.with(|b| std::mem::take(&mut *b.borrow_mut()));
        // Where units hold one panel (bf16 panels, f32 ones too large for four per unit, and
        // any call of more than 2·MR rows), a last row block of 1 to 3 rows shares the rows
        // of the last two evenly (see `super::block_rows`); x is packed in the same blocks.
        let groups = groups::<T>(k);
        let min_tail = if groups[4] == 1 || m > 2 * super::MR {
            4
        } else {
            0
        };
        // One row packed is the row itself.
        let xp: &[f32] = if m == 1 && !round {
            x
        } else {
            pack_x(x, m, k, round, min_tail, &mut packed);
            &packed
        };
        let ahead = prefetch_rows();
        super::panel_driver(m, n, NR, groups, min_tail, y, threads, first_col, |b| {
            let (wg, ldw, lds) = super::panel_slice(w, b.panel0, k, NR, 1);
            // A panel's first row block streams it from L3 or memory: that one prefetches
            // into L1 on every CPU (see `prefetch_rows`).
            let next = super::NextPanel {
                l1_ahead: if b.r0 == 0 { PREFETCH_FIRST } else { ahead },
                ..super::NextPanel::share(w, &b, m, n.div_ceil(NR), lds, k)
            };
            // The block's rows, packed `[k][mr]` from `r0·k` (see `pack_x`).
            let xs = &xp[b.r0 * k..(b.r0 + b.mr) * k];
            // The block's lines of y, owned by the time the kernel stores to them (its 12
            // stores at the end had missed L1, and the next call's stack pushes waited on
            // them: in `perf` on Zen 3, the closure went from 5.3% to 1.5% of the samples).
            if has_prefetchw() {
                for r in 0..b.mr {
                    let row = b.y.wrapping_add(r * b.ldy);
                    // Every line of the row's np·64 bytes (a row off a line spans one
                    // more): each 16 floats, and the last one.
                    let last = NR * b.np - 1;
                    for at in (0..last).step_by(NR).chain([last]) {
                        // SAFETY: PREFETCHW (present: checked above) is a hint: it changes
                        // no register or memory and never faults.
                        unsafe {
                            std::arch::asm!("prefetchw [{0}]", in(reg) row.wrapping_add(at), options(nostack, preserves_flags, readonly))
                        };
                    }
                }
            }
            // SAFETY: the caller guarantees AVX2 + FMA; the kernel checks x and w; the driver
            // hands out `b.y` valid for the block's rows and panels, written by no one else.
            unsafe {
                block_kernel!(
                    kernel,
                    [(1, 6), (2, 3), (3, 2)],
                    b,
                    k,
                    xs,
                    b.mr,
                    wg,
                    ldw,
                    lds,
                    NR,
                    next
                )
            };
        });
        XPACK.with(|b| *b.borrow_mut() = packed);
    }

    /// `calls` calls of the 6-row, one-panel kernel on operands that stay in L1 (x 6 KiB,
    /// the panel's 256 rows 16 KiB in f32); the FLOPs done. See
    /// [`super::Projection::l1_microkernel`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    pub unsafe fn l1_calls<T: Elem + Default>(calls: usize) -> f64 {
        // x packed `[KC][MR]` (row stride MR in the kernel's terms).
        // SAFETY: AVX2 + FMA (the caller); the macro's buffers hold what the kernel reads.
        unsafe { l1_calls!(kernel, T, T::default(), NR, 256, super::MR, calls) }
    }

    /// `y[R, P·16] = x[R, kc] · w[kc, P·16]`, x packed `[kc][R]` (row r of step kk at
    /// `kk·R + r`, [`pack_x`]; `ldk` must be R), panel rows of NR elements (`ldw` must be NR;
    /// panics otherwise), `lds` per panel, y's `ldy`: R×P×2 ymm accumulators, one FMA chain
    /// per output over k in order. Single-panel blocks run four k steps per trip and
    /// prefetch the panel rows `next.l1_ahead` steps on into L1 (none for 0,
    /// [`prefetch_rows`]).
    ///
    /// # Safety
    /// AVX2 + FMA; `y` valid for R rows of P·16 floats at stride `ldy`, touched by no one else
    /// during the call.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const R: usize, const P: usize, T: Elem>(
        x: &[f32],
        ldk: usize,
        kc: usize,
        w: &[T],
        ldw: usize,
        lds: usize,
        y: *mut f32,
        ldy: usize,
        next: super::NextPanel,
    ) {
        // x packed `[kc][R]` and panel rows of NR elements, as `matmul` and `l1_calls` hand
        // them: the strides are constants, so that every load of an unrolled trip is a
        // fixed offset from two pointers (no address arithmetic in the loop).
        assert!(ldk == R && ldw == NR, "x packed [kc][R], panel rows of NR");
        let (ldk, ldw) = (R, NR);
        assert!(kc >= 1 && x.len() >= kc * R);
        assert!(w.len() >= (P - 1) * lds + (kc - 1) * ldw + NR);
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // One k step: P panel rows loaded (widened), R broadcasts, R×P×2 FMAs.
        macro_rules! step {
            ($wq:expr, $xq:expr, $j:expr) => {{
                let (wq, xq, j): (*const T, *const f32, usize) = ($wq, $xq, $j);
                let mut b = [[_mm256_setzero_ps(); 2]; P];
                for (p, bp) in b.iter_mut().enumerate() {
                    // SAFETY: wq points at step s's row and s + j < kc; w holds block p's kc
                    // rows (asserted).
                    *bp = unsafe { T::load16(wq.add(j * ldw + p * lds)) };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: xq points at step s's x and s + j < kc; x holds kc steps of R
                    // floats (asserted); r < R.
                    let a = _mm256_set1_ps(unsafe { *xq.add(j * ldk + r) });
                    for (v, bp) in row.iter_mut().zip(&b) {
                        v[0] = _mm256_fmadd_ps(a, bp[0], v[0]);
                        v[1] = _mm256_fmadd_ps(a, bp[1], v[1]);
                    }
                }
            }};
        }
        // Single-panel blocks (prefill) run four k steps per trip, their prefetches
        // decided once: the loop's compares, branches and pointer updates are a quarter of
        // what one step per trip costs, so the 12 FMAs of a step share the front end with
        // fewer other instructions. The L2 share may run up to 3 lines past `next.lines`;
        // the L1 prefetch covers the 4 rows `l1_ahead` steps on (one line per f32 row, one
        // per two bf16 rows). The multi-panel decode shapes, bound by memory, keep one
        // step per trip (unrolled, the compiler spills their accumulators); so do the
        // last kc mod 4 steps; those of 2 and 3 rows prefetch each f32 panel
        // `DECODE_AHEAD` rows on.
        let ku: usize = if P == 1 { 4 } else { 1 };
        let row_bytes = NR * std::mem::size_of::<T>();
        let mut kk = 0;
        // Trips of `ku` steps while they fit before `end`, with (`$l2`) or without the L2
        // prefetch of the next panel's share and the L1 prefetch ahead (`$l1`): constants
        // in each copy, so that a trip branches only to loop.
        macro_rules! trips {
            ($end:expr, $l2:expr, $l1:expr) => {{
                let n = $end.saturating_sub(kk) / ku;
                // SAFETY: kk ≤ kc, and x and w hold kc steps (asserted): both at most one past
                // their ends.
                let (mut wq, mut xq) = unsafe { (wp.add(kk * ldw), xp.add(kk * ldk)) };
                // Only ever prefetched.
                let mut l2q = next.at.wrapping_add(64 * kk);
                // One pointer per operand and a trip count: the loop's own work is two adds
                // (three with the L2 share) and a count down.
                for _ in 0..n {
                    if $l2 {
                        for j in 0..ku {
                            _mm_prefetch::<_MM_HINT_T1>(l2q.wrapping_add(64 * j));
                        }
                    }
                    if $l1 {
                        let at = wq.wrapping_add(next.l1_ahead * ldw) as *const i8;
                        for j in 0..(ku * row_bytes).div_ceil(64) {
                            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * j));
                        }
                    }
                    for j in 0..ku {
                        step!(wq, xq, j);
                    }
                    // SAFETY: this trip's steps were below kc: at most one past the ends.
                    unsafe {
                        wq = wq.add(ku * ldw);
                        xq = xq.add(ku * ldk);
                    }
                    l2q = l2q.wrapping_add(64 * ku);
                }
                kk += n * ku;
            }};
        }
        if ku > 1 {
            // The trips that start before `next.lines` carry the L2 share, the rest not.
            let l2_end = kc.min(next.lines + ku - 1);
            if next.l1_ahead > 0 {
                trips!(l2_end, true, true);
                trips!(kc, false, true);
            } else {
                trips!(l2_end, true, false);
                trips!(kc, false, false);
            }
        }
        while kk < kc {
            if (P == 2 || P == 3) && std::mem::size_of::<T>() == 4 {
                // The multi-panel decode shapes of 2 and 3 rows on f32 panels: each panel's
                // row `DECODE_AHEAD` steps on into L1 (see `DECODE_AHEAD`).
                // Only ever prefetched (it may point past w): `wrapping_add` keeps it defined.
                for p in 0..P {
                    _mm_prefetch::<_MM_HINT_T0>(
                        wp.wrapping_add((kk + DECODE_AHEAD) * ldw + p * lds) as *const i8,
                    );
                }
            }
            if P == 1 {
                next.prefetch_l2(kk);
                if next.l1_ahead > 0 {
                    _mm_prefetch::<_MM_HINT_T0>(
                        wp.wrapping_add((kk + next.l1_ahead) * ldw) as *const i8
                    );
                }
            }
            // SAFETY: kk < kc: within x and w (asserted).
            let (wq, xq) = unsafe { (wp.add(kk * ldw), xp.add(kk * ldk)) };
            step!(wq, xq, 0);
            kk += 1;
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                // SAFETY: y holds row r's P·16 floats at r·ldy (contract).
                unsafe {
                    let at = y.add(r * ldy + p * NR);
                    _mm256_storeu_ps(at, v[0]);
                    _mm256_storeu_ps(at.add(8), v[1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use half::bf16;
    use std::arch::aarch64::*;

    /// Columns per panel: four q registers.
    const NR: usize = 16;
    /// Blocks per work unit for 1, 2, 3 rows: up to 24 q accumulators in flight (one panel
    /// per unit for more rows).
    const GROUPS: [usize; 5] = [1, 6, 3, 2, 1];

    /// A panel element: f32 as it is, or bf16 widened to f32 in registers.
    pub trait Elem: Copy + Sync {
        /// Loads 16 elements at `p` as four vectors of 4 f32.
        ///
        /// # Safety
        /// `p` must point to 16 readable elements.
        unsafe fn load16(p: *const Self) -> [float32x4_t; 4];
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> [float32x4_t; 4] {
            // SAFETY: per the trait contract; NEON is baseline on aarch64.
            unsafe {
                [
                    vld1q_f32(p),
                    vld1q_f32(p.add(4)),
                    vld1q_f32(p.add(8)),
                    vld1q_f32(p.add(12)),
                ]
            }
        }
    }

    impl Elem for bf16 {
        /// bf16 → f32 is a 16-bit widening shift of the bits.
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> [float32x4_t; 4] {
            // SAFETY: per the trait contract; NEON is baseline on aarch64.
            unsafe {
                let (lo, hi) = (
                    vld1q_u16(p as *const u16),
                    vld1q_u16((p as *const u16).add(8)),
                );
                [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(lo))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(lo)),
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(hi))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(hi)),
                ]
            }
        }
    }

    /// Every (panel group, row block) through the 16-column kernels. For bf16
    /// panels, `x` must hold bf16-rounded values (the caller rounds once).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: Elem>(
        x: &[f32],
        w: &[T],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
    ) {
        assert!(
            w.len() >= n.div_ceil(NR) * (k + 1) * NR,
            "w must hold every panel"
        );
        super::panel_driver(m, n, NR, GROUPS, 0, y, threads, first_col, |b| {
            let (wg, ldw, lds) = super::panel_slice(w, b.panel0, k, NR, 1);
            let next = super::NextPanel::share(w, &b, m, n.div_ceil(NR), lds, k);
            let xs = &x[b.r0 * k..];
            // SAFETY: NEON is part of the aarch64 baseline; the kernel checks x and w; the
            // driver hands out `b.y` valid for the block's rows and panels, written by no one
            // else.
            unsafe {
                block_kernel!(
                    kernel,
                    [(1, 6), (2, 3), (3, 2)],
                    b,
                    k,
                    xs,
                    k,
                    wg,
                    ldw,
                    lds,
                    NR,
                    next
                )
            };
        });
    }

    /// `calls` calls of the 6-row, one-panel kernel on operands that stay in L1 (x 6 KiB,
    /// the panel's 256 rows 16 KiB in f32); the FLOPs done. See
    /// [`super::Projection::l1_microkernel`].
    pub fn l1_calls<T: Elem + Default>(calls: usize) -> f64 {
        // x row-major `[MR][KC]`.
        // SAFETY: NEON is part of the aarch64 baseline; the macro's buffers hold what the
        // kernel reads.
        unsafe { l1_calls!(kernel, T, T::default(), NR, 256, 256, calls) }
    }

    /// `y[R, P·16] = x[R, kc] · w[kc, P·16]` (x's row stride `ldx`, w's `ldw` per k step
    /// and `lds` per panel, y's `ldy`): R×P×4 accumulators, one FMA chain per output.
    ///
    /// # Safety
    /// `y` valid for R rows of P·16 floats at stride `ldy`, touched by no one else during the
    /// call.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    unsafe fn kernel<const R: usize, const P: usize, T: Elem>(
        x: &[f32],
        ldx: usize,
        kc: usize,
        w: &[T],
        ldw: usize,
        lds: usize,
        y: *mut f32,
        ldy: usize,
        next: super::NextPanel,
    ) {
        assert!(x.len() >= (R - 1) * ldx + kc && kc >= 1);
        assert!(w.len() >= (P - 1) * lds + (kc - 1) * ldw + NR);
        let mut acc = [[[vdupq_n_f32(0.0); 4]; P]; R];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for kk in 0..kc {
            if P == 1 {
                next.prefetch_l2(kk);
            }
            let mut b = [[vdupq_n_f32(0.0); 4]; P];
            for (p, bp) in b.iter_mut().enumerate() {
                // SAFETY: w holds block p's kc rows (asserted); kk < kc.
                *bp = unsafe { T::load16(wp.add(kk * ldw + p * lds)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: x holds R rows of kc floats at stride ldx (asserted); r < R, kk < kc.
                let a = vdupq_n_f32(unsafe { *xp.add(r * ldx + kk) });
                for (v, bp) in row.iter_mut().zip(&b) {
                    for (vj, bj) in v.iter_mut().zip(bp) {
                        *vj = vfmaq_f32(*vj, *bj, a);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    // SAFETY: y holds row r's P·16 floats at r·ldy (contract).
                    unsafe { vst1q_f32(y.add(r * ldy + p * NR + 4 * j), *vj) };
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon_bf16 {
    use half::bf16;
    use std::arch::aarch64::*;

    /// Columns per panel: four q registers of 4 f32 (each fed by 4 columns' bf16 pairs).
    const NR: usize = 16;
    /// Blocks per work unit for 1, 2, 3 rows: 12-16 accumulators, the rest of the 32
    /// registers for the panels' weights.
    const GROUPS: [usize; 5] = [1, 3, 2, 1, 1];

    /// Every (panel group, row block) through the BFDOT kernels, x as bf16 pairs (`xp`:
    /// `[m][K/2]`, see `super::with_x_pairs`).
    ///
    /// # Safety
    /// The CPU must support the BF16 extension (BFDOT).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_pairs(
        xp: &[u32],
        w: &[bf16],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
    ) {
        let kp = k.div_ceil(2);
        assert_eq!(xp.len(), m * kp, "x pairs must be [m, K/2]");
        assert!(
            w.len() >= n.div_ceil(NR) * (kp + 1) * NR * 2,
            "w must hold every panel"
        );
        super::panel_driver(m, n, NR, GROUPS, 0, y, threads, first_col, |b| {
            let (wg, ldw, lds) = super::panel_slice(w, b.panel0, kp, NR, 2);
            let next = super::NextPanel::share(w, &b, m, n.div_ceil(NR), lds, kp);
            let xs = &xp[b.r0 * kp..];
            // SAFETY: the caller guarantees BF16; the kernel checks x and w; the driver hands
            // out `b.y` valid for the block's rows and panels, written by no one else.
            unsafe {
                block_kernel!(
                    kernel,
                    [(1, 3), (2, 2)],
                    b,
                    kp,
                    xs,
                    kp,
                    wg,
                    ldw,
                    lds,
                    NR,
                    next
                )
            };
        });
    }

    /// `y[R, P·16]` = the sum over kc k-pairs of BFDOT(w pairs, x pair) (x's row stride
    /// `ldx` pairs, w's `ldw` elements per k pair and `lds` per panel, y's `ldy`): R×P×4
    /// accumulators of 4 f32, one chain per output over the pairs in order. BFDOT sums each
    /// pair's two products before adding them (Arm's BF16 rules), so its sums may differ in
    /// the last bits from the other bf16 kernels; it is checked against the plain product
    /// with the same tolerance.
    ///
    /// # Safety
    /// BF16; `y` valid for R rows of P·16 floats at stride `ldy`, touched by no one else
    /// during the call.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon,bf16")]
    unsafe fn kernel<const R: usize, const P: usize, T: Copy>(
        xp: &[u32],
        ldx: usize,
        kc: usize,
        w: &[T],
        ldw: usize,
        lds: usize,
        y: *mut f32,
        ldy: usize,
        next: super::NextPanel,
    ) {
        // T is bf16 (generic only so that `block_kernel!` can infer it).
        assert!(std::mem::size_of::<T>() == 2);
        assert!(xp.len() >= (R - 1) * ldx + kc && kc >= 1);
        assert!(w.len() >= (P - 1) * lds + (kc - 1) * ldw + NR * 2);
        let mut acc = [[[vdupq_n_f32(0.0); 4]; P]; R];
        let (wp, xq) = (w.as_ptr() as *const u16, xp.as_ptr());
        for p in 0..kc {
            if P == 1 {
                next.prefetch_l2(p);
            }
            let mut b = [[vdupq_n_u16(0); 4]; P];
            for (q, bq) in b.iter_mut().enumerate() {
                let at = p * ldw + q * lds;
                for (j, bj) in bq.iter_mut().enumerate() {
                    // SAFETY: w holds block q's kc pair rows of 32 elements (asserted);
                    // p < kc, j < 4.
                    *bj = unsafe { vld1q_u16(wp.add(at + 8 * j)) };
                }
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: x holds R rows of kc pairs at stride ldx (asserted); r < R, p < kc.
                let pair = unsafe { *xq.add(r * ldx + p) };
                let a = vreinterpretq_u16_u32(vdupq_n_u32(pair));
                for (v, bq) in row.iter_mut().zip(&b) {
                    for (vj, bj) in v.iter_mut().zip(bq) {
                        // SAFETY: BFDOT needs the BF16 extension (this function's target
                        // feature); it reads and writes registers only.
                        unsafe {
                            std::arch::asm!(
                                "bfdot {acc:v}.4s, {w:v}.8h, {x:v}.8h",
                                acc = inout(vreg) *vj,
                                w = in(vreg) *bj,
                                x = in(vreg) a,
                                options(pure, nomem, nostack, preserves_flags)
                            )
                        };
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    // SAFETY: y holds row r's P·16 floats at r·ldy (contract).
                    unsafe { vst1q_f32(y.add(r * ldy + q * NR + 4 * j), *vj) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;
    /// Columns per panel: four zmm.
    const NR: usize = super::NR_MAX;
    /// Blocks per work unit for 1, 2, 3 rows (12 zmm accumulators for one row).
    const GROUPS: [usize; 5] = [1, 3, 1, 1, 1];
    /// Panel rows ahead that a prefill block (one panel) prefetches into L1.
    /// Reading the weights from L2 is what kept this kernel off the peak: with the panel
    /// in L1 (a test with wrong sums) 64 rows × 5120 × 1024 took 2.54 ms on one thread, the
    /// FMA peak; from L2 2.82-2.94 ms; with this prefetch 2.69-2.75 ms (16-48 rows ahead
    /// measured alike; 94% of the peak; f32 on Zen 5). In bf16 the same rows are half
    /// the bytes ahead (4 KiB).
    const PREFETCH_ROWS: usize = 32;

    /// A panel element: f32 as it is, or bf16 widened to f32 in registers.
    pub trait Elem: Copy + Sync {
        /// Loads a panel row (64 elements at `p`) as columns 0..16, 16..32, 32..48 and
        /// 48..64 in f32.
        ///
        /// # Safety
        /// `p` must point to 64 readable elements; the CPU must have AVX-512F.
        unsafe fn load64(p: *const Self) -> [__m512; 4];
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load64(p: *const f32) -> [__m512; 4] {
            // SAFETY: per the trait contract.
            unsafe {
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ]
            }
        }
    }

    impl Elem for bf16 {
        /// The row is packed as two zmm of 32 columns each, columns c and c+16 of a zmm in
        /// one 32-bit lane (low and high half; `super::widen_order`): bf16 → f32 is the bits
        /// moved to the high half, so the first 16 columns of a zmm are its lanes shifted
        /// left by 16 and the next 16 its lanes with the low half cleared: two integer ops
        /// per 16 columns, no shuffle.
        #[inline(always)]
        unsafe fn load64(p: *const bf16) -> [__m512; 4] {
            // SAFETY: per the trait contract (64 bf16: two zmm).
            unsafe {
                let lo = _mm512_loadu_si512(p as *const __m512i);
                let hi = _mm512_loadu_si512(p.add(32) as *const __m512i);
                let high_half = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
                [
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                    _mm512_castsi512_ps(_mm512_and_si512(lo, high_half)),
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
                    _mm512_castsi512_ps(_mm512_and_si512(hi, high_half)),
                ]
            }
        }
    }

    /// Every (panel group, row block) through the 64-column kernels. For bf16 panels the
    /// caller passes x rounded to bf16 ([`super::with_x_rounded`]).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul<T: Elem>(
        x: &[f32],
        w: &[T],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
    ) {
        assert!(
            w.len() >= n.div_ceil(NR) * (k + 1) * NR,
            "w must hold every panel"
        );
        assert_eq!(x.len(), m * k, "x must be [m, k]");
        super::panel_driver(m, n, NR, GROUPS, 2, y, threads, first_col, |b| {
            let (wg, ldw, lds) = super::panel_slice(w, b.panel0, k, NR, 1);
            let next = super::NextPanel::share(w, &b, m, n.div_ceil(NR), lds, k);
            let xb = &x[b.r0 * k..];
            // SAFETY: the caller guarantees AVX-512F; the kernel checks x and w; the driver
            // hands out `b.y` valid for the block's rows and panels, written by no one else.
            unsafe { block_kernel!(kernel, [(1, 3)], b, k, xb, k, wg, ldw, lds, NR, next) };
        });
    }

    /// `calls` calls of the 6-row, one-panel kernel on operands that stay in L1 (x 1.5 KiB,
    /// the panel's 64 rows 16 KiB in f32: within a 32 KiB L1 as well); the FLOPs done. See
    /// [`super::Projection::l1_microkernel`].
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    pub unsafe fn l1_calls<T: Elem + Default>(calls: usize) -> f64 {
        // x row-major `[MR][KC]`.
        // SAFETY: AVX-512F (the caller); the macro's buffers hold what the kernel reads.
        unsafe { l1_calls!(kernel, T, T::default(), NR, 64, 64, calls) }
    }

    /// `y[R, P·64] = x[R, kc] · w[kc, P·64]` (x's row stride `ldx`, w's `ldw` elements per
    /// k step and `lds` per panel, y's `ldy`): R×P×4 zmm accumulators, one broadcast of x
    /// and P panel rows loaded ([`Elem::load64`]) per k, one FMA chain per output over k
    /// in order.
    ///
    /// # Safety
    /// AVX-512F; `y` valid for R rows of P·64 floats at stride `ldy`, touched by no one else
    /// during the call.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const P: usize, T: Elem>(
        x: &[f32],
        ldx: usize,
        kc: usize,
        w: &[T],
        ldw: usize,
        lds: usize,
        y: *mut f32,
        ldy: usize,
        next: super::NextPanel,
    ) {
        assert!(x.len() >= (R - 1) * ldx + kc && kc >= 1);
        assert!(w.len() >= (P - 1) * lds + (kc - 1) * ldw + NR);
        // Cache lines per panel row: 4 in f32, 2 in bf16.
        let lines = NR * std::mem::size_of::<T>() / 64;
        let mut acc = [[[_mm512_setzero_ps(); 4]; P]; R];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for kk in 0..kc {
            if P == 1 {
                next.prefetch_l2(kk);
                // The row PREFETCH_ROWS ahead into L1: see `PREFETCH_ROWS`.
                let at = wp.wrapping_add((kk + PREFETCH_ROWS) * ldw) as *const i8;
                for line in 0..lines {
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
                }
            }
            let mut b = [[_mm512_setzero_ps(); 4]; P];
            for (p, bp) in b.iter_mut().enumerate() {
                // SAFETY: w holds block p's kc rows of NR elements (asserted); kk < kc.
                *bp = unsafe { T::load64(wp.add(kk * ldw + p * lds)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: x holds R rows of kc floats at stride ldx (asserted); r < R, kk < kc.
                let a = _mm512_set1_ps(unsafe { *xp.add(r * ldx + kk) });
                for (v, bp) in row.iter_mut().zip(&b) {
                    for (vj, bj) in v.iter_mut().zip(bp) {
                        *vj = _mm512_fmadd_ps(a, *bj, *vj);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    // SAFETY: y holds row r's P·64 floats at r·ldy (contract).
                    unsafe { _mm512_storeu_ps(y.add(r * ldy + p * NR + 16 * j), *vj) };
                }
            }
        }
    }
}

/// The AMX bf16 kernel: `tdpbf16ps` on 16×16 f32 tiles of y, each step adding the
/// products of a 16-row × 16-pair tile of x (A) and a 16-pair × 16-column tile of a panel
/// (B, which the `[N/64][K/2][64][2]` pairs layout holds as 16 rows of 64 bytes at a stride
/// of 256). A block is 32 rows × 64 columns (one panel) in two halves of 32 columns, each
/// with four accumulator tiles (2 row tiles × 2 column tiles), two A and two B tiles: the
/// eight tile registers. Each output is one chain over the k tiles in order, its value
/// independent of the other rows of the call, so any split of the rows gives the same bits.
/// Per Intel's SDM the instruction adds each pair's two products to the accumulator in turn,
/// treating bf16 denormals as zero and flushing f32 denormal results; its rounding is its
/// own, so the results differ from the `vdpbf16ps` and widening kernels in the last bits.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::AMX_KT as KT;
    use half::bf16;
    use std::arch::asm;

    /// Columns per panel (four column tiles of 16).
    const NR: usize = super::NR_MAX;
    /// Rows per block: two row tiles.
    const MT: usize = 32;
    /// Rows of a full tile.
    const TILE_ROWS: usize = 16;
    /// Bytes per pair row of a panel (64 columns × 2 bf16).
    const LDW: usize = NR * 4;

    /// Asks Linux for the AMX tile data state (a permission per process; the kernel then
    /// gives each thread the larger register save area at its first tile instruction).
    /// True where the CPU has AMX-TILE and AMX-BF16 and the permission was granted.
    #[cfg(target_os = "linux")]
    pub(super) fn request() -> bool {
        // `__cpuid_count` is a safe fn in newer Rust and an unsafe one in 1.89, our
        // rust-version.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; it only reads identification registers
        // (leaf 7 is read only where leaf 0 reports it).
        let leaf = |l: u32| unsafe { std::arch::x86_64::__cpuid_count(l, 0) };
        if leaf(0).eax < 7 {
            return false;
        }
        let edx = leaf(7).edx;
        // AMX-BF16 (bit 22) and AMX-TILE (bit 24).
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: this arch_prctl request only asks for a permission for this process; it
        // reads and writes no memory of ours. A kernel without AMX support returns an error.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }

    /// The 64-byte operand of `ldtilecfg` (palette 1).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        /// Bytes per row of each tile register.
        colsb: [u16; 16],
        /// Rows of each tile register.
        rows: [u8; 16],
    }

    impl TileConfig {
        /// Two row tiles ([`block`]): tmm0, tmm1: y rows of the first row tile (`rows0`),
        /// column tiles a and b; tmm2, tmm3: the second row tile (`rows1`); tmm4, tmm5: x of
        /// the two row tiles; tmm6, tmm7: the panel's column tiles a and b. One (`rows1 =
        /// 0`, [`block_one`]): tmm0-tmm3: y's four column tiles, tmm4: x, tmm5-tmm7: the
        /// panel's column tiles.
        fn new(rows0: usize, rows1: usize) -> Self {
            if rows1 == 0 {
                let mut c = Self::new(TILE_ROWS, TILE_ROWS);
                for t in [0, 1, 2, 3, 4] {
                    c.rows[t] = rows0 as u8;
                }
                c.rows[5] = KT as u8;
                return c;
            }
            let mut c = TileConfig {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            let tiles = [
                (0, rows0),
                (1, rows0),
                (4, rows0),
                (6, KT),
                (7, KT),
                (2, rows1),
                (3, rows1),
                (5, rows1),
            ];
            for (t, rows) in tiles {
                if rows > 0 {
                    c.colsb[t] = 64;
                    c.rows[t] = rows as u8;
                }
            }
            c
        }
    }

    /// `y[rows0 + rows1, 64]` = x's rows (bf16 pairs, `ldx` bytes apart, `steps` tiles of
    /// KT pairs) times one panel (`w`: `steps·KT` pair rows of `LDW` bytes), y's rows
    /// `ldy` bytes apart; `two`: whether there is a second row tile (rows1 > 0; else
    /// [`block_one`] runs).
    ///
    /// # Safety
    /// The tile configuration loaded on this thread is `TileConfig::new(rows0, rows1)`,
    /// `rows1 > 0` exactly when `two`; x is readable for its rows × `steps·KT` pairs, w for
    /// the panel's pair rows, y writable for its rows × 64 floats and touched by no one else.
    unsafe fn block(
        x: *const u8,
        ldx: usize,
        w: *const u8,
        steps: usize,
        y: *mut u8,
        ldy: usize,
        two: bool,
    ) {
        if !two {
            // SAFETY: the contract (with one row tile the configuration is `block_one`'s).
            unsafe { block_one(x, ldx, w, steps, y, ldy) };
            return;
        }
        for half in 0..2 {
            // Columns 32·half .. 32·half + 32: the B tiles start 128 bytes into the pair row.
            let wh = w.wrapping_add(half * 128);
            // SAFETY: tile instructions on configured tiles (the contract); no memory access.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            for s in 0..steps {
                let a0 = x.wrapping_add(s * KT * 4);
                let b0 = wh.wrapping_add(s * KT * LDW);
                // SAFETY: the tiles read lie within x's rows and the panel (the contract):
                // rows of 64 bytes at pair KT·s of x, pair rows KT·s.. of the panel.
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {ldx}*1]",
                        "tileloadd tmm6, [{b0} + {ldw}*1]",
                        "tileloadd tmm7, [{b1} + {ldw}*1]",
                        "tileloadd tmm5, [{a1} + {ldx}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.wrapping_add(TILE_ROWS * ldx),
                        b0 = in(reg) b0,
                        b1 = in(reg) b0.wrapping_add(64),
                        ldx = in(reg) ldx,
                        ldw = in(reg) LDW,
                        options(nostack, readonly),
                    );
                }
            }
            let yh = y.wrapping_add(half * 128);
            // SAFETY: y's rows × these 32 columns are writable (the contract).
            unsafe {
                asm!(
                    "tilestored [{y0} + {ldy}*1], tmm0",
                    "tilestored [{y1} + {ldy}*1], tmm1",
                    y0 = in(reg) yh,
                    y1 = in(reg) yh.wrapping_add(64),
                    ldy = in(reg) ldy,
                    options(nostack),
                );
                let yt = yh.wrapping_add(TILE_ROWS * ldy);
                asm!(
                    "tilestored [{y0} + {ldy}*1], tmm2",
                    "tilestored [{y1} + {ldy}*1], tmm3",
                    y0 = in(reg) yt,
                    y1 = in(reg) yt.wrapping_add(64),
                    ldy = in(reg) ldy,
                    options(nostack),
                );
            }
        }
    }

    /// [`block`] for one row tile (`rows0` ≤ 16 rows: decode steps, short last blocks): all
    /// four column tiles of y at once, so that each k tile's pair rows are read whole and
    /// in order (the panel streams from memory once in a decode step); the fourth column
    /// tile reuses the first's register once its product has read it. Each output gets
    /// the same products in the same order as in [`block`].
    ///
    /// # Safety
    /// As [`block`], with the configuration `TileConfig::new(rows0, 0)` loaded.
    unsafe fn block_one(
        x: *const u8,
        ldx: usize,
        w: *const u8,
        steps: usize,
        y: *mut u8,
        ldy: usize,
    ) {
        // SAFETY: tile instructions on configured tiles (the contract); no memory access.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for s in 0..steps {
            let a0 = x.wrapping_add(s * KT * 4);
            let b0 = w.wrapping_add(s * KT * LDW);
            // SAFETY: the tiles read lie within x's rows and the panel (the contract): rows
            // of 64 bytes at pair KT·s of x, pair rows KT·s.. of the panel, all 4 lines.
            unsafe {
                asm!(
                    "tileloadd tmm4, [{a0} + {ldx}*1]",
                    "tileloadd tmm5, [{b0} + {ldw}*1]",
                    "tileloadd tmm6, [{b1} + {ldw}*1]",
                    "tileloadd tmm7, [{b2} + {ldw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm5, [{b3} + {ldw}*1]",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    a0 = in(reg) a0,
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.wrapping_add(64),
                    b2 = in(reg) b0.wrapping_add(128),
                    b3 = in(reg) b0.wrapping_add(192),
                    ldx = in(reg) ldx,
                    ldw = in(reg) LDW,
                    options(nostack, readonly),
                );
            }
        }
        // SAFETY: y's rows × 64 columns are writable (the contract).
        unsafe {
            asm!(
                "tilestored [{y0} + {ldy}*1], tmm0",
                "tilestored [{y1} + {ldy}*1], tmm1",
                "tilestored [{y2} + {ldy}*1], tmm2",
                "tilestored [{y3} + {ldy}*1], tmm3",
                y0 = in(reg) y,
                y1 = in(reg) y.wrapping_add(64),
                y2 = in(reg) y.wrapping_add(128),
                y3 = in(reg) y.wrapping_add(192),
                ldy = in(reg) ldy,
                options(nostack),
            );
        }
    }

    /// `calls` calls of the two-row-tile block on operands that stay in L1: 32 rows of x
    /// and one panel over 4 k tiles (x 8 KiB, the panel 16 KiB) as the driver lays them
    /// out; the FLOPs done. The kernel's limit with its loads, beside [`chains`]'s peak
    /// without them (see [`super::Projection::l1_microkernel`]).
    ///
    /// # Safety
    /// [`super::amx_ready`] returned true in this process.
    pub(super) unsafe fn l1_calls(calls: usize) -> f64 {
        const STEPS: usize = 4;
        let kp = STEPS * KT;
        let x = crate::alloc::LineAligned::new(MT * kp, 0x3f80_3f80u32);
        let w = crate::alloc::LineAligned::new(kp * NR * 2, bf16::ONE);
        let mut y = crate::alloc::LineAligned::new(MT * NR, 0.0f32);
        let cfg = TileConfig::new(TILE_ROWS, TILE_ROWS);
        // SAFETY: AMX is granted (the caller); a valid configuration for the blocks below,
        // whose operands are the buffers above (32 rows of kp pairs, kp pair rows of the
        // panel, 32 rows of 64 floats), then the tile state released.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
            for _ in 0..calls {
                let xp = std::hint::black_box(x.as_slice()).as_ptr() as *const u8;
                block(
                    xp,
                    kp * 4,
                    w.as_slice().as_ptr() as *const u8,
                    STEPS,
                    y.as_mut_slice().as_mut_ptr() as *mut u8,
                    NR * 4,
                    true,
                );
                std::hint::black_box(y.as_mut_slice());
            }
            asm!("tilerelease", options(nostack, nomem));
        }
        (2 * MT * NR * 2 * kp * calls) as f64
    }

    /// `iters` steps of four independent `tdpbf16ps` chains on full tiles, with no loads
    /// (the operand tiles hold zeros): the AMX peak of one core.
    ///
    /// # Safety
    /// [`super::amx_ready`] returned true in this process.
    pub(super) unsafe fn chains(iters: usize) {
        let cfg = TileConfig::new(TILE_ROWS, TILE_ROWS);
        // SAFETY: AMX is granted (the caller); a valid configuration, then tile instructions
        // on the tiles it configures, which touch no memory.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            for _ in 0..iters {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                );
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// `y[m, n]` = x pairs (`xp`: `[m][K/2]`, see `super::with_x_pairs`) times the panels
    /// (`[N/64][K'/2 + 1][64][2]`, K' = K padded to whole tiles), on `threads` threads: a
    /// work unit is one panel over all rows, in blocks of 32 rows, the panel's weights read
    /// from memory once per call; units from the one holding column `first_col`.
    ///
    /// # Safety
    /// [`super::amx_ready`] returned true in this process.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_pairs(
        xp: &[u32],
        w: &[bf16],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
    ) {
        let kp = k.div_ceil(2);
        let kpad = kp.div_ceil(KT) * KT;
        let panels = n.div_ceil(NR);
        // Elements per panel: kpad pair rows and one of padding, 64 columns × 2.
        let lds = (kpad + 1) * NR * 2;
        assert_eq!(xp.len(), m * kp, "x pairs must be [m, K/2]");
        assert!(w.len() >= panels * lds, "w must hold every panel");
        assert_eq!(y.len(), m * n, "y must be [m, n]");
        if m == 0 {
            return;
        }
        // x's rows padded with zero pairs to whole tiles where K/2 is not a multiple of KT.
        let padded: Vec<u32>;
        let xs: &[u32] = if kpad == kp {
            xp
        } else {
            let mut v = vec![0u32; m * kpad];
            for (dst, src) in v.chunks_exact_mut(kpad).zip(xp.chunks_exact(kp)) {
                dst[..kp].copy_from_slice(src);
            }
            padded = v;
            &padded
        };
        let (xaddr, yaddr, waddr) = (
            xs.as_ptr() as usize,
            y.as_mut_ptr() as usize,
            w.as_ptr() as usize,
        );
        let (ldx, ldy, steps) = (kpad * 4, n * 4, kpad / KT);
        let start = (first_col / NR).min(panels.saturating_sub(1));
        super::super::fanout::for_each_unit(panels, threads, &|u| {
            let panel = (u + start) % panels;
            let (c0, cols) = (panel * NR, NR.min(n - panel * NR));
            let wp = (waddr as *const bf16).wrapping_add(panel * lds) as *const u8;
            let mut loaded = None;
            let mut r0 = 0;
            while r0 < m {
                let mt = (m - r0).min(MT);
                let rows = (mt.min(TILE_ROWS), mt.saturating_sub(TILE_ROWS));
                if loaded != Some(rows) {
                    let cfg = TileConfig::new(rows.0, rows.1);
                    // SAFETY: AMX is granted (the caller); the operand is a valid palette-1
                    // configuration of 64 bytes.
                    unsafe {
                        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly))
                    };
                    loaded = Some(rows);
                }
                let xr = (xaddr as *const u32).wrapping_add(r0 * kpad) as *const u8;
                if cols == NR {
                    let yr = (yaddr as *mut f32).wrapping_add(r0 * n + c0) as *mut u8;
                    // SAFETY: the configuration of `rows` is loaded; x holds rows r0..r0+mt
                    // of kpad pairs, the panel kpad pair rows; y is [m, n] (asserted) and this
                    // unit alone writes columns c0..c0+64 of these rows.
                    unsafe { block(xr, ldx, wp, steps, yr, ldy, rows.1 > 0) };
                } else {
                    // The column tail: the block into `tail`, then its valid columns.
                    let mut tail = [0f32; MT * NR];
                    let tp = tail.as_mut_ptr() as *mut u8;
                    // SAFETY: as above, y replaced by `tail` (MT rows of 64 floats).
                    unsafe { block(xr, ldx, wp, steps, tp, NR * 4, rows.1 > 0) };
                    // SAFETY: y is [m, n] and r0 + mt <= m; this unit alone writes columns
                    // c0..c0+cols of its rows.
                    unsafe { super::copy_cols(&tail, NR, mt, yaddr as *mut f32, n, r0, c0, cols) };
                }
                r0 += mt;
            }
            // SAFETY: releases this thread's tile state (configured above); no memory access.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod bf16_avx512 {
    use half::bf16;
    use std::arch::x86_64::*;
    /// Columns per panel: four zmm of bf16 pairs.
    const NR: usize = super::NR_MAX;
    /// Blocks per work unit for 1, 2, 3 rows (12 zmm accumulators for one row).
    const GROUPS: [usize; 5] = [1, 3, 1, 1, 1];
    /// Pair rows (256 B each) ahead that a prefill block prefetches into L1, as in the f32
    /// kernel (here within the noise: 1.34-1.41 against 1.36-1.48 ms for 64 rows).
    const PREFETCH_ROWS: usize = 32;

    /// Every (panel group, row block) through the 64-column kernels, x as bf16 pairs (`xp`:
    /// `[m][K/2]`, see `super::with_x_pairs`).
    ///
    /// # Safety
    /// The CPU must support AVX512F and AVX512-BF16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_pairs(
        xp: &[u32],
        w: &[bf16],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        first_col: usize,
    ) {
        let kp = k.div_ceil(2);
        assert_eq!(xp.len(), m * kp, "x pairs must be [m, K/2]");
        assert!(
            w.len() >= n.div_ceil(NR) * (kp + 1) * NR * 2,
            "w must hold every panel"
        );
        super::panel_driver(m, n, NR, GROUPS, 3, y, threads, first_col, |b| {
            let (wg, ldw, lds) = super::panel_slice(w, b.panel0, kp, NR, 2);
            let next = super::NextPanel::share(w, &b, m, n.div_ceil(NR), lds, kp);
            let xs = &xp[b.r0 * kp..];
            // SAFETY: the caller guarantees AVX512F + AVX512-BF16; the kernel checks x and w;
            // the driver hands out `b.y` valid for the block's rows and panels, written by no
            // one else.
            unsafe { block_kernel!(kernel, [(1, 3)], b, kp, xs, kp, wg, ldw, lds, NR, next) };
        });
    }

    /// See [`super::bf16_dot_chains`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_chains(iters: usize) -> f32 {
        let ones = _mm512_set1_epi32(0x3f80_3f80);
        let (a, b) = (
            std::mem::transmute::<__m512i, __m512bh>(ones),
            std::mem::transmute::<__m512i, __m512bh>(ones),
        );
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        let mut t = _mm512_setzero_ps();
        for v in acc {
            t = _mm512_add_ps(t, v);
        }
        _mm512_reduce_add_ps(t)
    }

    /// `y[R, P·64]` = the sum over kc k-pairs of dpbf16(x pair, w pairs) (x's row stride
    /// `ldx` pairs, w's `ldw` elements per k pair and `lds` per panel, y's `ldy`): R×P×4 zmm
    /// accumulators.
    ///
    /// # Safety
    /// AVX512F + AVX512-BF16; `y` valid for R rows of P·64 floats at stride `ldy`, touched
    /// by no one else during the call.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize, const P: usize, T: Copy>(
        xp: &[u32],
        ldx: usize,
        kc: usize,
        w: &[T],
        ldw: usize,
        lds: usize,
        y: *mut f32,
        ldy: usize,
        next: super::NextPanel,
    ) {
        // T is bf16 (generic only so that `block_kernel!` can infer it).
        assert!(std::mem::size_of::<T>() == 2);
        assert!(xp.len() >= (R - 1) * ldx + kc && kc >= 1);
        assert!(w.len() >= (P - 1) * lds + (kc - 1) * ldw + NR * 2);
        let mut acc = [[[_mm512_setzero_ps(); 4]; P]; R];
        // One zmm = 16 columns × a bf16 pair = 32 elements.
        let (wp, xq) = (w.as_ptr() as *const __m512i, xp.as_ptr());
        for p in 0..kc {
            if P == 1 {
                next.prefetch_l2(p);
                // The pair row PREFETCH_ROWS ahead (4 lines) into L1, as in the f32 kernel.
                let at = w.as_ptr().wrapping_add((p + PREFETCH_ROWS) * ldw) as *const i8;
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
                }
            }
            let mut b = [[_mm512_setzero_si512(); 4]; P];
            for (q, bq) in b.iter_mut().enumerate() {
                let at = (p * ldw + q * lds) / 32;
                // SAFETY: w holds block q's kc pair rows (asserted); p < kc.
                *bq = unsafe {
                    [
                        _mm512_loadu_si512(wp.add(at)),
                        _mm512_loadu_si512(wp.add(at + 1)),
                        _mm512_loadu_si512(wp.add(at + 2)),
                        _mm512_loadu_si512(wp.add(at + 3)),
                    ]
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: x holds R rows of kc pairs at stride ldx (asserted); r < R, p < kc.
                let pair = unsafe { *xq.add(r * ldx + p) };
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32));
                for (v, bq) in row.iter_mut().zip(&b) {
                    for (vj, bj) in v.iter_mut().zip(bq) {
                        let bw = std::mem::transmute::<__m512i, __m512bh>(*bj);
                        *vj = _mm512_dpbf16_ps(*vj, a, bw);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    // SAFETY: y holds row r's P·64 floats at r·ldy (contract).
                    unsafe { _mm512_storeu_ps(y.add(r * ldy + q * NR + 16 * j), *vj) };
                }
            }
        }
    }
}

/// Four independent `tdpbf16ps` tile chains (16 × 16 outputs, 32 products each) for `iters`
/// steps, with no loads: the AMX peak of one core, the yardstick of the AMX kernel. The
/// FLOPs done (`iters`·4·16·16·32·2), or `None` where [`amx_ready`] is false.
pub fn amx_chains(iters: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if amx_ready() {
        // SAFETY: `amx_ready()`.
        unsafe { amx::chains(iters) };
        return Some((iters * 4 * 16 * 16 * 32 * 2) as f64);
    }
    let _ = iters;
    None
}

/// Twelve independent 16-lane `vdpbf16ps` chains for `iters` steps (12·16·4·iters FLOPs:
/// each lane does two multiply-adds): the bf16 dot peak of one core, the yardstick of the
/// AVX512-BF16 kernel. `None` where the CPU has no AVX512-BF16.
pub fn bf16_dot_chains(iters: usize) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512bf16() {
        // SAFETY: the CPU reports AVX512F and AVX512-BF16.
        return Some(unsafe { bf16_avx512::dot_chains(iters) });
    }
    let _ = iters;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free bf16 rounding equals the `half` crate's on every class of value:
    /// ties either way, denormals, the largest finite values (rounding to infinity),
    /// infinities and NaNs (signalling ones quieted), and a sweep of bit patterns.
    #[test]
    fn bf16_bits_equals_half() {
        let mut cases: Vec<u32> = vec![
            0,
            0x8000_0000,
            1,
            0x8000,
            0x8001,
            0x1_8000,
            0x1_7fff,
            0x007f_ffff,
            0x0080_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffc0_1234,
            0x7fbf_ffff,
        ];
        let mut s = 0x9e37_79b9u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            cases.push(s);
        }
        for b in cases {
            let x = f32::from_bits(b);
            assert_eq!(
                bf16_bits(x),
                u32::from(bf16::from_f32(x).to_bits()),
                "{b:#010x}"
            );
        }
    }

    fn data(n: usize, s: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ s) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Plain y = x·Wᵀ for stacked PyTorch-layout matrices.
    fn plain(x: &[f32], mats: &[&[f32]], k: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let n: usize = mats.iter().map(|m| m.len() / k).sum();
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            let mut col = 0;
            for m in mats {
                for o in 0..m.len() / k {
                    y[r * n + col] =
                        crate::ops::dot(&x[r * k..(r + 1) * k], &m[o * k..(o + 1) * k]);
                    col += 1;
                }
            }
        }
        y
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max)
    }

    /// Every packing of `mats` in `dtype` that this CPU runs, named by its kernel: each of
    /// our kernels, the `gemm` fallback with `fallback`, and in bf16 the widening kernels
    /// also where the CPU's bf16 dot instruction or AMX is what `pack` picks (so that they
    /// are tested on CPUs with AVX512-BF16, AMX or Arm BF16 as well).
    fn packings(
        mats: &[&[f32]],
        k: usize,
        dtype: DType,
        fallback: bool,
    ) -> Vec<(String, Projection)> {
        let mut v = Vec::new();
        if fallback {
            v.push(Projection::pack_for(mats, k, dtype, None));
        }
        for kernel in PanelKernel::all_supported() {
            // AMX and the dot kernel wherever the CPU has them (chosen by default or not),
            // and the widening kernel too: each once.
            for via in [Bf16Via::Widen, Bf16Via::Dot, Bf16Via::Amx] {
                let p = Projection::pack_for_via(mats, k, dtype, Some(kernel), via);
                if !v
                    .iter()
                    .any(|q: &Projection| q.kernel_name() == p.kernel_name())
                {
                    v.push(p);
                }
            }
        }
        v.into_iter()
            .map(|p| (p.kernel_name().to_string(), p))
            .collect()
    }

    #[test]
    fn l1_microkernel_runs_each_own_kernel_and_counts_its_flops() {
        let k = 64;
        for kernel in PanelKernel::all_supported() {
            let w = vec![0.0f32; kernel.nr() * k];
            // bf16 three times: AMX and the dot kernel where the CPU has them, and the
            // widening kernel.
            for (dtype, via) in [
                (DType::F32, Bf16Via::Dot),
                (DType::Bf16, Bf16Via::Amx),
                (DType::Bf16, Bf16Via::Dot),
                (DType::Bf16, Bf16Via::Widen),
            ] {
                let p = Projection::pack_for_via(&[&w], k, dtype, Some(kernel), via);
                if p.kernel_name().contains("tdpbf16ps") {
                    // AMX: one block of 32 rows × 64 columns over 4 tiles of 32 k.
                    let one = p.l1_microkernel(1).expect("the AMX block");
                    assert_eq!(one, (2 * 32 * 64 * 128) as f64);
                    assert_eq!(p.l1_microkernel(3), Some(3.0 * one));
                    continue;
                }
                // The bf16 dot kernels (pairs) have no f32 microkernel to time.
                if p.takes_pairs() {
                    assert_eq!(p.l1_microkernel(1), None);
                    continue;
                }
                let one = p.l1_microkernel(1).expect("an own kernel");
                // 2 FLOPs per FMA, MR rows × one panel per k step.
                assert_eq!(
                    one % (2 * MR * kernel.nr()) as f64,
                    0.0,
                    "{kernel:?} {dtype:?}"
                );
                assert_eq!(p.l1_microkernel(3), Some(3.0 * one), "{kernel:?} {dtype:?}");
            }
        }
        let fallback = Projection::pack_for(&[&vec![0.0f32; 16 * k]], k, DType::F32, None);
        assert_eq!(fallback.l1_microkernel(1), None);
    }

    #[test]
    fn default_tile_is_256_rows_for_avx2_panels_and_64_elsewhere() {
        let k = 64;
        for kernel in PanelKernel::all_supported() {
            let w = vec![0.0f32; kernel.nr() * k];
            for (dtype, via) in [
                (DType::F32, Bf16Via::Dot),
                (DType::Bf16, Bf16Via::Amx),
                (DType::Bf16, Bf16Via::Dot),
                (DType::Bf16, Bf16Via::Widen),
            ] {
                let p = Projection::pack_for_via(&[&w], k, dtype, Some(kernel), via);
                // By the kernel packed (the AVX2 panels, f32 or bf16 widened).
                let want = if p.kernel_name().starts_with("avx2") {
                    256
                } else {
                    64
                };
                assert_eq!(p.default_tile_rows(), want, "{kernel:?} {dtype:?}");
            }
        }
        let fallback = Projection::pack_for(&[&vec![0.0f32; 16 * k]], k, DType::F32, None);
        assert_eq!(fallback.default_tile_rows(), 64);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn l1d_size_is_read_as_a_plausible_byte_count() {
        // Every x86-64 CPU of the last two decades reports its L1d through one of the two
        // leaves; a misread field (KiB taken for bytes, a wrong shift) lands far outside.
        if let Some(b) = avx2::l1d_bytes() {
            assert!((8 << 10..=1 << 20).contains(&b), "L1d of {b} bytes");
            assert_eq!(b % 1024, 0, "L1d of {b} bytes");
        }
    }

    /// Every kernel this CPU runs (and the `gemm` fallback) against the plain product, with
    /// tails in M (not a multiple of 6), N (not of 16 or 64) and K (odd).
    #[test]
    fn a_kernel_this_cpu_lacks_is_refused_when_packed() {
        // One kernel that never runs here: NEON on x86-64, AVX2 elsewhere.
        let foreign = if cfg!(target_arch = "x86_64") {
            PanelKernel::Neon
        } else {
            PanelKernel::Avx2
        };
        assert!(!foreign.runs_here());
        let w = data(16 * 8, 1);
        for dtype in [DType::F32, DType::Bf16] {
            let packed =
                std::panic::catch_unwind(|| Projection::pack_for(&[&w], 8, dtype, Some(foreign)));
            assert!(packed.is_err(), "{foreign:?} {dtype:?} was packed");
        }
        for kernel in PanelKernel::all_supported() {
            assert!(kernel.runs_here(), "{kernel:?}");
        }
    }

    #[test]
    fn matmul_checks_its_lengths_without_wrapping_and_takes_zero_rows() {
        let (k, n) = (8, 40);
        let w = data(n * k, 2);
        let mut kernels: Vec<Option<PanelKernel>> = vec![None];
        kernels.extend(PanelKernel::all_supported().into_iter().map(Some));
        for kernel in kernels {
            for dtype in [DType::F32, DType::Bf16] {
                let p = Projection::pack_for(&[&w], k, dtype, kernel);
                // Zero rows: nothing to do (the `gemm` fallback's row chunks were 0 long).
                p.matmul(&[], 0, &mut [], 2);
                // 2^61 rows: rows·K and rows·N wrap to 0, the lengths of the empty slices. The
                // length check itself refuses them (not something deeper that happens to).
                let message = |r: std::thread::Result<()>| -> String {
                    let e = r.expect_err("huge rows accepted");
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                };
                let huge = std::panic::catch_unwind(|| p.matmul(&[], 1 << 61, &mut [], 1));
                let m = message(huge);
                assert!(
                    m.contains("x must be [rows, K]"),
                    "{kernel:?} {dtype:?}: {m}"
                );
                if p.takes_pairs() {
                    p.matmul_pairs(&[], 0, &mut [], 2);
                    let huge =
                        std::panic::catch_unwind(|| p.matmul_pairs(&[], 1 << 62, &mut [], 1));
                    let m = message(huge);
                    assert!(m.contains("x pairs must be"), "{kernel:?} {dtype:?}: {m}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_plain_product() {
        // k below, at and past the AVX2 prefill trip of 4 steps (and 2 mod 4).
        for k in [1, 2, 4, 6, 37] {
            matches_plain_product(k);
        }
    }

    /// AVX2 f32 panels of k ≥ 1536 steps go one per unit, and calls of 7 to 12 rows whose
    /// second row block would be short share their rows evenly (`block_rows`), x packed
    /// alike.
    #[test]
    fn large_f32_panels_in_even_row_blocks_match_plain_product() {
        for rows in [7, 9, 10] {
            matches_plain_product_rows(1536, rows);
        }
    }

    fn matches_plain_product(k: usize) {
        // 13, 14 and 32 rows: full and partial row blocks, a short last one sharing the
        // rows of the last two (`block_rows`); 7 to 12: two row blocks, in units of several
        // panels (AVX2's f32 `groups[4]`: the second block of two rows and of one row runs
        // two and four panels at once) or, where the second would be short, as two even
        // blocks (AVX2 bf16 panels, AVX-512); the last unit partial in columns.
        for rows in [32, 14, 13, 12, 11, 10, 9, 8, 7] {
            matches_plain_product_rows(k, rows);
        }
    }

    fn matches_plain_product_rows(k: usize, rows: usize) {
        let a = data(40 * k, 1);
        let b = data(50 * k, 2);
        let x = data(rows * k, 3);
        let want = plain(&x, &[&a, &b], k);
        let r = |v: &[f32]| -> Vec<f32> { v.iter().map(|&t| bf16::from_f32(t).to_f32()).collect() };
        let want_bf16 = plain(&r(&x), &[&r(&a), &r(&b)], k);
        for (dtype, want, tol) in [(DType::F32, &want, 1e-5), (DType::Bf16, &want_bf16, 1e-4)] {
            // Past 64 steps the tolerance is relative to the largest output: at k = 1536
            // this data sums to about 500, whose f32 rounding is about 1e-4.
            let tol = if k > 64 {
                tol * want.iter().fold(1.0f32, |m, v| m.max(v.abs()))
            } else {
                tol
            };
            for (kernel, p) in packings(&[&a, &b], k, dtype, true) {
                assert_eq!(p.uses_own_kernel(), !kernel.starts_with("gemm"));
                for threads in [1, 2, 3] {
                    let mut y = vec![0.0; rows * 90];
                    p.matmul(&x, rows, &mut y, threads);
                    let err = max_diff(&y, want);
                    assert!(
                        err < tol,
                        "{kernel} k {k} rows {rows} threads {threads}: {err}"
                    );
                }
            }
        }
    }

    /// Packed panels start on a cache line, also after a clone (a cloned `Vec` may sit at
    /// another offset from a line).
    #[test]
    fn panels_are_line_aligned_after_clone() {
        let a = data(40 * 37, 9);
        for dtype in [DType::F32, DType::Bf16] {
            for (kernel, p) in packings(&[&a], 37, dtype, false) {
                for q in [&p, &p.clone()] {
                    let addr = match &q.packed {
                        Packed::F32Panels(_, v) => v.as_slice().as_ptr() as usize,
                        Packed::Bf16Panels(_, v)
                        | Packed::Bf16Pairs(v)
                        | Packed::Bf16DotPairs(v)
                        | Packed::Bf16AmxPairs(v) => v.as_slice().as_ptr() as usize,
                        _ => unreachable!("own kernels pack panels"),
                    };
                    assert_eq!(addr % 64, 0, "{kernel}");
                }
                let c = p.clone();
                let (mut y1, mut y2) = (vec![0.0; 3 * 40], vec![0.0; 3 * 40]);
                let x = data(3 * 37, 10);
                p.matmul(&x, 3, &mut y1, 1);
                c.matmul(&x, 3, &mut y2, 1);
                assert!(y1 == y2, "{kernel}: clone differs");
            }
        }
    }

    /// bf16 runs on the CPU's bf16 dot instruction where it has one (Arm BF16: BFDOT) or
    /// where it pays (AVX512-BF16, [`avx512_bf16_dot_pays`]), else widens in registers; so
    /// the run under an emulated Arm CPU with BF16 (CI) has checked the BFDOT kernel in
    /// `every_kernel_matches_plain_product`.
    #[test]
    fn bf16_uses_the_dot_instruction_where_the_cpu_has_one() {
        let a = data(64 * 32, 7);
        // AMX first on AVX-512 where the process may use it, unless ENGRAM_BF16_DOT names
        // another kernel.
        let amx = amx_ready() && std::env::var("ENGRAM_BF16_DOT").map_or(true, |v| v == "amx");
        for kernel in PanelKernel::all_supported() {
            let name = Projection::pack_for(&[&a], 32, DType::Bf16, Some(kernel)).kernel_name();
            let (tiles, dot) = match kernel {
                PanelKernel::Avx512 => (amx, !amx && avx512_bf16_dot_pays()),
                PanelKernel::Neon => (false, has_neon_bf16()),
                PanelKernel::Avx2 => (false, false),
            };
            assert_eq!(name.contains("tdpbf16ps"), tiles, "{kernel:?}: {name}");
            assert_eq!(
                name.contains("vdpbf16ps") || name.contains("bfdot"),
                dot,
                "{kernel:?}: {name}"
            );
        }
    }

    /// The AMX kernel where this process may use it (else its packing falls back to the dot
    /// or widening kernel): against the plain product on bf16-rounded operands with rows in
    /// several blocks of 32 and a short last one (one and two row tiles), K padded to whole
    /// tiles or not, a partial last panel; any split of the rows and any thread count give
    /// the bits of one call, and x handed over as pairs gives the bits of x in f32.
    #[test]
    fn amx_matches_plain_product_in_every_block_shape() {
        let n = 90;
        for k in [1, 37, 64, 301] {
            let a = data(n * k, 21);
            // AMX only with the AVX-512 kernel family: with any other kernel this CPU runs
            // (and with AVX-512 where AMX is missing or refused) the packing falls back.
            for kernel in PanelKernel::all_supported() {
                let p = Projection::pack_for_via(&[&a], k, DType::Bf16, Some(kernel), Bf16Via::Amx);
                let tiles = kernel == PanelKernel::Avx512 && amx_ready();
                assert_eq!(p.kernel_name().contains("tdpbf16ps"), tiles, "{kernel:?}");
            }
            if !(PanelKernel::Avx512.runs_here() && amx_ready()) {
                continue;
            }
            let p = Projection::pack_for_via(
                &[&a],
                k,
                DType::Bf16,
                Some(PanelKernel::Avx512),
                Bf16Via::Amx,
            );
            assert_eq!(p.kernel_name(), "amx-bf16 32x64 (tdpbf16ps)");
            assert!(p.takes_pairs() && p.uses_own_kernel());
            let r =
                |v: &[f32]| -> Vec<f32> { v.iter().map(|&t| bf16::from_f32(t).to_f32()).collect() };
            let rows = 70;
            let x = data(rows * k, 22);
            let want = plain(&r(&x), &[&r(&a)], k);
            let tol = 1e-4 * want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let mut whole = vec![f32::NAN; rows * n];
            p.matmul(&x, rows, &mut whole, 1);
            let err = max_diff(&whole, &want);
            assert!(err < tol, "k {k}: {err}");
            for threads in [2, 3] {
                let mut y = vec![f32::NAN; rows * n];
                p.matmul(&x, rows, &mut y, threads);
                assert!(y == whole, "k {k}, {threads} threads");
            }
            // 1 row, one row tile (16), two (17, 32), a block and a bit (33, 48).
            for split in [1, 5, 16, 17, 32, 33, 48] {
                let mut r0 = 0;
                while r0 < rows {
                    let m = split.min(rows - r0);
                    let mut part = vec![f32::NAN; m * n];
                    p.matmul(&x[r0 * k..(r0 + m) * k], m, &mut part, 1);
                    assert!(
                        part == whole[r0 * n..(r0 + m) * n],
                        "k {k}: rows {r0}..{}",
                        r0 + m
                    );
                    r0 += m;
                }
            }
            with_x_pairs(&x, rows, k, |xp| {
                let mut y = vec![f32::NAN; rows * n];
                p.matmul_pairs(xp, rows, &mut y, 2);
                assert!(y == whole, "k {k}: pairs");
            });
        }
    }

    /// A call fans out inside rayon's pool (a parallel iterator) or from a thread outside
    /// it (the caller and pool workers sharing the units): either way every output is
    /// written (y starts as NaN) with the bits of the one-thread call.
    #[test]
    fn fan_out_inside_and_outside_the_pool_agree() {
        let k = 67;
        let a = data(250 * k, 11);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for dtype in [DType::F32, DType::Bf16] {
            for (kernel, p) in packings(&[&a], k, dtype, false) {
                for rows in [1, 2, 3, 8] {
                    let x = data(rows * k, 12);
                    let call = |threads: usize| {
                        let mut y = vec![f32::NAN; rows * 250];
                        p.matmul(&x, rows, &mut y, threads);
                        y
                    };
                    let one = call(1);
                    assert!(one.iter().all(|v| v.is_finite()), "{kernel}");
                    for threads in [2, 3] {
                        let outside = call(threads);
                        let inside = pool.install(|| call(threads));
                        for (how, y) in [("outside", &outside), ("inside", &inside)] {
                            let same = y.iter().zip(&one).all(|(u, v)| u.to_bits() == v.to_bits());
                            assert!(
                                same,
                                "{kernel} rows {rows} threads {threads} {how} the pool"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A call run from any column's panel ([`Projection::run_from_col`]) writes every
    /// output (y starts as NaN) with the bits of the call run from the first, on one thread
    /// and on several, for prefill and decode shapes.
    #[test]
    fn any_first_column_gives_the_same_bits() {
        let k = 45;
        let a = data(250 * k, 13);
        for dtype in [DType::F32, DType::Bf16] {
            for (kernel, p) in packings(&[&a], k, dtype, true) {
                for rows in [1, 3, 8, 13] {
                    let x = data(rows * k, 14);
                    let mut want = vec![f32::NAN; rows * 250];
                    p.matmul(&x, rows, &mut want, 1);
                    assert!(want.iter().all(|v| v.is_finite()));
                    for col in [1, 63, 64, 100, 249, 250, 10_000] {
                        let q = p.clone().run_from_col(col);
                        for threads in [1, 2] {
                            let mut y = vec![f32::NAN; rows * 250];
                            q.matmul(&x, rows, &mut y, threads);
                            let same = y.iter().zip(&want).all(|(u, v)| u.to_bits() == v.to_bits());
                            assert!(
                                same,
                                "{kernel} rows {rows} from column {col}, {threads} threads"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Our kernels sum each output in one FMA chain over k: any row split gives the same
    /// bits; f32 panels give the same bits on every ISA, and so do the widening bf16
    /// kernels, which give the bits of the f32 kernels on bf16-rounded x and weights.
    #[test]
    fn kernels_are_split_invariant_and_agree_bit_for_bit() {
        let (k, rows) = (301, 17);
        // 250 columns: full and partial groups of panels for the decode shapes (1-3 rows),
        // and for 4-12 rows on AVX2 four units of four panels, the last panel partial.
        let a = data(250 * k, 5);
        let x = data(rows * k, 6);
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&t| bf16::from_f32(t).to_f32()).collect() };
        let (ar, xr) = (round(&a), round(&x));
        // The f32 results, then those of the widening bf16 kernels with the f32 kernels on
        // rounded operands.
        let mut f32_results: Vec<(String, Vec<f32>)> = Vec::new();
        let mut widened: Vec<(String, Vec<f32>)> = Vec::new();
        for p in PanelKernel::all_supported()
            .into_iter()
            .map(|kr| Projection::pack_for(&[&ar], k, DType::F32, Some(kr)))
        {
            let mut y = vec![0.0; rows * 250];
            p.matmul(&xr, rows, &mut y, 2);
            widened.push((format!("{} on rounded operands", p.kernel_name()), y));
        }
        for dtype in [DType::F32, DType::Bf16] {
            for (kernel, p) in packings(&[&a], k, dtype, false) {
                let mut whole = vec![0.0; rows * 250];
                p.matmul(&x, rows, &mut whole, 2);
                // 1-3 rows: the multi-panel shapes; 4-12: units of several panels on
                // AVX2 f32, two row blocks shared evenly where the second would be short
                // elsewhere; 13 and more: one panel per unit (13 and 14: a short last
                // block shared with the one before).
                for split in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14] {
                    let mut r0 = 0;
                    while r0 < rows {
                        let m = split.min(rows - r0);
                        let mut part = vec![0.0; m * 250];
                        p.matmul(&x[r0 * k..(r0 + m) * k], m, &mut part, 1);
                        assert!(
                            part == whole[r0 * 250..(r0 + m) * 250],
                            "{kernel}: rows {r0}..{} differ from one shot",
                            r0 + m
                        );
                        r0 += m;
                    }
                }
                if dtype == DType::F32 {
                    f32_results.push((kernel, whole));
                } else if kernel.contains("widened") {
                    widened.push((kernel, whole));
                }
            }
        }
        // One widening bf16 kernel per f32 kernel (none where this CPU runs none of ours).
        assert_eq!(
            widened.len(),
            2 * f32_results.len(),
            "a widening kernel did not run"
        );
        for group in [&f32_results, &widened] {
            for w in group.windows(2) {
                assert!(w[0].1 == w[1].1, "{} and {} differ", w[0].0, w[1].0);
            }
        }
    }
}
