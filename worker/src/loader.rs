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
use crate::model::{DtypeChoice, Llama, WeightDtype};
use crate::tokenizer::{self, LoadedTokenizer};
use crate::weights::{ReadProgress, Stored, WeightStore};

pub use crate::chat_template::AQUILA_CHAT_TEMPLATE;

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
    /// Why: "--dtype bf16", "--dtype auto: the checkpoint's weights are
    /// float16"...
    pub dtype_reason: String,
    pub chat_template: Option<String>,
    /// Its name: "model" (the checkpoint's own), a built-in's
    /// ("aquila-chat"...), a file's path; empty without one.
    pub chat_template_name: String,
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
            dtype_reason: self.dtype_reason,
            chat_template: self.chat_template,
            chat_template_name: self.chat_template_name,
            chat_stop: self.chat_stop,
        })
    }
}

/// Loads the model for the CPU engine.
pub fn load(path: &Path, opts: &LoadOptions, comm: Arc<dyn Communicator>) -> Result<LoadedModel> {
    load_checkpoint(Checkpoint::open(path)?, opts, comm)
}

/// [`load`] of a checkpoint already opened.
pub fn load_checkpoint(
    ckpt: Checkpoint,
    opts: &LoadOptions,
    comm: Arc<dyn Communicator>,
) -> Result<LoadedModel> {
    ckpt.load_with(opts, |cfg, store, progress| {
        let m = Llama::load(cfg, store, opts, comm, progress)?;
        let bytes = m.weight_bytes();
        Ok((m, bytes))
    })
}

