//! The projection GEMM `y[M, N] = x[M, K] · W_allᵀ`, N = (1+HC)·D (value_proj and every
//! key_projs.i as one matrix), K = Dm. Weights are packed once, at load.
//!
//! - f32: the `gemm` crate (run-time SIMD dispatch, rayon), weights stored [K, N].
//! - bf16: our AVX512-BF16 microkernel (`vdpbf16ps`, f32 accumulation) on weights packed in
//!   64-column panels of bf16 pairs along K; elsewhere the `gemm` crate on the same bf16-rounded
//!   operands widened to f32 (products of bf16 values are exact in f32, so it is the same math).

use super::DType;
use half::bf16;

/// Columns per packed bf16 panel (4 × 16 lanes).
const NR: usize = 64;
/// Rows per microkernel call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the microkernels are x86-64 only
const MR: usize = 6;

#[derive(Debug, Clone)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // panels are packed on x86-64 only
enum Packed {
    /// [K, N] row-major f32 (for the `gemm` crate) and [N, K] (PyTorch layout, for few rows).
    F32(Vec<f32>, Vec<f32>),
    /// [N/NR][K][NR] f32 panels for our AVX-512 microkernel, used for every row count: each
    /// output is one FMA chain over k in order, whatever M, so a row's projection is
    /// bit-identical however a sequence is split into chunks.
    F32Panels(Vec<f32>),
    /// [N/NR][K/2][NR][2] bf16 (K padded to even, N padded to NR).
    Bf16Panels(Vec<bf16>),
    /// [K, N] f32 holding bf16-rounded values (fallback without AVX512-BF16).
    Bf16AsF32(Vec<f32>),
}

/// Packed projection weights.
#[derive(Debug, Clone)]
pub struct Projection {
    k: usize,
    n: usize,
    packed: Packed,
}

fn has_avx512() -> bool {
    super::kernels::Isa::detect() == super::kernels::Isa::Avx512
}

