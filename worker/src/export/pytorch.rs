//! PyTorch `.bin` writer: the zip layout `torch.save` has used since 1.6, with float32, float16
//! or bfloat16 storages (the official Aquila-7B release is two float16 shards).
//!
//! `<archive>/data.pkl` is a protocol-2 pickle of an `OrderedDict` name → tensor, each tensor
//! `torch._utils._rebuild_tensor_v2(persistent_id(('storage', torch.HalfStorage, key, 'cpu',
//! numel)), 0, size, stride, False, OrderedDict())`; `<archive>/data/<key>` holds the raw
//! little-endian bytes (stored, 64-byte aligned like torch's writer), plus `version` and
//! `byteorder`. Only opcodes that both `torch.load(weights_only=True)` and candle's pickle reader
//! accept are emitted.

use std::io::Write;
use std::path::Path;

use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

use super::{
    ExportError, FloatDtype, TensorSource, shard_assignment, shard_file_name, values_of,
    write_index,
};

/// Writes `pytorch_model.bin`, or `shards` files `pytorch_model-0000i-of-0000N.bin` plus
/// `pytorch_model.bin.index.json`, each tensor made only when it is written.
pub fn write_pytorch_bin(
    dir: &Path,
    tensors: &dyn TensorSource,
    shards: usize,
    dtype: FloatDtype,
) -> Result<(), ExportError> {
    let assignment = shard_assignment(tensors, shards)?;
    std::fs::create_dir_all(dir).map_err(ExportError::io(dir))?;
    let files: Vec<String> = (0..shards)
        .map(|i| shard_file_name("pytorch_model", "bin", i, shards))
        .collect();
    for (shard, file) in files.iter().enumerate() {
        let group: Vec<usize> = (0..tensors.len())
            .filter(|&i| assignment[i] == shard)
            .collect();
        write_one(&dir.join(file), tensors, &group, dtype)?;
    }
    if shards > 1 {
        let total = (0..tensors.len())
            .map(|i| tensors.numel(i) * dtype.size())
            .sum();
        let index = dir.join("pytorch_model.bin.index.json");
        write_index(&index, tensors, &files, &assignment, total)?;
    }
    Ok(())
}

fn write_one(
    path: &Path,
    src: &dyn TensorSource,
    tensors: &[usize],
    dtype: FloatDtype,
) -> Result<(), ExportError> {
    // torch names the archive folder after the file; any name works for torch.load and candle.
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        .unwrap_or("archive");
    let file = std::fs::File::create(path).map_err(ExportError::io(path))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let zerr = |e: zip::result::ZipError| ExportError::format(path, e);
    let ioerr = ExportError::io(path);
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);

    zip.start_file(format!("{archive}/data.pkl"), options)
        .map_err(zerr)?;
    zip.write_all(&pickle_state_dict(src, tensors, dtype))
        .map_err(ioerr)?;
    zip.start_file(format!("{archive}/byteorder"), options)
        .map_err(zerr)?;
    zip.write_all(b"little").map_err(ExportError::io(path))?;
    for (key, &i) in tensors.iter().enumerate() {
        let bytes = src.numel(i) * dtype.size();
        let data_options = options
            .with_alignment(64)
            .large_file(bytes >= u32::MAX as usize);
        zip.start_file(format!("{archive}/data/{key}"), data_options)
            .map_err(zerr)?;
        let raw = dtype.encode(&values_of(src, i)?);
        zip.write_all(&raw).map_err(ExportError::io(path))?;
    }
    zip.start_file(format!("{archive}/version"), options)
        .map_err(zerr)?;
    zip.write_all(b"3\n").map_err(ExportError::io(path))?;
    let mut inner = zip.finish().map_err(zerr)?;
    inner.flush().map_err(ExportError::io(path))
}

