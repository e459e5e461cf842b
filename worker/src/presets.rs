//! `aquila make-model`: deterministic random-weight Aquila-architecture
//! checkpoints, the fixtures for tests and benchmarks. Same preset and seed,
//! same bytes. The tokenizer is byte-level BPE over the 256 bytes (a few
//! merges) plus two special tokens, so any text round-trips; `--tokenizer`
//! takes a real one from a model folder instead. Tensors are made one at a
//! time as they are written, so the 7B preset never needs its 27 GB of f32
//! in memory.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, WorkerError};
use crate::export::{self, FloatDtype, GgufMeta, TensorSource};
use crate::loader::AQUILA_CHAT_TEMPLATE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 256, grouped-query attention: for tests.
    Tiny,
    /// About 100M parameters, Aquila-7B's shape scaled down: for benchmarks.
    Base,
    /// Aquila-7B's shape (hidden 4096, 32 layers, 32 heads, MLP 11008,
    /// vocab 100,008, context 2048) with its official config.json
    /// (`AquilaModel`, its wrong bos/eos ids); float16 by default, as the
    /// release's two `.bin` shards are (`--format bin-sharded`).
    #[value(name = "7b")]
    Aquila7b,
}

pub struct PresetShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
}

impl Preset {
    pub fn shape(self) -> PresetShape {
        match self {
            Preset::Tiny => PresetShape {
                // 256-wide rows so every GGUF type, K-quants included, applies.
                hidden: 256,
                intermediate: 512,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 320,
                context: 1024,
            },
            Preset::Base => PresetShape {
                hidden: 768,
                intermediate: 2048,
                layers: 8,
                heads: 12,
                kv_heads: 12,
                vocab: 32000,
                context: 2048,
            },
            Preset::Aquila7b => PresetShape {
                hidden: 4096,
                intermediate: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                vocab: 100_008,
                context: 2048,
            },
        }
    }

    /// The float type its weights are written in unless `--dtype` says
    /// otherwise: the 7B one as the release stores it.
    pub fn default_dtype(self) -> FloatDtype {
        match self {
            Preset::Tiny | Preset::Base => FloatDtype::F32,
            Preset::Aquila7b => FloatDtype::F16,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Base => "base",
            Preset::Aquila7b => "7b",
        }
    }
}

/// Merges of the preset tokenizer, in priority order. Few, so that text is
/// mostly one token per byte, but some: real byte-level BPE files have them,
/// and llama.cpp refuses a GGUF whose merge list is empty.
const MERGES: [(&str, &str); 3] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")];

/// Ids of the preset tokenizer's special tokens (after the 256 bytes and the
/// merged tokens).
pub const EOS_ID: u32 = 256 + MERGES.len() as u32;
pub const BOS_ID: u32 = EOS_ID + 1;

/// GPT-2's reversible byte → printable character map.
fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
    }
    out
}

/// The preset tokenizer: a token per byte, the merged tokens of [`MERGES`],
/// `<|endoftext|>` and `<s>`.
pub fn tokenizer() -> Result<Tokenizer> {
    let terr =
        |e: tokenizers::Error| WorkerError::Config(format!("building the preset tokenizer: {e}"));
    let mut vocab: tokenizers::models::bpe::Vocab = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    for (i, (a, b)) in MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), 256 + i as u32);
    }
    let merges = MERGES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(terr)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens([
        AddedToken::from("<|endoftext|>", true),
        AddedToken::from("<s>", true),
    ])
    .map_err(terr)?;
    Ok(tok)
}

/// One tensor of a preset: its values are uniform in `center ± scale`.
struct Spec {
    name: String,
    shape: Vec<usize>,
    scale: f32,
    center: f32,
}

/// A preset's random weights, Hugging Face names and shapes, made on
/// demand: tensor `i` is ChaCha8 stream `i` of `seed`, one word per value,
/// so any part of any tensor can be made on its own (in parallel, and in
/// whatever order a writer asks) and the bytes never depend on it.
pub struct PresetTensors {
    seed: u64,
    specs: Vec<Spec>,
}

impl PresetTensors {
    pub fn new(preset: Preset, seed: u64) -> Self {
        let s = preset.shape();
        let hd = s.hidden / s.heads;
        let h = s.hidden;
        let w = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let mut specs = Vec::new();
        let mut t = |name: String, shape: Vec<usize>, scale: f32, center: f32| {
            specs.push(Spec {
                name,
                shape,
                scale,
                center,
            })
        };
        t(
            "model.embed_tokens.weight".into(),
            vec![s.vocab, h],
            1.0,
            0.0,
        );
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            t(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
            for (proj, rows) in [
                ("q_proj", s.heads * hd),
                ("k_proj", s.kv_heads * hd),
                ("v_proj", s.kv_heads * hd),
            ] {
                t(
                    format!("{p}.self_attn.{proj}.weight"),
                    vec![rows, h],
                    w(h),
                    0.0,
                );
            }
            t(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, s.heads * hd],
                w(h),
                0.0,
            );
            t(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.2,
                1.0,
            );
            for proj in ["gate_proj", "up_proj"] {
                t(
                    format!("{p}.mlp.{proj}.weight"),
                    vec![s.intermediate, h],
                    w(h),
                    0.0,
                );
            }
            t(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, s.intermediate],
                w(s.intermediate),
                0.0,
            );
        }
        t("model.norm.weight".into(), vec![h], 0.2, 1.0);
        t("lm_head.weight".into(), vec![s.vocab, h], w(h), 0.0);
        Self { seed, specs }
    }

    /// Every tensor, made: for tests that change a few before writing.
    pub fn to_vec(&self) -> Vec<export::ExportTensor> {
        (0..self.specs.len())
            .map(|i| export::ExportTensor {
                name: self.specs[i].name.clone(),
                shape: self.specs[i].shape.clone(),
                data: self.values(i).into_owned(),
            })
            .collect()
    }
}

