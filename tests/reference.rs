//! The model against an independent reference: a plain f64 LLaMA forward
//! written here from the checkpoint's tensors (read with the `safetensors`
//! crate, not our loader). Logits must agree to a relative error of 1e-4
//! (f32 arithmetic against f64), through prefill and through the KV cache one
//! token at a time, and greedy decoding must agree token for token.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use aquila_worker::comm::SingleRank;
use aquila_worker::kv::{BlockId, KvDtype};
use aquila_worker::loader::{self, LoadOptions, LoadedModel};
use aquila_worker::model::{LogitsFor, SeqInput, SingleSeq, WeightDtype};
use aquila_worker::presets::{GgufType, WeightFormat};

struct Ref {
    w: HashMap<String, Vec<f64>>,
    h: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    eps: f64,
    theta: f64,
}

impl Ref {
    fn load(dir: &Path) -> Ref {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut w = HashMap::new();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            w.insert(name, v);
        }
        let get = |k: &str| cfg[k].as_u64().unwrap() as usize;
        Ref {
            w,
            h: get("hidden_size"),
            inter: get("intermediate_size"),
            layers: get("num_hidden_layers"),
            heads: get("num_attention_heads"),
            kv_heads: get("num_key_value_heads"),
            vocab: get("vocab_size"),
            eps: cfg["rms_norm_eps"].as_f64().unwrap(),
            theta: cfg["rope_theta"].as_f64().unwrap(),
        }
    }

    fn t(&self, name: &str) -> &[f64] {
        &self.w[name]
    }

    /// y = W x for W `[out, in]`.
    fn matvec(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = self.t(name);
        let n = x.len();
        w.chunks_exact(n)
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rmsnorm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + self.eps).sqrt();
        x.iter()
            .zip(self.t(name))
            .map(|(v, w)| v * inv * w)
            .collect()
    }

    /// Rotate-half RoPE on one head vector at position `pos`.
    fn rope(&self, v: &mut [f64], pos: usize) {
        let d = v.len();
        for i in 0..d / 2 {
            let angle = pos as f64 * self.theta.powf(-(2.0 * i as f64) / d as f64);
            let (c, s) = (angle.cos(), angle.sin());
            let (a, b) = (v[i], v[i + d / 2]);
            v[i] = a * c - b * s;
            v[i + d / 2] = a * s + b * c;
        }
    }

    /// Logits for every position of `tokens`, recomputed from scratch.
    fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (h, hd) = (self.h, self.h / self.heads);
        let emb = self.t("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let xn = self.rmsnorm(&format!("{p}.input_layernorm.weight"), x);
                let mut q = self.matvec(&format!("{p}.self_attn.q_proj.weight"), &xn);
                let mut k = self.matvec(&format!("{p}.self_attn.k_proj.weight"), &xn);
                for head in q.chunks_mut(hd) {
                    self.rope(head, pos);
                }
                for head in k.chunks_mut(hd) {
                    self.rope(head, pos);
                }
                qs.push(q);
                ks.push(k);
                vs.push(self.matvec(&format!("{p}.self_attn.v_proj.weight"), &xn));
            }
            let group = self.heads / self.kv_heads;
            for (i, x) in xs.iter_mut().enumerate() {
                let mut attn = vec![0.0; self.heads * hd];
                for head in 0..self.heads {
                    let kvh = head / group;
                    let q = &qs[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = exps.iter().sum();
                    for (j, e) in exps.iter().enumerate() {
                        let v = &vs[j][kvh * hd..(kvh + 1) * hd];
                        for d in 0..hd {
                            attn[head * hd + d] += e / z * v[d];
                        }
                    }
                }
                let o = self.matvec(&format!("{p}.self_attn.o_proj.weight"), &attn);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let xn = self.rmsnorm(&format!("{p}.post_attention_layernorm.weight"), x);
                let g = self.matvec(&format!("{p}.mlp.gate_proj.weight"), &xn);
                let u = self.matvec(&format!("{p}.mlp.up_proj.weight"), &xn);
                let a: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                assert_eq!(a.len(), self.inter);
                let d = self.matvec(&format!("{p}.mlp.down_proj.weight"), &a);
                x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            }
        }
        xs.iter()
            .map(|x| {
                let logits = self.matvec("lm_head.weight", &self.rmsnorm("model.norm.weight", x));
                assert_eq!(logits.len(), self.vocab);
                logits
            })
            .collect()
    }
}

