//! The CUDA backend (feature `cuda`): our kernels (`kernels.cu`, compiled
//! by nvcc in build.rs) and cuBLAS behind typed calls (`ops`), the model on
//! the device (`model`), and the GPU check (`check`). CUDA libraries are
//! loaded at run time: on a machine without them every entry point returns
//! an error that says so. The kernels also run on the host in the tests
//! (`emulate`).

pub mod check;
#[cfg(test)]
mod emulate;
pub mod model;
pub mod ops;
