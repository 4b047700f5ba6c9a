//! The DeepSeek-V4.1 Engram layer (`../shared/notes/v41-semantics.md`): its config, hashing
//! (one prime base for every order, dead spans), fp8 table rows, checkpoints, and the layer
//! itself on a reference and a fused path.
//!
//! ```no_run
//! use engram::v41::{Checkpoint, V41Config, V41Layer, V41Path};
//! use std::sync::Arc;
//! let cfg = V41Config::from_json_file("config.json")?;
//! let tok = engram::Tokenizer::from_name_or_path("path/to/tokenizer.json")?;
//! let comp = Arc::new(engram::CompressedTokenizer::build(&tok)?);
//! let layer = V41Layer::load(&cfg, comp, &Checkpoint::open("checkpoint/")?, 1)?;
//! # let (ids, hidden) = (vec![0i64], vec![0f32; 4 * 5120]);
//! let s = layer.forward(&ids, &hidden, None, 1, 1, true, V41Path::Fused, false)?;
//! # Ok::<(), engram::EngramError>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod fp8;
pub mod hashing;
pub mod layer;

pub use checkpoint::Checkpoint;
pub use config::V41Config;
pub use hashing::{V41Hashing, DEAD};
pub use layer::{TableOptions, V41Layer, V41Path, V41Stages, V41State, V41Weights};
