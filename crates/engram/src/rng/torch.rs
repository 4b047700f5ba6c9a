//! PyTorch's CPU generator after `torch.manual_seed(s)`, bit for bit (x86-64 wheels with AVX2
//! or AVX-512): MT19937, `uniform_`, `normal_` (the vectorised fill and the small serial path),
//! `kaiming_uniform_`, `nn.Linear`'s bias init and `randn`. Recipes: `rng-compat.md`, part B.

use rayon::prelude::*;

const N: usize = 624;
const M: usize = 397;

/// PyTorch's CPU generator: MT19937 plus the cached double of the serial normal path.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Box<[u32; N]>,
    idx: usize,
    /// Second Box–Muller value of the serial (< 16 elements) normal path.
    normal_cache: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("idx", &self.idx)
            .finish()
    }
}

impl TorchGenerator {
    /// `torch.manual_seed(seed)` (the state takes the low 32 bits, init_genrand).
    pub fn manual_seed(seed: u64) -> Self {
        let mut mt = Box::new([0u32; N]);
        mt[0] = seed as u32;
        for j in 1..N {
            mt[j] = 1812433253u32
                .wrapping_mul(mt[j - 1] ^ (mt[j - 1] >> 30))
                .wrapping_add(j as u32);
        }
        TorchGenerator {
            mt,
            idx: N, // the first draw twists
            normal_cache: None,
        }
    }

    /// Regenerates the 624 words in place, in index order (the reference's twist), split
    /// into the three ranges where `k+1` and `k+M` need no wrap-around so that it vectorises.
    fn twist(&mut self) {
        #[inline(always)]
        fn mix(cur: u32, next: u32, far: u32) -> u32 {
            let y = (cur & 0x8000_0000) | (next & 0x7fff_ffff);
            far ^ (y >> 1) ^ ((next & 1).wrapping_neg() & 0x9908_b0df)
        }
        let mt = &mut self.mt;
        for k in 0..N - M {
            mt[k] = mix(mt[k], mt[k + 1], mt[k + M]);
        }
        for k in N - M..N - 1 {
            mt[k] = mix(mt[k], mt[k + 1], mt[k + M - N]);
        }
        mt[N - 1] = mix(mt[N - 1], mt[0], mt[M - 1]);
        self.idx = 0;
    }

    #[inline]
    fn temper(mut y: u32) -> u32 {
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// One 32-bit output (`random()`).
    #[inline]
    pub fn random(&mut self) -> u32 {
        if self.idx >= N {
            self.twist();
        }
        let y = self.mt[self.idx];
        self.idx += 1;
        Self::temper(y)
    }

    /// Two outputs, the first as the high word (`random64()`).
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        (hi << 32) | self.random() as u64
    }

    /// Fills `out` with 24-bit uniforms `(random() & 0xFFFFFF) · 2^-24`, one draw each.
    pub fn fill_unit_f32(&mut self, out: &mut [f32]) {
        let mut i = 0;
        while i < out.len() {
            if self.idx >= N {
                self.twist();
            }
            let take = (N - self.idx).min(out.len() - i);
            for (o, &y) in out[i..i + take]
                .iter_mut()
                .zip(&self.mt[self.idx..self.idx + take])
            {
                *o = (Self::temper(y) & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0);
            }
            self.idx += take;
            i += take;
        }
    }

    /// A double uniform in [0, 1) from 53 bits of `random64()`.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `tensor.uniform_(from, to)` on float32: `fma(x, t - f, f)`, `v == t` replaced by `f`.
    pub fn uniform_f32(&mut self, out: &mut [f32], from: f64, to: f64) {
        let (f, t) = (from as f32, to as f32);
        let span = t - f;
        self.fill_unit_f32(out);
        for v in out.iter_mut() {
            let r = v.mul_add(span, f);
            *v = if r == t { f } else { r };
        }
    }

    /// `nn.init.kaiming_uniform_(w, a=sqrt(5))` with mode fan_in.
    pub fn kaiming_uniform_f32(&mut self, out: &mut [f32], fan_in: usize) {
        let a = 5f64.sqrt();
        let gain = (2.0 / (1.0 + a * a)).sqrt();
        let std = gain / (fan_in as f64).sqrt();
        let bound = 3f64.sqrt() * std;
        self.uniform_f32(out, -bound, bound);
    }

