//! Causal attention over the paged KV cache, on CPU, for a batch of
//! sequences of different lengths: one pass per (sequence, head, query) with
//! an online softmax, reading each block in place (no gather into a
//! contiguous tensor), parallel across sequences and runs of heads. Grouped-query
//! aware: query head h reads KV head h / (heads / kv_heads).

use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use crate::kv::{BlockId, KvDtype, KvElem, PagedKv};
use crate::pool;

use super::math::exp;

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
///
/// A job is one sequence and a run of consecutive heads: all of them where
/// there are enough sequences to keep every thread busy, fewer (more jobs)
/// where there are not. A job walks the sequence's blocks once, reading
/// each block's keys and values for its heads as one contiguous run, which
/// the hardware prefetcher follows; heads that share a KV head read it
/// back to back.
pub fn attend(kv: &PagedKv, layer: usize, heads: usize, seqs: &[AttnSeq<'_>]) -> Vec<f32> {
    let hd = kv.head_dim();
    let runs = (4 * pool::threads())
        .div_ceil(seqs.len().max(1))
        .clamp(1, heads);
    let jobs: Vec<(usize, Range<usize>)> = (0..seqs.len())
        .flat_map(|s| (0..runs).map(move |i| (s, i * heads / runs..(i + 1) * heads / runs)))
        .collect();
    let parts: Vec<OnceLock<Vec<f32>>> = jobs.iter().map(|_| OnceLock::new()).collect();
    pool::run(jobs.len(), |i| {
        let (s, ref hs) = jobs[i];
        let _ = parts[i].set(heads_attention(kv, layer, &seqs[s], hs.clone(), heads));
    });
    let total: usize = seqs.iter().map(|s| s.n).sum();
    let mut out = vec![0f32; total * heads * hd];
    let mut row0 = Vec::with_capacity(seqs.len());
    let mut r = 0;
    for s in seqs {
        row0.push(r);
        r += s.n;
    }
    for ((s, hs), part) in jobs.iter().zip(&parts) {
        let part = part.get().expect("every job ran");
        let width = hs.len() * hd;
        for t in 0..seqs[*s].n {
            let dst = ((row0[*s] + t) * heads + hs.start) * hd;
            out[dst..dst + width].copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
    out
}

/// Heads `hs` of one sequence: `[n, hs.len()·head_dim]`, for the cache's
/// element type.
fn heads_attention(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    hs: Range<usize>,
    heads: usize,
) -> Vec<f32> {
    match kv.dtype() {
        KvDtype::F32 => heads_attention_as::<f32>(kv, layer, seq, hs, heads),
        KvDtype::Bf16 => heads_attention_as::<bf16>(kv, layer, seq, hs, heads),
    }
}

/// Compiled a second time with AVX2 and FMA enabled, used when the machine
/// has them; the arithmetic is the same lane for lane, so both give the same
/// bits.
fn heads_attention_as<T: KvElem>(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    hs: Range<usize>,
    heads: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::quant::Isa::selected() >= super::quant::Isa::Avx2 {
        // SAFETY: the AVX2 path is selected only where AVX2 and FMA exist.
        return unsafe { heads_attention_avx2::<T>(kv, layer, seq, hs, heads) };
    }
    heads_attention_body::<T>(kv, layer, seq, hs, heads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn heads_attention_avx2<T: KvElem>(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    hs: Range<usize>,
    heads: usize,
) -> Vec<f32> {
    heads_attention_body::<T>(kv, layer, seq, hs, heads)
}

/// The online softmax, a block of keys at a time, for each head in turn:
/// all of a block's scores first (four keys at a time, so four sums are in
/// flight), then one rescale of the head's running sum if its maximum
/// moved, the block's exponentials together, then the block's weighted
/// values, eight dimensions at a time so those eight sums stay in a
/// register across the block's keys (each sum still takes the keys in
/// order).
#[inline(always)]
fn heads_attention_body<T: KvElem>(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    hs: Range<usize>,
    heads: usize,
) -> Vec<f32> {
    let hd = kv.head_dim();
    let bs = kv.block_size();
    let group = heads / kv.kv_heads();
    let scale = 1.0 / (hd as f32).sqrt();
    let width = hs.len() * hd;
    let mut out = vec![0f32; seq.n * width];
    let mut weights = vec![0f32; bs];
    let mut max = vec![f32::NEG_INFINITY; hs.len()];
    let mut denom = vec![0f32; hs.len()];
    for t in 0..seq.n {
        let q = &seq.q[(t * heads + hs.start) * hd..(t * heads + hs.end) * hd];
        let acc = &mut out[t * width..(t + 1) * width];
        max.fill(f32::NEG_INFINITY);
        denom.fill(0.0);
        // Causal: the query at position start+t sees keys 0..=start+t.
        let visible = seq.start + t + 1;
        for (bi, &block) in seq.table[..visible.div_ceil(bs)].iter().enumerate() {
            let slots = (visible - bi * bs).min(bs);
            let weights = &mut weights[..slots];
            for (i, h) in hs.clone().enumerate() {
                let (keys, values) = kv.block::<T>(layer, block, h / group);
                let acc = &mut acc[i * hd..(i + 1) * hd];
                scores(
                    &q[i * hd..(i + 1) * hd],
                    &keys[..slots * hd],
                    scale,
                    weights,
                );
                let block_max = weights.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                if block_max > max[i] {
                    let c = exp(max[i] - block_max);
                    denom[i] *= c;
                    acc.iter_mut().for_each(|a| *a *= c);
                    max[i] = block_max;
                }
                exp_shifted(weights, max[i]);
                denom[i] += weights.iter().sum::<f32>();
                add_weighted(acc, weights, &values[..slots * hd]);
            }
        }
        for (acc, d) in acc.chunks_exact_mut(hd).zip(&denom) {
            let inv = 1.0 / d;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    }
    out
}

/// `out[j] = (q · keys[j])·scale` for the `out.len()` keys of `keys`.
#[inline(always)]
fn scores<T: KvElem>(q: &[f32], keys: &[T], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let mut rows = keys.chunks_exact(4 * hd);
    let mut j = 0;
    for four in rows.by_ref() {
        let k: [&[T]; 4] = std::array::from_fn(|i| &four[i * hd..(i + 1) * hd]);
        let d = dot4(q, k);
        for i in 0..4 {
            out[j + i] = d[i] * scale;
        }
        j += 4;
    }
    for key in rows.remainder().chunks_exact(hd) {
        out[j] = dot(q, key) * scale;
        j += 1;
    }
}

/// Four keys' dot products with `q`, as [`dot`] computes each.
#[inline(always)]
fn dot4<T: KvElem>(q: &[f32], k: [&[T]; 4]) -> [f32; 4] {
    if !q.len().is_multiple_of(8) {
        return k.map(|k| dot(q, k));
    }
    let mut lanes = [[0f32; 8]; 4];
    for (c, x) in q.chunks_exact(8).enumerate() {
        for (l, k) in lanes.iter_mut().zip(k) {
            let y = &k[c * 8..c * 8 + 8];
            for i in 0..8 {
                l[i] += x[i] * y[i].to_f32();
            }
        }
    }
    lanes.map(|l| l.iter().sum())
}

/// `s[j] = exp(s[j] - max)`, eight at a time.
#[inline(always)]
fn exp_shifted(s: &mut [f32], max: f32) {
    let mut chunks = s.chunks_exact_mut(8);
    for c in chunks.by_ref() {
        for v in c.iter_mut() {
            *v = exp(*v - max);
        }
    }
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
    }
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
        // Widened first, in a loop of its own: mixed with the adds, the
        // compiler gathers bf16 values one at a time.
        let mut wide = [[0f32; 8]; G];
        for (d, s) in wide.as_flattened_mut().iter_mut().zip(row) {
            *d = s.to_f32();
        }
        for (l, vs) in lanes.iter_mut().zip(&wide) {
            for i in 0..8 {
                l[i] += p * vs[i];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores four keys at a time equal one at a time, bit for bit.
    #[test]
    fn dot4_equals_dot() {
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let keys: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        let k: [&[f32]; 4] = std::array::from_fn(|i| &keys[i * 64..(i + 1) * 64]);
        assert_eq!(dot4(&q, k), k.map(|k| dot(&q, k)));
    }
}
