//! `engram bench`: tokens/s of the full default layer, time per stage, peak RSS.

use anyhow::{bail, Result};
use clap::Args;
use engram::fused::profile;
use engram::layer::compression_for;
use engram::rng::torch::TorchGenerator;
use engram::{DType, Engram, ForwardPath, LineAligned, NgramHashMapping};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Most timed runs one bench takes (each run's time is kept for the median).
const MAX_RUNS: usize = 1_000_000;

/// `engram bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The ids of the options given on the command line (not by their defaults): filled in
    /// by `main` from clap's value sources, so that `--fma-peak --tokens 4096` is refused
    /// like `--fma-peak --tokens 8`. `main` adds `tokenizer` when the global `--tokenizer`
    /// is given.
    #[arg(skip)]
    pub given: Vec<String>,
    /// Tokens per sequence (L).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Sequences (B).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs (after one warm-up run), at most 1,000,000.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Weights file; PyTorch-default random weights (seed 0) of the config when omitted.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Config JSON; the full default config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// fused or reference.
    #[arg(long, default_value = "fused")]
    path: String,
    /// Decode mode: B sequences, one new token each per step, for --tokens steps.
    #[arg(long)]
    decode: bool,
    /// Prefill in chunks of this many tokens with carried state.
    #[arg(long)]
    chunk: Option<usize>,
    /// One JSON line instead of a report.
    #[arg(long)]
    json: bool,
    /// Measure the FMA peak instead (GFLOP/s of independent FMA chains, per ISA, on one
    /// core and on all): the yardstick for GEMM efficiency. Then each f32 microkernel with
    /// its operands in L1, the limit of its own loads and FMAs on this core now.
    #[arg(long)]
    fma_peak: bool,
    /// Measure the read bandwidth instead: from memory and from the last-level cache, all
    /// threads. (A decode bench measures its own floor's rate: a buffer the size of the
    /// projection weights, which every step streams, read warm.)
    #[arg(long)]
    mem_bw: bool,
    /// cpu or cuda. On cuda the inputs are device-resident, times are CUDA-event medians,
    /// decode steps replay a CUDA graph, and the copy bandwidth and the projection GEMM alone
    /// are measured in the same process.
    #[arg(long, default_value = "cpu")]
    device: crate::cuda::Device,
    /// Where the table's rows live (with --weights).
    #[command(flatten)]
    table: crate::table::TableArgs,
    /// Take the ids from this text file (sequence s gets tokens s·L..(s+1)·L of it) instead
    /// of random ids: natural n-gram traffic for the row stores.
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Keep the row cache warm between runs (by default it is emptied before each run).
    #[arg(long)]
    warm: bool,
    /// Give each call a fresh output vector (`forward`), as a caller that keeps no buffer
    /// would: the OS then zeroes and maps its pages on first touch and unmaps them after.
    /// By default the output goes into one buffer reused across calls (`forward_into`), as
    /// in a serving loop.
    #[arg(long)]
    fresh_output: bool,
    /// Keep the hidden states and the output buffer in plain `Vec`s, which start 16 bytes
    /// into a page, so that every row straddles cache lines, instead of on cache lines (as
    /// PyTorch allocates tensors; `engram::LineAligned`): what a caller without aligned
    /// buffers gets (prefill and decode; --chunk always streams through Vecs)
    #[arg(long)]
    vec_buffers: bool,
    /// Time the row store alone: gather every row the run would read (the layer's hashes of
    /// the ids, in token order) with no compute, and report rows/s and round trips/s: the
    /// store's own rate, to set beside `redis-benchmark` or `fio` (prefill only)
    #[arg(long)]
    gather_only: bool,
    /// Which layer of a DeepSeek-V4.1 config (the bench then uses random checkpoint-format
    /// weights at the config's width, with the table's rows reduced to fit in memory).
    #[arg(long)]
    layer: Option<u64>,
    /// With --device cuda: every configuration of the GPU check in one process (prefill
    /// L = 4096 and 32768; decode B = 1, 64, 256), one JSON line each with --json.
    #[arg(long)]
    suite: bool,
}

/// Read bandwidth of this machine, measured in this process.
#[derive(Debug, Clone, Copy)]
pub struct MemBw {
    /// Bytes/s reading a buffer far larger than the last-level cache, all threads.
    pub dram: f64,
    /// Bytes/s reading a buffer of half the last-level cache, all threads.
    pub llc: f64,
    /// Size of the last-level cache in bytes (from sysfs; 8 MiB when unknown).
    pub llc_bytes: usize,
    /// Bytes/s reading, warm and on all threads, a buffer of the size asked for (a decode
    /// step's packed weights), when that size fits the last-level cache: the rate a step
    /// that streams those weights can reach. (Half the reported LLC is not it on a VM that
    /// reports the host's cache: there 130 MiB read at memory speed while a step read its
    /// 21 MB of weights at 1.5-2x that.)
    pub working_set: Option<(usize, f64)>,
}

/// The largest cache of cpu0 (sysfs), in bytes.
fn llc_bytes() -> Option<usize> {
    let mut best = None;
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let Ok(size) = std::fs::read_to_string(format!("{dir}/size")) else {
            continue;
        };
        let size = size.trim();
        let (num, mult) = match size.strip_suffix('K') {
            Some(n) => (n, 1024),
            None => match size.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (size, 1),
            },
        };
        if let Ok(n) = num.parse::<usize>() {
            best = best.max(Some(n * mult));
        }
    }
    best
}

