//! Property tests of `NgramHashMapping` over random configs and ids: hash range,
//! determinism, and equality with a naive recomputation written from the reference's
//! description (numpy-style shifted arrays, i128 arithmetic, floor modulo).

mod common;
use common::*;
use engram::EngramConfig;
use proptest::prelude::*;

/// Reference §3 written directly: pad-shifted copies of the canonical ids, products and
/// XORs in int64, floor modulo by each head's prime.
fn naive_hash(canon: &[i64], len: usize, pad: i64, mults: &[i64], primes: &[Vec<u64>]) -> Vec<i64> {
    let n = mults.len();
    let batch = canon.len() / len;
    let shift = |k: usize, b: usize, t: usize| if t >= k { canon[b * len + t - k] } else { pad };
    let heads: usize = primes.iter().map(|p| p.len()).sum();
    let mut out = vec![0i64; canon.len() * heads];
    for b in 0..batch {
        for t in 0..len {
            let mut h = 0;
            for order in 2..=n {
                // int64 products wrap as numpy's do.
                let mut mix = shift(0, b, t).wrapping_mul(mults[0]);
                for (k, &mk) in mults.iter().enumerate().take(order).skip(1) {
                    mix ^= shift(k, b, t).wrapping_mul(mk);
                }
                for &p in &primes[order - 2] {
                    let m = (mix as i128).rem_euclid(p as i128) as i64;
                    out[(b * len + t) * heads + h] = m;
                    h += 1;
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn hashes_match_naive_recomputation(
        n in 2usize..=5, heads in 1usize..=4, seed in 0u64..100_000,
        base in 2u64..5_000_000, layer in 0u64..64, batch in 1usize..=3, len in 1usize..=40,
        raw in prop::collection::vec(-3i64..128815, 1..=120),
    ) {
        let cfg = EngramConfig {
            engram_vocab_size: (0..n - 1).map(|i| base + 1000 * i as u64).collect(),
            max_ngram_size: n,
            n_head_per_ngram: heads,
            n_embed_per_ngram: heads * 4,
            layer_ids: vec![layer, layer + 1],
            layer_id: layer + 1,
            seed,
            ..EngramConfig::default()
        };
        let m = mapping(&cfg);
        let ids: Vec<i64> = (0..batch * len).map(|i| raw[i % raw.len()]).collect();
        let comp = compression();
        let canon = comp.compress(&ids, len).unwrap();
        let mut all_primes = std::collections::HashSet::new();
        for l in m.layers() {
            let got = m.hash(l.layer_id, &ids, len).unwrap();
            // Determinism.
            prop_assert_eq!(&got, &m.hash(l.layer_id, &ids, len).unwrap());
            // Naive recomputation.
            let want = naive_hash(&canon, len, m.pad_canonical(), &l.multipliers, &l.primes);
            prop_assert_eq!(&got, &want);
            // Range: every hash lies in [0, its head's prime).
            let sizes = l.head_sizes();
            for (i, &h) in got.iter().enumerate() {
                prop_assert!(h >= 0 && (h as u64) < sizes[i % sizes.len()]);
            }
            // Multipliers are odd and below 2·half_bound; primes are prime, above the base
            // size, increasing within an order, and never reused across layers.
            let half_bound = (i64::MAX / comp.num_compressed() as i64 / 2).max(1);
            prop_assert!(l.multipliers.iter().all(|&x| x % 2 == 1 && x > 0 && x < 2 * half_bound));
            for (o, ps) in l.primes.iter().enumerate() {
                prop_assert!(ps.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(ps[0] >= cfg.engram_vocab_size[o]);
                for &p in ps {
                    prop_assert!(engram::hashing::is_prime(p));
                    prop_assert!(all_primes.insert(p), "prime {} reused", p);
                }
            }
        }
    }
}
