//! `engram`: the command-line front end of the `engram` crate.

mod bench;
mod commands;
mod cuda;
mod demo;
mod guard;
mod oom;
mod table;
mod v41;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// An allocation that fails unhandled ends the run with one error line, not an abort.
#[global_allocator]
static ALLOCATOR: oom::Checked = oom::Checked;

/// Exact, fast implementation of DeepSeek's Engram layer (CPU; CUDA with --device cuda).
#[derive(Parser)]
#[command(
    name = "engram",
    version,
    about = "Exact, fast CPU implementation of DeepSeek's Engram layer",
    long_about = None
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Tokenizer: a tokenizer.json or a folder with one (default: the config's
    /// tokenizer_name_or_path; for DeepSeek-V4.1 configs the bundled DeepSeek-V3 one).
    #[arg(long, global = true, value_name = "PATH")]
    tokenizer: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The seed demo: PyTorch-identical weights, every stage, reference vs fused, PASS/FAIL.
    Demo(demo::DemoArgs),
    /// Write the weights PyTorch creates after torch.manual_seed(seed).
    Init(demo::InitArgs),
    /// Tokens/s, time per stage and peak memory of the full layer.
    Bench(bench::BenchArgs),
    /// Run one Engram layer and write every stage.
    Forward(commands::ForwardArgs),
    /// Hash input ids for every layer of the config.
    Hash(commands::HashArgs),
    /// Tokenize text: raw ids, canonical (compressed) ids and tokens.
    Tokenize(commands::TokenizeArgs),
    /// Build the tokenizer compression table: statistics, timing, optional file.
    Compression(commands::CompressionArgs),
    /// Summarise a weights file (names, shapes, dtypes) and check it against a config.
    Weights(commands::WeightsArgs),
    /// Compare the tensors two safetensors files share: max and mean absolute error.
    Compare(commands::CompareArgs),
    /// Compile every CUDA kernel with NVRTC (no GPU needed): one line per kernel with its
    /// registers, stack and spills.
    CudaKernels(cuda::KernelArgs),
    /// Primes, offsets and multipliers of every layer of a DeepSeek-V4.1 config (no tokenizer
    /// needed: the multipliers are drawn against engram_compressed_vocab_size).
    HashParams(v41::HashParamsArgs),
    /// Row tables: write a layer's rows into a Redis Cluster (`push`), list what a cluster
    /// holds (`info`), cache hit rates of a text (`cache-sim`).
    #[command(subcommand)]
    Table(table::TableCommand),
}

fn main() -> ExitCode {
    guard::default_sigpipe();
    guard::clean_up_on_signals();
    guard::report_truncated_mappings();
    quiet_known_panics();
    // `println!` / `eprintln!` panic when their stream cannot be written (stdout on a full
    // disk, an I/O error; a closed pipe ends the process by SIGPIPE, see
    // `default_sigpipe`): that is one error line (where stderr takes it) and exit 2,
    // after the panic has unwound (so that staged output files are removed), not a
    // backtrace and exit 101.
    // The same for a CUDA entry point missing from a library that loaded (`cudarc` panics
    // at the symbol's first call): `engram_cuda::probe` checks the ones it knows of first,
    // and this catches any other.
    match std::panic::catch_unwind(run) {
        Ok(code) => code,
        Err(p) if known_failure(&*p).is_some() => ExitCode::from(2),
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The one-line report of a panic that is an outside failure rather than a bug, if that is
/// what `payload` is: a `print!`-family macro that failed to write, or a CUDA library
/// without an entry point `cudarc` looked up.
fn known_failure(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())?;
    if msg.starts_with("failed printing to std") {
        Some(msg.to_string())
    } else if msg.starts_with("Missing symbol ") {
        let msg = msg.lines().next().unwrap_or(msg);
        Some(format!(
            "CUDA: {msg}: a CUDA library on the library path is not CUDA 13's (the driver's \
             libcuda, NVRTC or cuBLAS)"
        ))
    } else {
        None
    }
}

/// A panic hook that reports the panics of [`known_failure`] as one `error:` line (best
/// effort: stderr may be the stream that failed) and leaves every other panic to the
/// default hook.
fn quiet_known_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| match known_failure(info.payload()) {
        Some(msg) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {msg}");
        }
        None => default(info),
    }));
}

