//! Weight stores: where a checkpoint's tensors come from. One store per
//! format (safetensors, PyTorch `.bin`, GGUF), single file or sharded with an
//! index, all asked by Hugging Face tensor name. GGUF names are mapped here,
//! so model code reads like a Hugging Face checkpoint whatever the file.
//! A store hands out tensors; it does not decide dtypes or layouts.
//!
//! Opening a store reads only headers (safetensors' JSON, the `.bin`
//! pickles and zip directories, GGUF's metadata) and notes where each
//! tensor's bytes lie in which file. Tensors are then read with positioned
//! reads (`pread`) of just the rows and columns asked for, from any number of
//! threads at once: no whole-file copy, no memory map whose pages would
//! count against the process while the weights are repacked, and a
//! tensor-parallel rank reads only its slice.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
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

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    F32,
    F16,
    Bf16,
    /// A GGML block-quantized type (never F32/F16/BF16: those are above).
    Ggml(GgmlDType),
}

impl Stored {
    fn of_ggml(t: GgmlDType) -> Self {
        match t {
            GgmlDType::F32 => Self::F32,
            GgmlDType::F16 => Self::F16,
            GgmlDType::BF16 => Self::Bf16,
            other => Self::Ggml(other),
        }
    }

    fn of_dtype(t: DType) -> Option<Self> {
        match t {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// Weights per storage unit (a float, or a GGML block) and its bytes.
    pub fn unit(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Ggml(t) => (t.block_size(), t.type_size()),
        }
    }

    /// Bytes of `n` consecutive weights (`n` a multiple of the unit).
    pub fn bytes(self, n: usize) -> usize {
        let (unit, bytes) = self.unit();
        n / unit * bytes
    }

    pub fn label(self) -> String {
        match self {
            Self::F32 => "f32".into(),
            Self::F16 => "f16".into(),
            Self::Bf16 => "bf16".into(),
            Self::Ggml(t) => ggml_type_name(t).to_string(),
        }
    }

    fn candle(self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
            Self::Ggml(_) => None,
        }
    }
}

/// Where one tensor's bytes lie: row-major from `offset` in file `file`.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub stored: Stored,
    /// PyTorch order: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    file: usize,
    offset: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the whole tensor.
    pub fn bytes(&self) -> usize {
        self.stored.bytes(self.numel())
    }
}

/// What kind of checkpoint a store reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    PytorchBin,
    Gguf,
}

pub struct WeightStore {
    format: Format,
    /// The data files, and their paths for messages.
    files: Vec<(File, PathBuf)>,
    /// By Hugging Face name (GGUF names mapped).
    tensors: HashMap<String, TensorEntry>,
    /// `.bin` tensors that cannot be read in place (strided, or in a
    /// compressed zip entry), by name: candle's pickle reader of their file
    /// makes them.
    pth_fallback: HashMap<String, Arc<PthTensors>>,
    gguf: Option<gguf_file::Content>,
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
    let part = gguf_part(rest)?;
    Some(format!("blk.{layer}.{part}.weight"))
}

fn gguf_part(hf_rest: &str) -> Option<&'static str> {
    Some(match hf_rest {
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
    })
}

/// The Hugging Face name of a llama GGUF tensor (the inverse of
/// [`gguf_name`]).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = part.strip_suffix(".weight")?;
    let hf = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    .into_iter()
    .find(|h| gguf_part(h) == Some(part))?;
    Some(format!("model.layers.{layer}.{hf}"))
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

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| WorkerError::io(format!("opening {}", path.display()), e))
}

impl WeightStore {
    /// Opens the weights of a Hugging Face folder, preferring safetensors.
    pub fn open_hf(dir: &Path) -> Result<Self> {
        let st_index = dir.join("model.safetensors.index.json");
        let st_single = dir.join("model.safetensors");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let bin_single = dir.join("pytorch_model.bin");
        if st_index.exists() || st_single.exists() {
            let paths = if st_index.exists() {
                unique_files(dir, &read_index(&st_index)?)
            } else {
                vec![st_single]
            };
            return Self::open_safetensors(paths);
        }
        if bin_index.exists() || bin_single.exists() {
            let paths = if bin_index.exists() {
                unique_files(dir, &read_index(&bin_index)?)
            } else {
                vec![bin_single]
            };
            return Self::open_pth(paths);
        }
        Err(WorkerError::load(
            dir,
            "no weights: expected model.safetensors, model.safetensors.index.json, \
             pytorch_model.bin or pytorch_model.bin.index.json",
        ))
    }

