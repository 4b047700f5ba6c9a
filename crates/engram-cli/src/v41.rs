//! DeepSeek-V4.1 configs behind the CLI's commands: `forward`, `hash` and `hash-params` take a
//! V4.1 model config (recognised by `engram_layer_ids`) and a checkpoint.

use crate::guard::Files;
use anyhow::{bail, Context, Result};
use clap::Args;
use engram::tensors::{TensorFile, TensorWriter};
use engram::v41::hashing::layer_params;
use engram::v41::{Checkpoint, V41Config, V41Hashing, V41Layer, V41Path, V41State};
use engram::{CompressedTokenizer, Tokenizer};
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

static TOKENIZER: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records the global `--tokenizer` (once, from `main`).
pub fn set_tokenizer(p: Option<PathBuf>) {
    let _ = TOKENIZER.set(p);
}

/// The global `--tokenizer`, if given.
pub fn tokenizer_override() -> Option<&'static Path> {
    TOKENIZER.get().and_then(|p| p.as_deref())
}

/// The tokenizer for a V4.1 layer: `--tokenizer`, else the bundled DeepSeek-V3 one.
pub fn tokenizer() -> Result<Tokenizer> {
    Ok(match tokenizer_override() {
        Some(p) => Tokenizer::from_name_or_path(&p.to_string_lossy())?,
        None => Tokenizer::bundled()?,
    })
}

/// The config file `detect` read (one per run), for errors of its fields found later.
static CONFIG_PATH: OnceLock<PathBuf> = OnceLock::new();

/// The tokenizer's compression, checked against `cfg` (its canonical-id count must be
/// `engram_compressed_vocab_size`) with the config file named.
fn compression(cfg: &V41Config) -> Result<Arc<CompressedTokenizer>> {
    let c = Arc::new(CompressedTokenizer::build(&tokenizer()?)?);
    if let Some(&layer) = cfg.layer_ids.first() {
        V41Hashing::new(cfg, c.clone(), layer).with_context(|| match CONFIG_PATH.get() {
            Some(p) => format!("config {}", p.display()),
            None => "config".to_string(),
        })?;
    }
    Ok(c)
}

/// The V4.1 config at `path`, or None when the file is a demo-layer config.
pub fn detect(path: Option<&Path>) -> Result<Option<V41Config>> {
    let Some(p) = path else { return Ok(None) };
    let text = engram::files::read_limited_string(p, engram::files::MAX_CONFIG_BYTES, "config")?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // A V4.1 config that is not valid JSON (a number out of range, `1e999`): the
        // parser's words here, as the demo loader would stop at V4.1's first field instead.
        Err(e) if text.contains("\"engram_layer_ids\"") => {
            bail!("config {}: expected JSON, found {e}", p.display())
        }
        Err(_) => return Ok(None), // the demo loader names the JSON error
    };
    if !engram::v41::config::is_v41(&v) {
        return Ok(None);
    }
    if let Some(k) = engram::files::json_duplicate_key(text) {
        bail!(
            "config {}: field `{k}`: expected once, found twice (JSON would keep the last)",
            p.display()
        );
    }
    let cfg = V41Config::from_value(&v).with_context(|| format!("config {}", p.display()))?;
    // The row counts against the primes the config draws (milliseconds), here where the
    // error can name the file.
    layer_params(&cfg).with_context(|| format!("config {}", p.display()))?;
    let _ = CONFIG_PATH.set(p.to_path_buf());
    Ok(Some(cfg))
}

/// Whether the file is a DeepSeek-V4.1 model config, valid or not (for error messages).
pub fn looks_like_v41(p: &Path) -> bool {
    engram::files::read_limited_string(p, engram::files::MAX_CONFIG_BYTES, "config")
        .ok()
        .and_then(|text| {
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            serde_json::from_str::<serde_json::Value>(text).ok()
        })
        .is_some_and(|v| engram::v41::config::is_v41(&v))
}

