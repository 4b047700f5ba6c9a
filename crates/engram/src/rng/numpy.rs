//! numpy's `Generator(PCG64(SeedSequence(seed)))` and `Generator.integers` (int64, Lemire).

/// numpy's `SeedSequence` reduced to what `default_rng(int)` needs: the 4-word pool and
/// `generate_state`.
#[derive(Debug, Clone)]
pub struct SeedSequence {
    pool: [u32; 4],
}

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;

impl SeedSequence {
    /// Seeds from a non-negative integer (its 32-bit words, least significant first).
    pub fn new(seed: u128) -> Self {
        let mut entropy = Vec::new();
        let mut s = seed;
        loop {
            entropy.push(s as u32);
            s >>= 32;
            if s == 0 {
                break;
            }
        }
        let mut h = INIT_A;
        let mut hashmix = |mut v: u32| {
            v ^= h;
            h = h.wrapping_mul(MULT_A);
            v = v.wrapping_mul(h);
            v ^ (v >> 16)
        };
        let mix = |x: u32, y: u32| {
            let r = MIX_MULT_L
                .wrapping_mul(x)
                .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
            r ^ (r >> 16)
        };
        let mut pool = [0u32; 4];
        for (i, p) in pool.iter_mut().enumerate() {
            *p = hashmix(entropy.get(i).copied().unwrap_or(0));
        }
        for src in 0..4 {
            for dst in 0..4 {
                if src != dst {
                    let hv = hashmix(pool[src]);
                    pool[dst] = mix(pool[dst], hv);
                }
            }
        }
        for &e in entropy.iter().skip(4) {
            for p in pool.iter_mut() {
                let hv = hashmix(e);
                *p = mix(*p, hv);
            }
        }
        SeedSequence { pool }
    }

    /// The pool words.
    pub fn pool(&self) -> [u32; 4] {
        self.pool
    }

    /// `generate_state(n_words64, uint64)`.
    pub fn generate_state_u64(&self, n: usize) -> Vec<u64> {
        let mut h = INIT_B;
        let words: Vec<u32> = (0..2 * n)
            .map(|i| {
                let mut v = self.pool[i % 4];
                v ^= h;
                h = h.wrapping_mul(MULT_B);
                v = v.wrapping_mul(h);
                v ^ (v >> 16)
            })
            .collect();
        words
            .chunks_exact(2)
            .map(|w| w[0] as u64 | ((w[1] as u64) << 32))
            .collect()
    }
}

/// PCG XSL-RR 128/64 as numpy's `PCG64` runs it, with numpy's 32-bit buffer.
#[derive(Debug, Clone)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    buffered: Option<u32>,
}

const PCG_MULT: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

impl Pcg64 {
    /// `PCG64(SeedSequence(seed))`.
    pub fn from_seed(seed: u128) -> Self {
        let s = SeedSequence::new(seed).generate_state_u64(4);
        let initstate = ((s[0] as u128) << 64) | s[1] as u128;
        let initseq = ((s[2] as u128) << 64) | s[3] as u128;
        let mut g = Pcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
            buffered: None,
        };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    /// (state, inc), for known-answer checks.
    pub fn raw_state(&self) -> (u128, u128) {
        (self.state, self.inc)
    }

