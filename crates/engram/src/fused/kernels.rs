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

    fn best_supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
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
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

/// Defines `$name(isa, args...)` that runs `$body` compiled for the chosen ISA.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx512` is only produced when the CPU reports these features.
                Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2` is only produced when the CPU reports AVX2 and FMA.
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    };
}

/// Lanes of the partial sums: 16 f32 = one AVX-512 register, two AVX2 registers.
const LANES: usize = 16;

#[inline(always)]
fn hsum(a: [f32; LANES]) -> f32 {
    let mut s = 0.0;
    for x in a {
        s += x;
    }
    s
}

/// e^x for f32, Cephes-style: x = n·ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n by
/// exponent bits. Relative error ~2 ulp; branch-free so that it vectorises.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r * r, r) + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// SiLU with the vectorisable exp.
#[inline(always)]
fn silu_f32(y: f32) -> f32 {
    y / (1.0 + exp_f32(-y))
}

/// Per-branch constants of the gate kernel.
pub struct GateParams<'a> {
    /// `value_proj.bias` [D].
    pub value_bias: &'a [f32],
    /// `key_projs.{i}.bias`, [HC][D].
    pub key_bias: &'a [Vec<f32>],
    /// `norm1.{i}.weight · norm2.{i}.weight`, [HC][D].
    pub norm12: &'a [Vec<f32>],
    /// `short_conv.norms.{i}.weight`, [HC][D].
    pub conv_norm: &'a [Vec<f32>],
}

dispatch! {
    /// The gate of one token (§5) and the conv's RMSNorm (§6), in one pass per branch.
    ///
    /// `proj`: [(1+HC)·D] = [value | key_0 | … | key_{HC-1}] without bias; `query`: [HC·D]
    /// hidden states; writes `gates` [HC], `gated` [HC·D] = g_i·value and `normed` [HC·D] =
    /// RMSNorm(gated_i)·w. Uses RMSNorm(g·v) = g·v / sqrt(g²·mean(v²) + eps) so that mean(v²)
    /// is computed once for all branches.
    pub fn gate_token(p: &GateParams<'_>, proj: &[f32], query: &[f32], gates: &mut [f32], gated: &mut [f32], normed: &mut [f32]) {
        let d = p.value_bias.len();
        let (value, keys) = proj.split_at(d);
        // value = proj + bias, and mean(value²).
        let mut v = [0.0f32; LANES];
        let mut msv = [0.0f32; LANES];
        let mut vbuf = vec![0.0f32; d];
        for ((o, x), b) in vbuf.chunks_exact_mut(LANES).zip(value.chunks_exact(LANES)).zip(p.value_bias.chunks_exact(LANES)) {
            for l in 0..LANES {
                v[l] = x[l] + b[l];
                msv[l] = v[l].mul_add(v[l], msv[l]);
                o[l] = v[l];
            }
        }
        let body = d / LANES * LANES;
        for j in body..d {
            let x = value[j] + p.value_bias[j];
            msv[0] = x.mul_add(x, msv[0]);
            vbuf[j] = x;
        }
        let msv = hsum(msv) / d as f32;
        let inv_sqrt_d = 1.0 / (d as f32).sqrt();
        for i in 0..gates.len() {
            let k = &keys[i * d..(i + 1) * d];
            let q = &query[i * d..(i + 1) * d];
            let (mut sk, mut sq, mut skq) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
            for (((kc, bc), qc), wc) in k.chunks_exact(LANES).zip(p.key_bias[i].chunks_exact(LANES)).zip(q.chunks_exact(LANES)).zip(p.norm12[i].chunks_exact(LANES)) {
                for l in 0..LANES {
                    let kk = kc[l] + bc[l];
                    sk[l] = kk.mul_add(kk, sk[l]);
                    sq[l] = qc[l].mul_add(qc[l], sq[l]);
                    skq[l] = (kk * qc[l]).mul_add(wc[l], skq[l]);
                }
            }
            for j in body..d {
                let kk = k[j] + p.key_bias[i][j];
                sk[0] = kk.mul_add(kk, sk[0]);
                sq[0] = q[j].mul_add(q[j], sq[0]);
                skq[0] = (kk * q[j]).mul_add(p.norm12[i][j], skq[0]);
            }
            let rk = 1.0 / (hsum(sk) / d as f32 + RMS_EPS_DEFAULT).sqrt();
            let rq = 1.0 / (hsum(sq) / d as f32 + RMS_EPS_DEFAULT).sqrt();
            let s = hsum(skq) * rk * rq * inv_sqrt_d;
            let sign = if s > 0.0 { 1.0 } else if s < 0.0 { -1.0 } else { 0.0 };
            let g = 1.0 / (1.0 + (-(s.abs().max(GATE_CLAMP).sqrt() * sign)).exp());
            gates[i] = g;
            let scale = g / (g * g * msv + RMS_EPS_CONV).sqrt();
            let go = &mut gated[i * d..(i + 1) * d];
            let no = &mut normed[i * d..(i + 1) * d];
            for (((go, no), vv), w) in go.chunks_exact_mut(LANES).zip(no.chunks_exact_mut(LANES)).zip(vbuf.chunks_exact(LANES)).zip(p.conv_norm[i].chunks_exact(LANES)) {
                for l in 0..LANES {
                    go[l] = g * vv[l];
                    no[l] = scale * vv[l] * w[l];
                }
            }
            for j in body..d {
                go[j] = g * vbuf[j];
                no[j] = scale * vbuf[j] * p.conv_norm[i][j];
            }
        }
    }
}

dispatch! {
    /// One output row of the short conv (§6): `out[c] += SiLU(sum_k w[k][c] · rows[k][c])`.
    /// `rows[k]` is the normalised row at t - (taps-1-k)·dilation, `None` before the start;
    /// `w_tap_major`: [taps][C]. `out` holds gated_value and receives the residual sum.
    pub fn conv_row(w_tap_major: &[f32], rows: &[Option<&[f32]>], out: &mut [f32]) {
        let c = out.len();
        let mut acc = vec![0.0f32; c];
        for (k, row) in rows.iter().enumerate() {
            if let Some(row) = row {
                let w = &w_tap_major[k * c..(k + 1) * c];
                for ((a, x), wv) in acc.chunks_exact_mut(LANES).zip(row.chunks_exact(LANES)).zip(w.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        a[l] = wv[l].mul_add(x[l], a[l]);
                    }
                }
                for j in c / LANES * LANES..c {
                    acc[j] = w[j].mul_add(row[j], acc[j]);
                }
            }
        }
        for (o, a) in out.chunks_exact_mut(LANES).zip(acc.chunks_exact(LANES)) {
            for l in 0..LANES {
                o[l] += silu_f32(a[l]);
            }
        }
        for j in c / LANES * LANES..c {
            out[j] += silu_f32(acc[j]);
        }
    }
}

dispatch! {
    /// The pre-activation conv sum of one row, `y[c] = sum_k w[k][c] · rows[k][c]`, for the
    /// boundary fix-up (which adds the taps that reach into a neighbour's rows later).
    pub fn conv_row_pre(w_tap_major: &[f32], rows: &[Option<&[f32]>], y: &mut [f32]) {
        let c = y.len();
        y.fill(0.0);
        for (k, row) in rows.iter().enumerate() {
            if let Some(row) = row {
                let w = &w_tap_major[k * c..(k + 1) * c];
                for ((a, x), wv) in y.chunks_exact_mut(LANES).zip(row.chunks_exact(LANES)).zip(w.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        a[l] = wv[l].mul_add(x[l], a[l]);
                    }
                }
                for j in c / LANES * LANES..c {
                    y[j] = w[j].mul_add(row[j], y[j]);
                }
            }
        }
    }
}

/// `out[c] = gated[c] + SiLU(y[c])` (scalar; used for the few boundary rows).
pub fn finish_row(gated: &[f32], y: &[f32], out: &mut [f32]) {
    for ((o, g), v) in out.iter_mut().zip(gated).zip(y) {
        *o = g + silu_f32(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

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
    fn gate_token_equals_plain_ops_on_every_isa() {
        let (d, hc) = (72, 3); // 72: a 16-lane body and an 8-wide tail
        let proj = pseudo((1 + hc) * d, 1);
        let query = pseudo(hc * d, 2);
        let vb = pseudo(d, 3);
        let kb: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 10 + i as u32)).collect();
        let n1: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 20 + i as u32)).collect();
        let n2: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 30 + i as u32)).collect();
        let cn: Vec<Vec<f32>> = (0..hc).map(|i| pseudo(d, 40 + i as u32)).collect();
        let n12: Vec<Vec<f32>> = (0..hc).map(|i| n1[i].iter().zip(&n2[i]).map(|(a, b)| a * b).collect()).collect();
        let p = GateParams { value_bias: &vb, key_bias: &kb, norm12: &n12, conv_norm: &cn };
        let value: Vec<f32> = proj[..d].iter().zip(&vb).map(|(a, b)| a + b).collect();
        for isa in Isa::all_supported() {
            let (mut g, mut gated, mut normed) = (vec![0.0; hc], vec![0.0; hc * d], vec![0.0; hc * d]);
            gate_token(isa, &p, &proj, &query, &mut g, &mut gated, &mut normed);
            for i in 0..hc {
                let key: Vec<f32> = proj[(1 + i) * d..(2 + i) * d].iter().zip(&kb[i]).map(|(a, b)| a + b).collect();
                let want = ops::gate(&key, &query[i * d..(i + 1) * d], &n1[i], &n2[i]);
                assert!((g[i] - want).abs() < 1e-6, "{isa:?} gate {i}: {} vs {want}", g[i]);
                let gv: Vec<f32> = value.iter().map(|v| want * v).collect();
                let nn = ops::rms_norm(&gv, &cn[i], ops::RMS_EPS_CONV);
                for j in 0..d {
                    assert!((gated[i * d + j] - gv[j]).abs() < 1e-6);
                    assert!((normed[i * d + j] - nn[j]).abs() < 1e-5, "{isa:?} normed");
                }
            }
        }
    }

    #[test]
    fn conv_row_equals_plain_conv_on_every_isa() {
        let (c, taps, dil, len) = (40, 4, 3, 20);
        let x = pseudo(len * c, 5);
        let w = pseudo(c * taps, 6); // [C, taps] as the state dict stores it
        let y = ops::causal_conv(&x, &w, c, taps, dil, 0);
        let mut wt = vec![0.0; taps * c];
        for ch in 0..c {
            for k in 0..taps {
                wt[k * c + ch] = w[ch * taps + k];
            }
        }
        for isa in Isa::all_supported() {
            for t in 0..len {
                let rows: Vec<Option<&[f32]>> = (0..taps)
                    .map(|k| {
                        let back = (taps - 1 - k) * dil;
                        (t >= back).then(|| &x[(t - back) * c..(t - back + 1) * c])
                    })
                    .collect();
                let mut out = vec![0.5f32; c];
                conv_row(isa, &wt, &rows, &mut out);
                for ch in 0..c {
                    let want = 0.5 + ops::silu(y[t * c + ch]);
                    assert!((out[ch] - want).abs() < 1e-6, "{isa:?} t {t} c {ch}");
                }
            }
        }
    }
}
