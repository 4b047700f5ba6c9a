//! `engram`: the command-line front end of the `engram` crate.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exact, fast CPU implementation of DeepSeek's Engram layer.
#[derive(Parser)]
#[command(name = "engram", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(a) => commands::forward(a),
        Command::Hash(a) => commands::hash(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Compression(a) => commands::compression(a),
        Command::Weights(a) => commands::weights(a),
        Command::Compare(a) => commands::compare(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