/// Reads `buf` split across all threads, `reps` times; returns bytes/s (best of `tries`).
fn read_bw(buf: &[f32], reps: usize, tries: usize) -> f64 {
    use engram::fused::kernels::{read_sum, Isa};
    let isa = Isa::detect();
    let threads = rayon::current_num_threads().max(1);
    let part = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..tries {
        let t0 = Instant::now();
        rayon::broadcast(|ctx| {
            let lo = (ctx.index() * part).min(buf.len());
            let hi = (lo + part).min(buf.len());
            for _ in 0..reps {
                std::hint::black_box(read_sum(isa, std::hint::black_box(&buf[lo..hi])));
            }
        });
        let bytes = (buf.len() * 4 * reps) as f64;
        best = best.max(bytes / t0.elapsed().as_secs_f64());
    }
    best
}

/// The buffer [`measure_mem_bw`] reads from memory: 8 × the last-level cache, at least
/// 1 GiB and at most 4 GiB, and never more than a quarter of the free memory. (It was
/// 64 × the cache, above any cap: 16.25 GiB on a VM that reports the host's 260 MiB L3 and
/// has 23 GB of RAM.)
fn dram_buffer_bytes(llc: usize, avail: u64) -> usize {
    let quarter = usize::try_from(avail / 4).unwrap_or(usize::MAX);
    llc.saturating_mul(8).clamp(1 << 30, 4 << 30).min(quarter)
}

/// Measures [`MemBw`]: a buffer well past the LLC from memory ([`dram_buffer_bytes`]), half
/// the LLC from cache, and a buffer of `working_set` bytes when that fits the LLC.
pub fn measure_mem_bw(working_set: Option<usize>) -> MemBw {
    let llc = llc_bytes().unwrap_or(8 << 20);
    let avail = engram::budget::available_memory().unwrap_or(u64::MAX);
    let big = dram_buffer_bytes(llc, avail);
    let buf: Vec<f32> = vec![1.0; big / 4];
    let dram = read_bw(&buf, 1, 3);
    drop(buf);
    // Half the LLC, within a quarter of the memory left too (a tight `ulimit -v`).
    let half = (llc / 2).min(dram_buffer_bytes(llc, avail)).max(4096);
    let small: Vec<f32> = vec![1.0; half / 4];
    let reps = ((256usize << 20) / half).max(4);
    let _ = read_bw(&small, 2, 1); // bring it into the cache
    let llc_bw = read_bw(&small, reps, 5);
    drop(small);
    let working_set = working_set
        .filter(|&bytes| bytes >= 4 && bytes <= llc)
        .map(|bytes| (bytes, warm_read_bw(bytes)));
    MemBw {
        dram,
        llc: llc_bw,
        llc_bytes: llc,
        working_set,
    }
}

/// Bytes/s reading a buffer of `bytes` on all threads once it is warm, with about 256 MiB
/// read per measurement (best of five).
fn warm_read_bw(bytes: usize) -> f64 {
    let buf: Vec<f32> = vec![1.0; bytes / 4];
    let reps = ((256usize << 20) / bytes).max(4);
    let _ = read_bw(&buf, 2, 1); // bring it into the caches it fits
    read_bw(&buf, reps, 5)
}

/// A decode step's floor: `(weight bytes, read bandwidth, what bounds it, seconds)`, the
/// longer of the packed weights read once (at the rate of a buffer of their size read warm
/// when they fit the last-level cache, else from memory) and the step's FLOPs at the FMA
/// peak (`compute_s`).
fn step_floor(bytes: usize, bw: &MemBw, compute_s: f64) -> (usize, f64, &'static str, f64) {
    let (rate, from) = match bw.working_set {
        Some((_, rate)) => (
            rate,
            "weights at the rate of a buffer of their size read warm",
        ),
        None => (bw.dram, "weights from memory"),
    };
    let memory = bytes as f64 / rate;
    if compute_s > memory {
        (bytes, rate, "FLOPs at the FMA peak", compute_s)
    } else {
        (bytes, rate, from, memory)
    }
}

