//! `--device cuda`: the CUDA backend behind the CLI's commands (a thin front: the work is in
//! the `engram-cuda` crate).

use anyhow::{bail, Context, Result};
use engram::{DType, Engram, EngramConfig, EngramState, Stages};
use engram_cuda::{median, ConvKernel, CudaEngram, Gpu};
use std::process::ExitCode;
use std::sync::Arc;

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU engine.
    #[default]
    Cpu,
    /// The CUDA backend (NVRTC kernels + cuBLAS) on GPU 0.
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            _ => bail!("expected cpu or cuda, found {s:?}"),
        }
    }
}

/// Opens GPU 0 (probing the libraries first): one error line where there is none.
pub fn open() -> Result<Arc<Gpu>> {
    Gpu::open().map_err(|e| anyhow::anyhow!("--device cuda: {e}"))
}

/// `engram cuda-kernels`: compile every kernel with NVRTC (no GPU needed) and print one
/// line per kernel.
#[derive(clap::Args)]
pub struct KernelArgs {
    /// Target architecture (sm_90 = Hopper; sm_80 = Ampere).
    #[arg(long, default_value = "sm_90")]
    arch: String,
}

pub fn kernels(a: KernelArgs) -> Result<ExitCode> {
    // Compiling first names a malformed --arch before NVRTC is looked for.
    let c = engram_cuda::kernels::compile(&a.arch).context("--arch")?;
    let (maj, min) = engram_cuda::kernels::nvrtc_version()?;
    println!(
        "NVRTC {maj}.{min}: engram.cu -> {} CUBIN, {} bytes",
        c.arch,
        c.cubin.len()
    );
    for r in &c.reports {
        println!(
            "  {:<22} {:>3} registers  {:>4} B stack  {:>4} B spills",
            r.name, r.registers, r.stack_bytes, r.spill_bytes
        );
    }
    let missing: Vec<&str> = engram_cuda::kernels::KERNELS
        .iter()
        .copied()
        .filter(|k| !c.reports.iter().any(|r| r.name == *k))
        .collect();
    if !missing.is_empty() {
        bail!("ptxas reported no resources for {missing:?}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `engram forward --device cuda`: `[B, L]` sequences from `states`, in chunks of `chunk`
/// tokens (all sequences at once per chunk), states updated.
#[allow(clippy::too_many_arguments)] // the forward command's parts, passed through
pub fn forward(
    e: &Engram,
    dtype: DType,
    states: &mut [EngramState],
    ids: &[i64],
    hidden: &[f32],
    (b, l): (usize, usize),
    chunk: Option<usize>,
    all_stages: bool,
) -> Result<Stages> {
    let cfg = e.config();
    let c = cfg.hc_mult * cfg.hidden_size;
    let cuda = CudaEngram::new(open()?, e, dtype)?;
    let mut dev = cuda.upload_states(states)?;
    let n = chunk.unwrap_or(l).max(1);
    let mut parts: Vec<Stages> = Vec::new();
    for start in (0..l).step_by(n) {
        let len = n.min(l - start);
        let mut cid = Vec::with_capacity(b * len);
        let mut chid = Vec::with_capacity(b * len * c);
        for s in 0..b {
            cid.extend_from_slice(&ids[s * l + start..s * l + start + len]);
            chid.extend_from_slice(&hidden[(s * l + start) * c..(s * l + start + len) * c]);
        }
        parts.push(cuda.forward_chunk(&mut dev, &cid, &chid, len, true)?);
    }
    states.clone_from_slice(&cuda.download_states(&dev)?);
    // Reassemble [B, L, ...] from the chunks' [B, len, ...].
    let mut out = Stages {
        batch: b,
        len: l,
        ..Default::default()
    };
    let widths = |p: &Stages| -> Vec<usize> {
        let t = p.batch * p.len;
        [p.hash_ids.len() / t, p.gates.len() / t, p.output.len() / t].to_vec()
    };
    let mut hash = Vec::new();
    let mut floats: Vec<Vec<f32>> = vec![Vec::new(); 8];
    for s in 0..b {
        for p in &parts {
            let w = widths(p);
            let len = p.len;
            hash.extend_from_slice(&p.hash_ids[s * len * w[0]..(s + 1) * len * w[0]]);
            let fields = [
                Some(&p.gates),
                Some(&p.output),
                p.embeddings.as_ref(),
                p.value.as_ref(),
                p.keys.as_ref(),
                p.gated_value.as_ref(),
                p.short_conv.as_ref(),
            ];
            for (k, f) in fields.iter().enumerate() {
                if let Some(v) = f {
                    let per = v.len() / (p.batch * len);
                    floats[k].extend_from_slice(&v[s * len * per..(s + 1) * len * per]);
                }
            }
        }
    }
    out.hash_ids = hash;
    let mut it = floats.into_iter();
    out.gates = it.next().unwrap_or_default();
    out.output = it.next().unwrap_or_default();
    let mut opt = |keep: bool| it.next().filter(|v| keep && !v.is_empty());
    out.embeddings = opt(all_stages);
    out.value = opt(all_stages);
    out.keys = opt(all_stages);
    out.gated_value = opt(all_stages);
    out.short_conv = opt(all_stages);
    Ok(out)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d > m || d.is_nan() { d } else { m })
}

/// `engram demo --device cuda`: the GPU's stages against the CPU reference path's.
pub fn demo_compare(
    e: &Engram,
    cfg: &EngramConfig,
    dtype: DType,
    ids: &[i64],
    hidden: &[f32],
    reference: &Stages,
) -> Result<ExitCode> {
    let gpu = open()?;
    println!(
        "\n[GPU] {} ({}, {} SMs, {:.0} GiB)",
        gpu.info.name,
        gpu.info.arch,
        gpu.info.multiprocessors,
        gpu.info.memory_bytes as f64 / (1u64 << 30) as f64
    );
    let cuda = CudaEngram::new(gpu, e, dtype)?;
    let l = ids.len();
    let s = cuda.forward(ids, hidden, 1, l, true)?;
    let tol: f32 = if dtype == DType::Bf16 { 0.05 } else { 1e-4 };
    println!("    stage-by-stage, CUDA {dtype:?} vs the CPU reference path (atol {tol:e}):");
    let hash_same = s.hash_ids == reference.hash_ids;
    println!(
        "    {:<12} {}",
        "hash_ids",
        if hash_same { "identical" } else { "DIFFERENT" }
    );
    let mut worst = 0f32;
    let mut rows: Vec<(&str, &[f32], &[f32])> = Vec::new();
    for (name, _, got) in s.float_stages(cfg) {
        if let Some((_, _, want)) = reference
            .float_stages(cfg)
            .into_iter()
            .find(|(n, _, _)| *n == name)
        {
            rows.push((name, got, want));
        }
    }
    for (name, got, want) in rows {
        let err = max_abs(got, want);
        worst = if err > worst || err.is_nan() {
            err
        } else {
            worst
        };
        println!(
            "    {name:<12} max |err| {err:.3e}  {}",
            if err <= tol { "ok" } else { "FAIL" }
        );
    }
    let pass = hash_same && worst <= tol;
    println!(
        "\n{} (CUDA {dtype:?} vs CPU reference, atol {tol:e}; max |err| {worst:.3e})",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One GPU benchmark configuration.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Decode (B sequences, one token per step) or prefill (B × L tokens per call).
    pub decode: bool,
    /// B.
    pub batch: usize,
    /// L (prefill) or steps per timed run (decode).
    pub tokens: usize,
}

/// `engram bench --device cuda`: device-resident inputs, CUDA-event medians, and the
/// floors measured in the same process (copy bandwidth; the projection GEMM alone).
pub fn bench(e: &Engram, dtype: DType, shapes: &[Shape], runs: usize, json: bool) -> Result<()> {
    let gpu = open()?;
    let mut cuda = CudaEngram::new(gpu.clone(), e, dtype)?;
    let cfg = e.config();
    let (hc, d, h, rd) = (
        cfg.hc_mult,
        cfg.hidden_size,
        cfg.num_heads(),
        cfg.head_dim(),
    );
    let elem = if dtype == DType::Bf16 { 2 } else { 4 };
    // Device-to-device copy of 2 GiB: bytes read + written per second.
    let bw = cuda.copy_bandwidth(2 << 30, 10)?;
    for sh in shapes {
        let (b, l) = (sh.batch, sh.tokens);
        let row = if sh.decode {
            let mut ws = cuda.workspace(b, 1, false)?;
            cuda.fill_random(&mut ws, 7)?;
            let mut st = cuda.new_state(b)?;
            let launches = cuda.time_ms(3, runs, || {
                for _ in 0..l {
                    cuda.enqueue(&mut ws, &mut st)?;
                }
                Ok(())
            })?;
            let graph = cuda.capture(&mut ws, &mut st)?;
            let replays = replay(&cuda, &graph, l, runs)?;
            let step_ms = median(&replays) / l as f64;
            let plain_ms = median(&launches) / l as f64;
            drop(graph);
            // Where a step's time goes (plain launches, events between the stages).
            let mut per_stage: Vec<[f64; 5]> = Vec::new();
            for _ in 0..runs.min(20) {
                per_stage.push(cuda.enqueue_profiled(&mut ws, &mut st)?);
            }
            let stage_us: Vec<f64> = (0..5)
                .map(|k| 1e3 * median(&per_stage.iter().map(|r| r[k]).collect::<Vec<_>>()))
                .collect();
            // The same step with the coalesced conv kernel, replayed from its own graph.
            cuda.set_conv_kernel(ConvKernel::Rows);
            let graph = cuda.capture(&mut ws, &mut st)?;
            let rows = replay(&cuda, &graph, l, runs)?;
            drop(graph);
            cuda.set_conv_kernel(ConvKernel::Strided);
            let rows_step_ms = median(&rows) / l as f64;
            // Floor: every projection weight read once from HBM, plus the step's rows.
            let bytes = cuda.weight_bytes() + b * (8 + 2 * hc * d * elem + h * rd * elem);
            let floor_ms = bytes as f64 / bw * 1e3;
            serde_json::json!({
                "device": gpu.info.name, "mode": "decode", "dtype": format!("{dtype:?}").to_lowercase(),
                "batch": b, "steps": l, "runs": runs,
                "step_us_graph": step_ms * 1e3, "step_us_launches": plain_ms * 1e3,
                "tokens_per_s": b as f64 / (step_ms * 1e-3),
                "floor_us": floor_ms * 1e3, "step_over_floor": step_ms / floor_ms,
                "copy_bandwidth_gb_s": bw / 1e9, "weight_bytes": cuda.weight_bytes(),
                "stage_us": {"hash_gather": stage_us[0], "projection": stage_us[1], "gate": stage_us[2],
                             "conv_out": stage_us[3], "advance_state": stage_us[4]},
                "step_us_graph_conv_rows": rows_step_ms * 1e3,
            })
        } else {
            let mut ws = cuda.workspace(b, l, false)?;
            cuda.fill_random(&mut ws, 7)?;
            let mut st = cuda.new_state(b)?;
            let ms = cuda.time_ms(2, runs, || cuda.enqueue(&mut ws, &mut st))?;
            let plain_out = cuda.read_output(&ws)?;
            let gemm = cuda.gemm_ms(&ws, runs)?;
            let (med, gmed) = (median(&ms), median(&gemm));
            // Where the time goes: events between the stages (median per stage).
            let mut per_stage: Vec<[f64; 5]> = Vec::new();
            for _ in 0..runs.min(10) {
                per_stage.push(cuda.enqueue_profiled(&mut ws, &mut st)?);
            }
            let stage_ms: Vec<f64> = (0..5)
                .map(|k| median(&per_stage.iter().map(|r| r[k]).collect::<Vec<_>>()))
                .collect();
            // The coalesced conv kernel (not yet the default): same run, its time and how far
            // its output is from the default's (0 when bit-identical, as designed).
            cuda.set_conv_kernel(ConvKernel::Rows);
            let mut st3 = cuda.new_state(b)?;
            let rows_ms = cuda.time_ms(2, runs, || cuda.enqueue(&mut ws, &mut st3))?;
            let rows_err = max_abs(&cuda.read_output(&ws)?, &plain_out);
            let mut rows_stage: Vec<f64> = Vec::new();
            for _ in 0..runs.min(10) {
                rows_stage.push(cuda.enqueue_profiled(&mut ws, &mut st3)?[3]);
            }
            cuda.set_conv_kernel(ConvKernel::Strided);
            // The GEMM of one piece overlapping the gates + conv of the previous one.
            let chunks = 4;
            let mut st2 = cuda.new_state(b)?;
            let piped = cuda.time_ms(2, runs, || {
                cuda.enqueue_pipelined(&mut ws, &mut st2, chunks)
            })?;
            let piped_out = cuda.read_output(&ws)?;
            let piped_err = max_abs(&piped_out, &plain_out);
            let t = b * l;
            let flops = cuda.projection_flops(t);
            let bytes = t * (8 + 2 * hc * d * elem + h * rd * elem) + cuda.weight_bytes();
            let mem_ms = bytes as f64 / bw * 1e3;
            let (free, total) = gpu.context().mem_get_info().unwrap_or((0, 0));
            serde_json::json!({
                "device": gpu.info.name, "mode": "prefill", "dtype": format!("{dtype:?}").to_lowercase(),
                "batch": b, "tokens": l, "runs": runs,
                "median_ms": med, "tokens_per_s": t as f64 / (med * 1e-3),
                "gemm_ms": gmed, "gemm_tflops": flops / (gmed * 1e-3) / 1e12,
                "layer_tflops": flops / (med * 1e-3) / 1e12,
                "non_gemm_ms": med - gmed,
                "memory_floor_ms": mem_ms, "copy_bandwidth_gb_s": bw / 1e9,
                "floor_ms": mem_ms.max(gmed), "over_floor": med / mem_ms.max(gmed),
                "device_mem_used_bytes": total - free,
                "stage_ms": {"hash_gather": stage_ms[0], "projection": stage_ms[1], "gate": stage_ms[2],
                             "conv_out": stage_ms[3], "advance_state": stage_ms[4]},
                "pipelined_chunks": chunks, "pipelined_ms": median(&piped),
                "pipelined_tokens_per_s": t as f64 / (median(&piped) * 1e-3),
                "pipelined_vs_plain_max_abs": piped_err,
                "conv_rows_ms": median(&rows_ms),
                "conv_rows_tokens_per_s": t as f64 / (median(&rows_ms) * 1e-3),
                "conv_rows_stage_ms": median(&rows_stage),
                "conv_rows_vs_strided_max_abs": rows_err,
            })
        };
        if json {
            println!("{row}");
        } else {
            report(&row);
        }
    }
    Ok(())
}

/// Milliseconds of `runs` timed runs (after 3 warm-ups) of `steps` replays of `graph`.
fn replay(
    cuda: &CudaEngram,
    graph: &engram_cuda::CudaGraph,
    steps: usize,
    runs: usize,
) -> Result<Vec<f64>> {
    Ok(cuda.time_ms(3, runs, || {
        for _ in 0..steps {
            graph.launch().map_err(|e| engram_cuda::CudaError::Driver {
                what: "graph launch",
                detail: format!("{e:?}"),
            })?;
        }
        Ok(())
    })?)
}

fn report(r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    if r["mode"] == "decode" {
        println!(
            "cuda decode {} B={}: step {:.1} us (graph), {:.1} us (plain launches) -> {:.0} tokens/s; floor {:.1} us ({:.2}x)",
            r["dtype"].as_str().unwrap_or(""),
            r["batch"],
            f("step_us_graph"),
            f("step_us_launches"),
            f("tokens_per_s"),
            f("floor_us"),
            f("step_over_floor")
        );
    } else {
        println!(
            "cuda prefill {} B={} L={}: {:.3} ms -> {:.2} M tokens/s; GEMM alone {:.3} ms ({:.0} TFLOP/s); memory floor {:.3} ms at {:.0} GB/s; {:.2}x the floor",
            r["dtype"].as_str().unwrap_or(""),
            r["batch"],
            r["tokens"],
            f("median_ms"),
            f("tokens_per_s") / 1e6,
            f("gemm_ms"),
            f("gemm_tflops"),
            f("memory_floor_ms"),
            f("copy_bandwidth_gb_s"),
            f("over_floor")
        );
    }
}
