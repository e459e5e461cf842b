//! Linear layers and the tensor-parallel wrappers around them. Activations
//! are row-major f32 slices `[rows, in]`; a layer returns `[rows, out]` f32
//! whatever its weights are stored as. Weight layout is PyTorch's `[out, in]`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{kernels, quant};
use crate::comm::Communicator;
use crate::error::{Result, WorkerError};
use crate::weights::{ReadProgress, Stored, Weight, WeightStore};

/// `--dtype`: the float type to hold weights in, or `auto`, the
/// checkpoint's own (see `loader::Checkpoint::resolve_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeChoice {
    Auto,
    F32,
    Bf16,
    F16,
}

/// The dtype float weights are kept in.
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

enum Kind {
    /// Float weights in panels for our kernel, kept in the `--dtype` chosen.
    F32(kernels::PackedFloat<f32>),
    Bf16(kernels::PackedFloat<bf16>),
    F16(kernels::PackedFloat<f16>),
    /// GGML-quantized weights (see `quant::Format`), repacked for our
    /// kernels. Other GGML types are refused at load.
    Packed(quant::PackedMatrix),
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
            Weight::Quantized(q) => match (quant::Format::from_ggml(q.dtype()), q.dtype()) {
                (Some(format), _) => {
                    let raw = q.data().map_err(werr)?;
                    let packed = quant::PackedMatrix::from_ggml(format, &raw, out_dim, in_dim);
                    return Ok(Self {
                        kind: Kind::Packed(packed),
                        in_dim,
                        out_dim,
                    });
                }
                // GGUF float tensors are float weights like any checkpoint's.
                (None, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                    q.dequantize(&Device::Cpu).map_err(werr)?
                }
                (None, other) => return Err(unsupported(name, other)),
            },
            Weight::Dense(t) => t,
        };
        let kind = match dtype {
            WeightDtype::F32 => Kind::F32(pack(&dense, DType::F32, out_dim, in_dim).map_err(werr)?),
            WeightDtype::Bf16 => {
                Kind::Bf16(pack(&dense, DType::BF16, out_dim, in_dim).map_err(werr)?)
            }
            WeightDtype::F16 => Kind::F16(pack(&dense, DType::F16, out_dim, in_dim).map_err(werr)?),
        };
        Ok(Self {
            kind,
            in_dim,
            out_dim,
        })
    }

    /// Rows `rows` and columns `cols` of the `[out, in]` weight `name`
    /// (`full` is the shape the config implies), read straight from the
    /// file and packed in parallel: float weights become `dtype`, GGUF
    /// quantized ones our kernels take are repacked; anything else goes
    /// through [`Linear::new`].
    pub fn load(
        store: &WeightStore,
        name: &str,
        full: [usize; 2],
        rows: Range<usize>,
        cols: Range<usize>,
        dtype: WeightDtype,
        progress: &ReadProgress,
    ) -> Result<Self> {
        let e = store.entry(name)?;
        if e.shape != full {
            return Err(WorkerError::Config(format!(
                "{name}: shape {:?}, the config implies {full:?}",
                e.shape
            )));
        }
        let stored = e.stored;
        let (out_dim, in_dim) = (rows.len(), cols.len());
        let read = |r: Range<usize>, buf: &mut Vec<u8>| -> Result<()> {
            let (a, b) = (rows.start + r.start, rows.start + r.end);
            store.read_rows(name, a..b, cols.clone(), buf)?;
            progress.add(buf.len());
            Ok(())
        };
        if !store.readable_in_place(name) {
            let whole = rows.len() == full[0] && cols.len() == full[1];
            let w = match (whole, cols.len() == full[1]) {
                (true, _) => store.get(name)?,
                (false, true) => store.get_slice(name, 0, rows)?,
                (false, false) => store.get_slice(name, 1, cols)?,
            };
            progress.add(stored.bytes(out_dim * in_dim));
            return Self::new(name, w, out_dim, in_dim, dtype);
        }
        store.check_rect(name, &rows, &cols)?;
        let kind = match stored {
            Stored::Ggml(t) => match quant::Format::from_ggml(t) {
                Some(format) => {
                    Kind::Packed(quant::PackedMatrix::build(format, out_dim, in_dim, read)?)
                }
                None => {
                    let w = store.get_slice(name, 0, rows)?;
                    progress.add(stored.bytes(out_dim * in_dim));
                    return Self::new(name, w, out_dim, in_dim, dtype);
                }
            },
            _ => {
                macro_rules! packed {
                    ($t:ty) => {
                        kernels::PackedFloat::<$t>::build(out_dim, in_dim, |r, dst| {
                            let mut buf = Vec::new();
                            read(r, &mut buf)?;
                            decode_into(stored, &buf, dst);
                            Ok::<_, WorkerError>(())
                        })?
                    };
                }
                match dtype {
                    WeightDtype::F32 => Kind::F32(packed!(f32)),
                    WeightDtype::Bf16 => Kind::Bf16(packed!(bf16)),
                    WeightDtype::F16 => Kind::F16(packed!(f16)),
                }
            }
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
            Kind::F32(w) => Ok(w.matmul(x, rows)),
            Kind::Bf16(w) => Ok(w.matmul(x, rows)),
            Kind::F16(w) => Ok(w.matmul(x, rows)),
            Kind::Packed(p) => Ok(p.matmul(x, rows)),
        }
    }

    /// Several layers with the same input (q, k and v; gate and up), in one
    /// parallel loop when their weights are of one kind; otherwise one after
    /// the other.
    pub fn forward_many(layers: &[&Linear], x: &[f32], rows: usize) -> Result<Vec<Vec<f32>>> {
        macro_rules! all {
            ($kind:ident) => {
                layers
                    .iter()
                    .map(|l| match &l.kind {
                        Kind::$kind(w) => Some(w),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            };
        }
        if let Some(ws) = all!(Packed) {
            return Ok(quant::PackedMatrix::matmul_many(&ws, x, rows));
        }
        if let Some(ws) = all!(F32) {
            return Ok(kernels::PackedFloat::matmul_many(&ws, x, rows));
        }
        if let Some(ws) = all!(Bf16) {
            return Ok(kernels::PackedFloat::matmul_many(&ws, x, rows));
        }
        if let Some(ws) = all!(F16) {
            return Ok(kernels::PackedFloat::matmul_many(&ws, x, rows));
        }
        layers.iter().map(|l| l.forward(x, rows)).collect()
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            Kind::F32(w) => w.bytes(),
            Kind::Bf16(w) => w.bytes(),
            Kind::F16(w) => w.bytes(),
            Kind::Packed(p) => p.bytes(),
        }
    }
}

