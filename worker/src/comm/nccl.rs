//! NCCL between GPU ranks (feature `cuda`): one communicator per rank, on
//! the rank's CUDA stream, formed from a unique id that rank 0 creates and
//! sends to the others over the control plane (the TCP communicator every
//! group already has). CUDA and NCCL are loaded at run time, so this builds
//! without them; on a machine without them `NcclComm::new` is an error, not
//! a crash.
//!
//! The trait's host-buffer collectives are staged through device memory;
//! the GPU model sums its device buffers in place (`all_reduce_device`).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::Communicator;
use super::tcp::TcpComm;
use crate::error::{Result, WorkerError};

pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the NCCL communicator and the stream are used from one thread at
// a time (the engine's); `Comm` only lacks the markers because it holds a
// raw handle.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

/// Whether the CUDA driver and NCCL libraries can be loaded here.
pub fn available() -> bool {
    // SAFETY: these only try to open the shared libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> WorkerError {
    WorkerError::Comm(format!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Joins rank `control.rank()` of the group to NCCL on GPU `device`:
    /// rank 0 creates the unique id, `control` carries it to the others.
    pub fn new(control: &TcpComm, device: usize) -> Result<Self> {
        if !available() {
            return Err(WorkerError::Comm(
                "NCCL needs the CUDA driver and libnccl, and this machine has neither loadable \
                 (they are looked up as libcuda.so.1 and libnccl.so: link libnccl.so.2 as \
                 libnccl.so on LD_LIBRARY_PATH if that is the name it has)"
                    .into(),
            ));
        }
        let mut id_bytes = if control.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        control.broadcast(&mut id_bytes, 0)?;
        let internal: [std::ffi::c_char; 128] = id_bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| WorkerError::Comm("the NCCL id from rank 0 is not 128 bytes".into()))?;
        let ctx = CudaContext::new(device).map_err(|e| nccl_err(&format!("GPU {device}"), e))?;
        let stream =
            crate::gpu::cuda::ops::single_stream(&ctx).map_err(|e| nccl_err("stream", e))?;
        let comm = Comm::from_rank(
            stream.clone(),
            control.rank(),
            control.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_err("init", e))?;
        Ok(Self { comm, stream })
    }

    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| nccl_err("stream", e))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut d = self
            .stream
            .clone_htod(buf)
            .map_err(|e| nccl_err("copy in", e))?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce", e))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| nccl_err("copy out", e))?;
        self.sync()
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let d = self
            .stream
            .clone_htod(local)
            .map_err(|e| nccl_err("copy in", e))?;
        let mut all = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size())
            .map_err(|e| nccl_err("alloc", e))?;
        self.comm
            .all_gather(&d, &mut all)
            .map_err(|e| nccl_err("all-gather", e))?;
        let out = self
            .stream
            .clone_dtoh(&all)
            .map_err(|e| nccl_err("copy out", e))?;
        self.sync()?;
        Ok(out)
    }

    /// Every rank must pass a buffer of the root's length (NCCL moves a
    /// fixed count); the group's control messages go over TCP instead.
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut d = self
            .stream
            .clone_htod(buf.as_slice())
            .map_err(|e| nccl_err("copy in", e))?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        self.stream
            .memcpy_dtoh(&d, buf.as_mut_slice())
            .map_err(|e| nccl_err("copy out", e))?;
        self.sync()
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    fn cuda_stream(&self) -> Option<Arc<CudaStream>> {
        Some(self.stream.clone())
    }

    /// On the communicator's stream, which the GPU model's kernels use too
    /// (`cuda_stream`): no copy, no host wait, and capturable in a CUDA graph.
    fn all_reduce_device(&self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Option<Result<()>> {
        Some(
            self.comm
                .all_reduce_in_place(buf, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_err("all-reduce", e)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI), forming the communicator says why instead of
    /// crashing; with one, a group of one sums, gathers and broadcasts.
    #[test]
    fn a_group_of_one_or_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let control = TcpComm::lead(listener, 1, std::time::Duration::from_secs(5)).unwrap();
        match NcclComm::new(&control, 0) {
            Err(e) => {
                assert!(!available(), "NCCL is loadable, yet: {e}");
                assert!(e.to_string().contains("CUDA driver and libnccl"), "{e}");
            }
            Ok(c) => {
                let mut v = vec![1.0, 2.0];
                c.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v, vec![1.0, 2.0]);
                assert_eq!(c.all_gather(&[3.0]).unwrap(), vec![3.0]);
                let mut b = b"x".to_vec();
                c.broadcast(&mut b, 0).unwrap();
                assert_eq!(b, b"x");
            }
        }
    }
}
