//! `engram init` and `engram demo`: PyTorch-identical default weights, and the seed demo's
//! flow with a stage-by-stage comparison of the fused path against the reference path.

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::init::{demo_hidden_states, torch_default_weights_as};
use engram::layer::compression_for;
use engram::rng::torch::TorchGenerator;
use engram::{DType, Engram, EngramConfig, ForwardPath, NgramHashMapping, Tokenizer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// A progress bar on a terminal (stderr); hidden otherwise.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    bar(len, what)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
    } else {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_message(what.to_string());
    pb
}

/// Runs PyTorch's default initialisation with a progress bar.
pub fn init_with_bar(
    cfg: &EngramConfig,
    m: &NgramHashMapping,
    seed: u64,
    table: DType,
) -> Result<(engram::EngramWeights, TorchGenerator)> {
    let rows = m.layer(cfg.layer_id)?.table_rows();
    let pb = bar(rows * cfg.head_dim() as u64, "init");
    let r = torch_default_weights_as(cfg, m, seed, table, &mut |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    Ok(r)
}

/// Refuses a run with a table of `rows` held in RAM (`elem` bytes a value) and `tokens`
/// tokens when the machine lacks the memory.
pub fn check_layer_memory(
    cfg: &EngramConfig,
    rows: u64,
    elem: u64,
    tokens: u64,
    bf16_table_copy: bool,
) -> Result<()> {
    let plan = engram::budget::forward_plan(
        cfg,
        &engram::budget::RunShape {
            tokens,
            sequences: 1,
            all_stages: true,
            bf16_table_copy: false,
            table_rows: rows,
            threads: rayon::current_num_threads() as u64,
            table_in_ram: true,
            table_elem_bytes: elem,
        },
    )?;
    let mut plan = plan;
    if bf16_table_copy {
        plan.add_dims(
            "a bf16 copy of the table",
            &[rows, cfg.head_dim() as u64],
            2,
        )?;
    }
    plan.check()?;
    Ok(())
}

/// `engram init`.
#[derive(Args)]
pub struct InitArgs {
    /// Config JSON; the default config (layer 1) when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `torch.manual_seed` before the module is built.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output state-dict safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Float tensors written as f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn init(a: InitArgs) -> Result<ExitCode> {
    let cfg = crate::commands::load_config(&a.config)?;
    let dtype: DType = a.dtype.parse()?;
    crate::guard::Files::new()
        .config(a.config.as_deref(), &cfg.tokenizer_name_or_path)
        .output("--out", Some(&a.out))
        .check()?;
    let m = NgramHashMapping::new(&cfg, compression_for(&cfg)?)?;
    // The table is built in RAM, then streamed to the file: check both before starting.
    let rows = m.layer(cfg.layer_id)?.table_rows();
    let elem = if dtype == DType::Bf16 { 2 } else { 4 };
    check_layer_memory(&cfg, rows, elem, 0, false)?;
    engram::budget::check_disk(
        &a.out,
        engram::budget::weights_file_bytes(&cfg, rows, elem)?,
    )?;
    let t0 = Instant::now();
    let (w, _) = init_with_bar(&cfg, &m, a.seed, dtype)?;
    let t_init = t0.elapsed();
    let t0 = Instant::now();
    w.save(&a.out, &cfg, dtype == DType::Bf16)?;
    eprintln!(
        "initialised layer {} (table {} x {}) as torch.manual_seed({}) would in {:.2}s; wrote {} in {:.2}s",
        cfg.layer_id,
        w.table.rows(),
        w.table.dim(),
        a.seed,
        t_init.as_secs_f64(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `engram demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// The text.
    #[arg(
        long,
        default_value = "Only Alexander the Great could tame the horse Bucephalus."
    )]
    text: String,
    /// `torch.manual_seed` before the layer is built (and the hidden states drawn).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Which layer of layer_ids to build (default: the config's `layer_id`, 1 in the
    /// default config).
    #[arg(long)]
    layer: Option<u64>,
    /// Storage of the fused path: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Use these weights instead of the PyTorch-identical initialisation (the hidden states
    /// then come from a fresh `torch.manual_seed(seed)`).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Config JSON; the default config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// cpu: the fused CPU path against the reference; cuda: the GPU (NVRTC kernels +
    /// cuBLAS) against the reference, stage by stage.
    #[arg(long, default_value = "cpu")]
    device: crate::cuda::Device,
    /// Where the table's rows live. Without --weights, `--table-io direct` first writes the
    /// initialised weights to a temporary file (removed at once; the open file is read).
    #[command(flatten)]
    table: crate::table::TableArgs,
}

fn first(v: &[f32], n: usize) -> String {
    let items: Vec<String> = v.iter().take(n).map(|x| format!("{x:.4}")).collect();
    format!("[{}]", items.join(", "))
}

fn max_mean(a: &[f32], b: &[f32]) -> (f32, f64) {
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d > max || d.is_nan() {
            max = d;
        }
        sum += d as f64;
    }
    (max, sum / a.len().max(1) as f64)
}

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    let topts = a.table.options()?;
    // The generated weights' table is in no store: a store is read only for --weights.
    if let (Some(url), None) = (&topts.store, &a.weights) {
        bail!(
            "--table-store {}: the demo generates its weights in memory, so no store holds \
             their table; expected --weights W with it (the file whose table `engram table \
             push` wrote)",
            engram::rows::redis::shown_url(url)
        );
    }
    let mut cfg = crate::commands::load_config(&a.config)?;
    crate::commands::set_layer(&mut cfg, a.layer)?;
    cfg.validate()?;
    let dtype: DType = a.dtype.parse()?;
    let tol: f32 = if dtype == DType::Bf16 { 0.03 } else { 1e-4 };
    let cuda = a.device == crate::cuda::Device::Cuda;
    if cuda {
        // Fail now, before minutes of work, where there is no GPU.
        crate::cuda::open()?;
    }
    let mut times: Vec<(&str, f64)> = Vec::new();
    let rule = "=".repeat(72);
    println!(
        "{rule}\nEngram demo: the reference layer (plain loops) against the fused CPU path\n{rule}"
    );

    println!("\n[1] Tokenize");
    let t0 = Instant::now();
    let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let ids = tok.encode(&a.text, true)?;
    if ids.is_empty() {
        bail!("--text: the text tokenizes to no ids");
    }
    let l = ids.len();
    times.push(("tokenize", t0.elapsed().as_secs_f64()));
    println!("    text: {:?}", a.text);
    println!("    {} tokens (BOS first): {:?}", l, ids);

    let t0 = Instant::now();
    let comp = Arc::new(engram::CompressedTokenizer::build(&tok)?);
    let m = Arc::new(NgramHashMapping::new(&cfg, comp.clone())?);
    times.push(("compression + hash params", t0.elapsed().as_secs_f64()));
    println!(
        "    compressed vocabulary: {} -> {} ids",
        comp.num_raw(),
        comp.num_compressed()
    );

    let rows = m.layer(cfg.layer_id)?.table_rows();
    if a.weights.is_none() {
        // Two forward passes of L tokens with every stage, and the table in RAM.
        check_layer_memory(&cfg, rows, 4, 2 * l as u64, dtype == DType::Bf16)?;
    }

    println!("\n[2] Weights");
    let t0 = Instant::now();
    let (weights, mut g) = match &a.weights {
        None => {
            let (w, g) = init_with_bar(&cfg, &m, a.seed, DType::F32)?;
            println!(
                "    torch.manual_seed({}) defaults, reproduced bit for bit: table {} x {}",
                a.seed,
                w.table.rows(),
                w.table.dim()
            );
            (w, g)
        }
        Some(p) => {
            let layer = m.layer(cfg.layer_id)?;
            let offs: Vec<i64> = layer.offsets().iter().map(|&o| o as i64).collect();
            let w = engram::EngramWeights::load_with_table(
                p,
                &cfg,
                &offs,
                layer.table_rows() as usize,
                topts.clone(),
            )?;
            println!("    loaded {}", p.display());
            (w, TorchGenerator::manual_seed(a.seed))
        }
    };
    let weights = match (&a.weights, topts.io) {
        (Some(_), _) => weights,
        (None, engram::rows::TableIo::Direct) => {
            remove_dead_demo_dirs();
            // A fresh folder only this user can read (an existing one is an error, never reused).
            let dir = std::env::temp_dir().join(format!("engram-demo-{}", std::process::id()));
            let mut mk = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut mk, 0o700);
            mk.create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            let f = dir.join("weights.safetensors");
            let layer = m.layer(cfg.layer_id)?;
            let offs: Vec<i64> = layer.offsets().iter().map(|&o| o as i64).collect();
            let loaded = weights.save(&f, &cfg, false).and_then(|()| {
                engram::EngramWeights::load_with_table(
                    &f,
                    &cfg,
                    &offs,
                    layer.table_rows() as usize,
                    topts,
                )
            });
            // The store keeps the file open; its name is not needed any more.
            let _ = std::fs::remove_dir_all(&dir);
            println!("    table read with O_DIRECT from a temporary copy of the weights");
            loaded?
        }
        (None, _) if topts.cache_bytes.is_some() => {
            let mut w = weights;
            let t = std::sync::Arc::new(w.table.clone());
            w.table = engram::weights::EmbeddingTable::from_store(topts.cached(t)?);
            w
        }
        (None, _) => weights,
    };
    if let Some(s) = weights.table.store() {
        println!("    rows from {s:?}");
    }
    times.push(("weights", t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    let hidden = demo_hidden_states(&mut g, &cfg, l);
    times.push(("hidden states (randn)", t0.elapsed().as_secs_f64()));
    println!(
        "    hidden_states = torch.randn(1, {}, {}, {})[:, :{l}]",
        l.div_ceil(32) * 32,
        cfg.hc_mult,
        cfg.hidden_size
    );
    let e = Engram::new(cfg.clone(), m, weights)?.with_dtype(dtype);

    let t0 = Instant::now();
    let r = e.forward(&ids, &hidden, 1, l, ForwardPath::Reference)?;
    times.push(("reference forward", t0.elapsed().as_secs_f64()));
    if cuda {
        return crate::cuda::demo_compare(&e, &cfg, dtype, &ids, &hidden, &r);
    }
    e.fused_weights()?; // pack outside the timed run
    let t0 = Instant::now();
    let f = e.forward_detailed(&ids, &hidden, 1, l, ForwardPath::Fused)?;
    times.push(("fused forward", t0.elapsed().as_secs_f64()));

    let (h, hc, d, dm) = (
        cfg.num_heads(),
        cfg.hc_mult,
        cfg.hidden_size,
        cfg.memory_width(),
    );
    println!("\n[3] Hash + embed");
    println!(
        "    hash_ids [1, {l}, {h}]: position 0 heads {:?}",
        &r.hash_ids[..h.min(8)]
    );
    let hash_same = r.hash_ids == f.hash_ids;
    println!(
        "    fused hash_ids identical: {}",
        if hash_same { "yes" } else { "NO" }
    );
    let emb = r.embeddings.as_deref().unwrap();
    println!("    embeddings [1, {l}, {dm}]: {}", first(emb, 4));

    println!("\n[4] Key / value projection");
    println!(
        "    value [1, {l}, {d}]: {}",
        first(r.value.as_deref().unwrap(), 4)
    );
    println!(
        "    keys  [1, {l}, {hc}, {d}]: {}",
        first(r.keys.as_deref().unwrap(), 4)
    );

    println!("\n[5] Gating (reference vs fused)");
    let (gmax, _) = max_mean(&r.gates, &f.gates);
    println!(
        "    gates [1, {l}, {hc}]: position 0 {}",
        first(&r.gates, hc)
    );
    println!(
        "    max |err| {gmax:.3e}  allclose(atol={tol:e}): {}",
        gmax <= tol
    );
    let (gvmax, _) = max_mean(
        r.gated_value.as_deref().unwrap(),
        f.gated_value.as_deref().unwrap(),
    );
    println!("    gated_value max |err| {gvmax:.3e}");

    println!("\n[6] Short conv (reference vs fused)");
    let (scmax, scmean) = max_mean(
        r.short_conv.as_deref().unwrap(),
        f.short_conv.as_deref().unwrap(),
    );
    println!(
        "    short_conv max |err| {scmax:.3e}, mean {scmean:.3e}  allclose: {}",
        scmax <= tol
    );

    println!("\n[7] Output per branch (reference vs fused)");
    let mut worst = 0f32;
    for i in 0..hc {
        let pick = |v: &[f32]| -> Vec<f32> {
            (0..l)
                .flat_map(|t| v[(t * hc + i) * d..(t * hc + i + 1) * d].to_vec())
                .collect()
        };
        let (mx, mn) = max_mean(&pick(&r.output), &pick(&f.output));
        worst = worst.max(mx);
        println!("    branch {i}: max {mx:.3e}  mean {mn:.3e}");
    }
    println!(
        "\nconfig: layer {} | hidden {} | hc_mult {} | ngram 2..{} x {} heads | table {} rows x {} | dtype {:?}",
        cfg.layer_id,
        d,
        hc,
        cfg.max_ngram_size,
        cfg.n_head_per_ngram,
        e.weights().table.rows(),
        cfg.head_dim(),
        dtype
    );
    println!("output[0, 0, 0, :6] = {}", first(&f.output, 6));
    println!("\ntimes:");
    for (n, t) in &times {
        println!("    {n:<28} {:>9.3} s", t);
    }
    let pass = hash_same && worst <= tol && gmax <= tol && scmax <= tol;
    println!(
        "\n{} (fused vs reference, atol {tol:e}; max |err| {worst:.3e})",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Removes the `engram-demo-PID` folders of earlier `demo --table-io direct` runs whose
/// process is gone (killed outright before it removed its folder, with a copy of the
/// weights in it): those of this user, whose PID has no `/proc` entry (Linux).
fn remove_dead_demo_dirs() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        // SAFETY: geteuid takes nothing and cannot fail.
        let me = unsafe { libc::geteuid() };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("engram-demo-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let mine = e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
            let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            if mine && gone && pid != std::process::id() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
