//! The fused CPU path: the layer streamed tile by tile over the sequence, on every core.
//!
//! Per tile of rows (tokens of one or several sequences; 64 rows on our own microkernels,
//! 256 on the AVX2 ones, [`TILE`] on the `gemm` crate path, `ENGRAM_TILE` overrides the
//! former):
//! 1. hash and gather the rows into `x` `[T, Dm]`;
//! 2. one GEMM `y = x · W_allᵀ` with `W_all` = [value_proj; key_projs.0; …] packed once at
//!    load ([`proj::Projection`]);
//! 3. [`kernels::gate_token`] per row: biases, both RMSNorms, gate and the conv's RMSNorm;
//! 4. [`kernels::conv_row`] per row: g·value + SiLU(dilated causal depthwise conv), reading
//!    earlier rows from the tile or from the sequence's history ring; each output row is
//!    written once, here.
//!
//! Rows are split into contiguous ranges: one per thread for calls of fewer than 256 ·
//! threads² rows (decode steps) and for tables in a store that reads files; for a longer
//! prefill over a table in memory, more ranges than threads, shrinking towards the end
//! and taken in order by whichever thread is free (`guided_cuts`), so that a core slowed
//! by another tenant does not leave the others idle. A range that starts inside a
//! sequence does not know the (kernel_size-1)·N normalised rows before it; its first rows
//! keep their own normalised rows, and once every range is done their conv is summed with
//! the neighbour's last rows (`Driver::fix_boundaries`), in the order of a range without a
//! boundary, so any split gives the same bits. Memory beyond inputs and outputs is
//! O(threads · TILE), plus R rows twice per range until the fix-up.

mod fanout;
pub mod kernels;
pub mod profile;
pub mod proj;

use crate::alloc::LineAligned;
use crate::error::{EngramError, Result};
use crate::model::DemoModel;
use crate::state::EngramState;
use kernels::{GateParams, Isa};
use profile::Stage;
use proj::Projection;
use std::time::Instant;

/// Rows per tile on the f32 path: the `gemm` crate packs the weights on every call, so
/// tiles are large enough to amortise that.
pub const TILE: usize = 256;

/// Largest `ENGRAM_TILE` [`check_env`] accepts: a tile's scratch grows with its rows, and
/// the tiles ever measured here (32 to 512 rows; see `bench/results/LOG.md`) are far below.
pub const MAX_TILE_ENV: usize = 1 << 16;

/// The values `ENGRAM_ISA` takes on this target, as [`check_env`] names them: on aarch64
/// `neon` and `generic` both mean the NEON build, the only one there.
#[cfg(target_arch = "x86_64")]
const ISA_ENV: (&[&str], &str) = (&["avx512", "avx2", "generic"], "avx512, avx2 or generic");
#[cfg(target_arch = "aarch64")]
const ISA_ENV: (&[&str], &str) = (&["neon", "generic"], "neon or generic");
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ISA_ENV: (&[&str], &str) = (&["generic"], "generic");

/// Checks the environment variables that tune the fused path: `ENGRAM_ISA` (on x86-64
/// `avx512`, `avx2` or `generic`; on aarch64 `neon` or `generic`), `ENGRAM_TILE` (rows per
/// tile, 1 to [`MAX_TILE_ENV`]) and `ENGRAM_BF16_DOT` (`0` or `1`, and `amx` where
/// [`proj::amx_ready`]; AMX is asked for only when the value is neither `0` nor `1`).
/// `ENGRAM_ISA` is read once per process, `ENGRAM_TILE` at every call and `ENGRAM_BF16_DOT`
/// at every bf16 pack (its probe once); on a value they do not know the kernels run
/// their defaults (for `ENGRAM_BF16_DOT`, those of a set variable: the probe, not AMX).
/// The fronts (CLI, Python) call this first, so that a mistyped value is an error naming
/// the variable rather than a silent default. Unset variables are fine.
///
/// ```
/// std::env::set_var("ENGRAM_TILE", "sixty-four");
/// let err = engram::fused::check_env().unwrap_err().to_string();
/// assert!(err.starts_with("environment variable ENGRAM_TILE"), "{err}");
/// std::env::remove_var("ENGRAM_TILE");
/// assert!(engram::fused::check_env().is_ok());
/// ```
pub fn check_env() -> Result<()> {
    let (isas, isa_names) = ISA_ENV;
    env_value("ENGRAM_ISA", isa_names, |v| isas.contains(&v))?;
    let tile = format!("a whole number of rows from 1 to {MAX_TILE_ENV}");
    env_value("ENGRAM_TILE", &tile, |v| tile_env(v).is_some())?;
    // AMX is asked for (a permission for the process) only when the value may name it.
    let dot = std::env::var("ENGRAM_BF16_DOT");
    let amx = dot.as_deref().is_ok_and(|v| v != "0" && v != "1") && proj::amx_ready();
    let expected = if amx {
        "0, 1 or amx"
    } else {
        "0 or 1 (amx needs AMX-BF16 and the OS's permission for the tile state)"
    };
    env_value("ENGRAM_BF16_DOT", expected, |v| {
        matches!(v, "0" | "1") || (amx && v == "amx")
    })
}

/// An `ENGRAM_TILE` value's rows, if it is one [`check_env`] accepts.
fn tile_env(v: &str) -> Option<usize> {
    v.parse()
        .ok()
        .filter(|rows| (1..=MAX_TILE_ENV).contains(rows))
}

/// Environment variable `name`, if set, passes `ok`; else an [`EngramError::Invalid`]
/// naming it, `expected` and the value found.
fn env_value(name: &str, expected: &str, ok: impl Fn(&str) -> bool) -> Result<()> {
    let found = match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => return Ok(()),
        Ok(v) if ok(&v) => return Ok(()),
        Ok(v) => format!("{v:?}"),
        Err(std::env::VarError::NotUnicode(v)) => format!("{v:?} (not UTF-8)"),
    };
    Err(EngramError::invalid(
        format!("environment variable {name}"),
        expected,
        found,
    ))
}

/// Rows per tile with weights packed once (our kernels): the kernel's default
/// ([`Projection::default_tile_rows`]: 64, a tile small enough that its projections stay
/// in L2 for the gate kernel on a 1 MiB L2; 256 for the AVX2 kernels) or `ENGRAM_TILE`.
fn tile_rows(fw: &FusedWeights) -> usize {
    if fw.proj.uses_own_kernel() {
        std::env::var("ENGRAM_TILE")
            .ok()
            .and_then(|v| tile_env(&v))
            .unwrap_or_else(|| fw.proj.default_tile_rows())
    } else {
        TILE
    }
}
/// Tokens ahead whose table rows are prefetched during the gather.
const PREFETCH_AHEAD: usize = 4;
/// Rows of the ring of normalised rows (the conv's inputs) a thread keeps: the rows of a
/// group of [`Driver::conv_segment`] (3·N with the default taps) and the R rows before
/// them, which its taps read. A ring this small stays in L2, where rows for a whole tile
/// (1 MiB for the demo layer) were written back to memory and fetched again for the next
/// tile's writes.
fn normed_slots(cfg: &crate::config::EngramConfig) -> usize {
    conv_group(cfg) + cfg.conv_history()
}

