//! The GPU path. What runs on any machine lives here: the kernels' launch
//! parameters and per-step index arrays (`launch`), and f64 references of
//! what each kernel computes (`reference`), both tested in CI. The CUDA
//! backend itself (`cuda`: kernels, cuBLAS, the model on the device, the
//! GPU check) builds with the `cuda` feature and runs only where there is
//! an NVIDIA GPU, except its kernels, which the feature's tests also run on
//! the host (`cuda::emulate`).

pub mod launch;
pub mod reference;

#[cfg(feature = "cuda")]
pub mod cuda;