impl TensorSource for PresetTensors {
    fn len(&self) -> usize {
        self.specs.len()
    }

    fn name(&self, i: usize) -> &str {
        &self.specs[i].name
    }

    fn shape(&self, i: usize) -> &[usize] {
        &self.specs[i].shape
    }

    fn values(&self, i: usize) -> Cow<'_, [f32]> {
        use rayon::prelude::*;
        const RUN: usize = 1 << 16;
        let spec = &self.specs[i];
        let mut out = vec![0f32; self.numel(i)];
        out.par_chunks_mut(RUN).enumerate().for_each(|(run, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(i as u64);
            rng.set_word_pos((run * RUN) as u128);
            for v in out {
                *v = spec.center + spec.scale * (rng.random::<f32>() * 2.0 - 1.0);
            }
        });
        Cow::Owned(out)
    }
}

/// Random weights for `preset` from `seed`, Hugging Face names and shapes.
pub fn tensors(preset: Preset, seed: u64) -> Vec<export::ExportTensor> {
    PresetTensors::new(preset, seed).to_vec()
}

/// `config.json` for `preset`: the 7B one as the official Aquila-7B release
/// writes it (`AquilaModel`, `model_type` aquila, bos/eos 1/2, which are
/// wrong for its vocabulary); the small ones like it but with `model_type`
/// llama, so stock `transformers` loads them.
pub fn config_json(preset: Preset, dtype: FloatDtype) -> serde_json::Value {
    let s = preset.shape();
    let torch_dtype = match dtype {
        FloatDtype::F32 => "float32",
        FloatDtype::F16 => "float16",
        FloatDtype::BF16 => "bfloat16",
    };
    if preset == Preset::Aquila7b {
        return json!({
            "architectures": ["AquilaModel"],
            "auto_map": {
                "AutoConfig": "configuration_aquila.AquilaConfig",
                "AutoModelForCausalLM": "modeling_aquila.AquilaForCausalLM"
            },
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": s.hidden,
            "initializer_range": 0.006,
            "intermediate_size": s.intermediate,
            "max_position_embeddings": s.context,
            "model_type": "aquila",
            "num_attention_heads": s.heads,
            "num_hidden_layers": s.layers,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false,
            "torch_dtype": torch_dtype,
            "transformers_version": "4.28.1",
            "use_cache": true,
            "vocab_size": s.vocab,
        });
    }
    json!({
        "architectures": ["AquilaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.context,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": torch_dtype,
    })
}

/// Tokenizer files `--tokenizer` copies from a model folder, where present.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// Writes config.json and the tokenizer to `dir` (ours: tokenizer.json and
/// tokenizer_config.json; or the files of the folder `tokenizer_from`); the
/// caller writes the weights in the format it wants.
pub fn write_metadata(
    dir: &Path,
    preset: Preset,
    dtype: FloatDtype,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| WorkerError::io(format!("writing {name}"), e))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| WorkerError::io(format!("creating {}", dir.display()), e))?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write("config.json", pretty(&config_json(preset, dtype)))?;
    if let Some(from) = tokenizer_from {
        let mut copied = 0;
        for name in TOKENIZER_FILES {
            let src = from.join(name);
            if src.is_file() {
                // Read and written, not copied: a copy keeps a read-only
                // source's mode, and the next make-model could not replace it.
                let bytes = std::fs::read(&src)
                    .map_err(|e| WorkerError::io(format!("reading {}", src.display()), e))?;
                std::fs::write(dir.join(name), bytes)
                    .map_err(|e| WorkerError::io(format!("writing {name}"), e))?;
                copied += 1;
            }
        }
        let tok = crate::tokenizer::from_hf_folder(dir)?;
        let size = tok.tokenizer.get_vocab_size(true);
        let vocab = preset.shape().vocab;
        if copied == 0 || size > vocab {
            return Err(WorkerError::Config(format!(
                "--tokenizer {}: {} ({size} tokens) for a preset of {vocab}",
                from.display(),
                if copied == 0 {
                    "no tokenizer files"
                } else {
                    "more tokens than the preset's vocabulary"
                }
            )));
        }
        return Ok(());
    }
    let tok = tokenizer()?
        .to_string(true)
        .map_err(|e| WorkerError::Config(format!("serializing the preset tokenizer: {e}")))?;
    write("tokenizer.json", tok)?;
    write(
        "tokenizer_config.json",
        pretty(&json!({
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "add_bos_token": false,
            "chat_template": AQUILA_CHAT_TEMPLATE,
        })),
    )
}

