//! # engram
//!
//! An exact CPU implementation of DeepSeek's Engram layer ("Conditional Memory via Scalable
//! Lookup"), stage for stage equal to the PyTorch reference (`engram_demo_v1.py`).
//!
//! - [`EngramConfig`]: the reference's configuration (JSON with its field names).
//! - [`Tokenizer`], [`CompressedTokenizer`], [`NgramHashMapping`]: ids, canonical ids,
//!   multipliers, primes and n-gram hashes, bit for bit.
//! - [`EngramWeights`]: state-dict weights (memory-mapped table); [`init`]: the weights
//!   PyTorch creates after `torch.manual_seed(s)`.
//! - [`Engram`]: the layer. [`ForwardPath::Reference`] runs plain loops ([`ops`]) and keeps
//!   every stage; [`ForwardPath::Fused`] runs the tiled multicore kernels ([`fused`]).
//!   [`Engram::forward_chunk`] and [`Engram::forward_ragged`] carry an [`EngramState`] per
//!   sequence for chunked prefill and decode; [`state_io`] saves and restores them.
//!
//! ```
//! use engram::{Engram, EngramConfig, ForwardPath, NgramHashMapping, Tokenizer};
//! use std::sync::Arc;
//!
//! // A small layer: two 8-head n-gram orders with tables of about 2,000 rows per head.
//! let cfg = EngramConfig { engram_vocab_size: vec![1999, 2503], layer_id: 15, ..Default::default() };
//! let tok = Tokenizer::bundled()?;
//! let hashing = Arc::new(NgramHashMapping::new(&cfg, Arc::new(engram::CompressedTokenizer::build(&tok)?))?);
//! let (weights, mut g) = engram::init::torch_default_weights(&cfg, &hashing, 42, &mut |_| {})?;
//! let layer = Engram::new(cfg.clone(), hashing, weights)?;
//!
//! let ids = tok.encode("Engram gives a transformer an O(1) memory.", true)?;
//! let l = ids.len();
//! let hidden = g.randn(l * cfg.hc_mult * cfg.hidden_size); // [1, L, HC, D]
//! let reference = layer.forward(&ids, &hidden, 1, l, ForwardPath::Reference)?;
//! let fused = layer.forward(&ids, &hidden, 1, l, ForwardPath::Fused)?;
//! assert_eq!(reference.hash_ids, fused.hash_ids);
//! assert!(reference.output.iter().zip(&fused.output).all(|(a, b)| (a - b).abs() < 1e-4));
//!
//! // The same sequence in two chunks, carrying the state.
//! let c = cfg.hc_mult * cfg.hidden_size;
//! let mut state = layer.new_state();
//! let first = layer.forward_chunk(&mut state, &ids[..5], &hidden[..5 * c], ForwardPath::Fused)?;
//! let rest = layer.forward_chunk(&mut state, &ids[5..], &hidden[5 * c..], ForwardPath::Fused)?;
//! assert!((rest.output[0] - fused.output[5 * c]).abs() < 1e-5);
//! assert_eq!(first.output.len() + rest.output.len(), fused.output.len());
//! # Ok::<(), engram::EngramError>(())
//! ```
#![deny(missing_docs)]

mod alloc;
pub mod atomic;
pub mod budget;
pub mod compression;
pub mod config;
pub mod dtype;
pub mod error;
pub mod files;
pub mod fused;
pub mod hashing;
pub mod init;
pub mod layer;
pub mod model;
pub mod ops;
pub mod rng;
pub mod rows;
pub mod state;
pub mod state_io;
pub mod tensors;
pub mod tokenizer;
pub mod v41;
pub mod weights;

pub use alloc::{failure_handled, fallible, LineAligned};
pub use compression::CompressedTokenizer;
pub use config::{EngramConfig, LayerSizes};
pub use dtype::DType;
pub use error::{EngramError, Result};
pub use hashing::NgramHashMapping;
pub use layer::{Engram, ForwardPath, Stages};
pub use model::DemoModel;
pub use state::EngramState;
pub use tokenizer::Tokenizer;
pub use weights::EngramWeights;
