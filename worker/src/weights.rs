//! Weight stores: where a checkpoint's tensors come from. One store per
//! format (safetensors, PyTorch `.bin`, GGUF), single file or sharded with an
//! index, all asked by Hugging Face tensor name. GGUF names are mapped here,
//! so model code reads like a Hugging Face checkpoint whatever the file.
//! A store hands out tensors; it does not decide dtypes or layouts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor, pickle::PthTensors};

use crate::error::{Result, WorkerError};

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
            return Ok(Self::Pth { files, index });
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
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| WorkerError::load(path, e))?;
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
            Self::Pth { files, index } => {
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
                if !content.tensor_infos.contains_key(&g) {
                    return Err(missing());
                }
                let mut f = file
                    .lock()
                    .map_err(|_| WorkerError::load(path, "GGUF reader poisoned"))?;
                let q = content.tensor(&mut *f, &g, &Device::Cpu).map_err(werr)?;
                Ok(Weight::Quantized(Arc::new(q)))
            }
        }
    }

    /// For a GGUF file, what its 2-D weights are stored as ("q4_1",
    /// "f16"...); float checkpoints are held in `--dtype`, so None.
    pub fn gguf_weight_type(&self) -> Option<String> {
        match self {
            Self::Gguf { content, .. } => Some(
                content
                    .tensor_infos
                    .get("blk.0.attn_q.weight")
                    .map(|t| ggml_label(t.ggml_dtype))
                    .unwrap_or_else(|| "unknown".into()),
            ),
            Self::Safetensors(_) | Self::Pth { .. } => None,
        }
    }
}

pub fn ggml_label(t: GgmlDType) -> String {
    format!("{t:?}").to_lowercase()
}

fn unique_files(dir: &Path, index: &ShardIndex) -> Vec<PathBuf> {
    let mut names: Vec<&String> = index.weight_map.values().collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|n| dir.join(n)).collect()
}
