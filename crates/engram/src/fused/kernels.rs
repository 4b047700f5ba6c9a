//! Fused per-token kernels (reference §5-6), written once as plain loops over lanes and
//! compiled for each instruction set; [`Isa::detect`] picks one at run time, once.
//!
//! Every kernel here has a plain counterpart in [`crate::ops`]; `tests` compare the two.

use crate::ops::{GATE_CLAMP, RMS_EPS_CONV, RMS_EPS_DEFAULT};
use std::sync::OnceLock;

/// Instruction set the kernels were compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F (+ FMA).
    Avx512,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// Whatever the target's baseline offers (NEON on aarch64, SSE2 on x86-64).
    Generic,
}

impl Isa {
    /// Detected once per process and cached (`ENGRAM_ISA=generic|avx2|avx512` lowers it).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            let forced = std::env::var("ENGRAM_ISA").ok();
            match forced.as_deref() {
                Some("generic") => Isa::Generic,
                Some("avx2") if best != Isa::Generic => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Whether this CPU runs `self` (whatever `ENGRAM_ISA` says). The kernels check it on
    /// every call, so that an `Isa` a caller names for a CPU without it runs the portable
    /// build instead of instructions the CPU lacks.
    #[inline]
    pub fn runs_here(self) -> bool {
        static BEST: OnceLock<Isa> = OnceLock::new();
        let best = *BEST.get_or_init(Self::best_supported);
        match self {
            Isa::Generic => true,
            Isa::Avx2 => best != Isa::Generic,
            Isa::Avx512 => best == Isa::Avx512,
        }
    }

    fn best_supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // The AVX-512 builds are compiled with AVX2 and FMA enabled as well.
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }

    /// Every ISA this CPU can run (for tests that must cover each).
    pub fn all_supported() -> Vec<Isa> {
        #[allow(unused_mut)] // only x86-64 adds more
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            // The AVX-512 builds are compiled with AVX2 and FMA enabled as well.
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

/// Defines `$name(isa, args...)` that runs `$body` compiled for the chosen ISA, with `S`
/// bound to that ISA's 16-lane vector ops ([`Simd16`]); an ISA this CPU lacks
/// ([`Isa::runs_here`]) runs the portable build.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            // (A body of plain loops, vectorised by each ISA's build, needs no `S`.)
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::extra_unused_type_parameters)]
            fn imp<S: Simd16>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp::<x86::Avx512>($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp::<x86::Avx2>($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the guard checked that the CPU has AVX-512F, AVX2 and FMA.
                Isa::Avx512 if isa.runs_here() => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the guard checked that the CPU has AVX2 and FMA.
                Isa::Avx2 if isa.runs_here() => unsafe { avx2($($arg),*) },
                _ => imp::<Arr<{ HAS_BASELINE_FMA }>>($($arg),*),
            }
        }
    };
}

/// Whether the compile target always has fused multiply-add (NEON on aarch64 does).
const HAS_BASELINE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// The 16-lane vector operations the kernels are written in.
pub trait Simd16 {
    /// A vector of 16 f32.
    type V: Copy;
    /// Loads 16 values.
    fn load(a: &[f32; LANES]) -> Self::V;
    /// Stores 16 values.
    fn store(v: Self::V, out: &mut [f32; LANES]);
    /// All lanes `x`.
    fn splat(x: f32) -> Self::V;
    /// `a·b + c` (fused where the ISA has it).
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes.
    fn hsum(a: Self::V) -> f32;
    /// SiLU of every lane.
    fn silu(a: Self::V) -> Self::V;
    /// Scalar `a·b + c`, for tails.
    fn madd(a: f32, b: f32, c: f32) -> f32;
    /// Whether [`conv_rows3`] runs a block's tap sums first and the gated value + SiLU of
    /// them in a second pass, rather than both per chunk in one pass (the same operations
    /// per output either way, so the same bits). Two passes where a vector is two or more
    /// registers: on Zen 3 (AVX2) a trio took 22 µs in one pass and 16-17 in two
    /// (criterion, `benches/conv.rs`). One pass on AVX-512 (one zmm per vector), where the
    /// second pass's reloads cost more than the overlap gained: on the Zen 5 guest the
    /// conv's thread time per 4096-token prefill read 0.0103-0.0109 s in two passes and
    /// 0.0064-0.0087 in one (f32; bf16 0.0094-0.0098 against 0.0061-0.0073), alternating
    /// processes (`bench/results/cpu-2026-12-02-zen5/experiments.txt`). Its AVX2 conv
    /// changed little (f32, median process: 0.0104 s in one pass in the first Zen 5 round,
    /// 0.0109-0.0113 in two in the second, whose AVX2 projection was 8-11% slower too).
    const CONV_TWO_PASS: bool = true;
}

/// Portable lanes as an array; the compiler vectorises them (AVX2, NEON, SSE2).
pub struct Arr<const FMA: bool>;

impl<const FMA: bool> Simd16 for Arr<FMA> {
    type V = [f32; LANES];
    #[inline(always)]
    fn load(a: &[f32; LANES]) -> Self::V {
        *a
    }
    #[inline(always)]
    fn store(v: Self::V, out: &mut [f32; LANES]) {
        *out = v;
    }
    #[inline(always)]
    fn splat(x: f32) -> Self::V {
        [x; LANES]
    }
    #[inline(always)]
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| Self::madd(a[l], b[l], c[l]))
    }
    #[inline(always)]
    fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    fn hsum(a: Self::V) -> f32 {
        a.iter().sum()
    }
    #[inline(always)]
    fn silu(a: Self::V) -> Self::V {
        std::array::from_fn(|l| silu_poly::<FMA>(a[l]))
    }
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Simd16, EXP_HI, EXP_LO, EXP_POLY, LANES, LN2_HI, LN2_LO};
    use std::arch::x86_64::*;

    /// AVX2 + FMA lanes: two 8-wide registers. Only used inside
    /// `#[target_feature(enable = "avx2,fma")]` functions (see `dispatch!`).
    pub struct Avx2;

    impl Simd16 for Avx2 {
        type V = (__m256, __m256);
        #[inline(always)]
        fn load(a: &[f32; LANES]) -> Self::V {
            // SAFETY: 16 readable f32; AVX2 is enabled in every caller.
            unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr()),
                    _mm256_loadu_ps(a.as_ptr().add(8)),
                )
            }
        }
        #[inline(always)]
        fn store(v: Self::V, out: &mut [f32; LANES]) {
            // SAFETY: 16 writable f32; AVX2 as above.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), v.0);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), v.1);
            }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self::V {
            // SAFETY: AVX2 as above.
            unsafe { (_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            // SAFETY: FMA as above.
            unsafe {
                (
                    _mm256_fmadd_ps(a.0, b.0, c.0),
                    _mm256_fmadd_ps(a.1, b.1, c.1),
                )
            }
        }
        #[inline(always)]
        fn add(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: AVX2 as above.
            unsafe { (_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1)) }
        }
        #[inline(always)]
        fn mul(a: Self::V, b: Self::V) -> Self::V {
            // SAFETY: AVX2 as above.
            unsafe { (_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1)) }
        }
        #[inline(always)]
        fn hsum(a: Self::V) -> f32 {
            let mut o = [0.0f32; LANES];
            Self::store(a, &mut o);
            o.iter().sum()
        }
        #[inline(always)]
        fn silu(y: Self::V) -> Self::V {
            let [a, b] = silu8x([y.0, y.1]);
            (a, b)
        }

        #[inline(always)]
        fn madd(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    /// SiLU of `N` vectors of 8 lanes: the `exp_f32` polynomial, 2^n through the exponent
    /// bits; each operation applied to all `N` before the next, so that the `N` dependent
    /// chains (~65 cycles each) interleave in program order. The compiler keeps the source
    /// order: written one vector after the other, Zen 3's out-of-order window held about
    /// two chains, and SiLU took 2.3 cycles per element.
    #[inline(always)]
    fn silu8x<const N: usize>(y: [__m256; N]) -> [__m256; N] {
        // `each!(i => e)`: `[e for i in 0..N]`, unrolled.
        macro_rules! each {
            ($i:ident => $e:expr) => {{
                let mut out = [_mm256_setzero_ps(); N];
                for $i in 0..N {
                    out[$i] = $e;
                }
                out
            }};
        }
        // SAFETY: AVX2 + FMA are enabled in every caller.
        unsafe {
            let x = each!(i => _mm256_sub_ps(_mm256_setzero_ps(), y[i]));
            let x = each!(i => _mm256_max_ps(x[i], _mm256_set1_ps(EXP_LO)));
            let x = each!(i => _mm256_min_ps(x[i], _mm256_set1_ps(EXP_HI)));
            let n = each!(i => _mm256_mul_ps(x[i], _mm256_set1_ps(std::f32::consts::LOG2_E)));
            let n = each!(i => _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(n[i]));
            let r = each!(i => _mm256_fmadd_ps(n[i], _mm256_set1_ps(-LN2_HI), x[i]));
            let r = each!(i => _mm256_fmadd_ps(n[i], _mm256_set1_ps(-LN2_LO), r[i]));
            let mut p = [_mm256_set1_ps(EXP_POLY[0]); N];
            for c in &EXP_POLY[1..] {
                p = each!(i => _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(*c)));
            }
            let r2 = each!(i => _mm256_mul_ps(r[i], r[i]));
            let p = each!(i => _mm256_fmadd_ps(p[i], r2[i], r[i]));
            let p = each!(i => _mm256_add_ps(p[i], _mm256_set1_ps(1.0)));
            let e = each!(i => _mm256_mul_ps(
                p[i],
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n[i]),
                    _mm256_set1_epi32(127),
                ))),
            ));
            let d = each!(i => _mm256_add_ps(_mm256_set1_ps(1.0), e[i]));
            each!(i => _mm256_div_ps(y[i], d[i]))
        }
    }

    /// AVX-512 lanes with explicit intrinsics (the auto-vectoriser turns the array form
    /// into gathers under AVX-512). Only used inside `#[target_feature(enable = "avx512f")]`.
    pub struct Avx512;

    impl Simd16 for Avx512 {
        type V = __m512;
        const CONV_TWO_PASS: bool = false;
        #[inline(always)]
        fn load(a: &[f32; LANES]) -> __m512 {
            // SAFETY: 16 readable f32; only called from AVX-512F functions (see `dispatch!`).
            unsafe { _mm512_loadu_ps(a.as_ptr()) }
        }
        #[inline(always)]
        fn store(v: __m512, out: &mut [f32; LANES]) {
            // SAFETY: 16 writable f32; AVX-512F as above.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn hsum(a: __m512) -> f32 {
            // SAFETY: AVX-512F as above.
            unsafe { _mm512_reduce_add_ps(a) }
        }
        #[inline(always)]
        fn silu(y: __m512) -> __m512 {
            // SAFETY: AVX-512F as above. Same polynomial as `exp_f32`; 2^n via scalef.
            unsafe {
                let x = _mm512_sub_ps(_mm512_setzero_ps(), y);
                let x = _mm512_min_ps(
                    _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
                    _mm512_set1_ps(EXP_HI),
                );
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
                );
                let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
                let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
                let mut p = _mm512_set1_ps(EXP_POLY[0]);
                for c in &EXP_POLY[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
                }
                p = _mm512_add_ps(
                    _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                    _mm512_set1_ps(1.0),
                );
                let e = _mm512_scalef_ps(p, n);
                _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0), e))
            }
        }
        #[inline(always)]
        fn madd(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }
}

