//! The communicator between the ranks of one tensor-parallel group. Layers
//! call it where sharding needs it (row-parallel outputs are all-reduced,
//! vocabulary-parallel logits gathered). World size 1 is a no-op
//! ([`SingleRank`]); between processes on CPU, [`tcp::TcpComm`]; between
//! GPUs, NCCL ([`nccl::NcclComm`], feature `cuda`).

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

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
