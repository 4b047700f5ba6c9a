//! Process-wide time counters of the fused path's stages (summed over threads), for
//! `engram bench`. Each tile adds a few `Instant` reads; nothing else is recorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Stages of the fused path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Hashing and table gather.
    HashGather = 0,
    /// The projection GEMM.
    Projection = 1,
    /// Gate kernel (norms, gate, gated value, conv norm).
    Gate = 2,
    /// Short conv + SiLU + residual (and boundary fix-ups).
    Conv = 3,
    /// Waiting for a row store's reads (the part of a tile's gather not hidden behind the
    /// previous tile's compute).
    IoWait = 4,
}

/// Names, in `Stage` order.
pub const STAGE_NAMES: [&str; 5] = ["hash+gather", "projection", "gate", "conv", "io_wait"];

static NANOS: [AtomicU64; 5] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

pub(crate) fn add(stage: Stage, since: Instant) {
    add_nanos(stage, since.elapsed().as_nanos() as u64);
}

/// Adds time measured by the caller (summed over many rows, added once).
pub(crate) fn add_nanos(stage: Stage, nanos: u64) {
    NANOS[stage as usize].fetch_add(nanos, Ordering::Relaxed);
}

/// Returns the thread-seconds spent per stage since the last call, and resets them.
pub fn take() -> [f64; 5] {
    let mut out = [0.0; 5];
    for (o, n) in out.iter_mut().zip(&NANOS) {
        *o = n.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    }
    out
}