    /// `nn.Linear`'s bias init: `uniform_(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn linear_bias_f32(&mut self, out: &mut [f32], fan_in: usize) {
        let bound = 1.0 / (fan_in as f64).sqrt();
        self.uniform_f32(out, -bound, bound);
    }

    /// `tensor.normal_(mean, std)` on a contiguous float32 tensor.
    pub fn normal_f32(&mut self, out: &mut [f32], mean: f64, std: f64) {
        self.normal_f32_with_progress(out, mean, std, &mut |_| {})
    }

    /// `normal_`, reporting elements done to `progress` (called from this thread).
    pub fn normal_f32_with_progress(
        &mut self,
        out: &mut [f32],
        mean: f64,
        std: f64,
        progress: &mut dyn FnMut(usize),
    ) {
        let n = out.len();
        if n < 16 {
            self.normal_serial(out, mean, std);
            progress(n);
            return;
        }
        let (mean, std) = (mean as f32, std as f32);
        // Draw all uniforms, transforming each finished chunk of 16-blocks on another core
        // while the next chunk is drawn (the generator is serial, the transform is not).
        const CHUNK: usize = 1 << 18; // multiple of 16
        let full = n / 16 * 16;
        let mut done = 0;
        let mut pending: Option<&mut [f32]> = None;
        let mut rest: &mut [f32] = out;
        while !rest.is_empty() {
            let take = CHUNK.min(rest.len());
            let (cur, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            let prev = pending.take();
            rayon::join(
                || {
                    if let Some(p) = prev {
                        transform_blocks(p, mean, std);
                    }
                },
                || self.fill_unit_f32(cur),
            );
            done += take;
            progress(take);
            // Only whole blocks below `full` are transformed here; leftovers wait for the tail.
            let start = done - take;
            let blocks_end = full.min(done);
            let cur_blocks = blocks_end.saturating_sub(start);
            pending = Some(&mut cur[..cur_blocks]);
        }
        if let Some(p) = pending {
            transform_blocks(p, mean, std);
        }
        if !n.is_multiple_of(16) {
            // Tail: 16 fresh uniforms overwrite the last 16 outputs.
            let last = &mut out[n - 16..];
            self.fill_unit_f32(last);
            transform_blocks(last, mean, std);
        }
    }

    /// `normal_` on `n` float32 elements, handed out chunk by chunk instead of written into
    /// one buffer: `emit(offset, values)` receives every element in order. The draws are
    /// the same as [`TorchGenerator::normal_f32`], which the tail block shows: it emits the
    /// last 16 values a second time, and they replace the ones emitted before. For storing
    /// the result in another type (a bf16 table) without an f32 copy of it.
    pub fn normal_f32_chunked(
        &mut self,
        n: usize,
        mean: f64,
        std: f64,
        emit: &mut dyn FnMut(usize, &[f32]),
    ) {
        if n < 16 {
            let mut v = vec![0.0; n];
            self.normal_serial(&mut v, mean, std);
            emit(0, &v);
            return;
        }
        let (mean32, std32) = (mean as f32, std as f32);
        const CHUNK: usize = 1 << 20; // multiple of 16
        let full = n / 16 * 16;
        let mut buf = vec![0.0f32; CHUNK.min(n)];
        let mut start = 0;
        while start < n {
            let take = CHUNK.min(n - start);
            self.fill_unit_f32(&mut buf[..take]);
            let blocks = full.min(start + take).saturating_sub(start);
            transform_blocks(&mut buf[..blocks], mean32, std32);
            // Leftover uniforms past the last whole block are consumed, not emitted.
            emit(start, &buf[..blocks]);
            start += take;
        }
        if !n.is_multiple_of(16) {
            let mut last = [0.0f32; 16];
            self.fill_unit_f32(&mut last);
            transform_blocks(&mut last, mean32, std32);
            emit(n - 16, &last);
        }
    }

    /// The serial double Box–Muller path (numel < 16), with its cached second value.
    fn normal_serial(&mut self, out: &mut [f32], mean: f64, std: f64) {
        for o in out.iter_mut() {
            if let Some(c) = self.normal_cache.take() {
                *o = (c * std + mean) as f32;
                continue;
            }
            let u1 = self.uniform_f64();
            let u2 = self.uniform_f64();
            let r = (-2.0 * (-u2).ln_1p()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u1;
            self.normal_cache = Some(r * theta.sin());
            *o = (r * theta.cos() * std + mean) as f32;
        }
    }

    /// `torch.randn(n)` (float32).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        self.normal_f32(&mut v, 0.0, 1.0);
        v
    }
}