/// A checkpoint opened but not loaded: its config, its tokenizer and where
/// its tensors lie (headers only), for what must be decided before the
/// weights are read: the dtype, whether it fits.
pub struct Checkpoint {
    pub path: std::path::PathBuf,
    pub cfg: ModelConfig,
    pub store: WeightStore,
    pub tokenizer: LoadedTokenizer,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
        let (cfg, store, tokenizer) = if is_gguf {
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
        let vocab = tokenizer.tokenizer.get_vocab_size(true);
        if vocab > cfg.vocab_size {
            return Err(WorkerError::Config(format!(
                "the tokenizer has {vocab} tokens but the model's vocab_size is {}",
                cfg.vocab_size
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            cfg,
            store,
            tokenizer,
        })
    }

    /// The float type `choice` means for this checkpoint on `device`, and
    /// why: `auto` keeps the checkpoint's own (float16 and bfloat16 stay
    /// 16-bit, float32 stays f32; a GGUF file's quantized weights stay
    /// quantized and its float tensors f32, as before), except that a GPU
    /// holds 16-bit weights, so f32 becomes bf16 there.
    pub fn resolve_dtype(&self, choice: DtypeChoice, gpu: bool) -> (WeightDtype, String) {
        let explicit = match choice {
            DtypeChoice::Auto => None,
            DtypeChoice::F32 => Some(WeightDtype::F32),
            DtypeChoice::Bf16 => Some(WeightDtype::Bf16),
            DtypeChoice::F16 => Some(WeightDtype::F16),
        };
        if let Some(d) = explicit {
            return (d, format!("--dtype {}", d.label()));
        }
        let stored = self.store.weight_type();
        let (d, why) = match stored {
            Some(Stored::F16) => (WeightDtype::F16, "the checkpoint's weights are float16"),
            Some(Stored::Bf16) => (WeightDtype::Bf16, "the checkpoint's weights are bfloat16"),
            Some(Stored::Ggml(_)) => (
                WeightDtype::F32,
                "GGUF quantized weights stay quantized, its float tensors in f32",
            ),
            Some(Stored::F32) | None => (WeightDtype::F32, "the checkpoint's weights are float32"),
        };
        if gpu && d == WeightDtype::F32 {
            return (
                WeightDtype::Bf16,
                format!("--dtype auto: {why}, and a GPU holds 16-bit weights"),
            );
        }
        (d, format!("--dtype auto: {why}"))
    }

    /// Loads the model with `build`, which makes it from the config and the
    /// weights (counting what it reads in `progress`, and setting its total)
    /// and says how many bytes of weights it holds. A line a second reports
    /// the bytes read, the rate and the time left.
    pub fn load_with<M>(
        self,
        opts: &LoadOptions,
        build: impl FnOnce(ModelConfig, &WeightStore, &ReadProgress) -> Result<(M, usize)>,
    ) -> Result<Loaded<M>> {
        load_opened(self, opts, build)
    }
}

/// Loads the model with `build` (see [`Checkpoint::load_with`]).
pub fn load_with<M>(
    path: &Path,
    opts: &LoadOptions,
    build: impl FnOnce(ModelConfig, &WeightStore, &ReadProgress) -> Result<(M, usize)>,
) -> Result<Loaded<M>> {
    Checkpoint::open(path)?.load_with(opts, build)
}

fn load_opened<M>(
    ckpt: Checkpoint,
    opts: &LoadOptions,
    build: impl FnOnce(ModelConfig, &WeightStore, &ReadProgress) -> Result<(M, usize)>,
) -> Result<Loaded<M>> {
    let started = Instant::now();
    let Checkpoint {
        path,
        cfg,
        store,
        tokenizer: tok,
    } = ckpt;
    let path = path.as_path();
    let architecture = cfg.architecture.clone();
    let dtype = store
        .gguf_weight_type()
        .unwrap_or_else(|| opts.dtype.label().to_string());
    let params = cfg.parameter_count();
    let progress = ReadProgress::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let built = std::thread::scope(|scope| {
        let progress = &progress;
        scope.spawn(move || report_progress(progress, started, &done_rx));
        let built = build(cfg, &store, progress);
        drop(done_tx);
        built
    });
    let (model, weight_bytes) = built?;
    let (read, _) = progress.get();
    let secs = started.elapsed().as_secs_f64();
    let name = opts.name.clone().unwrap_or_else(|| default_name(path));
    tracing::info!(
        "loaded {name}: {:.1}M parameters, {} of weights ({dtype}), {} read in {secs:.1} s ({}/s)",
        params as f64 / 1e6,
        human_bytes(weight_bytes),
        human_bytes(read as usize),
        human_bytes((read as f64 / secs.max(1e-3)) as usize),
    );
    let dtype_reason = match store.gguf_weight_type() {
        Some(_) => "GGUF weights as stored".to_string(),
        None => format!("--dtype {}", opts.dtype.label()),
    };
    // The checkpoint's own template; the Aquila vocabulary without one
    // gets AquilaChat's.
    let (chat_template, chat_template_name, chat_stop) = match (&tok.chat_template, tok.is_aquila) {
        (Some(t), _) => (Some(t.clone()), "model".to_string(), Vec::new()),
        (None, true) => {
            let c = crate::chat_template::Chosen::built_in("aquila-chat")
                .expect("aquila-chat is built in");
            (Some(c.template), c.name, c.stop)
        }
        (None, false) => (None, String::new(), Vec::new()),
    };
    Ok(Loaded {
        model,
        tokenizer: tok,
        name,
        architecture,
        dtype,
        dtype_reason,
        chat_template,
        chat_template_name,
        chat_stop,
    })
}

/// Every second until `done` closes: bytes read of the total, the rate
/// since the start, and the time left at that rate.
fn report_progress(
    progress: &ReadProgress,
    started: Instant,
    done: &std::sync::mpsc::Receiver<()>,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        done.recv_timeout(Duration::from_secs(1))
    {
        let (read, total) = progress.get();
        let secs = started.elapsed().as_secs_f64();
        let rate = read as f64 / secs.max(1e-3);
        let left = total.saturating_sub(read) as f64 / rate.max(1.0);
        let pct = if total > 0 {
            100.0 * read as f64 / total as f64
        } else {
            0.0
        };
        tracing::info!(
            "loading weights: {} of {} ({pct:.0}%), {}/s, about {left:.0} s left",
            human_bytes(read as usize),
            human_bytes(total as usize),
            human_bytes(rate as usize),
        );
    }
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