/// Rows per group of [`Driver::conv_segment`]: 3·N (N trios) with the default taps, else 1.
fn conv_group(cfg: &crate::config::EngramConfig) -> usize {
    if cfg.kernel_size == kernels::TRIO_TAPS {
        3 * cfg.max_ngram_size
    } else {
        1
    }
}

/// Fewest rows worth a thread of their own. A range streams every weight once for its
/// rows, and its hash, gather, gate and conv run on one thread: one range of a decode step
/// leaves those to the calling thread while the other threads wait (at B = 32 they were a
/// quarter of the step). Ranges of 4 rows keep the projection's FMAs ahead of the weight
/// stream; ranges of 2 do not (B = 4 on AVX-512, Zen 4: 0.135 ms as one range, 0.19-0.21
/// as two). Pairs of processes on two threads, one range against two, ms per step (see
/// `bench/results/cpu-2026-12-02-emr4/experiments.txt`): on Zen 4, B = 32 AVX-512 f32
/// 1.92-1.95 → 1.71-1.72, bf16 1.10-1.14 → 0.92-1.01, AVX2 f32 2.28-2.52 → 1.91-1.97;
/// B = 8 AVX-512 bf16 0.265-0.269 → 0.240-0.268, AVX2 bf16 0.551-0.580 → 0.483-0.532, AVX2
/// f32 even; on Emerald Rapids (medians of three) B = 32 AVX-512 f32 2.39 → 2.05, bf16
/// (`vdpbf16ps`) 2.93 → 2.70, B = 8 f32 even, AVX2 within the other tenant's noise.
/// (A B = 64 step ran as one range before this was 32: 36,370 tokens/s in bf16 on
/// AVX-512, two ranges 54,392.)
const MIN_ROWS_PER_PART: usize = 4;
/// Fewest rows between two splits when the later one falls inside a sequence: its first R
/// rows are completed serially after the ranges run (`Driver::fix_boundaries`).
const MIN_ROWS_PER_SPLIT: usize = 64;
/// From `GUIDED_ROWS · threads²` rows on (1,024 on 2 threads, 16,384 on 8), the rows are
/// cut into ranges that shrink towards the end ([`guided_cuts`]), taken in order by
/// whichever thread is free; fewer rows keep one range per thread. The ranges number
/// about 2·threads·(1 + ln(rows / (128·threads))), and each range after the first
/// completes R rows in the serial fix-up, so that work grows as threads² against a
/// prefill's time per thread: at this bound, an estimated 1% of it (the demo layer, R =
/// 9). Not for tables in a store that reads files: their tiles are gathered ahead only
/// within a range.
const GUIDED_ROWS: usize = 256;

/// The cut points of a guided schedule over `total` rows: each range takes `1 / (2 ·
/// threads)` of the rows still left, in whole tiles (of at least `MIN_ROWS_PER_SPLIT` rows)
/// while that is at least a tile, else in whole multiples of `MIN_ROWS_PER_SPLIT` (at
/// least one). Handed out in order, the first ranges keep every thread busy and the last
/// ones, the smallest, even out the threads' finishing times: with one range per thread,
/// a core slowed by another tenant left the other idle for up to 16% of a prefill's
/// thread time (Emerald Rapids, 2026-12-03).
fn guided_cuts(total: usize, threads: usize, tile: usize) -> Vec<usize> {
    let unit = MIN_ROWS_PER_SPLIT;
    let tile = tile.max(unit);
    let mut cuts = Vec::new();
    let mut at = 0;
    loop {
        let left = total - at;
        let share = left / (2 * threads.max(1));
        let size = if share >= tile {
            share / tile * tile
        } else {
            (share / unit * unit).max(unit)
        };
        if size >= left || left - size < unit {
            return cuts;
        }
        at += size;
        cuts.push(at);
    }
}

/// Weights of the fused path, packed once from [`crate::EngramWeights`].
#[derive(Debug, Clone)]
pub struct FusedWeights {
    proj: Projection,
    /// A bf16 copy of the table when the path runs in bf16 from an f32 table.
    table: Option<crate::weights::EmbeddingTable>,
    /// Round gathered rows to bf16 (a bf16 run over a row store).
    round_rows: bool,
    value_bias: Vec<f32>,
    key_bias: Vec<Vec<f32>>,
    norm12: Vec<Vec<f32>>,
    conv_norm: Vec<Vec<f32>>,
    /// `short_conv.conv.weight` as `[taps][HC·D]`.
    conv_w: Vec<f32>,
}

pub use crate::dtype::DType;

impl FusedWeights {
    /// The packed projection (for reports: kernel, weight bytes).
    pub fn projection(&self) -> &Projection {
        &self.proj
    }

    /// Packs the weights of a layer.
    pub fn pack(e: &DemoModel, dtype: DType) -> Result<Self> {
        let cfg = e.config();
        let w = e.weights();
        let (d, hc, taps) = (cfg.hidden_size, cfg.hc_mult, cfg.kernel_size);
        let mut mats: Vec<&[f32]> = vec![&w.value_proj_weight];
        mats.extend(w.key_projs_weight.iter().map(|m| m.as_slice()));
        // [value | keys]: the keys' panels run first and the value's last, so that the
        // value columns of y, which the gate and the conv both read, are the freshest in L2.
        let proj = Projection::pack(&mats, cfg.memory_width(), dtype).run_from_col(d);
        let c = hc * d;
        let mut conv_w = vec![0.0; taps * c];
        for ch in 0..c {
            for k in 0..taps {
                conv_w[k * c + ch] = w.conv_weight[ch * taps + k];
            }
        }
        // A bf16 run reads bf16 rows: a copy of an f32 table, or, for rows from a store
        // (read on demand, never copied whole), each gathered row rounded on the way in.
        let round_rows = dtype == DType::Bf16 && w.table.is_store();
        let table = if dtype == DType::Bf16 && w.table.dtype_name() != "bf16" && !round_rows {
            Some(w.table.to_bf16()?)
        } else {
            None
        };
        Ok(FusedWeights {
            round_rows,
            proj,
            table,
            value_bias: w.value_proj_bias.clone(),
            key_bias: w.key_projs_bias.clone(),
            norm12: (0..hc)
                .map(|i| {
                    w.norm1[i]
                        .iter()
                        .zip(&w.norm2[i])
                        .map(|(a, b)| a * b)
                        .collect()
                })
                .collect(),
            conv_norm: w.conv_norms.clone(),
            conv_w,
        })
    }

    /// The storage type of the projection.
    pub fn dtype(&self) -> DType {
        self.proj.dtype()
    }

    /// Whether each row's projection is summed in the same order whatever the tile's row
    /// count (our microkernels: one FMA chain over k). Then any split of a sequence into
    /// chunks gives bit-identical projections. The `gemm` crate (x86-64 without AVX2)
    /// picks its blocking by size, so there chunked and one-shot results differ by rounding
    /// (a few 1e-6 at most in our tests).
    pub fn split_invariant(&self) -> bool {
        self.proj.uses_own_kernel()
    }
}

