//! What runs the model's steps: the CPU engine (`model::Llama`, its paged KV
//! pool in host memory) or, with `--device cuda`, the model on a GPU with
//! its pool in device memory (`gpu::cuda`). The engine and the
//! tensor-parallel followers drive either one through `Backend::forward`,
//! with the same inputs and the same block tables.

use std::path::Path;
use std::sync::Arc;

use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::{KvDtype, PagedKv};
use crate::loader::{self, LoadOptions, Loaded};
use crate::model::{Llama, LogitsFor, SeqInput, TpPlan};

/// Where the model runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    /// An NVIDIA GPU (a worker built with `--features cuda`); rank r of a
    /// tensor-parallel group uses GPU r.
    Cuda,
}

/// A loaded model, before its KV cache exists.
// One per worker, moved a few times: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Cpu(Llama),
    #[cfg(feature = "cuda")]
    Cuda(crate::gpu::cuda::model::CudaModel),
}

/// A model with its KV cache: what runs steps.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Cpu {
        model: Llama,
        kv: PagedKv,
    },
    #[cfg(feature = "cuda")]
    Cuda(crate::gpu::cuda::model::CudaModel),
}

/// Loads `path` for `device`; a GPU rank takes GPU `comm.rank()`.
pub fn load(
    path: &Path,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
    device: Device,
) -> Result<Loaded<Model>> {
    ensure_built(device)?;
    load_checkpoint(loader::Checkpoint::open(path)?, opts, comm, device)
}

/// Refuses a device this build has no backend for, before anything is read.
pub fn ensure_built(device: Device) -> Result<()> {
    match device {
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(no_cuda()),
        _ => Ok(()),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> crate::error::WorkerError {
    crate::error::WorkerError::Config(
        "--device cuda: this worker was built without the CUDA backend (build with --features cuda)"
            .into(),
    )
}

/// [`load`] of a checkpoint already opened.
pub fn load_checkpoint(
    ckpt: loader::Checkpoint,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
    device: Device,
) -> Result<Loaded<Model>> {
    match device {
        Device::Cpu => Ok(loader::load_checkpoint(ckpt, opts, comm)?.map(Model::Cpu)),
        #[cfg(feature = "cuda")]
        Device::Cuda => ckpt.load_with(opts, |cfg, store, progress| {
            use crate::gpu::cuda::{model::CudaModel, ops::Gpu};
            // NCCL's stream if the group has one: kernels and collectives in order.
            let gpu = Arc::new(match comm.cuda_stream() {
                Some(stream) => Gpu::on(stream)?,
                None => Gpu::new(comm.rank())?,
            });
            tracing::info!(gpu = %gpu.name, sms = gpu.sms, kernels = %gpu.kernels, "loading the model onto the GPU");
            // The GPU loader reads tensor by tensor: each counts its share.
            let world = comm.world_size();
            progress.set_total(store.total_bytes() / world);
            let mut tensor_read = |name: &str| {
                progress.add(store.entry(name).map_or(0, |e| e.bytes()) / world)
            };
            let m = CudaModel::load(gpu, cfg, store, comm, opts.dtype, &mut tensor_read)?;
            let bytes = m.weight_bytes();
            Ok((Model::Cuda(m), bytes))
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(no_cuda()),
    }
}

impl Model {
    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Cpu(m) => m.config(),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => m.config(),
        }
    }

    /// This rank's share of the model.
    pub fn plan(&self) -> &TpPlan {
        match self {
            Model::Cpu(m) => m.plan(),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => m.plan(),
        }
    }

    /// Decode batches of up to `max_batch` sequences run as CUDA graphs on
    /// a GPU (0: none); the CPU has no graphs.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn set_cuda_graph_max_batch(&mut self, max_batch: usize) {
        match self {
            Model::Cpu(_) => {}
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => m.set_graph_max_batch(max_batch),
        }
    }

    /// Bytes the KV cache may take where the device says so: on a GPU,
    /// `utilization` of its memory less the weights and the buffers of a
    /// step of `max_tokens` tokens over `max_seqs` sequences; None on the
    /// CPU, where --kv-cache-mib decides.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn device_kv_budget(
        &self,
        utilization: f64,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Option<usize>> {
        match self {
            Model::Cpu(_) => Ok(None),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => m.kv_budget(utilization, max_tokens, max_seqs).map(Some),
        }
    }

    /// Bytes one token takes in this rank's KV cache (keys and values, all
    /// layers, its heads): in `kv_dtype` on the CPU; on a GPU the cache holds
    /// the weights' 16-bit type.
    pub fn kv_bytes_per_token(&self, kv_dtype: KvDtype) -> usize {
        let dtype = match self {
            Model::Cpu(_) => kv_dtype,
            // bf16 or f16: two bytes either way.
            #[cfg(feature = "cuda")]
            Model::Cuda(_) => KvDtype::Bf16,
        };
        let cfg = self.config();
        cfg.kv_bytes_per_token(dtype) * self.plan().kv_heads.len() / cfg.num_kv_heads
    }

    /// What the KV cache holds, for the logs.
    pub fn kv_label(&self, kv_dtype: KvDtype) -> &'static str {
        match self {
            Model::Cpu(_) => kv_dtype.label(),
            #[cfg(feature = "cuda")]
            Model::Cuda(m) => match m {
                crate::gpu::cuda::model::CudaModel::Bf16(_) => "bf16 on the GPU",
                crate::gpu::cuda::model::CudaModel::F16(_) => "f16 on the GPU",
            },
        }
    }

    /// Allocates the KV cache: `num_blocks` blocks of `block_size` tokens.
    pub fn into_backend(
        self,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDtype,
    ) -> Result<Backend> {
        Ok(match self {
            Model::Cpu(model) => Backend::Cpu {
                kv: model.new_kv_with(num_blocks, block_size, kv_dtype),
                model,
            },
            #[cfg(feature = "cuda")]
            Model::Cuda(mut m) => {
                m.alloc_cache(num_blocks, block_size)?;
                Backend::Cuda(m)
            }
        })
    }
}