fn argmax64(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// max |ours − ref| / max |ref| over one row of logits.
fn rel_err(ours: &[f32], reference: &[f64]) -> f64 {
    let scale = reference.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    diff / scale
}

/// The tiny preset as f32 safetensors, loaded (the folder lives as long as
/// the returned guard).
fn tiny() -> (tempfile::TempDir, LoadedModel) {
    let dir = common::tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let opts = LoadOptions {
        dtype: WeightDtype::F32,
        name: None,
        tp_invariant: false,
    };
    let loaded = loader::load(dir.path(), &opts, Arc::new(SingleRank)).unwrap();
    (dir, loaded)
}

const PROMPT: &[u32] = &[
    72, 101, 108, 108, 111, 44, 32, 65, 113, 117, 105, 108, 97, 33,
];

#[test]
fn logits_and_greedy_tokens_match_an_f64_reference() {
    let (dir, loaded) = tiny();
    let reference = Ref::load(dir.path());
    let model = &loaded.model;

    // Prefill: every position's logits.
    let want = reference.forward(PROMPT);
    let mut seq = SingleSeq::new(model, PROMPT.len() + 40);
    let got = seq.step(model, PROMPT, LogitsFor::All).unwrap();
    let vocab = reference.vocab;
    for (pos, row) in want.iter().enumerate() {
        let err = rel_err(&got[pos * vocab..(pos + 1) * vocab], row);
        assert!(
            err <= 1e-4,
            "prefill position {pos}: relative error {err:e} > 1e-4"
        );
    }

    // Greedy decode of 32 tokens through the cache, each step checked.
    let mut tokens = PROMPT.to_vec();
    let mut next = argmax64(want.last().unwrap());
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut our_next = aquila_worker::sampler::argmax(&got[(PROMPT.len() - 1) * vocab..]);
    for step in 0..32 {
        theirs.push(next);
        ours.push(our_next);
        tokens.push(next);
        let got = seq.step(model, &[our_next], LogitsFor::Last).unwrap();
        let want = reference.forward(&tokens);
        let row = want.last().unwrap();
        let err = rel_err(&got, row);
        assert!(
            err <= 1e-4,
            "decode step {step}: relative error {err:e} > 1e-4"
        );
        next = argmax64(row);
        our_next = aquila_worker::sampler::argmax(&got);
    }
    assert_eq!(ours, theirs, "greedy tokens differ from the f64 reference");
}

#[test]
fn batches_scattered_blocks_and_chunks_change_nothing() {
    // Two sequences in one step, their blocks scattered through one pool,
    // must give what each gives alone; so must a prompt run in chunks. The
    // batch shares weights, never state.
    let (_dir, loaded) = tiny();
    let model = &loaded.model;
    let a: &[u32] = &PROMPT[..9];
    let b: &[u32] = &PROMPT[3..];
    let alone = |t: &[u32]| {
        SingleSeq::new(model, t.len())
            .step(model, t, LogitsFor::Last)
            .unwrap()
    };
    let close = |x: &[f32], y: &[f32], what: &str| {
        for (x, y) in x.iter().zip(y) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{what}: {x} vs alone {y}"
            );
        }
    };
    let (la, lb) = (alone(a), alone(b));
    let mut kv = model.new_kv(8, 4);
    let (ta, tb): (&[BlockId], &[BlockId]) = (&[5, 0, 2], &[7, 1, 3]);
    let both = model
        .forward(
            &mut kv,
            &[
                SeqInput {
                    tokens: a,
                    start: 0,
                    table: ta,
                },
                SeqInput {
                    tokens: b,
                    start: 0,
                    table: tb,
                },
            ],
            LogitsFor::Last,
        )
        .unwrap();
    close(&both[0], &la, "batched a");
    close(&both[1], &lb, "batched b");

    // The same prompt in chunks of 5, 1 and the rest, into scattered blocks.
    let mut kv = model.new_kv(8, 4);
    let table: &[BlockId] = &[6, 4, 2, 0];
    let mut last = Vec::new();
    for (start, end) in [(0, 5), (5, 6), (6, PROMPT.len())] {
        let input = SeqInput {
            tokens: &PROMPT[start..end],
            start,
            table,
        };
        last = model
            .forward(&mut kv, &[input], LogitsFor::Last)
            .unwrap()
            .remove(0);
    }
    close(&last, &alone(PROMPT), "chunked prefill");
}

#[test]
fn a_bf16_kv_cache_stays_close_to_the_f64_reference() {
    // `--kv-cache-dtype bf16` rounds every key and value to 8 bits of
    // mantissa; the logits must stay within 1% of the largest logit.
    let (dir, loaded) = tiny();
    let reference = Ref::load(dir.path());
    let model = &loaded.model;
    let mut kv = model.new_kv_with(8, 4, KvDtype::Bf16);
    let table: &[BlockId] = &[3, 6, 1, 7];
    let input = SeqInput {
        tokens: PROMPT,
        start: 0,
        table,
    };
    let got = model
        .forward(&mut kv, &[input], LogitsFor::All)
        .unwrap()
        .remove(0);
    let want = reference.forward(PROMPT);
    let vocab = reference.vocab;
    let mut worst = 0f64;
    for (pos, row) in want.iter().enumerate() {
        let err = rel_err(&got[pos * vocab..(pos + 1) * vocab], row);
        assert!(err <= 1e-2, "position {pos}: relative error {err:e} > 1e-2");
        worst = worst.max(err);
    }
    // bf16 rounding must show, or the cache did not hold bf16.
    assert!(worst > 1e-6, "no difference from f32 at all: {worst:e}");
    eprintln!("bf16 KV cache: worst relative logit error {worst:e}");
}
