//! Activation quantisation of the DeepSeek-V4.1 fp8 GEMM; the fp8 formats themselves live in
//! [`crate::rows::fp8`] (re-exported here).

pub use crate::rows::fp8::*;

/// Re-quantises one block of at most 32 values as the reference's activation quantiser does
/// before its fp8 GEMM: amax clamped to 1e-4, scale 2^ceil(log2(amax / 448)) (ue8m0), codes
/// e4m3 of x / scale. Returns the scale; `x` becomes codes · scale (for values that already
/// are e4m3 · 2^e, unchanged).
pub fn requantize_block(x: &mut [f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-4);
    let ratio = amax / 448.0;
    // 2^ceil(log2(ratio)) from the bits: the exponent, plus one unless a power of two.
    let bits = ratio.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    if bits & 0x7F_FFFF != 0 {
        e += 1;
    }
    let scale = 2f32.powi(e);
    let inv = 1.0 / scale; // a power of two: x · inv is x / scale exactly
    for v in x.iter_mut() {
        *v = e4m3_to_f32(f32_to_e4m3(*v * inv)) * scale;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requantising_e4m3_values_changes_nothing() {
        let mut x: Vec<f32> = (0..32)
            .map(|i| e4m3_to_f32((i * 7 % 120) as u8) * 0.25)
            .collect();
        x[3] = -x[3];
        let before = x.clone();
        requantize_block(&mut x);
        assert_eq!(x, before);
        // Below the 1e-4 clamp a block is coarsened, as in the reference.
        let mut tiny = vec![3e-7f32; 32];
        requantize_block(&mut tiny);
        assert_ne!(tiny[0], 3e-7);
    }
}