/// Transforms whole 16-blocks of uniforms into normals, in parallel.
fn transform_blocks(data: &mut [f32], mean: f32, std: f32) {
    debug_assert_eq!(data.len() % 16, 0);
    data.par_chunks_mut(1 << 14).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { normal_fill16_avx2(c, mean, std) };
            return;
        }
        normal_fill16_generic(c, mean, std);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normal_fill16_avx2(data: &mut [f32], mean: f32, std: f32) {
    // Same code; with FMA enabled `mul_add` is one instruction and the lanes vectorise.
    normal_fill16_generic(data, mean, std)
}

#[inline(always)]
fn normal_fill16_generic(data: &mut [f32], mean: f32, std: f32) {
    for b in data.chunks_exact_mut(16) {
        let b: &mut [f32; 16] = b.try_into().unwrap();
        normal_fill16(b, mean, std);
    }
}

// Cephes constants of PyTorch's AVX2 `log`/`sincos` (avx_mathfun), as f32 bit patterns.
const SQRTHF: f32 = f32::from_bits(0x3F3504F3);
const LOG_P: [u32; 9] = [
    0x3D9021BB, 0xBDEBD1B8, 0x3DEF251A, 0xBDFE5D4F, 0x3E11E9BF, 0xBE2AAE50, 0x3E4CCEAC, 0xBE7FFFFC,
    0x3EAAAAAA,
];
const LOG_Q1: f32 = f32::from_bits(0xB95E8083);
const LOG_Q2: f32 = f32::from_bits(0x3F318000);
const FOPI: f32 = f32::from_bits(0x3FA2F983);
const DP1: f32 = f32::from_bits(0x3F490000);
const DP2: f32 = f32::from_bits(0x397DA000);
const DP3: f32 = f32::from_bits(0x33222169);
const S0: f32 = f32::from_bits(0xB94CA1F9);
const S1: f32 = f32::from_bits(0x3C08839E);
const S2: f32 = f32::from_bits(0xBE2AAAA3);
const C0: f32 = f32::from_bits(0x37CCF5CE);
const C1: f32 = f32::from_bits(0xBAB6061A);
const C2: f32 = f32::from_bits(0x3D2AAAA5);
const TWO_PI: f32 = f32::from_bits(0x40C90FDB);

/// NormalFill16: lane l pairs b[l] (radius) with b[l+8] (angle). Every operation, fused or
/// not, is as GCC compiled it in the torch 2.15 wheel (rng-compat.md §B5b).
#[inline(always)]
fn normal_fill16(b: &mut [f32; 16], mean: f32, std: f32) {
    let mut out = [0.0f32; 16];
    for l in 0..8 {
        let lg = cephes_log(1.0 - b[l]);
        let r = (-2.0 * lg).sqrt();
        let theta = TWO_PI * b[l + 8];
        let (s, c) = cephes_sincos(theta);
        out[l] = (r * c).mul_add(std, mean);
        out[l + 8] = (r * s).mul_add(std, mean);
    }
    *b = out;
}

