//! The CUDA C kernels, compiled at run time by NVRTC straight to a CUBIN for one
//! architecture (not PTX: PTX from an NVRTC newer than the driver would not load).

use crate::error::{CudaError, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::{CStr, CString};

/// The demo layer's kernels (`kernels/engram.cu`).
pub const ENGRAM_CU: &str = include_str!("../kernels/engram.cu");

/// Every `extern "C"` kernel of [`ENGRAM_CU`].
pub const KERNELS: &[&str] = &[
    "hash_gather_f32",
    "hash_gather_bf16",
    "gate_f32",
    "gate_bf16",
    "conv_out_f32",
    "conv_out_bf16",
    "conv_rows_f32",
    "conv_rows_bf16",
    "advance_state_f32",
    "advance_state_bf16",
];

/// One kernel's resources as ptxas reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelReport {
    /// Kernel name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Stack frame bytes per thread.
    pub stack_bytes: u32,
    /// Spill stores + loads, bytes.
    pub spill_bytes: u32,
}

/// A compiled module: the CUBIN and what ptxas said about each kernel.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The target (`sm_90`).
    pub arch: String,
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// Per-kernel resources, in [`KERNELS`] order where reported.
    pub reports: Vec<KernelReport>,
    /// NVRTC's full log.
    pub log: String,
}

/// The NVRTC entry points this crate calls, checked before the first call
/// ([`nvrtc_check`]).
const NVRTC_SYMBOLS: [&str; 8] = [
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetCUBIN",
    "nvrtcGetCUBINSize",
    "nvrtcGetProgramLog",
    "nvrtcGetProgramLogSize",
];

/// Whether libnvrtc loads and has every entry point this crate calls ([`nvrtc_check`]).
pub fn nvrtc_present() -> bool {
    nvrtc_check().is_ok()
}

