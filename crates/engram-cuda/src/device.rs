//! The GPU: library probing, context, stream, cuBLAS handle and the compiled module.

use crate::error::{blas, drv, CudaError, Result};
use crate::kernels;
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{sys as cu_sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use std::sync::Arc;

/// What the probe found.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Device name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
    /// Device memory, bytes.
    pub memory_bytes: usize,
    /// The NVRTC target, `sm_{major}{minor}`.
    pub arch: String,
}

/// Driver entry points checked before the first driver call: the probe's own and those of
/// every forward (module, launch, stream, memory), which a library that is not the NVIDIA
/// driver's, or a driver too old for CUDA 13, would lack.
const DRIVER_SYMBOLS: [&str; 14] = [
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuGetErrorString",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuMemAllocAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
];

/// The cuBLAS entry points this crate calls.
const CUBLAS_SYMBOLS: [&str; 6] = [
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetWorkspace_v2",
    "cublasSetMathMode",
    "cublasGemmEx",
];

/// `Ok(())` when the library of the `cudarc` sys module `$sys` loads and has every one of
/// `$symbols`; else [`CudaError::MissingLibrary`] (`$library`, hint `$missing`) or
/// [`CudaError::MissingSymbol`] naming the first it lacks (hint `$foreign`). `cudarc`
/// panics at the first call into a missing library or symbol, so both are checked first.
macro_rules! require_library {
    ($($sys:ident)::+, $library:literal, $missing:expr, $symbols:expr, $foreign:expr) => {{
        // SAFETY: only tries to dlopen the library's candidate names.
        if !unsafe { $($sys)::+::is_culib_present() } {
            Err($crate::error::CudaError::MissingLibrary {
                library: $library,
                hint: $missing,
            })
        } else {
            let lacks = |name: &&&str| {
                // SAFETY: the library loads (checked above), so `culib` returns it instead
                // of panicking; the symbol is only looked up (dlsym), never called or read.
                unsafe { $($sys)::+::culib().get::<*const std::ffi::c_void>(name.as_bytes()) }
                    .is_err()
            };
            match $symbols.iter().find(lacks) {
                Some(&symbol) => Err($crate::error::CudaError::MissingSymbol {
                    library: $library,
                    symbol,
                    hint: $foreign,
                }),
                None => Ok(()),
            }
        }
    }};
}
pub(crate) use require_library;

/// Checks, in order, that libcuda, libnvrtc and libcublas load and have the entry points
/// this crate calls, and that device 0 answers. Every CUDA entry point of this crate calls
/// it first: a call into a missing library or symbol panics inside `cudarc`, a failed
/// probe is one error line.
pub fn probe() -> Result<DeviceInfo> {
    require_library!(
        cudarc::driver::sys,
        "libcuda",
        "no NVIDIA driver on this machine (use --device cpu)",
        DRIVER_SYMBOLS,
        "the library found under the driver's name is not an NVIDIA driver for CUDA 13 or \
         later (update the driver, or use --device cpu)"
    )?;
    kernels::nvrtc_check()?;
    require_library!(
        cudarc::cublas::sys,
        "libcublas",
        "install CUDA 13's cuBLAS and put its lib folder on LD_LIBRARY_PATH",
        CUBLAS_SYMBOLS,
        "the library found under cuBLAS's name is not CUDA 13's cuBLAS (put CUDA 13's lib \
         folder first on LD_LIBRARY_PATH)"
    )?;
    cudarc::driver::result::init().map_err(|e| CudaError::NoDevice(format!("cuInit: {e:?}")))?;
    let count = CudaContext::device_count()
        .map_err(|e| CudaError::NoDevice(format!("cuDeviceGetCount: {e:?}")))?;
    if count < 1 {
        return Err(CudaError::NoDevice("the driver sees no GPU".into()));
    }
    let ctx = CudaContext::new(0).map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
    info(&ctx)
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    let cc = ctx
        .compute_capability()
        .map_err(drv("compute capability"))?;
    let sms = ctx
        .attribute(cu_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(drv("multiprocessor count"))?;
    Ok(DeviceInfo {
        name: ctx.name().map_err(drv("device name"))?,
        compute_capability: cc,
        multiprocessors: sms,
        memory_bytes: ctx.total_mem().map_err(drv("total memory"))?,
        arch: format!("sm_{}{}", cc.0, cc.1),
    })
}

/// The loaded kernels of one activation type.
pub(crate) struct Kernels {
    pub hash_gather: CudaFunction,
    pub gate: CudaFunction,
    pub conv_out: CudaFunction,
    pub conv_rows: CudaFunction,
    pub advance_state: CudaFunction,
}

/// Context, one stream, a cuBLAS handle on it (with its own workspace, so that its calls
/// can be captured in a CUDA graph) and the compiled module.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// A second stream for the gate/conv kernels of a pipelined prefill.
    pub(crate) side: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    _module: Arc<CudaModule>,
    pub(crate) f32_kernels: Kernels,
    pub(crate) bf16_kernels: Kernels,
    /// What the probe found.
    pub info: DeviceInfo,
    /// What ptxas reported when the module was compiled.
    pub compiled: Vec<kernels::KernelReport>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({:?})", self.info)
    }
}

