//! fp8 rows: e4m3fn codes with one e8m0 (power-of-two) scale per 32 values, as DeepSeek-V4.1
//! stores its Engram tables and `wkv`. [`Fp8Table`] leaves the table memory-mapped and
//! dequantises a row only when it is gathered.

use crate::error::{EngramError, Result};
use crate::tensors::RawTensor;
use safetensors::Dtype;

/// Values per fp8 scale.
pub const BLOCK: usize = 32;

/// IEEE f32 bits of an e4m3fn code (bias 7, no infinities; 0x7F and 0xFF are NaN; max 448).
const fn e4m3_bits(code: u8) -> u32 {
    let sign = ((code & 0x80) as u32) << 24;
    let e = ((code >> 3) & 0x0F) as u32;
    let m = (code & 0x07) as u32;
    if e == 0x0F && m == 0x07 {
        return 0x7FC0_0000 | sign;
    }
    if e == 0 {
        if m == 0 {
            return sign;
        }
        // Subnormal m/8 · 2^-6 = m · 2^-9: normalise the 3-bit m.
        let lead = 31 - m.leading_zeros(); // 0..=2
        let exp = 127 - 9 + lead;
        let frac = (m << (23 - lead)) & 0x7F_FFFF;
        return sign | (exp << 23) | frac;
    }
    sign | ((e + 127 - 7) << 23) | (m << 20)
}

/// Every e4m3fn code's value.
static E4M3: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = f32::from_bits(e4m3_bits(c as u8));
        c += 1;
    }
    t
};

/// The value of an e4m3fn code (bias 7, no infinities; 0x7F and 0xFF are NaN; max 448).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3[code as usize]
}

/// The value of an e8m0 scale byte: 2^(b - 127); 0xFF is NaN.
#[inline]
pub fn e8m0_to_f32(b: u8) -> f32 {
    match b {
        0xFF => f32::NAN,
        // 2^-127 is an f32 subnormal.
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// The nearest e4m3fn code to `x` (ties to even), for |x| <= 448 (larger magnitudes
/// saturate to ±448).
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0x7F | sign;
    }
    if a >= 448.0 {
        return 0x7E | sign;
    }
    if a < 1.0 / 64.0 {
        // Subnormal range: multiples of 2^-9 (8 of them reach the smallest normal, 2^-6,
        // whose code is 0x08: the count carries into the exponent field).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    // Keep 3 mantissa bits, rounding the 20 dropped ones to nearest even.
    let r = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20;
    let code = r - ((127 - 7) << 3);
    sign | code.min(0x7E) as u8
}

/// `x` rounded to bf16 (nearest even), as f32; NaN stays NaN.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        return f32::from_bits(b | 0x0040_0000); // quiet the NaN, keep it one
    }
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// Decodes one fp8 row: codes `[dim]`, one e8m0 scale per 32 codes, into bf16-rounded f32.
#[inline]
pub fn decode_row(codes: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((o, c), s) in out
        .chunks_exact_mut(BLOCK)
        .zip(codes.chunks_exact(BLOCK))
        .zip(scales)
    {
        let s = e8m0_to_f32(*s);
        for (o, &c) in o.iter_mut().zip(c) {
            *o = round_bf16(e4m3_to_f32(c) * s);
        }
    }
}

/// A table of e4m3 rows `[rows, dim]` with e8m0 scales `[rows, dim/32]`, left in its file.
#[derive(Debug, Clone)]
pub struct Fp8Table {
    codes: RawTensor,
    scales: RawTensor,
    rows: usize,
    dim: usize,
}

