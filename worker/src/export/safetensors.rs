//! safetensors writer: `model.safetensors`, or shards plus `model.safetensors.index.json`, laid
//! out as `transformers`' `save_pretrained` does (metadata `format: pt`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, View};

use super::{
    ExportError, FloatDtype, TensorSource, shard_assignment, shard_file_name, values_of,
    write_index,
};

/// Writes `tensors` into `dir` as one file (`shards == 1`) or `shards` files with an index.
/// Each tensor is made and encoded only when its bytes are written.
pub fn write_safetensors(
    dir: &Path,
    tensors: &dyn TensorSource,
    shards: usize,
    dtype: FloatDtype,
) -> Result<(), ExportError> {
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
        let views: Vec<(&str, Lazy<'_>)> = (0..tensors.len())
            .filter(|&i| assignment[i] == shard)
            .map(|i| {
                let view = Lazy {
                    src: tensors,
                    i,
                    dtype,
                    st_dtype,
                    failed: std::sync::Mutex::new(None),
                };
                (tensors.name(i), view)
            })
            .collect();
        let result = safetensors::serialize_to_file(
            views.iter().map(|(n, v)| (*n, v)),
            Some(metadata.clone()),
            &path,
        );
        // A tensor whose values did not match its shape was written as
        // zeros; report it rather than the file.
        for (_, v) in &views {
            if let Some(e) = v.failed.lock().ok().and_then(|mut f| f.take()) {
                return Err(e);
            }
        }
        result.map_err(|e| ExportError::format(&path, e))?;
    }
    if shards > 1 {
        let total = (0..tensors.len())
            .map(|i| tensors.numel(i) * dtype.size())
            .sum();
        let index = dir.join("model.safetensors.index.json");
        write_index(&index, tensors, &files, &assignment, total)?;
    }
    Ok(())
}

/// A tensor whose bytes are made when the serializer asks for them.
struct Lazy<'a> {
    src: &'a dyn TensorSource,
    i: usize,
    dtype: FloatDtype,
    st_dtype: Dtype,
    failed: std::sync::Mutex<Option<ExportError>>,
}

impl View for &Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.st_dtype
    }

    fn shape(&self) -> &[usize] {
        self.src.shape(self.i)
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match values_of(self.src, self.i) {
            Ok(v) => Cow::Owned(self.dtype.encode(&v)),
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    *f = Some(e);
                }
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.src.numel(self.i) * self.dtype.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportTensor;
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