/// Lanes of the partial sums: 16 f32 = one AVX-512 register, two AVX2 registers.
pub const LANES: usize = 16;

/// Range of x for which e^x is a normal f32.
const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.3;
/// ln 2 split in two for the reduction r = x - n·ln2 (Cephes: C1 = 0.693359375,
/// C2 = -2.12194440e-4).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Polynomial of e^r - 1 - r over r², highest degree first (Cephes `expf`).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x for f32, Cephes-style: x = n·ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n by
/// exponent bits. Relative error ~2 ulp; branch-free so that it vectorises.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_poly::<true>(x)
}

/// `exp_f32` with the multiply-adds fused (`FMA`) or not (targets without FMA, where
/// `mul_add` would be a libm call).
#[inline(always)]
fn exp_poly<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = madd(n, -LN2_HI, x);
    let r = madd(n, -LN2_LO, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = madd(p, r, *c);
    }
    p = madd(p, r * r, r) + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
fn silu_poly<const FMA: bool>(y: f32) -> f32 {
    y / (1.0 + exp_poly::<FMA>(-y))
}

/// The next token's rows, which [`gate_token`] prefetches while it computes this one's
/// (each empty for none).
#[derive(Clone, Copy, Default)]
pub struct Ahead<'a> {
    /// Its hidden states `[HC·D]`.
    pub query: &'a [f32],
    /// Its projection `[(1+HC)·D]`.
    pub proj: &'a [f32],
}

/// Per-branch constants of the gate kernel.
pub struct GateParams<'a> {
    /// `value_proj.bias` `[D]`.
    pub value_bias: &'a [f32],
    /// `key_projs.{i}.bias`, `[HC][D]`.
    pub key_bias: &'a [Vec<f32>],
    /// `norm1.{i}.weight · norm2.{i}.weight`, `[HC][D]`.
    pub norm12: &'a [Vec<f32>],
    /// `short_conv.norms.{i}.weight`, `[HC][D]`.
    pub conv_norm: &'a [Vec<f32>],
}

