//! Storage types of weights and activations.

use crate::error::Result;

/// Storage type of the table and projection weights (and, on the GPU, of the activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    /// float32 everywhere.
    #[default]
    F32,
    /// bfloat16 table and projection weights, f32 accumulation and activations.
    Bf16,
}

impl std::str::FromStr for DType {
    type Err = crate::EngramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            o => Err(crate::EngramError::invalid("dtype", "`f32` or `bf16`", o)),
        }
    }
}