/// The load error for a weight of a GGML type no kernel here takes, naming
/// the tensor (its GGUF name too), the type and what is supported.
fn unsupported(name: &str, dtype: GgmlDType) -> WorkerError {
    let tensor = crate::weights::gguf_name(name)
        .map(|g| format!("{g} ({name})"))
        .unwrap_or_else(|| name.to_string());
    WorkerError::Config(crate::weights::no_kernel(
        &tensor,
        crate::weights::ggml_type_name(dtype),
    ))
}

/// The GGML types weights may have, as GGML names them.
pub fn supported_types() -> String {
    let mut names = vec!["F32", "F16", "BF16"];
    names.extend(quant::Format::ALL.iter().map(|f| f.label()));
    names.join(", ")
}

/// The format of a GGML tensor our kernels take, if they take it.
pub fn quant_format(q: &candle_core::quantized::QTensor) -> Option<quant::Format> {
    quant::Format::from_ggml(q.dtype())
}

/// Float values stored as `stored` (little-endian bytes) into `out`, as
/// `T`: a copy when the types are the same, else through f32 (each
/// conversion is exact or rounds to nearest, ties to even, as candle's).
pub fn decode_into<T: kernels::Elem>(stored: Stored, bytes: &[u8], out: &mut [T]) {
    let (_, size) = stored.unit();
    debug_assert_eq!(bytes.len(), out.len() * size);
    if stored_is::<T>(stored) {
        // SAFETY: T is the stored type (f32, f16 or bf16: plain little-endian
        // data of `size` bytes with no invalid bit patterns), and `out`
        // holds exactly `bytes.len() / size` of them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                out.as_mut_ptr() as *mut u8,
                out.len() * size,
            );
        }
        return;
    }
    const RUN: usize = 1024;
    let mut wide = [0f32; RUN];
    let mut halves = [f16::ZERO; RUN];
    for (bytes, out) in bytes.chunks(RUN * size).zip(out.chunks_mut(RUN)) {
        let wide = &mut wide[..out.len()];
        match stored {
            Stored::F32 => {
                for (w, b) in wide.iter_mut().zip(bytes.chunks_exact(4)) {
                    *w = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Stored::F16 => {
                // Through half's slice conversion: F16C eight at a time
                // (one value at a time it ran at a quarter of the disk's
                // speed).
                let halves = &mut halves[..out.len()];
                for (h, b) in halves.iter_mut().zip(bytes.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                halves.convert_to_f32_slice(wide);
            }
            Stored::Bf16 => {
                for (w, b) in wide.iter_mut().zip(bytes.chunks_exact(2)) {
                    *w = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            Stored::Ggml(_) => unreachable!("quantized weights are not decoded to floats here"),
        }
        T::from_f32_slice(wide, out);
    }
}

/// Whether `T` is the element type `stored` names.
fn stored_is<T: 'static>(stored: Stored) -> bool {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    match stored {
        Stored::F32 => t == TypeId::of::<f32>(),
        Stored::F16 => t == TypeId::of::<f16>(),
        Stored::Bf16 => t == TypeId::of::<bf16>(),
        Stored::Ggml(_) => false,
    }
}

/// Float weights `[out, in]` as `T`, packed for the kernel.
fn pack<T: kernels::Elem + candle_core::WithDType>(
    t: &Tensor,
    dtype: DType,
    out_dim: usize,
    in_dim: usize,
) -> candle_core::Result<kernels::PackedFloat<T>> {
    let v = t.to_dtype(dtype)?.flatten_all()?.to_vec1::<T>()?;
    Ok(kernels::PackedFloat::from_rows(&v, out_dim, in_dim))
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

/// What one rank of a tensor-parallel group holds, checked against the
/// model's shape at load (as vLLM splits a LLaMA):
/// - query heads, and the MLP's intermediate columns, split evenly;
/// - KV heads split evenly when there are at least as many as ranks, and
///   each replicated on `world / kv_heads` ranks when there are fewer;
/// - the vocabulary padded to a multiple of the ranks and split evenly (the
///   last rank may hold fewer real rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpPlan {
    pub rank: usize,
    pub world: usize,
    /// Query heads held: `rank·n..(rank+1)·n`.
    pub heads: Range<usize>,
    /// KV heads held.
    pub kv_heads: Range<usize>,
    /// Intermediate (MLP) columns held.
    pub intermediate: Range<usize>,
    /// Vocabulary rows held (real ones; see `vocab_part`).
    pub vocab: Range<usize>,
    /// Each rank's share of the padded vocabulary.
    pub vocab_part: usize,
}

impl TpPlan {
    /// This rank's share of the model `cfg` in the group `comm` belongs to.
    pub fn of(cfg: &crate::config::ModelConfig, comm: &dyn Communicator) -> Result<Self> {
        Self::new(
            Shard {
                rank: comm.rank(),
                world_size: comm.world_size(),
            },
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
        )
    }

    /// The rows this rank holds of the q, of the k and v, and of the gate
    /// and up projections (head ranges × `head_dim`, MLP columns).
    pub fn projection_rows(&self, head_dim: usize) -> [Range<usize>; 3] {
        let by = |r: &Range<usize>| r.start * head_dim..r.end * head_dim;
        [
            by(&self.heads),
            by(&self.kv_heads),
            self.intermediate.clone(),
        ]
    }

    pub fn new(
        shard: Shard,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
    ) -> Result<Self> {
        let (r, n) = (shard.rank, shard.world_size);
        if n == 0 || r >= n {
            return Err(WorkerError::Config(format!(
                "rank {r} of a tensor-parallel group of {n}"
            )));
        }
        let divisible = |what: &str, dim: usize| {
            if dim.is_multiple_of(n) {
                Ok(dim / n)
            } else {
                Err(WorkerError::Config(format!(
                    "{what} = {dim} is not divisible by the tensor-parallel size {n}"
                )))
            }
        };
        let per_rank = divisible("num_attention_heads", heads)?;
        let inter = divisible("intermediate_size", intermediate)?;
        let kv = if kv_heads.is_multiple_of(n) {
            let k = kv_heads / n;
            r * k..(r + 1) * k
        } else if n.is_multiple_of(kv_heads) {
            // Fewer KV heads than ranks: each is held by n / kv_heads ranks,
            // the ones whose query heads read it.
            let h = r * kv_heads / n;
            h..h + 1
        } else {
            return Err(WorkerError::Config(format!(
                "num_key_value_heads = {kv_heads} neither divides nor is divided by the \
                 tensor-parallel size {n}"
            )));
        };
        let part = vocab.div_ceil(n);
        if (n - 1) * part >= vocab {
            return Err(WorkerError::Config(format!(
                "vocab_size = {vocab} leaves rank {} of {n} no rows",
                n - 1
            )));
        }
        Ok(Self {
            rank: r,
            world: n,
            heads: r * per_rank..(r + 1) * per_rank,
            kv_heads: kv,
            intermediate: r * inter..(r + 1) * inter,
            vocab: (r * part).min(vocab)..((r + 1) * part).min(vocab),
            vocab_part: part,
        })
    }
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

    /// `N` layers with the same input, in one pass (see
    /// [`Linear::forward_many`]).
    pub fn forward_many<const N: usize>(
        layers: [&ColumnParallelLinear; N],
        x: &[f32],
        rows: usize,
    ) -> Result<[Vec<f32>; N]> {
        let out = Linear::forward_many(&layers.map(|l| &l.inner), x, rows)?;
        Ok(out.try_into().expect("one output per layer"))
    }
}

/// Splits the input dimension (weight columns) across ranks; each rank's
/// partial product is summed across ranks, so every rank ends with the full
/// output.
///
/// Quantized weights quantize their activations to 8 bits, and there a sum
/// in another order (an all-reduce's) moves values across rounding
/// boundaries: over many layers greedy tokens part. So where the layout
/// allows, the input is cut into `K` fixed runs whatever the number of
/// ranks: a process computes one partial product per run it holds, the
/// ranks gather them, and everyone adds all `K` in order. One process or
/// several, the same additions in the same order: the same bits.
pub struct RowParallelLinear {
    pub inner: Linear,
    pub comm: Arc<dyn Communicator>,
    /// Runs of the input this rank holds, when the layer sums by runs.
    pub runs: Option<usize>,
}

impl RowParallelLinear {
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (Some(runs), Kind::Packed(p)) = (self.runs, &self.inner.kind) else {
            let mut out = self.inner.forward(x, rows)?;
            self.comm.all_reduce_sum(&mut out)?;
            return Ok(out);
        };
        let parts = p.matmul_segments(x, rows, runs);
        let all = if self.comm.world_size() == 1 {
            parts.concat()
        } else {
            self.comm.all_gather(&parts.concat())?
        };
        // Every rank's runs in rank order: the input's runs in order.
        let n = rows * self.inner.out_dim;
        let mut chunks = all.chunks_exact(n);
        let mut out = chunks.next().expect("at least one run").to_vec();
        for part in chunks {
            out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
        }
        Ok(out)
    }
}

/// How many fixed runs a row-parallel layer's input (`in_dim` wide, all
/// ranks together) is summed in: the largest tensor-parallel size the model
/// allows (every size that splits the heads, the MLP and this input into
/// whole blocks of `block` weights divides it), capped at 16. 1: no runs.
/// Few runs keep the one-process cost small: each run is a pass of its own.
pub fn row_runs(heads: usize, intermediate: usize, in_dim: usize, block: usize) -> usize {
    if !in_dim.is_multiple_of(block) {
        return 1;
    }
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let g = gcd(gcd(heads, intermediate), in_dim / block);
    (1..=g.min(16))
        .rev()
        .find(|d| g.is_multiple_of(*d))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rank: usize, world: usize) -> Result<TpPlan> {
        // Aquila-7B's shape: 32 heads (32 KV heads), 11008, 100,008 tokens.
        TpPlan::new(
            Shard {
                rank,
                world_size: world,
            },
            32,
            32,
            11008,
            100_008,
        )
    }

    #[test]
    fn ranks_split_heads_columns_and_a_padded_vocabulary() {
        let p = plan(3, 4).unwrap();
        assert_eq!((p.heads, p.kv_heads), (24..32, 24..32));
        assert_eq!(p.intermediate, 8256..11008);
        assert_eq!((p.vocab, p.vocab_part), (75006..100_008, 25002));
        // 100,008 over 16 ranks: 6251 each, the last holding 6243 real rows.
        let p = plan(15, 16).unwrap();
        assert_eq!((p.vocab, p.vocab_part), (93765..100_008, 6251));
        assert_eq!(p.intermediate, 10320..11008);
    }

    #[test]
    fn fewer_kv_heads_than_ranks_are_replicated_where_their_queries_are() {
        // 8 query heads over 2 KV heads (groups of 4), 4 ranks of 2 heads:
        // ranks 0 and 1 read KV head 0, ranks 2 and 3 KV head 1.
        let kv: Vec<Range<usize>> = (0..4)
            .map(|r| {
                TpPlan::new(
                    Shard {
                        rank: r,
                        world_size: 4,
                    },
                    8,
                    2,
                    64,
                    100,
                )
                .unwrap()
                .kv_heads
            })
            .collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
    }

    /// Runs: every TP size the model allows divides them, at most 16.
    #[test]
    fn row_runs_fit_every_allowed_split() {
        // The demo: 9 heads, MLP 1536, o_proj 576 wide, Q4_1 blocks of 32:
        // TP 1 and 3 only (1536 is not a multiple of 9).
        assert_eq!(row_runs(9, 1536, 576, 32), 3);
        assert_eq!(row_runs(9, 1536, 1536, 32), 3);
        // Aquila-7B: 32 heads, MLP 11008 (= 32 × 344), 4096 wide.
        assert_eq!(row_runs(32, 11008, 4096, 32), 16);
        assert_eq!(row_runs(32, 11008, 11008, 32), 8);
        // K-quant blocks of 256 that do not divide the input: no runs.
        assert_eq!(row_runs(9, 1536, 576, 256), 1);
    }

    #[test]
    fn impossible_splits_name_both_numbers() {
        let err = plan(0, 5).unwrap_err().to_string();
        assert!(
            err.contains("num_attention_heads = 32 is not divisible by the tensor-parallel size 5"),
            "{err}"
        );
        let err = TpPlan::new(
            Shard {
                rank: 0,
                world_size: 4,
            },
            12,
            3,
            64,
            100,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("num_key_value_heads = 3 neither divides nor is divided by the tensor-parallel size 4"),
            "{err}"
        );
    }
}
