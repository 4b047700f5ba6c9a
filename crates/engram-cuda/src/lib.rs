//! # engram-cuda
//!
//! The Engram layer on NVIDIA GPUs, beside the CPU engine of the [`engram`] crate and
//! checked against the same golden files.
//!
//! - Kernels are CUDA C in `kernels/engram.cu`, compiled at run time by NVRTC straight to a
//!   CUBIN for the device ([`kernels::compile`]; no GPU needed to compile).
//! - The projection is one cuBLAS GEMM (`gemm_ex`): f32 with plain f32 math (never TF32),
//!   or bf16 inputs with f32 accumulation.
//! - The libraries are loaded at run time: the same binary builds and runs on machines
//!   without CUDA, where [`probe`] and [`Gpu::open`] return one clear error instead of a
//!   panic.
//!
//! ```no_run
//! use engram_cuda::{CudaEngram, Gpu};
//! # fn layer() -> engram::Engram { unimplemented!() }
//! let layer: engram::Engram = layer();
//! let gpu = Gpu::open()?; // probes libcuda, libnvrtc, libcublas and device 0
//! let cuda = CudaEngram::new(gpu, &layer, engram::DType::F32)?;
//! # let (ids, hidden, b, l) = (vec![0i64], vec![0f32], 1, 1);
//! let stages = cuda.forward(&ids, &hidden, b, l, true)?; // every stage, read back
//! # Ok::<(), engram_cuda::CudaError>(())
//! ```
#![deny(missing_docs)]

pub mod device;
pub mod error;
pub mod kernels;
pub mod layer;

pub use cudarc::driver::CudaGraph;
pub use device::{probe, DeviceInfo, Gpu};
pub use error::{CudaError, Result};
pub use layer::{median, ConvKernel, CudaEngram, DeviceState, Workspace};
