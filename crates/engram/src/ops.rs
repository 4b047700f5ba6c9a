//! Plain, obviously-correct reference ops (reference §4-6). The fused kernels in
//! [`crate::fused`] are tested against these.

/// Default eps of `nn.RMSNorm` for float32 inputs: the f32 machine epsilon (used by `norm1`,
/// `norm2`).
pub const RMS_EPS_DEFAULT: f32 = f32::EPSILON;
/// eps of the short convolution's RMSNorms (`ShortConv(norm_eps=1e-5)`).
pub const RMS_EPS_CONV: f32 = 1e-5;
/// Floor of |s| before the signed square root of the gate.
pub const GATE_CLAMP: f32 = 1e-6;

/// `y[r, o] = sum_i x[r, i] · w[o, i] + b[o]`: `x` `[rows, inp]`, `w` `[out, inp]` (PyTorch
/// layout), `b` `[out]`. Returns `[rows, out]`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], inp: usize) -> Vec<f32> {
    let out = b.len();
    let rows = x.len() / inp;
    let mut y = vec![0.0f32; rows * out];
    for r in 0..rows {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            y[r * out + o] = dot(xr, wr) + b[o];
        }
    }
    y
}

/// Dot product with eight partial sums (the order differs from BLAS by rounding only).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `RMSNorm(x, w, eps) = x / sqrt(mean(x²) + eps) · w` over one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// `sigmoid(x) = 1 / (1 + e^-x)`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `SiLU(x) = x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// The gate of one branch (§5): `s = <RMSNorm(key), RMSNorm(q)> / sqrt(D)`,
/// `sigmoid(sqrt(max(|s|, 1e-6)) · sign(s))`.
pub fn gate(key: &[f32], query: &[f32], norm1: &[f32], norm2: &[f32]) -> f32 {
    let k = rms_norm(key, norm1, RMS_EPS_DEFAULT);
    let q = rms_norm(query, norm2, RMS_EPS_DEFAULT);
    let s = k.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>() / (key.len() as f32).sqrt();
    sigmoid(signed_sqrt(s))
}

/// `sqrt(max(|s|, 1e-6)) · sign(s)`, with sign(0) = 0.
pub fn signed_sqrt(s: f32) -> f32 {
    let sign = if s > 0.0 {
        1.0
    } else if s < 0.0 {
        -1.0
    } else {
        0.0
    };
    s.abs().max(GATE_CLAMP).sqrt() * sign
}

/// Causal dilated depthwise convolution over time (§6), no bias.
///
/// `x`: `[hist + len, C]` rows, of which the first `hist` are carried history (zeros at the
/// sequence start); `w`: `[C, taps]`. Output row t (0..len) is
/// `y[t, c] = sum_k w[c, k] · x[hist + t - (taps-1-k)·dilation, c]`, terms before row 0 are zero.
pub fn causal_conv(
    x: &[f32],
    w: &[f32],
    channels: usize,
    taps: usize,
    dilation: usize,
    hist: usize,
) -> Vec<f32> {
    let rows = x.len() / channels;
    let len = rows - hist;
    let mut y = vec![0.0f32; len * channels];
    for t in 0..len {
        for c in 0..channels {
            let mut acc = 0.0f32;
            for k in 0..taps {
                let back = (taps - 1 - k) * dilation;
                if hist + t >= back {
                    acc += w[c * taps + k] * x[(hist + t - back) * channels + c];
                }
            }
            y[t * channels + c] = acc;
        }
    }
    y
}

/// The index of the first NaN or infinity in `v`. The common case, none, is one
/// branch-free pass (a max over the magnitudes' bits, which the compiler vectorises); the
/// position is looked for only when that finds one. Used on every gathered row and
/// on the hidden states, where `iter().position` ran one compare and branch per value.
pub fn first_non_finite(v: &[f32]) -> Option<usize> {
    // |x| as bits is at least the exponent mask exactly when x is infinite or NaN.
    const EXP: u32 = 0x7f80_0000;
    let worst = v.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff));
    if worst < EXP {
        None
    } else {
        v.iter().position(|x| !x.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::first_non_finite;

    /// The fast scan agrees with the plain position on finite rows and on every kind of
    /// non-finite value at every place, including the largest finite values (which must
    /// not count).
    #[test]
    fn first_non_finite_equals_plain_position() {
        let plain = |v: &[f32]| v.iter().position(|x| !x.is_finite());
        let base: Vec<f32> = (0..67)
            .map(|i| match i % 4 {
                0 => f32::MAX,
                1 => -f32::MAX,
                2 => f32::MIN_POSITIVE * 0.5,
                _ => i as f32 - 30.0,
            })
            .collect();
        assert_eq!(first_non_finite(&base), None);
        assert_eq!(first_non_finite(&[]), None);
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in 0..base.len() {
                let mut v = base.clone();
                v[at] = bad;
                if at + 5 < v.len() {
                    v[at + 5] = f32::NAN; // a later one is not the first
                }
                assert_eq!(first_non_finite(&v), plain(&v));
                assert_eq!(first_non_finite(&v), Some(at));
            }
        }
    }
}
