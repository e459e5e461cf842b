//! An independent reference: a plain f64 LLaMA forward written from a
//! checkpoint's tensors (read with the `safetensors` crate, or given as
//! values), not from our loader or kernels.

use std::collections::HashMap;
use std::path::Path;

pub struct Ref {
    w: HashMap<String, Vec<f64>>,
    h: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    pub vocab: usize,
    eps: f64,
    theta: f64,
}

impl Ref {
    /// The model in `dir`: its config.json and f32 model.safetensors.
    pub fn load(dir: &Path) -> Ref {
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
        Ref::new(w, &cfg)
    }

    /// The model of config `cfg` with weights `w` (f64, Hugging Face names
    /// and layouts: q/k in rotate-half order).
    pub fn new(w: HashMap<String, Vec<f64>>, cfg: &serde_json::Value) -> Ref {
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
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
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

pub fn argmax64(v: &[f64]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// max |ours − ref| / max |ref| over one row of logits.
pub fn rel_err(ours: &[f32], reference: &[f64]) -> f64 {
    let scale = reference.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    diff / scale
}