dispatch! {
    /// The gate of one token (§5) and the conv's RMSNorm (§6), in one pass per branch.
    ///
    /// `proj`: [(1+HC)·D] = [value | key_0 | … | key_{HC-1}] without bias; `query`: `[HC·D]`
    /// hidden states; `next`: the next token's hidden states and projection (prefetched
    /// here; empty for none);
    /// writes `gates` `[HC]` and `normed` `[HC·D]` = RMSNorm(g_i·value)·w.
    /// Uses RMSNorm(g·v) = g·v / sqrt(g²·mean(v²) + eps) so that mean(v²) is computed once
    /// for all branches. g·value itself is formed where it is consumed ([`conv_row`],
    /// [`gated_row`]), so that the output is written once.
    ///
    /// Returns whether every branch's sum of query squares is finite: false when `query`
    /// holds a NaN or an infinity (or values whose squares overflow), so that the caller
    /// can check the hidden states here, where they are read anyway.
    pub fn gate_token(p: &GateParams<'_>, proj: &[f32], query: &[f32], next: Ahead<'_>, gates: &mut [f32], normed: &mut [f32]) -> bool {
        let d = p.value_bias.len();
        let (value, keys) = proj.split_at(d);
        let body = d / LANES * LANES;
        let (vc, _) = value[..body].as_chunks::<LANES>();
        let (vbc, _) = p.value_bias[..body].as_chunks::<LANES>();
        // mean((value + bias)²).
        // The next token's rows a line per chunk, a row ahead (see below).
        let prefetch_proj = next.proj.len() == proj.len();
        let npc = if prefetch_proj { next.proj[..body].as_chunks::<LANES>().0 } else { &[] };
        let mut msv = S::splat(0.0);
        for (j, (x, b)) in vc.iter().zip(vbc).enumerate() {
            if prefetch_proj {
                prefetch_chunk(npc, j);
            }
            let v = S::add(S::load(x), S::load(b));
            msv = S::fma(v, v, msv);
        }
        let mut msv_tail = 0.0f32;
        for (x, b) in value[body..].iter().zip(&p.value_bias[body..]) {
            let x = x + b;
            msv_tail = S::madd(x, x, msv_tail);
        }
        let msv = (S::hsum(msv) + msv_tail) / d as f32;
        let inv_sqrt_d = 1.0 / (d as f32).sqrt();
        let mut query_finite = true;
        // The next token's hidden states and projection (`next`, empty for none) a line
        // per chunk, a row ahead: the hidden states come from memory and the projection
        // from L3 or memory (an AVX2 tile's is 5 MiB), and a whole row in flight behind this one
        // keeps them streaming while this row computes.
        let prefetch_next = next.query.len() == query.len();
        for i in 0..gates.len() {
            let k = &keys[i * d..(i + 1) * d];
            let q = &query[i * d..(i + 1) * d];
            let (mut sk, mut sq, mut skq) = (S::splat(0.0), S::splat(0.0), S::splat(0.0));
            {
                let (kc, _) = k[..body].as_chunks::<LANES>();
                let (bc, _) = p.key_bias[i][..body].as_chunks::<LANES>();
                let (qc, _) = q[..body].as_chunks::<LANES>();
                let (wc, _) = p.norm12[i][..body].as_chunks::<LANES>();
                let nc = if prefetch_next {
                    next.query[i * d..i * d + body].as_chunks::<LANES>().0
                } else {
                    &[]
                };
                let nk = if prefetch_proj {
                    next.proj[(i + 1) * d..(i + 1) * d + body].as_chunks::<LANES>().0
                } else {
                    &[]
                };
                for (j, (((kc, bc), qc), wc)) in kc.iter().zip(bc).zip(qc).zip(wc).enumerate() {
                    if prefetch_next {
                        prefetch_chunk(nc, j);
                    }
                    if prefetch_proj {
                        prefetch_chunk(nk, j);
                    }
                    let kk = S::add(S::load(kc), S::load(bc));
                    let qq = S::load(qc);
                    sk = S::fma(kk, kk, sk);
                    sq = S::fma(qq, qq, sq);
                    skq = S::fma(S::mul(kk, qq), S::load(wc), skq);
                }
            }
            let (mut tk, mut tq, mut tkq) = (0.0f32, 0.0f32, 0.0f32);
            for j in body..d {
                let kk = k[j] + p.key_bias[i][j];
                tk = S::madd(kk, kk, tk);
                tq = S::madd(q[j], q[j], tq);
                tkq = S::madd(kk * q[j], p.norm12[i][j], tkq);
            }
            let rk = 1.0 / ((S::hsum(sk) + tk) / d as f32 + RMS_EPS_DEFAULT).sqrt();
            let sum_q = S::hsum(sq) + tq;
            query_finite &= sum_q.is_finite();
            let rq = 1.0 / (sum_q / d as f32 + RMS_EPS_DEFAULT).sqrt();
            let s = (S::hsum(skq) + tkq) * rk * rq * inv_sqrt_d;
            let sign = if s > 0.0 { 1.0 } else if s < 0.0 { -1.0 } else { 0.0 };
            let g = 1.0 / (1.0 + (-(s.abs().max(GATE_CLAMP).sqrt() * sign)).exp());
            gates[i] = g;
            let scale = g / (g * g * msv + RMS_EPS_CONV).sqrt();
            let no = &mut normed[i * d..(i + 1) * d];
            {
                let (noc, _) = no[..body].as_chunks_mut::<LANES>();
                let (wc, _) = p.conv_norm[i][..body].as_chunks::<LANES>();
                let ss = S::splat(scale);
                for (((no, x), b), w) in noc.iter_mut().zip(vc).zip(vbc).zip(wc) {
                    let v = S::add(S::load(x), S::load(b));
                    S::store(S::mul(S::mul(ss, v), S::load(w)), no);
                }
            }
            for j in body..d {
                no[j] = scale * (value[j] + p.value_bias[j]) * p.conv_norm[i][j];
            }
        }
        query_finite
    }
}

/// The gated value of one row, g_i·(value + value_bias) per branch i, from its projection
/// and gates: what [`conv_row`] adds the conv to.
#[derive(Debug, Clone, Copy)]
pub struct GatedValue<'a> {
    /// `value_proj` output without bias, `[D]`.
    pub value: &'a [f32],
    /// `value_proj.bias`, `[D]`.
    pub bias: &'a [f32],
    /// The row's gates, `[HC]`.
    pub gates: &'a [f32],
}

dispatch! {
    /// `out` `[HC·D]` = g_i·(value + value_bias): `gated_value` (§5), for rows whose conv is
    /// finished later (range starts) and for inspection.
    pub fn gated_row(gv: &GatedValue<'_>, out: &mut [f32]) {
        let d = gv.value.len();
        let body = d / LANES * LANES;
        let (vc, _) = gv.value[..body].as_chunks::<LANES>();
        let (bc, _) = gv.bias[..body].as_chunks::<LANES>();
        for (i, &g) in gv.gates.iter().enumerate() {
            let o = &mut out[i * d..(i + 1) * d];
            let gs = S::splat(g);
            let (oc, _) = o[..body].as_chunks_mut::<LANES>();
            for ((o, x), b) in oc.iter_mut().zip(vc).zip(bc) {
                S::store(S::mul(gs, S::add(S::load(x), S::load(b))), o);
            }
            for ((o, x), b) in o[body..].iter_mut().zip(&gv.value[body..]).zip(&gv.bias[body..]) {
                *o = g * (x + b);
            }
        }
    }
}

