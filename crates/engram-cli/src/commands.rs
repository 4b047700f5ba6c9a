//! The subcommands. Library errors carry their own context; here they only gain the
//! file or flag they came from.

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::layer::compression_for;
use engram::tensors::{TensorFile, TensorWriter};
use engram::{CompressedTokenizer, Engram, EngramConfig, ForwardPath, NgramHashMapping, Stages, Tokenizer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn load_config(path: &Option<PathBuf>) -> Result<EngramConfig> {
    match path {
        Some(p) => Ok(EngramConfig::from_json_file(p)?),
        None => Ok(EngramConfig::default()),
    }
}

/// Input ids `[B, L]` from `--text` or the inputs file.
fn read_ids(inputs: Option<&TensorFile>, text: &Option<String>, cfg: &EngramConfig, no_bos: bool) -> Result<(Vec<i64>, usize, usize)> {
    if let Some(t) = text {
        let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
        let ids = tok.encode(t, !no_bos)?;
        if ids.is_empty() {
            bail!("--text: the text tokenizes to no ids; give a non-empty text");
        }
        let l = ids.len();
        return Ok((ids, 1, l));
    }
    let f = inputs.context("give --inputs (with `input_ids`) or --text")?;
    let ids = f.i64("input_ids", None)?;
    if ids.shape.len() != 2 {
        bail!("tensor `input_ids` in {}: expected 2 dims [B, L], found shape {:?}", f.path().display(), ids.shape);
    }
    Ok((ids.data, ids.shape[0], ids.shape[1]))
}

/// `engram forward`.
#[derive(Args)]
pub struct ForwardArgs {
    /// Config JSON (reference field names); the default config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State-dict safetensors file.
    #[arg(long)]
    weights: PathBuf,
    /// Inputs: `input_ids` int64 [B, L] and `hidden_states` f32 [B, L, HC, D].
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Text to tokenize in place of `input_ids` (B = 1).
    #[arg(long)]
    text: Option<String>,
    /// Do not prepend BOS to --text.
    #[arg(long)]
    no_bos: bool,
    /// Output safetensors file: every stage the path keeps.
    #[arg(long)]
    out: PathBuf,
    /// Implementation of the float stages.
    #[arg(long, default_value = "reference")]
    path: String,
}

pub fn forward(a: ForwardArgs) -> Result<ExitCode> {
    let cfg = load_config(&a.config)?;
    let path: ForwardPath = a.path.parse()?;
    let inputs = a.inputs.as_ref().map(TensorFile::open).transpose()?;
    let (ids, b, l) = read_ids(inputs.as_ref(), &a.text, &cfg, a.no_bos)?;
    let f = inputs.as_ref().context("give --inputs with `hidden_states` [B, L, HC, D]")?;
    let hidden = f.f32("hidden_states", Some(&[b, l, cfg.hc_mult, cfg.hidden_size]))?;
    let t0 = Instant::now();
    let e = Engram::load(cfg.clone(), &a.weights)?;
    let load = t0.elapsed();
    let t0 = Instant::now();
    let s = e.forward(&ids, &hidden.data, b, l, path)?;
    let run = t0.elapsed();
    write_stages(&a.out, &cfg, &s)?;
    eprintln!(
        "forward ({path:?}): B={b} L={l}, load {:.2}s, run {:.3}s; wrote {}",
        load.as_secs_f64(),
        run.as_secs_f64(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn write_stages(out: &PathBuf, cfg: &EngramConfig, s: &Stages) -> Result<()> {
    let mut w = TensorWriter::new();
    w.i64("hash_ids", &[s.batch, s.len, cfg.num_heads()], &s.hash_ids);
    for (name, shape, data) in s.float_stages(cfg) {
        w.f32(name, &shape, data);
    }
    w.write(out)?;
    Ok(())
}

/// `engram hash`.
#[derive(Args)]
pub struct HashArgs {
    /// Config JSON; the default config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Inputs with `input_ids` int64 [B, L].
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Text to tokenize in place of `input_ids`.
    #[arg(long)]
    text: Option<String>,
    /// Do not prepend BOS to --text.
    #[arg(long)]
    no_bos: bool,
    /// Output: `layer{l}` int64 [B, L, H] for every l in layer_ids.
    #[arg(long)]
    out: PathBuf,
}

pub fn hash(a: HashArgs) -> Result<ExitCode> {
    let cfg = load_config(&a.config)?;
    let inputs = a.inputs.as_ref().map(TensorFile::open).transpose()?;
    let (ids, b, l) = read_ids(inputs.as_ref(), &a.text, &cfg, a.no_bos)?;
    let m = NgramHashMapping::new(&cfg, compression_for(&cfg)?)?;
    let mut w = TensorWriter::new();
    for layer in m.layers() {
        let h = m.hash(layer.layer_id, &ids, l)?;
        w.i64(&format!("layer{}", layer.layer_id), &[b, l, m.num_heads()], &h);
        w.meta(&format!("multipliers.layer{}", layer.layer_id), format!("{:?}", layer.multipliers));
        w.meta(&format!("primes.layer{}", layer.layer_id), format!("{:?}", layer.primes));
    }
    w.write(&a.out)?;
    eprintln!("hashed B={b} L={l} for layers {:?}; wrote {}", cfg.layer_ids, a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// `engram tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// The text.
    text: String,
    /// Config JSON naming the tokenizer; the bundled DeepSeek-V3 when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Do not prepend BOS.
    #[arg(long)]
    no_bos: bool,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<ExitCode> {
    let cfg = load_config(&a.config)?;
    let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let ids = tok.encode(&a.text, !a.no_bos)?;
    let comp = CompressedTokenizer::build(&tok)?;
    let canon = comp.compress(&ids, ids.len().max(1))?;
    if a.json {
        println!("{}", serde_json::json!({"input_ids": ids, "canonical_ids": canon}));
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} tokens (BOS {})", ids.len(), if a.no_bos || !tok.adds_bos() { "off" } else { "on" });
    println!("{:>4}  {:>7}  {:>9}  token", "pos", "id", "canonical");
    for (i, (&id, &c)) in ids.iter().zip(&canon).enumerate() {
        let t = tok.id_to_token(id as u32).unwrap_or_default();
        println!("{i:>4}  {id:>7}  {c:>9}  {t:?}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `engram compression`.
#[derive(Args)]
pub struct CompressionArgs {
    /// Config JSON naming the tokenizer; the bundled DeepSeek-V3 when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write `lookup` int64 [V] here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn compression(a: CompressionArgs) -> Result<ExitCode> {
    let cfg = load_config(&a.config)?;
    let t0 = Instant::now();
    let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let t_load = t0.elapsed();
    let t0 = Instant::now();
    let c = CompressedTokenizer::build(&tok)?;
    let t_build = t0.elapsed();
    let (v, vp) = (c.num_raw(), c.num_compressed());
    println!("tokenizer        {} ({} ids), loaded in {:.3}s", tok.name(), v, t_load.as_secs_f64());
    println!("canonical ids    {vp} ({:.2}% fewer)", 100.0 * (v - vp) as f64 / v as f64);
    println!("built in         {:.3}s on {} threads", t_build.as_secs_f64(), rayon::current_num_threads());
    println!("pad id {} -> {}", cfg.pad_id, c.compress_id(cfg.pad_id).map_or("out of range".into(), |x| x.to_string()));
    if let Some(out) = a.out {
        let mut w = TensorWriter::new();
        w.i64("lookup", &[v], c.lookup());
        w.meta("num_raw_tokens", v.to_string());
        w.meta("num_compressed_tokens", vp.to_string());
        w.write(&out)?;
        println!("wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `engram weights`.
#[derive(Args)]
pub struct WeightsArgs {
    /// The weights file.
    weights: PathBuf,
    /// Also check the file against this config (names, shapes, offsets).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn weights(a: WeightsArgs) -> Result<ExitCode> {
    let f = TensorFile::open(&a.weights)?;
    let mut total = 0usize;
    println!("{:<44} {:>6} shape", "tensor", "dtype");
    for n in f.names() {
        let (d, s) = f.info(&n)?;
        total += s.iter().product::<usize>() * d.bitsize() / 8;
        println!("{n:<44} {:>6} {s:?}", format!("{d:?}").to_lowercase());
    }
    println!("total {:.1} MB", total as f64 / 1e6);
    if let Some(c) = &a.config {
        let cfg = EngramConfig::from_json_file(c)?;
        let e = Engram::load(cfg, &a.weights)?;
        println!(
            "matches config (layer {}, table {} rows x {}, memory-mapped: {})",
            e.config().layer_id,
            e.weights().table.rows(),
            e.weights().table.dim(),
            e.weights().table.is_mapped()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `engram compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// First file (e.g. golden).
    a: PathBuf,
    /// Second file.
    b: PathBuf,
    /// Fail (exit 1) when a float tensor differs by more than this, or an int tensor at all.
    #[arg(long, default_value_t = 1e-4)]
    tol: f32,
    /// Prefix of the tensor names in the first file (e.g. `seed_text.`).
    #[arg(long, default_value = "")]
    prefix: String,
}

pub fn compare(a: CompareArgs) -> Result<ExitCode> {
    let fa = TensorFile::open(&a.a)?;
    let fb = TensorFile::open(&a.b)?;
    let mut ok = true;
    let mut n = 0;
    for name in fb.names() {
        let key = format!("{}{}", a.prefix, name);
        if !fa.contains(&key) {
            continue;
        }
        n += 1;
        let (da, sa) = fa.info(&key)?;
        let (_, sb) = fb.info(&name)?;
        if sa != sb {
            println!("{name:<14} shape {sa:?} vs {sb:?}  FAIL");
            ok = false;
            continue;
        }
        if matches!(da, safetensors::Dtype::I64 | safetensors::Dtype::I32) {
            let x = fa.i64(&key, None)?.data;
            let y = fb.i64(&name, None)?.data;
            let diff = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            println!("{name:<14} {sa:?} int: {diff} differing  {}", if diff == 0 { "ok" } else { "FAIL" });
            ok &= diff == 0;
        } else {
            let x = fa.f32(&key, None)?.data;
            let y = fb.f32(&name, None)?.data;
            let (mut max, mut sum) = (0f32, 0f64);
            for (p, q) in x.iter().zip(&y) {
                let d = (p - q).abs();
                max = if d.is_nan() || d > max { d } else { max };
                sum += d as f64;
            }
            let pass = max <= a.tol;
            println!("{name:<14} {sa:?} max {max:.3e} mean {:.3e}  {}", sum / x.len().max(1) as f64, if pass { "ok" } else { "FAIL" });
            ok &= pass;
        }
    }
    if n == 0 {
        bail!("no tensor of {} is in {} (prefix `{}`)", a.b.display(), a.a.display(), a.prefix);
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