/// Checks that libnvrtc loads and has every entry point this crate calls: it must, before
/// any NVRTC call, since `cudarc` panics on a missing library or symbol.
pub fn nvrtc_check() -> Result<()> {
    crate::device::require_library!(
        cudarc::nvrtc::sys,
        "libnvrtc",
        "install CUDA 13's NVRTC (e.g. the PyPI wheel nvidia-cuda-nvrtc==13.0.88) and put its \
         lib folder on LD_LIBRARY_PATH",
        NVRTC_SYMBOLS,
        "the library found under NVRTC's name is not CUDA 13's NVRTC (put CUDA 13's lib \
         folder first on LD_LIBRARY_PATH)"
    )
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for the call.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    r.result().map_err(|e| CudaError::Compile {
        kernel: "nvrtcVersion",
        arch: String::new(),
        log: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<()> {
    nvrtc_check()
}

/// Compiles [`ENGRAM_CU`] for `arch` (`sm_90`, `sm_80`, ...) with NVRTC, to a CUBIN.
/// Needs only libnvrtc, no GPU.
pub fn compile(arch: &str) -> Result<Compiled> {
    let fail = |log: String| CudaError::Compile {
        kernel: "engram.cu",
        arch: arch.to_string(),
        log,
    };
    // sm_ and a compute capability of two or more digits, maybe a feature suffix (sm_90a):
    // checked before NVRTC is looked for, so a typo is named on machines without CUDA too.
    let cc = arch.strip_prefix("sm_").unwrap_or("");
    let digits = cc.bytes().take_while(u8::is_ascii_digit).count();
    if digits < 2 || !cc[digits..].bytes().all(|b| b.is_ascii_lowercase()) || cc.len() > digits + 1
    {
        return Err(CudaError::BadArch {
            expected: "sm_ and a compute capability (sm_80, sm_90, sm_90a)",
            found: format!("{:?}", arch.chars().take(40).collect::<String>()),
        });
    }
    require_nvrtc()?;
    let src = CString::new(ENGRAM_CU).map_err(|_| fail("NUL byte in the source".into()))?;
    let name = CString::new("engram.cu").expect("no NUL");
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=--verbose".to_string(),
    ];
    // SAFETY: `prog` is a live program; the options are valid C strings for the call.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    // SAFETY: `prog` is live; the log is NUL-terminated by NVRTC.
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|raw| {
            // SAFETY: NVRTC writes a NUL-terminated string of the size it reported.
            unsafe { CStr::from_ptr(raw.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let result = compiled
        .map_err(|e| fail(format!("{e:?}: {}", log.trim())))
        .and_then(|()| {
            let mut size = 0usize;
            // SAFETY: `prog` compiled; `size` is a valid out-pointer.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has the size NVRTC reported.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok(cubin)
        });
    // SAFETY: `prog` is destroyed once, after its last use.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    let cubin = result?;
    if cubin.is_empty() {
        return Err(fail("NVRTC returned an empty CUBIN".into()));
    }
    Ok(Compiled {
        arch: arch.to_string(),
        cubin,
        reports: parse_ptxas_log(&log),
        log,
    })
}

/// Reads ptxas's `--verbose` lines: `Compiling entry function 'k'`, `Used N registers`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line
            .split("Compiling entry function '")
            .nth(1)
            .or_else(|| line.split("Function properties for ").nth(1))
        {
            let name = rest.split('\'').next().unwrap_or("").trim().to_string();
            if !name.is_empty() && out.last().map(|r| &r.name) != Some(&name) {
                if let Some(i) = out.iter().position(|r| r.name == name) {
                    let r = out.remove(i);
                    out.push(r);
                } else {
                    out.push(KernelReport {
                        name,
                        ..Default::default()
                    });
                }
            }
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if let Some(n) = number_before(line, "registers") {
            cur.registers = n;
        }
        if let Some(n) = number_before(line, "bytes stack frame") {
            cur.stack_bytes = n;
        }
        let stores = number_before(line, "bytes spill stores").unwrap_or(0);
        let loads = number_before(line, "bytes spill loads").unwrap_or(0);
        if stores + loads > 0 {
            cur.spill_bytes = stores + loads;
        }
    }
    out.sort_by_key(|r| {
        KERNELS
            .iter()
            .position(|k| *k == r.name)
            .unwrap_or(usize::MAX)
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_log_is_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'gate_f32' for 'sm_90'\n\
ptxas info    : Function properties for gate_f32\n\
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 40 registers, used 0 barriers, 424 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'hash_gather_f32' for 'sm_90'\n\
ptxas info    : Function properties for hash_gather_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 30 registers, used 1 barriers, 440 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "hash_gather_f32");
        assert_eq!(
            (r[0].registers, r[0].stack_bytes, r[0].spill_bytes),
            (30, 0, 0)
        );
        assert_eq!(r[1].name, "gate_f32");
        assert_eq!(
            (r[1].registers, r[1].stack_bytes, r[1].spill_bytes),
            (40, 8, 8)
        );
    }

    /// Where libnvrtc is on the library path (CI installs it), every kernel compiles for
    /// Hopper without spills; elsewhere the test says why it did nothing.
    #[test]
    fn every_kernel_compiles_for_sm90() {
        if !nvrtc_present() {
            eprintln!("skipped: libnvrtc not found (put CUDA 13's NVRTC on LD_LIBRARY_PATH)");
            return;
        }
        let c = compile("sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.cubin.starts_with(b"\x7fELF"), "a CUBIN is an ELF image");
        let names: Vec<&str> = c.reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, KERNELS, "ptxas reported every kernel");
        for r in &c.reports {
            assert!(r.registers > 0, "{r:?}");
            assert_eq!(r.spill_bytes, 0, "{} spills", r.name);
        }
        assert!(compile("sm_9x!").is_err());
    }

    /// A malformed architecture is named whether or not NVRTC is installed.
    #[test]
    fn malformed_architectures_are_refused_before_nvrtc_is_looked_for() {
        for bad in [
            "foo",
            "sm_",
            "sm_9",
            "sm_9x!",
            "sm_90ab",
            "sm_90A",
            "compute_90",
        ] {
            let e = compile(bad).unwrap_err().to_string();
            assert!(e.contains("compute capability"), "{bad}: {e}");
        }
    }
}