/// The `data.pkl` of a state dict whose storage `k` is the k-th tensor, contiguous, offset 0.
fn pickle_state_dict(src: &dyn TensorSource, tensors: &[usize], dtype: FloatDtype) -> Vec<u8> {
    let storage = match dtype {
        FloatDtype::F32 => "FloatStorage",
        FloatDtype::F16 => "HalfStorage",
        FloatDtype::BF16 => "BFloat16Storage",
    };
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.global("collections", "OrderedDict");
    p.0.extend([b')', b'R']); // EMPTY_TUPLE, REDUCE
    p.0.push(b'('); // MARK for SETITEMS
    for (key, &i) in tensors.iter().enumerate() {
        let shape = src.shape(i);
        p.unicode(src.name(i));
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'('); // MARK: rebuild args
        p.0.push(b'('); // MARK: persistent id tuple
        p.unicode("storage");
        p.global("torch", storage);
        p.unicode(&key.to_string());
        p.unicode("cpu");
        p.int(src.numel(i));
        p.0.extend([b't', b'Q']); // TUPLE, BINPERSID
        p.int(0); // storage offset
        p.tuple(shape);
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        p.tuple(&stride);
        p.0.push(0x89); // NEWFALSE: requires_grad
        p.global("collections", "OrderedDict");
        p.0.extend([b')', b'R']); // backward hooks
        p.0.extend([b't', b'R']); // TUPLE, REDUCE
    }
    p.0.extend([b'u', b'.']); // SETITEMS, STOP
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn unicode(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        if v < 256 {
            self.0.extend([b'K', v as u8]);
        } else if v < 65_536 {
            self.0.push(b'M');
            self.0.extend((v as u16).to_le_bytes());
        } else if v < i32::MAX as usize {
            self.0.push(b'J');
            self.0.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement; 9 bytes keeps the sign bit clear.
            self.0.extend([0x8a, 9]);
            self.0.extend((v as u64).to_le_bytes());
            self.0.push(0);
        }
    }

    fn tuple(&mut self, values: &[usize]) {
        self.0.push(b'(');
        for &v in values {
            self.int(v);
        }
        self.0.push(b't');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportTensor;
    use crate::export::test_util::tensor;
    use std::collections::HashMap;

    fn read_all(path: &Path) -> HashMap<String, candle_core::Tensor> {
        candle_core::pickle::read_all(path)
            .unwrap()
            .into_iter()
            .collect()
    }

    fn check(read: &HashMap<String, candle_core::Tensor>, t: &ExportTensor) {
        let got = &read[&t.name];
        assert_eq!(got.dims(), t.shape.as_slice(), "{}", t.name);
        let values: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values, t.data, "{}", t.name);
    }

    #[test]
    fn single_file_round_trips_through_candle() {
        let dir = tempfile::tempdir().unwrap();
        let ts = vec![
            tensor("model.embed_tokens.weight", &[300, 4], 1),
            tensor("model.layers.0.mlp.up_proj.weight", &[3, 2, 5], 2),
            tensor("model.norm.weight", &[4], 3),
        ];
        write_pytorch_bin(dir.path(), &ts, 1, FloatDtype::F32).unwrap();
        let read = read_all(&dir.path().join("pytorch_model.bin"));
        assert_eq!(read.len(), ts.len());
        ts.iter().for_each(|t| check(&read, t));
    }

    #[test]
    fn data_records_are_64_byte_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let ts = vec![tensor("a", &[3], 1), tensor("bb", &[5, 7], 2)];
        write_pytorch_bin(dir.path(), &ts, 1, FloatDtype::F32).unwrap();
        let file = std::fs::File::open(dir.path().join("pytorch_model.bin")).unwrap();
        let mut zip = zip::ZipArchive::new(file).unwrap();
        for key in 0..ts.len() {
            let entry = zip.by_name(&format!("pytorch_model/data/{key}")).unwrap();
            assert_eq!(entry.compression(), CompressionMethod::Stored);
            assert_eq!(entry.data_start().unwrap() % 64, 0, "data/{key}");
        }
    }

    #[test]
    fn shards_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let ts: Vec<_> = (0..4)
            .map(|i| {
                tensor(
                    &format!("model.layers.{i}.mlp.down_proj.weight"),
                    &[4, 4],
                    i,
                )
            })
            .collect();
        write_pytorch_bin(dir.path(), &ts, 2, FloatDtype::F32).unwrap();
        let index = std::fs::read_to_string(dir.path().join("pytorch_model.bin.index.json"));
        let index: serde_json::Value = serde_json::from_str(&index.unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 4 * 16 * 4);
        let map = index["weight_map"].as_object().unwrap();
        let first = "pytorch_model-00001-of-00002.bin";
        let second = "pytorch_model-00002-of-00002.bin";
        assert_eq!(map[&ts[0].name], first);
        assert_eq!(map[&ts[1].name], first);
        assert_eq!(map[&ts[2].name], second);
        assert_eq!(map[&ts[3].name], second);
        let mut read = read_all(&dir.path().join(first));
        assert_eq!(read.len(), 2);
        read.extend(read_all(&dir.path().join(second)));
        ts.iter().for_each(|t| check(&read, t));
    }

    /// The official Aquila-7B release stores float16: candle reads the
    /// storages back as f16 (and bf16 as bf16), values exact for these
    /// multiples of 1/16.
    #[test]
    fn half_storages_round_trip() {
        for (dtype, want) in [
            (FloatDtype::F16, candle_core::DType::F16),
            (FloatDtype::BF16, candle_core::DType::BF16),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let ts = vec![tensor("w", &[5, 7], 1), tensor("n", &[7], 2)];
            write_pytorch_bin(dir.path(), &ts, 1, dtype).unwrap();
            let read = read_all(&dir.path().join("pytorch_model.bin"));
            for t in &ts {
                assert_eq!(read[&t.name].dtype(), want);
                let values: Vec<f32> = read[&t.name]
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(values, t.data, "{dtype:?} {}", t.name);
            }
        }
    }

    #[test]
    fn large_counts_use_wider_int_opcodes() {
        let mut p = Pickle(Vec::new());
        p.int(70_000);
        p.int(3_000_000_000);
        assert_eq!(p.0[0], b'J');
        assert_eq!(&p.0[5..7], &[0x8a, 9]);
        assert_eq!(
            u64::from_le_bytes(p.0[7..15].try_into().unwrap()),
            3_000_000_000
        );
    }
}
