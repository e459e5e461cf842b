//! Weight stores: where a checkpoint's tensors come from. One store per
//! format (safetensors, PyTorch `.bin`, GGUF), single file or sharded with an
//! index, all asked by Hugging Face tensor name. GGUF names are mapped here,
//! so model code reads like a Hugging Face checkpoint whatever the file.
//! A store hands out tensors; it does not decide dtypes or layouts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, pickle::PthTensors};

use crate::error::{Result, WorkerError};

mod gguf_types;

pub use gguf_types::{file_type_name, ggml_type_name};

/// One tensor as the checkpoint stores it.
pub enum Weight {
    /// A float tensor (f32, f16 or bf16), shape as in PyTorch.
    Dense(Tensor),
    /// A GGML block-quantized tensor, shape (rows, cols) as in PyTorch.
    Quantized(Arc<QTensor>),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quantized(q) => q.shape().dims(),
        }
    }
}

pub enum WeightStore {
    Safetensors(MmapedSafetensors),
    Pth {
        files: Vec<PthTensors>,
        /// The files' paths, index-aligned with `files`.
        paths: Vec<PathBuf>,
        /// Tensor name → index into `files`.
        index: HashMap<String, usize>,
    },
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        file: Mutex<File>,
    },
}

/// The GGUF name llama.cpp gives a Hugging Face LLaMA tensor.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = match rest {
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn read_index(path: &Path) -> Result<ShardIndex> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| WorkerError::load(path, e))
}

