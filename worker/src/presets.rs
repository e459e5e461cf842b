//! `aquila make-model`: deterministic random-weight Aquila-architecture
//! checkpoints, the fixtures for tests and benchmarks. Same preset and seed,
//! same bytes. The tokenizer is byte-level BPE over the 256 bytes (no
//! merges) plus two special tokens, so any text round-trips.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, WorkerError};
use crate::export::{self, ExportTensor, FloatDtype, GgufMeta};
use crate::loader::AQUILA_CHAT_TEMPLATE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 256, grouped-query attention: for tests.
    Tiny,
    /// About 100M parameters, Aquila-7B's shape scaled down: for benchmarks.
    Base,
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

/// Random weights for `preset` from `seed`, Hugging Face names and shapes.
pub fn tensors(preset: Preset, seed: u64) -> Vec<ExportTensor> {
    let s = preset.shape();
    let hd = s.hidden / s.heads;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = |name: String, shape: Vec<usize>, scale: f32, center: f32| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| center + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        ExportTensor { name, shape, data }
    };
    let h = s.hidden;
    let w = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        vec![s.vocab, h],
        1.0,
        0.0,
    )];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        out.push(t(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0));
        out.push(t(
            format!("{p}.self_attn.q_proj.weight"),
            vec![s.heads * hd, h],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.self_attn.k_proj.weight"),
            vec![s.kv_heads * hd, h],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.self_attn.v_proj.weight"),
            vec![s.kv_heads * hd, h],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, s.heads * hd],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
        ));
        out.push(t(
            format!("{p}.mlp.gate_proj.weight"),
            vec![s.intermediate, h],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.mlp.up_proj.weight"),
            vec![s.intermediate, h],
            w(h),
            0.0,
        ));
        out.push(t(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, s.intermediate],
            w(s.intermediate),
            0.0,
        ));
    }
    out.push(t("model.norm.weight".into(), vec![h], 0.2, 1.0));
    out.push(t("lm_head.weight".into(), vec![s.vocab, h], w(h), 0.0));
    out
}

/// `config.json` for `preset`, as the official Aquila-7B release writes it
/// (but with `model_type` llama so stock `transformers` loads it).
pub fn config_json(preset: Preset) -> serde_json::Value {
    let s = preset.shape();
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
        "torch_dtype": "float32",
    })
}

/// Writes config.json, tokenizer.json and tokenizer_config.json to `dir`;
/// the caller writes the weights in the format it wants.
pub fn write_metadata(dir: &Path, preset: Preset) -> Result<()> {
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| WorkerError::io(format!("writing {name}"), e))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| WorkerError::io(format!("creating {}", dir.display()), e))?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write("config.json", pretty(&config_json(preset)))?;
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
        name: format!("aquila-{preset:?}").to_lowercase(),
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

/// Writes `preset` with weights from `seed` into the folder `out`.
pub fn make(
    preset: Preset,
    out: &Path,
    seed: u64,
    format: WeightFormat,
    shards: usize,
    gguf_type: GgufType,
) -> Result<()> {
    write_metadata(out, preset)?;
    let tensors = tensors(preset, seed);
    let xerr = |e: export::ExportError| WorkerError::load(out, e);
    match format {
        WeightFormat::Safetensors => export::write_safetensors(out, &tensors, 1, FloatDtype::F32),
        WeightFormat::SafetensorsSharded => {
            export::write_safetensors(out, &tensors, shards, FloatDtype::F32)
        }
        WeightFormat::Bin => export::write_pytorch_bin(out, &tensors, 1),
        WeightFormat::BinSharded => export::write_pytorch_bin(out, &tensors, shards),
        WeightFormat::Gguf => {
            let tok = crate::tokenizer::from_hf_folder(out)?;
            export::write_gguf(
                &out.join("model.gguf"),
                &gguf_meta(preset),
                &tensors,
                gguf_type,
                &tok,
            )
        }
    }
    .map_err(xerr)
}
