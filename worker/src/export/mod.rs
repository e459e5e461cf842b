//! Writes model checkpoints in the formats the worker loads: safetensors (single or sharded),
//! PyTorch `.bin` (the zip format of `torch.save`) and llama GGUF. They are the fixtures every
//! loader test is built from, so each writer follows its reference tool's layout exactly.
//!
//! Writers only: nothing here reads checkpoints or knows about the model's forward pass.

mod gguf;
mod gguf_types;
mod pytorch;
mod safetensors;

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

/// Element type of the floats written to safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            FloatDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FloatDtype::F16 => data
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            FloatDtype::BF16 => data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
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

fn check_shapes(tensors: &[ExportTensor]) -> Result<(), ExportError> {
    for t in tensors {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(ExportError::ShapeMismatch {
                name: t.name.clone(),
                shape: t.shape.clone(),
                expected,
                actual: t.data.len(),
            });
        }
    }
    Ok(())
}

/// Splits tensors, in order, into `shards` non-empty groups of roughly equal byte size:
/// returns the shard index of each tensor (non-decreasing, starting at 0, ending at shards-1).
fn shard_assignment(tensors: &[ExportTensor], shards: usize) -> Result<Vec<usize>, ExportError> {
    if shards == 0 || shards > tensors.len() {
        return Err(ExportError::Shards {
            tensors: tensors.len(),
            shards,
        });
    }
    let total: usize = tensors.iter().map(|t| t.data.len()).sum::<usize>().max(1);
    let mut assignment = Vec::with_capacity(tensors.len());
    let (mut current, mut before) = (0usize, 0usize);
    for (i, t) in tensors.iter().enumerate() {
        let wanted = ((before + t.data.len() / 2) * shards / total).min(shards - 1);
        // Tensors left (this one included) must still cover every shard not yet opened.
        let must_move = tensors.len() - i <= shards - 1 - current;
        if i > 0 && current < shards - 1 && (wanted > current || must_move) {
            current += 1;
        }
        assignment.push(current);
        before += t.data.len();
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
    tensors: &[ExportTensor],
    files: &[String],
    assignment: &[usize],
    total_size: usize,
) -> Result<(), ExportError> {
    let weight_map: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .zip(assignment)
        .map(|(t, &s)| (t.name.clone(), files[s].clone().into()))
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