impl Fp8Table {
    /// Checks dtypes and shapes (`name` is the weight's key, for messages).
    pub fn new(
        name: &str,
        codes: RawTensor,
        scales: RawTensor,
        rows: usize,
        dim: usize,
    ) -> Result<Self> {
        let scale_name = name.replace(".weight", ".scale");
        if dim == 0 || !dim.is_multiple_of(BLOCK) {
            // One scale per BLOCK values: a partial block would leave values undecoded.
            return Err(EngramError::invalid(
                format!("{name}: row width"),
                format!("a positive multiple of {BLOCK}"),
                dim,
            ));
        }
        for (n, t, want) in [
            (name.to_string(), &codes, Dtype::F8_E4M3),
            (scale_name.clone(), &scales, Dtype::F8_E8M0),
        ] {
            if t.dtype != want {
                return Err(EngramError::DType {
                    name: n,
                    expected: format!("{want:?}"),
                    found: format!("{:?}", t.dtype),
                });
            }
        }
        for (n, t, want) in [
            (name.to_string(), &codes, vec![rows, dim]),
            (scale_name, &scales, vec![rows, dim / BLOCK]),
        ] {
            if t.shape != want {
                return Err(EngramError::Shape {
                    name: n,
                    expected: want,
                    found: t.shape.clone(),
                });
            }
        }
        Ok(Fp8Table {
            codes,
            scales,
            rows,
            dim,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The same table copied into process memory (codes and scales as stored: 1 + 1/32
    /// bytes per value), the file no longer read.
    pub fn to_ram(&self) -> Result<Self> {
        Ok(Fp8Table {
            codes: self
                .codes
                .to_owned_bytes("the fp8 table in RAM (--table-io ram)")?,
            scales: self
                .scales
                .to_owned_bytes("the fp8 table's scales in RAM (--table-io ram)")?,
            rows: self.rows,
            dim: self.dim,
        })
    }

    /// Row width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `r`'s codes and scales, as stored.
    #[inline]
    pub fn row_codes(&self, r: usize) -> (&[u8], &[u8]) {
        let b = self.dim / BLOCK;
        (
            &self.codes.data()[r * self.dim..(r + 1) * self.dim],
            &self.scales.data()[r * b..(r + 1) * b],
        )
    }

    /// Row `r` dequantised: e4m3(code) · 2^(scale - 127) in f32, rounded to bf16 (as the
    /// reference does), into `out` (`dim` values). Touches only that row's bytes.
    #[inline]
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (codes, scales) = self.row_codes(r);
        decode_row(codes, scales, out);
    }

    /// Asks the CPU to start loading row `r` (no effect where unsupported).
    #[inline]
    pub fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.codes.data()[r * self.dim..].as_ptr();
            // SAFETY: prefetch is a hint; `p` points into the mapped table.
            unsafe {
                std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = r;
    }
}

impl super::RowStore for Fp8Table {
    fn rows(&self) -> usize {
        self.rows
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        check_row(r, self.rows)?;
        Fp8Table::row_into(self, r, out);
        Ok(())
    }
    fn bf16_exact(&self) -> bool {
        true // decoded rows are rounded to bf16
    }
    fn prefetch(&self, rows: &[usize]) {
        for &r in rows {
            if r < self.rows {
                self.prefetch_row(r);
            }
        }
    }
}

/// A row id outside the table is an error naming both.
pub(crate) fn check_row(r: usize, rows: usize) -> Result<()> {
    if r >= rows {
        return Err(EngramError::invalid(
            "row id",
            format!("below the table's {rows} rows"),
            r,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row width that is not a whole number of scale blocks is refused (its last values
    /// would have no scale and stay undecoded).
    #[test]
    fn a_row_width_of_partial_blocks_is_refused() {
        let header = r#"{"t.weight":{"dtype":"F8_E4M3","shape":[2,40],"data_offsets":[0,80]},"t.scale":{"dtype":"F8_E8M0","shape":[2,1],"data_offsets":[80,82]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0x38u8, 80)); // 1.0 in e4m3
        b.extend([127u8, 127]);
        let f = crate::tensors::TensorFile::from_bytes("t.safetensors", b).unwrap();
        let (codes, scales) = (f.raw("t.weight").unwrap(), f.raw("t.scale").unwrap());
        let Err(e) = Fp8Table::new("t.weight", codes, scales, 2, 40) else {
            panic!("dim 40 accepted");
        };
        let e = e.to_string();
        assert!(e.contains("multiple of 32") && e.contains("40"), "{e}");
    }

    /// The table against the format's definition, computed plainly.
    #[test]
    fn e4m3_table_matches_the_definition() {
        for c in 0..=255u8 {
            let (s, e, m) = (c >> 7, (c >> 3) & 15, c & 7);
            let want = if e == 15 && m == 7 {
                f32::NAN
            } else if e == 0 {
                m as f32 / 8.0 * 2f32.powi(-6)
            } else {
                (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
            } * if s == 1 { -1.0 } else { 1.0 };
            let got = e4m3_to_f32(c);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{c:#x}: {got} vs {want}"
            );
        }
        for x in [
            1.0f32,
            -2.5e-3,
            3.3e38,
            f32::from_bits(0x3F80_8000), // ties: 1 + 2^-8 rounds down to even
            f32::from_bits(0x3F81_8000), // 1 + 3·2^-8 rounds up to even
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(round_bf16(x), half::bf16::from_f32(x).to_f32(), "{x}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn every_e4m3_code_round_trips() {
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                assert!(c & 0x7F == 0x7F, "{c:#x}");
                continue;
            }
            let back = f32_to_e4m3(v);
            // +0 and -0 both decode to zero.
            assert!(
                back == c || (v == 0.0 && back & 0x7F == 0),
                "{c:#x} -> {v} -> {back:#x}"
            );
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        // Ties go to even codes: 1 + 1/16 lies between 1 (0x38) and 1.125 (0x39).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
    }
}