const BLAS_WORKSPACE: usize = 32 << 20;

impl Gpu {
    /// Probes, opens device 0 and compiles the kernels for its architecture.
    pub fn open() -> Result<Arc<Gpu>> {
        probe()?;
        let ctx = CudaContext::new(0).map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
        // One stream, ordered: cudarc's cross-stream event tracking is not needed and would
        // get in the way of graph capture.
        // SAFETY: no other stream of this context touches our buffers.
        unsafe { ctx.disable_event_tracking() };
        let info = info(&ctx)?;
        let stream = ctx.new_stream().map_err(drv("new stream"))?;
        let side = ctx.new_stream().map_err(drv("new stream"))?;
        let compiled = kernels::compile(&info.arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin.clone()))
            .map_err(drv("loading the CUBIN"))?;
        let load = |name: &str| -> Result<CudaFunction> {
            module.load_function(name).map_err(|e| CudaError::Driver {
                what: "loading a kernel",
                detail: format!("{name}: {e:?}"),
            })
        };
        let kernels_of = |t: &str| -> Result<Kernels> {
            Ok(Kernels {
                hash_gather: load(&format!("hash_gather_{t}"))?,
                gate: load(&format!("gate_{t}"))?,
                conv_out: load(&format!("conv_out_{t}"))?,
                conv_rows: load(&format!("conv_rows_{t}"))?,
                advance_state: load(&format!("advance_state_{t}"))?,
            })
        };
        let f32_kernels = kernels_of("f32")?;
        let bf16_kernels = kernels_of("bf16")?;
        let blas_h = CudaBlas::new(stream.clone()).map_err(blas("creating the handle"))?;
        let ws = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(drv("cuBLAS workspace"))?;
        let (ws_ptr, _g) = cudarc::driver::DevicePtr::device_ptr(&ws, &stream);
        // SAFETY: the handle is live; the workspace outlives it (both owned by `Gpu`, the
        // workspace dropped after the handle by field order is not required: cuBLAS only
        // uses it during calls, which all happen while `Gpu` lives).
        unsafe {
            cublas_sys::cublasSetWorkspace_v2(*blas_h.handle(), ws_ptr as *mut _, BLAS_WORKSPACE)
                .result()
                .map_err(blas("setting the workspace"))?;
            // Plain f32 arithmetic: no TF32 (it would break the 1e-4 parity).
            cublas_sys::cublasSetMathMode(
                *blas_h.handle(),
                cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
            .result()
            .map_err(blas("setting the math mode"))?;
        }
        drop(_g);
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            side,
            blas: blas_h,
            _blas_workspace: ws,
            _module: module,
            f32_kernels,
            bf16_kernels,
            info,
            compiled: compiled.reports,
        }))
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }
}
