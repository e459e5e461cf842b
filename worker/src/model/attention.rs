//! Causal attention over the paged KV cache, on CPU, for a batch of
//! sequences of different lengths: one pass per (sequence, head, query) with
//! an online softmax, reading each block in place (no gather into a
//! contiguous tensor), parallel across sequences and heads. Grouped-query
//! aware: query head h reads KV head h / (heads / kv_heads).

use rayon::prelude::*;

use crate::kv::{BlockId, PagedKv};

/// One sequence's queries for this step.
pub struct AttnSeq<'a> {
    /// `[n, heads·head_dim]` for positions `start..start+n`.
    pub q: &'a [f32],
    pub n: usize,
    pub start: usize,
    /// Covers positions `0..start+n`, all already written for this layer.
    pub table: &'a [BlockId],
}

/// Returns `[Σn, heads·head_dim]`, sequences in order.
pub fn attend(kv: &PagedKv, layer: usize, heads: usize, seqs: &[AttnSeq<'_>]) -> Vec<f32> {
    let hd = kv.head_dim();
    let group = heads / kv.kv_heads();
    let jobs: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    let parts: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(s, h)| head_attention(kv, layer, &seqs[s], h, heads, h / group))
        .collect();
    let total: usize = seqs.iter().map(|s| s.n).sum();
    let mut out = vec![0f32; total * heads * hd];
    let mut row0 = Vec::with_capacity(seqs.len());
    let mut r = 0;
    for s in seqs {
        row0.push(r);
        r += s.n;
    }
    for (&(s, h), part) in jobs.iter().zip(&parts) {
        for t in 0..seqs[s].n {
            let dst = ((row0[s] + t) * heads + h) * hd;
            out[dst..dst + hd].copy_from_slice(&part[t * hd..(t + 1) * hd]);
        }
    }
    out
}

/// Head `h` of one sequence: `[n, head_dim]`.
fn head_attention(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    h: usize,
    heads: usize,
    kvh: usize,
) -> Vec<f32> {
    let hd = kv.head_dim();
    let bs = kv.block_size();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; seq.n * hd];
    for t in 0..seq.n {
        let q = &seq.q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
        let acc = &mut out[t * hd..(t + 1) * hd];
        // Causal: the query at position start+t sees keys 0..=start+t.
        let visible = seq.start + t + 1;
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0f32;
        for (bi, &block) in seq.table[..visible.div_ceil(bs)].iter().enumerate() {
            let (keys, values) = kv.block(layer, block, kvh);
            let slots = (visible - bi * bs).min(bs);
            for j in 0..slots {
                let k = &keys[j * hd..(j + 1) * hd];
                let v = &values[j * hd..(j + 1) * hd];
                let s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                if s > max {
                    let c = (max - s).exp();
                    denom = denom * c + 1.0;
                    acc.iter_mut().zip(v).for_each(|(a, &b)| *a = *a * c + b);
                    max = s;
                } else {
                    let p = (s - max).exp();
                    denom += p;
                    acc.iter_mut().zip(v).for_each(|(a, &b)| *a += p * b);
                }
            }
        }
        let inv = 1.0 / denom;
        acc.iter_mut().for_each(|a| *a *= inv);
    }
    out
}