/// Whether the file reads as a DeepSeek-V4.1 model config without its `engram_layer_ids`
/// (V4.1's own fields, `dim` or `engram_compressed_vocab_size`, and no demo-only ones): for
/// the demo loader's error.
pub fn lacks_layer_ids(p: &Path) -> bool {
    engram::files::read_limited_string(p, engram::files::MAX_CONFIG_BYTES, "config")
        .ok()
        .and_then(|text| {
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            serde_json::from_str::<serde_json::Value>(text).ok()
        })
        .is_some_and(|v| {
            // Fields only V4.1 configs have (either spelling); `dim` without the demo's
            // `hidden_size`.
            let v41_only = [
                "engram_compressed_vocab_size",
                "engram_num_embeddings",
                "engram_n_heads",
                "engram_head_dim",
                "engram_max_ngram_size",
            ];
            !engram::v41::config::is_v41(&v)
                && (v41_only.iter().any(|k| v.get(k).is_some())
                    || (v.get("dim").is_some() && v.get("hidden_size").is_none()))
        })
}

/// What `forward` gives a V4.1 run.
pub struct Forward<'a> {
    pub config_path: &'a Path,
    pub weights: &'a Path,
    pub inputs: Option<&'a Path>,
    pub text: Option<&'a str>,
    pub no_bos: bool,
    pub random_hidden: Option<u64>,
    pub out: &'a Path,
    pub path: &'a str,
    pub chunk: Option<usize>,
    pub state_in: Option<&'a Path>,
    pub state_out: Option<&'a Path>,
    pub all_stages: bool,
    pub layer: Option<u64>,
    pub table: engram::v41::TableOptions,
    pub dtype: &'a str,
    /// `--dtype` was typed (as the V4.1 bench does, refused even as its default).
    pub dtype_typed: bool,
}

fn pick_layer(cfg: &V41Config, layer: Option<u64>) -> Result<u64> {
    match layer {
        Some(l) => {
            cfg.layer_index(l)?;
            Ok(l)
        }
        None => bail!(
            "--layer: a V4.1 config carries several Engram layers {:?}; say which one to run",
            cfg.layer_ids
        ),
    }
}

/// `token_mask` (u8 or bool, 1 = text; the shape of `input_ids`) from an inputs file.
pub(crate) fn read_mask(f: &TensorFile, ids_shape: &[usize]) -> Result<Option<Vec<bool>>> {
    if !f.contains("token_mask") {
        return Ok(None);
    }
    let raw = f.raw("token_mask")?;
    if !matches!(raw.dtype, Dtype::U8 | Dtype::BOOL) {
        bail!(
            "tensor `token_mask` in {}: expected dtype u8 or bool, found {:?}",
            f.path().display(),
            raw.dtype
        );
    }
    if raw.shape != ids_shape {
        bail!(
            "tensor `token_mask` in {}: expected shape {ids_shape:?} (that of input_ids), found {:?}",
            f.path().display(),
            raw.shape
        );
    }
    if let Some(i) = raw.data().iter().position(|&m| m > 1) {
        bail!(
            "tensor `token_mask` in {}: expected 0 or 1 (1 = text), found {} at flat index {i}",
            f.path().display(),
            raw.data()[i]
        );
    }
    Ok(Some(raw.data().iter().map(|&m| m != 0).collect()))
}

