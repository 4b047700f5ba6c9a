//! # engram
//!
//! An exact CPU implementation of DeepSeek's Engram layer ("Conditional Memory via Scalable
//! Lookup"). See the workspace README for the command-line tool.
#![deny(missing_docs)]

mod alloc;
pub mod compression;
pub mod config;
pub mod error;
pub mod fused;
pub mod hashing;
pub mod init;
pub mod layer;
pub mod ops;
pub mod rng;
pub mod state_io;
pub mod tensors;
pub mod tokenizer;
pub mod weights;

pub use compression::CompressedTokenizer;
pub use config::EngramConfig;
pub use error::{EngramError, Result};
pub use fused::DType;
pub use hashing::NgramHashMapping;
pub use layer::{Engram, EngramState, ForwardPath, Stages};
pub use tokenizer::Tokenizer;
pub use weights::EngramWeights;
