//! With the `cuda` feature, compiles the CUDA kernels
//! (`src/gpu/cuda/kernels.cu`) with nvcc into one fatbin that the worker
//! embeds: SASS for `CUDA_COMPUTE_CAP` (default 90, Hopper) and PTX for it,
//! which the driver compiles for newer GPUs. Without the feature it does
//! nothing, so the default build needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH;
//! tests/run.sh installs it from PyPI (`nvidia-cuda-nvcc`) and sets `NVCC`.
//!
//! It also compiles the same kernels for the host with the C++ compiler
//! (`src/gpu/cuda/emulate.cpp`): the tests run them there against the f64
//! references (`gpu::cuda::emulate`); nothing else links them.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &str = "src/gpu/cuda/kernels.cu";

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed={KERNELS}");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.replace('.', "");
    if cap.is_empty() || !cap.bytes().all(|b| b.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP = {cap:?}: expected digits such as 90 (Hopper) or 80");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("kernels.fatbin");
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-std=c++17"])
        .arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
        .arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(KERNELS)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature compiles its kernels with nvcc, and `{}` did not run ({e}). \
                 Set NVCC or CUDA_HOME, or run tests/run.sh, which installs nvcc from PyPI",
                nvcc.display()
            )
        });
    if !status.success() {
        panic!("nvcc failed on {KERNELS} ({status})");
    }
    // "nvcc 13.4, sm_90", for the logs of a GPU whose driver refuses it.
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.split("release ").nth(1))
                .and_then(|r| r.split(',').next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into());
    println!("cargo:rustc-env=AQUILA_KERNELS_BUILT_BY=nvcc {version}, sm_{cap}");
    #[cfg(feature = "cuda")]
    emulation();
}

/// The kernels for the host, over emulate.h (the `cc` build dependency
/// comes with the feature).
#[cfg(feature = "cuda")]
fn emulation() {
    const EMULATION: [&str; 2] = ["src/gpu/cuda/emulate.cpp", "src/gpu/cuda/emulate.h"];
    for f in EMULATION {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        // CUDA's `#pragma unroll` means nothing to a host compiler.
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-sign-compare")
        .file(EMULATION[0])
        .compile("aquila_kernels_emulated");
}
