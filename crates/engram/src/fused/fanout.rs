//! A call's work units fanned out over rayon's pool, from whichever thread calls.
//!
//! A parallel iterator called from a thread outside the pool (a serving loop's thread,
//! the CLI's or Python's main thread) hands the whole call to the pool and puts the
//! caller to sleep until it is done. On the 2-core VM of `bench/results/` that round trip
//! alone took 11 µs (an empty `rayon::broadcast`) to 21 µs (an empty `rayon::join`),
//! against 0.04 µs for a `join` inside the pool, while a B = 1 decode step streams all of
//! its projection weights in 50-130 µs. [`for_each_unit`] keeps the caller working
//! instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a caller outside the pool spins for its running helpers to finish their last
/// units before it blocks on the scope.
const HELPER_SPIN: Duration = Duration::from_micros(200);

/// Runs `work(u)` once for every `u < units`, in parallel when `threads > 1`.
///
/// Inside rayon's pool this is a parallel iterator over the pool's threads (as every
/// parallel iterator, it splits over all of them, whatever `threads` says). Outside it, the
/// calling thread works too: it and up to `threads - 1` jobs spawned into the pool (no more
/// than the pool has threads) each take the next unit from a shared counter until none are
/// left, so the caller starts at once and the work evens out to within a unit. The caller
/// then spins, at most [`HELPER_SPIN`], while a helper that has started is still on its
/// last unit, so that it does not sleep and wait to be woken a moment later; helpers that
/// have not started (a pool busy with other work) are left to the scope's blocking wait,
/// and find nothing left to do. A panic in `work` reaches the caller (from the scope), on
/// any thread.
pub(crate) fn for_each_unit(units: usize, threads: usize, work: &(impl Fn(usize) + Sync)) {
    if threads <= 1 || units <= 1 {
        (0..units).for_each(work);
        return;
    }
    if rayon::current_thread_index().is_some() {
        use rayon::prelude::*;
        (0..units).into_par_iter().for_each(work);
        return;
    }
    let next = AtomicUsize::new(0);
    let started = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    // Outside any pool, `current_num_threads` is the global pool's, where the jobs go.
    let helpers = (threads - 1)
        .min(units - 1)
        .min(rayon::current_num_threads());
    let take_units = || loop {
        let u = next.fetch_add(1, Ordering::Relaxed);
        if u >= units {
            break;
        }
        work(u);
    };
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| {
                started.fetch_add(1, Ordering::Relaxed);
                take_units();
                done.fetch_add(1, Ordering::Release);
            });
        }
        take_units();
        let t0 = Instant::now();
        while done.load(Ordering::Acquire) < started.load(Ordering::Relaxed)
            && t0.elapsed() < HELPER_SPIN
        {
            std::hint::spin_loop();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(units: usize, threads: usize, in_pool: bool) -> Vec<usize> {
        let seen: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
        let run = || {
            for_each_unit(units, threads, &|u| {
                seen[u].fetch_add(1, Ordering::Relaxed);
            })
        };
        if in_pool {
            rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(run);
        } else {
            run();
        }
        seen.into_iter().map(AtomicUsize::into_inner).collect()
    }

    /// Every unit runs exactly once, from outside the pool (the test's own thread) and from
    /// inside one, for more and fewer units than threads.
    #[test]
    fn every_unit_runs_once() {
        for units in [0, 1, 2, 3, 7, 54] {
            for threads in [1, 2, 3, 8] {
                for in_pool in [false, true] {
                    let c = counts(units, threads, in_pool);
                    assert!(
                        c.iter().all(|&n| n == 1),
                        "units {units}, threads {threads}, in pool {in_pool}: {c:?}"
                    );
                }
            }
        }
    }

    /// A unit's panic reaches the caller, whichever thread ran it, and nothing hangs.
    #[test]
    fn a_panicking_unit_reaches_the_caller() {
        for bad in [0, 5, 11] {
            let r = std::panic::catch_unwind(|| {
                for_each_unit(12, 2, &|u| {
                    if u == bad {
                        panic!("unit {u}");
                    }
                })
            });
            assert!(r.is_err(), "unit {bad}'s panic was lost");
        }
    }
}
