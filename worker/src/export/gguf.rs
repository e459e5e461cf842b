//! llama GGUF writer, following llama.cpp's `convert_hf_to_gguf.py` for LLaMA models: its
//! metadata keys, its tensor names, and its permutation of q/k rows from the rotate-half RoPE
//! layout of Hugging Face checkpoints to the interleaved layout GGUF files use.
//!
//! Quantization: each tensor's type is [`GgufType::tensor_type`]'s (norms F32; 2-D weights the
//! file type's, or llama.cpp's choice for a mix, with its fallbacks for rows that do not split
//! into blocks). The tokenizer is written as `gpt2` (byte-level BPE) only.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use super::{ExportError, GgufType, TensorSource, values_of};
use crate::tokenizer::LoadedTokenizer;
use crate::weights::gguf_name;

/// Hyper-parameters written as `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMeta {
    pub name: String,
    pub context_length: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
}

/// Writes a llama-architecture GGUF file as llama.cpp's convert_hf_to_gguf.py does. Tensors
/// are made, quantized and written one at a time (the header's offsets follow from the shapes and
/// types alone), so a 7B model is never in memory whole.
pub fn write_gguf(
    path: &Path,
    meta: &GgufMeta,
    tensors: &dyn TensorSource,
    file_type: GgufType,
    tokenizer: &LoadedTokenizer,
) -> Result<(), ExportError> {
    let tied = !(0..tensors.len()).any(|i| tensors.name(i) == "lm_head.weight");
    let embed = (0..tensors.len())
        .find(|&i| tensors.name(i) == "model.embed_tokens.weight")
        .ok_or_else(|| ExportError::format(path, "no model.embed_tokens.weight tensor"))?;
    let n_vocab = tensors.shape(embed).first().copied().unwrap_or(0);

    // Each tensor's GGUF name and type, in file order.
    let mut plan = Vec::with_capacity(tensors.len());
    for i in 0..tensors.len() {
        let name = gguf_name(tensors.name(i)).ok_or_else(|| ExportError::Tensor {
            name: tensors.name(i).to_owned(),
            message: "no GGUF name for this tensor".to_owned(),
        })?;
        let tensor_dtype = file_type.tensor_type(
            tensors.name(i),
            tensors.shape(i),
            meta.num_layers as usize,
            tied,
        );
        plan.push((name, tensor_dtype));
    }

    let u32v = Value::U32;
    let mut metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".to_owned())),
        ("general.name", Value::String(meta.name.clone())),
        ("llama.context_length", u32v(meta.context_length)),
        ("llama.embedding_length", u32v(meta.hidden_size)),
        ("llama.block_count", u32v(meta.num_layers)),
        ("llama.feed_forward_length", u32v(meta.intermediate_size)),
        ("llama.attention.head_count", u32v(meta.num_heads)),
        ("llama.attention.head_count_kv", u32v(meta.num_kv_heads)),
        ("llama.rope.freq_base", Value::F32(meta.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(meta.rms_norm_eps),
        ),
        (
            "llama.rope.dimension_count",
            u32v(meta.hidden_size / meta.num_heads.max(1)),
        ),
        ("general.file_type", u32v(file_type.file_type())),
        ("general.quantization_version", u32v(2)),
    ];
    let vocab_len = tokenizer_metadata(tokenizer, n_vocab, &mut metadata)?;
    metadata.push(("llama.vocab_size", u32v(vocab_len as u32)));

    let file = std::fs::File::create(path).map_err(ExportError::io(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = ExportError::io(path);
    let sizes: Vec<usize> = (0..tensors.len())
        .map(|i| tensors.numel(i) / plan[i].1.block_size() * plan[i].1.type_size())
        .collect();
    write_header(&mut w, &metadata, tensors, &plan, &sizes).map_err(io)?;
    for i in 0..tensors.len() {
        let values = values_of(tensors, i)?;
        let name = tensors.name(i);
        let shape = tensors.shape(i);
        let values = if name.ends_with("self_attn.q_proj.weight") {
            Cow::Owned(permute_qk(name, &values, shape, meta.num_heads as usize)?)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Cow::Owned(permute_qk(
                name,
                &values,
                shape,
                meta.num_kv_heads as usize,
            )?)
        } else {
            values
        };
        let bytes = quantize(name, &values, shape, plan[i].1)?;
        if bytes.len() != sizes[i] {
            return Err(ExportError::Tensor {
                name: name.to_owned(),
                message: format!("{} bytes quantized, {} expected", bytes.len(), sizes[i]),
            });
        }
        w.write_all(&bytes).map_err(ExportError::io(path))?;
        w.write_all(&[0u8; ALIGN][..padding(bytes.len())])
            .map_err(ExportError::io(path))?;
    }
    w.flush().map_err(ExportError::io(path))
}

/// GGUF's default `general.alignment`.
const ALIGN: usize = 32;

fn padding(len: usize) -> usize {
    (ALIGN - len % ALIGN) % ALIGN
}

/// The header (version 3): counts, metadata, then each tensor's name, dims (innermost first),
/// type and offset within the data, the data starting at the next multiple of 32.
fn write_header(
    w: &mut impl Write,
    metadata: &[(&str, Value)],
    tensors: &dyn TensorSource,
    plan: &[(String, GgmlDType)],
    sizes: &[usize],
) -> std::io::Result<()> {
    let mut head = Vec::new();
    head.extend(0x4655_4747u32.to_le_bytes());
    head.extend(3u32.to_le_bytes());
    head.extend((plan.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend(value_type(value).to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0usize;
    for (i, ((name, dtype), size)) in plan.iter().zip(sizes).enumerate() {
        put_string(&mut head, name);
        let dims = tensors.shape(i);
        head.extend((dims.len() as u32).to_le_bytes());
        for &d in dims.iter().rev() {
            head.extend((d as u64).to_le_bytes());
        }
        head.extend(ggml_type_id(*dtype).to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset += size + padding(*size);
    }
    head.resize(head.len() + padding(head.len()), 0);
    w.write_all(&head)
}

/// `ggml_type`'s number for a tensor type.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's value type codes.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // GGUF arrays hold one type; an empty one is written as u32s.
            out.extend(items.first().map_or(4, value_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// `values` (`shape`, row-major) as `dtype`'s bytes, quantized with candle's GGML quantizers
/// in parallel runs of rows (blocks never cross rows, so the runs' bytes concatenate).
fn quantize(
    name: &str,
    values: &[f32],
    shape: &[usize],
    dtype: GgmlDType,
) -> Result<Vec<u8>, ExportError> {
    use rayon::prelude::*;
    let terr = |e: candle_core::Error| ExportError::Tensor {
        name: name.to_owned(),
        message: e.to_string(),
    };
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = values.len() / cols;
    // About a million values per run.
    let per = (1 << 20) / cols + 1;
    let parts: Vec<Vec<u8>> = values
        .par_chunks(per * cols)
        .map(|chunk| {
            let shape: Vec<usize> = if shape.len() == 1 {
                vec![chunk.len()]
            } else {
                vec![chunk.len() / cols, cols]
            };
            let t = Tensor::from_slice(chunk, shape.as_slice(), &Device::Cpu).map_err(terr)?;
            QTensor::quantize(&t, dtype)
                .and_then(|q| q.data().map(|d| d.into_owned()))
                .map_err(terr)
        })
        .collect::<Result<_, _>>()?;
    debug_assert!(rows == 0 || parts.len() == rows.div_ceil(per));
    Ok(parts.concat())
}

/// `w.reshape(n_head, 2, out/n_head/2, in).swapaxes(1, 2).reshape(out, in)`: within each head,
/// row `s * half + j` moves to row `2 * j + s`.
fn permute_qk(
    name: &str,
    data: &[f32],
    shape: &[usize],
    n_head: usize,
) -> Result<Vec<f32>, ExportError> {
    let terr = |message: String| ExportError::Tensor {
        name: name.to_owned(),
        message,
    };
    let (out, cols) = match shape {
        [out, cols] => (*out, *cols),
        _ => return Err(terr("q/k projection must be 2-D".to_owned())),
    };
    if n_head == 0 || out % (2 * n_head) != 0 {
        return Err(terr(format!(
            "{out} rows do not split into {n_head} heads of even size"
        )));
    }
    let head_dim = out / n_head;
    let half = head_dim / 2;
    let mut permuted = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..half {
                let src = (h * head_dim + s * half + j) * cols;
                let dst = (h * head_dim + 2 * j + s) * cols;
                permuted[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(permuted)
}

/// Pushes the `tokenizer.*` keys; returns the number of tokens written (the embedding's row
/// count, padded as convert_hf_to_gguf.py pads: `[PAD{id}]`, type unused).
fn tokenizer_metadata(
    loaded: &LoadedTokenizer,
    n_vocab: usize,
    metadata: &mut Vec<(&str, Value)>,
) -> Result<usize, ExportError> {
    let terr = |m: String| ExportError::Tokenizer(m);
    let json = serde_json::to_value(&loaded.tokenizer).map_err(|e| terr(e.to_string()))?;
    if json["model"]["type"] != "BPE" {
        return Err(terr(format!(
            "only BPE models can be written, not {}",
            json["model"]["type"]
        )));
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or_else(|| {
        terr(format!(
            "pre-tokenizer {} has no llama.cpp name",
            json["pre_tokenizer"]
        ))
    })?;
    let merges = json["model"]["merges"]
        .as_array()
        .ok_or_else(|| terr("BPE model has no merges".to_owned()))?
        .iter()
        .map(|m| {
            let merge = match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(pair) => match (pair.first(), pair.get(1)) {
                    (Some(Json::String(a)), Some(Json::String(b))) => Some(format!("{a} {b}")),
                    _ => None,
                },
                _ => None,
            };
            merge
                .map(Value::String)
                .ok_or_else(|| terr(format!("malformed merge {m}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let vocab = loaded.tokenizer.get_vocab(true);
    let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    if size > n_vocab {
        return Err(terr(format!(
            "{size} tokens but the embedding has {n_vocab} rows"
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    for (token, id) in vocab {
        tokens[id as usize] = Some(token);
    }
    let added = loaded.tokenizer.get_added_tokens_decoder();
    let types: Vec<Value> = (0..n_vocab as u32)
        .map(|id| match (added.get(&id), &tokens[id as usize]) {
            (Some(t), _) if t.special => Value::I32(3),
            (Some(_), _) => Value::I32(4),
            (None, Some(_)) => Value::I32(1),
            (None, None) => Value::I32(5),
        })
        .collect();
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{id}]"))))
        .collect();

    metadata.push(("tokenizer.ggml.model", Value::String("gpt2".to_owned())));
    metadata.push(("tokenizer.ggml.pre", Value::String(pre.to_owned())));
    metadata.push(("tokenizer.ggml.tokens", Value::Array(tokens)));
    metadata.push(("tokenizer.ggml.token_type", Value::Array(types)));
    metadata.push(("tokenizer.ggml.merges", Value::Array(merges)));
    if let Some((id, _)) = &loaded.bos {
        metadata.push(("tokenizer.ggml.bos_token_id", Value::U32(*id)));
    }
    if let Some(&eos) = loaded.eos_ids.first() {
        metadata.push(("tokenizer.ggml.eos_token_id", Value::U32(eos)));
    }
    // A second stop token (Aquila's `<|endoftext|>`) is llama.cpp's end-of-turn token.
    if let Some(&eot) = loaded.eos_ids.get(1) {
        metadata.push(("tokenizer.ggml.eot_token_id", Value::U32(eot)));
    }
    metadata.push((
        "tokenizer.ggml.add_bos_token",
        Value::Bool(loaded.bos.is_some()),
    ));
    if let Some(template) = &loaded.chat_template {
        metadata.push(("tokenizer.chat_template", Value::String(template.clone())));
    }
    Ok(n_vocab)
}

/// llama.cpp's name for a byte-level pre-tokenizer: plain GPT-2 regex is `gpt-2` (llama.cpp's
/// `default` uses other regexes), and digits split one by one before it is `smollm`.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let is_byte_level = |p: &Json| {
        p["type"] == "ByteLevel" && p["add_prefix_space"] == false && p["use_regex"] != false
    };
    match pre["type"].as_str()? {
        "ByteLevel" if is_byte_level(pre) => Some("gpt-2"),
        "Sequence" => match pre["pretokenizers"].as_array()?.as_slice() {
            [p] if is_byte_level(p) => Some("gpt-2"),
            [d, p]
                if d["type"] == "Digits" && d["individual_digits"] == true && is_byte_level(p) =>
            {
                Some("smollm")
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportTensor;
    use crate::export::test_util::tensor;
    use crate::tokenizer::{from_gguf, from_hf_folder};
    use candle_core::quantized::GgmlDType;
    use candle_core::quantized::gguf_file;

    /// GPT-2's byte → printable char table, so the fixture vocabulary is a real byte-level one.
    fn byte_chars() -> Vec<char> {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut next = 256;
        (0..256u32)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    next += 1;
                    next - 1
                };
                char::from_u32(c).unwrap()
            })
            .collect()
    }

    /// A 262-token byte-level BPE folder: 256 bytes, 4 merges, 2 special tokens.
    fn tiny_tokenizer(dir: &Path) -> LoadedTokenizer {
        let mut vocab: serde_json::Map<String, Json> = byte_chars()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i.into()))
            .collect();
        for (i, t) in ["he", "Ġt", "Ġthe", "12"].iter().enumerate() {
            vocab.insert(t.to_string(), (256 + i).into());
        }
        std::fs::write(dir.join("vocab.json"), Json::Object(vocab).to_string()).unwrap();
        std::fs::write(
            dir.join("merges.txt"),
            "#version: 0.2\nh e\nĠ t\nĠt he\n1 2\n",
        )
        .unwrap();
        let added = r#"{"<|endoftext|>": 260, "<|im_start|>": 261}"#;
        std::fs::write(dir.join("added_tokens.json"), added).unwrap();
        let config = r#"{"eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}"#;
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        from_hf_folder(dir).unwrap()
    }

    fn meta(hidden: u32) -> GgufMeta {
        GgufMeta {
            name: "tiny".to_owned(),
            context_length: 64,
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
        }
    }

    fn model(vocab: usize, hidden: usize) -> Vec<ExportTensor> {
        let p = "model.layers.0";
        vec![
            tensor("model.embed_tokens.weight", &[vocab, hidden], 1),
            tensor(
                &format!("{p}.self_attn.q_proj.weight"),
                &[hidden, hidden],
                2,
            ),
            tensor(
                &format!("{p}.self_attn.k_proj.weight"),
                &[hidden / 2, hidden],
                3,
            ),
            tensor(
                &format!("{p}.self_attn.v_proj.weight"),
                &[hidden / 2, hidden],
                4,
            ),
            tensor(
                &format!("{p}.self_attn.o_proj.weight"),
                &[hidden, hidden],
                5,
            ),
            tensor(
                &format!("{p}.mlp.gate_proj.weight"),
                &[2 * hidden, hidden],
                6,
            ),
            tensor(&format!("{p}.mlp.up_proj.weight"), &[2 * hidden, hidden], 7),
            tensor(
                &format!("{p}.mlp.down_proj.weight"),
                &[hidden, 2 * hidden],
                8,
            ),
            tensor(&format!("{p}.input_layernorm.weight"), &[hidden], 9),
            tensor(
                &format!("{p}.post_attention_layernorm.weight"),
                &[hidden],
                10,
            ),
            tensor("model.norm.weight", &[hidden], 11),
        ]
    }

    /// Undoes `permute_qk`: GGUF row `2 * j + s` of each head goes back to row `s * half + j`.
    fn unpermute(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let (head_dim, mut out) = (rows / n_head, vec![0f32; data.len()]);
        for h in 0..n_head {
            for s in 0..2 {
                for j in 0..head_dim / 2 {
                    let dst = (h * head_dim + s * head_dim / 2 + j) * cols;
                    let src = (h * head_dim + 2 * j + s) * cols;
                    out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
                }
            }
        }
        out
    }

    fn read(path: &Path) -> (gguf_file::Content, std::fs::File) {
        let mut file = std::fs::File::open(path).unwrap();
        (gguf_file::Content::read(&mut file).unwrap(), file)
    }

    fn values(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        name: &str,
    ) -> (QTensor, Vec<f32>) {
        let q = content.tensor(file, name, &Device::Cpu).unwrap();
        let v = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q, v)
    }

    #[test]
    fn f32_round_trip_names_shapes_and_qk_permutation() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_tokenizer(dir.path());
        let ts = model(262, 8);
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &meta(8), &ts, GgufType::F32, &tok).unwrap();
        let (content, mut file) = read(&path);
        assert_eq!(content.tensor_infos.len(), ts.len());
        let md = &content.metadata;
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(md["llama.rope.dimension_count"].to_u32().unwrap(), 4);
        assert_eq!(md["llama.attention.head_count_kv"].to_u32().unwrap(), 1);
        assert_eq!(md["llama.vocab_size"].to_u32().unwrap(), 262);
        assert_eq!(md["general.file_type"].to_u32().unwrap(), 0);
        for t in &ts {
            let (q, got) = values(&content, &mut file, &gguf_name(&t.name).unwrap());
            assert_eq!(q.shape().dims(), t.shape.as_slice(), "{}", t.name);
            let got = match t.name.as_str() {
                n if n.ends_with("q_proj.weight") => unpermute(&got, t.shape[0], t.shape[1], 2),
                n if n.ends_with("k_proj.weight") => unpermute(&got, t.shape[0], t.shape[1], 1),
                _ => got,
            };
            assert_eq!(got, t.data, "{}", t.name);
        }
        // The permutation really moves rows: with head_dim 4, GGUF row 2j+s holds source row
        // 2s+j, so row 1 comes from row 2 and row 3 stays.
        let (_, q) = values(&content, &mut file, "blk.0.attn_q.weight");
        assert_eq!(&q[8..16], &ts[1].data[16..24]);
        assert_eq!(&q[16..24], &ts[1].data[8..16]);
        assert_eq!(&q[24..32], &ts[1].data[24..32]);
        assert!(!content.tensor_infos.contains_key("output.weight"));
    }

    #[test]
    fn q8_0_within_tolerance_and_f16_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_tokenizer(dir.path());
        let mut ts = model(262, 32);
        ts.push(tensor("lm_head.weight", &[262, 32], 12));
        let path = dir.path().join("q8.gguf");
        write_gguf(&path, &meta(32), &ts, GgufType::Q8_0, &tok).unwrap();
        let (content, mut file) = read(&path);
        assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), 7);
        let (q, got) = values(&content, &mut file, "output.weight");
        assert_eq!(q.dtype(), GgmlDType::Q8_0);
        // Q8_0: 32-value blocks, scale max|x|/127 stored as f16; |x| <= 3.25 here, so the
        // rounding error is at most 3.25/254 plus the scale's f16 rounding: under 0.02.
        let worst = got
            .iter()
            .zip(&ts[11].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.02, "worst Q8_0 error {worst}");
        let (norm, _) = values(&content, &mut file, "output_norm.weight");
        assert_eq!(norm.dtype(), GgmlDType::F32);

        // Rows of 8 are not a multiple of Q8_0's block of 32: those weights become F16.
        let path = dir.path().join("fallback.gguf");
        write_gguf(&path, &meta(8), &model(262, 8), GgufType::Q8_0, &tok).unwrap();
        let (content, mut file) = read(&path);
        let (q, _) = values(&content, &mut file, "blk.0.ffn_up.weight");
        assert_eq!(q.dtype(), GgmlDType::F16);
    }

    #[test]
    fn tokenizer_survives_the_gguf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_tokenizer(dir.path());
        let path = dir.path().join("tok.gguf");
        write_gguf(&path, &meta(8), &model(262, 8), GgufType::F32, &tok).unwrap();
        let (content, _) = read(&path);
        assert_eq!(
            content.metadata["tokenizer.ggml.pre"].to_string().unwrap(),
            "gpt-2"
        );
        let back = from_gguf(&content).unwrap();
        assert_eq!(back.eos_ids, tok.eos_ids);
        assert_eq!(back.eos_ids, vec![260]);
        assert_eq!(back.bos, None);
        assert_eq!(back.chat_template.as_deref(), Some("{{ messages }}"));
        assert!(!back.is_aquila);
        for text in [
            "the theme 12345",
            "<|im_start|>hello the<|endoftext|>",
            "  é 中文 🚀\n\t",
        ] {
            let a = tok.tokenizer.encode(text, false).unwrap();
            let b = back.tokenizer.encode(text, false).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
            assert_eq!(back.tokenizer.decode(b.get_ids(), false).unwrap(), text);
        }
        let ids = back.tokenizer.encode("<|im_start|> the", false).unwrap();
        assert_eq!(ids.get_ids(), &[261, 258]);
    }
}