    fn empty(format: Format) -> Self {
        Self {
            format,
            files: Vec::new(),
            tensors: HashMap::new(),
            pth_fallback: HashMap::new(),
            gguf: None,
        }
    }

    fn open_safetensors(paths: Vec<PathBuf>) -> Result<Self> {
        let mut store = Self::empty(Format::Safetensors);
        for path in paths {
            let file = open(&path)?;
            // The header is parsed and checked by the safetensors crate over
            // a map of the file; only the header's pages are touched.
            // SAFETY: a read-only map used for the header alone, dropped
            // before this function returns.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| WorkerError::io(format!("mapping {}", path.display()), e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| WorkerError::load(&path, e))?;
            let data_start = 8 + n as u64;
            for (name, info) in meta.tensors() {
                let stored = match info.dtype {
                    safetensors::Dtype::F32 => Stored::F32,
                    safetensors::Dtype::F16 => Stored::F16,
                    safetensors::Dtype::BF16 => Stored::Bf16,
                    other => {
                        return Err(WorkerError::load(
                            &path,
                            format!("tensor {name} is {other:?}; weights must be F32, F16 or BF16"),
                        ));
                    }
                };
                let entry = TensorEntry {
                    stored,
                    shape: info.shape.clone(),
                    file: store.files.len(),
                    offset: data_start + info.data_offsets.0 as u64,
                };
                store.tensors.insert(name, entry);
            }
            store.files.push((file, path));
        }
        Ok(store)
    }