/// `engram bench --mem-bw`.
fn mem_bw(json: bool) -> Result<ExitCode> {
    let m = measure_mem_bw(None);
    if json {
        println!(
            "{}",
            serde_json::json!({"dram_read_gb_s": m.dram / 1e9, "llc_read_gb_s": m.llc / 1e9,
                "llc_bytes": m.llc_bytes, "threads": rayon::current_num_threads()})
        );
    } else {
        println!(
            "read bandwidth, {} threads: memory {:.1} GB/s, last-level cache ({:.0} MiB) {:.1} GB/s",
            rayon::current_num_threads(),
            m.dram / 1e9,
            m.llc_bytes as f64 / (1 << 20) as f64,
            m.llc / 1e9
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// FMA peak of all threads now, GFLOP/s, for the kernel the projection runs (`kernel`, its
/// [`engram::fused::proj::Projection::kernel_name`]): f32 FMA chains, `vdpbf16ps` chains for
/// the AVX512-BF16 kernel, `tdpbf16ps` tile chains for the AMX one. The best of three short
/// measurements: on a shared machine a measurement can only read low (another tenant took
/// a core for part of it), and a low peak would overstate `fma_peak_share`.
pub fn peak_gflops(kernel: &str) -> f64 {
    (0..3).map(|_| peak_once(kernel)).fold(0.0, f64::max)
}

/// The projection's own microkernel with its operands in L1
/// ([`engram::fused::proj::Projection::l1_microkernel`]) on all threads now, GFLOP/s: the
/// best of three short measurements, as for [`peak_gflops`]; None for a projection without
/// one. Beside the FMA peak it tells the core's share taken by the kernel's instruction mix
/// from what the memory hierarchy costs: a kernel that falls short of the peak with its
/// operands in L1 is held by the core (its loads, or another tenant on the same core). It
/// is the prefill's shape (6 rows; AMX: a 32-row block); decode's 1-3-row shapes have other
/// instruction mixes.
pub fn l1_kernel_gflops(proj: &engram::fused::proj::Projection) -> Option<f64> {
    // Calls for about 4 GFLOP per thread (0.05 s at 90 GFLOP/s).
    let per_call = proj.l1_microkernel(1)?;
    let calls = (4e9 / per_call).ceil() as usize;
    let threads = rayon::current_num_threads();
    let once = || {
        let t0 = Instant::now();
        let r = rayon::broadcast(|_| proj.l1_microkernel(std::hint::black_box(calls)));
        let flops = r[0].unwrap_or(0.0);
        threads as f64 * flops / t0.elapsed().as_secs_f64() / 1e9
    };
    Some((0..3).map(|_| once()).fold(0.0, f64::max))
}

fn peak_once(kernel: &str) -> f64 {
    use engram::fused::kernels::{fma_chains, Isa};
    let threads = rayon::current_num_threads();
    let iters = 10_000_000usize;
    let t0 = Instant::now();
    let flops = if kernel.starts_with("amx") {
        // A step is four 16-cycle tile products, about 64 times an FMA chain step.
        let r =
            rayon::broadcast(|_| engram::fused::proj::amx_chains(std::hint::black_box(iters / 64)));
        r[0].unwrap_or(0.0)
    } else if kernel.starts_with("avx512-bf16") {
        rayon::broadcast(|_| {
            std::hint::black_box(engram::fused::proj::bf16_dot_chains(std::hint::black_box(
                iters,
            )))
        });
        12.0 * 16.0 * 4.0 * iters as f64
    } else {
        let isa = Isa::detect();
        let r = rayon::broadcast(|_| fma_chains(isa, std::hint::black_box(iters)));
        std::hint::black_box(&r);
        r[0].1
    };
    threads as f64 * flops / t0.elapsed().as_secs_f64() / 1e9
}

/// `engram bench --fma-peak`.
fn fma_peak(json: bool) -> Result<ExitCode> {
    use engram::fused::kernels::{fma_chains, Isa};
    let iters = 50_000_000usize;
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for isa in Isa::all_supported() {
        let t0 = Instant::now();
        let (_, flops) = std::hint::black_box(fma_chains(isa, std::hint::black_box(iters)));
        let one = flops / t0.elapsed().as_secs_f64() / 1e9;
        let t0 = Instant::now();
        rayon::broadcast(|_| std::hint::black_box(fma_chains(isa, std::hint::black_box(iters))));
        let all = threads as f64 * flops / t0.elapsed().as_secs_f64() / 1e9;
        rows.push(serde_json::json!({"isa": format!("{isa:?}"), "gflops_one_core": one, "gflops_all_cores": all, "threads": threads}));
        if !json {
            println!(
                "{:<8} one core {one:>7.1} GFLOP/s   {threads} cores {all:>7.1} GFLOP/s",
                format!("{isa:?}")
            );
        }
    }
    // AMX: its tile products without loads, on one core and on all.
    if let Some(flops) = engram::fused::proj::amx_chains(1) {
        let iters = 1_000_000usize;
        let t0 = Instant::now();
        std::hint::black_box(engram::fused::proj::amx_chains(std::hint::black_box(iters)));
        let one = iters as f64 * flops / t0.elapsed().as_secs_f64() / 1e9;
        let all = peak_gflops("amx");
        rows.push(serde_json::json!({"isa": "amx (tdpbf16ps, no loads)", "gflops_one_core": one, "gflops_all_cores": all, "threads": threads}));
        if !json {
            println!(
                "Amx tiles (tdpbf16ps, no loads): one core {one:>7.1} GFLOP/s   {threads} cores {all:>7.1} GFLOP/s"
            );
        }
    }
    // Each f32 microkernel with its operands in L1 (see `l1_kernel_gflops`), and the AMX
    // bf16 block where the CPU has AMX, on one core and on all.
    use engram::fused::proj::{Bf16Via, PanelKernel, Projection};
    let k = 64;
    let mut kernels: Vec<Projection> = PanelKernel::all_supported()
        .into_iter()
        .map(|kernel| {
            let w = vec![0.0f32; kernel.nr() * k];
            Projection::pack_for(&[&w], k, engram::DType::F32, Some(kernel))
        })
        .collect();
    if engram::fused::proj::amx_ready() {
        let w = vec![0.0f32; 64 * k];
        let avx512 = Some(PanelKernel::Avx512);
        kernels.push(Projection::pack_for_via(
            &[&w],
            k,
            engram::DType::Bf16,
            avx512,
            Bf16Via::Amx,
        ));
    }
    for p in &kernels {
        let Some(per_call) = p.l1_microkernel(1) else {
            continue;
        };
        let calls = (4e9 / per_call).ceil() as usize;
        // One core: the best of three, as on all cores.
        let one = (0..3)
            .map(|_| {
                let t0 = Instant::now();
                let flops = p.l1_microkernel(std::hint::black_box(calls)).unwrap_or(0.0);
                flops / t0.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max);
        let all = l1_kernel_gflops(p).unwrap_or(0.0);
        let name = p.kernel_name();
        rows.push(serde_json::json!({"kernel": name, "operands": "L1", "gflops_one_core": one, "gflops_all_cores": all, "threads": threads}));
        if !json {
            println!(
                "{name}, operands in L1: one core {one:>7.1} GFLOP/s   {threads} cores {all:>7.1} GFLOP/s"
            );
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Resets this process's peak resident set size ([`peak_rss`]) to its current size (Linux:
/// `5` written to `/proc/self/clear_refs`); false where that cannot be done.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Thread-seconds per run of each fused stage, as a JSON object.
fn stage_json(stages: [f64; 5], runs: usize) -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = profile::STAGE_NAMES
        .iter()
        .zip(stages)
        .map(|(n, s)| (n.to_string(), serde_json::json!(s / runs as f64)))
        .collect();
    serde_json::Value::Object(m)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let on = |id: &str| a.given.iter().any(|g| g == id);
    if a.fma_peak || a.mem_bw {
        let flag = if a.fma_peak { "--fma-peak" } else { "--mem-bw" };
        // They measure the machine, not a layer: a flag of the layer's bench would be
        // silently dropped. Any option typed out (`given`, filled by `main` from clap's
        // value sources) is refused, at its default value too.
        if a.fma_peak && a.mem_bw {
            bail!("{flag} measures this machine's limits; expected no --mem-bw with it (run it on its own)");
        }
        if let Some(id) = a
            .given
            .iter()
            .find(|g| !["fma_peak", "mem_bw", "json", "threads"].contains(&g.as_str()))
        {
            bail!(
                "{flag} measures this machine's limits; expected no --{} with it",
                id.replace('_', "-")
            );
        }
        return if a.fma_peak {
            fma_peak(a.json)
        } else {
            mem_bw(a.json)
        };
    }
    if a.warm && a.table.options()?.cache_bytes.is_none() {
        bail!("--warm: keeps the row cache warm; expected --table-cache SIZE with it, found none");
    }
    if a.decode && a.chunk.is_some() {
        bail!("--chunk: a chunked prefill; expected no --decode with it (decode steps are one token each)");
    }
    if a.tokens == 0 || a.batch == 0 || a.runs == 0 {
        bail!(
            "--tokens, --batch and --runs must be >= 1 (found {}, {}, {})",
            a.tokens,
            a.batch,
            a.runs
        );
    }
    if a.runs > MAX_RUNS {
        bail!("--runs: expected at most {MAX_RUNS}, found {}", a.runs);
    }
    let path: ForwardPath = a.path.parse()?;
    // Row-store options typed out (at their defaults too).
    let table_flags: Vec<String> = a
        .given
        .iter()
        .filter(|g| g.starts_with("table_") || g.starts_with("store_") || *g == "io_depth")
        .map(|g| format!("--{}", g.replace('_', "-")))
        .collect();
    let table_given = !table_flags.is_empty();
    // The row-store flags given, for the error of a bench without --weights.
    let no_weights = || {
        let flags = if table_flags.is_empty() {
            "--table-io / --table-cache".to_string()
        } else {
            table_flags.join(", ")
        };
        anyhow::anyhow!("{flags}: give --weights (the bench's random table lives in RAM)")
    };
    if a.vec_buffers && a.chunk.is_some() {
        bail!("--vec-buffers: a chunked prefill always streams through Vecs; expected no --chunk with it");
    }
    if let Some(v) = crate::v41::detect(a.config.as_deref())? {
        let table = a.table.options()?;
        if a.weights.is_none() && (table_given || table != engram::rows::TableOptions::default()) {
            return Err(no_weights());
        }
        let ignored = [
            (
                a.dtype != "f32" || on("dtype"),
                "--dtype (a V4.1 layer keeps fp8 weights)",
            ),
            (a.batch != 1, "--batch (one sequence of --tokens tokens)"),
            (a.decode || a.chunk.is_some(), "--decode / --chunk"),
            (
                a.path != "fused",
                "--path reference (it times the fused path)",
            ),
            (a.device != crate::cuda::Device::Cpu, "--device cuda"),
            (a.suite, "--suite"),
            (a.gather_only, "--gather-only"),
            (a.fresh_output, "--fresh-output"),
            (a.vec_buffers, "--vec-buffers"),
        ];
        if let Some((_, what)) = ignored.iter().find(|(given, _)| *given) {
            bail!("a DeepSeek-V4.1 bench does not take {what}");
        }
        return crate::v41::bench(
            v,
            crate::v41::BenchV41 {
                layer: a.layer,
                tokens: a.tokens,
                runs: a.runs,
                json: a.json,
                weights: a.weights.as_deref(),
                table,
                text_file: a.text_file.as_deref(),
                warm: a.warm,
            },
        );
    }
    // Options the chunked prefill and the row-store timing would drop.
    if a.chunk.is_some() {
        if a.fresh_output {
            bail!("--fresh-output: a chunked prefill already gives each chunk's output a fresh buffer; expected no --chunk with it");
        }
        if let Some(p) = &a.text_file {
            bail!(
                "--text-file {}: a chunked prefill runs random ids; expected no --chunk with it",
                p.display()
            );
        }
    }
    if a.gather_only {
        let dropped = [
            // A prefill's rows: --chunk ran the chunked prefill instead, and --decode was
            // refused only after the weights were built.
            (a.chunk.is_some(), "--chunk"),
            (a.decode, "--decode"),
            (a.dtype != "f32" || on("dtype"), "--dtype"),
            (a.path != "fused" || on("path"), "--path"),
            (a.fresh_output, "--fresh-output"),
            (a.vec_buffers, "--vec-buffers"),
            (a.device != crate::cuda::Device::Cpu, "--device"),
            (a.suite, "--suite"),
        ];
        if let Some((_, what)) = dropped.iter().find(|(given, _)| *given) {
            bail!("{what}: --gather-only times the row store alone (no layer math); expected no {what} with it");
        }
    }
    let cfg = crate::commands::load_config(&a.config)?;
    if let Some(layer) = a.layer {
        bail!(
            "--layer {layer}: picks a layer of a DeepSeek-V4.1 config; expected none with the demo layer's config (its layer is the config's layer_id, {})",
            cfg.layer_id
        );
    }
    let table = a.table.options()?;
    if a.weights.is_none() && (table_given || table != engram::rows::TableOptions::default()) {
        return Err(no_weights());
    }
    let dtype: DType = a.dtype.parse()?;
    if path == ForwardPath::Reference && dtype != DType::F32 {
        bail!("--dtype {}: the fused path's storage; expected --path fused with it (the reference runs in f32)", a.dtype);
    }
    if a.device == crate::cuda::Device::Cuda {
        crate::cuda::open()?; // one line, before building weights, where there is no GPU
    }
    let m = Arc::new(NgramHashMapping::new(&cfg, compression_for(&cfg)?)?);
    let tokens = (a.tokens as u64).saturating_mul(a.batch as u64);
    let rows = m.layer(cfg.layer_id)?.table_rows();
    // A file's table copied into memory by `--table-io ram`: bytes per value as it lies.
    let ram_table = match &a.weights {
        Some(w) if table.io == engram::rows::TableIo::Ram && table.store.is_none() => {
            let f = engram::tensors::TensorFile::open(w)?;
            Some(match f.info(engram::weights::TABLE)?.0 {
                safetensors::Dtype::BF16 | safetensors::Dtype::F16 => 2,
                _ => 4,
            })
        }
        _ => None,
    };
    let plan = engram::budget::forward_plan(
        &cfg,
        &engram::budget::RunShape {
            // Streaming holds one chunk of one sequence at a time.
            tokens: match a.chunk {
                Some(n) => n.min(a.tokens) as u64,
                None => tokens,
            },
            sequences: a.batch as u64,
            all_stages: path == ForwardPath::Reference,
            bf16_table_copy: a.weights.is_some() && dtype == DType::Bf16,
            table_rows: rows,
            threads: rayon::current_num_threads() as u64,
            // Built in memory without --weights; copied there by `--table-io ram`.
            table_in_ram: a.weights.is_none() || ram_table.is_some(),
            table_elem_bytes: match ram_table {
                Some(bytes) => bytes,
                None if dtype == DType::Bf16 && path == ForwardPath::Fused => 2,
                None => 4,
            },
        },
    )?;
    plan.check()?;
    let e = match &a.weights {
        Some(w) if table != engram::rows::TableOptions::default() => {
            Engram::load_with_table(cfg.clone(), w, table.clone())?
        }
        Some(w) => Engram::load_with(cfg.clone(), m.clone(), w)?,
        None => {
            // The fused bf16 path gathers from a bf16 table: build that one directly.
            let table = if dtype == DType::Bf16 && path == ForwardPath::Fused {
                DType::Bf16
            } else {
                DType::F32
            };
            let (w, _) = crate::demo::init_with_bar(&cfg, &m, 0, table)?;
            Engram::new(cfg.clone(), m.clone(), w)?
        }
    };
    let e = e.with_dtype(dtype);
    if a.device == crate::cuda::Device::Cuda {
        use crate::cuda::Shape;
        let shapes = if a.suite {
            vec![
                Shape {
                    decode: false,
                    batch: 1,
                    tokens: 4096,
                },
                Shape {
                    decode: false,
                    batch: 1,
                    tokens: 32768,
                },
                Shape {
                    decode: true,
                    batch: 1,
                    tokens: 200,
                },
                Shape {
                    decode: true,
                    batch: 64,
                    tokens: 100,
                },
                Shape {
                    decode: true,
                    batch: 256,
                    tokens: 50,
                },
            ]
        } else {
            vec![Shape {
                decode: a.decode,
                batch: a.batch,
                tokens: a.tokens,
            }]
        };
        crate::cuda::bench(&e, dtype, &shapes, a.runs, a.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.suite {
        bail!("--suite: only with --device cuda");
    }
    e.fused_weights()?;
    let (b, l) = (a.batch, a.tokens);
    let (hc, d) = (cfg.hc_mult, cfg.hidden_size);
    if let Some(n) = a.chunk {
        if n == 0 {
            bail!("--chunk: expected a chunk length >= 1, found 0");
        }
        return bench_streaming(&a, &e, n, path, dtype);
    }
    // Random raw ids (uniform over the vocabulary) and randn hidden states.
    let v = m.compressed().num_raw() as u64;
    let mut x = 0x9E3779B97F4A7C15u64;
    let ids: Vec<i64> = match &a.text_file {
        Some(p) => {
            let tok = engram::Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
            let all = crate::commands::text_file_ids(&tok, p, "--text-file", Some(b * l))?;
            if all.len() < b * l {
                bail!(
                    "--text-file {}: expected at least {} tokens (B·L), found {}",
                    p.display(),
                    b * l,
                    all.len()
                );
            }
            all
        }
        None => (0..b * l)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % v) as i64
            })
            .collect(),
    };
    if a.gather_only {
        return bench_gather(&a, &e, &m, cfg.layer_id, &ids, &table);
    }
    // Hidden states and the output buffer reused across calls (unless --fresh-output)
    // start on a cache line, as PyTorch allocates tensors (see `engram::LineAligned`), or
    // with --vec-buffers sit in plain Vecs.
    let hidden = Buf::from_vec(
        a.vec_buffers,
        TorchGenerator::manual_seed(1).randn(b * l * hc * d),
    );
    let hidden = hidden.as_slice();
    let out_len = if a.decode { b } else { b * l } * hc * d;
    let out_len = if a.fresh_output { 0 } else { out_len };
    let out_buf = std::sync::Mutex::new(Buf::zeros(a.vec_buffers, out_len));
    let run_once = || -> Result<()> {
        let mut out = out_buf.lock().expect("the bench's output buffer");
        let out = out.as_mut_slice();
        if a.decode {
            let mut states: Vec<_> = (0..b).map(|_| e.new_state()).collect();
            let offsets: Vec<usize> = (0..=b).collect();
            let c = hc * d;
            for t in 0..l {
                let step_ids: Vec<i64> = (0..b).map(|s| ids[s * l + t]).collect();
                // A step's B rows lie together, step after step (`[L][B][HC·D]`), as the
                // layer below hands them over: nothing is copied per step. (Gathered from
                // `[B][L]` rows into a step buffer, the copy took 0.10-0.11 ms of a 2.4 ms
                // B = 64 bf16 step on Zen 4, 0.46-0.48 of 10 ms at B = 256: the harness's
                // time, not the layer's.)
                let step_h = &hidden[t * b * c..(t + 1) * b * c];
                if a.fresh_output {
                    e.forward_ragged(&mut states, &step_ids, step_h, &offsets, path)?;
                } else {
                    e.forward_ragged_into(&mut states, &step_ids, step_h, &offsets, path, out)?;
                }
            }
        } else if a.fresh_output {
            e.forward(&ids, hidden, b, l, path)?;
        } else {
            e.forward_into(&ids, hidden, b, l, path, out)?;
        }
        Ok(())
    };
    run_once()?; // warm-up: page in the touched table rows, pack weights, spin up threads
    let proj = e.fused_weights()?.projection();
    // The machine's limits, measured in this process: the read bandwidth for decode (every
    // step streams the projection weights), the FMA peak just before and after the runs.
    // Its buffer (8 × the last-level cache, 1-4 GiB, freed before the runs) is not the layer's
    // memory: the peak RSS reported is the larger of the peak before the measurement and the
    // peak from just after it to the end of the runs, where the peak can be reset.
    let rss_before_bw = peak_rss();
    let bw = a.decode.then(|| measure_mem_bw(Some(proj.weight_bytes())));
    let rss_reset = bw.is_some() && reset_peak_rss();
    let rss_with_buffer = bw.is_some() && !rss_reset;
    let peak_before = peak_gflops(proj.kernel_name());
    let l1_before = l1_kernel_gflops(proj);
    profile::take();
    let store_before = e.weights().table.store_stats();
    let mut secs = Vec::new();
    for _ in 0..a.runs {
        if !a.warm {
            e.weights().table.clear_cache();
        }
        let t0 = Instant::now();
        run_once()?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    // Row-store counters over the timed runs (hits, reads from the file, bytes).
    let store = store_before
        .zip(e.weights().table.store_stats())
        .map(|(a0, a1)| {
            crate::table::row_store_json(&table, a.warm, &a1.since(&a0), secs.iter().sum())
        });
    let stages = profile::take();
    let rss = if rss_reset {
        rss_before_bw.max(peak_rss())
    } else {
        peak_rss()
    }
    .unwrap_or(0);
    let peak_after = peak_gflops(proj.kernel_name());
    let l1_after = l1_kernel_gflops(proj);
    // Bandwidth is noisy on a shared machine: the best of the measurements before and after.
    let bw = bw.map(|before| {
        let after = measure_mem_bw(Some(proj.weight_bytes()));
        MemBw {
            dram: before.dram.max(after.dram),
            llc: before.llc.max(after.llc),
            llc_bytes: before.llc_bytes,
            working_set: match (before.working_set, after.working_set) {
                (Some((n, r0)), Some((_, r1))) => Some((n, r0.max(r1))),
                (one, other) => one.or(other),
            },
        }
    });
    let med = median(&mut secs);
    let tps = (b * l) as f64 / med;
    // Projection FLOPs per token: 2·Dm·(1+HC)·D.
    let flops_token = 2.0 * cfg.memory_width() as f64 * proj.n() as f64;
    // The higher of the two: a peak measured while the machine was busy reads low.
    let peak = peak_before.max(peak_after);
    let fma_share = flops_token * tps / (peak * 1e9);
    // The same FLOPs over the microkernel's own limit with its operands in L1.
    let l1_share = l1_before
        .zip(l1_after)
        .map(|(b0, b1)| flops_token * tps / (b0.max(b1) * 1e9));
    // Decode: the step's floor is the packed weights read once: when they fit the
    // last-level cache, at the rate measured reading a buffer of their size warm (from
    // whichever caches hold it), else from memory; from a few rows on, the step's FLOPs at
    // the FMA peak take longer, and that is the floor.
    let floor = bw.map(|bw| {
        step_floor(
            proj.weight_bytes(),
            &bw,
            b as f64 * flops_token / (peak * 1e9),
        )
    });
    let threads = rayon::current_num_threads();
    let mode = if a.decode { "decode" } else { "prefill" };
    if a.json {
        let st = stage_json(stages, a.runs);
        println!(
            "{}",
            serde_json::json!({
                "tokens_per_s": tps, "median_s": med, "tokens": l, "batch": b, "dtype": a.dtype,
                "path": a.path, "mode": mode, "chunk": a.chunk, "fresh_output": a.fresh_output, "vec_buffers": a.vec_buffers, "threads": threads, "runs": a.runs,
                "peak_rss_bytes": rss, "peak_rss_includes_bw_buffer": rss_with_buffer,
                "stage_thread_s_per_run": st,
                "step_latency_ms": if a.decode { Some(med / l as f64 * 1e3) } else { None },
                "kernel": proj.kernel_name(),
                "fma_peak_gflops_before": peak_before, "fma_peak_gflops_after": peak_after,
                "fma_peak_share": fma_share,
                "kernel_l1_gflops_before": l1_before, "kernel_l1_gflops_after": l1_after,
                "kernel_l1_share": l1_share,
                "weight_bytes": proj.weight_bytes(),
                "step_floor_ms": floor.map(|f| f.3 * 1e3),
                "step_floor_from": floor.map(|f| f.2),
                "floor_bandwidth_gb_s": floor.map(|f| f.1 / 1e9),
                "working_set_bytes": bw.and_then(|m| m.working_set).map(|w| w.0),
                "working_set_read_gb_s": bw.and_then(|m| m.working_set).map(|w| w.1 / 1e9),
                "dram_read_gb_s": bw.map(|m| m.dram / 1e9),
                "llc_read_gb_s": bw.map(|m| m.llc / 1e9),
                "step_over_floor": floor.map(|f| med / l as f64 / f.3),
                "row_store": store,
            })
        );
    } else {
        println!(
            "engram bench: {mode}, B={b} L={l} {:?} {:?} path, {threads} threads, {} runs",
            dtype, path, a.runs
        );
        println!("  median {:.4} s  ->  {:.0} tokens/s", med, tps);
        println!(
            "  projection ({}): {:.1}% of the FMA peak ({:.1} GFLOP/s before, {:.1} after the runs)",
            proj.kernel_name(),
            100.0 * fma_share,
            peak_before,
            peak_after
        );
        if let (Some(share), Some(b0), Some(b1)) = (l1_share, l1_before, l1_after) {
            println!(
                "  {:.1}% of the microkernel's own limit with its operands in L1 ({b0:.1} GFLOP/s before, {b1:.1} after)",
                100.0 * share
            );
        }
        if a.decode {
            let step = med / l as f64;
            println!("  decode step latency {:.3} ms (batch {b})", step * 1e3);
            if let Some((bytes, rate, from, fl)) = floor {
                println!(
                    "  floor {:.3} ms ({from}; {:.1} MB of projection weights, read bandwidth {:.1} GB/s); the step takes {:.2}x the floor",
                    fl * 1e3,
                    bytes as f64 / 1e6,
                    rate / 1e9,
                    step / fl
                );
            }
        }
        if let Some(st) = &store {
            println!(
                "  row store ({}{}): hit rate {:.1}%, {:.0} rows read/s, mean {:.1} reads in flight",
                st["table_io"].as_str().unwrap_or("?"),
                st["table_cache_policy"]
                    .as_str()
                    .map(|p| format!(", {p} cache"))
                    .unwrap_or_default(),
                100.0 * st["hit_rate"].as_f64().unwrap_or(0.0),
                st["rows_read_per_s"].as_f64().unwrap_or(0.0),
                st["io_depth_mean"].as_f64().unwrap_or(0.0),
            );
        }
        if path == ForwardPath::Fused {
            println!("  thread-seconds per run by stage:");
            for (n, s) in profile::STAGE_NAMES.iter().zip(stages) {
                println!("    {n:<12} {:.4}", s / a.runs as f64);
            }
        }
        println!(
            "  peak RSS {:.1} MB{}",
            rss as f64 / 1e6,
            if rss_with_buffer {
                " (with the bandwidth measurement's buffer)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A bench buffer of f32: on cache lines, or (`--vec-buffers`) a plain `Vec`.
enum Buf {
    Lines(LineAligned<f32>),
    Vec(Vec<f32>),
}

impl Buf {
    /// `v`'s values (moved, or copied onto cache lines and dropped).
    fn from_vec(plain: bool, v: Vec<f32>) -> Buf {
        if plain {
            Buf::Vec(v)
        } else {
            Buf::Lines(LineAligned::from_slice(&v))
        }
    }

    fn zeros(plain: bool, n: usize) -> Buf {
        if plain {
            Buf::Vec(vec![0.0; n])
        } else {
            Buf::Lines(LineAligned::new(n, 0.0))
        }
    }

    fn as_slice(&self) -> &[f32] {
        match self {
            Buf::Lines(b) => b.as_slice(),
            Buf::Vec(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            Buf::Lines(b) => b.as_mut_slice(),
            Buf::Vec(v) => v,
        }
    }
}

/// `--gather-only`: the run's rows through the layer's row store, nothing else.
fn bench_gather(
    a: &BenchArgs,
    e: &Engram,
    m: &NgramHashMapping,
    layer_id: u64,
    ids: &[i64],
    table: &engram::rows::TableOptions,
) -> Result<ExitCode> {
    let Some(store) = e.weights().table.store() else {
        bail!("--gather-only: expected a row store (--table-store, --table-io direct or --table-cache), found the table in memory");
    };
    let (b, l) = (a.batch, a.tokens);
    let offsets = m.layer(layer_id)?.offsets();
    let h = m.num_heads();
    let mut rows: Vec<usize> = Vec::with_capacity(b * l * h);
    for s in 0..b {
        let hashes = m.hash(layer_id, &ids[s * l..(s + 1) * l], l)?;
        rows.extend(hashes.chunks_exact(h).flat_map(|hr| {
            hr.iter()
                .zip(&offsets)
                .map(|(&x, &o)| (x as u64 + o) as usize)
        }));
    }
    let dim = store.dim();
    // Gathered in pieces of at most 64 Ki rows (the output of one piece stays small).
    const PIECE: usize = 1 << 16;
    let mut out = vec![0f32; rows.len().min(PIECE) * dim];
    let gather_all = |out: &mut Vec<f32>| -> Result<()> {
        for piece in rows.chunks(PIECE) {
            store.gather(piece, &mut out[..piece.len() * dim])?;
        }
        Ok(())
    };
    gather_all(&mut out)?; // warm-up: connections, the slot map
    let before = e.weights().table.store_stats();
    let mut secs = Vec::new();
    for _ in 0..a.runs {
        if !a.warm {
            e.weights().table.clear_cache();
        }
        let t0 = Instant::now();
        gather_all(&mut out)?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    let st = before.zip(e.weights().table.store_stats()).map(|(a0, a1)| {
        crate::table::row_store_json(table, a.warm, &a1.since(&a0), secs.iter().sum())
    });
    let med = median(&mut secs);
    let rows_per_s = rows.len() as f64 / med;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "gather-only",
                "tokens": b * l,
                "rows": rows.len(),
                "runs": a.runs,
                "median_s": med,
                "rows_per_s": rows_per_s,
                "tokens_per_s": (b * l) as f64 / med,
                "row_store": st,
                "peak_rss_bytes": peak_rss(),
            })
        );
    } else {
        println!(
            "engram bench --gather-only: {} rows ({} tokens x {h} heads) through {:?}",
            rows.len(),
            b * l,
            store
        );
        println!(
            "  median of {} runs: {:.3} s = {:.0} rows/s ({:.0} tokens/s of rows, no compute)",
            a.runs,
            med,
            rows_per_s,
            (b * l) as f64 / med
        );
        if let Some(st) = st {
            println!(
                "  round trips/s {:.0}, rows fetched/s {:.0}, hit rate {:.1}%",
                st["reads_per_s"].as_f64().unwrap_or(0.0),
                st["rows_read_per_s"].as_f64().unwrap_or(0.0),
                100.0 * st["hit_rate"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Chunked prefill that streams: each chunk's ids and hidden states are generated when it is
/// run and its outputs dropped after, so memory is O(chunk) whatever the sequence length
/// (1M tokens of f32 inputs and outputs alone would need 32 GB).
fn bench_streaming(
    a: &BenchArgs,
    e: &Engram,
    n: usize,
    path: ForwardPath,
    dtype: DType,
) -> Result<ExitCode> {
    let cfg = e.config();
    let (b, l, c) = (a.batch, a.tokens, cfg.hc_mult * cfg.hidden_size);
    let n = n.min(l); // a chunk longer than the sequence is the whole sequence
    let v = e.hashing().compressed().num_raw() as u64;
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut next_id = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % v) as i64
    };
    let pb = crate::demo::progress((a.runs * b * l) as u64, "tokens");
    let mut g = TorchGenerator::manual_seed(1);
    let mut hidden = vec![0.0f32; n * c];
    profile::take();
    let mut secs = Vec::new();
    let mut gen_secs = 0.0;
    for _ in 0..a.runs {
        let mut run = 0.0;
        for _ in 0..b {
            let mut st = e.new_state();
            let mut t = 0;
            while t < l {
                let rows = n.min(l - t);
                let t0 = Instant::now();
                let ids: Vec<i64> = (0..rows).map(|_| next_id()).collect();
                g.normal_f32(&mut hidden[..rows * c], 0.0, 1.0);
                gen_secs += t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                let out = e.forward_chunk(&mut st, &ids, &hidden[..rows * c], path)?;
                run += t0.elapsed().as_secs_f64();
                drop(out);
                pb.inc(rows as u64);
                t += rows;
            }
        }
        secs.push(run);
    }
    pb.finish_and_clear();
    let stages = profile::take();
    let med = median(&mut secs);
    let tps = (b * l) as f64 / med;
    let rss = peak_rss().unwrap_or(0);
    if a.json {
        let st = stage_json(stages, a.runs);
        println!(
            "{}",
            serde_json::json!({
                "tokens_per_s": tps, "median_s": med, "tokens": l, "batch": b, "dtype": a.dtype, "path": a.path,
                "mode": "chunked", "chunk": n, "threads": rayon::current_num_threads(), "runs": a.runs,
                "peak_rss_bytes": rss, "stage_thread_s_per_run": st, "input_generation_s": gen_secs / a.runs as f64,
            })
        );
    } else {
        println!("engram bench: chunked prefill (chunks of {n}, inputs streamed), B={b} L={l} {dtype:?} {path:?} path, {} threads, {} runs", rayon::current_num_threads(), a.runs);
        println!("  median {med:.3} s (layer only; input generation {:.3} s per run excluded)  ->  {tps:.0} tokens/s", gen_secs / a.runs as f64);
        println!("  peak RSS {:.1} MB", rss as f64 / 1e6);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{dram_buffer_bytes, step_floor, MemBw};

    #[test]
    fn the_floor_reads_the_weights_at_the_rate_of_their_own_size() {
        // The Emerald Rapids guest: half its reported 260 MiB L3 reads at memory speed,
        // while a buffer of the 21 MB of weights reads at 55 GB/s.
        let mut bw = MemBw {
            dram: 30e9,
            llc: 31e9,
            llc_bytes: 260 << 20,
            working_set: Some((21_000_000, 55e9)),
        };
        let (bytes, rate, from, s) = step_floor(21_000_000, &bw, 1e-6);
        assert_eq!((bytes, rate), (21_000_000, 55e9));
        assert!(from.contains("read warm"), "{from}");
        assert!((s - 21e6 / 55e9).abs() < 1e-12, "{s}");
        // Weights past the cache (no working-set measurement): memory.
        bw.working_set = None;
        let (_, rate, from, s) = step_floor(21_000_000, &bw, 1e-6);
        assert_eq!(rate, 30e9);
        assert!(from.contains("memory"), "{from}");
        assert!((s - 21e6 / 30e9).abs() < 1e-12, "{s}");
        // A large batch: the FLOPs at the FMA peak take longer.
        let (_, _, from, s) = step_floor(21_000_000, &bw, 0.01);
        assert!(from.contains("FLOPs"), "{from}");
        assert_eq!(s, 0.01);
    }

    #[test]
    fn the_bandwidth_buffer_is_capped_by_size_and_by_free_memory() {
        const MIB: usize = 1 << 20;
        let plenty = u64::MAX;
        // A 32 MiB L3: the 1 GiB floor; the Emerald Rapids guest's 260 MiB: 8 × it, where
        // 64 × it (16.25 GiB) used to be allocated on a 23 GB machine.
        assert_eq!(dram_buffer_bytes(32 * MIB, plenty), 1024 * MIB);
        assert_eq!(dram_buffer_bytes(260 * MIB, 23_000_000_000), 2080 * MIB);
        // Never past 4 GiB, nor past a quarter of the free memory.
        assert_eq!(dram_buffer_bytes(1024 * MIB, plenty), 4096 * MIB);
        assert_eq!(dram_buffer_bytes(260 * MIB, 2_000_000_000), 500_000_000);
        assert_eq!(dram_buffer_bytes(usize::MAX, 0), 0);
    }
}
