//! `aquila bench`: single-stream speed of the model itself, without the
//! network: prefill tokens/s for a prompt of given length, then greedy decode
//! tokens/s, printed as one JSON line. The numbers in BENCHMARKS.md.

use std::sync::Arc;
use std::time::Instant;

use crate::comm::SingleRank;
use crate::error::Result;
use crate::loader::{self, LoadOptions};
use crate::model::{LogitsFor, SingleSeq};
use crate::sampler::argmax;

pub struct BenchResult {
    pub model: String,
    pub prompt_tokens: usize,
    pub prompt_tok_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_per_s: f64,
    pub weight_bytes: usize,
}

impl BenchResult {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "engine": "aquila",
            "model": self.model,
            "threads": rayon::current_num_threads(),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tok_per_s": self.prompt_tok_per_s,
            "decode_tokens": self.decode_tokens,
            "decode_tok_per_s": self.decode_tok_per_s,
            "weight_bytes": self.weight_bytes,
            "decode_gb_per_s": self.weight_bytes as f64 * self.decode_tok_per_s / 1e9,
        })
        .to_string()
    }
}

/// Prefills `prompt_tokens` tokens of ordinary text, then decodes
/// `gen_tokens` greedily; the first decode step is a warm-up, not timed.
pub fn run(
    path: &std::path::Path,
    opts: &LoadOptions,
    prompt_tokens: usize,
    gen_tokens: usize,
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
    let mut seq = SingleSeq::new(model, prompt.len() + gen_tokens + 1);
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
    Ok(BenchResult {
        model: loaded.name,
        prompt_tokens: prompt.len(),
        prompt_tok_per_s: prompt.len() as f64 / prefill,
        decode_tokens: gen_tokens,
        decode_tok_per_s: gen_tokens as f64 / decode,
        weight_bytes: model.weight_bytes(),
    })
}