/// `engram forward` on a V4.1 config.
pub fn forward(a: Forward<'_>, cfg: V41Config) -> Result<ExitCode> {
    let layer_id = pick_layer(&cfg, a.layer)?;
    let path = match a.path {
        "fused" => V41Path::Fused,
        "reference" => V41Path::Reference,
        o => bail!("--path: expected fused or reference, found {o:?}"),
    };
    if a.dtype != "f32" || a.dtype_typed {
        bail!(
            "--dtype {}: a DeepSeek-V4.1 layer keeps its fp8 weights; its output takes the dtype of hidden_states",
            a.dtype
        );
    }
    Files::new()
        .input("--config", Some(a.config_path))
        .checkpoint("--weights", a.weights)
        .input("--inputs", a.inputs)
        .input("--state-in", a.state_in)
        .tokenizer(tokenizer_override())
        .output("--out", Some(a.out))
        .output("--state-out", a.state_out)
        .check()?;
    let t0 = std::time::Instant::now();
    let ck = Checkpoint::open(a.weights)
        .with_context(|| format!("--weights {}", a.weights.display()))?;
    let layer = V41Layer::load_with(&cfg, compression(&cfg)?, &ck, layer_id, a.table.clone())?;
    let load = t0.elapsed();
    let w = cfg.hc_mult * cfg.dim;
    let inputs = crate::commands::open_inputs(a.inputs)?;
    // ids, hidden (and its dtype), mask, offsets, [B, L] when not ragged.
    let (ids, hidden, bf16, mask, offsets, shape) = match (&inputs, a.text) {
        (Some(_), Some(_)) => {
            bail!("--text conflicts with --inputs: both give the input ids; give one of them")
        }
        (None, Some(text)) => {
            let ids = tokenizer()?.encode(text, !a.no_bos)?;
            if ids.is_empty() {
                bail!("--text: the text tokenizes to no ids; give a non-empty text");
            }
            let Some(seed) = a.random_hidden else {
                bail!("--text needs --random-hidden SEED (there is no hidden_states tensor)");
            };
            let l = ids.len();
            let h = engram::rng::torch::TorchGenerator::manual_seed(seed).randn(l * w);
            (ids, h, false, None, vec![0, l], Some((1, l)))
        }
        (Some(f), None) => {
            if a.random_hidden.is_some() {
                bail!(
                    "--random-hidden: a DeepSeek-V4.1 layer reads tensor `hidden_states` from --inputs {}; expected no --random-hidden with it",
                    f.path().display()
                );
            }
            let (_, shape) = f.info("input_ids")?;
            let ragged = f.contains("offsets");
            // Every shape is checked, and the run's memory planned, before any tensor is
            // read: a header may declare far more than the file's author meant.
            let (dt, hshape) = f.info("hidden_states")?;
            let mut want: Vec<usize> = shape.clone();
            want.extend([cfg.hc_mult, cfg.dim]);
            if hshape != want {
                bail!(
                    "tensor `hidden_states` in {}: expected shape {want:?} (input_ids' shape, then hc_mult and dim), found {hshape:?}",
                    f.path().display()
                );
            }
            let sequences = match (&shape[..], ragged) {
                ([_], true) => {
                    let (_, oshape) = f.info("offsets")?;
                    if oshape.len() != 1 || oshape[0] == 0 {
                        bail!(
                            "tensor `offsets` in {}: expected int64 [S+1], found shape {oshape:?}",
                            f.path().display()
                        );
                    }
                    oshape[0] - 1
                }
                ([b, _], false) => *b,
                _ => 0, // refused below, naming the shape
            };
            let tokens: usize = shape.iter().product();
            let wide = cfg.columns() * 8 + w * 8 + cfg.hc_mult * 4 + 17;
            let stages = if a.all_stages {
                (cfg.memory_width() + cfg.kv_width()) * 4 // kept in f32 until written
            } else {
                0
            };
            let mut plan = engram::budget::MemoryPlan::new();
            plan.add_dims(
                "the inputs and outputs (ids, hidden states, hash ids, gates, output)",
                &[tokens as u64, (wide + stages) as u64],
                1,
            )?;
            plan.add_dims(
                "the sequence states",
                &[sequences as u64, cfg.max_ngram_size as u64],
                8,
            )?;
            plan.check()?;
            let (_t, offsets, bl) = match (&shape[..], ragged) {
                ([t], true) => {
                    let off = f.i64("offsets", None)?.data;
                    if off.first() != Some(&0)
                        || off.last() != Some(&(*t as i64))
                        || off.windows(2).any(|p| p[0] > p[1])
                    {
                        bail!(
                            "tensor `offsets` in {}: expected non-decreasing int64 [S+1] from 0 to {t}, found {:?}",
                            f.path().display(),
                            &off[..off.len().min(12)]
                        );
                    }
                    (*t, off.iter().map(|&o| o as usize).collect(), None)
                }
                ([b, l], false) if *b >= 1 && *l >= 1 => {
                    (b * l, (0..=*b).map(|s| s * l).collect(), Some((*b, *l)))
                }
                _ => bail!(
                    "tensor `input_ids` in {}: expected [B, L] (or [T] with `offsets`), found {shape:?}",
                    f.path().display()
                ),
            };
            let ids = f.i64("input_ids", None)?.data;
            let bf16 = match dt {
                Dtype::BF16 => true,
                Dtype::F32 => false,
                d => bail!(
                    "tensor `hidden_states` in {}: expected bf16 or f32, found {d:?}",
                    f.path().display()
                ),
            };
            let hidden = f.f32("hidden_states", None)?.data;
            (ids, hidden, bf16, read_mask(f, &shape)?, offsets, bl)
        }
        (None, None) => bail!(
            "give --inputs (input_ids, hidden_states[, token_mask]) or --text with --random-hidden"
        ),
    };
    let nseq = offsets.len() - 1;
    let mut states: Vec<V41State> = match a.state_in {
        Some(p) => {
            let s = layer.load_states_for(p, nseq)?;
            if s.len() != nseq {
                bail!(
                    "--state-in {}: expected {nseq} states (one per sequence), found {}",
                    p.display(),
                    s.len()
                );
            }
            s
        }
        None => (0..nseq).map(|_| layer.new_state()).collect(),
    };
    let t1 = std::time::Instant::now();
    let keep = a.all_stages;
    let m = mask.as_deref();
    let mut s = match a.chunk {
        Some(0) => bail!("--chunk: expected a chunk length >= 1, found 0"),
        Some(n) => {
            layer.forward_chunked(&mut states, &ids, &hidden, m, &offsets, n, bf16, path, keep)?
        }
        None => layer.forward_ragged(&mut states, &ids, &hidden, m, &offsets, bf16, path, keep)?,
    };
    let run = t1.elapsed();
    let (b, l) = shape.unwrap_or((1, ids.len()));
    s.batch = b;
    s.len = l;
    let (cols, mw, kvw) = (cfg.columns(), cfg.memory_width(), cfg.kv_width());
    let mut wr = TensorWriter::new();
    wr.i64("hash_ids", &[b, l, cols], &s.hash_ids);
    wr.f32("gates", &[b, l, cfg.hc_mult], &s.gates);
    let oshape = [b, l, cfg.hc_mult, cfg.dim];
    if bf16 {
        wr.bf16("output", &oshape, &s.output);
    } else {
        wr.f32("output", &oshape, &s.output);
    }
    if let Some(e) = &s.embeddings {
        wr.bf16("embeddings", &[b, l, mw], e);
    }
    if let Some(k) = &s.kv {
        wr.bf16("kv", &[b, l, kvw], k);
    }
    wr.meta("engram_variant", "deepseek-v4.1");
    wr.meta("engram_layer", layer_id.to_string());
    // Both outputs are written before either replaces its file: a failure while writing
    // leaves both as they were.
    let out = wr.stage(a.out)?;
    let state_out = a
        .state_out
        .map(|p| layer.stage_states(p, &states))
        .transpose()?;
    out.commit()?;
    if let Some(st) = state_out {
        st.commit()?;
    }
    let st = layer.weights().table.stats();
    // A mapped or in-memory table (no Redis store, no direct I/O) is read without a count of
    // bytes.
    let counted = a.table.store.is_some() || a.table.io == engram::rows::TableIo::Direct;
    let bytes = if counted || st.misses == 0 {
        format!("{} bytes", st.bytes_read)
    } else {
        "bytes not counted: the table is mapped or in memory".into()
    };
    // A mapped or in-memory table without a cache counts no rows at all.
    let rows = if st.hits + st.misses == 0 {
        "rows not counted (the table is mapped or in memory)".to_string()
    } else {
        format!(
            "rows: {} from memory, {} read ({bytes})",
            st.hits, st.misses
        )
    };
    let table = match &a.table.store {
        Some(url) => format!("store {url}"),
        None => a.table.io.name().to_string(),
    };
    eprintln!(
        "forward V4.1 layer {layer_id} ({path:?}, table {table}{}): {nseq} sequence(s), {} tokens; load {:.2}s, run {:.3}s; {rows}; wrote {}",
        a.table.cache_bytes.map(|b| format!(" + {b}-byte cache")).unwrap_or_default(),
        ids.len(),
        load.as_secs_f64(),
        run.as_secs_f64(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `engram hash` on a V4.1 config: `layer{l}` int64 `[B, L, columns]` table row ids (offsets
/// added) for every layer; `token_mask` in the inputs marks dead tokens.
pub fn hash(
    cfg: V41Config,
    ids: &[i64],
    mask: Option<&[bool]>,
    b: usize,
    l: usize,
    out: &Path,
) -> Result<ExitCode> {
    let comp = compression(&cfg)?;
    let mut w = TensorWriter::new();
    let mut all = Vec::new();
    for &layer in &cfg.layer_ids {
        let h = V41Hashing::new(&cfg, comp.clone(), layer)?;
        let mut rows = Vec::with_capacity(ids.len() * h.columns());
        for s in 0..b {
            let seq = &ids[s * l..(s + 1) * l];
            let canon = h.canonical(seq, mask.map(|m| &m[s * l..(s + 1) * l]))?;
            let mut hist = vec![engram::v41::DEAD; h.history_len()];
            rows.extend(h.hash_chunk(&mut hist, &canon));
        }
        all.push((layer, h.columns(), rows));
    }
    for (layer, cols, rows) in &all {
        w.i64(&format!("layer{layer}"), &[b, l, *cols], rows);
    }
    w.meta("engram_variant", "deepseek-v4.1");
    w.write(out)?;
    eprintln!(
        "hashed B={b} L={l} for V4.1 layers {:?}; wrote {}",
        cfg.layer_ids,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `engram hash-params`.
#[derive(Args)]
pub struct HashParamsArgs {
    /// A DeepSeek-V4.1 model config (`engram_layer_ids`, `engram_compressed_vocab_size`, ...).
    #[arg(long)]
    config: PathBuf,
    /// Output: `layer{l}.primes` [N-1, heads], `layer{l}.offsets` [columns],
    /// `layer{l}.multipliers` [N], int64, for every layer.
    #[arg(long)]
    out: PathBuf,
}

/// Primes, offsets and multipliers of every layer, from the config alone (no tokenizer).
pub fn hash_params(a: HashParamsArgs) -> Result<ExitCode> {
    Files::new()
        .input("--config", Some(&a.config))
        .output("--out", Some(&a.out))
        .check()?;
    let Some(cfg) = detect(Some(&a.config))? else {
        // Not JSON at all: the parser's words, not "not a V4.1 config".
        let text = engram::files::read_limited_string(
            &a.config,
            engram::files::MAX_CONFIG_BYTES,
            "config",
        )?;
        if let Err(e) = serde_json::from_str::<serde_json::Value>(
            text.strip_prefix('\u{feff}').unwrap_or(&text),
        ) {
            bail!("config {}: expected JSON, found {e}", a.config.display());
        }
        bail!(
            "--config {}: expected a DeepSeek-V4.1 model config (with engram_layer_ids); a demo-layer config's parameters come from `engram hash`",
            a.config.display()
        );
    };
    let params = layer_params(&cfg)?;
    let mut w = TensorWriter::new();
    let primes: Vec<Vec<i64>> = params
        .iter()
        .map(|p| p.params.head_sizes().iter().map(|&x| x as i64).collect())
        .collect();
    for (p, pr) in params.iter().zip(&primes) {
        let l = p.params.layer_id;
        w.i64(
            &format!("layer{l}.primes"),
            &[cfg.max_ngram_size - 1, cfg.n_heads],
            pr,
        );
        w.i64(&format!("layer{l}.offsets"), &[cfg.columns()], &p.offsets);
        w.i64(
            &format!("layer{l}.multipliers"),
            &[cfg.max_ngram_size],
            &p.params.multipliers,
        );
    }
    w.write(&a.out)?;
    for p in &params {
        eprintln!(
            "layer {}: {} columns, {} table rows, multipliers {:?}",
            p.params.layer_id,
            cfg.columns(),
            p.table_rows(),
            p.params.multipliers
        );
    }
    eprintln!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// `engram bench` on a V4.1 config: random checkpoint-format weights at the config's width
/// (fp8 table and `wkv`, bf16 q/k weights), the table's rows reduced (prime bases of 50,000)
/// so that it fits in memory, the bundled tokenizer's compression; one sequence of `tokens`
/// tokens on the fused path, and the projection alone on the same rows.
/// What `engram bench` runs on a V4.1 config.
pub struct BenchV41<'a> {
    pub layer: Option<u64>,
    pub tokens: usize,
    pub runs: usize,
    pub json: bool,
    /// A checkpoint to read instead of random weights (the config then stays as given).
    pub weights: Option<&'a Path>,
    pub table: engram::rows::TableOptions,
    /// Ids from this text instead of random ones.
    pub text_file: Option<&'a Path>,
    /// Keep the row cache warm between runs.
    pub warm: bool,
}

pub fn bench(cfg: V41Config, a: BenchV41<'_>) -> Result<ExitCode> {
    use engram::v41::fp8::{requantize_block, BLOCK};
    let (layer, tokens, runs, json) = (a.layer, a.tokens, a.runs, a.json);
    if tokens == 0 || runs == 0 {
        bail!("--tokens and --runs must be >= 1 (found {tokens}, {runs})");
    }
    let layer_id = pick_layer(&cfg, layer)?;
    let comp = compression(&cfg)?;
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (c, layer, pack_s) = match a.weights {
        Some(w) => {
            // The ids, hidden states and outputs of --tokens tokens (the layer's own
            // weights are checked where they are loaded).
            let (hc, dim, mw, kvw) = (cfg.hc_mult, cfg.dim, cfg.memory_width(), cfg.kv_width());
            let mut plan = engram::budget::MemoryPlan::new();
            plan.add_dims(
                "activations",
                &[tokens as u64, (hc * dim * 3 + mw + kvw + 2) as u64],
                4,
            )?;
            plan.check()?;
            let ck = Checkpoint::open(w)?;
            eprintln!("loading layer {layer_id} of {} ...", w.display());
            let layer = V41Layer::load_with(&cfg, comp.clone(), &ck, layer_id, a.table.clone())?;
            let t0 = std::time::Instant::now();
            layer.projection();
            (cfg.clone(), layer, t0.elapsed().as_secs_f64())
        }
        None => random_layer(&cfg, layer_id, &comp, &mut rnd, tokens)?,
    };
    let rows = layer.weights().table.rows();
    let (hd, kvw, mw, hc, dim) = (c.head_dim, c.kv_width(), c.memory_width(), c.hc_mult, c.dim);
    let proj = layer.projection();
    let ids: Vec<i64> = match a.text_file {
        Some(p) => {
            let all =
                crate::commands::text_file_ids(&tokenizer()?, p, "--text-file", Some(tokens))?;
            if all.len() < tokens {
                bail!(
                    "--text-file {}: expected at least {tokens} tokens (--tokens), found {}",
                    p.display(),
                    all.len()
                );
            }
            all
        }
        None => (0..tokens)
            .map(|_| (rnd() % comp.num_raw() as u64) as i64)
            .collect(),
    };
    let hidden: Vec<f32> = (0..tokens * hc * dim)
        .map(|_| {
            half::bf16::from_f32(((rnd() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4).to_f32()
        })
        .collect();
    let off = [0, tokens];
    let run = || -> Result<()> {
        let mut st = [layer.new_state()];
        layer.forward_ragged(
            &mut st,
            &ids,
            &hidden,
            None,
            &off,
            true,
            V41Path::Fused,
            false,
        )?;
        Ok(())
    };
    run()?; // warm-up: page in rows, spin up threads
    let peak_before = crate::bench::peak_gflops(proj.kernel_name());
    let table = &layer.weights().table;
    let store_before = table.stats();
    let mut total = Vec::new();
    for _ in 0..runs {
        if !a.warm {
            table.clear();
        }
        let t = std::time::Instant::now();
        run()?;
        total.push(t.elapsed().as_secs_f64());
    }
    let st = table.stats().since(&store_before);
    let run_s: f64 = total.iter().sum();
    let store = crate::table::row_store_json(&a.table, a.warm, &st, run_s);
    // The projection alone on re-quantised rows of the same tokens (in tiles of 256, as the
    // layer runs it).
    let mut xs: Vec<f32> = (0..256.min(tokens) * mw)
        .map(|_| (rnd() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    for b in xs.chunks_mut(BLOCK) {
        requantize_block(b);
    }
    let mut y = vec![0f32; 256.min(tokens) * kvw];
    let mut projs = Vec::new();
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let mut left = tokens;
        while left > 0 {
            let r = left.min(256);
            proj.matmul(
                &xs[..r * mw],
                r,
                &mut y[..r * kvw],
                rayon::current_num_threads(),
            );
            left -= r;
        }
        projs.push(t.elapsed().as_secs_f64());
    }
    let peak_after = crate::bench::peak_gflops(proj.kernel_name());
    let (med, pmed) = (
        crate::bench::median(&mut total),
        crate::bench::median(&mut projs),
    );
    let flops_token = 2.0 * mw as f64 * kvw as f64;
    // The higher of the two: a peak measured while the machine was busy reads low.
    let peak = peak_before.max(peak_after);
    let share = flops_token * tokens as f64 / pmed / (peak * 1e9);
    let row = serde_json::json!({
        "variant": "deepseek-v4.1", "layer": layer_id, "tokens": tokens, "runs": runs,
        "dim": dim, "hc_mult": hc, "columns": c.columns(), "head_dim": hd, "table_rows": rows,
        "tokens_per_s": tokens as f64 / med, "median_s": med,
        "projection_s": pmed, "projection_share_of_time": pmed / med,
        "projection_mflop_per_token": flops_token / 1e6,
        "kernel": proj.kernel_name(), "weight_bytes": proj.weight_bytes(), "pack_s": pack_s,
        "fma_peak_gflops_before": peak_before, "fma_peak_gflops_after": peak_after,
        "projection_fma_peak_share": share,
        "threads": rayon::current_num_threads(),
        "row_store": store,
        "table_bytes": rows as u64 * (hd + hd / BLOCK) as u64,
    });
    if json {
        println!("{row}");
    } else {
        println!(
            "engram bench: DeepSeek-V4.1 layer {layer_id}, dim {dim}, {} columns x {hd}, {tokens} tokens, {runs} runs ({} threads)",
            c.columns(),
            rayon::current_num_threads()
        );
        println!("  median {med:.3} s -> {:.1} tokens/s", tokens as f64 / med);
        println!(
            "  projection ({}, {:.0} MFLOP/token): {pmed:.3} s = {:.0}% of the time, {:.1}% of the FMA peak ({peak_before:.1} GFLOP/s before, {peak_after:.1} after)",
            proj.kernel_name(),
            flops_token / 1e6,
            100.0 * pmed / med,
            100.0 * share
        );
        println!(
            "  the rest (hash, gather + dequantise + re-quantise, gates): {:.3} s",
            med - pmed
        );
        if a.table != engram::rows::TableOptions::default() {
            println!(
            "  table {rows} rows ({:.2} GB, {}): hit rate {:.1}%, {:.0} rows read/s, mean {:.1} reads in flight",
            (rows * (hd + hd / BLOCK)) as f64 / 1e9,
            store["table_io"].as_str().unwrap_or("?"),
            100.0 * st.hit_rate(),
            st.misses as f64 / run_s,
            st.io_depth_mean()
        );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Random checkpoint-format weights at the config's width (fp8 table and `wkv`, bf16 q/k
/// weights), the table's rows reduced (prime bases of 50,000) so that it fits in memory.
fn random_layer(
    cfg: &V41Config,
    layer_id: u64,
    comp: &Arc<CompressedTokenizer>,
    rnd: &mut impl FnMut() -> u64,
    tokens: usize,
) -> Result<(V41Config, V41Layer, f64)> {
    use engram::v41::fp8::BLOCK;
    let mut c = cfg.clone();
    c.vocab_size = c.vocab_size.min(50_000);
    c.compressed_vocab_size = comp.num_compressed() as u64;
    let bases = vec![c.vocab_size; c.max_ngram_size - 1];
    c.num_embeddings = engram::hashing::draw_layer_params(
        &c.layer_ids,
        &bases,
        c.n_heads,
        c.max_ngram_size,
        0,
        c.compressed_vocab_size,
    )
    .iter()
    .map(|p| p.table_rows())
    .collect();
    let rows = c.num_embeddings[c.layer_index(layer_id)?] as usize;
    let (hd, kvw, mw, hc, dim) = (c.head_dim, c.kv_width(), c.memory_width(), c.hc_mult, c.dim);
    let mut plan = engram::budget::MemoryPlan::new();
    plan.add_dims(
        "the random table",
        &[rows as u64, (hd + hd / BLOCK) as u64],
        2,
    )?;
    plan.add_dims("wkv (fp8 codes, bf16 panels)", &[kvw as u64, mw as u64], 4)?;
    plan.add_dims(
        "activations",
        &[tokens as u64, (hc * dim * 3 + mw + kvw) as u64],
        4,
    )?;
    plan.check()?;
    eprintln!("building random V4.1 weights: table {rows} x {hd} fp8, wkv {kvw} x {mw} fp8 ...");
    // e4m3 codes from a bell-ish spread (never the NaN codes), scales near 2^-4.
    let mut codes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                let r = rnd();
                let mag = ((r >> 8) % 0x58) as u8; // |value| up to 2^3
                mag | if r & 1 == 1 { 0x80 } else { 0 }
            })
            .collect()
    };
    let p = format!("layers.{layer_id}.engram");
    let t_codes = codes(rows * hd);
    let w_codes = codes(kvw * mw);
    let t_scale: Vec<u8> = (0..rows * hd / BLOCK)
        .map(|i| 118 + (i % 5) as u8)
        .collect();
    let w_scale: Vec<u8> = (0..kvw / BLOCK * mw / BLOCK)
        .map(|i| 116 + (i % 3) as u8)
        .collect();
    let qk: Vec<u8> = (0..hc * dim)
        .flat_map(|i| {
            half::bf16::from_f32(1.0 + ((i * 37 % 101) as f32 - 50.0) / 500.0).to_le_bytes()
        })
        .collect();
    use safetensors::tensor::TensorView;
    let views = vec![
        (
            format!("{p}.embed.weight"),
            TensorView::new(Dtype::F8_E4M3, vec![rows, hd], &t_codes)?,
        ),
        (
            format!("{p}.embed.scale"),
            TensorView::new(Dtype::F8_E8M0, vec![rows, hd / BLOCK], &t_scale)?,
        ),
        (
            format!("{p}.wkv.weight"),
            TensorView::new(Dtype::F8_E4M3, vec![kvw, mw], &w_codes)?,
        ),
        (
            format!("{p}.wkv.scale"),
            TensorView::new(Dtype::F8_E8M0, vec![kvw / BLOCK, mw / BLOCK], &w_scale)?,
        ),
        (
            format!("{p}.q_weight"),
            TensorView::new(Dtype::BF16, vec![hc, dim], &qk)?,
        ),
        (
            format!("{p}.k_weight"),
            TensorView::new(Dtype::BF16, vec![hc, dim], &qk)?,
        ),
    ];
    let bytes = safetensors::serialize(views, None)?;
    drop((t_codes, w_codes));
    let ck = Checkpoint::from_file(TensorFile::from_bytes("random V4.1 weights", bytes)?);
    let layer = V41Layer::load(&c, comp.clone(), &ck, layer_id)?;
    let t0 = std::time::Instant::now();
    layer.projection();
    Ok((c, layer, t0.elapsed().as_secs_f64()))
}