/// How `make` writes the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightFormat {
    Safetensors,
    SafetensorsSharded,
    Bin,
    BinSharded,
    /// `model.gguf` in the output folder.
    Gguf,
}

/// `--gguf-type`: the GGUF file types `make` writes (see
/// `export::GgufType::tensor_type` for the type of each tensor).
pub use crate::export::GgufType;

pub fn gguf_meta(preset: Preset) -> GgufMeta {
    let s = preset.shape();
    GgufMeta {
        name: format!("aquila-{}", preset.label()),
        context_length: s.context as u32,
        hidden_size: s.hidden as u32,
        intermediate_size: s.intermediate as u32,
        num_layers: s.layers as u32,
        num_heads: s.heads as u32,
        num_kv_heads: s.kv_heads as u32,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
    }
}

/// How `make` writes a preset.
#[derive(Debug, Clone)]
pub struct MakeOptions {
    pub seed: u64,
    pub format: WeightFormat,
    /// Files, for the sharded formats.
    pub shards: usize,
    pub gguf_type: GgufType,
    /// Float type of safetensors and `.bin` weights (default: the preset's).
    pub dtype: Option<FloatDtype>,
    /// A model folder whose tokenizer files to use instead of ours.
    pub tokenizer_from: Option<PathBuf>,
}

/// Writes `preset` with weights from `seed` into the folder `out`, in the
/// preset's own float type and with its own tokenizer.
pub fn make(
    preset: Preset,
    out: &Path,
    seed: u64,
    format: WeightFormat,
    shards: usize,
    gguf_type: GgufType,
) -> Result<()> {
    make_with(
        preset,
        out,
        &MakeOptions {
            seed,
            format,
            shards,
            gguf_type,
            dtype: None,
            tokenizer_from: None,
        },
    )
}

/// Writes `preset` into the folder `out` as `opts` say.
pub fn make_with(preset: Preset, out: &Path, opts: &MakeOptions) -> Result<()> {
    let dtype = opts.dtype.unwrap_or(preset.default_dtype());
    write_metadata(out, preset, dtype, opts.tokenizer_from.as_deref())?;
    let tensors = PresetTensors::new(preset, opts.seed);
    let xerr = |e: export::ExportError| WorkerError::load(out, e);
    let shards = opts.shards;
    match opts.format {
        WeightFormat::Safetensors => export::write_safetensors(out, &tensors, 1, dtype),
        WeightFormat::SafetensorsSharded => export::write_safetensors(out, &tensors, shards, dtype),
        WeightFormat::Bin => export::write_pytorch_bin(out, &tensors, 1, dtype),
        WeightFormat::BinSharded => export::write_pytorch_bin(out, &tensors, shards, dtype),
        WeightFormat::Gguf => {
            let tok = crate::tokenizer::from_hf_folder(out)?;
            export::write_gguf(
                &out.join("model.gguf"),
                &gguf_meta(preset),
                &tensors,
                opts.gguf_type,
                &tok,
            )
        }
    }
    .map_err(xerr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor's values do not depend on how they are made: the parallel
    /// runs give ChaCha8 stream `i` word by word, as one sequential pass.
    #[test]
    fn tensors_are_their_streams_whatever_the_runs() {
        let t = PresetTensors::new(Preset::Tiny, 9);
        let i = 0; // the embedding: 320 × 256 values, two runs of 2¹⁶
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        rng.set_stream(i as u64);
        let want: Vec<f32> = (0..t.numel(i))
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        assert_eq!(t.values(i).as_ref(), want.as_slice());
        assert_ne!(
            t.values(1).as_ref(),
            PresetTensors::new(Preset::Tiny, 10).values(1).as_ref()
        );
    }

    #[test]
    fn the_7b_preset_is_aquila_7b_as_released() {
        let t = PresetTensors::new(Preset::Aquila7b, 0);
        let params: usize = (0..t.len()).map(|i| t.numel(i)).sum();
        // Embedding and lm_head, 32 layers of attention, MLP and two norms,
        // the final norm: 7.3 billion parameters, 14.6 GB in float16.
        let (v, h, i, l) = (100_008, 4096, 11_008, 32);
        assert_eq!(params, 2 * v * h + l * (4 * h * h + 3 * h * i + 2 * h) + h);
        assert_eq!(params, 7_295_537_152);
        let cfg = config_json(Preset::Aquila7b, Preset::Aquila7b.default_dtype());
        assert_eq!(cfg["architectures"][0], "AquilaModel");
        assert_eq!(
            (cfg["bos_token_id"].as_u64(), cfg["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );
        assert_eq!(cfg["torch_dtype"], "float16");
        assert_eq!(cfg["vocab_size"], 100_008);
    }
}
