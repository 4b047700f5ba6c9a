//! The subcommands. Library errors carry their own context; here they only gain the
//! file or flag they came from.

use crate::guard::Files;
use anyhow::{bail, Context, Result};
use clap::Args;
use engram::budget::{forward_plan, RunShape};
use engram::layer::compression_for;
use engram::tensors::{TensorFile, TensorWriter};
use engram::{
    CompressedTokenizer, DType, Engram, EngramConfig, ForwardPath, NgramHashMapping, Stages,
    Tokenizer,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// The demo-layer config (default when omitted), with the global `--tokenizer` applied.
/// `--layer`, where given, picks the demo layer's `layer_id`: one of the config's
/// `layer_ids`, refused as the option otherwise (the config check would name `layer_id`).
pub fn set_layer(cfg: &mut EngramConfig, layer: Option<u64>) -> Result<()> {
    if let Some(l) = layer {
        if !cfg.layer_ids.contains(&l) {
            bail!(
                "--layer: expected one of the config's layer_ids {:?}, found {l}",
                cfg.layer_ids
            );
        }
        cfg.layer_id = l;
    }
    Ok(())
}

pub fn load_config(path: &Option<PathBuf>) -> Result<EngramConfig> {
    let mut cfg = match path {
        Some(p) => EngramConfig::from_json_file(p).map_err(|e| {
            // A V4.1 config here fails on its first unknown field (`dim`): say what it is.
            if crate::v41::looks_like_v41(p) {
                anyhow::anyhow!(
                    "config {}: expected a demo-layer config, found a DeepSeek-V4.1 config (those go to `forward`, `hash`, `bench`, `hash-params` and `table push`)",
                    p.display()
                )
            } else if crate::v41::lacks_layer_ids(p) {
                anyhow::anyhow!(
                    "{e} (a DeepSeek-V4.1 config is recognised by `engram_layer_ids`, which \
                     this one lacks)"
                )
            } else {
                anyhow::Error::from(e)
            }
        })?,
        None => EngramConfig::default(),
    };
    if let Some(t) = crate::v41::tokenizer_override() {
        cfg.tokenizer_name_or_path = t.to_string_lossy().into_owned();
    }
    Ok(cfg)
}

/// The raw ids of a `--text-file` (`what` names the option), at most `want` of them: the
/// text (at most 1 GiB) is tokenized in pieces of about 1 MiB, each cut after a newline
/// that starts a non-blank line within the next 64 KiB (else at a character boundary), and
/// no further pieces once `want` ids are in hand. The tokenizer takes over 100 bytes of
/// memory per byte of text it encodes at once, so a corpus in one call could exhaust the
/// machine; a text under 1 MiB is one piece, as before. Pre-tokenizers keep runs of
/// whitespace such as blank lines together, hence cuts before a non-blank character: the
/// ids then match the whole text's for the bundled tokenizer, and may differ at a cut
/// without such a line. The ids themselves (at most one per byte of text) are checked
/// against the free memory first.
pub fn text_file_ids(
    tok: &Tokenizer,
    path: &Path,
    what: &str,
    want: Option<usize>,
) -> Result<Vec<i64>> {
    const PIECE: usize = 1 << 20;
    let text = engram::files::read_limited_string(path, 1 << 30, what)?;
    let most = want.map_or(text.len(), |w| w.min(text.len()));
    let mut plan = engram::budget::MemoryPlan::new();
    plan.add(
        format!(
            "the token ids of {what} {} (at most one per byte)",
            path.display()
        ),
        most as u64,
        8,
    )?;
    plan.check()?;
    let mut ids = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() && want.is_none_or(|w| ids.len() < w) {
        let mut cut = rest.len().min(PIECE);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        if cut < rest.len() {
            // After a newline within the next 64 KiB that a non-blank character follows, so
            // that a piece ends where a line does (bytes: a `\n` byte is never part of a
            // multi-byte character, nor is the ASCII byte after it).
            let end = (cut + (1 << 16)).min(rest.len());
            let window = &rest.as_bytes()[cut..end];
            if let Some(i) = window
                .windows(2)
                .position(|w| w[0] == b'\n' && !w[1].is_ascii_whitespace())
            {
                cut += i + 1;
            }
        }
        let (piece, tail) = rest.split_at(cut);
        ids.extend(tok.encode(piece, false)?);
        rest = tail;
    }
    if let Some(w) = want {
        ids.truncate(w);
    }
    Ok(ids)
}

/// Where the input ids come from: an inputs file or a text.
#[derive(Args)]
pub struct IdSource {
    /// Inputs file: `input_ids` int64 [B, L] (for `forward` also `hidden_states` f32
    /// [B, L, HC, D]; or a ragged batch: `input_ids` [T], `hidden_states` [T, HC, D] and
    /// `offsets` int64 [S+1]).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Text to tokenize in place of `input_ids` (B = 1).
    #[arg(long)]
    text: Option<String>,
    /// Do not prepend BOS to --text.
    #[arg(long)]
    no_bos: bool,
}

/// Refuses `--text` together with `--inputs` (two sources of ids).
fn check_id_source(src: &IdSource) -> Result<()> {
    if let (Some(_), Some(p)) = (&src.text, &src.inputs) {
        bail!(
            "--text conflicts with --inputs {}: both give the input ids; give one of them",
            p.display()
        );
    }
    if src.no_bos && src.text.is_none() {
        bail!("--no-bos: applies to --text (an inputs file's ids are taken as they are); expected --text with it");
    }
    Ok(())
}

/// `[B, L]` of the file's `input_ids`, from its header, refusing other ranks and empty
/// batches with the shape as found.
fn batch_shape(f: &TensorFile) -> Result<(usize, usize)> {
    let (_, shape) = f.info("input_ids")?;
    match shape[..] {
        [b, l] if b >= 1 && l >= 1 => Ok((b, l)),
        _ => bail!(
            "tensor `input_ids` in {}: expected shape [B, L] with B >= 1 and L >= 1, found {:?}",
            f.path().display(),
            shape
        ),
    }
}

/// Input ids `[B, L]` from `--text` or the inputs file.
fn read_ids(
    inputs: Option<&TensorFile>,
    src: &IdSource,
    cfg: &EngramConfig,
) -> Result<(Vec<i64>, usize, usize)> {
    check_id_source(src)?;
    if let Some(t) = &src.text {
        let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
        let ids = tok.encode(t, !src.no_bos)?;
        if ids.is_empty() {
            bail!("--text: the text tokenizes to no ids; give a non-empty text");
        }
        let l = ids.len();
        return Ok((ids, 1, l));
    }
    let f = inputs.context("give --inputs (with `input_ids`) or --text")?;
    let (b, l) = batch_shape(f)?;
    let ids = f.i64("input_ids", Some(&[b, l]))?;
    Ok((ids.data, b, l))
}

/// The number of tokens and sequences an inputs file or text holds, from headers only.
fn count_tokens(inputs: Option<&TensorFile>, src: &IdSource) -> Result<(u64, u64)> {
    match (inputs, &src.text) {
        (_, Some(t)) => Ok((t.len() as u64 + 2, 1)),
        (Some(f), None) if f.contains("offsets") => {
            let (_, ids) = f.info("input_ids")?;
            let (_, off) = f.info("offsets")?;
            Ok((
                ids.first().copied().unwrap_or(0) as u64,
                off.first().copied().unwrap_or(1).saturating_sub(1) as u64,
            ))
        }
        (Some(f), None) => {
            let (b, l) = batch_shape(f)?;
            Ok(((b as u64).saturating_mul(l as u64), b as u64))
        }
        (None, None) => Ok((0, 0)),
    }
}

/// Refuses a `token_mask` in a demo layer's inputs (it would be ignored).
fn no_token_mask(inputs: Option<&TensorFile>) -> Result<()> {
    if let Some(f) = inputs.filter(|f| f.contains("token_mask")) {
        bail!(
            "tensor `token_mask` in {}: the demo layer has no token mask (a DeepSeek-V4.1 layer's input); expected none",
            f.path().display()
        );
    }
    Ok(())
}

/// The tensors an `--inputs` file may give (each command reads those it takes).
const INPUT_TENSORS: [&str; 4] = ["input_ids", "hidden_states", "offsets", "token_mask"];

/// Opens an `--inputs` file, refusing a tensor whose name is a near miss of an input's
/// (`token_masks`, `Hidden_States`): other tensors are ignored (a golden file, outputs and
/// all, serves as inputs), so a misspelt optional input would silently be absent.
pub(crate) fn open_inputs(path: Option<&Path>) -> Result<Option<TensorFile>> {
    let Some(p) = path else { return Ok(None) };
    let f = TensorFile::open(p)?;
    for name in f.names() {
        if INPUT_TENSORS.contains(&name.as_str()) {
            continue;
        }
        if let Some(near) = INPUT_TENSORS.iter().find(|k| near_miss(&name, k)) {
            bail!(
                "tensor `{}` in {}: expected `{near}` (an input read by name; other tensors \
                 are ignored), found a name one or two letters from it",
                shown(&name),
                p.display()
            );
        }
    }
    Ok(Some(f))
}

/// Whether `name`, in lower case, is at most two single-letter edits (Levenshtein
/// distance) from `known`: `Token_Masks`, `tokenMasks` and `INPUT__IDS` are.
fn near_miss(name: &str, known: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (
        name.chars().flat_map(char::to_lowercase).collect(),
        known.chars().collect(),
    );
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = (up + 1).min(row[j] + 1).min(diag + usize::from(ca != cb));
            diag = up;
        }
    }
    row[b.len()] <= 2
}

