//! Bit-exact reproductions of the random generators the reference draws from:
//! numpy's `default_rng(...).integers` (hash multipliers) and PyTorch's CPU generator
//! (default weights and mock hidden states). Recipes: `shared/notes/rng-compat.md`.

pub mod numpy;
pub mod torch;