/// A sequence's result of a step: its logits (`[n, vocab]`), or the
/// greedy pick itself where the device made it.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Logits(Vec<f32>),
    Token(u32),
}

impl Backend {
    pub fn config(&self) -> &ModelConfig {
        match self {
            Backend::Cpu { model, .. } => model.config(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.config(),
        }
    }

    /// One engine step (the last token of each sequence). Where `greedy[i]`
    /// (its sampling is a plain argmax), a GPU alone picks the token and
    /// returns it instead of the logits, which then never leave the device:
    /// at a batch of 256 and Aquila's 100k vocabulary that is 100 MB a step
    /// not copied to the host. The CPU returns logits for every sequence.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn step(&mut self, seqs: &[SeqInput<'_>], greedy: &[bool]) -> Result<Vec<Next>> {
        match self {
            Backend::Cpu { model, kv } => Ok(model
                .forward(kv, seqs, LogitsFor::Last)?
                .into_iter()
                .map(Next::Logits)
                .collect()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.step(seqs, greedy),
        }
    }

    /// One step: per sequence, logits `[n, vocab]` (see `Llama::forward`).
    pub fn forward(&mut self, seqs: &[SeqInput<'_>], which: LogitsFor) -> Result<Vec<Vec<f32>>> {
        match self {
            Backend::Cpu { model, kv } => model.forward(kv, seqs, which),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.forward(seqs, which),
        }
    }
}

#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let opts = LoadOptions {
            dtype: crate::model::WeightDtype::Bf16,
            name: None,
            tp_invariant: false,
        };
        let comm = Arc::new(crate::comm::SingleRank);
        let e = load(Path::new("/nonexistent"), &opts, comm, Device::Cuda)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
