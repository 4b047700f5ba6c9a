//! `NgramHashMapping`: multipliers, primes and n-gram hashes (reference §2-3).

use crate::compression::CompressedTokenizer;
use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::rng::numpy::Pcg64;
use std::collections::HashSet;
use std::sync::Arc;

/// Seed stride between layers (`PRIME_1` in the reference).
const LAYER_SEED_STRIDE: u64 = 10007;

/// Deterministic Miller–Rabin, exact for all 64-bit integers (bases: the first 12 primes).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    for p in BASES {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    let mulmod = |a: u64, b: u64| ((a as u128 * b as u128) % n as u128) as u64;
    let powmod = |mut b: u64, mut e: u64| {
        let mut r = 1u64;
        b %= n;
        while e > 0 {
            if e & 1 == 1 {
                r = mulmod(r, b);
            }
            b = mulmod(b, b);
            e >>= 1;
        }
        r
    };
    let (mut d, mut s) = (n - 1, 0);
    while d % 2 == 0 {
        d /= 2;
        s += 1;
    }
    'bases: for a in BASES {
        let mut x = powmod(a, d);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mulmod(x, x);
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

/// Smallest prime > `start` not in `seen` (`find_next_prime`). `seen` is asked first: it
/// is the cheaper test, and later searches walk over every prime found before them.
fn next_unseen_prime(start: u64, seen: &HashSet<u64>) -> u64 {
    let mut c = start + 1;
    while seen.contains(&c) || !is_prime(c) {
        c += 1;
    }
    c
}

/// Hash parameters of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerHashParams {
    /// The layer id.
    pub layer_id: u64,
    /// N odd multipliers, one per n-gram position (`2r+1`).
    pub multipliers: Vec<i64>,
    /// Head sizes (primes) per order: `primes[n-2][j]`.
    pub primes: Vec<Vec<u64>>,
}

impl LayerHashParams {
    /// Head sizes flattened in head order (order 2 first).
    pub fn head_sizes(&self) -> Vec<u64> {
        self.primes.iter().flatten().copied().collect()
    }

    /// Row offset of each head in the concatenated table.
    pub fn offsets(&self) -> Vec<u64> {
        let mut acc = 0;
        self.head_sizes()
            .iter()
            .map(|&p| {
                let o = acc;
                acc += p;
                o
            })
            .collect()
    }

    /// Total rows of the layer's table.
    pub fn table_rows(&self) -> u64 {
        self.head_sizes().iter().sum()
    }
}

/// Multipliers and primes of every layer, in `layer_ids` order (§2 of the reference notes;
/// the DeepSeek-V4.1 layer draws them the same way, with one base for every order):
/// multipliers `2r + 1` with r from numpy's `default_rng(seed + 10007·layer)` below
/// `max(1, i64::MAX / vocab / 2)`; primes from one `seen` set over all layers, the search
/// restarting at `bases[n-2] - 1` for every order n of every layer.
pub fn draw_layer_params(
    layer_ids: &[u64],
    bases: &[u64],
    heads: usize,
    max_ngram_size: usize,
    seed: u64,
    compressed_vocab: u64,
) -> Vec<LayerHashParams> {
    let vprime = compressed_vocab.max(1) as i64;
    let half_bound = (i64::MAX / vprime / 2).max(1);
    let primes = draw_primes(layer_ids.len(), bases, heads);
    layer_ids
        .iter()
        .zip(primes)
        .map(|(&layer_id, primes)| {
            let s = seed as u128 + LAYER_SEED_STRIDE as u128 * layer_id as u128;
            let mut g = Pcg64::from_seed(s);
            let multipliers = g
                .integers(0, half_bound, max_ngram_size)
                .into_iter()
                .map(|r| 2 * r + 1)
                .collect();
            LayerHashParams {
                layer_id,
                multipliers,
                primes,
            }
        })
        .collect()
}

/// The primes of the first `layers` layers (`[layer][order][head]`): one `seen` set over all
/// layers, the search restarting at `bases[n-2] - 1` for every order n of every layer. A
/// layer's primes depend only on the layers before it, not on the multipliers.
fn draw_primes(layers: usize, bases: &[u64], heads: usize) -> Vec<Vec<Vec<u64>>> {
    let mut seen = HashSet::new();
    let mut resume: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    (0..layers)
        .map(|_| {
            bases
                .iter()
                .map(|&base| {
                    // The reference restarts at base - 1 every time; every prime between
                    // there and the last one found from this base is in `seen` (each search
                    // returns the smallest unseen prime), so resuming from that last one
                    // finds the same prime without walking over all the earlier ones again.
                    let mut start = resume.get(&base).copied().unwrap_or(base - 1);
                    let hs: Vec<u64> = (0..heads)
                        .map(|_| {
                            let p = next_unseen_prime(start, &seen);
                            seen.insert(p);
                            start = p;
                            p
                        })
                        .collect();
                    resume.insert(base, start);
                    hs
                })
                .collect()
        })
        .collect()
}

