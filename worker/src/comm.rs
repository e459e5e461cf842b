//! The communicator between the ranks of one tensor-parallel group. Layers
//! call it where sharding needs it (row-parallel outputs are all-reduced,
//! vocabulary-parallel logits gathered). World size 1 is a no-op
//! ([`SingleRank`]); between processes on CPU, [`tcp::TcpComm`]; between
//! GPUs, NCCL ([`nccl::NcclComm`], feature `cuda`).

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::error::Result;

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `buf` element-wise across ranks; every rank ends with the sum.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenates every rank's `local` in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// Copies `buf` from rank `root` to every rank.
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Sums a buffer in GPU memory across ranks, in place and on the device,
    /// enqueued on [`cuda_stream`](Self::cuda_stream). Only a communicator
    /// of GPUs (NCCL) can; the others answer None and the caller goes
    /// through host memory.
    #[cfg(feature = "cuda")]
    fn all_reduce_device(&self, _buf: &mut cudarc::driver::CudaSlice<f32>) -> Option<Result<()>> {
        None
    }
    /// The stream a communicator of GPUs runs on, which the rank's model
    /// must use too so that its kernels and the collectives stay in order.
    #[cfg(feature = "cuda")]
    fn cuda_stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        None
    }
}

/// The group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Adds the time of every reduction and gather of `inner` to a clock the
/// engine reads once per step (`aquila_worker_step_collective_seconds`).
/// Host time: exact for TCP and for NCCL, whose calls synchronize their
/// stream before returning. Broadcast and barrier (the control plane) are
/// not counted.
pub struct Timed {
    inner: Arc<dyn Communicator>,
    nanos: Arc<AtomicU64>,
}

impl Timed {
    pub fn new(inner: Arc<dyn Communicator>, nanos: Arc<AtomicU64>) -> Self {
        Timed { inner, nanos }
    }

    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(took, Relaxed);
        out
    }
}

impl Communicator for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.time(|| self.inner.all_reduce_sum(buf))
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        self.time(|| self.inner.all_gather(local))
    }
    /// Host time of enqueueing: the GPU's time shows in the step's.
    #[cfg(feature = "cuda")]
    fn all_reduce_device(&self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Option<Result<()>> {
        self.time(|| self.inner.all_reduce_device(buf))
    }
    #[cfg(feature = "cuda")]
    fn cuda_stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        self.inner.cuda_stream()
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}