#[inline(always)]
fn cephes_log(v: f32) -> f32 {
    let v = v.max(f32::MIN_POSITIVE);
    let bits = v.to_bits();
    let ex = (bits >> 23) as i32;
    let m = f32::from_bits((bits & !0x7F80_0000) | 0x3F00_0000);
    let mut e = (ex - 127) as f32 + 1.0;
    let mut x = m - 1.0;
    if m < SQRTHF {
        e -= 1.0;
        x += m;
    }
    let z = x * x;
    let mut y = f32::from_bits(LOG_P[0]);
    for p in &LOG_P[1..] {
        y = y.mul_add(x, f32::from_bits(*p));
    }
    y *= x;
    y = y.mul_add(z, e * LOG_Q1);
    y -= z * 0.5;
    (x + y) + e * LOG_Q2
}

#[inline(always)]
fn cephes_sincos(theta: f32) -> (f32, f32) {
    let sgn = theta.is_sign_negative();
    let ax = theta.abs();
    let q = ax * FOPI;
    let mut j = q as i32;
    j = (j + 1) & !1;
    let yj = j as f32;
    let mut x = yj.mul_add(-DP1, ax);
    x = yj.mul_add(-DP2, x);
    x = yj.mul_add(-DP3, x);
    let z = x * x;
    let mut pc = z.mul_add(C0, C1);
    pc = pc.mul_add(z, C2);
    pc *= z;
    pc = pc.mul_add(z, -(z * 0.5));
    pc += 1.0;
    let mut ps = z.mul_add(S0, S1);
    ps = ps.mul_add(z, S2);
    ps *= z;
    ps = ps.mul_add(x, x);
    let (mut s, mut c) = if j & 2 == 0 { (ps, pc) } else { (pc, ps) };
    if sgn ^ (j & 4 != 0) {
        s = -s;
    }
    if (j - 2) & 4 == 0 {
        c = -c;
    }
    (s, c)
}