fn run() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Which of bench's options were typed (its refusals of layer options with --fma-peak
    // and --mem-bw cannot tell a typed default from an omitted one otherwise).
    if let (Command::Bench(a), Some(("bench", m))) = (&mut cli.command, matches.subcommand()) {
        a.given = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_string())
            .collect();
    }
    if let (Command::Forward(a), Some(("forward", m))) = (&mut cli.command, matches.subcommand()) {
        a.dtype_typed = m.value_source("dtype") == Some(clap::parser::ValueSource::CommandLine);
    }
    // A tokenizer given to a command that reads none would be dropped silently.
    if cli.tokenizer.is_some() {
        let none = match &mut cli.command {
            Command::Compare(_) => Some("compare"),
            Command::CudaKernels(_) => Some("cuda-kernels"),
            Command::HashParams(_) => Some("hash-params"),
            Command::Weights(a) if !a.has_config() => Some("weights without --config"),
            Command::Bench(a) => {
                a.given.push("tokenizer".into());
                None
            }
            _ => None,
        };
        if let Some(cmd) = none {
            eprintln!("error: --tokenizer: {cmd} reads no tokenizer; expected none");
            return ExitCode::from(2);
        }
    }
    // A mistyped ENGRAM_ISA / ENGRAM_TILE / ENGRAM_BF16_DOT would run the defaults silently.
    if let Err(e) = engram::fused::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    v41::set_tokenizer(cli.tokenizer.clone());
    // --threads, else RAYON_NUM_THREADS, else all cores; capped at a multiple of the cores.
    let requested = match cli.threads {
        Some(n) => Some((n, "--threads")),
        None => match guard::rayon_env_threads() {
            Ok(n) => n.map(|n| (n, "RAYON_NUM_THREADS")),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some((n, source)) = requested {
        match guard::thread_count(n, source) {
            Ok(n) => pool = pool.num_threads(n),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // Built now, also with the default count: a pool built on first use panics where its
    // threads cannot start (a tight `ulimit -v` or `ulimit -u`).
    if let Err(e) = pool.build_global() {
        match requested {
            Some((n, source)) => {
                eprintln!("error: {source} {n}: could not start the worker threads: {e}")
            }
            None => eprintln!(
                "error: could not start the worker threads (one per core; --threads sets \
                 fewer): {e}"
            ),
        }
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Demo(a) => demo::demo(a),
        Command::Init(a) => demo::init(a),
        Command::Bench(a) => bench::bench(a),
        Command::Forward(a) => commands::forward(a),
        Command::Hash(a) => commands::hash(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Compression(a) => commands::compression(a),
        Command::Weights(a) => commands::weights(a),
        Command::Compare(a) => commands::compare(a),
        Command::CudaKernels(a) => cuda::kernels(a),
        Command::HashParams(a) => v41::hash_params(a),
        Command::Table(c) => table::table(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Library errors already carry their cause in the message; add only new causes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            // One line: causes from other crates (a Redis parse error) can hold newlines.
            let msg = msg
                .lines()
                .map(str::trim_end)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            // A name read from a file can hold control characters (an escape sequence).
            eprintln!("error: {}", commands::shown(&msg));
            ExitCode::from(2)
        }
    }
}

/// The error line for the first option given a negative number (`--chunk -1`, which clap
/// takes for an unknown flag `-1`), if any: every numeric option of the CLI counts from 0,
/// and a text that starts with `-` is given with `=` (`--text=-1`).
fn negative_value(args: &[String]) -> Option<String> {
    args.windows(2).find_map(|w| {
        let negative = w[1].len() > 1
            && w[1].starts_with('-')
            && w[1][1..].starts_with(|c: char| c.is_ascii_digit() || c == '.');
        (w[0].starts_with("--") && !w[0].contains('=') && negative).then(|| {
            if w[0] == "--text" {
                format!(
                    "error: --text: found {}, which reads as an option; a text that starts \
                     with '-' is given as --text={}",
                    w[1], w[1]
                )
            } else {
                format!("error: {}: expected a value >= 0, found {}", w[0], w[1])
            }
        })
    })
}

/// A command line clap refuses: help and version as clap prints them; any other error as one
/// line (clap's first, with the lines it lists under it, such as missing arguments, possible
/// values or a tip, before its usage), exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // `--chunk -1`: clap reads `-1` as a flag of its own; name the option it was given to.
    if e.kind() == ErrorKind::UnknownArgument {
        if let Some(line) = negative_value(&std::env::args().collect::<Vec<_>>()) {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    }
    let text = e.render().to_string();
    let mut lines = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .unwrap_or("error: invalid command line")
        .to_string();
    let rest: Vec<&str> = lines.collect();
    if !rest.is_empty() {
        let sep = if line.ends_with(':') { " " } else { "; " };
        line = format!("{line}{sep}{}", rest.join(", "));
    }
    eprintln!("{line}");
    ExitCode::from(2)
}
