//! The tokenizer of a GGUF file (`tokenizer.ggml.*`), built to give llama.cpp's ids: its
//! SentencePiece tokenizer (`llama`) and its byte-level BPE (`gpt2`) with the pre-tokenizer the
//! file names (`tokenizer.ggml.pre`, see [`llama_pre`](super::llama_pre)).
//!
//! Only serializable `tokenizers` components are used: the gateway rebuilds the tokenizer from
//! its JSON. A value we cannot reproduce (another model, an unknown pre-tokenizer) is refused
//! at load with the key and the supported values; where a file is valid but llama.cpp's
//! algorithm can take a turn ours cannot (see [`check_spm_merges`]), a warning says so.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::llama_pre::{self, LlamaPre};
use super::{LoadedTokenizer, TokenizerError, aquila, build_err, dedup, is_aquila_vocab, meta_err};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const BYTE: i64 = 6;

/// Tokens llama.cpp treats as control tokens whatever type the file gives them: it looks for
/// end-of-generation and fill-in-the-middle tokens by their text and marks the ones it finds as
/// control. These are the texts llama.cpp b4965 recognises (checked by the tests). It marks
/// only the first fill-in-the-middle token of each kind it meets, and none of a kind whose id
/// the file gives; we mark them all, which differs only for a file with several untyped ones.
const CONTROL_BY_TEXT: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<｜fim▁begin｜>",
    "<｜fim▁hole｜>",
    "<｜fim▁end｜>",
    "<fim-prefix>",
    "<fim-suffix>",
    "<fim-middle>",
    "<fim-pad>",
    "<fim-repo>",
    "<PRE>",
    "<SUF>",
    "<MID>",
    "<PAD>",
    "<REPO>",
];

enum Kind {
    /// `llama`: SentencePiece, merges driven by `tokenizer.ggml.scores`.
    Spm,
    /// `gpt2`: byte-level BPE with `tokenizer.ggml.merges`.
    Bpe(LlamaPre),
}

