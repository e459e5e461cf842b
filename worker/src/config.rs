//! Model configuration: a serde mirror of Hugging Face `config.json`, and the
//! runtime [`ModelConfig`] every layer reads. GGUF metadata converts into the
//! same runtime config. Nothing here touches weights.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{Result, WorkerError};

/// The subset of `config.json` a LLaMA-architecture model needs.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_context() -> usize {
    2048
}

const ARCHITECTURES: [&str; 3] = ["LlamaForCausalLM", "AquilaModel", "AquilaForCausalLM"];
const MODEL_TYPES: [&str; 2] = ["llama", "aquila"];

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face LLaMA/Aquila: dimension i with i + head_dim/2.
    Half,
    /// llama.cpp GGUF (q/k rows permuted at conversion): 2i with 2i+1.
    Interleaved,
}

/// The runtime configuration, validated once.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    pub rope_style: RopeStyle,
}

impl HfConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| WorkerError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| WorkerError::load(path, e))
    }

    pub fn into_runtime(self) -> Result<ModelConfig> {
        let arch = self.architectures.first().cloned().unwrap_or_default();
        let type_ok = self
            .model_type
            .as_deref()
            .is_none_or(|t| MODEL_TYPES.contains(&t));
        if !ARCHITECTURES.contains(&arch.as_str()) || !type_ok {
            return Err(WorkerError::Config(format!(
                "architectures = {:?}, model_type = {:?}: supported are {ARCHITECTURES:?} with model_type {MODEL_TYPES:?}",
                self.architectures, self.model_type
            )));
        }
        if let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(WorkerError::Config(format!(
                "rope_scaling = {scaling} is not supported yet"
            )));
        }
        let cfg = ModelConfig {
            architecture: arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            context_length: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_style: RopeStyle::Half,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.context_length),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(WorkerError::Config(format!("{field} = 0 must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(WorkerError::Config(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(WorkerError::Config(format!(
                "head_dim = {} must be even for RoPE",
                self.head_dim
            )));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of K and V one token occupies in a cache of `dtype`, all layers.
    pub fn kv_bytes_per_token(&self, dtype: crate::kv::KvDtype) -> usize {
        2 * self.num_layers * self.kv_dim() * dtype.size()
    }
}

/// Reads an integer metadata value whatever width the file used.
fn gguf_usize(content: &gguf_file::Content, key: &str) -> Option<usize> {
    use gguf_file::Value as V;
    match content.metadata.get(key)? {
        V::U8(v) => Some(*v as usize),
        V::I8(v) => usize::try_from(*v).ok(),
        V::U16(v) => Some(*v as usize),
        V::I16(v) => usize::try_from(*v).ok(),
        V::U32(v) => Some(*v as usize),
        V::I32(v) => usize::try_from(*v).ok(),
        V::U64(v) => usize::try_from(*v).ok(),
        V::I64(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn gguf_f64(content: &gguf_file::Content, key: &str) -> Option<f64> {
    use gguf_file::Value as V;
    match content.metadata.get(key)? {
        V::F32(v) => Some(*v as f64),
        V::F64(v) => Some(*v),
        _ => gguf_usize(content, key).map(|v| v as f64),
    }
}

impl ModelConfig {
    /// The runtime config of a llama-architecture GGUF file.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(WorkerError::Config(format!(
                "general.architecture = {arch:?}: only \"llama\" GGUF files are supported"
            )));
        }
        let need = |key: &str| {
            gguf_usize(content, &format!("llama.{key}"))
                .ok_or_else(|| WorkerError::Config(format!("GGUF metadata llama.{key} is missing")))
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => {
                return Err(WorkerError::Config(
                    "GGUF tensor token_embd.weight is missing".into(),
                ));
            }
        };
        let cfg = ModelConfig {
            architecture: arch,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads: need("attention.head_count_kv").unwrap_or(num_heads),
            head_dim: need("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1)),
            vocab_size,
            rms_norm_eps: gguf_f64(content, "llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: gguf_f64(content, "llama.rope.freq_base").unwrap_or(10000.0),
            context_length: need("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            rope_style: RopeStyle::Interleaved,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parameters of the whole (unsharded) model.
    pub fn parameter_count(&self) -> usize {
        let (h, q, kv, i) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
        );
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        heads * self.vocab_size * h + self.num_layers * per_layer + h
    }
}
