//! Causal attention of one sequence's new tokens over its KV cache, on CPU:
//! one pass per (head, query) with an online softmax, reading the cache in
//! place. Grouped-query aware: query head h reads KV head h / (heads/kv_heads).

use rayon::prelude::*;

use crate::kv_cache::SeqCache;

/// `q` is `[n, heads·hd]` for positions `start..start+n`; the cache already
/// holds positions `0..start+n` for `layer`. Returns `[n, heads·hd]`.
pub fn attend(
    q: &[f32],
    n: usize,
    start: usize,
    cache: &SeqCache,
    layer: usize,
    heads: usize,
) -> Vec<f32> {
    let hd = cache.head_dim();
    let cap = cache.capacity();
    let group = heads / cache.kv_heads();
    let scale = 1.0 / (hd as f32).sqrt();
    let lc = cache.layer(layer);
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let total = start + n;
            let keys = lc.keys(kvh, total, cap, hd);
            let values = lc.values(kvh, total, cap, hd);
            let mut out = vec![0f32; n * hd];
            for t in 0..n {
                let qv = &q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                let acc = &mut out[t * hd..(t + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                let mut denom = 0f32;
                // Causal: query at position start+t sees keys 0..=start+t.
                for j in 0..=start + t {
                    let k = &keys[j * hd..(j + 1) * hd];
                    let s = qv.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    let v = &values[j * hd..(j + 1) * hd];
                    if s > max {
                        let c = (max - s).exp();
                        denom = denom * c + 1.0;
                        for (a, &b) in acc.iter_mut().zip(v) {
                            *a = *a * c + b;
                        }
                        max = s;
                    } else {
                        let p = (s - max).exp();
                        denom += p;
                        for (a, &b) in acc.iter_mut().zip(v) {
                            *a += p * b;
                        }
                    }
                }
                let inv = 1.0 / denom;
                acc.iter_mut().for_each(|a| *a *= inv);
            }
            out
        })
        .collect();
    let mut out = vec![0f32; n * heads * hd];
    for (h, ho) in per_head.iter().enumerate() {
        for t in 0..n {
            out[(t * heads + h) * hd..(t * heads + h + 1) * hd]
                .copy_from_slice(&ho[t * hd..(t + 1) * hd]);
        }
    }
    out
}