    fn open_pth(paths: Vec<PathBuf>) -> Result<Self> {
        let mut store = Self::empty(Format::PytorchBin);
        for path in paths {
            let zerr = |e: zip::result::ZipError| WorkerError::load(&path, e);
            let pth = PthTensors::new(&path, None).map_err(|e| WorkerError::load(&path, e))?;
            let file = open(&path)?;
            let mut zip = zip::ZipArchive::new(std::io::BufReader::new(
                file.try_clone()
                    .map_err(|e| WorkerError::io(format!("opening {}", path.display()), e))?,
            ))
            .map_err(zerr)?;
            let index = store.files.len();
            let mut fallback = Vec::new();
            for (name, info) in pth.tensor_infos() {
                // PyTorch stores its zip entries uncompressed: read the
                // tensor where it lies, unless it is strided or compressed.
                let entry = zip.by_name(&info.path).map_err(zerr)?;
                let in_place = entry.compression() == zip::CompressionMethod::Stored
                    && info.layout.is_contiguous();
                match (Stored::of_dtype(info.dtype), entry.data_start()) {
                    (Some(stored), Some(start)) if in_place => {
                        let elem = info.dtype.size_in_bytes() as u64;
                        store.tensors.insert(
                            name.clone(),
                            TensorEntry {
                                stored,
                                shape: info.layout.dims().to_vec(),
                                file: index,
                                offset: start + info.layout.start_offset() as u64 * elem,
                            },
                        );
                    }
                    (Some(stored), _) => {
                        store.tensors.insert(
                            name.clone(),
                            TensorEntry {
                                stored,
                                shape: info.layout.dims().to_vec(),
                                file: index,
                                offset: 0,
                            },
                        );
                        fallback.push(name.clone());
                    }
                    (None, _) => {
                        return Err(WorkerError::load(
                            &path,
                            format!(
                                "tensor {name} is {:?}; weights must be F32, F16 or BF16",
                                info.dtype
                            ),
                        ));
                    }
                }
            }
            if !fallback.is_empty() {
                tracing::warn!(
                    "{}: {} tensors are strided or compressed and are read through candle \
                     (slower): {}",
                    path.display(),
                    fallback.len(),
                    fallback.join(", ")
                );
                let pth = Arc::new(pth);
                for name in fallback {
                    store.pth_fallback.insert(name, pth.clone());
                }
            }
            store.files.push((file, path));
        }
        Ok(store)
    }

    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = open(path)?;
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
        let mut store = Self::empty(Format::Gguf);
        for (name, info) in &content.tensor_infos {
            let Some(hf) = hf_name(name) else {
                continue;
            };
            check_type(&hf, name, info.ggml_dtype)?;
            store.tensors.insert(
                hf,
                TensorEntry {
                    stored: Stored::of_ggml(info.ggml_dtype),
                    shape: info.shape.dims().to_vec(),
                    file: 0,
                    offset: content.tensor_data_offset + info.offset,
                },
            );
        }
        store.files.push((file, path.to_path_buf()));
        store.gguf = Some(content);
        Ok(store)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        self.gguf.as_ref()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Where and how `name` is stored.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| WorkerError::Weight {
            name: name.to_string(),
            source: candle_core::Error::Msg("not in the checkpoint".into()),
        })
    }

    /// Bytes of all the tensors, as stored.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(TensorEntry::bytes).sum()
    }

    /// Whether `name` can be read in place, by rows and columns.
    pub fn readable_in_place(&self, name: &str) -> bool {
        self.tensors.contains_key(name) && !self.pth_fallback.contains_key(name)
    }

    /// Checks that rows `rows` × columns `cols` of `name` can be read in
    /// place: inside its shape and, for a GGML type, on block boundaries.
    /// Returns its columns and its storage unit (weights, bytes).
    pub fn check_rect(
        &self,
        name: &str,
        rows: &Range<usize>,
        cols: &Range<usize>,
    ) -> Result<(usize, usize, usize)> {
        let e = self.entry(name)?;
        let msg = |m: String| WorkerError::Weight {
            name: name.to_string(),
            source: candle_core::Error::Msg(m),
        };
        if self.pth_fallback.contains_key(name) {
            return Err(msg("cannot be read in place".into()));
        }
        let (n_rows, n_cols) = match *e.shape.as_slice() {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => return Err(msg(format!("cannot read rows of shape {:?}", e.shape))),
        };
        let (unit, unit_bytes) = e.stored.unit();
        if rows.end > n_rows || cols.end > n_cols || rows.start > rows.end || cols.start > cols.end
        {
            return Err(msg(format!(
                "rows {rows:?} × columns {cols:?} exceed its shape {:?}",
                e.shape
            )));
        }
        if !(cols.start.is_multiple_of(unit) && cols.end.is_multiple_of(unit)) {
            return Err(msg(format!(
                "columns {cols:?} do not fall on its {unit}-weight {} block boundaries; \
                 choose a tensor-parallel size that divides {n_cols} into multiples of {unit}",
                e.stored.label()
            )));
        }
        Ok((n_cols, unit, unit_bytes))
    }

    /// The bytes of rows `rows` and columns `cols` of the 2-D tensor
    /// `name`, row after row, into `buf` (resized): one read for whole rows,
    /// one per row for a column slice, which for a GGML type must fall on
    /// its block boundaries. Safe to call from several threads at once.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let (n_cols, unit, unit_bytes) = self.check_rect(name, &rows, &cols)?;
        let e = self.entry(name)?;
        let row_bytes = n_cols / unit * unit_bytes;
        let (from, len) = (
            cols.start / unit * unit_bytes,
            cols.len() / unit * unit_bytes,
        );
        buf.resize(rows.len() * len, 0);
        let (file, path) = &self.files[e.file];
        let io = |err| WorkerError::io(format!("reading {name} from {}", path.display()), err);
        let at = |r: usize| e.offset + (r * row_bytes + from) as u64;
        if len == row_bytes {
            file.read_exact_at(buf, at(rows.start)).map_err(io)?;
        } else {
            for (i, r) in rows.enumerate() {
                file.read_exact_at(&mut buf[i * len..(i + 1) * len], at(r))
                    .map_err(io)?;
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Weight> {
        let e = self.entry(name)?;
        match *e.shape.as_slice() {
            [rows, cols] => self.get_rect(name, 0..rows, 0..cols),
            _ => {
                let shape = e.shape.clone();
                let n = e.numel();
                let w = self.get_rect(name, 0..1, 0..n)?;
                let werr = |source| WorkerError::Weight {
                    name: name.to_string(),
                    source,
                };
                match w {
                    Weight::Dense(t) => Ok(Weight::Dense(t.reshape(shape).map_err(werr)?)),
                    Weight::Quantized(q) => Ok(Weight::Quantized(q)),
                }
            }
        }
    }

    /// Rows (`dim` 0) or columns (`dim` 1) `range` of the 2-D tensor `name`:
    /// a tensor-parallel rank's slice; only its bytes are read. A GGUF
    /// block-quantized tensor is cut along its columns only at block
    /// boundaries.
    pub fn get_slice(&self, name: &str, dim: usize, range: Range<usize>) -> Result<Weight> {
        let e = self.entry(name)?;
        match (e.shape.as_slice(), dim) {
            (&[rows, _], 0) if range.start < range.end && range.end <= rows => {
                let cols = e.shape[1];
                self.get_rect(name, range, 0..cols)
            }
            (&[rows, cols], 1) if range.start < range.end && range.end <= cols => {
                self.get_rect(name, 0..rows, range)
            }
            _ => Err(WorkerError::Weight {
                name: name.to_string(),
                source: candle_core::Error::Msg(format!(
                    "cannot take {range:?} of dimension {dim} from shape {:?}",
                    e.shape
                )),
            }),
        }
    }

    /// A rectangle of a tensor as a candle tensor (`[rows, cols]`).
    fn get_rect(&self, name: &str, rows: Range<usize>, cols: Range<usize>) -> Result<Weight> {
        let werr = |source| WorkerError::Weight {
            name: name.to_string(),
            source,
        };
        if let Some(pth) = self.pth_fallback.get(name) {
            let t = pth
                .get(name)
                .map_err(werr)?
                .ok_or_else(|| werr(candle_core::Error::Msg("not in the checkpoint".into())))?;
            let t = if t.rank() == 2 {
                t.narrow(0, rows.start, rows.len())
                    .and_then(|t| t.narrow(1, cols.start, cols.len()))
                    .map_err(werr)?
            } else {
                t
            };
            return Ok(Weight::Dense(t));
        }
        let e = self.entry(name)?;
        let mut raw = Vec::new();
        self.read_rows(name, rows.clone(), cols.clone(), &mut raw)?;
        let shape = [rows.len(), cols.len()];
        match (e.stored.candle(), e.stored) {
            (Some(dtype), _) => Ok(Weight::Dense(
                Tensor::from_raw_buffer(&raw, dtype, &shape, &Device::Cpu).map_err(werr)?,
            )),
            (None, Stored::Ggml(t)) => Ok(Weight::Quantized(Arc::new(
                qtensor_from_ggml(t, &raw, shape.to_vec(), &Device::Cpu).map_err(werr)?,
            ))),
            (None, _) => unreachable!("float types have a candle dtype"),
        }
    }

    /// How the checkpoint stores its weight matrices: the type of the first
    /// layer's query projection.
    pub fn weight_type(&self) -> Option<Stored> {
        self.tensors
            .get("model.layers.0.self_attn.q_proj.weight")
            .map(|e| e.stored)
    }

    /// For a GGUF file, what its 2-D weights are stored as: their GGML type
    /// when they share one ("Q4_1", "F16"), else the file's type as
    /// llama.cpp names it (`general.file_type`: "Q4_K_M"), else "mixed".
    /// Float checkpoints are held in `--dtype`, so None.
    pub fn gguf_weight_type(&self) -> Option<String> {
        self.gguf.as_ref().map(gguf_label)
    }
}

/// Bytes of weights read so far, of how many: shared by the threads that
/// read, watched by the loader's progress line.
#[derive(Debug, Default)]
pub struct ReadProgress {
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl ReadProgress {
    pub fn add(&self, bytes: usize) {
        self.done
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// What the load will read in all, once the model knows.
    pub fn set_total(&self, bytes: usize) {
        self.total
            .store(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// (done, total) bytes.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.done.load(Relaxed), self.total.load(Relaxed))
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

fn unique_files(dir: &Path, index: &ShardIndex) -> Vec<PathBuf> {
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|n| dir.join(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_and_hf_names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.31.mlp.down_proj.weight",
            "model.layers.7.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn stored_sizes() {
        assert_eq!(Stored::F16.bytes(4096), 8192);
        assert_eq!(Stored::Ggml(GgmlDType::Q4_0).bytes(4096), 128 * 18);
        assert_eq!(Stored::Ggml(GgmlDType::Q4K).bytes(4096), 16 * 144);
    }
}