    #[inline]
    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// Next 64-bit output (step first, then output from the new state).
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let x = ((self.state >> 64) as u64) ^ (self.state as u64);
        x.rotate_right((self.state >> 122) as u32)
    }

    /// Next 32-bit output, through numpy's one-slot buffer.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.buffered.take() {
            return v;
        }
        let x = self.next_u64();
        self.buffered = Some((x >> 32) as u32);
        x as u32
    }

    /// One value of `Generator.integers(low, high, dtype=int64)` (endpoint=False).
    /// Returns `low` when `high <= low + 1`... only for `high - 1 == low`; callers must pass
    /// `high > low`.
    pub fn integer(&mut self, low: i64, high: i64) -> i64 {
        assert!(high > low, "integers: high must exceed low");
        let rng = (high as i128 - 1 - low as i128) as u64;
        let off = low as u64;
        let draw = if rng == 0 {
            0
        } else if rng < 0xFFFF_FFFF {
            let excl = rng as u32 + 1;
            let mut m = self.next_u32() as u64 * excl as u64;
            if (m as u32) < excl {
                let threshold = (u32::MAX - rng as u32) % excl;
                while (m as u32) < threshold {
                    m = self.next_u32() as u64 * excl as u64;
                }
            }
            m >> 32
        } else if rng == 0xFFFF_FFFF {
            self.next_u32() as u64
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let excl = rng + 1;
            let mut m = self.next_u64() as u128 * excl as u128;
            if (m as u64) < excl {
                let threshold = (u64::MAX - rng) % excl;
                while (m as u64) < threshold {
                    m = self.next_u64() as u128 * excl as u128;
                }
            }
            (m >> 64) as u64
        };
        off.wrapping_add(draw) as i64
    }

    /// `integers(low, high, size=n, dtype=int64)`.
    pub fn integers(&mut self, low: i64, high: i64, n: usize) -> Vec<i64> {
        (0..n).map(|_| self.integer(low, high)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers from rng-compat.md §A8 (numpy 2.4.6).
    #[test]
    fn seed_10007_pool_state_and_outputs() {
        assert_eq!(
            SeedSequence::new(10007).pool(),
            [0xf1a1018d, 0xa7c60c02, 0xfd15d50a, 0x03b81232]
        );
        assert_eq!(
            SeedSequence::new(10007).generate_state_u64(4),
            [
                0x77d32a348ad70d07,
                0x993ed609b84a4fa5,
                0xd5f972dec8698e49,
                0x7d79ebaebcf148de
            ]
        );
        let mut g = Pcg64::from_seed(10007);
        assert_eq!(
            g.raw_state(),
            (
                0x3b34af7676e8ddd5556a026c98a77d27,
                0xabf2e5bd90d31c92faf3d75d79e291bd
            )
        );
        let raw: Vec<u64> = (0..4).map(|_| g.next_u64()).collect();
        assert_eq!(
            raw,
            [
                0xd2c3f84026661e33,
                0x0d4fb6969eb57435,
                0x62e6e1c58c3bd72b,
                0xcb7dd1a94ca96343
            ]
        );
    }

    #[test]
    fn integers_known_answers() {
        let cases: [(u128, i64, i64, [i64; 3]); 6] = [
            (
                10007,
                0,
                36_000_000_000_000,
                [29638899387186, 1871912788208, 13908077226886],
            ),
            (
                10007,
                0,
                1 << 45,
                [28967390676172, 1829502112726, 13592971227527],
            ),
            (
                10007,
                0,
                36_028_797_018_963,
                [29662608052400, 1873410163432, 13919202536987],
            ),
            (
                150105,
                0,
                36_000_000_000_000,
                [11185003579456, 21666928057330, 20858065901873],
            ),
            (
                150105,
                0,
                36_028_797_018_963,
                [11193950656127, 21684259805612, 20874750627409],
            ),
            (
                10007,
                -5,
                36_000_000_000_000,
                [29638899387185, 1871912788203, 13908077226883],
            ),
        ];
        for (seed, low, high, want) in cases {
            let mut g = Pcg64::from_seed(seed);
            assert_eq!(g.integers(low, high, 3), want, "seed {seed} high {high}");
        }
        assert_eq!(
            SeedSequence::new(150105).pool(),
            [0x196a3a42, 0x1b2b79cb, 0x3b1ed228, 0x5f64b947]
        );
    }

    #[test]
    fn small_range_uses_buffered_halves() {
        let mut g = Pcg64::from_seed(10007);
        let got = [
            g.integer(0, 1000),
            g.integer(0, 1 << 40),
            g.integer(0, 1000),
            g.integer(0, 1000),
        ];
        assert_eq!(got, [149, 57171941022, 823, 547]);
    }

    #[test]
    fn rejection_loop_is_exercised() {
        // H = 3·2^61: rng+1 does not divide 2^64, rejections happen often (rng-compat §A6).
        let mut g = Pcg64::from_seed(10007);
        let h = 3i64 << 61;
        let v = g.integers(0, h, 50);
        assert!(v.iter().all(|&x| (0..h).contains(&x)));
        let mut plain = Pcg64::from_seed(10007);
        let mut draws = 0;
        let excl = (h - 1) as u64 + 1;
        let threshold = (u64::MAX - (h - 1) as u64) % excl;
        let mut lemire = Vec::new();
        while lemire.len() < 50 {
            draws += 1;
            let m = plain.next_u64() as u128 * excl as u128;
            if (m as u64) >= threshold {
                lemire.push((m >> 64) as i64);
            }
        }
        assert_eq!(v, lemire);
        assert_eq!(draws, 69, "rng-compat.md: 50 outputs used 69 draws");
    }
}
