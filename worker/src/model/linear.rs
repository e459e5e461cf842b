//! Linear layers and the tensor-parallel wrappers around them. Activations
//! are row-major f32 slices `[rows, in]`; a layer returns `[rows, out]` f32
//! whatever its weights are stored as. Weight layout is PyTorch's `[out, in]`.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::kernels;
use crate::comm::Communicator;
use crate::error::{Result, WorkerError};
use crate::weights::Weight;

/// The dtype float weights are kept in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn label(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// Up to this many rows (decode batches) f32 products use our unpacked
/// kernel; above it (prefill) candle's gemm, whose packing then pays off.
const SMALL_BATCH: usize = 32;

enum Kind {
    /// f32 weights: candle's gemm.
    F32(Tensor),
    /// 16-bit float weights as raw bits, `[out, in]`; multiplied by our own
    /// kernel with f32 accumulation (candle's CPU matmul has no bf16).
    Half { bits: Vec<u16>, bf16: bool },
    /// GGML-quantized weights: candle's quantized matmul.
    Quantized(QMatMul),
}

pub struct Linear {
    kind: Kind,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// Takes a `[out, in]` weight, checking its shape against what the config
    /// says. Quantized weights stay quantized; float weights become `dtype`.
    pub fn new(
        name: &str,
        w: Weight,
        out_dim: usize,
        in_dim: usize,
        dtype: WeightDtype,
    ) -> Result<Self> {
        if w.dims() != [out_dim, in_dim] {
            return Err(WorkerError::Config(format!(
                "{name}: shape {:?}, the config implies [{out_dim}, {in_dim}]",
                w.dims()
            )));
        }
        let werr = |source| WorkerError::Weight {
            name: name.to_string(),
            source,
        };
        let dense = match w {
            Weight::Quantized(q) => match QMatMul::from_arc(q).map_err(werr)? {
                QMatMul::QTensor(q) => {
                    return Ok(Self {
                        kind: Kind::Quantized(QMatMul::QTensor(q)),
                        in_dim,
                        out_dim,
                    });
                }
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t,
            },
            Weight::Dense(t) => t,
        };
        let kind = match dtype {
            WeightDtype::F32 => Kind::F32(dense.to_dtype(DType::F32).map_err(werr)?),
            WeightDtype::Bf16 => Kind::Half {
                bits: to_bits::<bf16>(&dense, DType::BF16).map_err(werr)?,
                bf16: true,
            },
            WeightDtype::F16 => Kind::Half {
                bits: to_bits::<f16>(&dense, DType::F16).map_err(werr)?,
                bf16: false,
            },
        };
        Ok(Self {
            kind,
            in_dim,
            out_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        match &self.kind {
            Kind::F32(w) if rows <= SMALL_BATCH => {
                let (storage, layout) = w.storage_and_layout();
                match &*storage {
                    candle_core::Storage::Cpu(cpu) if layout.is_contiguous() => {
                        let data = &cpu.as_slice::<f32>()?[layout.start_offset()..];
                        Ok(kernels::matmul_t(
                            x,
                            rows,
                            &data[..self.out_dim * self.in_dim],
                            self.out_dim,
                            self.in_dim,
                        ))
                    }
                    _ => Err(candle_core::Error::Msg(
                        "f32 weights must be contiguous on the CPU".into(),
                    )
                    .into()),
                }
            }
            Kind::F32(w) => {
                let xt = Tensor::from_slice(x, (rows, self.in_dim), &Device::Cpu)?;
                Ok(xt.matmul(&w.t()?)?.flatten_all()?.to_vec1()?)
            }
            Kind::Quantized(q) => {
                let xt = Tensor::from_slice(x, (rows, self.in_dim), &Device::Cpu)?;
                Ok(q.forward(&xt)?.flatten_all()?.to_vec1()?)
            }
            Kind::Half { bits, bf16 } => {
                Ok(half_matmul(x, rows, bits, self.out_dim, self.in_dim, *bf16))
            }
        }
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            Kind::F32(w) => w.elem_count() * 4,
            Kind::Half { bits, .. } => bits.len() * 2,
            Kind::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Kind::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

trait HalfBits: candle_core::WithDType {
    fn bits(self) -> u16;
}
impl HalfBits for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}
impl HalfBits for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

fn to_bits<T: HalfBits>(t: &Tensor, dtype: DType) -> candle_core::Result<Vec<u16>> {
    let v = t.to_dtype(dtype)?.flatten_all()?.to_vec1::<T>()?;
    Ok(v.into_iter().map(HalfBits::bits).collect())
}

/// `[rows, in] × [out, in]ᵀ` with 16-bit weights, f32 accumulation. Each task
/// converts a band of weight rows once and uses it for every activation row,
/// so a batch shares the weight read.
fn half_matmul(
    x: &[f32],
    rows: usize,
    w: &[u16],
    out_dim: usize,
    in_dim: usize,
    bf16: bool,
) -> Vec<f32> {
    const BAND: usize = 16;
    let mut out_t = vec![0f32; out_dim * rows];
    out_t
        .par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, chunk)| {
            let mut wrow = vec![0f32; in_dim];
            for (j, dst) in chunk.chunks_mut(rows).enumerate() {
                let o = band * BAND + j;
                let src = &w[o * in_dim..(o + 1) * in_dim];
                if bf16 {
                    for (d, &b) in wrow.iter_mut().zip(src) {
                        *d = f32::from_bits((b as u32) << 16);
                    }
                } else {
                    for (d, &b) in wrow.iter_mut().zip(src) {
                        *d = f16::from_bits(b).to_f32();
                    }
                }
                for (r, d) in dst.iter_mut().enumerate() {
                    let xr = &x[r * in_dim..(r + 1) * in_dim];
                    *d = xr.iter().zip(&wrow).map(|(a, b)| a * b).sum();
                }
            }
        });
    // out_t is [out, rows]; the caller wants [rows, out].
    let mut out = vec![0f32; rows * out_dim];
    for o in 0..out_dim {
        for r in 0..rows {
            out[r * out_dim + o] = out_t[o * rows + r];
        }
    }
    out
}

/// Which slice of a sharded dimension a rank holds.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub rank: usize,
    pub world_size: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard {
        rank: 0,
        world_size: 1,
    };
}

/// Splits the output dimension (weight rows) across ranks: rank r holds rows
/// `[r·out/N, (r+1)·out/N)` and produces that slice of the output. No
/// communication.
pub struct ColumnParallelLinear {
    pub inner: Linear,
}

impl ColumnParallelLinear {
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.inner.forward(x, rows)
    }
}

/// Splits the input dimension (weight columns) across ranks; each rank's
/// partial product is summed by an all-reduce, so every rank ends with the
/// full output.
pub struct RowParallelLinear {
    pub inner: Linear,
    pub comm: Arc<dyn Communicator>,
}

impl RowParallelLinear {
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut out = self.inner.forward(x, rows)?;
        self.comm.all_reduce_sum(&mut out)?;
        Ok(out)
    }
}

/// Checks that a rank can hold `1/world` of a dimension; tensor parallelism
/// proper (slicing at load) arrives with the communicator backends.
pub fn check_shard(what: &str, dim: usize, shard: Shard) -> Result<()> {
    if shard.world_size != 1 {
        return Err(WorkerError::Config(format!(
            "{what}: tensor-parallel size {} is not supported yet (only 1)",
            shard.world_size
        )));
    }
    if !dim.is_multiple_of(shard.world_size) {
        return Err(WorkerError::Config(format!(
            "{what} = {dim} is not divisible by the tensor-parallel size {}",
            shard.world_size
        )));
    }
    Ok(())
}