dispatch! {
    /// One output row (§5-§6): `out[i·D + j] = g_i·(value[j] + value_bias[j]) +
    /// SiLU(sum_k w[k][i·D + j] · rows[k][i·D + j])`, the gated value plus the dilated causal
    /// depthwise conv, in one pass that writes `out` once. `rows[k]` is the normalised row at
    /// t - (taps-1-k)·dilation, `None` before the start; `w_tap_major`: `[taps][HC·D]`. The
    /// taps are summed in k order from zero in registers.
    pub fn conv_row(w_tap_major: &[f32], rows: &[Option<&[f32]>], gv: &GatedValue<'_>, out: &mut [f32]) {
        let (c, d) = (out.len(), gv.value.len());
        let body = d / LANES * LANES;
        let (vc, _) = gv.value[..body].as_chunks::<LANES>();
        let (bc, _) = gv.bias[..body].as_chunks::<LANES>();
        for (i, &g) in gv.gates.iter().enumerate() {
            let base = i * d;
            let gs = S::splat(g);
            let o = &mut out[base..base + d];
            let (oc, _) = o[..body].as_chunks_mut::<LANES>();
            // The present taps' weights and rows for this branch, in k order.
            let mut taps: [Tap<'_>; CONV_INLINE] = [(&[], &[]); CONV_INLINE];
            let mut count = 0;
            for (k, row) in rows.iter().enumerate() {
                if let Some(row) = row {
                    if count == CONV_INLINE {
                        count += 1;
                        break;
                    }
                    let w = &w_tap_major[k * c + base..k * c + base + body];
                    taps[count] = (w.as_chunks::<LANES>().0, row[base..base + body].as_chunks::<LANES>().0);
                    count += 1;
                }
            }
            match count {
                0 => conv_chunks::<S>(&[], gs, vc, bc, oc),
                1 => conv_chunks::<S>(&taps[..1], gs, vc, bc, oc),
                2 => conv_chunks::<S>(&taps[..2], gs, vc, bc, oc),
                3 => conv_chunks::<S>(&taps[..3], gs, vc, bc, oc),
                4 => conv_chunks::<S>(&taps[..4], gs, vc, bc, oc),
                _ => {
                    // More taps than the inline set: gathered per call.
                    let all: Vec<Tap<'_>> = rows
                        .iter()
                        .enumerate()
                        .filter_map(|(k, row)| {
                            row.map(|row| {
                                let w = &w_tap_major[k * c + base..k * c + base + body];
                                (w.as_chunks::<LANES>().0, row[base..base + body].as_chunks::<LANES>().0)
                            })
                        })
                        .collect();
                    conv_chunks::<S>(&all, gs, vc, bc, oc)
                }
            }
            conv_tail::<S>(w_tap_major, rows, gv, g, (c, base, body), o);
        }
    }
}

/// The elements of one branch of a [`conv_row`] past its 16-lane body (`o[body..]`, the
/// branch starting at channel `base` of a row of `c` channels), one at a time.
#[inline(always)]
fn conv_tail<S: Simd16>(
    w_tap_major: &[f32],
    rows: &[Option<&[f32]>],
    gv: &GatedValue<'_>,
    g: f32,
    (c, base, body): (usize, usize, usize),
    o: &mut [f32],
) {
    for (j, oj) in o.iter_mut().enumerate().skip(body) {
        let at = base + j;
        let mut acc = 0.0f32;
        for (k, row) in rows.iter().enumerate() {
            if let Some(row) = row {
                acc = S::madd(w_tap_major[k * c + at], row[at], acc);
            }
        }
        let mut one = [0.0f32; LANES];
        one[0] = acc;
        let mut r = [0.0f32; LANES];
        S::store(S::silu(S::load(&one)), &mut r);
        *oj = g * (gv.value[j] + gv.bias[j]) + r[0];
    }
}

/// Chunks (cache lines) ahead that [`conv_rows3`] prefetches each input stream.
const CONV_AHEAD: usize = 8;

/// Prefetches chunk `j` of `v` into L1 (x86-64; elsewhere nothing). `j` may lie past the
/// end: a prefetch never faults.
#[inline(always)]
fn prefetch_chunk(v: &[[f32; LANES]], j: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64; a prefetch reads nothing and never faults, and
    // `wrapping_add` keeps the address computation defined past the end.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            v.as_ptr().wrapping_add(j).cast::<i8>(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, j);
}

/// Chunks per block of [`conv_rows3`]'s two passes (three rows' sums: 3 KiB on the stack).
const CONV_BLOCK: usize = 16;

/// Taps of the rows [`conv_rows3`] takes.
pub const TRIO_TAPS: usize = 4;

dispatch! {
    /// Three output rows of [`conv_row`] at once, each with all [`TRIO_TAPS`] taps present
    /// (`rows[g]`: output row g's taps, every one `Some`; it panics otherwise): the rows a
    /// dilation apart, so that they share three of their four normalised rows. Each output
    /// is the same operations in the same order as in `conv_row`, so the same bits; the
    /// conv weights are loaded once for the three and the shared rows come from L1, where
    /// one row at a time streamed the weights and four rows from L2 per output row.
    pub fn conv_rows3(w_tap_major: &[f32], rows: [&[Option<&[f32]>]; 3], gv: [&GatedValue<'_>; 3], out: [&mut [f32]; 3]) {
        conv_rows3_in::<S>(S::CONV_TWO_PASS, w_tap_major, rows, gv, out)
    }
}

/// [`conv_rows3`]'s body, in one pass or two (`two_pass`; see [`Simd16::CONV_TWO_PASS`]),
/// which the tests run both ways on the portable lanes whatever the CPU.
#[inline(always)]
fn conv_rows3_in<S: Simd16>(
    two_pass: bool,
    w_tap_major: &[f32],
    rows: [&[Option<&[f32]>]; 3],
    gv: [&GatedValue<'_>; 3],
    out: [&mut [f32]; 3],
) {
    let [o0, o1, o2] = out;
    let (c, d) = (o0.len(), gv[0].value.len());
    assert!(o1.len() == c && o2.len() == c && w_tap_major.len() == TRIO_TAPS * c);
    let body = d / LANES * LANES;
    let tap = |g: usize, k: usize| -> &[f32] {
        assert_eq!(
            rows[g].len(),
            TRIO_TAPS,
            "conv_rows3 takes {TRIO_TAPS} taps"
        );
        rows[g][k].expect("conv_rows3 takes rows with every tap present")
    };
    let (bc, _) = gv[0].bias[..body].as_chunks::<LANES>();
    let vc: [&[[f32; LANES]]; 3] =
        std::array::from_fn(|g| gv[g].value[..body].as_chunks::<LANES>().0);
    // The tap sums of a block (see below); every element read is written first.
    let mut pre = [[[0.0f32; LANES]; CONV_BLOCK]; 3];
    for i in 0..gv[0].gates.len() {
        let base = i * d;
        let gs: [S::V; 3] = std::array::from_fn(|g| S::splat(gv[g].gates[i]));
        let w: [&[[f32; LANES]]; TRIO_TAPS] = std::array::from_fn(|k| {
            w_tap_major[k * c + base..k * c + base + body]
                .as_chunks::<LANES>()
                .0
        });
        let x: [[&[[f32; LANES]]; TRIO_TAPS]; 3] = std::array::from_fn(|g| {
            std::array::from_fn(|k| tap(g, k)[base..base + body].as_chunks::<LANES>().0)
        });
        let (oc0, _) = o0[base..base + body].as_chunks_mut::<LANES>();
        let (oc1, _) = o1[base..base + body].as_chunks_mut::<LANES>();
        let (oc2, _) = o2[base..base + body].as_chunks_mut::<LANES>();
        if !two_pass {
            // One pass (see `Simd16::CONV_TWO_PASS`): per chunk, the three rows' tap
            // sums, gated value and SiLU, the bias loaded once for the three.
            for (j, ((a0, a1), a2)) in oc0
                .iter_mut()
                .zip(oc1.iter_mut())
                .zip(oc2.iter_mut())
                .enumerate()
            {
                let wj = trio_weights::<S>(&w, &x, &vc, j);
                let b = S::load(&bc[j]);
                for (g, o) in [a0, a1, a2].into_iter().enumerate() {
                    let sum = tap_sum::<S>(wj, &x[g], j);
                    let gated = S::mul(gs[g], S::add(S::load(&vc[g][j]), b));
                    S::store(S::add(gated, S::silu(sum)), o);
                }
            }
        } else {
            // Blocks of CONV_BLOCK chunks in two passes: the three rows' tap sums into a
            // buffer on the stack, then gated value + SiLU of them. In one pass each
            // chunk's work was one dependent chain of ~80 cycles (four FMAs, then the exp
            // polynomial and a divide), and the out-of-order window held too few of them.
            let mut jb = 0;
            while jb < oc0.len() {
                let len = (oc0.len() - jb).min(CONV_BLOCK);
                for jj in 0..len {
                    let wj = trio_weights::<S>(&w, &x, &vc, jb + jj);
                    for (pg, xg) in pre.iter_mut().zip(&x) {
                        S::store(tap_sum::<S>(wj, xg, jb + jj), &mut pg[jj]);
                    }
                }
                for (g, oc) in [&mut *oc0, &mut *oc1, &mut *oc2].into_iter().enumerate() {
                    for (jj, sum) in pre[g][..len].iter().enumerate() {
                        let j = jb + jj;
                        let gated = S::mul(gs[g], S::add(S::load(&vc[g][j]), S::load(&bc[j])));
                        S::store(S::add(gated, S::silu(S::load(sum))), &mut oc[j]);
                    }
                }
                jb += len;
            }
        }
        for (g, o) in [&mut *o0, &mut *o1, &mut *o2].into_iter().enumerate() {
            conv_tail::<S>(
                w_tap_major,
                rows[g],
                gv[g],
                gv[g].gates[i],
                (c, base, body),
                &mut o[base..base + d],
            );
        }
    }
}

/// The taps' weights at chunk `j` of [`conv_rows3`] (`w[k]`: tap k's weights), after every
/// input stream's line [`CONV_AHEAD`] chunks on is prefetched into L1 (`x[g][k]`: row g's
/// tap k, `vc[g]` its value; seventeen streams, more than the hardware prefetchers follow).
#[inline(always)]
fn trio_weights<S: Simd16>(
    w: &[&[[f32; LANES]]; TRIO_TAPS],
    x: &[[&[[f32; LANES]]; TRIO_TAPS]; 3],
    vc: &[&[[f32; LANES]]; 3],
    j: usize,
) -> [S::V; TRIO_TAPS] {
    let ahead = j + CONV_AHEAD;
    for k in 0..TRIO_TAPS {
        prefetch_chunk(w[k], ahead);
        for xg in x {
            prefetch_chunk(xg[k], ahead);
        }
    }
    for v in vc {
        prefetch_chunk(v, ahead);
    }
    std::array::from_fn(|k| S::load(&w[k][j]))
}

/// One row's tap sum at chunk `j` of [`conv_rows3`] (`xg[k]`: its tap k), summed in k order
/// from zero as in [`conv_row`].
#[inline(always)]
fn tap_sum<S: Simd16>(wj: [S::V; TRIO_TAPS], xg: &[&[[f32; LANES]]; TRIO_TAPS], j: usize) -> S::V {
    let mut acc = S::splat(0.0);
    for k in 0..TRIO_TAPS {
        acc = S::fma(wj[k], S::load(&xg[k][j]), acc);
    }
    acc
}

/// One conv tap over a branch: its weights and its normalised row, in 16-lane chunks.
type Tap<'a> = (&'a [[f32; LANES]], &'a [[f32; LANES]]);

/// Taps of [`conv_row`] handled with their count known to the compiler (kernel_size 4, the
/// default, and fewer).
const CONV_INLINE: usize = 4;

/// The 16-lane body of one branch of [`conv_row`]: `out = g·(value + bias) + SiLU(sum over
/// taps of w·row)`, the taps summed in order from zero. With `taps` of a constant length
/// (inlined), the tap loop unrolls.
#[inline(always)]
fn conv_chunks<S: Simd16>(
    taps: &[Tap<'_>],
    gs: S::V,
    vc: &[[f32; LANES]],
    bc: &[[f32; LANES]],
    oc: &mut [[f32; LANES]],
) {
    let n = oc.len();
    let (vc, bc) = (&vc[..n], &bc[..n]);
    for (j, o) in oc.iter_mut().enumerate() {
        let mut acc = S::splat(0.0);
        for (w, r) in taps {
            acc = S::fma(S::load(&w[j]), S::load(&r[j]), acc);
        }
        let gated = S::mul(gs, S::add(S::load(&vc[j]), S::load(&bc[j])));
        S::store(S::add(gated, S::silu(acc)), o);
    }
}

/// Copies `src` into `dst` (equal lengths) and returns whether every value is finite. A
/// value times zero is zero when it is finite and NaN when it is an infinity or a NaN, so
/// the lanes' sum of those products is zero exactly when all are finite.
#[inline(always)]
fn copy_finite_in<S: Simd16>(src: &[f32], dst: &mut [f32]) -> bool {
    assert_eq!(
        src.len(),
        dst.len(),
        "copy_finite_in takes slices of one length"
    );
    let (s16, s_rest) = src.as_chunks::<LANES>();
    let (d16, d_rest) = dst.as_chunks_mut::<LANES>();
    let zero = S::splat(0.0);
    let mut acc = zero;
    for (d, s) in d16.iter_mut().zip(s16) {
        let v = S::load(s);
        S::store(v, d);
        acc = S::add(acc, S::mul(v, zero));
    }
    let mut finite = S::hsum(acc) == 0.0;
    for (d, &s) in d_rest.iter_mut().zip(s_rest) {
        *d = s;
        finite &= s.is_finite();
    }
    finite
}

/// Row `hid + off` of `table` (rows of `width` values), as `DemoModel`'s gather computes it,
/// or `None` where it lies outside the table.
#[inline(always)]
fn head_row<T>(table: &[T], hid: i64, off: i64, width: usize) -> Option<&[T]> {
    // A sum past i64 or below zero is no row (a plain add panicked in debug builds).
    let row = usize::try_from(hid.checked_add(off)?).ok()?;
    row.checked_mul(width)
        .and_then(|a| table.get(a..a.checked_add(width)?))
}

dispatch! {
    /// One token's table rows: row `hashes[j] + offsets[j]` of `table` (rows of `dst.len() /
    /// hashes.len()` values) into the j-th part of `dst`, each copied and checked for NaN
    /// and infinity in the same pass. Returns false, with `dst` partly written, at the first
    /// row that lies past the table or holds a non-finite value.
    pub fn gather_finite(table: &[f32], hashes: &[i64], offsets: &[i64], dst: &mut [f32]) -> bool {
        let dh = dst.len() / hashes.len().max(1);
        assert!(offsets.len() >= hashes.len() && dh * hashes.len() == dst.len(), "a row per head");
        for (j, (&hid, &off)) in hashes.iter().zip(offsets).enumerate() {
            match head_row(table, hid, off, dh) {
                Some(src) if copy_finite_in::<S>(src, &mut dst[j * dh..(j + 1) * dh]) => {}
                _ => return false,
            }
        }
        true
    }
}

dispatch! {
    /// One token's rows of a bf16 table as the bf16 dot kernels take them: row
    /// `hashes[j] + offsets[j]` of `pairs` (the table's bits two values to a u32, rows of
    /// `dst.len() / hashes.len()` pairs) into the j-th part of `dst`, each checked in the
    /// same pass for a value with every exponent bit set (an infinity or a NaN). Returns
    /// false, with `dst` partly written, at the first row that lies past the table or holds
    /// such a value. Plain loops: each ISA's build of this function vectorises them.
    pub fn gather_pairs_finite(pairs: &[u32], hashes: &[i64], offsets: &[i64], dst: &mut [u32]) -> bool {
        let kh = dst.len() / hashes.len().max(1);
        assert!(offsets.len() >= hashes.len() && kh * hashes.len() == dst.len(), "a row per head");
        for (j, (&hid, &off)) in hashes.iter().zip(offsets).enumerate() {
            let Some(src) = head_row(pairs, hid, off, kh) else {
                return false;
            };
            // Each half's exponent bits xor all ones: zero for a non-finite value.
            let mut least = u32::MAX;
            for (d, &w) in dst[j * kh..(j + 1) * kh].iter_mut().zip(src) {
                *d = w;
                least = least.min((w & 0x7f80_0000) ^ 0x7f80_0000).min((w & 0x7f80) ^ 0x7f80);
            }
            if least == 0 {
                return false;
            }
        }
        true
    }
}

dispatch! {
    /// One token's rows of a bf16 table widened to f32, wherever the projection takes f32
    /// x (a bf16 layer on AVX2, on NEON without BF16 or on AVX-512 without AVX512-BF16; an
    /// odd head dim; an f32 layer over a bf16 table): row `hashes[j] + offsets[j]`
    /// of `bits` (rows of `dst.len() / hashes.len()` values) into the j-th part of `dst`,
    /// each value's bits moved to the high half of an f32 (exact) and checked in the same
    /// pass for an all-ones exponent (an infinity or a NaN). Returns false, with `dst` partly
    /// written, at the first row that lies past the table or holds such a value. Plain
    /// loops: each ISA's build of this function vectorises them.
    pub fn gather_widen_finite(bits: &[u16], hashes: &[i64], offsets: &[i64], dst: &mut [f32]) -> bool {
        let dh = dst.len() / hashes.len().max(1);
        assert!(offsets.len() >= hashes.len() && dh * hashes.len() == dst.len(), "a row per head");
        for (j, (&hid, &off)) in hashes.iter().zip(offsets).enumerate() {
            let Some(src) = head_row(bits, hid, off, dh) else {
                return false;
            };
            // The exponent bits xor all ones: zero for a non-finite value.
            let mut least = u16::MAX;
            for (d, &b) in dst[j * dh..(j + 1) * dh].iter_mut().zip(src) {
                *d = f32::from_bits(u32::from(b) << 16);
                least = least.min((b & 0x7f80) ^ 0x7f80);
            }
            if least == 0 {
                return false;
            }
        }
        true
    }
}

dispatch! {
    /// The pre-activation conv sum of one row, `y[c] = sum_k w[k][c] · rows[k][c]` (`None`
    /// rows skipped), summed in k order from zero as in [`conv_row`], so that with the same
    /// rows [`conv_row_finish`] then gives `conv_row`'s bits: the boundary fix-up.
    pub fn conv_row_pre(w_tap_major: &[f32], rows: &[Option<&[f32]>], y: &mut [f32]) {
        let c = y.len();
        y.fill(0.0);
        for (k, row) in rows.iter().enumerate() {
            if let Some(row) = row {
                fma_rows::<S>(y, &w_tap_major[k * c..(k + 1) * c], row);
            }
        }
    }
}

/// `C` independent 16-lane FMA chains for `iters` steps; returns a lane sum so that the work
/// is kept.
#[inline(always)]
fn chains<S: Simd16, const C: usize>(iters: usize) -> f32 {
    let (a, b) = (S::splat(1.000_001), S::splat(0.999_999));
    let mut acc = [S::splat(0.0); C];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = S::fma(a, b, *v);
        }
    }
    let mut total = S::splat(0.0);
    for v in acc {
        total = S::add(total, v);
    }
    S::hsum(total)
}

dispatch! {
    /// Twelve 16-lane FMA chains (12 zmm on AVX-512).
    fn chains12(iters: usize) -> f32 {
        chains::<S, 12>(iters)
    }
}

dispatch! {
    /// Six 16-lane FMA chains (12 ymm on AVX2, 24 q registers on NEON): as many as the
    /// registers hold without spilling.
    fn chains6(iters: usize) -> f32 {
        chains::<S, 6>(iters)
    }
}

/// Independent FMA chains for `iters` steps: the FMA peak of one core, used to state GEMM
/// efficiency (`engram bench --fma-peak`, `fma_peak_share`). Twelve 16-lane chains on
/// AVX-512, six elsewhere (twelve would spill the 16 ymm registers of AVX2 and understate
/// its peak). Returns (a lane sum that keeps the work, FLOPs done).
pub fn fma_chains(isa: Isa, iters: usize) -> (f32, f64) {
    let (sum, c) = match isa {
        Isa::Avx512 => (chains12(isa, iters), 12),
        _ => (chains6(isa, iters), 6),
    };
    (sum, (c * LANES * 2) as f64 * iters as f64)
}

dispatch! {
    /// The sum of `a`, read with four independent vector accumulators: a streaming read of
    /// memory for `engram bench --mem-bw` (the decode step's yardstick).
    pub fn read_sum(a: &[f32]) -> f32 {
        let (chunks, _) = a.as_chunks::<LANES>();
        let mut acc = [S::splat(0.0); 4];
        let mut quads = chunks.chunks_exact(4);
        for q in quads.by_ref() {
            for (v, x) in acc.iter_mut().zip(q) {
                *v = S::add(*v, S::load(x));
            }
        }
        for x in quads.remainder() {
            acc[0] = S::add(acc[0], S::load(x));
        }
        let mut t = S::hsum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
        for x in &a[chunks.len() * LANES..] {
            t += x;
        }
        t
    }
}

dispatch! {
    /// `sum_j a[j] · b[j]` (the small-M projection's inner step).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let body = a.len() / LANES * LANES;
        let (ac, _) = a[..body].as_chunks::<LANES>();
        let (bc, _) = b[..body].as_chunks::<LANES>();
        let (mut s0, mut s1) = (S::splat(0.0), S::splat(0.0));
        let mut pairs = ac.chunks_exact(2).zip(bc.chunks_exact(2));
        for (x, y) in pairs.by_ref() {
            s0 = S::fma(S::load(&x[0]), S::load(&y[0]), s0);
            s1 = S::fma(S::load(&x[1]), S::load(&y[1]), s1);
        }
        if ac.len() % 2 == 1 {
            let i = ac.len() - 1;
            s0 = S::fma(S::load(&ac[i]), S::load(&bc[i]), s0);
        }
        let mut t = S::hsum(S::add(s0, s1));
        for j in body..a.len() {
            t = S::madd(a[j], b[j], t);
        }
        t
    }
}

dispatch! {
    /// `y += a · x` (the small-M projection's inner step).
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let body = y.len() / LANES * LANES;
        let av = S::splat(a);
        let (yc, _) = y[..body].as_chunks_mut::<LANES>();
        let (xc, _) = x[..body].as_chunks::<LANES>();
        for (yv, xv) in yc.iter_mut().zip(xc) {
            S::store(S::fma(av, S::load(xv), S::load(yv)), yv);
        }
        for j in body..y.len() {
            y[j] = S::madd(a, x[j], y[j]);
        }
    }
}