impl WeightStore {
    /// Opens the weights of a Hugging Face folder, preferring safetensors.
    pub fn open_hf(dir: &Path) -> Result<Self> {
        let st_index = dir.join("model.safetensors.index.json");
        let st_single = dir.join("model.safetensors");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let bin_single = dir.join("pytorch_model.bin");
        let load_err = |p: &Path, e: candle_core::Error| WorkerError::load(p, e);
        if st_index.exists() || st_single.exists() {
            let files: Vec<PathBuf> = if st_index.exists() {
                unique_files(dir, &read_index(&st_index)?)
            } else {
                vec![st_single.clone()]
            };
            // SAFETY: the files are memory-mapped read-only; like every mmap
            // reader we rely on nobody truncating them while we serve.
            let st =
                unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| load_err(&files[0], e))?;
            return Ok(Self::Safetensors(st));
        }
        if bin_index.exists() || bin_single.exists() {
            let paths: Vec<PathBuf> = if bin_index.exists() {
                unique_files(dir, &read_index(&bin_index)?)
            } else {
                vec![bin_single]
            };
            let mut files = Vec::new();
            let mut index = HashMap::new();
            for (i, p) in paths.iter().enumerate() {
                let f = PthTensors::new(p, None).map_err(|e| load_err(p, e))?;
                for name in f.tensor_infos().keys() {
                    index.insert(name.clone(), i);
                }
                files.push(f);
            }
            return Ok(Self::Pth {
                files,
                paths,
                index,
            });
        }
        Err(WorkerError::load(
            dir,
            "no weights: expected model.safetensors, model.safetensors.index.json, \
             pytorch_model.bin or pytorch_model.bin.index.json",
        ))
    }

    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path)
            .map_err(|e| WorkerError::io(format!("opening {}", path.display()), e))?;
        let content = match gguf_file::Content::read(&mut file) {
            Ok(c) => c,
            Err(e) => {
                // candle stops at a type id it does not know, without naming
                // the tensor: name it, and the type.
                if let Some((tensor, id)) = gguf_types::unreadable_tensor(&mut file) {
                    let ty = gguf_types::ggml_type_name_by_id(id)
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| format!("unknown type {id}"));
                    return Err(WorkerError::load(path, no_kernel(&tensor, &ty)));
                }
                return Err(WorkerError::load(path, e));
            }
        };
        Ok(Self::Gguf {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
        })
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            Self::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(st) => st.get(name).is_ok(),
            Self::Pth { index, .. } => index.contains_key(name),
            Self::Gguf { content, .. } => {
                gguf_name(name).is_some_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<Weight> {
        let werr = |source| WorkerError::Weight {
            name: name.to_string(),
            source,
        };
        let missing = || WorkerError::Weight {
            name: name.to_string(),
            source: candle_core::Error::Msg("not in the checkpoint".into()),
        };
        match self {
            Self::Safetensors(st) => Ok(Weight::Dense(st.load(name, &Device::Cpu).map_err(werr)?)),
            Self::Pth { files, index, .. } => {
                let file = index.get(name).ok_or_else(missing)?;
                let t = files[*file].get(name).map_err(werr)?.ok_or_else(missing)?;
                Ok(Weight::Dense(t))
            }
            Self::Gguf {
                content,
                file,
                path,
                ..
            } => {
                let g = gguf_name(name).ok_or_else(missing)?;
                let info = content.tensor_infos.get(&g).ok_or_else(missing)?;
                check_type(name, &g, info.ggml_dtype)?;
                let mut f = file
                    .lock()
                    .map_err(|_| WorkerError::load(path, "GGUF reader poisoned"))?;
                let q = content.tensor(&mut *f, &g, &Device::Cpu).map_err(werr)?;
                Ok(Weight::Quantized(Arc::new(q)))
            }
        }
    }

    /// Rows (`dim` 0) or columns (`dim` 1) `range` of the 2-D tensor `name`:
    /// a tensor-parallel rank's slice. Only the slice's bytes are read:
    /// from the memory map (safetensors), or with seeks (GGUF, and PyTorch
    /// `.bin`, an uncompressed zip). A GGUF block-quantized tensor is cut
    /// along its columns only at block boundaries.
    pub fn get_slice(&self, name: &str, dim: usize, range: Range<usize>) -> Result<Weight> {
        let werr = |source| WorkerError::Weight {
            name: name.to_string(),
            source,
        };
        let msg = |m: String| WorkerError::Weight {
            name: name.to_string(),
            source: candle_core::Error::Msg(m),
        };
        let check = |dims: &[usize]| -> Result<(usize, usize)> {
            match dims {
                &[rows, cols] if dim < 2 && range.start < range.end => {
                    let len = [rows, cols][dim];
                    if range.end > len {
                        return Err(msg(format!(
                            "slice {range:?} of dimension {dim} exceeds its size {len}"
                        )));
                    }
                    Ok((rows, cols))
                }
                _ => Err(msg(format!(
                    "cannot take {range:?} of dimension {dim} from shape {dims:?}"
                ))),
            }
        };
        match self {
            Self::Safetensors(st) => {
                let view = st.get(name).map_err(werr)?;
                let (rows, cols) = check(view.shape())?;
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => return Err(msg(format!("cannot slice a {other:?} tensor"))),
                };
                let data = view.data();
                let (bytes, shape) = read_slice(
                    rows,
                    cols,
                    1,
                    dtype.size_in_bytes(),
                    dim,
                    &range,
                    |at, len| Ok(data[at..at + len].to_vec()),
                )?;
                let t =
                    Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu).map_err(werr)?;
                Ok(Weight::Dense(t))
            }
            Self::Pth {
                files,
                paths,
                index,
            } => {
                let file = *index
                    .get(name)
                    .ok_or_else(|| msg("not in the checkpoint".into()))?;
                let info = files[file]
                    .tensor_infos()
                    .get(name)
                    .ok_or_else(|| msg("not in the checkpoint".into()))?;
                let (rows, cols) = check(info.layout.dims())?;
                let elem = info.dtype.size_in_bytes();
                if !info.layout.is_contiguous() {
                    return Err(msg("a strided tensor in the .bin; cannot slice it".into()));
                }
                // PyTorch stores its zip entries uncompressed: seek to the
                // slice's rows instead of reading the whole tensor.
                let path = &paths[file];
                let io = |e: std::io::Error| {
                    WorkerError::io(format!("reading {name} from {}", path.display()), e)
                };
                let zerr = |e: zip::result::ZipError| WorkerError::load(path, e);
                let reader = std::io::BufReader::new(File::open(path).map_err(io)?);
                let mut zip = zip::ZipArchive::new(reader).map_err(zerr)?;
                let mut entry = zip.by_name_seek(&info.path).map_err(zerr)?;
                let base = (info.layout.start_offset() * elem) as u64;
                let (bytes, shape) = read_slice(rows, cols, 1, elem, dim, &range, |at, len| {
                    read_at(&mut entry, base + at as u64, len).map_err(io)
                })?;
                let t = Tensor::from_raw_buffer(&bytes, info.dtype, &shape, &Device::Cpu)
                    .map_err(werr)?;
                Ok(Weight::Dense(t))
            }
            Self::Gguf {
                content,
                file,
                path,
            } => {
                let g = gguf_name(name).ok_or_else(|| msg("not in the checkpoint".into()))?;
                let info = content
                    .tensor_infos
                    .get(&g)
                    .ok_or_else(|| msg("not in the checkpoint".into()))?;
                check_type(name, &g, info.ggml_dtype)?;
                let dims = info.shape.dims().to_vec();
                let (rows, cols) = check(&dims)?;
                let (block, bytes_per_block) =
                    (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
                if dim == 1
                    && !(range.start.is_multiple_of(block) && range.end.is_multiple_of(block))
                {
                    return Err(msg(format!(
                        "columns {range:?} do not fall on its {block}-weight {} block \
                         boundaries; choose a tensor-parallel size that divides {cols} into \
                         multiples of {block}",
                        ggml_type_name(info.ggml_dtype)
                    )));
                }
                let start = content.tensor_data_offset + info.offset;
                let mut f = file
                    .lock()
                    .map_err(|_| WorkerError::load(path, "GGUF reader poisoned"))?;
                let (raw, shape) = read_slice(
                    rows,
                    cols,
                    block,
                    bytes_per_block,
                    dim,
                    &range,
                    |at, len| {
                        read_at(&mut *f, start + at as u64, len).map_err(|e| {
                            WorkerError::io(format!("reading {g} from {}", path.display()), e)
                        })
                    },
                )?;
                let q = qtensor_from_ggml(info.ggml_dtype, &raw, shape.to_vec(), &Device::Cpu)
                    .map_err(werr)?;
                Ok(Weight::Quantized(Arc::new(q)))
            }
        }
    }

    /// For a GGUF file, what its 2-D weights are stored as: their GGML type
    /// when they share one ("Q4_1", "F16"), else the file's type as
    /// llama.cpp names it (`general.file_type`: "Q4_K_M"), else "mixed".
    /// Float checkpoints are held in `--dtype`, so None.
    pub fn gguf_weight_type(&self) -> Option<String> {
        match self {
            Self::Gguf { content, .. } => Some(gguf_label(content)),
            Self::Safetensors(_) | Self::Pth { .. } => None,
        }
    }
}