/// One sequence of a fused call: its canonical ids with history, hidden states, state.
pub(crate) struct SeqInput<'a> {
    /// `state.ngram_history ++ canonical ids` (N-1+T).
    pub ext: Vec<i64>,
    /// `[T, HC·D]`.
    pub hidden: &'a [f32],
}

/// The outputs of a fused call, rows of all sequences concatenated.
pub(crate) struct FusedOut<'a> {
    pub hash_ids: &'a mut [i64],
    pub gates: &'a mut [f32],
    pub out: &'a mut [f32],
    /// When given, receives gated_value `[T, HC·D]` (for inspection; the default path
    /// keeps no such intermediate).
    pub gated: Option<&'a mut [f32]>,
}

/// Per-thread tile buffers of the fused path, kept between calls so that a decode step
/// allocates nothing. Taken out of the thread's slot for the duration of a call (a nested
/// call on the same thread, e.g. through rayon's work stealing, gets fresh buffers).
#[derive(Default)]
struct Scratch {
    /// Gathered embeddings `[tile, Dm]`.
    x: LineAligned<f32>,
    /// Projections `[tile, (1+HC)·D]`.
    y: LineAligned<f32>,
    /// Conv inputs: a ring of [`normed_slots`] rows `[·, HC·D]`.
    normed: LineAligned<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    fn take() -> Scratch {
        SCRATCH.with(|c| c.take()).unwrap_or_default()
    }

    fn put_back(self) {
        SCRATCH.with(|c| c.set(Some(self)));
    }

    /// Grows each buffer to at least the given length (a buffer that grows starts afresh:
    /// every row used is written before it is read). Each starts on a cache line, and with
    /// rows a multiple of 16 floats long (the demo layer's) so does every row: no vector
    /// access to them straddles two lines.
    fn ensure(&mut self, x: usize, y: usize, normed: usize) {
        self.x.ensure(x, 0.0);
        self.y.ensure(y, 0.0);
        self.normed.ensure(normed, 0.0);
    }
}

/// A row range of one sequence handled by one thread.
#[derive(Debug, Clone, Copy)]
struct Piece {
    seq: usize,
    t0: usize,
    t1: usize,
    /// First row of the sequence in the concatenated rows.
    base: usize,
}

/// One segment's rows for [`Driver::conv_segment`]: a ring of normalised rows (written
/// there, row u in slot u mod its rows), projections `[len, (1+HC)·D]`, hidden states
/// `[len, HC·D]` and gates `[len, HC]` (written there).
struct Segment<'a> {
    normed: &'a mut [f32],
    proj: &'a [f32],
    hidden: &'a [f32],
    gates: &'a mut [f32],
}

/// Where a segment's rows find their conv taps' normalised rows: earlier rows of the
/// segment, or the piece's history ring (rows of a neighbour's range may be unknown).
struct History<'a> {
    /// The segment's ring of normalised rows (row u in slot u mod `slots`).
    seg: &'a [f32],
    slots: usize,
    ring: &'a [f32],
    /// The ring's oldest row.
    head: usize,
    /// Oldest ring rows that belong to the neighbour's range.
    unknown: usize,
    /// Dilation (max_ngram_size), ring rows R, row width C.
    n: usize,
    r: usize,
    c: usize,
}

impl<'a> History<'a> {
    /// Row u's taps' rows (tap k at u - (taps-1-k)·N) into `slots`, `None` for an unknown
    /// one; returns whether there was one.
    fn tap_rows(&self, u: usize, slots: &mut [Option<&'a [f32]>]) -> bool {
        let (taps, n, r, c) = (slots.len(), self.n, self.r, self.c);
        let mut partial = false;
        for (k, slot) in slots.iter_mut().enumerate() {
            let back = (taps - 1 - k) * n;
            *slot = if u >= back {
                let s = (u - back) % self.slots;
                Some(&self.seg[s * c..(s + 1) * c])
            } else {
                // Logical ring row (0 = oldest of R).
                let j = r + u - back;
                if j < self.unknown {
                    partial = true;
                    None
                } else {
                    let phys = (self.head + j) % r;
                    Some(&self.ring[phys * c..(phys + 1) * c])
                }
            };
        }
        partial
    }
}

/// Conv taps whose rows a row gathers on the stack (more taps allocate per row).
const INLINE_TAPS: usize = 8;

/// What a range's run gives back: its result and how to undo its state changes.
type Ran = (Result<PartResult>, Undo);

/// One range's share of a call: its pieces, hash ids, gates, outputs, optional gated
/// values, the states of the sequences that start in it and the index of the first.
type Job<'a, 's> = (
    Vec<Piece>,
    &'a mut [i64],
    &'a mut [f32],
    &'a mut [f32],
    Option<&'a mut [f32]>,
    &'s mut [EngramState],
    usize,
);

/// A row whose conv reaches into the previous range: done after every range, with the
/// neighbour's last rows (`Driver::fix_boundaries`).
struct Fixup {
    seq: usize,
    row: usize,
    t: usize,
    /// The row's own normalised row, `[C]`: a tap of the range's later fix-up rows.
    normed: Vec<f32>,
}

/// What a range hands to the driver after its rows are done.
struct PartResult {
    fixups: Vec<Fixup>,
    /// The last R normalised rows of each of the range's pieces whose state was not updated
    /// in place (a first piece that started in the range before) or that the next range
    /// needs (a last piece that continues there), in piece order: a range can hold both.
    tails: Vec<Tail>,
}

struct Tail {
    seq: usize,
    /// `[R, C]`, oldest first.
    rows: Vec<f32>,
    /// The piece ended its sequence.
    ends: bool,
}

/// Ring rows in logical order (oldest first).
fn ordered(data: &[f32], head: usize, r: usize, c: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(r * c);
    for j in 0..r {
        let phys = (head + j) % r;
        v.extend_from_slice(&data[phys * c..(phys + 1) * c]);
    }
    v
}

/// History rows of one piece: a ring of R rows, of which the oldest `unknown` are rows of
/// a neighbour's range that this thread does not have.
struct Ring<'s> {
    rows: RingRows<'s>,
    unknown: usize,
    /// Rows pushed into a state's ring in this call while fewer than R: the slots whose
    /// rows from before the call are in the range's [`Undo`].
    saved: usize,
}

/// What a range overwrote in the states' conv histories, so that a call that fails
/// (non-finite hidden states or table rows, a row store's error) can put every state back,
/// those of ranges that finished included. A state's ring rows are saved as the conv
/// pushes over them, just after it read them as taps: a copy from cache. (Saved before the
/// call, the rows came from memory: 0.12-0.14 ms of a 2.2 ms B = 64 bf16 decode step on
/// Zen 4, 0.53 of 10.1 ms at B = 256.)
#[derive(Default)]
struct Undo {
    /// (sequence, conv head before the call) of each state the range updates in place.
    heads: Vec<(usize, usize)>,
    /// (sequence, slot) of each saved row, in `rows` order.
    slots: Vec<(usize, usize)>,
    /// The saved rows, `[slots.len(), C]`.
    rows: Vec<f32>,
}

