//! A hot-row cache in front of any store: decoded rows up to a byte budget, sharded by row id
//! so that readers of different rows do not wait for each other. The eviction policy is a
//! choice ([`CachePolicy`]): S3-FIFO (default), CLOCK or LRU. Rows of a store whose values
//! are all exactly bf16 (bf16 and fp8 tables) are kept in 2 bytes per value, others in 4.
//!
//! The budget covers the rows and [`SLOT_OVERHEAD`] bytes of bookkeeping per row (index
//! entry, policy state, S3-FIFO's remembered keys); `held_bytes` never exceeds it.

use super::{CachePolicy, RowStore, StoreStats};
use crate::error::{EngramError, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of bookkeeping charged to the budget per cached row: the index (16-byte entries at a
/// load of 1/4 to 1/2: 32-64 B), the row id (8), the policy's state (S3-FIFO: a queue entry
/// and up to one remembered key, ~45 B; LRU: two links, 8 B) and slack. The shard's tables are
/// sized once for its rows, so they do not grow past this.
pub const SLOT_OVERHEAD: u64 = 128;

/// Shards of the cache (each behind its own lock).
const MAX_SHARDS: usize = 64;

/// Share of a shard's slots for S3-FIFO's small (probation) queue, as in the paper (10%).
const S3_SMALL_SHARE: f64 = 0.1;

/// Rows probed ahead of the one being looked up in a gather (see [`CachedRows::gather`]).
const PROBE_AHEAD: usize = 8;

/// Rows of one shard, packed: slot `i` holds values `i·dim .. (i+1)·dim`.
enum Arena {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Arena {
    fn load(&self, slot: usize, dim: usize, out: &mut [f32]) {
        match self {
            Arena::F32(v) => out.copy_from_slice(&v[slot * dim..(slot + 1) * dim]),
            Arena::Bf16(v) => {
                for (o, x) in out.iter_mut().zip(&v[slot * dim..(slot + 1) * dim]) {
                    *o = x.to_f32();
                }
            }
        }
    }

    /// Asks the CPU to start loading `slot`'s values.
    #[inline]
    fn prefetch(&self, slot: usize, dim: usize) {
        let (p, bytes) = match self {
            Arena::F32(v) => (v[slot * dim..].as_ptr() as *const u8, 4 * dim),
            Arena::Bf16(v) => (v[slot * dim..].as_ptr() as *const u8, 2 * dim),
        };
        for off in (0..bytes).step_by(64) {
            prefetch(p.wrapping_add(off));
        }
    }

    /// Writes `row` into `slot`; a slot one past the end grows the arena (the first growth
    /// reserves exactly `capacity` rows, so the arena never holds more than that).
    fn store(&mut self, slot: usize, dim: usize, capacity: usize, row: &[f32]) {
        match self {
            Arena::F32(v) => {
                if v.len() < (slot + 1) * dim {
                    v.reserve_exact((capacity * dim).saturating_sub(v.len()));
                    v.resize((slot + 1) * dim, 0.0);
                }
                v[slot * dim..(slot + 1) * dim].copy_from_slice(row);
            }
            Arena::Bf16(v) => {
                if v.len() < (slot + 1) * dim {
                    v.reserve_exact((capacity * dim).saturating_sub(v.len()));
                    v.resize((slot + 1) * dim, half::bf16::ZERO);
                }
                for (o, x) in v[slot * dim..(slot + 1) * dim].iter_mut().zip(row) {
                    // Exact: the store promised bf16 values.
                    *o = half::bf16::from_f32(*x);
                }
            }
        }
    }

    fn clear(&mut self) {
        match self {
            Arena::F32(v) => *v = Vec::new(),
            Arena::Bf16(v) => *v = Vec::new(),
        }
    }
}

/// Eviction state of one shard, per policy; slots are indices into the shard's arena.
enum Evict {
    Clock {
        referenced: Vec<bool>,
        hand: usize,
    },
    /// A doubly linked list over slots, most recent at `head`.
    Lru {
        prev: Vec<u32>,
        next: Vec<u32>,
        head: u32,
        tail: u32,
    },
    S3Fifo {
        /// Reads since insertion, saturating at 3.
        freq: Vec<u8>,
        small: VecDeque<u32>,
        main: VecDeque<u32>,
        /// Rows recently evicted from `small` (keys only), oldest first, with the insertion
        /// number that `ghost_at` must still show for the entry to count.
        ghost: VecDeque<(usize, u64)>,
        ghost_at: HashMap<usize, u64>,
        ghost_seq: u64,
        small_cap: usize,
        ghost_cap: usize,
    },
}

const NIL: u32 = u32::MAX;

/// The error of a cache bookkeeping allocation the allocator refused.
fn refused(what: &str, n: usize) -> EngramError {
    EngramError::invalid(
        format!("memory for the row cache's {what}"),
        format!("room for {n} rows"),
        "the allocator refused it (not enough memory)",
    )
}

/// An empty `Vec` with room for `n`, or the error naming `what` (where `with_capacity`
/// would abort the process).
fn room<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    crate::alloc::fallible(|| v.try_reserve_exact(n)).map_err(|_| refused(what, n))?;
    Ok(v)
}

/// [`room`] for a `VecDeque`.
fn room_deque<T>(n: usize, what: &str) -> Result<VecDeque<T>> {
    let mut v = VecDeque::new();
    crate::alloc::fallible(|| v.try_reserve_exact(n)).map_err(|_| refused(what, n))?;
    Ok(v)
}

impl Evict {
    fn new(policy: CachePolicy, capacity: usize) -> Result<Self> {
        Ok(match policy {
            CachePolicy::Clock => Evict::Clock {
                referenced: room(capacity, "clock bits")?,
                hand: 0,
            },
            CachePolicy::Lru => Evict::Lru {
                prev: room(capacity, "LRU links")?,
                next: room(capacity, "LRU links")?,
                head: NIL,
                tail: NIL,
            },
            CachePolicy::S3Fifo => {
                let small_cap = ((capacity as f64 * S3_SMALL_SHARE).ceil() as usize).max(1);
                let ghost_cap = capacity.saturating_sub(small_cap).max(1);
                let mut ghost_at = HashMap::new();
                crate::alloc::fallible(|| ghost_at.try_reserve(ghost_cap + 1))
                    .map_err(|_| refused("S3-FIFO ghosts", ghost_cap + 1))?;
                Evict::S3Fifo {
                    freq: room(capacity, "S3-FIFO counts")?,
                    small: room_deque(capacity, "S3-FIFO queues")?,
                    main: room_deque(capacity, "S3-FIFO queues")?,
                    ghost: room_deque(ghost_cap + 1, "S3-FIFO ghosts")?,
                    ghost_at,
                    ghost_seq: 0,
                    small_cap,
                    ghost_cap,
                }
            }
        })
    }

    /// Back to empty, as [`Evict::new`] made it, keeping the room it has.
    fn reset(&mut self) {
        match self {
            Evict::Clock { referenced, hand } => {
                referenced.clear();
                *hand = 0;
            }
            Evict::Lru {
                prev,
                next,
                head,
                tail,
            } => {
                prev.clear();
                next.clear();
                (*head, *tail) = (NIL, NIL);
            }
            Evict::S3Fifo {
                freq,
                small,
                main,
                ghost,
                ghost_at,
                ghost_seq,
                ..
            } => {
                freq.clear();
                small.clear();
                main.clear();
                ghost.clear();
                ghost_at.clear();
                *ghost_seq = 0;
            }
        }
    }

    fn lru_unlink(prev: &mut [u32], next: &mut [u32], head: &mut u32, tail: &mut u32, s: u32) {
        let (p, n) = (prev[s as usize], next[s as usize]);
        if p != NIL {
            next[p as usize] = n;
        } else {
            *head = n;
        }
        if n != NIL {
            prev[n as usize] = p;
        } else {
            *tail = p;
        }
    }

    fn lru_push_front(prev: &mut [u32], next: &mut [u32], head: &mut u32, tail: &mut u32, s: u32) {
        prev[s as usize] = NIL;
        next[s as usize] = *head;
        if *head != NIL {
            prev[*head as usize] = s;
        }
        *head = s;
        if *tail == NIL {
            *tail = s;
        }
    }

    /// A hit on `slot`.
    fn touch(&mut self, slot: usize) {
        match self {
            Evict::Clock { referenced, .. } => referenced[slot] = true,
            Evict::Lru {
                prev,
                next,
                head,
                tail,
            } => {
                Self::lru_unlink(prev, next, head, tail, slot as u32);
                Self::lru_push_front(prev, next, head, tail, slot as u32);
            }
            Evict::S3Fifo { freq, .. } => freq[slot] = (freq[slot] + 1).min(3),
        }
    }

    /// `row` was just put in `slot` (a new slot, or one [`Evict::victim`] freed).
    fn placed(&mut self, slot: usize, row: usize) {
        let s = slot as u32;
        match self {
            Evict::Clock { referenced, .. } => {
                if referenced.len() <= slot {
                    referenced.resize(slot + 1, false);
                }
                referenced[slot] = false;
            }
            Evict::Lru {
                prev,
                next,
                head,
                tail,
            } => {
                if prev.len() <= slot {
                    prev.resize(slot + 1, NIL);
                    next.resize(slot + 1, NIL);
                }
                Self::lru_push_front(prev, next, head, tail, s);
            }
            Evict::S3Fifo {
                freq,
                small,
                main,
                ghost_at,
                ..
            } => {
                if freq.len() <= slot {
                    freq.resize(slot + 1, 0);
                }
                freq[slot] = 0;
                // A row seen recently (evicted from the small queue) goes straight to main.
                if ghost_at.remove(&row).is_some() {
                    main.push_back(s);
                } else {
                    small.push_back(s);
                }
            }
        }
    }

    /// Chooses the slot to reuse when the shard is full (`rows` maps slots to their rows,
    /// to remember evicted keys).
    fn victim(&mut self, rows: &[usize]) -> usize {
        match self {
            Evict::Clock { referenced, hand } => loop {
                let h = *hand;
                *hand = (h + 1) % referenced.len();
                if referenced[h] {
                    referenced[h] = false;
                } else {
                    return h;
                }
            },
            Evict::Lru {
                prev,
                next,
                head,
                tail,
            } => {
                let t = *tail;
                Self::lru_unlink(prev, next, head, tail, t);
                t as usize
            }
            Evict::S3Fifo {
                freq,
                small,
                main,
                ghost,
                ghost_at,
                ghost_seq,
                small_cap,
                ghost_cap,
            } => loop {
                if small.len() >= *small_cap || main.is_empty() {
                    let Some(t) = small.pop_front() else {
                        // Unreachable with a non-empty shard; fall back to main.
                        return main.pop_front().map_or(0, |t| t as usize);
                    };
                    if freq[t as usize] > 0 {
                        // Read again while on probation: promoted, not evicted.
                        freq[t as usize] = 0;
                        main.push_back(t);
                        continue;
                    }
                    *ghost_seq += 1;
                    let row = rows[t as usize];
                    ghost.push_back((row, *ghost_seq));
                    ghost_at.insert(row, *ghost_seq);
                    while ghost.len() > *ghost_cap {
                        if let Some((r, q)) = ghost.pop_front() {
                            if ghost_at.get(&r) == Some(&q) {
                                ghost_at.remove(&r);
                            }
                        }
                    }
                    return t as usize;
                }
                let t = main.pop_front().expect("main is not empty");
                if freq[t as usize] > 0 {
                    freq[t as usize] -= 1;
                    main.push_back(t);
                    continue;
                }
                return t as usize;
            },
        }
    }
}

/// Row id → slot, by open addressing with linear probing: entries `(row + 1, slot)`, 0 for
/// empty; sized once for the shard's rows at a load of at most 1/2 (16 bytes an entry, 32-64
/// bytes a cached row), deletion by backward shift (no tombstones). A lookup costs one cache
/// line where `std`'s map costs a SipHash and two: the hits of a gather are bound by these
/// misses, so [`CachedRows::gather`] prefetches buckets ahead of the probes.
struct RowIndex {
    entries: Box<[[u64; 2]]>,
    mask: usize,
    shift: u32,
}

impl RowIndex {
    fn new(rows: usize) -> Result<Self> {
        let n = (2 * rows).max(8).next_power_of_two();
        Ok(RowIndex {
            // Zero pages handed out lazily, as `vec!` would, but an error, not an abort,
            // where the allocator refuses them.
            entries: crate::alloc::try_zeroed::<[u64; 2]>(n, "the row cache's index", false)?
                .into_boxed_slice(),
            mask: n - 1,
            shift: 64 - n.trailing_zeros(),
        })
    }

    /// The bucket a row's probe starts at (Fibonacci hashing: the high bits of `r · φ⁻¹·2⁶⁴`;
    /// the low bits of rows in one shard are all alike).
    #[inline]
    fn home(&self, r: usize) -> usize {
        ((r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize & self.mask
    }

    #[inline]
    fn get(&self, r: usize) -> Option<u32> {
        let key = r as u64 + 1;
        let mut i = self.home(r);
        loop {
            let [k, v] = self.entries[i];
            if k == key {
                return Some(v as u32);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Adds `r` (not present) at `slot`.
    fn insert(&mut self, r: usize, slot: u32) {
        let mut i = self.home(r);
        while self.entries[i][0] != 0 {
            i = (i + 1) & self.mask;
        }
        self.entries[i] = [r as u64 + 1, slot as u64];
    }

    fn remove(&mut self, r: usize) {
        let key = r as u64 + 1;
        let mut i = self.home(r);
        loop {
            match self.entries[i][0] {
                0 => return,
                k if k == key => break,
                _ => i = (i + 1) & self.mask,
            }
        }
        // Backward shift: pull later entries of the run into the hole when their probe
        // started at or before it.
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let k = self.entries[j][0];
            if k == 0 {
                break;
            }
            let h = self.home((k - 1) as usize);
            let stays = if i <= j {
                i < h && h <= j
            } else {
                i < h || h <= j
            };
            if !stays {
                self.entries[i] = self.entries[j];
                i = j;
            }
        }
        self.entries[i] = [0, 0];
    }

    fn clear(&mut self) {
        self.entries.fill([0, 0]);
    }

    /// Asks the CPU to start loading `r`'s bucket.
    #[inline]
    fn prefetch(&self, r: usize) {
        prefetch(self.entries[self.home(r)..].as_ptr() as *const u8);
    }
}

/// A hint to start loading the line at `p` (no effect where unsupported).
#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint and never faults; `p` points into a live allocation.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

struct Shard {
    map: RowIndex,
    /// Row held by each slot.
    rows: Vec<usize>,
    arena: Arena,
    evict: Evict,
}

/// Rows of `inner`, the hot ones kept in memory within `budget` bytes.
pub struct CachedRows {
    inner: Arc<dyn RowStore>,
    shards: Vec<Mutex<Shard>>,
    /// Rows each shard may hold.
    per_shard: usize,
    /// Bytes charged per cached row (values and bookkeeping).
    slot_bytes: u64,
    policy: CachePolicy,
    bf16: bool,
    budget: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for CachedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CachedRows({} bytes, {:?}, over {:?})",
            self.budget, self.policy, self.inner
        )
    }
}

impl CachedRows {
    /// A cache of at most `budget` bytes in front of `inner`, with the default policy.
    pub fn new(inner: Arc<dyn RowStore>, budget: u64) -> Result<Self> {
        Self::with_policy(inner, budget, CachePolicy::default())
    }

    /// Rows a cache of `budget` bytes in front of `inner` holds, and the bytes charged per
    /// row: never more rows than the table's rows rounded up to a multiple of the shards (a
    /// budget beyond that buys nothing and would still size the index), nor more than a
    /// shard's u32 slots.
    pub fn capacity_for(inner: &dyn RowStore, budget: u64) -> (usize, u64) {
        let value_bytes = if inner.bf16_exact() { 2 } else { 4 };
        let slot_bytes = (inner.dim() as u64 * value_bytes).max(1) + SLOT_OVERHEAD;
        // Rows go to shard `r % shards`: a whole number of table rows per shard, so that a
        // budget as large as the table holds all of it.
        let table = (inner.rows() as u64).div_ceil(MAX_SHARDS as u64) * MAX_SHARDS as u64;
        let rows = (budget / slot_bytes)
            .min(table)
            .min(MAX_SHARDS as u64 * (NIL as u64 - 1));
        (rows as usize, slot_bytes)
    }

    /// A cache of at most `budget` bytes in front of `inner`, evicting by `policy`. Its
    /// bookkeeping is allocated here (the rows as they arrive): an allocator that refuses
    /// it is an error naming the cache.
    pub fn with_policy(inner: Arc<dyn RowStore>, budget: u64, policy: CachePolicy) -> Result<Self> {
        let bf16 = inner.bf16_exact();
        let (capacity, slot_bytes) = Self::capacity_for(inner.as_ref(), budget);
        let nshards = capacity.clamp(1, MAX_SHARDS);
        let per_shard = capacity / nshards;
        Ok(CachedRows {
            per_shard,
            shards: (0..nshards)
                .map(|_| {
                    Ok(Mutex::new(Shard {
                        map: RowIndex::new(per_shard)?,
                        rows: room(per_shard, "row slots")?,
                        arena: if bf16 {
                            Arena::Bf16(Vec::new())
                        } else {
                            Arena::F32(Vec::new())
                        },
                        evict: Evict::new(policy, per_shard)?,
                    }))
                })
                .collect::<Result<_>>()?,
            slot_bytes,
            policy,
            bf16,
            inner,
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The eviction policy.
    pub fn policy(&self) -> CachePolicy {
        self.policy
    }

    /// Rows the cache can hold.
    pub fn capacity_rows(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// Bytes charged for the rows held now (never more than the budget).
    pub fn held_bytes(&self) -> u64 {
        let rows: usize = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).rows.len())
            .sum();
        rows as u64 * self.slot_bytes
    }

    fn shard(&self, r: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[r % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lookup(&self, r: usize, out: &mut [f32]) -> bool {
        let d = self.inner.dim();
        let mut s = self.shard(r);
        if let Some(i) = s.map.get(r) {
            s.evict.touch(i as usize);
            s.arena.load(i as usize, d, out);
            return true;
        }
        false
    }

    fn insert(&self, r: usize, row: &[f32]) {
        if self.per_shard == 0 {
            return;
        }
        let d = self.inner.dim();
        let mut guard = self.shard(r);
        let s = &mut *guard;
        if s.map.get(r).is_some() {
            return;
        }
        let slot = if s.rows.len() < self.per_shard {
            s.rows.push(r);
            s.rows.len() - 1
        } else {
            let v = s.evict.victim(&s.rows);
            let old = std::mem::replace(&mut s.rows[v], r);
            s.map.remove(old);
            v
        };
        s.arena.store(slot, d, self.per_shard, row);
        s.map.insert(r, slot as u32);
        s.evict.placed(slot, r);
    }
}

impl RowStore for CachedRows {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn bf16_exact(&self) -> bool {
        self.bf16
    }
    fn in_memory(&self) -> bool {
        self.inner.in_memory()
    }
    fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        // Out of range is the inner store's error, before the index is probed.
        super::fp8::check_row(r, self.rows())?;
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
    ///
    /// Hits are found shard by shard, each shard locked once: every row's bucket is probed
    /// (buckets prefetched 8 rows ahead) and each hit's values prefetched, then
    /// the hits are copied out. A gather so waits on many cache misses at once, not on three
    /// in a row per row. Within a shard rows keep their order, so the eviction policy sees
    /// the same sequence as row-by-row reads.
    fn gather(&self, rows: &[usize], out: &mut [f32]) -> Result<()> {
        let d = self.dim();
        super::check_gather_len(rows.len(), d, out.len())?;
        if let Some(&r) = rows.iter().find(|&&r| r >= self.rows()) {
            super::fp8::check_row(r, self.rows())?;
        }
        let n = self.shards.len();
        // Positions of `rows` grouped by shard (a stable counting sort).
        let mut start = vec![0usize; n + 1];
        for &r in rows {
            start[r % n + 1] += 1;
        }
        for k in 0..n {
            start[k + 1] += start[k];
        }
        let mut order = vec![0usize; rows.len()];
        let mut fill = start.clone();
        for (i, &r) in rows.iter().enumerate() {
            order[fill[r % n]] = i;
            fill[r % n] += 1;
        }
        const NONE: u32 = u32::MAX;
        let mut slots: Vec<u32> = Vec::new();
        let mut missed: Vec<usize> = Vec::new();
        let mut hits = 0u64;
        for (sh, shard) in self.shards.iter().enumerate() {
            let group = &order[start[sh]..start[sh + 1]];
            if group.is_empty() {
                continue;
            }
            let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let s = &mut *guard;
            slots.clear();
            for (k, &i) in group.iter().enumerate() {
                if let Some(&j) = group.get(k + PROBE_AHEAD) {
                    s.map.prefetch(rows[j]);
                }
                let slot = s.map.get(rows[i]);
                if let Some(slot) = slot {
                    s.arena.prefetch(slot as usize, d);
                }
                slots.push(slot.unwrap_or(NONE));
            }
            for (&i, &slot) in group.iter().zip(&slots) {
                if slot == NONE {
                    missed.push(i);
                } else {
                    s.evict.touch(slot as usize);
                    s.arena.load(slot as usize, d, &mut out[i * d..(i + 1) * d]);
                    hits += 1;
                }
            }
        }
        // The misses in the batch's order: a row's first miss is the one read.
        missed.sort_unstable();
        let mut miss_rows = Vec::new();
        let mut miss_at = Vec::new();
        let mut first: HashMap<usize, usize> = HashMap::new();
        let mut repeats = Vec::new();
        for &i in &missed {
            let r = rows[i];
            if let Some(&k) = first.get(&r) {
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
            s.map.clear(); // keeps its buckets: sized for the shard's rows
            s.rows.clear();
            s.arena.clear();
            s.evict.reset(); // keeps its room, as the map
        }
        self.inner.clear();
    }
    fn stats(&self) -> StoreStats {
        let inner = self.inner.stats();
        StoreStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..inner
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose row `r` is `[r, r, …]` (exact in bf16 for small r).
    #[derive(Debug)]
    struct Ids(usize);
    impl RowStore for Ids {
        fn rows(&self) -> usize {
            1 << 20
        }
        fn dim(&self) -> usize {
            self.0
        }
        fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
            out.fill(r as f32);
            Ok(())
        }
    }

    /// Every policy returns the right rows under churn and stays within its budget.
    #[test]
    fn every_policy_serves_the_right_rows_within_budget() {
        for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
            // 64 shards of 10 rows.
            let budget = 640 * (8 * 4 + SLOT_OVERHEAD);
            let c = CachedRows::with_policy(Arc::new(Ids(8)), budget, policy).unwrap();
            assert_eq!((c.shards.len(), c.per_shard), (64, 10), "{policy:?}");
            let mut x = 7u64;
            let mut out = [0f32; 8];
            for _ in 0..5000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Skewed: a few hot rows, a long cold tail.
                let r = if x >> 62 == 0 {
                    (x >> 33) as usize % 100_000
                } else {
                    (x >> 33) as usize % 256
                };
                c.row_into(r, &mut out).unwrap();
                assert!(out.iter().all(|&v| v == r as f32), "{policy:?} row {r}");
                assert!(c.held_bytes() <= budget, "{policy:?}");
            }
            let s = c.stats();
            assert_eq!(s.hits + s.misses, 5000);
            assert!(s.hits > 2500, "{policy:?}: hot rows must stay: {s:?}");
        }
    }

    /// The open-addressing index against `std`'s map under random inserts and removals, in a
    /// table small enough that probe runs wrap around its end.
    #[test]
    fn row_index_agrees_with_a_hash_map() {
        let mut ix = RowIndex::new(12).unwrap(); // 32 buckets
        assert_eq!(ix.entries.len(), 32);
        let mut model: HashMap<usize, u32> = HashMap::new();
        let mut x = 99u64;
        for step in 0..20_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Rows of one shard (≡ 5 mod 64), from a small range so that they collide.
            let r = 5 + 64 * ((x >> 40) as usize % 40);
            if model.contains_key(&r) {
                if x & 1 == 0 {
                    ix.remove(r);
                    model.remove(&r);
                }
            } else if model.len() < 16 {
                ix.insert(r, step);
                model.insert(r, step);
            }
            for k in 0..40 {
                let q = 5 + 64 * k;
                assert_eq!(ix.get(q), model.get(&q).copied(), "step {step}, row {q}");
            }
        }
        ix.clear();
        assert!((0..40).all(|k| ix.get(5 + 64 * k).is_none()));
    }

    /// The plain gather: rows looked up one after another in the batch's order, the misses
    /// read together and inserted in order (what [`CachedRows::gather`] must equal).
    fn plain_gather(c: &CachedRows, rows: &[usize], out: &mut [f32]) {
        let d = c.dim();
        let mut miss: Vec<(usize, usize)> = Vec::new();
        let mut hits = 0;
        for (i, &r) in rows.iter().enumerate() {
            if c.lookup(r, &mut out[i * d..(i + 1) * d]) {
                hits += 1;
            } else if miss.iter().any(|&(_, m)| m == r) {
                hits += 1;
                c.inner.row_into(r, &mut out[i * d..(i + 1) * d]).unwrap();
            } else {
                miss.push((i, r));
            }
        }
        c.hits.fetch_add(hits, Ordering::Relaxed);
        c.misses.fetch_add(miss.len() as u64, Ordering::Relaxed);
        let mut row = vec![0f32; d];
        for &(i, r) in &miss {
            c.inner.row_into(r, &mut row).unwrap();
            out[i * d..(i + 1) * d].copy_from_slice(&row);
            c.insert(r, &row);
        }
    }

    /// The gather (shard by shard, buckets and rows prefetched) against the plain one: the
    /// same rows, hits and misses batch after batch, under every policy, with repeats within
    /// a batch and evictions between batches.
    #[test]
    fn a_gather_equals_the_plain_gather() {
        for policy in [CachePolicy::S3Fifo, CachePolicy::Clock, CachePolicy::Lru] {
            let budget = 64 * 6 * (4 * 4 + SLOT_OVERHEAD);
            let a = CachedRows::with_policy(Arc::new(Ids(4)), budget, policy).unwrap();
            let b = CachedRows::with_policy(Arc::new(Ids(4)), budget, policy).unwrap();
            let mut x = 3u64;
            for round in 0..300 {
                let rows: Vec<usize> = (0..97)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        // Skewed: hot rows below 64, a tail to 2,000.
                        let v = (x >> 33) as usize;
                        if v.is_multiple_of(3) {
                            v % 2000
                        } else {
                            v % 64
                        }
                    })
                    .collect();
                let mut got = vec![f32::NAN; rows.len() * 4];
                let mut want = vec![f32::NAN; rows.len() * 4];
                a.gather(&rows, &mut got).unwrap();
                plain_gather(&b, &rows, &mut want);
                assert_eq!(got, want, "{policy:?} round {round}");
                for (r, o) in rows.iter().zip(got.chunks_exact(4)) {
                    assert!(
                        o.iter().all(|&v| v == *r as f32),
                        "{policy:?} round {round}"
                    );
                }
                let (sa, sb) = (a.stats(), b.stats());
                assert_eq!(
                    (sa.hits, sa.misses),
                    (sb.hits, sb.misses),
                    "{policy:?} round {round}"
                );
            }
            let s = a.stats();
            assert!(s.hits > 10_000 && s.misses > 1_000, "{policy:?}: {s:?}");
            assert!(a.held_bytes() <= budget);
        }
    }

    /// A row id past the table (up to `usize::MAX`, which the index could not key) is an
    /// error from both reads, never a cached row.
    #[test]
    fn rows_out_of_range_are_errors() {
        let c = CachedRows::new(Arc::new(Ids(2)), 1 << 20).unwrap();
        let mut o = [0f32; 4];
        c.gather(&[0, 1], &mut o).unwrap();
        for r in [1 << 20, usize::MAX] {
            assert!(c.row_into(r, &mut o[..2]).is_err(), "{r}");
            assert!(c.gather(&[0, r], &mut o).is_err(), "{r}");
        }
    }

    /// LRU evicts exactly the least recently used row.
    #[test]
    fn lru_evicts_the_least_recent() {
        // 128 rows in 64 shards of 2 slots; rows ≡ 0 mod 64 share shard 0.
        let c = CachedRows::with_policy(
            Arc::new(Ids(1)),
            128 * (4 + SLOT_OVERHEAD),
            CachePolicy::Lru,
        )
        .unwrap();
        assert_eq!((c.shards.len(), c.per_shard), (64, 2));
        let mut o = [0f32];
        for r in [0, 64, 0, 128] {
            c.row_into(r, &mut o).unwrap(); // 128 evicts 64, the least recent
        }
        let before = c.stats();
        c.row_into(0, &mut o).unwrap();
        c.row_into(128, &mut o).unwrap();
        assert_eq!(c.stats().since(&before).hits, 2);
        c.row_into(64, &mut o).unwrap();
        assert_eq!(c.stats().since(&before).misses, 1);
    }

    /// S3-FIFO: a one-off scan does not flush rows read twice.
    #[test]
    fn s3fifo_resists_a_scan() {
        // 64 shards of 20 rows; rows ≡ 0 mod 64 all fall in shard 0.
        let budget = 64 * 20 * (4 + SLOT_OVERHEAD);
        let c = CachedRows::with_policy(Arc::new(Ids(1)), budget, CachePolicy::S3Fifo).unwrap();
        let mut o = [0f32];
        let (n, per) = (c.shards.len(), c.per_shard);
        assert_eq!((n, per), (64, 20));
        let hot: Vec<usize> = (0..per / 2).map(|k| k * n).collect();
        for _ in 0..3 {
            for &r in &hot {
                c.row_into(r, &mut o).unwrap();
            }
        }
        let before = c.stats();
        for k in 1000..1000 + 10 * per {
            c.row_into(k * n, &mut o).unwrap();
        }
        for &r in &hot {
            c.row_into(r, &mut o).unwrap();
        }
        let after = c.stats().since(&before);
        assert_eq!(after.hits as usize, hot.len(), "hot rows survive the scan");
        // LRU, by contrast, loses them all to the same scan.
        let l = CachedRows::with_policy(Arc::new(Ids(1)), budget, CachePolicy::Lru).unwrap();
        for _ in 0..3 {
            for &r in &hot {
                l.row_into(r, &mut o).unwrap();
            }
        }
        for k in 1000..1000 + 10 * per {
            l.row_into(k * n, &mut o).unwrap();
        }
        let before = l.stats();
        for &r in &hot {
            l.row_into(r, &mut o).unwrap();
        }
        assert_eq!(l.stats().since(&before).hits, 0);
    }
}
