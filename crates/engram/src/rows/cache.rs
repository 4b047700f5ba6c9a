//! A hot-row cache in front of any store: decoded rows up to a byte budget, CLOCK eviction
//! (second chance: a row read again since the hand last passed survives one sweep, so a
//! one-off scan of cold rows does not flush the hot ones), sharded by row id so that readers
//! of different rows do not wait for each other.

use super::{RowStore, StoreStats};
use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct Slot {
    row: usize,
    referenced: bool,
    data: Box<[f32]>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<usize, usize>,
    slots: Vec<Slot>,
    hand: usize,
}

/// Rows of `inner`, the hot ones kept in memory within `budget` bytes.
pub struct CachedRows {
    inner: Arc<dyn RowStore>,
    shards: Vec<Mutex<Shard>>,
    /// Rows each shard may hold.
    per_shard: usize,
    budget: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for CachedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachedRows({} bytes over {:?})", self.budget, self.inner)
    }
}

impl CachedRows {
    /// A cache of at most `budget` bytes of decoded rows in front of `inner`.
    pub fn new(inner: Arc<dyn RowStore>, budget: u64) -> Self {
        let row_bytes = (inner.dim() * 4).max(1) as u64;
        let capacity = (budget / row_bytes) as usize;
        let nshards = capacity.clamp(1, 64);
        CachedRows {
            per_shard: capacity / nshards,
            shards: (0..nshards).map(|_| Mutex::new(Shard::default())).collect(),
            inner,
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Bytes of decoded rows held now (never more than the budget).
    pub fn held_bytes(&self) -> u64 {
        let rows: usize = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).slots.len())
            .sum();
        (rows * self.inner.dim() * 4) as u64
    }

    fn shard(&self, r: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[r % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lookup(&self, r: usize, out: &mut [f32]) -> bool {
        let mut s = self.shard(r);
        if let Some(&i) = s.map.get(&r) {
            let slot = &mut s.slots[i];
            slot.referenced = true;
            out.copy_from_slice(&slot.data);
            return true;
        }
        false
    }

    fn insert(&self, r: usize, row: &[f32]) {
        if self.per_shard == 0 {
            return;
        }
        let mut s = self.shard(r);
        if s.map.contains_key(&r) {
            return;
        }
        if s.slots.len() < self.per_shard {
            let i = s.slots.len();
            s.slots.push(Slot {
                row: r,
                referenced: false,
                data: row.into(),
            });
            s.map.insert(r, i);
            return;
        }
        // CLOCK: clear reference bits until an unreferenced slot comes under the hand.
        loop {
            let h = s.hand;
            s.hand = (h + 1) % s.slots.len();
            if s.slots[h].referenced {
                s.slots[h].referenced = false;
                continue;
            }
            s.slots[h].data.copy_from_slice(row);
            let old = std::mem::replace(&mut s.slots[h].row, r);
            s.map.remove(&old);
            s.map.insert(r, h);
            return;
        }
    }
}

impl RowStore for CachedRows {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if self.lookup(r, out) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.inner.row_into(r, out)?;
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.insert(r, out);
        Ok(())
    }
    /// Hits are copied at once; the misses go to the inner store together, each distinct row
    /// once (a row asked for twice in one batch is read once and counts one miss).
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        let d = self.dim();
        super::check_gather_len(rows.len(), d, out.len())?;
        let mut miss_rows = Vec::new();
        let mut miss_at = Vec::new();
        let mut first: HashMap<usize, usize> = HashMap::new();
        let mut repeats = Vec::new();
        let mut hits = 0u64;
        for (i, (&r, o)) in rows.iter().zip(out.chunks_exact_mut(d)).enumerate() {
            if self.lookup(r, o) {
                hits += 1;
            } else if let Some(&k) = first.get(&r) {
                repeats.push((i, k));
            } else {
                first.insert(r, miss_rows.len());
                miss_rows.push(r);
                miss_at.push(i);
            }
        }
        self.hits
            .fetch_add(hits + repeats.len() as u64, Ordering::Relaxed);
        if miss_rows.is_empty() {
            return Ok(());
        }
        let mut got = vec![0f32; miss_rows.len() * d];
        self.inner.gather(&miss_rows, &mut got)?;
        self.misses
            .fetch_add(miss_rows.len() as u64, Ordering::Relaxed);
        for ((&r, &i), row) in miss_rows.iter().zip(&miss_at).zip(got.chunks_exact(d)) {
            out[i * d..(i + 1) * d].copy_from_slice(row);
            self.insert(r, row);
        }
        for (i, k) in repeats {
            out[i * d..(i + 1) * d].copy_from_slice(&got[k * d..(k + 1) * d]);
        }
        Ok(())
    }
    fn prefetch(&self, rows: &[usize]) {
        self.inner.prefetch(rows)
    }
    fn clear(&self) {
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.map.clear();
            s.slots.clear();
            s.hand = 0;
        }
        self.inner.clear();
    }
    fn stats(&self) -> StoreStats {
        StoreStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes_read: self.inner.stats().bytes_read,
        }
    }
}