/// Undo buffers kept between calls (a decode step's are 0.5 MB per range at B = 64: fresh
/// allocations would fault their pages in each step).
static UNDO_POOL: std::sync::Mutex<Vec<Undo>> = std::sync::Mutex::new(Vec::new());

/// Undo buffers kept while at most this many floats (16 MiB).
const UNDO_KEEP_FLOATS: usize = 4 << 20;

impl Undo {
    fn take() -> Undo {
        let mut u = UNDO_POOL
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        u.heads.clear();
        u.slots.clear();
        u.rows.clear();
        u
    }

    fn put_back(self) {
        if self.rows.capacity() <= UNDO_KEEP_FLOATS {
            if let Ok(mut p) = UNDO_POOL.lock() {
                p.push(self);
            }
        }
    }

    /// Puts the saved rows and heads back into `states` (indexed by sequence).
    fn restore(&self, states: &mut [EngramState], c: usize) {
        for (&(seq, slot), row) in self.slots.iter().zip(self.rows.chunks_exact(c)) {
            states[seq].conv_ring[slot * c..(slot + 1) * c].copy_from_slice(row);
        }
        for &(seq, head) in &self.heads {
            states[seq].conv_head = head;
        }
    }
}

enum RingRows<'s> {
    State(&'s mut EngramState),
    Local { data: Vec<f32>, head: usize },
}

impl Ring<'_> {
    fn parts(&mut self) -> (&mut [f32], &mut usize) {
        match &mut self.rows {
            RingRows::State(s) => (&mut s.conv_ring, &mut s.conv_head),
            RingRows::Local { data, head } => (data, head),
        }
    }
}

pub(crate) struct Driver<'e> {
    e: &'e DemoModel,
    fw: &'e FusedWeights,
    isa: Isa,
    /// Check the hidden states for NaN and infinity in the gate (see `check_hidden`).
    check_hidden: bool,
}

impl<'e> Driver<'e> {
    pub fn new(e: &'e DemoModel, fw: &'e FusedWeights) -> Self {
        Driver {
            e,
            fw,
            isa: Isa::detect(),
            check_hidden: false,
        }
    }

    /// Makes the run check the hidden states where the gate reads them, instead of the
    /// caller scanning them first: a row whose query sums of squares are not finite is
    /// scanned, and its first NaN or infinity ends the run with the error the scan would
    /// have given (the first in row order: ranges are in row order and each stops at its
    /// first). The run puts the states back on an error ([`Undo`]).
    pub fn check_hidden(mut self, on: bool) -> Self {
        self.check_hidden = on;
        self
    }

