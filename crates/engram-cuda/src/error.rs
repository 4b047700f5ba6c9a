//! Errors of the CUDA backend.

use thiserror::Error;

/// What can go wrong on the CUDA path. Every variant names what was looked for and what
/// was found, in one line.
#[derive(Debug, Error)]
pub enum CudaError {
    /// A CUDA library (`libcuda`, `libnvrtc`, `libcublas`) could not be loaded.
    #[error("CUDA library {library} not found: {hint}")]
    MissingLibrary {
        /// The library's short name.
        library: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// A CUDA library loaded but lacks an entry point this crate calls: another library
    /// under the same name, or one older than CUDA 13. Checked before the first call, where
    /// `cudarc` would panic.
    #[error("CUDA library {library} lacks {symbol}: {hint}")]
    MissingSymbol {
        /// The library's short name.
        library: &'static str,
        /// The first entry point it lacks.
        symbol: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// The driver loaded but no usable GPU answered.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {kernel} for {arch}: {log}")]
    Compile {
        /// The source file.
        kernel: &'static str,
        /// The target architecture (`sm_90`).
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {what}: {detail}")]
    Driver {
        /// The operation.
        what: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {what}: {detail}")]
    Cublas {
        /// The operation.
        what: &'static str,
        /// cuBLAS's status.
        detail: String,
    },
    /// A target architecture that is not one (`compile`'s `arch`).
    #[error("target architecture: expected {expected}, found {found}")]
    BadArch {
        /// The forms accepted.
        expected: &'static str,
        /// What was given (at most 40 characters).
        found: String,
    },
    /// The layer's shape is outside what the CUDA kernels handle.
    #[error("not supported on the CUDA path: {field} must be {expected}, found {found}")]
    Unsupported {
        /// The config field or tensor.
        field: &'static str,
        /// What the kernels need.
        expected: String,
        /// What the layer has.
        found: String,
    },
    /// A kernel flagged bad input (an id outside the tokenizer, say).
    #[error("input_ids: expected ids below {vocab} (the tokenizer's size), found a larger one")]
    IdOutOfRange {
        /// The tokenizer's size.
        vocab: usize,
    },
    /// An error of the CPU library (config, weights, inputs).
    #[error(transparent)]
    Engram(#[from] engram::EngramError),
}

/// Result of the CUDA backend.
pub type Result<T> = std::result::Result<T, CudaError>;

/// Maps a driver error of `what` into a [`CudaError`].
pub(crate) fn drv<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> CudaError {
    move |e| CudaError::Driver {
        what,
        detail: format!("{e:?}"),
    }
}

/// Maps a cuBLAS error of `what` into a [`CudaError`].
pub(crate) fn blas<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> CudaError {
    move |e| CudaError::Cublas {
        what,
        detail: format!("{e:?}"),
    }
}
