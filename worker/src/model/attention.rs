//! Causal attention over the paged KV cache, on CPU, for a batch of
//! sequences of different lengths: one pass per (sequence, head, query) with
//! an online softmax, reading each block in place (no gather into a
//! contiguous tensor), parallel across sequences and heads. Grouped-query
//! aware: query head h reads KV head h / (heads / kv_heads).

use std::sync::OnceLock;

use half::bf16;

use crate::kv::{BlockId, KvDtype, KvElem, PagedKv};
use crate::pool;

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
    let parts: Vec<OnceLock<Vec<f32>>> = jobs.iter().map(|_| OnceLock::new()).collect();
    pool::run(jobs.len(), |i| {
        let (s, h) = jobs[i];
        let _ = parts[i].set(head_attention(kv, layer, &seqs[s], h, heads, h / group));
    });
    let total: usize = seqs.iter().map(|s| s.n).sum();
    let mut out = vec![0f32; total * heads * hd];
    let mut row0 = Vec::with_capacity(seqs.len());
    let mut r = 0;
    for s in seqs {
        row0.push(r);
        r += s.n;
    }
    for (&(s, h), part) in jobs.iter().zip(&parts) {
        let part = part.get().expect("every job ran");
        for t in 0..seqs[s].n {
            let dst = ((row0[s] + t) * heads + h) * hd;
            out[dst..dst + hd].copy_from_slice(&part[t * hd..(t + 1) * hd]);
        }
    }
    out
}

/// Head `h` of one sequence: `[n, head_dim]`, for the cache's element type.
fn head_attention(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    h: usize,
    heads: usize,
    kvh: usize,
) -> Vec<f32> {
    match kv.dtype() {
        KvDtype::F32 => head_attention_as::<f32>(kv, layer, seq, h, heads, kvh),
        KvDtype::Bf16 => head_attention_as::<bf16>(kv, layer, seq, h, heads, kvh),
    }
}

/// Compiled a second time with AVX2 and FMA enabled, used when the machine
/// has them; the arithmetic is the same lane for lane, so both give the same
/// bits.
fn head_attention_as<T: KvElem>(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    h: usize,
    heads: usize,
    kvh: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::quant::Isa::selected() >= super::quant::Isa::Avx2 {
        // SAFETY: the AVX2 path is selected only where AVX2 and FMA exist.
        return unsafe { head_attention_avx2::<T>(kv, layer, seq, h, heads, kvh) };
    }
    head_attention_body::<T>(kv, layer, seq, h, heads, kvh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_attention_avx2<T: KvElem>(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    h: usize,
    heads: usize,
    kvh: usize,
) -> Vec<f32> {
    head_attention_body::<T>(kv, layer, seq, h, heads, kvh)
}

/// The online softmax, a block of keys at a time: all of a block's scores
/// first, then one rescale of the running sum if the maximum moved, then the
/// block's weighted values, eight dimensions at a time so those eight sums
/// stay in a register across the block's keys (each sum still takes the keys
/// in order).
#[inline(always)]
fn head_attention_body<T: KvElem>(
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
    let mut weights = vec![0f32; bs];
    for t in 0..seq.n {
        let q = &seq.q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
        let acc = &mut out[t * hd..(t + 1) * hd];
        // Causal: the query at position start+t sees keys 0..=start+t.
        let visible = seq.start + t + 1;
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0f32;
        for (bi, &block) in seq.table[..visible.div_ceil(bs)].iter().enumerate() {
            let (keys, values) = kv.block::<T>(layer, block, kvh);
            let slots = (visible - bi * bs).min(bs);
            let weights = &mut weights[..slots];
            for (j, s) in weights.iter_mut().enumerate() {
                *s = dot(q, &keys[j * hd..(j + 1) * hd]) * scale;
            }
            let block_max = weights.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            if block_max > max {
                let c = (max - block_max).exp();
                denom *= c;
                acc.iter_mut().for_each(|a| *a *= c);
                max = block_max;
            }
            for s in weights.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            add_weighted(acc, weights, &values[..slots * hd]);
        }
        let inv = 1.0 / denom;
        acc.iter_mut().for_each(|a| *a *= inv);
    }
    out
}

/// `acc += Σ_j w[j]·v[j]`, `v` being `w.len()` rows of `acc.len()`; each
/// element takes the rows in order. The common head sizes get a version
/// whose whole accumulator lives in registers, so consecutive rows' adds do
/// not wait on each other.
#[inline(always)]
fn add_weighted<T: KvElem>(acc: &mut [f32], w: &[f32], v: &[T]) {
    match acc.len() {
        64 => add_weighted_fixed::<8, T>(acc, w, v),
        128 => add_weighted_fixed::<16, T>(acc, w, v),
        hd => {
            for (j, &p) in w.iter().enumerate() {
                acc.iter_mut()
                    .zip(&v[j * hd..(j + 1) * hd])
                    .for_each(|(a, &b)| *a += p * b.to_f32());
            }
        }
    }
}

/// [`add_weighted`] for a head of `G`·8 dimensions.
#[inline(always)]
fn add_weighted_fixed<const G: usize, T: KvElem>(acc: &mut [f32], w: &[f32], v: &[T]) {
    let mut lanes = [[0f32; 8]; G];
    for (l, a) in lanes.iter_mut().zip(acc.chunks_exact(8)) {
        l.copy_from_slice(a);
    }
    for (&p, row) in w.iter().zip(v.chunks_exact(G * 8)) {
        for (l, vs) in lanes.iter_mut().zip(row.chunks_exact(8)) {
            for i in 0..8 {
                l[i] += p * vs[i].to_f32();
            }
        }
    }
    for (l, a) in lanes.iter().zip(acc.chunks_exact_mut(8)) {
        a.copy_from_slice(l);
    }
}

/// Eight independent partial sums, so the compiler can keep them in one
/// vector register; summed in a fixed order at the end.
#[inline(always)]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, at) = a.split_at(a.len() / 8 * 8);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l].to_f32();
        }
    }
    let tail: f32 = at.iter().zip(bt).map(|(x, y)| x * y.to_f32()).sum();
    lanes.iter().sum::<f32>() + tail
}
