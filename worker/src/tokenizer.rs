//! Builds a `tokenizers::Tokenizer` (plus bos/eos/chat template) from model files: a Hugging
//! Face folder (`tokenizer.json`, or GPT-2 style `vocab.json` + `merges.txt`) or a GGUF file's
//! `tokenizer.ggml.*` metadata (`tokenizer/gguf.rs`: SentencePiece `llama`, and byte-level BPE
//! `gpt2` with llama.cpp's pre-tokenizers from [`llama_pre`]), giving the ids llama.cpp gives
//! for the same file.
//!
//! The result is made only of serializable `tokenizers` components: the worker sends it to the
//! gateway as JSON. It knows the Aquila-7B vocabulary and overrides what the published configs
//! get wrong about it (see `../shared/aquila-tokenizer/README.md`). It must not load weights or
//! touch the model. A GGUF tokenizer model or pre-tokenizer it cannot reproduce is refused,
//! never approximated; where llama.cpp's SentencePiece merging can take a turn ours cannot on
//! a valid file (ties in score, tokens built through non-token characters), a warning says so.

mod gguf;
pub mod llama_pre;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub use gguf::from_gguf;

pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    /// Token to prepend to plain prompts, if the model wants one (id, text).
    pub bos: Option<(u32, String)>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    pub eos_token: String,
    /// Jinja chat template found in the files (tokenizer_config.json `chat_template`, or GGUF
    /// `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// True when this is the Aquila-7B vocabulary (see [`is_aquila_vocab`]).
    pub is_aquila: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing tokenizer file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{dir}: no tokenizer.json and no vocab.json + merges.txt")]
    NoTokenizerFiles { dir: PathBuf },
    #[error("building the tokenizer from {origin}: {message}")]
    Build { origin: String, message: String },
    #[error("GGUF metadata `{key}`: {message}")]
    GgufMetadata { key: String, message: String },
    #[error(
        "unsupported GGUF tokenizer `tokenizer.ggml.model` = `{0}` (supported: llama, i.e. \
         SentencePiece; gpt2, i.e. byte-level BPE)"
    )]
    UnsupportedGgufModel(String),
    #[error(
        "unsupported GGUF pre-tokenizer `tokenizer.ggml.pre` = `{value}` (supported: {supported})"
    )]
    UnsupportedPreTokenizer { value: String, supported: String },
}

/// Aquila's special tokens and the ids the model was trained with. `vocab.json` as published
/// stops at 99,999 and lacks all but `<|endoftext|>`.
pub const AQUILA_SPECIALS: [(&str, u32); 9] = [
    ("<|endoftext|>", 0),
    ("<|startofpiece|>", 100_000),
    ("<|endofpiece|>", 100_001),
    ("<|LDWANG|>", 100_002),
    ("[MASK]", 100_003),
    ("[gMASK]", 100_004),
    ("[sMASK]", 100_005),
    ("[CLS]", 100_006),
    ("</s>", 100_007),
];
const AQUILA_EOS: u32 = 100_007;
const AQUILA_ENDOFTEXT: u32 = 0;

/// Fingerprint of the Aquila-7B vocabulary. Both published forms must match: `vocab.json`
/// (ids 0..=99,999, no `</s>`) and the 100,008-token form with the specials appended (`</s>` at
/// 100,007). Besides the size we require `<|endoftext|>` = 0, `!` = 1, `"` = 2 (GPT-2 puts `!` at
/// 0) and `Hello` = 22,299, so an unrelated vocabulary of the same size does not match.
pub fn is_aquila_vocab(lookup: impl Fn(&str) -> Option<u32>, size: usize) -> bool {
    let size_ok = match size {
        100_000 => lookup("</s>").is_none(),
        100_008 => lookup("</s>") == Some(AQUILA_EOS),
        _ => false,
    };
    size_ok
        && lookup("<|endoftext|>") == Some(0)
        && lookup("!") == Some(1)
        && lookup("\"") == Some(2)
        && lookup("Hello") == Some(22_299)
}