/// Refuses a run that needs more memory than the machine has now.
fn check_memory(cfg: &EngramConfig, run: RunShape) -> Result<()> {
    forward_plan(cfg, &run)?.check()?;
    Ok(())
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
    #[command(flatten)]
    src: IdSource,
    /// Hidden states = torch.randn(B, L, HC, D) after torch.manual_seed(SEED), for ids
    /// without hidden states: --text, or an --inputs file with `input_ids` only.
    #[arg(long, value_name = "SEED")]
    random_hidden: Option<u64>,
    /// Output safetensors file: every stage the path keeps.
    #[arg(long)]
    out: PathBuf,
    /// Implementation: `fused` (tiled multicore kernels) or `reference` (plain loops, every stage).
    #[arg(long, default_value = "fused")]
    path: String,
    /// Table and projection storage of the fused path: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Run each sequence in chunks of N tokens with carried state (same outputs).
    #[arg(long)]
    chunk: Option<usize>,
    /// States to continue from (written by --state-out); one per sequence.
    #[arg(long)]
    state_in: Option<PathBuf>,
    /// Write the sequences' states after the last token here.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// Keep `gated_value` and `short_conv` on the fused path too.
    #[arg(long)]
    all_stages: bool,
    /// cpu or cuda (the GPU: NVRTC kernels + cuBLAS; `[B, L]` inputs, not ragged ones).
    #[arg(long, default_value = "cpu")]
    device: crate::cuda::Device,
    /// Which layer to run: one of the config's layer ids (required for a DeepSeek-V4.1
    /// config; overrides `layer_id` of a demo config).
    #[arg(long)]
    layer: Option<u64>,
    #[command(flatten)]
    table: crate::table::TableArgs,
    /// Whether `--dtype` was typed (set by `main`): a V4.1 layer refuses it, even as `f32`.
    #[arg(skip)]
    pub dtype_typed: bool,
}