/// `acc += w · x` element-wise: 16-wide body, scalar tail.
#[inline(always)]
fn fma_rows<S: Simd16>(acc: &mut [f32], w: &[f32], x: &[f32]) {
    let body = acc.len() / LANES * LANES;
    let (ac, _) = acc[..body].as_chunks_mut::<LANES>();
    let (wc, _) = w[..body].as_chunks::<LANES>();
    let (xc, _) = x[..body].as_chunks::<LANES>();
    for ((a, w), x) in ac.iter_mut().zip(wc).zip(xc) {
        S::store(S::fma(S::load(w), S::load(x), S::load(a)), a);
    }
    for j in body..acc.len() {
        acc[j] = S::madd(w[j], x[j], acc[j]);
    }
}

dispatch! {
    /// The boundary fix-up of one output row: the taps in `rows` (`rows[k]`, `None` for the
    /// taps already in `y`; the fix-up passes none) are added to the row's conv sum `y` in
    /// k order, then `out = out + SiLU(y)`, where `out` holds the gated value on entry (see
    /// [`gated_row`], [`conv_row_pre`]).
    pub fn conv_row_finish(w_tap_major: &[f32], rows: &[Option<&[f32]>], y: &mut [f32], out: &mut [f32]) {
        let c = y.len();
        assert_eq!(out.len(), c, "out and y must both be one row");
        for (k, row) in rows.iter().enumerate() {
            if let Some(row) = row {
                fma_rows::<S>(y, &w_tap_major[k * c..(k + 1) * c], row);
            }
        }
        let body = c / LANES * LANES;
        let (oc, _) = out[..body].as_chunks_mut::<LANES>();
        let (yc, _) = y[..body].as_chunks::<LANES>();
        for (o, yv) in oc.iter_mut().zip(yc) {
            S::store(S::add(S::load(o), S::silu(S::load(yv))), o);
        }
        // The tail (fewer than LANES values) through one vector SiLU: lanes are
        // independent, so each value gets the body's bits.
        let (mut part, mut r) = ([0.0f32; LANES], [0.0f32; LANES]);
        part[..c - body].copy_from_slice(&y[body..]);
        S::store(S::silu(S::load(&part)), &mut r);
        for (o, v) in out[body..].iter_mut().zip(r) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    #[test]
    fn an_isa_this_cpu_lacks_runs_the_portable_build() {
        let a = pseudo(100, 1);
        let b = pseudo(100, 2);
        let want = dot(Isa::Generic, &a, &b);
        // Every ISA, whether or not this CPU has it (an AVX-512 body on an AVX2-only CPU
        // would stop on an illegal instruction): the ones it lacks run the portable build.
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Generic] {
            let got = dot(isa, &a, &b);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{isa:?}: {got} {want}"
            );
            assert_eq!(
                isa.runs_here(),
                Isa::all_supported().contains(&isa),
                "{isa:?}"
            );
            if !isa.runs_here() {
                assert_eq!(got.to_bits(), want.to_bits(), "{isa:?}");
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f32;
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn gather_finite_copies_each_heads_row_and_refuses_bad_rows_on_every_isa() {
        for isa in Isa::all_supported() {
            // Rows of 64 (chunks only) and of 20 values (a tail); three heads.
            for dh in [64usize, 20] {
                let rows = 12;
                let table: Vec<f32> = (0..rows * dh).map(|i| i as f32 * 0.5 - 7.0).collect();
                let offsets = [0i64, 4, 8];
                let hashes = [3i64, 0, 2];
                let mut dst = vec![0.0f32; 3 * dh];
                assert!(gather_finite(isa, &table, &hashes, &offsets, &mut dst));
                for (j, (&hid, &off)) in hashes.iter().zip(&offsets).enumerate() {
                    let r = (hid + off) as usize;
                    assert_eq!(&dst[j * dh..(j + 1) * dh], &table[r * dh..(r + 1) * dh]);
                }
                // A row past the table, a negative row, a NaN or an infinity in a row read.
                let mut d = dst.clone();
                assert!(!gather_finite(isa, &table, &[3, 0, 4], &offsets, &mut d));
                assert!(!gather_finite(isa, &table, &[3, -5, 2], &offsets, &mut d));
                // An id whose sum with its offset passes i64 (no panic in debug builds).
                assert!(!gather_finite(
                    isa,
                    &table,
                    &[3, i64::MAX, 2],
                    &offsets,
                    &mut d
                ));
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut t = table.clone();
                    t[4 * dh + dh - 1] = bad;
                    assert!(
                        !gather_finite(isa, &t, &hashes, &offsets, &mut d),
                        "{isa:?} {dh} {bad}"
                    );
                    // A bad value in a row no head reads is no error.
                    let mut t = table.clone();
                    t[dh + 3] = bad;
                    assert!(
                        gather_finite(isa, &t, &hashes, &offsets, &mut d),
                        "{isa:?} {dh} {bad}"
                    );
                }
            }
        }
    }

    #[test]
    fn gather_pairs_finite_copies_rows_and_finds_every_non_finite_half_on_every_isa() {
        let bits = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
        for isa in Isa::all_supported() {
            // Rows of 32 pairs (64 values) and of 5; three heads.
            for kh in [32usize, 5] {
                let rows = 10;
                let pairs: Vec<u32> = (0..rows * kh)
                    .map(|i| bits(i as f32 * 0.25 - 3.0) | bits(1.5 - i as f32) << 16)
                    .collect();
                let (hashes, offsets) = ([2i64, 0, 1], [0i64, 3, 6]);
                let mut dst = vec![0u32; 3 * kh];
                assert!(gather_pairs_finite(
                    isa, &pairs, &hashes, &offsets, &mut dst
                ));
                for (j, (&hid, &off)) in hashes.iter().zip(&offsets).enumerate() {
                    let r = (hid + off) as usize;
                    assert_eq!(&dst[j * kh..(j + 1) * kh], &pairs[r * kh..(r + 1) * kh]);
                }
                let mut d = dst.clone();
                assert!(!gather_pairs_finite(
                    isa,
                    &pairs,
                    &[2, 0, 4],
                    &offsets,
                    &mut d
                ));
                assert!(!gather_pairs_finite(
                    isa,
                    &pairs,
                    &[-3, 0, 1],
                    &offsets,
                    &mut d
                ));
                // Row 3 is read (head 1); row 4 is not.
                for at in 0..kh {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        for high in [false, true] {
                            let mut p = pairs.clone();
                            let (shift, keep) = if high { (16, 0xffff) } else { (0, 0xffff_0000) };
                            p[3 * kh + at] = p[3 * kh + at] & keep | bits(bad) << shift;
                            let ok = gather_pairs_finite(isa, &p, &hashes, &offsets, &mut d);
                            assert!(!ok, "{isa:?} kh {kh}: {bad} at {at} (high half {high})");
                            let mut p = pairs.clone();
                            p[4 * kh + at] = p[4 * kh + at] & keep | bits(bad) << shift;
                            assert!(gather_pairs_finite(isa, &p, &hashes, &offsets, &mut d));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gather_widen_finite_widens_rows_exactly_and_finds_every_non_finite_value_on_every_isa() {
        let bits = |v: f32| half::bf16::from_f32(v).to_bits();
        for isa in Isa::all_supported() {
            // Rows of 64 values and of 11; three heads.
            for dh in [64usize, 11] {
                let rows = 10;
                // -0, a subnormal bf16 and the largest finite bf16 among ordinary values.
                let mut table: Vec<u16> = (0..rows * dh)
                    .map(|i| bits(i as f32 * 0.37 - 9.0))
                    .collect();
                table[3 * dh] = 0x8000;
                table[3 * dh + 1] = 0x0001;
                table[3 * dh + 2] = 0x7f7f;
                let (hashes, offsets) = ([1i64, 0, 2], [0i64, 3, 6]);
                let mut dst = vec![f32::NAN; 3 * dh];
                assert!(gather_widen_finite(
                    isa, &table, &hashes, &offsets, &mut dst
                ));
                for (j, (&hid, &off)) in hashes.iter().zip(&offsets).enumerate() {
                    let r = (hid + off) as usize;
                    for (&got, &b) in dst[j * dh..(j + 1) * dh]
                        .iter()
                        .zip(&table[r * dh..(r + 1) * dh])
                    {
                        assert_eq!(
                            got.to_bits(),
                            half::bf16::from_bits(b).to_f32().to_bits(),
                            "{isa:?} {dh}"
                        );
                    }
                }
                let mut d = dst.clone();
                assert!(!gather_widen_finite(
                    isa,
                    &table,
                    &[1, 0, 4],
                    &offsets,
                    &mut d
                ));
                assert!(!gather_widen_finite(
                    isa,
                    &table,
                    &[1, -4, 2],
                    &offsets,
                    &mut d
                ));
                // Row 3 is read (head 1); row 5 is not.
                for at in 0..dh {
                    for bad in [0x7fc0u16, 0xffc1, 0x7f80, 0xff80] {
                        let mut t = table.clone();
                        t[3 * dh + at] = bad;
                        let ok = gather_widen_finite(isa, &t, &hashes, &offsets, &mut d);
                        assert!(!ok, "{isa:?} {dh}: {bad:#x} at {at}");
                        let mut t = table.clone();
                        t[5 * dh + at] = bad;
                        assert!(gather_widen_finite(isa, &t, &hashes, &offsets, &mut d));
                    }
                }
            }
        }
    }

    #[test]
    fn gather_finite_finds_a_non_finite_value_at_every_position_on_every_isa() {
        for isa in Isa::all_supported() {
            // One row: a body of 16-lane chunks and a tail, and a tail alone.
            for len in [64usize, 37, 5] {
                let src: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 1e30).collect();
                let mut dst = vec![0.0f32; len];
                assert!(
                    gather_finite(isa, &src, &[0], &[0], &mut dst),
                    "{isa:?} len {len}"
                );
                assert_eq!(src, dst);
                // Finite edge values pass (their products with zero are ±0); every NaN,
                // whatever its sign or payload, does not.
                for (v, ok) in [
                    (-0.0f32, true),
                    (f32::MIN_POSITIVE / 8.0, true),
                    (f32::MAX, true),
                    (f32::MIN, true),
                    (f32::from_bits(0xffc0_0000), false),
                    (f32::from_bits(0x7f80_0001), false),
                ] {
                    let mut s = src.clone();
                    s[len - 1] = v;
                    s[0] = v;
                    let mut d = vec![0.0f32; len];
                    assert_eq!(
                        gather_finite(isa, &s, &[0], &[0], &mut d),
                        ok,
                        "{isa:?} {v}"
                    );
                    let same = s.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} len {len}: {v} copied bit for bit");
                }
                for at in 0..len {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let mut s = src.clone();
                        s[at] = bad;
                        let mut d = vec![0.0f32; len];
                        let ok = gather_finite(isa, &s, &[0], &[0], &mut d);
                        assert!(!ok, "{isa:?} len {len}: {bad} at {at}");
                        assert_eq!(d[at].to_bits(), bad.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn gate_token_equals_plain_ops_on_every_isa() {
        let (d, hc) = (72, 3); // 72: a 16-lane body and an 8-wide tail
        let proj = pseudo((1 + hc) * d, 1);
        let query = pseudo(hc * d, 2);
        let vb = pseudo(d, 3);
        let kb: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 10 + i as u32)).collect();
        let n1: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 20 + i as u32)).collect();
        let n2: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 30 + i as u32)).collect();
        let cn: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 40 + i as u32)).collect();
        let n12: Vec<Vec<f32>> = (0..hc)
            .map(|i| n1[i].iter().zip(&n2[i]).map(|(a, b)| a * b).collect())
            .collect();
        let p = GateParams {
            value_bias: &vb,
            key_bias: &kb,
            norm12: &n12,
            conv_norm: &cn,
        };
        let value: Vec<f32> = proj[..d].iter().zip(&vb).map(|(a, b)| a + b).collect();
        for isa in Isa::all_supported() {
            let (mut g, mut gated, mut normed) =
                (vec![0.0; hc], vec![0.0; hc * d], vec![0.0; hc * d]);
            assert!(gate_token(
                isa,
                &p,
                &proj,
                &query,
                Ahead::default(),
                &mut g,
                &mut normed
            ));
            // The next token's rows are only prefetched: with next rows (or ones of the
            // wrong length, which are ignored) the outputs are the same bits.
            let (next_q, next_p) = (pseudo(hc * d, 50), pseudo((1 + hc) * d, 51));
            for (nq, np) in [
                (&next_q[..], &next_p[..]),
                (&next_q[..d], &next_p[..d]),
                (&next_q[..], &[][..]),
            ] {
                let (mut g3, mut n3) = (vec![0.0; hc], vec![0.0; hc * d]);
                let next = Ahead {
                    query: nq,
                    proj: np,
                };
                assert!(gate_token(isa, &p, &proj, &query, next, &mut g3, &mut n3));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!((bits(&g3), bits(&n3)), (bits(&g), bits(&normed)), "{isa:?}");
            }
            // A NaN or an infinity in a branch's query (body or tail) is reported; a
            // finite one is not.
            for (at, bad) in [
                (5, f32::NAN),
                (d + 70, f32::INFINITY),
                (2 * d + 1, -f32::INFINITY),
            ] {
                let mut q = query.clone();
                q[at] = bad;
                let (mut g2, mut n2) = (vec![0.0; hc], vec![0.0; hc * d]);
                assert!(
                    !gate_token(isa, &p, &proj, &q, Ahead::default(), &mut g2, &mut n2),
                    "{isa:?} {at}"
                );
                q[at] = 1e3;
                assert!(
                    gate_token(isa, &p, &proj, &q, Ahead::default(), &mut g2, &mut n2),
                    "{isa:?} {at}"
                );
            }
            let gv = GatedValue {
                value: &proj[..d],
                bias: &vb,
                gates: &g,
            };
            gated_row(isa, &gv, &mut gated);
            for i in 0..hc {
                let key: Vec<f32> = proj[(1 + i) * d..(2 + i) * d]
                    .iter()
                    .zip(&kb[i])
                    .map(|(a, b)| a + b)
                    .collect();
                let want = ops::gate(&key, &query[i * d..(i + 1) * d], &n1[i], &n2[i]);
                assert!(
                    (g[i] - want).abs() < 1e-6,
                    "{isa:?} gate {i}: {} vs {want}",
                    g[i]
                );
                let gv: Vec<f32> = value.iter().map(|v| want * v).collect();
                let nn = ops::rms_norm(&gv, &cn[i], ops::RMS_EPS_CONV);
                for j in 0..d {
                    assert!((gated[i * d + j] - gv[j]).abs() < 1e-6);
                    assert!((normed[i * d + j] - nn[j]).abs() < 1e-5, "{isa:?} normed");
                }
            }
        }
    }

    /// The fused output row (gated value + SiLU(conv)) against the plain conv, with a
    /// 16-lane body and a tail per branch (D = 20), and rows before the start.
    #[test]
    fn conv_row_equals_plain_conv_on_every_isa() {
        // 4 taps: the unrolled tap sets; 6: more than those, gathered per call.
        for taps in [4, 6] {
            conv_row_case(taps);
        }
    }

    /// Three rows a dilation apart through `conv_rows3`: the same bits as `conv_row` row
    /// by row, on every ISA, with a 16-lane body and a tail per branch (D = 20).
    #[test]
    fn conv_rows3_equals_conv_row_bit_for_bit() {
        // 20: one chunk and a tail; 16·17 + 4: a full block of CONV_BLOCK chunks, a
        // partial one and a tail.
        for d in [20, LANES * (CONV_BLOCK + 1) + 4] {
            conv_rows3_case(d);
        }
    }

    fn conv_rows3_case(d: usize) {
        let (hc, dil, len) = (2, 3, 30);
        let (c, taps) = (hc * d, TRIO_TAPS);
        let x = pseudo(len * c, 15);
        let wt = pseudo(taps * c, 16);
        let values: Vec<Vec<f32>> = (0..3).map(|g| pseudo(d, 17 + g)).collect();
        let bias = pseudo(d, 20);
        let gates = [[0.25f32, 0.75], [0.5, 0.125], [0.9, 0.3]];
        let gvs: Vec<GatedValue<'_>> = (0..3)
            .map(|g| GatedValue {
                value: &values[g],
                bias: &bias,
                gates: &gates[g],
            })
            .collect();
        let taps_of = |t: usize| -> Vec<Option<&[f32]>> {
            (0..taps)
                .map(|k| {
                    let back = (taps - 1 - k) * dil;
                    Some(&x[(t - back) * c..(t - back + 1) * c])
                })
                .collect()
        };
        for isa in Isa::all_supported() {
            for t0 in [9, 12, 20] {
                let ts = [t0, t0 + dil, t0 + 2 * dil];
                let rows: Vec<Vec<Option<&[f32]>>> = ts.iter().map(|&t| taps_of(t)).collect();
                let mut want = vec![vec![0.0f32; c]; 3];
                for g in 0..3 {
                    conv_row(isa, &wt, &rows[g], &gvs[g], &mut want[g]);
                }
                // Three outputs by `f`, compared bit for bit with `want`.
                let check = |label: &str, f: &dyn Fn([&mut [f32]; 3])| {
                    let mut got = vec![vec![f32::NAN; c]; 3];
                    let [a, b, e] = &mut got[..] else {
                        unreachable!()
                    };
                    f([a, b, e]);
                    for g in 0..3 {
                        let same = got[g]
                            .iter()
                            .zip(&want[g])
                            .all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(same, "{label} d {d} t0 {t0} row {g}");
                    }
                };
                let r3 = [&rows[0][..], &rows[1][..], &rows[2][..]];
                let g3 = [&gvs[0], &gvs[1], &gvs[2]];
                check(&format!("{isa:?}"), &|out| {
                    conv_rows3(isa, &wt, r3, g3, out)
                });
                if isa == Isa::Generic {
                    // Both passes on the portable lanes, whichever the CPU's ISAs take.
                    for two_pass in [false, true] {
                        check(&format!("portable two_pass {two_pass}"), &|out| {
                            conv_rows3_in::<Arr<{ HAS_BASELINE_FMA }>>(two_pass, &wt, r3, g3, out)
                        });
                    }
                }
            }
        }
    }

    fn conv_row_case(taps: usize) {
        let (d, hc, dil, len) = (20, 2, 3, 24);
        let c = hc * d;
        let x = pseudo(len * c, 5);
        let w = pseudo(c * taps, 6); // [C, taps] as the state dict stores it
        let value = pseudo(d, 7);
        let bias = pseudo(d, 8);
        let gates = [0.25f32, 0.75];
        let y = ops::causal_conv(&x, &w, c, taps, dil, 0);
        let mut wt = vec![0.0; taps * c];
        for ch in 0..c {
            for k in 0..taps {
                wt[k * c + ch] = w[ch * taps + k];
            }
        }
        let gv = GatedValue {
            value: &value,
            bias: &bias,
            gates: &gates,
        };
        for isa in Isa::all_supported() {
            let mut gated = vec![0.0f32; c];
            gated_row(isa, &gv, &mut gated);
            for t in 0..len {
                let rows: Vec<Option<&[f32]>> = (0..taps)
                    .map(|k| {
                        let back = (taps - 1 - k) * dil;
                        (t >= back).then(|| &x[(t - back) * c..(t - back + 1) * c])
                    })
                    .collect();
                let mut out = vec![f32::NAN; c];
                conv_row(isa, &wt, &rows, &gv, &mut out);
                for ch in 0..c {
                    let (i, j) = (ch / d, ch % d);
                    let g = gates[i] * (value[j] + bias[j]);
                    assert_eq!(gated[ch], g, "{isa:?} gated {ch}");
                    let want = g + ops::silu(y[t * c + ch]);
                    assert!((out[ch] - want).abs() < 1e-6, "{isa:?} t {t} c {ch}");
                }
                // The later taps summed first (conv_row_pre), then the earlier ones and
                // the SiLU (conv_row_finish), for every cut. With nothing on one side of
                // the cut the operations are conv_row's, in its order, so the bits match:
                // the boundary fix-up sums every tap in conv_row_pre (cut 0). Otherwise
                // the taps are summed in another order, hence a relative tolerance.
                for cut in 0..=taps {
                    let later: Vec<Option<&[f32]>> = rows
                        .iter()
                        .enumerate()
                        .map(|(k, r)| r.filter(|_| k >= cut))
                        .collect();
                    let earlier: Vec<Option<&[f32]>> = rows
                        .iter()
                        .enumerate()
                        .map(|(k, r)| r.filter(|_| k < cut))
                        .collect();
                    let mut pre = vec![f32::NAN; c];
                    conv_row_pre(isa, &wt, &later, &mut pre);
                    let mut fin = gated.clone();
                    conv_row_finish(isa, &wt, &earlier, &mut pre, &mut fin);
                    for ch in 0..c {
                        if cut == 0 || cut == taps {
                            assert_eq!(
                                fin[ch].to_bits(),
                                out[ch].to_bits(),
                                "{isa:?} t {t} cut {cut}: fix-up {ch}"
                            );
                        } else {
                            assert!(
                                (fin[ch] - out[ch]).abs() <= 1e-6 * out[ch].abs().max(1.0),
                                "{isa:?} t {t} cut {cut}: fix-up {ch}"
                            );
                        }
                    }
                }
            }
        }
    }
}