    /// Runs all sequences; `states[s]` is read and updated. On an error each state's conv
    /// history is as it was (the caller updates the n-gram histories and positions after a
    /// run that succeeded).
    pub fn run(
        &self,
        seqs: &[SeqInput<'_>],
        states: &mut [EngramState],
        out: FusedOut<'_>,
    ) -> Result<()> {
        let cfg = self.e.config();
        let n1 = cfg.max_ngram_size - 1;
        let lens: Vec<usize> = seqs.iter().map(|s| s.ext.len() - n1).collect();
        let mut bases = Vec::with_capacity(lens.len());
        let mut total = 0;
        for &l in &lens {
            bases.push(total);
            total += l;
        }
        let threads = rayon::current_num_threads().max(1);
        // A store that reads files gathers a range's tiles ahead on a thread of its own,
        // which overlaps only within a range: such tables keep one range per thread.
        let table = self.fw.table.as_ref().unwrap_or(&self.e.weights().table);
        let guided = table.store().is_none_or(|s| s.in_memory());
        let parts = self.plan(&lens, &bases, total, threads, tile_rows(self.fw), guided);
        let inner_threads = (threads / parts.len().max(1)).max(1);
        // Split outputs and states by part.
        let (h, hc, c) = (cfg.num_heads(), cfg.hc_mult, cfg.hc_mult * cfg.hidden_size);
        let mut jobs = Vec::with_capacity(parts.len());
        let FusedOut {
            hash_ids,
            gates,
            out,
            gated,
        } = out;
        let (mut hash_rest, mut gate_rest, mut out_rest) = (&mut *hash_ids, &mut *gates, &mut *out);
        let mut gated_rest: Option<&mut [f32]> = gated;
        let mut state_rest: &mut [EngramState] = &mut *states;
        let mut state_first = 0;
        for p in &parts {
            let rows: usize = p.iter().map(|x| x.t1 - x.t0).sum();
            let (a, b) = std::mem::take(&mut hash_rest).split_at_mut(rows * h);
            hash_rest = b;
            let (g, b) = std::mem::take(&mut gate_rest).split_at_mut(rows * hc);
            gate_rest = b;
            let (o, b) = std::mem::take(&mut out_rest).split_at_mut(rows * c);
            out_rest = b;
            let gv = gated_rest.take().map(|g| {
                let (a, b) = g.split_at_mut(rows * c);
                gated_rest = Some(b);
                a
            });
            // States of the sequences that start in this part.
            let last_seq_starting = p.iter().filter(|x| x.t0 == 0).map(|x| x.seq + 1).max();
            let take = last_seq_starting.map_or(0, |l| l - state_first);
            let (s, b) = std::mem::take(&mut state_rest).split_at_mut(take);
            state_rest = b;
            jobs.push((p.clone(), a, g, o, gv, s, state_first));
            state_first += take;
        }
        let run = |(p, hs, gs, os, gv, st, sf): Job<'_, '_>| {
            let mut undo = Undo::take();
            let res = self.run_part(&p, seqs, hs, gs, os, gv, st, sf, inner_threads, &mut undo);
            (res, undo)
        };
        // One range (a decode step) runs on the calling thread; its projection still fans
        // out over the pool. More ranges are taken in order by whichever thread is free.
        let ran: Vec<Ran> = if jobs.len() == 1 {
            jobs.into_iter().map(run).collect()
        } else {
            use std::sync::Mutex;
            let units = jobs.len();
            let jobs: Vec<Mutex<Option<Job<'_, '_>>>> =
                jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
            let slots: Vec<Mutex<Option<Ran>>> = (0..units).map(|_| Mutex::new(None)).collect();
            fanout::for_each_unit_in_order(units, threads, &|u| {
                let job = jobs[u].lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(job) = job {
                    let r = run(job);
                    *slots[u].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
            slots
                .into_iter()
                .map(|s| {
                    s.into_inner()
                        .unwrap_or_else(|e| e.into_inner())
                        .expect("every range ran")
                })
                .collect()
        };
        let (results, undos): (Vec<_>, Vec<_>) = ran.into_iter().unzip();
        let results = results.into_iter().collect::<Result<Vec<PartResult>>>();
        if results.is_err() {
            // Every range's states as they were, those of ranges that finished included.
            for u in &undos {
                u.restore(states, c);
            }
        }
        for u in undos {
            u.put_back();
        }
        self.fix_boundaries(&parts, results?, states, out, c);
        Ok(())
    }

    /// Splits the rows into contiguous ranges, at most `threads` unless guided (below). A
    /// split inside a sequence keeps at least R rows on both sides and at least
    /// `MIN_ROWS_PER_SPLIT` (and R) from the previous split, so every range ends with R
    /// rows of its own (the next range's boundary rows are completed from them) and few
    /// rows need the serial fix-up; splits between sequences (decode steps of many
    /// sequences) need no fix-up and follow `MIN_ROWS_PER_PART`. With `guided`, calls of at
    /// least `GUIDED_ROWS · threads²` rows (a prefill) are cut by [`guided_cuts`] instead
    /// of evenly, into more ranges than threads.
    fn plan(
        &self,
        lens: &[usize],
        bases: &[usize],
        total: usize,
        threads: usize,
        tile: usize,
        guided: bool,
    ) -> Vec<Vec<Piece>> {
        let r = self.e.config().conv_history().max(1);
        let want = (total / MIN_ROWS_PER_PART).clamp(1, threads);
        let targets: Vec<usize> = if guided
            && threads > 1
            && total >= GUIDED_ROWS.saturating_mul(threads).saturating_mul(threads)
        {
            guided_cuts(total, threads, tile)
        } else {
            (1..want).map(|k| total * k / want).collect()
        };
        let mut cuts = vec![0usize];
        for target in targets {
            let s = bases.partition_point(|&b| b <= target) - 1;
            let t = target - bases[s];
            let (cut, inside) = if t < r {
                (bases[s], false)
            } else if lens[s] - t < r {
                (bases[s] + lens[s], false)
            } else {
                (target, true)
            };
            let last = *cuts.last().unwrap();
            let gap = if inside { MIN_ROWS_PER_SPLIT.max(r) } else { 1 };
            if cut >= last + gap && cut < total {
                cuts.push(cut);
            }
        }
        cuts.push(total);
        cuts.windows(2)
            .map(|w| {
                let (lo, hi) = (w[0], w[1]);
                let mut v = Vec::new();
                for (s, (&b, &l)) in bases.iter().zip(lens).enumerate() {
                    let (t0, t1) = (lo.max(b), hi.min(b + l));
                    if t0 < t1 {
                        v.push(Piece {
                            seq: s,
                            t0: t0 - b,
                            t1: t1 - b,
                            base: b,
                        });
                    }
                }
                v
            })
            .collect()
    }

    /// One token's rows of an f32 table in memory (`values`, rows of the head dim) into
    /// `dst` (`[Dm]`), each row copied and checked in one pass by the vector kernels
    /// ([`kernels::gather_finite`]); a row with an id past the table or a non-finite value
    /// is left to `DemoModel::gather_values`, whose error names it. (The plain copy, then a
    /// scalar check compiled for the baseline target, took 0.7-0.8 of the gather's 4.3-4.9
    /// thread-ms per 4096-token prefill of the demo layer on AVX-512.)
    fn gather_values(&self, values: &[f32], hu: &[i64], dst: &mut [f32]) -> Result<()> {
        let offsets = &self.e.weights().offsets;
        if kernels::gather_finite(self.isa, values, hu, offsets, dst) {
            Ok(())
        } else {
            self.e.gather_values(values, hu, dst)
        }
    }

    /// [`Driver::gather_values`] for the bf16 dot kernels: one token's rows of a bf16
    /// table (`bits`, and the same bits as u32 pairs where the table lies on a 4-byte
    /// boundary) into `dst` (`[Dm/2]` pairs), copied and checked in one pass by the vector
    /// kernels ([`kernels::gather_pairs_finite`]); errors, and a table off that boundary,
    /// go through `DemoModel::gather_pairs`. (Demo layer, 4096 tokens, AVX-512 bf16: the
    /// hash+gather stage took 4.0-4.1 thread-ms per prefill with the scalar check.)
    fn gather_pairs(
        &self,
        bits: &[u16],
        pairs: Option<&[u32]>,
        hu: &[i64],
        dst: &mut [u32],
    ) -> Result<()> {
        let offsets = &self.e.weights().offsets;
        match pairs {
            Some(p) if kernels::gather_pairs_finite(self.isa, p, hu, offsets, dst) => Ok(()),
            _ => self.e.gather_pairs(bits, hu, dst),
        }
    }

    /// One token's rows of a bf16 table in memory (`bits`) widened into `dst` (`[Dm]` f32)
    /// wherever the projection takes f32 x, widened and checked in one pass by the vector
    /// kernels ([`kernels::gather_widen_finite`]); a row with an id past the table or a
    /// non-finite value is left to `DemoModel::gather_from`, whose error names it
    /// (`EmbeddingTable::try_row_into`, then the scalar check). (AVX2 bf16, demo layer,
    /// 4096 tokens: hash+gather 6.9-7.4 → 4.0-4.3 thread-ms per prefill against that path.)
    fn gather_widened(
        &self,
        bits: &[u16],
        table: &crate::weights::EmbeddingTable,
        hu: &[i64],
        dst: &mut [f32],
    ) -> Result<()> {
        let offsets = &self.e.weights().offsets;
        if kernels::gather_widen_finite(self.isa, bits, hu, offsets, dst) {
            Ok(())
        } else {
            self.e.gather_from(table, hu, dst)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_part(
        &self,
        pieces: &[Piece],
        seqs: &[SeqInput<'_>],
        hash_out: &mut [i64],
        gate_out: &mut [f32],
        out: &mut [f32],
        mut gated_out: Option<&mut [f32]>,
        states: &mut [EngramState],
        state_first: usize,
        inner_threads: usize,
        undo: &mut Undo,
    ) -> Result<PartResult> {
        let cfg = self.e.config();
        let (n, h, dm, hc, d) = (
            cfg.max_ngram_size,
            cfg.num_heads(),
            cfg.memory_width(),
            cfg.hc_mult,
            cfg.hidden_size,
        );
        let c = hc * d;
        let np = self.fw.proj.n();
        let r = cfg.conv_history();
        let table = self.fw.table.as_ref().unwrap_or(&self.e.weights().table);
        let total_rows: usize = pieces.iter().map(|p| p.t1 - p.t0).sum();
        // Scratch sized by the rows of this call (a decode step's tile holds its few rows),
        // reused across calls on this thread and never zeroed: every row used is written
        // first (gather, GEMM, gate).
        let tile = tile_rows(self.fw).min(total_rows).max(1);
        let mut scratch = Scratch::take();
        scratch.ensure(tile * dm, tile * np, normed_slots(cfg).min(tile) * c);
        let (x, y, normed) = (
            scratch.x.as_mut_slice(),
            scratch.y.as_mut_slice(),
            scratch.normed.as_mut_slice(),
        );
        let mut hist = vec![0i64; n];
        let mut fixups = Vec::new();
        let mut tails = Vec::new();
        // The ring of the piece being convolved, created when its first rows are reached.
        let mut ring: Option<(usize, Ring<'_>)> = None;
        let mut states_left: &mut [EngramState] = states;
        let mut states_base = state_first;
        // 1. hashes of every row of the part first: a row store can then read later tiles'
        // rows while earlier tiles compute.
        let clock = Instant::now();
        let mut lr = 0;
        for p in pieces {
            let seq = &seqs[p.seq];
            for tt in p.t0..p.t1 {
                for (k, hk) in hist.iter_mut().enumerate() {
                    *hk = seq.ext[tt + n - 1 - k];
                }
                self.e.hashing().hash_position(
                    self.e.layer_params(),
                    &hist,
                    &mut hash_out[lr * h..(lr + 1) * h],
                );
                lr += 1;
            }
        }
        profile::add(Stage::HashGather, clock);
        let hashes_all: &[i64] = hash_out;
        // Tiles of a store that reads files are gathered ahead on a thread of their own when
        // there is more than one tile (a decode step's single tile is gathered in place).
        let pipelined = total_rows > tile && table.store().is_some_and(|s| !s.in_memory());
        // With the bf16 dot kernels and a bf16 table in memory, rows are gathered as they
        // lie, straight into the kernels' pairs (x holds `[tile][Dm/2]` u32 then): no
        // widening to f32 and rounding back.
        let kp = dm / 2;
        let bf16_bits = if table.is_store() {
            None
        } else {
            table.bf16_bits()
        };
        let pairs_from = if self.fw.proj.takes_pairs() && cfg.head_dim().is_multiple_of(2) {
            bf16_bits
        } else {
            None
        };
        // The same bits two values to a u32 (a table on a 4-byte boundary).
        let pairs_u32: Option<&[u32]> = pairs_from.and_then(|b| bytemuck::try_cast_slice(b).ok());
        // Otherwise rows of an f32 table in memory are copied in place.
        let values_from = if table.is_store() {
            None
        } else {
            table.f32_values()
        };
        let (mut pi, mut t) = (0usize, pieces.first().map_or(0, |p| p.t0));
        let mut done = 0;
        let res = std::thread::scope(|sc| -> Result<PartResult> {
            let feed = pipelined.then(|| {
                let (e, round) = (self.e, self.fw.round_rows);
                crate::rows::ahead::Feed::spawn(sc, total_rows, tile, dm, move |r0, r1, out| {
                    e.gather_tile(table, &hashes_all[r0 * h..r1 * h], out, round)
                })
            });
            while done < total_rows {
                // Rows of this tile as segments (piece, t0, t1, first tile row): consecutive
                // pieces share one tile, so that many short sequences (decode) make one GEMM.
                let mut segs: Vec<(usize, usize, usize, usize)> = Vec::new();
                let mut rows = 0;
                while rows < tile && pi < pieces.len() {
                    let p = &pieces[pi];
                    let take = (p.t1 - t).min(tile - rows);
                    segs.push((pi, t, t + take, rows));
                    rows += take;
                    t += take;
                    if t == p.t1 {
                        pi += 1;
                        t = pieces.get(pi).map_or(0, |q| q.t0);
                    }
                }
                let lr0 = done; // part-local row of the tile's first row
                let hashes = &hashes_all[lr0 * h..(lr0 + rows) * h];
                // 2. the tile's rows: from the gathering thread, gathered in place from a store
                // (its reads issued together), or from memory with rows a few tokens ahead
                // prefetched so that the table's cache misses overlap instead of queueing.
                let clock = Instant::now();
                let fed = match &feed {
                    Some(f) => {
                        let buf = f.next()?;
                        profile::add(Stage::IoWait, clock);
                        Some(buf)
                    }
                    None if table.is_store() => {
                        self.e.gather_tile(
                            table,
                            hashes,
                            &mut x[..rows * dm],
                            self.fw.round_rows,
                        )?;
                        profile::add(Stage::IoWait, clock);
                        None
                    }
                    None => {
                        for u in 0..rows.min(PREFETCH_AHEAD) {
                            self.e.prefetch_rows(table, &hashes[u * h..(u + 1) * h]);
                        }
                        for u in 0..rows {
                            if u + PREFETCH_AHEAD < rows {
                                let v = u + PREFETCH_AHEAD;
                                self.e.prefetch_rows(table, &hashes[v * h..(v + 1) * h]);
                            }
                            let hu = &hashes[u * h..(u + 1) * h];
                            let xu = u * dm..(u + 1) * dm;
                            match (pairs_from, values_from) {
                                (Some(bits), _) => {
                                    let xp: &mut [u32] = bytemuck::cast_slice_mut(&mut x[..]);
                                    let dst = &mut xp[u * kp..(u + 1) * kp];
                                    self.gather_pairs(bits, pairs_u32, hu, dst)?
                                }
                                (None, Some(v)) => self.gather_values(v, hu, &mut x[xu])?,
                                (None, None) => match bf16_bits {
                                    Some(bits) => {
                                        self.gather_widened(bits, table, hu, &mut x[xu])?
                                    }
                                    None => self.e.gather_from(table, hu, &mut x[xu])?,
                                },
                            }
                        }
                        profile::add(Stage::HashGather, clock);
                        None
                    }
                };
                // 3. projections: one GEMM for the whole tile.
                let clock = Instant::now();
                match (&fed, pairs_from) {
                    (None, Some(_)) => {
                        let xp: &[u32] = bytemuck::cast_slice(&x[..]);
                        self.fw.proj.matmul_pairs(
                            &xp[..rows * kp],
                            rows,
                            &mut y[..rows * np],
                            inner_threads,
                        )
                    }
                    _ => {
                        let xs: &[f32] = fed.as_deref().unwrap_or(&x[..]);
                        self.fw.proj.matmul(
                            &xs[..rows * dm],
                            rows,
                            &mut y[..rows * np],
                            inner_threads,
                        )
                    }
                }
                profile::add(Stage::Projection, clock);
                if let (Some(f), Some(buf)) = (&feed, fed) {
                    f.give_back(buf);
                }
                // 4-5. per row: the gate and the conv's RMSNorm, then gated value + SiLU(conv)
                // into `out`, earlier rows coming from the tile or from the piece's history
                // ring (a row's normalised neighbours are still in cache). The gate's time is
                // counted per row; the rest of this loop (conv, rings) is the conv's.
                let clock = Instant::now();
                let mut gate_ns = 0u64;
                for &(si, a, b, u0) in &segs {
                    let p = pieces[si];
                    if ring.as_ref().is_none_or(|(rp, _)| *rp != si) {
                        if let Some((rp, old)) = ring.take() {
                            if let Some(tl) = self.finish_piece(&pieces[rp], old, seqs, r, c) {
                                tails.push(tl);
                            }
                        }
                        let rg = if p.t0 == 0 {
                            // States of the sequences starting in this part, in order.
                            let skip = p.seq - states_base;
                            let (_, rest) = std::mem::take(&mut states_left).split_at_mut(skip);
                            let (st, rest) = rest.split_first_mut().expect("a state per sequence");
                            states_left = rest;
                            states_base = p.seq + 1;
                            undo.heads.push((p.seq, st.conv_head));
                            Ring {
                                rows: RingRows::State(st),
                                unknown: 0,
                                saved: 0,
                            }
                        } else {
                            Ring {
                                rows: RingRows::Local {
                                    data: vec![0.0; r * c],
                                    head: 0,
                                },
                                unknown: r,
                                saved: 0,
                            }
                        };
                        ring = Some((si, rg));
                    }
                    let rg = &mut ring.as_mut().unwrap().1;
                    let len = b - a;
                    let seq = &seqs[p.seq];
                    gate_ns += self.conv_segment(
                        rg,
                        Segment {
                            normed: &mut normed[..normed_slots(cfg).min(tile) * c],
                            proj: &y[u0 * np..(u0 + len) * np],
                            hidden: &seq.hidden[a * c..b * c],
                            gates: &mut gate_out[(lr0 + u0) * hc..(lr0 + u0 + len) * hc],
                        },
                        a,
                        p,
                        lr0 + u0,
                        out,
                        &mut fixups,
                        undo,
                    )?;
                }
                let all_ns = clock.elapsed().as_nanos() as u64;
                profile::add_nanos(Stage::Gate, gate_ns);
                profile::add_nanos(Stage::Conv, all_ns.saturating_sub(gate_ns));
                if let Some(g) = gated_out.as_deref_mut() {
                    let clock = Instant::now();
                    for u in 0..rows {
                        let lr = lr0 + u;
                        let gv = kernels::GatedValue {
                            value: &y[u * np..u * np + d],
                            bias: &self.fw.value_bias,
                            gates: &gate_out[lr * hc..(lr + 1) * hc],
                        };
                        kernels::gated_row(self.isa, &gv, &mut g[lr * c..(lr + 1) * c]);
                    }
                    profile::add(Stage::Gate, clock);
                }
                done += rows;
            }
            if let Some((rp, old)) = ring.take() {
                if let Some(tl) = self.finish_piece(&pieces[rp], old, seqs, r, c) {
                    tails.push(tl);
                }
            }
            Ok(PartResult { fixups, tails })
        });
        // Kept for the thread's next call after an error too (a decode step with a NaN
        // hidden state fails in here).
        scratch.put_back();
        res
    }

    /// Runs `len` rows of one piece (sequence positions `t..t+len`, part-local output rows
    /// from `lr0`): per row, the gate and the conv's RMSNorm ([`kernels::gate_token`]), then
    /// the output row, written once: gated value + SiLU(conv), reading earlier normalised rows
    /// from the segment or the ring. Then pushes the rows into the ring. Rows with taps into a
    /// neighbour's unknown rows get the gated value and keep their normalised row for the
    /// fix-up. Returns the nanoseconds spent in the gate, or the error of a row's non-finite
    /// hidden state ([`Driver::check_hidden`]).
    #[allow(clippy::too_many_arguments)]
    fn conv_segment(
        &self,
        ring: &mut Ring<'_>,
        sg: Segment<'_>,
        t: usize,
        p: Piece,
        lr0: usize,
        out: &mut [f32],
        fixups: &mut Vec<Fixup>,
        undo: &mut Undo,
    ) -> Result<u64> {
        let cfg = self.e.config();
        let (n, taps, r) = (cfg.max_ngram_size, cfg.kernel_size, cfg.conv_history());
        let (hc, d) = (cfg.hc_mult, cfg.hidden_size);
        let c = hc * d;
        let np = self.fw.proj.n();
        let Segment {
            normed: seg,
            proj,
            hidden,
            gates,
        } = sg;
        let rows = proj.len() / np;
        // Rows live at once: a group's and the R before it (see `normed_slots`).
        let slots = seg.len() / c;
        let slot = |u: usize| (u % slots) * c;
        let unknown = ring.unknown;
        let in_state = matches!(ring.rows, RingRows::State(_));
        let mut saved = ring.saved;
        let (ring_data, head) = ring.parts();
        let params = GateParams {
            value_bias: &self.fw.value_bias,
            key_bias: &self.fw.key_bias,
            norm12: &self.fw.norm12,
            conv_norm: &self.fw.conv_norm,
        };
        let mut gate_ns = 0u64;
        // Rows go in groups of 3·N with the default taps: their gates first, then their
        // outputs as N trios of rows a dilation apart ([`kernels::conv_rows3`]), which share
        // three of their four taps' rows; otherwise (and for the last rows of a segment) one
        // row at a time. The trio paid on AVX-512 (Zen 5: conv 0.0088 -> 0.0069 thread-s
        // per 4096-token prefill, measured when it ran in one pass) and, since it runs in
        // two passes, pays on AVX2 (Zen 3: 15-17 µs per trio in criterion against 20-24 for
        // three rows; AVX-512 not timed since); it runs on every ISA so that one path is
        // exercised everywhere.
        let group = conv_group(cfg);
        let mut u0 = 0;
        while u0 < rows {
            let len = if rows - u0 >= group { group } else { 1 };
            let clock = Instant::now();
            for u in u0..u0 + len {
                let query = &hidden[u * c..(u + 1) * c];
                let finite = kernels::gate_token(
                    self.isa,
                    &params,
                    &proj[u * np..(u + 1) * np],
                    query,
                    kernels::Ahead {
                        query: hidden.get((u + 1) * c..(u + 2) * c).unwrap_or(&[]),
                        proj: proj.get((u + 1) * np..(u + 2) * np).unwrap_or(&[]),
                    },
                    &mut gates[u * hc..(u + 1) * hc],
                    &mut seg[slot(u)..slot(u) + c],
                );
                if !finite && self.check_hidden {
                    if let Some(k) = crate::ops::first_non_finite(query) {
                        return Err(EngramError::NonFinite {
                            name: "hidden_states".into(),
                            index: (p.base + t + u) * c + k,
                            value: query[k],
                        });
                    }
                }
            }
            gate_ns += clock.elapsed().as_nanos() as u64;
            let seg: &[f32] = seg;
            let gates: &[f32] = gates;
            let (ring_rows, ring_head): (&[f32], usize) = (ring_data, *head);
            let history = History {
                seg,
                slots,
                ring: ring_rows,
                head: ring_head,
                unknown,
                n,
                r,
                c,
            };
            let gv = |u: usize| kernels::GatedValue {
                value: &proj[u * np..u * np + d],
                bias: &self.fw.value_bias,
                gates: &gates[u * hc..(u + 1) * hc],
            };
            // One row's output: gated value + SiLU(conv), or, for a row with taps in the
            // neighbour's range, the gated value, its normalised row kept for the fix-up.
            let mut one_row = |u: usize, out: &mut [f32]| {
                // The taps' rows: on the stack for the usual few taps.
                let mut inline: [Option<&[f32]>; INLINE_TAPS] = [None; INLINE_TAPS];
                let mut heap: Vec<Option<&[f32]>>;
                let rows_k: &mut [Option<&[f32]>] = if taps <= INLINE_TAPS {
                    &mut inline[..taps]
                } else {
                    heap = vec![None; taps];
                    &mut heap
                };
                let partial = history.tap_rows(u, rows_k);
                let lr = lr0 + u;
                let o = &mut out[lr * c..(lr + 1) * c];
                if partial {
                    kernels::gated_row(self.isa, &gv(u), o);
                    fixups.push(Fixup {
                        seq: p.seq,
                        row: p.base + t + u,
                        t: t + u,
                        normed: seg[slot(u)..slot(u) + c].to_vec(),
                    });
                } else {
                    kernels::conv_row(self.isa, &self.fw.conv_w, rows_k, &gv(u), o);
                }
            };
            if len == 1 {
                one_row(u0, out);
            } else {
                for j in 0..n {
                    let trio = [u0 + j, u0 + j + n, u0 + j + 2 * n];
                    let mut slots = [[None; kernels::TRIO_TAPS]; 3];
                    let mut partial = false;
                    for (slot, &u) in slots.iter_mut().zip(&trio) {
                        partial |= history.tap_rows(u, slot);
                    }
                    if partial {
                        for &u in &trio {
                            one_row(u, out);
                        }
                        continue;
                    }
                    // Three disjoint output rows, in increasing order.
                    let (lo, rest) = out[(lr0 + trio[0]) * c..].split_at_mut(n * c);
                    let (mid, rest) = rest.split_at_mut(n * c);
                    kernels::conv_rows3(
                        self.isa,
                        &self.fw.conv_w,
                        [&slots[0], &slots[1], &slots[2]],
                        [&gv(trio[0]), &gv(trio[1]), &gv(trio[2])],
                        [&mut lo[..c], &mut mid[..c], &mut rest[..c]],
                    );
                }
            }
            u0 += len;
        }
        // Push the rows into the ring (only the last R matter). A state's row from before
        // the call goes to the undo buffer first (the first R pushes of the call each reach
        // one: they go round the ring from its head).
        if r > 0 {
            let keep = rows.min(r);
            for u in rows - keep..rows {
                let at = *head * c..(*head + 1) * c;
                if in_state && saved < r {
                    undo.slots.push((p.seq, *head));
                    undo.rows.extend_from_slice(&ring_data[at.clone()]);
                    saved += 1;
                }
                ring_data[at].copy_from_slice(&seg[slot(u)..slot(u) + c]);
                *head = (*head + 1) % r;
            }
        }
        ring.saved = saved;
        ring.unknown = ring.unknown.saturating_sub(rows);
        Ok(gate_ns)
    }

    /// The last R rows of a finished piece, when the next range needs them (its sequence
    /// goes on) or its ring was local (its state was not updated in place).
    fn finish_piece(
        &self,
        p: &Piece,
        mut ring: Ring<'_>,
        seqs: &[SeqInput<'_>],
        r: usize,
        c: usize,
    ) -> Option<Tail> {
        let n1 = self.e.config().max_ngram_size - 1;
        let seq_len = seqs[p.seq].ext.len() - n1;
        let is_local = matches!(ring.rows, RingRows::Local { .. });
        if is_local || p.t1 < seq_len {
            let (data, head) = ring.parts();
            Some(Tail {
                seq: p.seq,
                rows: ordered(data, *head, r, c),
                ends: p.t1 == seq_len,
            })
        } else {
            None
        }
    }

    /// Completes the rows at range starts with the neighbour's last normalised rows, and
    /// writes the history of sequences whose last rows were in a range of their own. Runs
    /// after every range, on one thread, so the rows go through the vector kernels: with a
    /// scalar `mul_add` per element (a libm `fmaf` call where the build target lacks FMA)
    /// this took 0.78 ms of a 96 ms prefill (demo layer, 4096 tokens, AVX-512), against
    /// 0.04 ms (when it summed only the neighbour's taps). Each row's conv is summed here
    /// whole, in tap order, as a range without a boundary sums it ([`kernels::conv_row`]),
    /// so the output has the same bits however the rows were split into ranges.
    fn fix_boundaries(
        &self,
        parts: &[Vec<Piece>],
        results: Vec<PartResult>,
        states: &mut [EngramState],
        out: &mut [f32],
        c: usize,
    ) {
        let cfg = self.e.config();
        let (n, taps, r) = (cfg.max_ngram_size, cfg.kernel_size, cfg.conv_history());
        let mut prev: Option<Tail> = None;
        let mut y = vec![0.0f32; c];
        for (p, res) in parts.iter().zip(results) {
            let PartResult { fixups, tails } = res;
            if !fixups.is_empty() {
                let left = prev
                    .as_ref()
                    .expect("a range that starts inside a sequence has a left neighbour");
                // The range's own first R normalised rows, by row since the range start:
                // every one of them is a fix-up row.
                let mut own: Vec<Option<&[f32]>> = vec![None; r];
                for f in &fixups {
                    if let Some(slot) = own.get_mut(f.t - p[0].t0) {
                        *slot = Some(&f.normed);
                    }
                }
                for f in &fixups {
                    debug_assert_eq!(left.seq, f.seq);
                    // Rows since the range start; each tap's row, oldest first, from the
                    // neighbour's last R rows or from the range's own first rows.
                    let u = f.t - p[0].t0;
                    let rows: Vec<Option<&[f32]>> = (0..taps)
                        .map(|k| {
                            let back = (taps - 1 - k) * n;
                            if u < back {
                                Some(&left.rows[(r + u - back) * c..(r + u - back + 1) * c])
                            } else {
                                Some(own[u - back].expect("a range's first R rows are fix-ups"))
                            }
                        })
                        .collect();
                    let o = &mut out[f.row * c..(f.row + 1) * c];
                    kernels::conv_row_pre(self.isa, &self.fw.conv_w, &rows, &mut y);
                    kernels::conv_row_finish(self.isa, &self.fw.conv_w, &[], &mut y, o);
                }
            }
            // Every piece's tail in order: the sequences they end get their history, and
            // the last one is what the next range's first rows complete from.
            for tail in tails {
                if tail.ends {
                    let st = &mut states[tail.seq];
                    st.conv_ring.copy_from_slice(&tail.rows);
                    st.conv_head = 0;
                }
                prev = Some(tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guided cuts: strictly increasing, inside the rows, every range at least
    /// `MIN_ROWS_PER_SPLIT` rows, ranges never growing (but the last), whole tiles while a
    /// range is at least a tile, and the first range a `1 / (2 · threads)` share.
    #[test]
    fn guided_cuts_shrink_in_whole_tiles() {
        for (total, threads, tile) in [
            (4096, 2, 64),
            (4096, 2, 256),
            (512, 2, 64),
            (1000, 3, 64),
            (100_000, 16, 64),
            (777, 2, 1),
        ] {
            let cuts = guided_cuts(total, threads, tile);
            let mut bounds = vec![0];
            bounds.extend(&cuts);
            bounds.push(total);
            let sizes: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
            let case = format!("{total} rows, {threads} threads, tile {tile}: {sizes:?}");
            assert!(sizes.len() > threads, "{case}");
            assert!(sizes.iter().all(|&s| s >= MIN_ROWS_PER_SPLIT), "{case}");
            assert!(
                sizes[..sizes.len() - 1].windows(2).all(|w| w[1] <= w[0]),
                "{case}"
            );
            let tile = tile.max(MIN_ROWS_PER_SPLIT);
            for &s in &sizes[..sizes.len() - 1] {
                let unit = if s >= tile { tile } else { MIN_ROWS_PER_SPLIT };
                assert_eq!(s % unit, 0, "{case}");
            }
            let first = total / (2 * threads);
            assert!(sizes[0] <= first && sizes[0] + tile > first, "{case}");
        }
        // Too few rows for another range: none.
        assert!(guided_cuts(100, 2, 64).is_empty());
    }
}