pub fn forward(a: ForwardArgs) -> Result<ExitCode> {
    check_id_source(&a.src)?;
    if let Some(v) = crate::v41::detect(a.config.as_deref())? {
        if a.device == crate::cuda::Device::Cuda {
            bail!("--device cuda: the CUDA backend runs the demo layer; DeepSeek-V4.1 layers run on the CPU");
        }
        let f = crate::v41::Forward {
            config_path: a.config.as_deref().unwrap_or(Path::new("")),
            weights: &a.weights,
            inputs: a.src.inputs.as_deref(),
            text: a.src.text.as_deref(),
            no_bos: a.src.no_bos,
            random_hidden: a.random_hidden,
            out: &a.out,
            path: &a.path,
            chunk: a.chunk,
            state_in: a.state_in.as_deref(),
            state_out: a.state_out.as_deref(),
            all_stages: a.all_stages,
            layer: a.layer,
            table: a.table.options()?,
            dtype: &a.dtype,
            dtype_typed: a.dtype_typed,
        };
        return crate::v41::forward(f, v);
    }
    let table = a.table.options()?;
    let mut cfg = load_config(&a.config)?;
    set_layer(&mut cfg, a.layer)?;
    let path: ForwardPath = a.path.parse()?;
    let dtype: DType = a.dtype.parse()?;
    if path == ForwardPath::Reference && dtype != DType::F32 {
        bail!("--dtype {}: the fused path's storage; expected --path fused with it (the reference runs in f32)", a.dtype);
    }
    if a.chunk == Some(0) {
        bail!("--chunk: expected a chunk length >= 1, found 0");
    }
    if a.device == crate::cuda::Device::Cuda {
        crate::cuda::open()?;
    }
    Files::new()
        .config(a.config.as_deref(), &cfg.tokenizer_name_or_path)
        .input("--weights", Some(&a.weights))
        .input("--inputs", a.src.inputs.as_deref())
        .input("--state-in", a.state_in.as_deref())
        .output("--out", Some(&a.out))
        .output("--state-out", a.state_out.as_deref())
        .check()?;
    check_id_source(&a.src)?;
    let inputs = open_inputs(a.src.inputs.as_deref())?;
    if let (Some(f), Some(_)) = (&inputs, a.random_hidden) {
        if f.contains("hidden_states") {
            bail!(
                "--random-hidden conflicts with tensor `hidden_states` in {}: give one source of hidden states",
                f.path().display()
            );
        }
    }
    no_token_mask(inputs.as_ref())?;
    let ragged = inputs.as_ref().is_some_and(|f| f.contains("offsets"));
    // The hidden states' shape from the header, before the memory check: a mismatch with
    // input_ids is named as one, not as the memory a wrong count would need.
    if let Some(f) = inputs.as_ref().filter(|f| f.contains("hidden_states")) {
        let (_, mut want) = f.info("input_ids")?;
        want.extend([cfg.hc_mult, cfg.hidden_size]);
        f.expect_shape("hidden_states", &want)?;
    }
    let (tokens, sequences) = count_tokens(inputs.as_ref(), &a.src)?;
    let all_stages = a.all_stages || path == ForwardPath::Reference;
    // `--table-io ram` copies the file's table into memory at its own dtype: counted here
    // with the rest, so that a table past the memory left is refused before it is read.
    let ram_table = table.io == engram::rows::TableIo::Ram && table.store.is_none();
    let ram_elem_bytes = if ram_table {
        match TensorFile::open(&a.weights)?
            .info(engram::weights::TABLE)?
            .0
        {
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 => 2,
            _ => 4,
        }
    } else {
        4
    };
    check_memory(
        &cfg,
        RunShape {
            // Chunked runs hold a copy of one chunk besides the whole inputs and outputs.
            tokens: tokens.saturating_mul(if a.chunk.is_some() { 2 } else { 1 }),
            sequences,
            all_stages,
            bf16_table_copy: dtype == DType::Bf16 && path == ForwardPath::Fused,
            table_rows: if ram_table || (dtype == DType::Bf16 && path == ForwardPath::Fused) {
                engram::hashing::table_rows(&cfg)?
            } else {
                0
            },
            threads: rayon::current_num_threads() as u64,
            table_in_ram: ram_table,
            table_elem_bytes: ram_elem_bytes,
        },
    )?;
    let t0 = Instant::now();
    let e = Engram::load_with_table(cfg.clone(), &a.weights, table)?.with_dtype(dtype);
    let load = t0.elapsed();
    let (hc, d) = (cfg.hc_mult, cfg.hidden_size);
    // Sequences as (ids, hidden) over packed rows with offsets.
    let (ids, hidden, offsets, batch_shape) = if ragged {
        let f = inputs.as_ref().context("ragged inputs come from a file")?;
        if a.random_hidden.is_some() {
            bail!(
                "--random-hidden cannot be combined with a ragged inputs file (it has `offsets`)"
            );
        }
        let ids = f.i64("input_ids", None)?;
        if ids.shape.len() != 1 {
            bail!(
                "tensor `input_ids` in {}: a ragged batch (with `offsets`) expects 1 dim [T], found shape {:?}",
                f.path().display(),
                ids.shape
            );
        }
        let t = ids.shape[0];
        if t == 0 {
            bail!(
                "tensor `input_ids` in {}: expected at least one token, found shape [0]",
                f.path().display()
            );
        }
        let hidden = f.f32("hidden_states", Some(&[t, hc, d]))?;
        let off = f.i64("offsets", None)?;
        if off.shape.len() != 1 || off.shape[0] < 2 {
            bail!(
                "tensor `offsets` in {}: expected 1 dim [S+1] with S >= 1, found shape {:?}",
                f.path().display(),
                off.shape
            );
        }
        if off.data.first() != Some(&0)
            || off.data.last() != Some(&(t as i64))
            || off.data.windows(2).any(|w| w[0] > w[1])
        {
            let shown: Vec<String> = off.data.iter().take(12).map(|o| o.to_string()).collect();
            bail!(
                "tensor `offsets` in {}: expected non-decreasing int64 [S+1] from 0 to {t}, found [{}{}]",
                f.path().display(),
                shown.join(", "),
                if off.data.len() > 12 { ", ..." } else { "" }
            );
        }
        let offsets: Vec<usize> = off.data.iter().map(|&o| o as usize).collect();
        (ids.data, hidden.data, offsets, None)
    } else {
        let (ids, b, l) = read_ids(inputs.as_ref(), &a.src, &cfg)?;
        let hidden = match (&inputs, a.random_hidden) {
            (_, Some(seed)) => {
                engram::rng::torch::TorchGenerator::manual_seed(seed).randn(b * l * hc * d)
            }
            (Some(f), None) => f.f32("hidden_states", Some(&[b, l, hc, d]))?.data,
            (None, None) => {
                bail!("give --inputs with `hidden_states` [B, L, HC, D], or --random-hidden SEED")
            }
        };
        let offsets: Vec<usize> = (0..=b).map(|i| i * l).collect();
        (ids, hidden, offsets, Some((b, l)))
    };
    let nseq = offsets.len() - 1;
    let mut states = match &a.state_in {
        Some(p) => {
            // The count first: a file of many states is refused before it is decoded.
            let f = TensorFile::open(p)?;
            let (_, shape) = f.info("position")?;
            if shape != [nseq] {
                bail!(
                    "--state-in {}: expected {nseq} states (one per sequence, `position` [{nseq}]), found `position` {shape:?}",
                    p.display()
                );
            }
            let s = engram::state_io::load_states_from(&f, &e)?;
            if s.len() != nseq {
                bail!(
                    "--state-in {}: expected {nseq} states (one per sequence), found {}",
                    p.display(),
                    s.len()
                );
            }
            s
        }
        None => (0..nseq).map(|_| e.new_state()).collect(),
    };
    let t0 = Instant::now();
    let mut s = match a.chunk {
        _ if a.device == crate::cuda::Device::Cuda => {
            let Some(shape) = batch_shape else {
                bail!("--device cuda: ragged inputs (with `offsets`) are not supported; give [B, L] inputs");
            };
            crate::cuda::forward(
                &e,
                dtype,
                &mut states,
                &ids,
                &hidden,
                shape,
                a.chunk,
                a.all_stages || path == ForwardPath::Reference,
            )?
        }
        None if a.all_stages && a.state_in.is_none() && batch_shape.is_some() => {
            let (b, l) = batch_shape.unwrap_or((1, ids.len()));
            e.forward_detailed(&ids, &hidden, b, l, path)?
        }
        None if a.all_stages => {
            e.forward_ragged_detailed(&mut states, &ids, &hidden, &offsets, path)?
        }
        None => e.forward_ragged(&mut states, &ids, &hidden, &offsets, path)?,
        Some(n) => run_chunked(
            &e,
            &mut states,
            &ids,
            &hidden,
            &offsets,
            n,
            path,
            a.all_stages,
        )?,
    };
    let run = t0.elapsed();
    if let Some((b, l)) = batch_shape {
        s.batch = b;
        s.len = l;
    }
    // Both outputs are written before either replaces its file: a failure while writing
    // leaves both as they were.
    let out = stage_stages(&a.out, &cfg, &s)?;
    let state_out = a
        .state_out
        .as_ref()
        .map(|p| engram::state_io::stage_states(p, &e, &states))
        .transpose()?;
    out.commit()?;
    if let Some(st) = state_out {
        st.commit()?;
    }
    eprintln!(
        "forward ({path:?}, {dtype:?}): {} sequence{}, {} tokens; load {:.2}s, run {:.3}s; wrote {}",
        nseq,
        if nseq == 1 { "" } else { "s" },
        ids.len(),
        load.as_secs_f64(),
        run.as_secs_f64(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs every sequence in chunks of `n` tokens, all sequences' i-th chunks as one ragged
/// call, and reassembles the packed outputs in the original order: every stage the calls
/// return (the reference path's intermediate stages; with `all_stages`, the fused path's
/// `gated_value` and `short_conv`).
#[allow(clippy::too_many_arguments)]
fn run_chunked(
    e: &Engram,
    states: &mut [engram::EngramState],
    ids: &[i64],
    hidden: &[f32],
    offsets: &[usize],
    n: usize,
    path: ForwardPath,
    all_stages: bool,
) -> Result<Stages> {
    let cfg = e.config();
    let (h, hc, c) = (cfg.num_heads(), cfg.hc_mult, cfg.hc_mult * cfg.hidden_size);
    // The optional stages' row widths: embeddings [Dm], value [D], keys, gated_value and
    // short_conv [HC·D].
    type Field = fn(&mut Stages) -> &mut Option<Vec<f32>>;
    let optional: [(usize, Field); 5] = [
        (cfg.memory_width(), |s| &mut s.embeddings),
        (cfg.hidden_size, |s| &mut s.value),
        (c, |s| &mut s.keys),
        (c, |s| &mut s.gated_value),
        (c, |s| &mut s.short_conv),
    ];
    let total = ids.len();
    let mut out = Stages {
        batch: 1,
        len: total,
        hash_ids: vec![0; total * h],
        gates: vec![0.0; total * hc],
        output: vec![0.0; total * c],
        ..Default::default()
    };
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let mut start = 0;
    while start < longest {
        let mut cids = Vec::new();
        let mut chid = Vec::new();
        let mut coff = vec![0usize];
        let mut rows = Vec::new();
        for w in offsets.windows(2) {
            let (lo, hi) = (
                w[0] + start.min(w[1] - w[0]),
                w[0] + (start + n).min(w[1] - w[0]),
            );
            cids.extend_from_slice(&ids[lo..hi]);
            chid.extend_from_slice(&hidden[lo * c..hi * c]);
            rows.push(lo..hi);
            coff.push(cids.len());
        }
        let mut s = if all_stages {
            e.forward_ragged_detailed(states, &cids, &chid, &coff, path)?
        } else {
            e.forward_ragged(states, &cids, &chid, &coff, path)?
        };
        for (w, field) in optional {
            if let Some(src) = field(&mut s).take() {
                let dst = field(&mut out).get_or_insert_with(|| vec![0.0; total * w]);
                for (k, row) in rows.iter().flat_map(|r| r.clone()).enumerate() {
                    dst[row * w..(row + 1) * w].copy_from_slice(&src[k * w..(k + 1) * w]);
                }
            }
        }
        let mut k = 0;
        for r in rows {
            for row in r {
                out.hash_ids[row * h..(row + 1) * h]
                    .copy_from_slice(&s.hash_ids[k * h..(k + 1) * h]);
                out.gates[row * hc..(row + 1) * hc].copy_from_slice(&s.gates[k * hc..(k + 1) * hc]);
                out.output[row * c..(row + 1) * c].copy_from_slice(&s.output[k * c..(k + 1) * c]);
                k += 1;
            }
        }
        start += n;
    }
    Ok(out)
}

/// The stages file of a demo-layer run, written and synced beside `out` (committed by the
/// caller once every output of the command is written).
pub fn stage_stages(out: &Path, cfg: &EngramConfig, s: &Stages) -> Result<engram::atomic::Staged> {
    let mut w = TensorWriter::new();
    w.i64("hash_ids", &[s.batch, s.len, cfg.num_heads()], &s.hash_ids);
    for (name, shape, data) in s.float_stages(cfg) {
        w.f32(name, &shape, data);
    }
    Ok(w.stage(out)?)
}

/// `engram hash`.
#[derive(Args)]
pub struct HashArgs {
    /// Config JSON; the default config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    src: IdSource,
    /// Output: `layer{l}` int64 [B, L, H] for every l in layer_ids.
    #[arg(long)]
    out: PathBuf,
}

/// `hash` takes `input_ids` `[B, L]`: a ragged batch's `offsets` is named, not left to a
/// shape error about `input_ids`.
fn not_ragged(inputs: Option<&TensorFile>) -> Result<()> {
    match inputs {
        Some(f) if f.contains("offsets") => bail!(
            "tensor `offsets` in {}: `hash` takes input_ids [B, L]; expected no `offsets` (ragged batches go to `forward`)",
            f.path().display()
        ),
        _ => Ok(()),
    }
}

pub fn hash(a: HashArgs) -> Result<ExitCode> {
    if let Some(v) = crate::v41::detect(a.config.as_deref())? {
        Files::new()
            .input("--config", a.config.as_deref())
            .input("--inputs", a.src.inputs.as_deref())
            .tokenizer(crate::v41::tokenizer_override())
            .output("--out", Some(&a.out))
            .check()?;
        check_id_source(&a.src)?;
        let inputs = open_inputs(a.src.inputs.as_deref())?;
        not_ragged(inputs.as_ref())?;
        let (tokens, _) = count_tokens(inputs.as_ref(), &a.src)?;
        let mut plan = engram::budget::MemoryPlan::new();
        // Every layer's row ids, plus one layer's being built (a sequence's chunk, then
        // its copy), and the ids, canonical ids and mask.
        plan.add_dims(
            "the hash ids of every layer",
            &[tokens, v.columns() as u64, v.layer_ids.len() as u64 + 1],
            8,
        )?;
        plan.add("the input ids, canonical ids and token mask", tokens, 25)?;
        plan.check()?;
        let (ids, b, l) = match (&a.src.text, &inputs) {
            (Some(t), _) => {
                let ids = crate::v41::tokenizer()?.encode(t, !a.src.no_bos)?;
                if ids.is_empty() {
                    bail!("--text: the text tokenizes to no ids; give a non-empty text");
                }
                let l = ids.len();
                (ids, 1, l)
            }
            (None, Some(f)) => {
                let (b, l) = batch_shape(f)?;
                (f.i64("input_ids", Some(&[b, l]))?.data, b, l)
            }
            (None, None) => bail!("give --inputs (with `input_ids`) or --text"),
        };
        let mask = match &inputs {
            // --inputs holds input_ids [B, L]; --text gives one sequence and no mask.
            Some(f) => crate::v41::read_mask(f, &[b, l])?,
            None => None,
        };
        return crate::v41::hash(v, &ids, mask.as_deref(), b, l, &a.out);
    }
    let cfg = load_config(&a.config)?;
    Files::new()
        .config(a.config.as_deref(), &cfg.tokenizer_name_or_path)
        .input("--inputs", a.src.inputs.as_deref())
        .output("--out", Some(&a.out))
        .check()?;
    check_id_source(&a.src)?;
    let inputs = open_inputs(a.src.inputs.as_deref())?;
    not_ragged(inputs.as_ref())?;
    no_token_mask(inputs.as_ref())?;
    let (tokens, _) = count_tokens(inputs.as_ref(), &a.src)?;
    let mut plan = engram::budget::MemoryPlan::new();
    plan.add_dims(
        "the hash ids of every layer",
        &[tokens, cfg.sizes()?.heads, cfg.layer_ids.len() as u64],
        8,
    )?;
    plan.add("the input ids", tokens, 16)?;
    plan.check()?;
    let (ids, b, l) = read_ids(inputs.as_ref(), &a.src, &cfg)?;
    let m = NgramHashMapping::new(&cfg, compression_for(&cfg)?)?;
    let hashes: Vec<Vec<i64>> = m
        .layers()
        .iter()
        .map(|ly| m.hash(ly.layer_id, &ids, l))
        .collect::<Result<_, _>>()?;
    let mut w = TensorWriter::new();
    for (layer, h) in m.layers().iter().zip(&hashes) {
        w.i64(
            &format!("layer{}", layer.layer_id),
            &[b, l, m.num_heads()],
            h,
        );
        w.meta(
            &format!("multipliers.layer{}", layer.layer_id),
            format!("{:?}", layer.multipliers),
        );
        w.meta(
            &format!("primes.layer{}", layer.layer_id),
            format!("{:?}", layer.primes),
        );
    }
    w.write(&a.out)?;
    // Many-layer configs (up to 4096 ids) get a count, not a screen of ids.
    let layers = match cfg.layer_ids.as_slice() {
        ids if ids.len() <= 16 => format!("layers {ids:?}"),
        ids => format!(
            "{} layers ({} ... {})",
            ids.len(),
            ids[0],
            ids[ids.len() - 1]
        ),
    };
    eprintln!("hashed B={b} L={l} for {layers}; wrote {}", a.out.display());
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
        println!(
            "{}",
            serde_json::json!({"input_ids": ids, "canonical_ids": canon})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} tokens (BOS {})",
        ids.len(),
        if a.no_bos || !tok.adds_bos() {
            "off"
        } else {
            "on"
        }
    );
    println!(
        "{:>4}  {:>7}  {:>9}  {:<24} vocabulary entry",
        "pos", "id", "canonical", "text"
    );
    for (i, (&id, &c)) in ids.iter().zip(&canon).enumerate() {
        let text = tok.decode(&[id as u32])?;
        let entry = tok.id_to_token(id as u32).unwrap_or_default();
        println!(
            "{i:>4}  {id:>7}  {c:>9}  {:<24} {entry:?}",
            format!("{text:?}")
        );
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
    Files::new()
        .config(a.config.as_deref(), &cfg.tokenizer_name_or_path)
        .output("--out", a.out.as_deref())
        .check()?;
    let t0 = Instant::now();
    let tok = Tokenizer::from_name_or_path(&cfg.tokenizer_name_or_path)?;
    let t_load = t0.elapsed();
    let t0 = Instant::now();
    let c = CompressedTokenizer::build(&tok)?;
    let t_build = t0.elapsed();
    // The config's pad id is refused here as `hash` refuses it, before anything is written.
    let pad = c.canonical_pad("pad_id", cfg.pad_id)?;
    let (v, vp) = (c.num_raw(), c.num_compressed());
    println!(
        "tokenizer        {} ({} ids), loaded in {:.3}s",
        tok.name(),
        v,
        t_load.as_secs_f64()
    );
    println!(
        "canonical ids    {vp} ({:.2}% fewer)",
        100.0 * (v - vp) as f64 / v as f64
    );
    println!(
        "built in         {:.3}s on {} threads",
        t_build.as_secs_f64(),
        rayon::current_num_threads()
    );
    println!("pad id {} -> {pad}", cfg.pad_id);
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

impl WeightsArgs {
    /// Whether the file is checked against a config (which reads its tokenizer).
    pub fn has_config(&self) -> bool {
        self.config.is_some()
    }
}

pub fn weights(a: WeightsArgs) -> Result<ExitCode> {
    let cfg = match &a.config {
        Some(_) => Some(load_config(&a.config)?),
        None => None,
    };
    let f = TensorFile::open(&a.weights)?;
    let mut total = 0usize;
    println!("{:<44} {:>6} shape", "tensor", "dtype");
    for n in f.names() {
        let (d, s) = f.info(&n)?;
        total += s.iter().product::<usize>() * d.bitsize() / 8;
        println!(
            "{:<44} {:>6} {s:?}",
            shown(&n),
            format!("{d:?}").to_lowercase()
        );
    }
    println!("total {:.1} MB", total as f64 / 1e6);
    if let Some(cfg) = cfg {
        let e = Engram::load(cfg, &a.weights)?;
        let table = &e.weights().table;
        let pb = crate::demo::progress(table.rows() as u64, "check table");
        table.check_finite(&|n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        println!(
            "matches config (layer {}, table {} rows x {}, all values finite, memory-mapped: {})",
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
    /// Fail (exit 1) when a float tensor differs by more than this (a finite number, 0 or
    /// more); other tensors (ints, bytes, bool, fp8) fail on any differing element.
    /// (`--tol -1` reaches that check: clap would otherwise take `-1` for an option.)
    #[arg(long, default_value_t = 1e-4, value_parser = parse_tol, allow_negative_numbers = true)]
    tol: f64,
    /// Prefix of the tensor names in the first file (e.g. `seed_text.`).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Fail when either file has a tensor the other lacks (the first file's counted under
    /// `--prefix`); without it they are listed and left out of the verdict.
    #[arg(long)]
    all: bool,
}

/// `--tol`: a finite number, 0 or more.
fn parse_tol(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!(
            "expected a finite tolerance of 0 or more, found {}",
            s.chars().take(40).collect::<String>()
        )),
    }
}

/// The absolute difference of two values of float tensors, in f64 (two finite f32 values
/// apart by more than f32's range stay finite): 0 for equal values (infinities included)
/// and for NaN against NaN; NaN when only one of them is NaN.
fn float_diff(p: f64, q: f64) -> f64 {
    if p == q || (p.is_nan() && q.is_nan()) {
        0.0
    } else {
        (p - q).abs()
    }
}

/// How `compare` reads a dtype: floats by value in f64, ints (any width, signed or not) by
/// value in i128, anything else (bool, fp8, ...) element by element as bits.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Float,
    Int,
    Bits,
}

fn kind(d: safetensors::Dtype) -> Kind {
    use safetensors::Dtype::*;
    match d {
        F64 | F32 | BF16 | F16 => Kind::Float,
        I8 | I16 | I32 | I64 | U8 | U16 | U32 | U64 => Kind::Int,
        _ => Kind::Bits,
    }
}

/// Element `i` of a float tensor's little-endian bytes.
fn float_at(d: safetensors::Dtype, b: &[u8], i: usize) -> f64 {
    use safetensors::Dtype::*;
    let at = |w: usize| &b[i * w..(i + 1) * w];
    match d {
        F64 => f64::from_le_bytes(at(8).try_into().expect("8 bytes")),
        F32 => f64::from(f32::from_le_bytes(at(4).try_into().expect("4 bytes"))),
        BF16 => f64::from(half::bf16::from_le_bytes(at(2).try_into().expect("2 bytes")).to_f32()),
        F16 => f64::from(half::f16::from_le_bytes(at(2).try_into().expect("2 bytes")).to_f32()),
        _ => unreachable!("float dtypes only"),
    }
}

/// Element `i` of an int tensor's little-endian bytes.
fn int_at(d: safetensors::Dtype, b: &[u8], i: usize) -> i128 {
    use safetensors::Dtype::*;
    let w = d.bitsize() / 8;
    let x = &b[i * w..(i + 1) * w];
    let mut le = [0u8; 16];
    le[..w].copy_from_slice(x);
    let signed = matches!(d, I8 | I16 | I32 | I64);
    if signed && x[w - 1] & 0x80 != 0 {
        le[w..].fill(0xff);
    }
    i128::from_le_bytes(le)
}

/// Whether [`shown`] escapes `c`: control characters (a newline, an escape that would drive
/// the terminal), line and paragraph separators, the marks that reorder or isolate the
/// text around them (bidirectional overrides, embeddings, isolates and marks, which can
/// make a name read as another), invisible characters (zero-width spaces and joiners, the
/// byte-order mark, a soft hyphen, invisible operators), and the backslash itself, so that
/// an escape is never confused with a name that spells one.
fn escaped_in_listings(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\\'
                | '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// A name from a file (or a store) as a listing shows it: the characters of
/// [`escaped_in_listings`] escaped (`\n`, `\u{202e}`, `\\`), everything else as it is.
pub fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    let hidden = escaped_in_listings;
    if name.chars().any(hidden) {
        name.chars()
            .map(|c| {
                if hidden(c) {
                    c.escape_default().collect()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        name.into()
    }
}

pub fn compare(a: CompareArgs) -> Result<ExitCode> {
    let fa = TensorFile::open(&a.a)?;
    let fb = TensorFile::open(&a.b)?;
    let mut ok = true;
    let mut n = 0;
    for raw_name in fb.names() {
        let key = format!("{}{}", a.prefix, raw_name);
        if !fa.contains(&key) {
            continue;
        }
        // Read by its own name, shown with control characters escaped.
        let name = shown(&raw_name);
        n += 1;
        let (da, sa) = fa.info(&key)?;
        let (db, sb) = fb.info(&raw_name)?;
        if sa != sb {
            println!("{name:<14} shape {sa:?} vs {sb:?}  FAIL");
            ok = false;
            continue;
        }
        // Read from the mapped files element by element: no copy of either tensor (a
        // table is gigabytes).
        let (x, y) = (fa.raw(&key)?, fb.raw(&raw_name)?);
        let (x, y) = (x.data(), y.data());
        let count: usize = sa.iter().product();
        for (d, bytes, file) in [(da, x, &a.a), (db, y, &a.b)] {
            let want = count.checked_mul(d.bitsize()).map(|b| b.div_ceil(8));
            if d.bitsize() % 8 == 0 && want != Some(bytes.len()) {
                bail!(
                    "tensor `{name}` in {}: expected {} bytes for shape {sa:?} of {d:?}, found {}",
                    file.display(),
                    want.map_or_else(|| "more than usize::MAX".to_string(), |w| w.to_string()),
                    bytes.len()
                );
            }
        }
        match (kind(da), kind(db)) {
            (Kind::Float, Kind::Float) => {
                let (mut max, mut sum) = (0f64, 0f64);
                for i in 0..count {
                    let d = float_diff(float_at(da, x, i), float_at(db, y, i));
                    max = if d.is_nan() || d > max { d } else { max };
                    sum += d;
                }
                let pass = max <= a.tol;
                println!(
                    "{name:<14} {sa:?} max {max:.3e} mean {:.3e}  {}",
                    sum / count.max(1) as f64,
                    if pass { "ok" } else { "FAIL" }
                );
                ok &= pass;
            }
            (Kind::Int, Kind::Int) => {
                let diff = (0..count)
                    .filter(|&i| int_at(da, x, i) != int_at(db, y, i))
                    .count();
                println!(
                    "{name:<14} {sa:?} int: {diff} differing  {}",
                    if diff == 0 { "ok" } else { "FAIL" }
                );
                ok &= diff == 0;
            }
            (Kind::Bits, Kind::Bits) if da == db => {
                // Element by element (byte by byte for the types of fewer than 8 bits,
                // packed several to a byte).
                let (width, unit) = match da.bitsize() {
                    b if b % 8 == 0 => (b / 8, "elements"),
                    _ => (1, "bytes"),
                };
                let diff = x
                    .chunks(width)
                    .zip(y.chunks(width))
                    .filter(|(p, q)| p != q)
                    .count();
                println!(
                    "{name:<14} {sa:?} {da:?}: {unit} differing: {diff}  {}",
                    if diff == 0 { "ok" } else { "FAIL" }
                );
                ok &= diff == 0;
            }
            _ => {
                println!("{name:<14} dtype {da:?} vs {db:?}  FAIL");
                ok = false;
            }
        }
    }
    if n == 0 {
        bail!(
            "no tensor of {} is in {} (prefix `{}`)",
            a.b.display(),
            a.a.display(),
            a.prefix
        );
    }
    // What was not compared, by name (a forward output lacking `output` must not read as
    // a plain PASS).
    let only_b: Vec<String> = fb
        .names()
        .into_iter()
        .filter(|k| !fa.contains(&format!("{}{k}", a.prefix)))
        .collect();
    let only_a: Vec<String> = fa
        .names()
        .into_iter()
        .filter(|k| {
            k.strip_prefix(a.prefix.as_str())
                .is_some_and(|b| !fb.contains(b))
        })
        .collect();
    for (names, file) in [(&only_a, &a.a), (&only_b, &a.b)] {
        if names.is_empty() {
            continue;
        }
        let shown_names: Vec<String> = names
            .iter()
            .take(8)
            .map(|k| format!("`{}`", shown(k)))
            .collect();
        let more = match names.len() {
            l if l > 8 => format!(" and {} more", l - 8),
            _ => String::new(),
        };
        println!(
            "not compared, only in {}: {}{more}{}",
            file.display(),
            shown_names.join(", "),
            if a.all { "  FAIL" } else { "" }
        );
        ok &= !a.all;
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_of_input_names() {
        for (name, known) in [
            ("token_masks", "token_mask"),
            ("Hidden_States", "hidden_states"),
            ("input_id", "input_ids"),
            ("ofsets", "offsets"),
            ("inptu_ids", "input_ids"),
            ("Token_Masks", "token_mask"),
            ("tokenMasks", "token_mask"),
            ("INPUT__IDS", "input_ids"),
            ("Hidden_State", "hidden_states"),
        ] {
            assert!(near_miss(name, known), "{name}");
        }
        for (name, known) in [
            ("hash_ids", "input_ids"),
            ("gates", "offsets"),
            ("output", "offsets"),
            ("token_mask_v2", "token_mask"),
        ] {
            assert!(!near_miss(name, known), "{name}");
        }
    }

    /// Every character a listing escapes comes out as an escape (no raw one left), plain
    /// names come out as they are, and a name that spells an escape is told apart.
    #[test]
    fn shown_escapes_every_hidden_character_and_nothing_else() {
        let hidden = [
            '\n', '\u{1b}', '\u{7f}', '\u{85}', '\u{ad}', '\u{61c}', '\u{180e}', '\u{200b}',
            '\u{200c}', '\u{200d}', '\u{200e}', '\u{200f}', '\u{2028}', '\u{2029}', '\u{202a}',
            '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2060}', '\u{2064}', '\u{2066}',
            '\u{2067}', '\u{2068}', '\u{2069}', '\u{206f}', '\u{feff}', '\u{fff9}', '\u{fffb}',
        ];
        for c in hidden {
            let name = format!("a{c}b");
            let out = shown(&name);
            assert!(!out.contains(c), "{c:?} -> {out:?}");
            assert_eq!(out, format!("a{}b", c.escape_default()), "{c:?}");
        }
        for plain in ["engram.value_proj.weight", "Größe", "表", "a-b_c.d"] {
            assert_eq!(shown(plain), plain);
        }
        // A name that spells an escape is shown with its backslash escaped.
        assert_eq!(shown("key\\u{202e}"), "key\\\\u{202e}");
        assert_ne!(shown("key\\u{202e}"), shown("key\u{202e}"));
    }

    /// A text over 1 MiB is tokenized in pieces cut before non-blank lines: with paragraphs
    /// (blank lines, which the pre-tokenizer keeps with the newline before them) the ids
    /// are the whole text's, and `want` keeps their prefix. A stretch of 3-byte characters
    /// without newlines longer than a piece is cut at character boundaries.
    #[test]
    fn text_files_are_tokenized_in_pieces_with_the_whole_texts_ids() {
        let tok = Tokenizer::bundled().unwrap();
        let words = [
            "memory", "of", "the", "engram", "layer", "hashes", "rows", "42",
        ];
        let mut text = String::new();
        let mut i = 0usize;
        while text.len() < (5 << 20) / 2 {
            for j in 0..11 {
                text.push_str(words[(i * 7 + j * 3) % words.len()]);
                text.push(' ');
            }
            // Every line a paragraph: a cut after the first newline of each blank line
            // would change the ids at every cut.
            text.push_str("é.\n\n");
            i += 1;
        }
        let p = std::env::temp_dir().join(format!("engram-text-{}.txt", std::process::id()));
        // 1.5 MiB of '€' (3 bytes each) with no newline: every cut there is the fallback.
        let mut no_lines = "€".repeat((3 << 20) / 6);
        no_lines.push('\n');
        std::fs::write(&p, &no_lines).unwrap();
        let ids = text_file_ids(&tok, &p, "--text-file", None).unwrap();
        assert!(!ids.is_empty());
        std::fs::write(&p, &text).unwrap();
        let whole = tok.encode(&text, false).unwrap();
        let pieces = text_file_ids(&tok, &p, "--text-file", None).unwrap();
        assert_eq!(pieces.len(), whole.len());
        assert!(
            pieces == whole,
            "piecewise ids differ from the whole text's"
        );
        let first = text_file_ids(&tok, &p, "--text-file", Some(1000)).unwrap();
        assert_eq!(first, whole[..1000]);
        std::fs::remove_file(&p).unwrap();
    }
}