/// Loads the tokenizer of a Hugging Face model folder.
pub fn from_hf_folder(dir: &Path) -> Result<LoadedTokenizer, TokenizerError> {
    let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
    let model_config = read_json_opt(&dir.join("config.json"))?;
    let configs: Vec<&Json> = [&config, &special_map].into_iter().flatten().collect();

    let tokenizer_json = dir.join("tokenizer.json");
    let (tokenizer, sentencepiece_style, post_bos) = if tokenizer_json.exists() {
        let text = read_string(&tokenizer_json)?;
        let tokenizer: Tokenizer = text.parse().map_err(|e| TokenizerError::Parse {
            path: tokenizer_json.clone(),
            message: format!("{e}"),
        })?;
        let json: Json = parse_json(&tokenizer_json, &text)?;
        (
            tokenizer,
            is_sentencepiece_style(&json),
            post_processor_bos(&json),
        )
    } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        (gpt2_from_files(dir, &configs)?, false, None)
    } else {
        return Err(TokenizerError::NoTokenizerFiles { dir: dir.into() });
    };

    let model_vocab = tokenizers::Model::get_vocab(tokenizer.get_model());
    let is_aquila = is_aquila_vocab(|t| model_vocab.get(t).copied(), model_vocab.len());
    let origin = dir.display().to_string();
    if is_aquila {
        let chat_template = chat_template_of(dir, config.as_ref())?;
        return aquila(tokenizer, chat_template, &origin);
    }

    let bos = first_token(&configs, "bos_token")
        .and_then(|t| tokenizer.token_to_id(&t).map(|id| (id, t)))
        .or_else(|| {
            let id = model_config.as_ref()?.get("bos_token_id")?.as_u64()? as u32;
            Some((id, tokenizer.id_to_token(id)?))
        });
    let mut eos_ids = Vec::new();
    if let Some(id) = first_token(&configs, "eos_token").and_then(|t| tokenizer.token_to_id(&t)) {
        eos_ids.push(id);
    }
    match model_config.as_ref().and_then(|c| c.get("eos_token_id")) {
        Some(Json::Number(n)) => eos_ids.extend(n.as_u64().map(|n| n as u32)),
        Some(Json::Array(ids)) => {
            eos_ids.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
        }
        _ => {}
    }
    dedup(&mut eos_ids);
    let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
        Some(Json::Bool(b)) => *b,
        _ => post_bos.is_some() || sentencepiece_style,
    };
    let bos = match (add_bos, post_bos) {
        (false, _) => None,
        (true, Some(t)) => tokenizer.token_to_id(&t).map(|id| (id, t)).or(bos),
        (true, None) => bos,
    };
    Ok(LoadedTokenizer {
        eos_token: eos_ids
            .first()
            .and_then(|&id| tokenizer.id_to_token(id))
            .unwrap_or_default(),
        chat_template: chat_template_of(dir, config.as_ref())?,
        tokenizer,
        bos,
        eos_ids,
        is_aquila: false,
    })
}

/// The Aquila vocabulary with its special tokens registered, and its real
/// end-of-sequence tokens.
fn aquila(
    mut tokenizer: Tokenizer,
    chat_template: Option<String>,
    origin: &str,
) -> Result<LoadedTokenizer, TokenizerError> {
    add_specials(
        &mut tokenizer,
        AQUILA_SPECIALS.iter().map(|(t, _)| *t),
        origin,
    )?;
    // Chat prompts go without bos; config.json's bos 1 / eos 2 are `!` and `"` here.
    Ok(LoadedTokenizer {
        tokenizer,
        bos: None,
        eos_ids: vec![AQUILA_EOS, AQUILA_ENDOFTEXT],
        eos_token: "</s>".to_owned(),
        chat_template,
        is_aquila: true,
    })
}

/// GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`, with the special tokens the
/// side files name registered as special (and given their stated ids when vocab.json lacks them).
fn gpt2_from_files(dir: &Path, configs: &[&Json]) -> Result<Tokenizer, TokenizerError> {
    let vocab_path = dir.join("vocab.json");
    let mut vocab: HashMap<String, u32> = parse_json(&vocab_path, &read_string(&vocab_path)?)?;
    let merges_path = dir.join("merges.txt");
    let merges = read_string(&merges_path)?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| split_merge(l, &merges_path.display().to_string()))
        .collect::<Result<Vec<_>, _>>()?;

    let mut specials: Vec<(String, Option<u32>)> = Vec::new();
    if is_aquila_vocab(|t| vocab.get(t).copied(), vocab.len()) {
        specials.extend(
            AQUILA_SPECIALS
                .iter()
                .map(|(t, id)| (t.to_string(), Some(*id))),
        );
    }
    let added_path = dir.join("added_tokens.json");
    if let Some(added) = read_json_opt(&added_path)? {
        let added: HashMap<String, u32> =
            serde_json::from_value(added).map_err(|e| TokenizerError::Parse {
                path: added_path,
                message: e.to_string(),
            })?;
        specials.extend(added.into_iter().map(|(t, id)| (t, Some(id))));
    }
    for config in configs {
        if let Some(Json::Object(decoder)) = config.get("added_tokens_decoder") {
            for (id, tok) in decoder {
                if let (Ok(id), Some(t)) = (id.parse::<u32>(), token_content(tok)) {
                    specials.push((t, Some(id)));
                }
            }
        }
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            specials.extend(config.get(key).and_then(token_content).map(|t| (t, None)));
        }
        if let Some(Json::Array(extra)) = config.get("additional_special_tokens") {
            specials.extend(extra.iter().filter_map(token_content).map(|t| (t, None)));
        }
    }
    let taken: std::collections::HashSet<u32> = vocab.values().copied().collect();
    for (token, id) in &specials {
        if let Some(id) = id
            && !vocab.contains_key(token)
            && !taken.contains(id)
        {
            vocab.insert(token.clone(), *id);
        }
    }
    let unk = configs
        .iter()
        .find_map(|c| c.get("unk_token").and_then(token_content))
        .filter(|t| vocab.contains_key(t));
    let origin = dir.display().to_string();
    let mut tokenizer = byte_level_bpe(vocab, merges, unk, &origin)?;
    add_specials(
        &mut tokenizer,
        specials.iter().map(|(t, _)| t.as_str()),
        &origin,
    )?;
    Ok(tokenizer)
}

/// GPT-2's byte-level BPE (its regex, no prefix space).
fn byte_level_bpe(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    unk: Option<String>,
    origin: &str,
) -> Result<Tokenizer, TokenizerError> {
    let vocab: Vocab = vocab.into_iter().collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| build_err(origin, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn add_specials<'a>(
    tokenizer: &mut Tokenizer,
    tokens: impl Iterator<Item = &'a str>,
    origin: &str,
) -> Result<(), TokenizerError> {
    let tokens: Vec<AddedToken> = tokens.map(|t| AddedToken::from(t, true)).collect();
    tokenizer
        .add_special_tokens(tokens)
        .map_err(|e| build_err(origin, e))?;
    Ok(())
}

/// SentencePiece-derived tokenizers (LLaMA) prepend bos by default; byte-level BPE does not.
fn is_sentencepiece_style(json: &Json) -> bool {
    let model = &json["model"];
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).map(str::to_owned);
    model["byte_fallback"].as_bool() == Some(true)
        || kind(model).as_deref() == Some("Unigram")
        || kind(&json["pre_tokenizer"]).as_deref() == Some("Metaspace")
}

/// The special token a `TemplateProcessing` post-processor puts first in a single sequence.
fn post_processor_bos(json: &Json) -> Option<String> {
    let post = &json["post_processor"];
    let post = match post["type"].as_str()? {
        "TemplateProcessing" => post,
        "Sequence" => post["processors"]
            .as_array()?
            .iter()
            .find(|p| p["type"] == "TemplateProcessing")?,
        _ => return None,
    };
    let first = post["single"].as_array()?.first()?;
    first.get("SpecialToken")?["id"].as_str().map(str::to_owned)
}

fn chat_template_of(dir: &Path, config: Option<&Json>) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return read_string(&jinja).map(Some);
    }
    Ok(match config.and_then(|c| c.get("chat_template")) {
        Some(Json::String(t)) => Some(t.clone()),
        // A list of named templates: the one called "default".
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned),
        _ => None,
    })
}

/// A special token given as a string or as `{"content": ...}`.
fn token_content(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn first_token(configs: &[&Json], key: &str) -> Option<String> {
    configs
        .iter()
        .find_map(|c| c.get(key).and_then(token_content))
}

fn split_merge(line: &str, origin: &str) -> Result<(String, String), TokenizerError> {
    match line.split_once(' ') {
        Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
        None => Err(TokenizerError::Build {
            origin: origin.to_owned(),
            message: format!("merge `{line}` is not two space-separated tokens"),
        }),
    }
}

fn dedup(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

fn read_string(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.into(),
        source,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, TokenizerError> {
    serde_json::from_str(text).map_err(|e| TokenizerError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    parse_json(path, &read_string(path)?).map(Some)
}

fn build_err(origin: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        origin: origin.to_owned(),
        message: e.to_string(),
    }
}

fn meta_err(key: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::GgufMetadata {
        key: key.to_owned(),
        message: e.to_string(),
    }
}
