//! `aquila bench-model`: the speed of the model itself, without the network
//! or the scheduler: prefill tokens/s for a prompt of given length, greedy
//! decode tokens/s for one sequence, and for `batch` sequences decoding in
//! the same steps, printed as one JSON line.

use std::sync::Arc;
use std::time::Instant;

use crate::comm::SingleRank;
use crate::error::Result;
use crate::kv::{BlockId, KvDtype};
use crate::loader::{self, LoadOptions};
use crate::model::{Llama, LogitsFor, SeqInput, SingleSeq};
use crate::sampler::argmax;

pub struct BenchResult {
    pub model: String,
    pub prompt_tokens: usize,
    pub prompt_tok_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_per_s: f64,
    pub batch: usize,
    pub batch_decode_tok_per_s: f64,
    pub weight_bytes: usize,
    pub kernels: &'static str,
    /// The float kernels' path (bf16 weights on `avx512-bf16` round their
    /// activations).
    pub float_kernels: &'static str,
    pub kv_cache_dtype: &'static str,
}

impl BenchResult {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "engine": "aquila",
            "model": self.model,
            "threads": crate::pool::threads(),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tok_per_s": self.prompt_tok_per_s,
            "decode_tokens": self.decode_tokens,
            "decode_tok_per_s": self.decode_tok_per_s,
            "batch": self.batch,
            "batch_decode_tok_per_s": self.batch_decode_tok_per_s,
            "batch_speedup": self.batch_decode_tok_per_s / self.decode_tok_per_s,
            "kernels": self.kernels,
            "float_kernels": self.float_kernels,
            "kv_cache_dtype": self.kv_cache_dtype,
            "weight_bytes": self.weight_bytes,
            "decode_gb_per_s": self.weight_bytes as f64 * self.decode_tok_per_s / 1e9,
        })
        .to_string()
    }
}

/// Prefills `prompt_tokens` tokens of ordinary text, then decodes
/// `gen_tokens` greedily, alone and then as `batch` sequences at once; the
/// first decode step is a warm-up, not timed.
pub fn run(
    path: &std::path::Path,
    opts: &LoadOptions,
    prompt_tokens: usize,
    gen_tokens: usize,
    batch: usize,
    kv_dtype: KvDtype,
) -> Result<BenchResult> {
    let loaded = loader::load(path, opts, Arc::new(SingleRank))?;
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(prompt_tokens);
    let mut prompt: Vec<u32> = loaded
        .tokenizer
        .tokenizer
        .encode(text.as_str(), false)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    prompt.truncate(prompt_tokens);
    let model = &loaded.model;
    let mut seq = SingleSeq::with_dtype(model, prompt.len() + gen_tokens + 1, kv_dtype);
    let t0 = Instant::now();
    let logits = seq.step(model, &prompt, LogitsFor::Last)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = argmax(&logits);
    let mut timed = Instant::now();
    for i in 0..=gen_tokens {
        if i == 1 {
            timed = Instant::now();
        }
        next = argmax(&seq.step(model, &[next], LogitsFor::Last)?);
    }
    let decode = timed.elapsed().as_secs_f64();
    let batch = batch.max(1);
    let batch_decode = batched_decode(model, &prompt, batch, gen_tokens, kv_dtype)?;
    Ok(BenchResult {
        model: loaded.name,
        prompt_tokens: prompt.len(),
        prompt_tok_per_s: prompt.len() as f64 / prefill,
        decode_tokens: gen_tokens,
        decode_tok_per_s: gen_tokens as f64 / decode,
        batch,
        batch_decode_tok_per_s: (batch * gen_tokens) as f64 / batch_decode,
        weight_bytes: model.weight_bytes(),
        kernels: crate::model::quant::Isa::selected().label(),
        float_kernels: crate::model::kernels::FloatPath::selected().label(),
        kv_cache_dtype: kv_dtype.label(),
    })
}

/// Seconds for `steps` decode steps of `batch` sequences that all start from
/// `prompt` (after one untimed warm-up step).
fn batched_decode(
    model: &Llama,
    prompt: &[u32],
    batch: usize,
    steps: usize,
    kv_dtype: KvDtype,
) -> Result<f64> {
    const BLOCK: usize = 16;
    let per_seq = (prompt.len() + steps + 2).div_ceil(BLOCK);
    let mut kv = model.new_kv_with(per_seq * batch, BLOCK, kv_dtype);
    let tables: Vec<Vec<BlockId>> = (0..batch)
        .map(|s| ((s * per_seq) as BlockId..((s + 1) * per_seq) as BlockId).collect())
        .collect();
    let mut last: Vec<u32> = Vec::new();
    let mut len = 0;
    let mut timed = Instant::now();
    for step in 0..=steps + 1 {
        if step == 2 {
            timed = Instant::now();
        }
        let inputs: Vec<SeqInput> = tables
            .iter()
            .enumerate()
            .map(|(s, table)| SeqInput {
                tokens: if step == 0 { prompt } else { &last[s..s + 1] },
                start: len,
                table,
            })
            .collect();
        let logits = model.forward(&mut kv, &inputs, LogitsFor::Last)?;
        len += if step == 0 { prompt.len() } else { 1 };
        last = logits.iter().map(|l| argmax(l)).collect();
    }
    Ok(timed.elapsed().as_secs_f64())
}