/// Loads the tokenizer stored in a GGUF file's metadata.
pub fn from_gguf(content: &Content) -> Result<LoadedTokenizer, TokenizerError> {
    let md = &content.metadata;
    let model =
        string(md, "tokenizer.ggml.model")?.ok_or_else(|| missing("tokenizer.ggml.model"))?;
    let kind = match model.as_str() {
        "llama" => Kind::Spm,
        "gpt2" => Kind::Bpe(pre_tokenizer(md)?),
        _ => return Err(TokenizerError::UnsupportedGgufModel(model)),
    };
    let tokens = array(md, "tokenizer.ggml.tokens")?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| meta_err("tokenizer.ggml.tokens", e))?;
    let n = tokens.len();
    let mut types = match array(md, "tokenizer.ggml.token_type")? {
        Some(v) => at_least(
            v.iter()
                .map(|t| int(t, "tokenizer.ggml.token_type"))
                .collect::<Result<Vec<_>, _>>()?,
            n,
            "tokenizer.ggml.token_type",
        )?,
        None => vec![NORMAL; n],
    };
    for (t, ty) in tokens.iter().zip(types.iter_mut()) {
        if CONTROL_BY_TEXT.contains(&t.as_str()) {
            *ty = CONTROL;
        }
    }

    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
    for (id, token) in tokens.iter().enumerate() {
        // Duplicate strings (some converters pad with repeats) keep their first id.
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    let is_aquila = is_aquila_vocab(|t| vocab.get(t).copied(), n);
    let origin = "GGUF metadata";
    let (mut tokenizer, add_bos_default, bos_default, eos_default) = match &kind {
        Kind::Spm => {
            let scores = scores(md, n)?;
            let add_space_prefix = boolean(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            // Used only where a character has no byte token (llama.cpp fails there).
            let unk = special_id(md, "tokenizer.ggml.unknown_token_id", Some(0), n)?
                .map(|id| tokens[id as usize].clone());
            let spm = Spm {
                tokens: &tokens,
                scores: &scores,
                types: &types,
                unk,
                add_space_prefix,
            };
            (spm.build(vocab, origin)?, true, Some(1), Some(2))
        }
        Kind::Bpe(pre) => {
            let merges = array(md, "tokenizer.ggml.merges")?
                .ok_or_else(|| missing("tokenizer.ggml.merges"))?
                .iter()
                .map(|v| {
                    let m = v
                        .to_string()
                        .map_err(|e| meta_err("tokenizer.ggml.merges", e))?;
                    split_merge(m)
                })
                .collect::<Result<Vec<_>, _>>()?;
            (
                bpe(vocab, merges, pre, origin)?,
                pre.add_bos_default,
                Some(11),
                Some(11),
            )
        }
    };

    // Control and unknown tokens are matched in text as specials (the gateway parses them in
    // prompts, as llama.cpp does with parse_special); user-defined ones always are, and stay
    // text when decoding. Both are matched in the raw text, before any normalization.
    let mut specials = Vec::new();
    let mut user_defined = Vec::new();
    for (token, &ty) in tokens.iter().zip(&types) {
        if token.is_empty() {
            continue;
        }
        match ty {
            CONTROL | UNKNOWN => specials.push(AddedToken::from(token.clone(), true)),
            USER_DEFINED => {
                user_defined.push(AddedToken::from(token.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| build_err(origin, e))?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| build_err(origin, e))?;
    let chat_template = string(md, "tokenizer.chat_template")?;
    if is_aquila {
        return aquila(tokenizer, chat_template, origin);
    }

    let add_bos = boolean(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
    let bos_id = special_id(md, "tokenizer.ggml.bos_token_id", bos_default, n)?;
    let bos = match (add_bos, bos_id) {
        (false, _) => None,
        (true, Some(id)) => Some((id, tokens[id as usize].clone())),
        (true, None) => {
            return Err(meta_err(
                "tokenizer.ggml.add_bos_token",
                "is true, but tokenizer.ggml.bos_token_id is not set",
            ));
        }
    };
    if boolean(md, "tokenizer.ggml.add_eos_token")? == Some(true) {
        tracing::warn!(
            "GGUF tokenizer.ggml.add_eos_token is true: llama.cpp appends eos to prompts, \
             this server does not"
        );
    }
    let mut eos_ids = Vec::new();
    for (key, default) in [
        ("tokenizer.ggml.eos_token_id", eos_default),
        ("tokenizer.ggml.eot_token_id", None),
        ("tokenizer.ggml.eom_token_id", None),
    ] {
        eos_ids.extend(special_id(md, key, default, n)?);
    }
    dedup(&mut eos_ids);
    Ok(LoadedTokenizer {
        eos_token: eos_ids
            .first()
            .map(|&id| tokens[id as usize].clone())
            .unwrap_or_default(),
        tokenizer,
        bos,
        eos_ids,
        chat_template,
        is_aquila: false,
    })
}

/// A special token id: the file's, else llama.cpp's default for the model kind (dropped when
/// outside the vocabulary, as llama.cpp does).
fn special_id(
    md: &HashMap<String, Value>,
    key: &str,
    default: Option<u32>,
    n: usize,
) -> Result<Option<u32>, TokenizerError> {
    match md.get(key) {
        Some(v) => {
            let id = int(v, key)?;
            match u32::try_from(id) {
                Ok(id) if (id as usize) < n => Ok(Some(id)),
                _ => Err(meta_err(
                    key,
                    format!("id {id} is outside the vocabulary of {n} tokens"),
                )),
            }
        }
        None => Ok(default.filter(|&id| (id as usize) < n)),
    }
}

/// llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`: a missing key is `default` (llama.cpp
/// warns that quality suffers), an unknown name is refused.
fn pre_tokenizer(md: &HashMap<String, Value>) -> Result<LlamaPre, TokenizerError> {
    let name = match string(md, "tokenizer.ggml.pre")? {
        Some(name) => name,
        None => {
            tracing::warn!(
                "GGUF has no tokenizer.ggml.pre: using llama.cpp's `default` pre-tokenizer, as \
                 llama.cpp does (it warns that generation quality will be degraded)"
            );
            "default".to_owned()
        }
    };
    llama_pre::lookup(&name).ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
        value: name,
        supported: llama_pre::supported(),
    })
}

/// llama.cpp's SentencePiece tokenizer as a byte-fallback BPE: the merges are every pair of
/// tokens whose concatenation is a token, ranked by that token's score (llama.cpp merges the
/// adjacent pair whose token scores highest); spaces become `▁`, with one put in front of
/// each run of text when `add_space_prefix` (llama.cpp adds it at the start and after every
/// special token: the normalizer runs on each piece between added tokens).
struct Spm<'a> {
    tokens: &'a [String],
    scores: &'a [f32],
    types: &'a [i64],
    unk: Option<String>,
    add_space_prefix: bool,
}

impl Spm<'_> {
    fn build(self, vocab: HashMap<String, u32>, origin: &str) -> Result<Tokenizer, TokenizerError> {
        let add_space_prefix = self.add_space_prefix;
        let merges = spm_merges(self.tokens, self.scores, &vocab);
        check_spm_merges(self.tokens, self.scores, self.types, &vocab);
        let vocab: Vocab = vocab.into_iter().collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| build_err(origin, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let replace = Replace::new(" ", "▁").map_err(|e| build_err(origin, e))?;
        let normalizer: NormalizerWrapper = if add_space_prefix {
            NormalizerSequence::new(vec![Prepend::new("▁".to_owned()).into(), replace.into()])
                .into()
        } else {
            replace.into()
        };
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| build_err(origin, e))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ")
                .map_err(|e| build_err(origin, e))?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            // llama.cpp drops the leading space of the first piece it detokenizes.
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }
}

/// The merges llama.cpp's SentencePiece tokenizer makes, best first: pairs of tokens whose
/// concatenation is a token, by that token's score. llama.cpp breaks a tie in score by
/// position (leftmost first), which no fixed order can do in general; longer results first
/// gives its answer for runs of one repeated character (Llama-2's whitespace pieces all score
/// -1e9): the run grows from its left end as llama.cpp's does.
fn spm_merges(
    tokens: &[String],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, usize, u32, u32, u32, &str, &str)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.get(token) != Some(&(id as u32)) {
            continue;
        }
        let chars = token.chars().count();
        for (i, _) in token.char_indices().skip(1) {
            let (a, b) = token.split_at(i);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((scores[id], chars, id as u32, ia, ib, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(y.1.cmp(&x.1))
            .then(x.2.cmp(&y.2))
            .then((x.3, x.4).cmp(&(y.3, y.4)))
    });
    ranked
        .into_iter()
        .map(|(_, _, _, _, _, a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}

/// Warns where llama.cpp's SentencePiece merging can give other ids than ours on some text:
/// tokens it can build through a character that is not itself a token (ours falls back to
/// bytes there), and ties in score between merged tokens that are not runs of one character.
fn check_spm_merges(
    tokens: &[String],
    scores: &[f32],
    types: &[i64],
    vocab: &HashMap<String, u32>,
) {
    let mergeable = |id: usize| !matches!(types[id], UNKNOWN | CONTROL | USER_DEFINED | BYTE);
    // Tokens sorted by length, so every part is decided before the tokens made of it.
    let mut order: Vec<usize> = (0..tokens.len())
        .filter(|&id| mergeable(id) && vocab.get(&tokens[id]) == Some(&(id as u32)))
        .collect();
    order.sort_by_key(|&id| tokens[id].chars().count());
    let mut ours: HashSet<&str> = HashSet::new();
    let mut llama: HashSet<&str> = HashSet::new();
    let mut unreachable = Vec::new();
    for &id in &order {
        let t = tokens[id].as_str();
        if t.chars().count() == 1 {
            ours.insert(t);
            llama.insert(t);
            continue;
        }
        let splits = || t.char_indices().skip(1).map(|(i, _)| t.split_at(i));
        let single = |s: &str| s.chars().count() == 1;
        if splits().any(|(a, b)| ours.contains(a) && ours.contains(b)) {
            ours.insert(t);
            llama.insert(t);
        } else if splits()
            .any(|(a, b)| (single(a) || llama.contains(a)) && (single(b) || llama.contains(b)))
        {
            llama.insert(t);
            unreachable.push(t);
        }
    }
    if !unreachable.is_empty() {
        tracing::warn!(
            "{} SentencePiece tokens (e.g. {:?}) are reachable in llama.cpp only through \
             characters that are not tokens; this tokenizer spells them as other tokens or bytes",
            unreachable.len(),
            &unreachable[..unreachable.len().min(5)]
        );
    }
    let mut by_score: HashMap<u32, Vec<&str>> = HashMap::new();
    for &id in &order {
        let t = tokens[id].as_str();
        if t.chars().count() > 1 && ours.contains(t) {
            by_score.entry(scores[id].to_bits()).or_default().push(t);
        }
    }
    let is_run = |t: &str| {
        let mut chars = t.chars();
        let first = chars.next();
        chars.all(|c| Some(c) == first)
    };
    let tied: usize = by_score
        .values()
        .filter(|group| group.len() > 1 && !group.iter().all(|t| is_run(t)))
        .map(Vec::len)
        .sum();
    if tied > 0 {
        tracing::warn!(
            "{tied} SentencePiece tokens share their score with another: llama.cpp breaks such \
             ties by position, this tokenizer by a fixed order, so ids can differ from \
             llama.cpp's where they compete"
        );
    }
}

/// llama.cpp's byte-level BPE: the file's merges, its pre-tokenizer.
fn bpe(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    pre: &LlamaPre,
    origin: &str,
) -> Result<Tokenizer, TokenizerError> {
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| build_err(origin, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.pre_tokenizer().map_err(|e| build_err(origin, e))?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// A merge is two tokens separated by the first space after the first character (llama.cpp
/// splits there, so a token may start with a space).
fn split_merge(line: &str) -> Result<(String, String), TokenizerError> {
    let first = line.chars().next().map_or(0, char::len_utf8);
    match line[first..].find(' ') {
        Some(i) => Ok((
            line[..first + i].to_owned(),
            line[first + i + 1..].to_owned(),
        )),
        None => Err(meta_err(
            "tokenizer.ggml.merges",
            format!("merge {line:?} is not two space-separated tokens"),
        )),
    }
}

fn scores(md: &HashMap<String, Value>, n: usize) -> Result<Vec<f32>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.scores";
    match array(md, KEY)? {
        Some(v) => {
            let scores = v
                .iter()
                .map(|s| match *s {
                    Value::F32(f) => Ok(f),
                    Value::I32(i) => Ok(i as f32),
                    _ => Err(meta_err(
                        KEY,
                        format!("expected f32 or i32 scores, got {s:?}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            at_least(scores, n, KEY)
        }
        None => {
            tracing::warn!("GGUF has no {KEY}: every SentencePiece merge ties, as in llama.cpp");
            Ok(vec![0.0; n])
        }
    }
}

/// `values`, checked to have an entry for each of the `n` tokens.
fn at_least<T>(values: Vec<T>, n: usize, key: &str) -> Result<Vec<T>, TokenizerError> {
    if values.len() < n {
        return Err(meta_err(
            key,
            format!("{} entries for {n} tokens", values.len()),
        ));
    }
    Ok(values)
}

fn missing(key: &str) -> TokenizerError {
    meta_err(key, "missing")
}

fn string(md: &HashMap<String, Value>, key: &str) -> Result<Option<String>, TokenizerError> {
    md.get(key)
        .map(|v| v.to_string().cloned().map_err(|e| meta_err(key, e)))
        .transpose()
}

fn boolean(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, TokenizerError> {
    md.get(key)
        .map(|v| v.to_bool().map_err(|e| meta_err(key, e)))
        .transpose()
}

fn array<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<&'a Vec<Value>>, TokenizerError> {
    md.get(key)
        .map(|v| v.to_vec().map_err(|e| meta_err(key, e)))
        .transpose()
}

/// Integers are written as u32/i32 by llama.cpp but as other widths by some converters.
fn int(v: &Value, key: &str) -> Result<i64, TokenizerError> {
    match *v {
        Value::U8(i) => Ok(i.into()),
        Value::I8(i) => Ok(i.into()),
        Value::U16(i) => Ok(i.into()),
        Value::I16(i) => Ok(i.into()),
        Value::U32(i) => Ok(i.into()),
        Value::I32(i) => Ok(i.into()),
        Value::I64(i) => Ok(i),
        Value::U64(i) => i64::try_from(i).map_err(|e| meta_err(key, e)),
        _ => Err(meta_err(key, format!("expected an integer, got {v:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(metadata: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    }

    /// A byte-level vocabulary of `a`, `b`, `ab` with one merge, under `pre`.
    fn bpe_metadata(pre: Option<&str>) -> Vec<(&'static str, Value)> {
        let mut md = vec![
            ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "Ġ"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
        ];
        if let Some(pre) = pre {
            md.push(("tokenizer.ggml.pre", Value::String(pre.to_owned())));
        }
        md
    }

    fn ids(t: &LoadedTokenizer, text: &str) -> Vec<u32> {
        t.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn an_unknown_pre_tokenizer_is_refused_naming_it() {
        let err = from_gguf(&content(bpe_metadata(Some("no-such-pre"))))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("tokenizer.ggml.pre"), "{err}");
        assert!(err.contains("`no-such-pre`"), "{err}");
        assert!(err.contains("llama-bpe") && err.contains("smollm"), "{err}");
    }

    #[test]
    fn an_unknown_model_is_refused_naming_it() {
        let mut md = bpe_metadata(None);
        md[0].1 = Value::String("t5".to_owned());
        let err = from_gguf(&content(md)).err().expect("refused").to_string();
        assert!(err.contains("`t5`") && err.contains("llama"), "{err}");
    }

    #[test]
    fn a_missing_pre_tokenizer_is_llama_cpps_default() {
        let t = from_gguf(&content(bpe_metadata(None))).unwrap();
        assert_eq!(ids(&t, "ab a"), [2, 3, 0]);
        // gpt2 files get no bos unless they ask; llama.cpp's default bos/eos id 11 is outside
        // this vocabulary, so there is none.
        assert!(t.bos.is_none());
        assert!(t.eos_ids.is_empty());
    }

    /// `▁` `a` `b` `c`, `ab` (score -1), `bc` (-2), `▁a` (-3), `abc` (-4): llama.cpp merges the
    /// best-scoring pair first: `▁abc` → `▁`,`ab`,`c`→ `▁`,`abc`.
    fn spm_metadata() -> Vec<(&'static str, Value)> {
        let tokens = [
            "<unk>", "<s>", "</s>", "▁", "a", "b", "c", "ab", "bc", "▁a", "abc",
        ];
        let scores = [
            0.0, 0.0, 0.0, -5.0, -6.0, -7.0, -8.0, -1.0, -2.0, -3.0, -4.0,
        ];
        let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1];
        vec![
            ("tokenizer.ggml.model", Value::String("llama".to_owned())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
        ]
    }

    #[test]
    fn sentencepiece_merges_by_score_with_llama_defaults() {
        let t = from_gguf(&content(spm_metadata())).unwrap();
        assert_eq!(ids(&t, "abc"), [3, 10]);
        assert_eq!(ids(&t, "bc a"), [3, 8, 9]);
        // Specials in text are tokens; text after one gets the space prefix again.
        assert_eq!(ids(&t, "<s>a</s>"), [1, 9, 2]);
        // No bos/eos keys: llama.cpp's 1 and 2, and bos is prepended by default.
        assert_eq!(t.bos, Some((1, "<s>".to_owned())));
        assert_eq!(t.eos_ids, [2]);
        assert_eq!(t.tokenizer.decode(&[3, 10, 2], true).unwrap(), "abc");
    }

    #[test]
    fn a_character_outside_the_vocabulary_falls_back_to_its_bytes() {
        // `é` is C3 A9 in UTF-8: llama.cpp gives the `<0xC3>` `<0xA9>` byte tokens.
        let mut md = spm_metadata();
        let text = |s: &str| Value::String(s.to_owned());
        let appended = [
            [text("<0xC3>"), text("<0xA9>")],
            [Value::F32(0.0), Value::F32(0.0)],
            [Value::I32(BYTE as i32), Value::I32(BYTE as i32)],
        ];
        for ((_, v), more) in md[1..4].iter_mut().zip(appended) {
            let Value::Array(items) = v else {
                unreachable!()
            };
            items.extend(more);
        }
        let t = from_gguf(&content(md)).unwrap();
        assert_eq!(ids(&t, "aé"), [9, 11, 12]);
        assert_eq!(t.tokenizer.decode(&[9, 11, 12], true).unwrap(), "aé");
    }

    #[test]
    fn add_space_prefix_off_puts_no_space_in_front() {
        let mut md = spm_metadata();
        md.push(("tokenizer.ggml.add_space_prefix", Value::Bool(false)));
        let t = from_gguf(&content(md)).unwrap();
        // `a` alone, not `▁a`; a space inside the text is still `▁`.
        assert_eq!(ids(&t, "abc"), [10]);
        assert_eq!(ids(&t, "bc a"), [8, 9]);
        // Nothing to strip when decoding: a leading `▁` is a space.
        assert_eq!(t.tokenizer.decode(&[9], true).unwrap(), " a");
    }

    #[test]
    fn tied_whitespace_runs_grow_from_the_left_as_in_llama_cpp() {
        let runs: Vec<String> = (2..=4).map(|k| "▁".repeat(k)).collect();
        let tokens = ["▁", "x"].into_iter().map(str::to_owned).chain(runs);
        let tokens: Vec<String> = tokens.collect();
        let scores = vec![-1.0, -1.0, -1e9, -1e9, -1e9];
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = spm_merges(&tokens, &scores, &vocab);
        // The longest run first, so a run of five is ▁▁▁▁ + ▁, as llama.cpp's leftmost rule
        // gives (ranked by token id instead, ▁▁ + ▁▁▁ would win).
        assert_eq!(merges[0].0.clone() + &merges[0].1, "▁▁▁▁");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .build()
            .unwrap();
        let got: Vec<u32> = tokenizers::Model::tokenize(&bpe, "▁▁▁▁▁")
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(got, [4, 0]);
    }

    #[test]
    fn bad_metadata_is_an_error_naming_the_key() {
        let mut md = spm_metadata();
        md[2].1 = Value::Array(vec![Value::F32(0.0)]);
        let err = from_gguf(&content(md)).err().expect("refused").to_string();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
        let mut md = spm_metadata();
        md.push(("tokenizer.ggml.bos_token_id", Value::U32(99)));
        let err = from_gguf(&content(md)).err().expect("refused").to_string();
        assert!(err.contains("bos_token_id") && err.contains("99"), "{err}");
    }
}