fn has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
            && super::kernels::Isa::detect() == super::kernels::Isa::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Projection {
    /// Packs `mats` (each [D, K] in PyTorch layout, stacked along the output dim) for the
    /// fastest kernel this CPU runs.
    pub fn pack(mats: &[&[f32]], k: usize, dtype: DType) -> Self {
        Self::pack_with(mats, k, dtype, true)
    }

    /// [`Projection::pack`]; `own_kernels = false` keeps to the `gemm` crate for f32 (and the
    /// widened fallback for bf16), which is what CPUs without AVX-512 run.
    pub fn pack_with(mats: &[&[f32]], k: usize, dtype: DType, own_kernels: bool) -> Self {
        let n: usize = mats.iter().map(|m| m.len() / k).sum();
        // W_allᵀ as [K, N].
        let mut kn = vec![0.0f32; k * n];
        let mut col0 = 0;
        for m in mats {
            let rows = m.len() / k;
            for o in 0..rows {
                for i in 0..k {
                    kn[i * n + col0 + o] = m[o * k + i];
                }
            }
            col0 += rows;
        }
        let packed = match dtype {
            DType::F32 if own_kernels && has_avx512() => {
                let np = n.div_ceil(NR) * NR;
                let mut v = vec![0.0f32; np * k];
                for panel in 0..np / NR {
                    for kk in 0..k {
                        for c in 0..NR {
                            let col = panel * NR + c;
                            if col < n {
                                v[(panel * k + kk) * NR + c] = kn[kk * n + col];
                            }
                        }
                    }
                }
                Packed::F32Panels(v)
            }
            DType::F32 => Packed::F32(kn, mats.concat()),
            DType::Bf16 if own_kernels && has_avx512bf16() => {
                let (kp, np) = (k.div_ceil(2), n.div_ceil(NR) * NR);
                let mut v = vec![bf16::ZERO; np / NR * kp * NR * 2];
                for panel in 0..np / NR {
                    for p in 0..kp {
                        for c in 0..NR {
                            let col = panel * NR + c;
                            for h in 0..2 {
                                let row = 2 * p + h;
                                if col < n && row < k {
                                    v[((panel * kp + p) * NR + c) * 2 + h] =
                                        bf16::from_f32(kn[row * n + col]);
                                }
                            }
                        }
                    }
                }
                Packed::Bf16Panels(v)
            }
            DType::Bf16 => {
                Packed::Bf16AsF32(kn.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
            }
        };
        Projection { k, n, packed }
    }

    /// Output width N (= (1+HC)·D).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        match self.packed {
            Packed::F32(..) | Packed::F32Panels(_) => DType::F32,
            _ => DType::Bf16,
        }
    }

    /// Whether one of our microkernels runs on weights packed once (so that small tiles
    /// cost no re-packing).
    pub fn uses_own_kernel(&self) -> bool {
        matches!(self.packed, Packed::Bf16Panels(_) | Packed::F32Panels(_))
    }

    /// `y[rows, N] = x[rows, K] · W`, on `threads` threads.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32], threads: usize) {
        let (k, n) = (self.k, self.n);
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(y.len(), rows * n);
        match &self.packed {
            Packed::F32(_, nk) if rows <= SMALL_M => small_m_f32(x, nk, y, rows, k, n, threads),
            Packed::F32(kn, _) => gemm_f32(x, kn, y, rows, k, n, threads),
            #[cfg(target_arch = "x86_64")]
            Packed::F32Panels(w) => {
                // SAFETY: `F32Panels` is only built when the CPU has AVX-512F.
                unsafe { f32_avx512::matmul(x, w, y, rows, k, n, threads) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Packed::F32Panels(_) => unreachable!("f32 panels are only packed on x86-64"),
            Packed::Bf16AsF32(w) => {
                let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                gemm_f32(&xr, w, y, rows, k, n, threads)
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Bf16Panels(w) => {
                // SAFETY: `Bf16Panels` is only built when the CPU has AVX512F and AVX512-BF16.
                unsafe { bf16_avx512::matmul(x, w, y, rows, k, n, threads) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Packed::Bf16Panels(_) => unreachable!("bf16 panels are only packed on x86-64"),
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

/// The shared driver of our microkernels: every (column panel of NR, block of at most MR
/// rows) goes through `block(panel, r0, mr, out)`, which writes an `[mr, NR]` block; the
/// driver handles the row tail (smaller `mr`), the column tail (a narrower copy out of the
/// block) and threading over panels (disjoint columns of y).
#[cfg(target_arch = "x86_64")]
fn panel_driver(
    m: usize,
    n: usize,
    y: &mut [f32],
    threads: usize,
    block: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(y.len(), m * n, "y must be [m, n]");
    let panels = n.div_ceil(NR);
    let yaddr = y.as_mut_ptr() as usize;
    let work = |panel: usize| {
        let cols = NR.min(n - panel * NR);
        let mut buf = [0.0f32; MR * NR];
        let mut r0 = 0;
        while r0 < m {
            let mr = (m - r0).min(MR);
            block(panel, r0, mr, &mut buf[..mr * NR]);
            for r in 0..mr {
                // SAFETY: y is [m, n] (asserted above) and this closure writes only columns
                // [panel·NR, panel·NR + cols) of rows r0..r0+mr; each panel is handled once,
                // so no two threads touch the same element.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        (yaddr as *mut f32).add((r0 + r) * n + panel * NR),
                        cols,
                    )
                };
                dst.copy_from_slice(&buf[r * NR..r * NR + cols]);
            }
            r0 += mr;
        }
    };
    if threads > 1 {
        use rayon::prelude::*;
        (0..panels).into_par_iter().for_each(work);
    } else {
        (0..panels).for_each(work);
    }
}

#[cfg(target_arch = "x86_64")]
mod f32_avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Driver: every (column panel, block of MR rows) through the 6×64 microkernel; panels
    /// write their columns of y directly; the tails of M use fewer rows, N is padded.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    pub unsafe fn matmul(
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
    ) {
        super::panel_driver(m, n, y, threads, |panel, r0, mr, out| {
            let wpan = &w[panel * k * NR..(panel + 1) * k * NR];
            // SAFETY: the caller guarantees AVX-512F; slices are in bounds.
            unsafe { kernel(&x[r0 * k..(r0 + mr) * k], k, mr, wpan, out) };
        });
    }

    /// y[mr, 64] = x[mr, k] · panel[k, 64]: 6×4 zmm accumulators, one broadcast of x and four
    /// loads of the panel per k.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(x: &[f32], k: usize, mr: usize, w: &[f32], y: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        let wp = w.as_ptr();
        for kk in 0..k {
            // SAFETY: the panel holds k·NR floats = 4 zmm per k; kk < k.
            let b: [__m512; 4] = unsafe {
                [
                    _mm512_loadu_ps(wp.add(kk * NR)),
                    _mm512_loadu_ps(wp.add(kk * NR + 16)),
                    _mm512_loadu_ps(wp.add(kk * NR + 32)),
                    _mm512_loadu_ps(wp.add(kk * NR + 48)),
                ]
            };
            for (r, row) in acc.iter_mut().enumerate().take(mr) {
                let a = _mm512_set1_ps(x[r * k + kk]);
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(a, b[j], *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(mr) {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: y holds mr·64 floats.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(r * NR + j * 16), *v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod bf16_avx512 {
    use super::{MR, NR};
    use half::bf16;
    use std::arch::x86_64::*;

    /// Driver: converts x to bf16 pairs, then runs the MR×NR microkernel over every
    /// (row block, column panel); the tails of M use a smaller row count, N is padded.
    ///
    /// # Safety
    /// The CPU must support AVX512F and AVX512-BF16.
    pub unsafe fn matmul(
        x: &[f32],
        w: &[bf16],
        y: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
    ) {
        let kp = k.div_ceil(2);
        // x as [m][kp] u32 = (bf16 x[2p], bf16 x[2p+1]).
        let mut xp = vec![0u32; m * kp];
        for r in 0..m {
            for p in 0..kp {
                let lo = bf16::from_f32(x[r * k + 2 * p]).to_bits() as u32;
                let hi = if 2 * p + 1 < k {
                    bf16::from_f32(x[r * k + 2 * p + 1]).to_bits() as u32
                } else {
                    0
                };
                xp[r * kp + p] = lo | (hi << 16);
            }
        }
        super::panel_driver(m, n, y, threads, |panel, r0, mr, out| {
            let wpan = &w[panel * kp * NR * 2..(panel + 1) * kp * NR * 2];
            // SAFETY: the caller guarantees AVX512F + AVX512-BF16; slices are in bounds.
            unsafe { kernel(&xp[r0 * kp..(r0 + mr) * kp], kp, mr, wpan, out) };
        });
    }

    /// y[mr, 64] = sum over k-pairs of dpbf16(xpair, wpanel): 6×4 zmm accumulators.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel(xp: &[u32], kp: usize, mr: usize, w: &[bf16], y: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        let wp = w.as_ptr() as *const __m512i;
        for p in 0..kp {
            // SAFETY: the panel holds kp·NR·2 bf16 = kp·4 zmm; p < kp.
            let b: [__m512bh; 4] = unsafe {
                [
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(p * 4))),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(p * 4 + 1))),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(p * 4 + 2))),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(wp.add(p * 4 + 3))),
                ]
            };
            for r in 0..mr {
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    xp[r * kp + p] as i32,
                ));
                for j in 0..4 {
                    acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(mr) {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: y holds mr·64 floats.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(r * NR + j * 16), *v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn f32_and_bf16_match_plain_product() {
        // Odd sizes: tails in M (not a multiple of 6), N (not of 64) and K (odd).
        let (k, rows) = (37, 13);
        let a = data(40 * k, 1);
        let b = data(50 * k, 2);
        let x = data(rows * k, 3);
        let want = plain(&x, &[&a, &b], k);
        for (dtype, tol, own) in [
            (DType::F32, 1e-5, true),
            (DType::F32, 1e-5, false),
            (DType::Bf16, 0.08, true),
            (DType::Bf16, 0.08, false),
        ] {
            let p = Projection::pack_with(&[&a, &b], k, dtype, own);
            for threads in [1, 2] {
                let mut y = vec![0.0; rows * 90];
                p.matmul(&x, rows, &mut y, threads);
                let err = y
                    .iter()
                    .zip(&want)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < tol, "{dtype:?} threads {threads}: {err}");
            }
        }
        // bf16 against the exact product of bf16-rounded operands.
        let r = |v: &[f32]| {
            v.iter()
                .map(|&t| bf16::from_f32(t).to_f32())
                .collect::<Vec<_>>()
        };
        let want = plain(&r(&x), &[&r(&a), &r(&b)], k);
        let p = Projection::pack(&[&a, &b], k, DType::Bf16);
        let mut y = vec![0.0; rows * 90];
        p.matmul(&x, rows, &mut y, 1);
        let err = y
            .iter()
            .zip(&want)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "bf16 kernel vs rounded operands: {err}");
    }
}
