//! safetensors writer: `model.safetensors`, or shards plus `model.safetensors.index.json`, laid
//! out as `transformers`' `save_pretrained` does (metadata `format: pt`).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::{
    ExportError, ExportTensor, FloatDtype, check_shapes, shard_assignment, shard_file_name,
    write_index,
};

/// Writes `tensors` into `dir` as one file (`shards == 1`) or `shards` files with an index.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[ExportTensor],
    shards: usize,
    dtype: FloatDtype,
) -> Result<(), ExportError> {
    check_shapes(tensors)?;
    let assignment = shard_assignment(tensors, shards)?;
    std::fs::create_dir_all(dir).map_err(ExportError::io(dir))?;
    let files: Vec<String> = (0..shards)
        .map(|i| shard_file_name("model", "safetensors", i, shards))
        .collect();
    let st_dtype = match dtype {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::BF16 => Dtype::BF16,
    };
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    for (shard, file) in files.iter().enumerate() {
        let path = dir.join(file);
        let encoded: Vec<(&ExportTensor, Vec<u8>)> = tensors
            .iter()
            .zip(&assignment)
            .filter(|(_, s)| **s == shard)
            .map(|(t, _)| (t, dtype.encode(&t.data)))
            .collect();
        let views = encoded
            .iter()
            .map(|(t, bytes)| {
                TensorView::new(st_dtype, t.shape.clone(), bytes)
                    .map(|v| (t.name.as_str(), v))
                    .map_err(|e| ExportError::Tensor {
                        name: t.name.clone(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path)
            .map_err(|e| ExportError::format(&path, e))?;
    }
    if shards > 1 {
        let total = tensors.iter().map(|t| t.data.len() * dtype.size()).sum();
        let index = dir.join("model.safetensors.index.json");
        write_index(&index, tensors, &files, &assignment, total)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::test_util::tensor;
    use candle_core::safetensors::MmapedSafetensors;

    fn sample() -> Vec<ExportTensor> {
        vec![
            tensor("model.embed_tokens.weight", &[16, 8], 1),
            tensor("model.layers.0.self_attn.q_proj.weight", &[8, 8], 2),
            tensor("model.layers.0.input_layernorm.weight", &[8], 3),
            tensor("model.norm.weight", &[8], 4),
        ]
    }

    fn read_back(files: &[std::path::PathBuf], name: &str) -> Vec<f32> {
        // SAFETY: the files were just written by this test and are not modified while mapped.
        let st = unsafe { MmapedSafetensors::multi(files) }.unwrap();
        let t = st.load(name, &candle_core::Device::Cpu).unwrap();
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn single_file_f32_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let ts = sample();
        write_safetensors(dir.path(), &ts, 1, FloatDtype::F32).unwrap();
        let files = vec![dir.path().join("model.safetensors")];
        for t in &ts {
            assert_eq!(read_back(&files, &t.name), t.data, "{}", t.name);
        }
        assert!(!dir.path().join("model.safetensors.index.json").exists());
    }

    #[test]
    fn shards_and_index_f16_bf16() {
        // The sample values are multiples of 1/16 in [-3, 3.3]: exact in f16 and bf16.
        for dtype in [FloatDtype::F16, FloatDtype::BF16] {
            let dir = tempfile::tempdir().unwrap();
            let ts = sample();
            write_safetensors(dir.path(), &ts, 2, dtype).unwrap();
            let index = std::fs::read_to_string(dir.path().join("model.safetensors.index.json"));
            let index: serde_json::Value = serde_json::from_str(&index.unwrap()).unwrap();
            let total: usize = ts.iter().map(|t| t.data.len() * 2).sum();
            assert_eq!(index["metadata"]["total_size"], total);
            let map = index["weight_map"].as_object().unwrap();
            assert_eq!(map.len(), ts.len());
            assert_eq!(
                map["model.embed_tokens.weight"],
                "model-00001-of-00002.safetensors"
            );
            assert_eq!(map["model.norm.weight"], "model-00002-of-00002.safetensors");
            let files: Vec<_> = ["model-00001-of-00002", "model-00002-of-00002"]
                .iter()
                .map(|f| dir.path().join(format!("{f}.safetensors")))
                .collect();
            for t in &ts {
                assert_eq!(read_back(&files, &t.name), t.data, "{dtype:?} {}", t.name);
            }
        }
    }
}