#[cfg(test)]
// The known answers are PyTorch's printouts (f64 digits of f32 values), kept verbatim.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    // Known answers: rng-compat.md §B7 (torch 2.15.0 CPU).
    #[test]
    fn mt19937_outputs() {
        let mut g = TorchGenerator::manual_seed(42);
        let first: Vec<u32> = (0..6).map(|_| g.random()).collect();
        assert_eq!(
            first,
            [1608637542, 3421126067, 4083286876, 787846414, 3143890026, 3348747335]
        );
        let mut g = TorchGenerator::manual_seed(42);
        let v: Vec<u32> = (0..625).map(|_| g.random()).collect();
        assert_eq!((v[623], v[624]), (1077437785, 108880612));
        assert_eq!(
            TorchGenerator::manual_seed(42).random64(),
            0x5fe1dc66cbea3db3
        );
    }

    #[test]
    fn rand_bits() {
        let mut g = TorchGenerator::manual_seed(42);
        let mut v = [0.0f32; 4];
        g.fill_unit_f32(&mut v);
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3f61dc66, 0x3f6a3db3, 0x3ec406b8, 0x3f75950e]);
    }

    #[test]
    fn linear_init() {
        let mut g = TorchGenerator::manual_seed(42);
        let mut w = vec![0.0f32; 1024 * 1024];
        let mut b = vec![0.0f32; 1024];
        g.kaiming_uniform_f32(&mut w, 1024);
        g.linear_bias_f32(&mut b, 1024);
        let bits: Vec<u32> = w[..4].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3cc3b8cc, 0x3cd47b66, 0xbbefe520, 0x3ceb2a1c]);
        assert_eq!(
            &w[w.len() - 2..],
            &[0.024226825684309006, -0.025851625949144363]
        );
        let bits: Vec<u32> = b[..3].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0xbc49be44, 0x3cc32f3c, 0x3ce9be8a]);
        assert_eq!(
            w.iter().map(|&x| x as f64).sum::<f64>(),
            -22.034101273864508
        );
        assert_eq!(
            b.iter().map(|&x| x as f64).sum::<f64>(),
            0.06128929182887077
        );
    }

    #[test]
    fn depthwise_conv_init() {
        let mut g = TorchGenerator::manual_seed(42);
        let mut w = vec![0.0f32; 4096 * 4];
        g.kaiming_uniform_f32(&mut w, 4);
        assert_eq!(
            &w[..4],
            &[
                0.3822692632675171,
                0.4150039553642273,
                -0.11713624000549316,
                0.45930564403533936
            ]
        );
        assert_eq!(
            &w[w.len() - 4..],
            &[
                0.08821457624435425,
                0.106861412525177,
                -0.3824911117553711,
                0.4702940583229065
            ]
        );
        assert_eq!(
            w.iter().map(|&x| x as f64).sum::<f64>(),
            -15.231018722057343
        );
    }

    #[test]
    fn randn_fill_path() {
        let mut g = TorchGenerator::manual_seed(42);
        let v = g.randn(32 * 4 * 1024);
        let bits: Vec<u32> = v[..4].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3ff6a529, 0x3fbe5f53, 0x3f669567, 0xc006c0db]);
        assert_eq!(
            &v[8..12],
            &[
                -0.7521352767944336,
                1.6487230062484741,
                -0.3924786448478699,
                -1.4036071300506592
            ]
        );
        let bits: Vec<u32> = v[v.len() - 2..].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3f1d4a81, 0xbf31a466]);
        assert_eq!(v.iter().map(|&x| x as f64).sum::<f64>(), 22.995361864201186);
    }

    #[test]
    fn embedding_tail_path() {
        // nn.Embedding(1001, 3): 3003 % 16 = 11, so the tail block runs.
        let mut g = TorchGenerator::manual_seed(42);
        let mut v = vec![0.0f32; 3003];
        g.normal_f32(&mut v, 0.0, 1.0);
        assert_eq!(&v[..2], &[1.9269152879714966, 1.4872840642929077]);
        assert_eq!(
            &v[2984..2988],
            &[
                1.0239890813827515,
                -1.036582350730896,
                -1.997800350189209,
                0.12110324949026108
            ]
        );
        let bits: Vec<u32> = v[v.len() - 2..].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0xbe156b81, 0xbed8e1b2]);
    }

    #[test]
    fn chained_stream() {
        let mut g = TorchGenerator::manual_seed(42);
        let mut w = vec![0.0f32; 1024 * 1024];
        let mut b = vec![0.0f32; 1024];
        g.kaiming_uniform_f32(&mut w, 1024);
        g.linear_bias_f32(&mut b, 1024);
        let mut c = vec![0.0f32; 4096 * 4];
        g.kaiming_uniform_f32(&mut c, 4);
        assert_eq!(
            &c[..4],
            &[
                0.33126723766326904,
                0.1419147253036499,
                0.03696298599243164,
                -0.4891485571861267
            ]
        );
        let r = g.randn(32 * 4 * 1024);
        assert_eq!(
            &r[..3],
            &[-0.13140344619750977, -1.170345664024353, 1.54465913772583]
        );
    }

    #[test]
    fn small_serial_path_and_cache() {
        let mut g = TorchGenerator::manual_seed(42);
        let v = g.randn(3);
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3eac62ae, 0x3e03e69d, 0x3e7016e7]);
        assert_eq!(g.randn(1)[0].to_bits(), 0x3e6bdc6c);
    }

    #[test]
    fn chunked_normal_equals_in_place() {
        for n in [5usize, 16, 3003, (1 << 20) + 37] {
            let mut a = vec![0.0f32; n];
            let mut g = TorchGenerator::manual_seed(42);
            g.normal_f32(&mut a, 0.0, 1.0);
            let after_a = g.random();
            let mut b = vec![f32::NAN; n];
            let mut g = TorchGenerator::manual_seed(42);
            g.normal_f32_chunked(n, 0.0, 1.0, &mut |off, v| {
                b[off..off + v.len()].copy_from_slice(v)
            });
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "n = {n}");
            assert_eq!(g.random(), after_a, "n = {n}: same number of draws");
        }
    }

    #[test]
    fn vectorised_and_generic_transforms_agree() {
        let mut g = TorchGenerator::manual_seed(7);
        let mut u = vec![0.0f32; 16 * 4096];
        g.fill_unit_f32(&mut u);
        let mut a = u.clone();
        transform_blocks(&mut a, 0.5, 0.02);
        let mut b = u;
        normal_fill16_generic(&mut b, 0.5, 0.02);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