/// The exact number of rows of layer `cfg.layer_id`'s table (the sum of its heads' primes),
/// from the config alone: no tokenizer is needed, since the primes do not depend on the
/// compressed vocabulary. [`crate::LayerSizes::table_rows_estimate`] assumes each prime lies
/// within 1024 of its base, which holds for a few layers but not for configs with many
/// (each layer's primes lie above the earlier layers'); memory plans use this count.
pub fn table_rows(cfg: &EngramConfig) -> Result<u64> {
    cfg.validate()?;
    let index = cfg
        .layer_ids
        .iter()
        .position(|&l| l == cfg.layer_id)
        .ok_or_else(|| {
            EngramError::config(
                "layer_id",
                format!("one of layer_ids {:?}", cfg.layer_ids),
                cfg.layer_id,
            )
        })?;
    let primes = draw_primes(index + 1, &cfg.engram_vocab_size, cfg.n_head_per_ngram);
    primes[index]
        .iter()
        .flatten()
        .try_fold(0u64, |a, &p| a.checked_add(p))
        .ok_or_else(|| {
            EngramError::config(
                "engram_vocab_size",
                "a table whose rows fit in 64 bits",
                format!("{:?}", cfg.engram_vocab_size),
            )
        })
}

/// The reference's `NgramHashMapping`: compression plus per-layer hash parameters.
#[derive(Debug, Clone)]
pub struct NgramHashMapping {
    compressed: Arc<CompressedTokenizer>,
    /// Canonical id of `pad_id`.
    pad_canonical: i64,
    max_ngram_size: usize,
    n_head_per_ngram: usize,
    layers: Vec<LayerHashParams>,
}

impl NgramHashMapping {
    /// Draws multipliers and primes for every layer of `cfg.layer_ids`.
    pub fn new(cfg: &EngramConfig, compressed: Arc<CompressedTokenizer>) -> Result<Self> {
        cfg.validate()?;
        let pad_canonical = compressed.canonical_pad("pad_id", cfg.pad_id)?;
        let layers = draw_layer_params(
            &cfg.layer_ids,
            &cfg.engram_vocab_size,
            cfg.n_head_per_ngram,
            cfg.max_ngram_size,
            cfg.seed,
            compressed.num_compressed() as u64,
        );
        Ok(NgramHashMapping {
            compressed,
            pad_canonical,
            max_ngram_size: cfg.max_ngram_size,
            n_head_per_ngram: cfg.n_head_per_ngram,
            layers,
        })
    }

    /// The compression table.
    pub fn compressed(&self) -> &CompressedTokenizer {
        &self.compressed
    }

    /// Canonical id of the pad token.
    pub fn pad_canonical(&self) -> i64 {
        self.pad_canonical
    }

    /// N.
    pub fn max_ngram_size(&self) -> usize {
        self.max_ngram_size
    }

    /// H = (N-1)·K.
    pub fn num_heads(&self) -> usize {
        (self.max_ngram_size - 1) * self.n_head_per_ngram
    }

    /// Parameters of every layer, in `layer_ids` order.
    pub fn layers(&self) -> &[LayerHashParams] {
        &self.layers
    }

    /// Parameters of one layer.
    pub fn layer(&self, layer_id: u64) -> Result<&LayerHashParams> {
        self.layers
            .iter()
            .find(|l| l.layer_id == layer_id)
            .ok_or_else(|| {
                EngramError::invalid(
                    "layer_id",
                    format!(
                        "one of {:?}",
                        self.layers.iter().map(|l| l.layer_id).collect::<Vec<_>>()
                    ),
                    layer_id,
                )
            })
    }

    /// Hashes of one position given its canonical history, newest first:
    /// `hist[k]` = canonical id at t-k (pad canonical before the start). Writes H values.
    #[inline]
    pub fn hash_position(&self, layer: &LayerHashParams, hist: &[i64], out: &mut [i64]) {
        let k = self.n_head_per_ngram;
        let m = &layer.multipliers;
        let mut mix = hist[0].wrapping_mul(m[0]);
        for n in 2..=self.max_ngram_size {
            mix ^= hist[n - 1].wrapping_mul(m[n - 1]);
            let heads = &layer.primes[n - 2];
            for (j, &p) in heads.iter().enumerate() {
                out[(n - 2) * k + j] = mix.rem_euclid(p as i64);
            }
        }
    }

