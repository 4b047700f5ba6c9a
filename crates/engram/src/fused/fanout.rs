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
    take_in_order(units, threads, work);
}

/// Runs `work(u)` once for every `u < units` as [`for_each_unit`] does outside a pool, but
/// also inside one: units are taken in index order from a shared counter by the calling
/// thread and up to `threads - 1` jobs spawned into the current pool (the global one from
/// outside any pool). A parallel iterator would hand the caller's first split (the first
/// units) to the caller alone: with units that shrink (the fused driver's guided ranges),
/// 58% of the rows went to one of two threads.
pub(crate) fn for_each_unit_in_order(units: usize, threads: usize, work: &(impl Fn(usize) + Sync)) {
    if threads <= 1 || units <= 1 {
        (0..units).for_each(work);
        return;
    }
    take_in_order(units, threads, work);
}

/// The shared counter of [`for_each_unit`] and [`for_each_unit_in_order`].
fn take_in_order(units: usize, threads: usize, work: &(impl Fn(usize) + Sync)) {
    let next = AtomicUsize::new(0);
    let started = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    // Outside any pool, `current_num_threads` is the global pool's, where the jobs go;
    // inside one, the caller is one of that pool's threads.
    let in_pool = usize::from(rayon::current_thread_index().is_some());
    let helpers = (threads - 1)
        .min(units - 1)
        .min(rayon::current_num_threads() - in_pool);
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

    fn counts(units: usize, threads: usize, in_pool: bool, ordered: bool) -> Vec<usize> {
        let seen: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
        let run = || {
            let work = |u: usize| {
                seen[u].fetch_add(1, Ordering::Relaxed);
            };
            if ordered {
                for_each_unit_in_order(units, threads, &work)
            } else {
                for_each_unit(units, threads, &work)
            }
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
    /// inside one, for more and fewer units than threads, in both variants.
    #[test]
    fn every_unit_runs_once() {
        for units in [0, 1, 2, 3, 7, 54] {
            for threads in [1, 2, 3, 8] {
                for in_pool in [false, true] {
                    for ordered in [false, true] {
                        let c = counts(units, threads, in_pool, ordered);
                        assert!(
                            c.iter().all(|&n| n == 1),
                            "units {units}, threads {threads}, in pool {in_pool}, ordered {ordered}: {c:?}"
                        );
                    }
                }
            }
        }
    }

    /// Inside a pool, the second unit is taken while the first runs: unit 0 waits (up to
    /// 10 s) for unit 1 to start. A parallel iterator hands the caller a first split of
    /// several units that it runs one after another, so there unit 1 would start only after
    /// unit 0 gave up.
    #[test]
    fn in_order_inside_a_pool() {
        use std::sync::atomic::AtomicBool;
        let (one_started, zero_saw_it) = (AtomicBool::new(false), AtomicBool::new(false));
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(|| {
                for_each_unit_in_order(15, 2, &|u| match u {
                    0 => {
                        let t0 = Instant::now();
                        while !one_started.load(Ordering::SeqCst)
                            && t0.elapsed() < Duration::from_secs(10)
                        {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        zero_saw_it.store(one_started.load(Ordering::SeqCst), Ordering::SeqCst);
                    }
                    1 => one_started.store(true, Ordering::SeqCst),
                    _ => {}
                })
            });
        assert!(zero_saw_it.into_inner(), "unit 1 waited for unit 0");
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
