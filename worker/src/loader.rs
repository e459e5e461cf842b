//! Loads a model from a path: a Hugging Face folder (config.json, weights,
//! tokenizer) or a GGUF file (everything embedded). Reports progress while
//! reading weights and one summary line at the end. Decides what the model
//! is called and which chat template and stop strings go with it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::Communicator;
use crate::config::{HfConfig, ModelConfig};
use crate::error::{Result, WorkerError};
use crate::model::{Llama, WeightDtype};
use crate::tokenizer::{self, LoadedTokenizer};
use crate::weights::WeightStore;

/// AquilaChat-7B's conversation format (FastChat's `aquila-chat`), as a
/// Jinja template: system text, then `###Human: q###Assistant: a` turns.
pub const AQUILA_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}\
{{ messages[0]['content'] }}{% set rest = messages[1:] %}\
{% else %}A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.\
{% set rest = messages %}{% endif %}\
{% for m in rest %}{% if m['role'] == 'user' %}###Human: {{ m['content'] }}\
{% else %}###Assistant: {{ m['content'] }}{% endif %}{% endfor %}###Assistant:";

/// A model (the CPU engine's `Llama` unless said otherwise) with what
/// serving it needs besides.
pub struct Loaded<M = Llama> {
    pub model: M,
    pub tokenizer: LoadedTokenizer,
    pub name: String,
    /// As the checkpoint says: "AquilaForCausalLM", "llama" (GGUF)...
    pub architecture: String,
    /// What the weights are held as: "f32", "bf16", "Q4_1", "Q4_K_M"...
    pub dtype: String,
    pub chat_template: Option<String>,
    /// Stop strings the chat template implies.
    pub chat_stop: Vec<String>,
}

pub struct LoadOptions {
    pub dtype: WeightDtype,
    /// Name served to clients; default: the folder or file name.
    pub name: Option<String>,
    /// Sum quantized row-parallel products in fixed runs, so results are
    /// the same bits at every tensor-parallel size (`--tp-invariant`).
    pub tp_invariant: bool,
}

/// The model's shape alone (a GGUF header or `config.json`), without its
/// weights: what a launcher checks before it starts ranks.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let store = WeightStore::open_gguf(path)?;
        let content = store
            .gguf_content()
            .ok_or_else(|| WorkerError::load(path, "not a GGUF file"))?;
        ModelConfig::from_gguf(content)
    } else if path.is_dir() {
        HfConfig::read(&path.join("config.json"))?.into_runtime()
    } else {
        Err(WorkerError::load(
            path,
            "not a Hugging Face model folder or a .gguf file",
        ))
    }
}

pub type LoadedModel = Loaded<Llama>;

impl<M> Loaded<M> {
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> Loaded<N> {
        let Ok(loaded) = self.try_map(|m| Ok::<_, std::convert::Infallible>(f(m)));
        loaded
    }

    /// [`map`](Self::map) with a step that can fail.
    pub fn try_map<N, E>(
        self,
        f: impl FnOnce(M) -> std::result::Result<N, E>,
    ) -> std::result::Result<Loaded<N>, E> {
        Ok(Loaded {
            model: f(self.model)?,
            tokenizer: self.tokenizer,
            name: self.name,
            architecture: self.architecture,
            dtype: self.dtype,
            chat_template: self.chat_template,
            chat_stop: self.chat_stop,
        })
    }
}

/// Loads the model for the CPU engine.
pub fn load(path: &Path, opts: &LoadOptions, comm: Arc<dyn Communicator>) -> Result<LoadedModel> {
    load_with(path, opts, |cfg, store, progress| {
        let m = Llama::load(cfg, store, opts, comm, progress)?;
        let bytes = m.weight_bytes();
        Ok((m, bytes))
    })
}

/// Loads the model with `build`, which makes it from the config and the
/// weights (reporting each tensor to `progress`) and says how many bytes of
/// weights it holds.
pub fn load_with<M>(
    path: &Path,
    opts: &LoadOptions,
    build: impl FnOnce(ModelConfig, &WeightStore, &mut dyn FnMut(&str)) -> Result<(M, usize)>,
) -> Result<Loaded<M>> {
    let started = Instant::now();
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    let (cfg, store, tok) = if is_gguf {
        let store = WeightStore::open_gguf(path)?;
        let content = store
            .gguf_content()
            .ok_or_else(|| WorkerError::load(path, "not a GGUF file"))?;
        let cfg = ModelConfig::from_gguf(content)?;
        let tok = tokenizer::from_gguf(content)?;
        (cfg, store, tok)
    } else if path.is_dir() {
        let cfg = HfConfig::read(&path.join("config.json"))?.into_runtime()?;
        let tok = tokenizer::from_hf_folder(path)?;
        (cfg, WeightStore::open_hf(path)?, tok)
    } else {
        return Err(WorkerError::load(
            path,
            "not a Hugging Face model folder or a .gguf file",
        ));
    };
    let vocab = tok.tokenizer.get_vocab_size(true);
    if vocab > cfg.vocab_size {
        return Err(WorkerError::Config(format!(
            "the tokenizer has {vocab} tokens but the model's vocab_size is {}",
            cfg.vocab_size
        )));
    }
    let architecture = cfg.architecture.clone();
    let dtype = store
        .gguf_weight_type()
        .unwrap_or_else(|| opts.dtype.label().to_string());
    let total = 2 + cfg.num_layers * 9 + usize::from(!cfg.tie_word_embeddings);
    let mut done = 0;
    let mut last_report = Instant::now();
    let mut progress = |name: &str| {
        done += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            tracing::info!(
                "loading weights: {done}/{total} tensors ({name}), {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    };
    let params = cfg.parameter_count();
    let (model, weight_bytes) = build(cfg, &store, &mut progress)?;
    let name = opts.name.clone().unwrap_or_else(|| default_name(path));
    tracing::info!(
        "loaded {name}: {:.1}M parameters, {} of weights ({dtype}), {:.1} s",
        params as f64 / 1e6,
        human_bytes(weight_bytes),
        started.elapsed().as_secs_f64()
    );
    let (chat_template, chat_stop) = match (&tok.chat_template, tok.is_aquila) {
        (Some(t), _) => (Some(t.clone()), Vec::new()),
        (None, true) => (
            Some(AQUILA_CHAT_TEMPLATE.to_string()),
            vec!["###".to_string()],
        ),
        (None, false) => (None, Vec::new()),
    };
    Ok(Loaded {
        model,
        tokenizer: tok,
        name,
        architecture,
        dtype,
        chat_template,
        chat_stop,
    })
}

fn default_name(path: &Path) -> String {
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

pub fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else {
        format!("{:.1} MB", n / 1e6)
    }
}