    /// Hashes of `[batch, len]` canonical ids for one layer: `[batch, len, H]`.
    pub fn hash_canonical(&self, layer: &LayerHashParams, canon: &[i64], len: usize) -> Vec<i64> {
        let h = self.num_heads();
        let n = self.max_ngram_size;
        let mut out = vec![0i64; canon.len() * h];
        let mut hist = vec![0i64; n];
        for (b, row) in canon.chunks(len.max(1)).enumerate() {
            for t in 0..row.len() {
                for (k, hk) in hist.iter_mut().enumerate() {
                    *hk = if t >= k {
                        row[t - k]
                    } else {
                        self.pad_canonical
                    };
                }
                let o = (b * len + t) * h;
                self.hash_position(layer, &hist, &mut out[o..o + h]);
            }
        }
        out
    }

    /// `hash(input_ids)[layer_id]`: raw ids `[batch, len]` -> `[batch, len, H]`.
    pub fn hash(&self, layer_id: u64, input_ids: &[i64], len: usize) -> Result<Vec<i64>> {
        let layer = self.layer(layer_id)?;
        let canon = self.compressed.compress(input_ids, len)?;
        Ok(self.hash_canonical(layer, &canon, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prime draw resumed per base equals the reference's plain draw (every search from
    /// base - 1), over many layers and repeated bases.
    #[test]
    fn resumed_prime_search_equals_the_plain_one() {
        let plain = |layers: &[u64], bases: &[u64], heads: usize| -> Vec<Vec<Vec<u64>>> {
            let mut seen = HashSet::new();
            layers
                .iter()
                .map(|_| {
                    bases
                        .iter()
                        .map(|&b| {
                            let mut start = b - 1;
                            (0..heads)
                                .map(|_| {
                                    let p = next_unseen_prime(start, &seen);
                                    seen.insert(p);
                                    start = p;
                                    p
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        let layers: Vec<u64> = (0..24).collect();
        for bases in [vec![1000, 1000, 1200], vec![5000, 4990], vec![7, 7, 7, 7]] {
            let got: Vec<Vec<Vec<u64>>> =
                draw_layer_params(&layers, &bases, 8, bases.len() + 1, 0, 100)
                    .into_iter()
                    .map(|l| l.primes)
                    .collect();
            assert_eq!(got, plain(&layers, &bases, 8), "{bases:?}");
        }
        // A config must be whole before it is sized: zeros are errors, not underflows.
        let c = EngramConfig {
            kernel_size: 0,
            ..Default::default()
        };
        assert!(c.sizes().unwrap_err().to_string().contains("kernel_size"));
        let c = EngramConfig {
            max_ngram_size: 1,
            ..Default::default()
        };
        assert!(c
            .sizes()
            .unwrap_err()
            .to_string()
            .contains("max_ngram_size"));
    }

    /// `table_rows` (primes only, no tokenizer) is the sum of the layer's primes as the full
    /// draw finds them, for a layer late in a long `layer_ids`, where the 1024-per-head
    /// estimate falls short.
    #[test]
    fn exact_table_rows_match_the_full_draw_and_can_exceed_the_estimate() {
        let cfg = EngramConfig {
            engram_vocab_size: vec![1000, 1200],
            max_ngram_size: 3,
            layer_ids: (0..200).collect(),
            layer_id: 150,
            ..Default::default()
        };
        let full = draw_layer_params(&cfg.layer_ids, &cfg.engram_vocab_size, 8, 3, 0, 100);
        let want: u64 = full[150].primes.iter().flatten().sum();
        assert_eq!(table_rows(&cfg).unwrap(), want);
        assert!(want > cfg.sizes().unwrap().table_rows_estimate, "{want}");
        let first = EngramConfig {
            layer_id: 0,
            ..cfg.clone()
        };
        assert_eq!(
            table_rows(&first).unwrap(),
            full[0].primes.iter().flatten().sum::<u64>()
        );
        // An invalid config is refused, not drawn.
        let bad = EngramConfig {
            layer_id: 999,
            ..cfg
        };
        assert!(table_rows(&bad)
            .unwrap_err()
            .to_string()
            .contains("layer_id"));
    }

    #[test]
    fn miller_rabin_matches_trial_division() {
        let trial = |n: u64| {
            n >= 2
                && (2..)
                    .take_while(|d| d * d <= n)
                    .all(|d| !n.is_multiple_of(d))
        };
        for n in 0..20_000u64 {
            assert_eq!(is_prime(n), trial(n), "n = {n}");
        }
        // Strong pseudoprimes to several bases, and large known primes.
        for n in [3215031751u64, 3825123056546413051, 341550071728321] {
            assert!(!is_prime(n), "{n} is composite");
        }
        assert!(is_prime(18446744073709551557)); // largest 64-bit prime
        assert!(is_prime(1_000_000_007));
    }
}