fn gguf_label(content: &gguf_file::Content) -> String {
    let mut types: Vec<GgmlDType> = content
        .tensor_infos
        .values()
        .filter(|t| t.shape.dims().len() == 2)
        .map(|t| t.ggml_dtype)
        .collect();
    types.sort_by_key(|t| ggml_type_name(*t));
    types.dedup();
    if let [one] = types.as_slice() {
        return ggml_type_name(*one).to_string();
    }
    content
        .metadata
        .get("general.file_type")
        .and_then(|v| v.to_u32().ok())
        .and_then(file_type_name)
        .map(str::to_string)
        .unwrap_or_else(|| "mixed".to_string())
}

/// What a tensor of a GGML type we have no kernel for is refused with.
pub fn no_kernel(tensor: &str, type_name: &str) -> String {
    format!(
        "tensor {tensor} is of GGML type {type_name}, which this server has no kernel for; \
         supported weight types: {}",
        crate::model::linear::supported_types()
    )
}

/// Refuses GGUF tensor `g` (Hugging Face `name`) of a type no kernel here
/// takes (and candle cannot read from a GGUF file either: Q8_1, Q8_K).
fn check_type(name: &str, g: &str, dtype: GgmlDType) -> Result<()> {
    let ok = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        || crate::model::quant::Format::from_ggml(dtype).is_some();
    if ok {
        return Ok(());
    }
    Err(WorkerError::Config(no_kernel(
        &format!("{g} ({name})"),
        ggml_type_name(dtype),
    )))
}

/// Rows (`dim` 0) or columns (`dim` 1) `range` of a row-major `[rows,
/// cols]` tensor stored as units of `unit` weights in `unit_bytes` bytes (a
/// float element, or a GGML block), fetched by `read(at, len)` at byte
/// offsets within the tensor: one read for rows, one per row for columns.
/// Returns the bytes and the slice's shape.
fn read_slice(
    rows: usize,
    cols: usize,
    unit: usize,
    unit_bytes: usize,
    dim: usize,
    range: &Range<usize>,
    mut read: impl FnMut(usize, usize) -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, [usize; 2])> {
    let row_bytes = cols / unit * unit_bytes;
    if dim == 0 {
        let bytes = read(range.start * row_bytes, range.len() * row_bytes)?;
        return Ok((bytes, [range.len(), cols]));
    }
    let (from, len) = (
        range.start / unit * unit_bytes,
        range.len() / unit * unit_bytes,
    );
    let mut bytes = Vec::with_capacity(rows * len);
    for r in 0..rows {
        bytes.extend(read(r * row_bytes + from, len)?);
    }
    Ok((bytes, [rows, range.len()]))
}

/// `len` bytes at `at`.
fn read_at(f: &mut (impl Read + Seek), at: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn unique_files(dir: &Path, index: &ShardIndex) -> Vec<PathBuf> {
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|n| dir.join(n)).collect()
}
