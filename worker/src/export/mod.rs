//! Writes model checkpoints in the formats the worker loads: safetensors (single or sharded),
//! PyTorch `.bin` (the zip format of `torch.save`) and llama GGUF. They are the fixtures every
//! loader test is built from, so each writer follows its reference tool's layout exactly.
//!
//! Writers only: nothing here reads checkpoints or knows about the model's forward pass.

mod gguf;
mod gguf_types;
mod pytorch;
mod safetensors;

use std::borrow::Cow;
use std::path::PathBuf;

pub use gguf::{GgufMeta, write_gguf};
pub use gguf_types::GgufType;
pub use pytorch::write_pytorch_bin;
pub use safetensors::write_safetensors;

/// One tensor in row-major order under its Hugging Face name
/// (e.g. `model.layers.0.self_attn.q_proj.weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The tensors a writer writes: names and shapes up front (headers and
/// indexes need them first), values on demand, one tensor at a time, so a
/// 7B checkpoint is written without ever being in memory whole.
pub trait TensorSource: Sync {
    fn len(&self) -> usize;
    /// Hugging Face name of tensor `i`.
    fn name(&self, i: usize) -> &str;
    fn shape(&self, i: usize) -> &[usize];
    /// Tensor `i`'s values, row-major.
    fn values(&self, i: usize) -> Cow<'_, [f32]>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn numel(&self, i: usize) -> usize {
        self.shape(i).iter().product()
    }
}

impl TensorSource for [ExportTensor] {
    fn len(&self) -> usize {
        <[ExportTensor]>::len(self)
    }
    fn name(&self, i: usize) -> &str {
        &self[i].name
    }
    fn shape(&self, i: usize) -> &[usize] {
        &self[i].shape
    }
    fn values(&self, i: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(&self[i].data)
    }
}

impl TensorSource for Vec<ExportTensor> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn name(&self, i: usize) -> &str {
        &self[i].name
    }
    fn shape(&self, i: usize) -> &[usize] {
        &self[i].shape
    }
    fn values(&self, i: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(&self[i].data)
    }
}

/// Element type of the floats written to safetensors and `.bin` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }

    /// Little-endian bytes of `data` as this type, converted in parallel
    /// chunks (a 7B checkpoint is 6.7 billion values).
    fn encode(self, data: &[f32]) -> Vec<u8> {
        use rayon::prelude::*;
        let size = self.size();
        let mut out = vec![0u8; data.len() * size];
        out.par_chunks_mut(size << 16)
            .zip(data.par_chunks(1 << 16))
            .for_each(|(out, data)| {
                let bytes = out.chunks_exact_mut(size);
                match self {
                    FloatDtype::F32 => bytes
                        .zip(data)
                        .for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                    FloatDtype::F16 => bytes.zip(data).for_each(|(o, x)| {
                        o.copy_from_slice(&half::f16::from_f32(*x).to_le_bytes())
                    }),
                    FloatDtype::BF16 => bytes.zip(data).for_each(|(o, x)| {
                        o.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes())
                    }),
                }
            });
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor {name}: shape {shape:?} holds {expected} values but data has {actual}")]
    ShapeMismatch {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("cannot split {tensors} tensors into {shards} shards")]
    Shards { tensors: usize, shards: usize },
    #[error("writing {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("tokenizer for GGUF: {0}")]
    Tokenizer(String),
}

impl ExportError {
    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| ExportError::Io {
            path: path.into(),
            source,
        }
    }

    fn format(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        ExportError::Format {
            path: path.into(),
            message: e.to_string(),
        }
    }
}

/// Tensor `i`'s values, checked against its shape.
fn values_of(src: &dyn TensorSource, i: usize) -> Result<Cow<'_, [f32]>, ExportError> {
    let v = src.values(i);
    if v.len() != src.numel(i) {
        return Err(ExportError::ShapeMismatch {
            name: src.name(i).to_owned(),
            shape: src.shape(i).to_vec(),
            expected: src.numel(i),
            actual: v.len(),
        });
    }
    Ok(v)
}

/// Splits tensors, in order, into `shards` non-empty groups of roughly equal byte size:
/// returns the shard index of each tensor (non-decreasing, starting at 0, ending at shards-1).
fn shard_assignment(tensors: &dyn TensorSource, shards: usize) -> Result<Vec<usize>, ExportError> {
    if shards == 0 || shards > tensors.len() {
        return Err(ExportError::Shards {
            tensors: tensors.len(),
            shards,
        });
    }
    let total: usize = (0..tensors.len())
        .map(|i| tensors.numel(i))
        .sum::<usize>()
        .max(1);
    let mut assignment = Vec::with_capacity(tensors.len());
    let (mut current, mut before) = (0usize, 0usize);
    for i in 0..tensors.len() {
        let n = tensors.numel(i);
        let wanted = ((before + n / 2) * shards / total).min(shards - 1);
        // Tensors left (this one included) must still cover every shard not yet opened.
        let must_move = tensors.len() - i <= shards - 1 - current;
        if i > 0 && current < shards - 1 && (wanted > current || must_move) {
            current += 1;
        }
        assignment.push(current);
        before += n;
    }
    Ok(assignment)
}

/// `model-00001-of-00003.safetensors` style names, as `transformers` writes them.
fn shard_file_name(stem: &str, ext: &str, index: usize, shards: usize) -> String {
    if shards == 1 {
        format!("{stem}.{ext}")
    } else {
        format!("{stem}-{:05}-of-{shards:05}.{ext}", index + 1)
    }
}

/// Writes `{"metadata": {"total_size": ..}, "weight_map": {name: file}}`.
fn write_index(
    path: &std::path::Path,
    tensors: &dyn TensorSource,
    files: &[String],
    assignment: &[usize],
    total_size: usize,
) -> Result<(), ExportError> {
    let weight_map: serde_json::Map<String, serde_json::Value> = assignment
        .iter()
        .enumerate()
        .map(|(i, &s)| (tensors.name(i).to_owned(), files[s].clone().into()))
        .collect();
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).map_err(|e| ExportError::format(path, e))?;
    std::fs::write(path, text).map_err(ExportError::io(path))
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::ExportTensor;

    /// Deterministic, distinct values so a misplaced element shows.
    pub fn tensor(name: &str, shape: &[usize], seed: usize) -> ExportTensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i * 7 + seed * 13) % 101) as f32 / 16.0 - 3.0)
            .collect();
        ExportTensor {
            name: name.to_owned(),
            shape: shape.to_vec(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::tensor;
    use super::*;

    #[test]
    fn shards_are_ordered_non_empty_and_balanced() {
        let ts: Vec<_> = [100, 100, 100, 100, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| tensor(&format!("t{i}"), &[n], i))
            .collect();
        assert_eq!(shard_assignment(&ts, 1).unwrap(), vec![0; 6]);
        assert_eq!(shard_assignment(&ts, 2).unwrap(), vec![0, 0, 1, 1, 1, 1]);
        assert_eq!(shard_assignment(&ts, 6).unwrap(), vec![0, 1, 2, 3, 4, 5]);
        // A huge first tensor must not leave later shards empty.
        let skewed = vec![
            tensor("a", &[1000], 0),
            tensor("b", &[1], 1),
            tensor("c", &[1], 2),
        ];
        assert_eq!(shard_assignment(&skewed, 3).unwrap(), vec![0, 1, 2]);
        assert!(shard_assignment(&ts, 7).is_err());
        assert!(shard_assignment(&ts, 0).is_err());
    }
}
