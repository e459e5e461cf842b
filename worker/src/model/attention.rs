//! Causal attention over the paged KV cache, on CPU, for a batch of
//! sequences of different lengths, with an online softmax, reading each
//! block in place (no gather into a contiguous tensor). Grouped-query aware:
//! query head h reads KV head h / (heads / kv_heads).
//!
//! A query's keys are taken in chunks of [`CHUNK_BLOCKS`] blocks: each chunk
//! gets its own running maximum, sum and weighted values, and the chunks are
//! merged in order. The chunks depend on the sequence alone, so a query's
//! arithmetic is the same whatever else is in the batch, and the same
//! whether its chunks ran one after another or side by side:
//! - a decoding sequence (one query) is split into jobs of consecutive
//!   chunks, all heads at once: several per sequence when there are few
//!   sequences, so every thread has work even for a single long one; one
//!   when there are many. A job reads each block's keys and values for all
//!   heads as one contiguous run, which the hardware prefetcher follows;
//! - a sequence with several queries (prefill) is split by runs of heads,
//!   each job walking its queries and chunks in order.

use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use crate::kv::{BlockId, KvDtype, KvElem, PagedKv};
use crate::pool;

use super::math::exp;

/// Blocks per chunk of keys (64 tokens with 16-token blocks).
pub const CHUNK_BLOCKS: usize = 4;

/// The largest KV block, in tokens, attention takes (a block's scores live
/// on the stack).
pub const MAX_BLOCK_SIZE: usize = 256;

/// One sequence's queries for this step.
pub struct AttnSeq<'a> {
    /// `[n, heads·head_dim]` for positions `start..start+n`.
    pub q: &'a [f32],
    pub n: usize,
    pub start: usize,
    /// Covers positions `0..start+n`, all already written for this layer.
    pub table: &'a [BlockId],
}

/// The softmax state of some heads for one query over some keys: per head
/// the running maximum score, the sum of `exp(score - max)`, and the values
/// weighted by those, `[heads, head_dim]`, not yet divided by the sum.
#[derive(Clone)]
struct Partial {
    max: Vec<f32>,
    denom: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    fn new(heads: usize, hd: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; heads],
            denom: vec![0.0; heads],
            acc: vec![0.0; heads * hd],
        }
    }

    fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.denom.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Folds in `other`, the state over the keys that follow.
    #[inline(always)]
    fn merge(&mut self, other: &Partial) {
        let hd = self.acc.len() / self.max.len();
        for h in 0..self.max.len() {
            let max = self.max[h].max(other.max[h]);
            let (a, b) = (exp(self.max[h] - max), exp(other.max[h] - max));
            self.max[h] = max;
            self.denom[h] = self.denom[h] * a + other.denom[h] * b;
            let acc = &mut self.acc[h * hd..(h + 1) * hd];
            for (x, y) in acc.iter_mut().zip(&other.acc[h * hd..(h + 1) * hd]) {
                *x = *x * a + y * b;
            }
        }
    }

    /// The attention output, `[heads, head_dim]`, into `out`.
    fn finish(&self, out: &mut [f32]) {
        let hd = self.acc.len() / self.max.len();
        for ((o, a), d) in out
            .chunks_exact_mut(hd)
            .zip(self.acc.chunks_exact(hd))
            .zip(&self.denom)
        {
            let inv = 1.0 / d;
            o.iter_mut().zip(a).for_each(|(o, a)| *o = a * inv);
        }
    }
}

/// What one job does.
enum Job {
    /// Chunks `cs` of a decoding sequence's keys, every head.
    Chunks { seq: usize, cs: Range<usize> },
    /// Heads `hs` of a sequence with several queries, every chunk.
    Heads { seq: usize, hs: Range<usize> },
}

/// What a job returns.
enum Part {
    /// From the sequence's first chunk: the merged state. From a later one:
    /// the state of each chunk, still to be merged in order.
    Chunks(Vec<Partial>),
    /// `[n, hs.len()·head_dim]`, final.
    Heads(Vec<f32>),
}

/// Returns `[Σn, heads·head_dim]`, sequences in order.
pub fn attend(kv: &PagedKv, layer: usize, heads: usize, seqs: &[AttnSeq<'_>]) -> Vec<f32> {
    let hd = kv.head_dim();
    let span = CHUNK_BLOCKS * kv.block_size();
    let wanted = 4 * pool::threads();
    let decodes = seqs.iter().filter(|s| s.n == 1).count().max(1);
    let prefills = seqs.iter().filter(|s| s.n > 1).count().max(1);
    let mut jobs = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        if s.n == 1 {
            // Few sequences: several jobs each. Many: one each, so a job
            // streams the whole sequence and merges its chunks itself.
            let chunks = (s.start + 1).div_ceil(span);
            let pieces = wanted.div_ceil(decodes).clamp(1, chunks);
            jobs.extend((0..pieces).map(|i| Job::Chunks {
                seq,
                cs: i * chunks / pieces..(i + 1) * chunks / pieces,
            }));
        } else {
            let runs = wanted.div_ceil(prefills).clamp(1, heads);
            jobs.extend((0..runs).map(|i| Job::Heads {
                seq,
                hs: i * heads / runs..(i + 1) * heads / runs,
            }));
        }
    }
    let parts: Vec<OnceLock<Part>> = jobs.iter().map(|_| OnceLock::new()).collect();
    pool::run(jobs.len(), |i| {
        let part = match jobs[i] {
            Job::Chunks { seq, ref cs } => {
                Part::Chunks(chunks_job(kv, layer, &seqs[seq], cs.clone(), heads))
            }
            Job::Heads { seq, ref hs } => {
                Part::Heads(heads_job(kv, layer, &seqs[seq], hs.clone(), heads))
            }
        };
        let _ = parts[i].set(part);
    });
    let total: usize = seqs.iter().map(|s| s.n).sum();
    let mut out = vec![0f32; total * heads * hd];
    let mut row0 = Vec::with_capacity(seqs.len());
    let mut r = 0;
    for s in seqs {
        row0.push(r);
        r += s.n;
    }
    // A decoding sequence's jobs are adjacent and in chunk order; its state
    // is final after its last.
    let mut state: Option<Partial> = None;
    for (i, (job, part)) in jobs.iter().zip(&parts).enumerate() {
        match (job, part.get().expect("every job ran")) {
            (Job::Chunks { seq, cs }, Part::Chunks(ps)) => {
                for p in ps {
                    match &mut state {
                        Some(st) if cs.start > 0 => st.merge(p),
                        _ => state = Some(p.clone()),
                    }
                }
                let last =
                    !matches!(jobs.get(i + 1), Some(Job::Chunks { seq: next, .. }) if next == seq);
                if last {
                    let dst = row0[*seq] * heads * hd;
                    let st = state.take().expect("a sequence has a chunk");
                    st.finish(&mut out[dst..dst + heads * hd]);
                }
            }
            (Job::Heads { seq, hs }, Part::Heads(o)) => {
                let width = hs.len() * hd;
                for t in 0..seqs[*seq].n {
                    let dst = ((row0[*seq] + t) * heads + hs.start) * hd;
                    out[dst..dst + width].copy_from_slice(&o[t * width..(t + 1) * width]);
                }
            }
            _ => unreachable!("a job's part is of its kind"),
        }
    }
    out
}

/// Chunks `cs` of a decoding sequence's keys, every head: merged in order
/// when they start the sequence, one state per chunk when they do not.
fn chunks_job(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    cs: Range<usize>,
    heads: usize,
) -> Vec<Partial> {
    let hd = kv.head_dim();
    let visible = seq.start + 1;
    let blocks = visible.div_ceil(kv.block_size());
    let from_start = cs.start == 0;
    let mut states = Vec::new();
    let mut total = Partial::new(heads, hd);
    let mut part = Partial::new(heads, hd);
    for c in cs {
        let b0 = c * CHUNK_BLOCKS;
        let b1 = (b0 + CHUNK_BLOCKS).min(blocks);
        part.reset();
        Chunk {
            kv,
            layer,
            q: seq.q,
            hs: 0..heads,
            heads,
            blocks: &seq.table[b0..b1],
            first: b0,
            visible,
        }
        .run(&mut part);
        if from_start {
            total.merge(&part);
        } else {
            states.push(part.clone());
        }
    }
    if from_start {
        states.push(total);
    }
    states
}

/// Heads `hs` of a sequence, every query: `[n, hs.len()·head_dim]`.
fn heads_job(
    kv: &PagedKv,
    layer: usize,
    seq: &AttnSeq<'_>,
    hs: Range<usize>,
    heads: usize,
) -> Vec<f32> {
    let hd = kv.head_dim();
    let width = hs.len() * hd;
    let mut out = vec![0f32; seq.n * width];
    let mut total = Partial::new(hs.len(), hd);
    let mut part = Partial::new(hs.len(), hd);
    for t in 0..seq.n {
        let q = &seq.q[t * heads * hd..(t + 1) * heads * hd];
        // Causal: the query at position start+t sees keys 0..=start+t.
        let visible = seq.start + t + 1;
        let blocks = visible.div_ceil(kv.block_size());
        total.reset();
        for b0 in (0..blocks).step_by(CHUNK_BLOCKS) {
            let b1 = (b0 + CHUNK_BLOCKS).min(blocks);
            part.reset();
            Chunk {
                kv,
                layer,
                q,
                hs: hs.clone(),
                heads,
                blocks: &seq.table[b0..b1],
                first: b0,
                visible,
            }
            .run(&mut part);
            total.merge(&part);
        }
        total.finish(&mut out[t * width..(t + 1) * width]);
    }
    out
}

/// One query's heads `hs` (of `q`, `[heads, head_dim]`) over one chunk of
/// keys: `blocks`, the first being the sequence's block `first`; only the
/// first `visible` positions count.
struct Chunk<'a> {
    kv: &'a PagedKv,
    layer: usize,
    q: &'a [f32],
    hs: Range<usize>,
    heads: usize,
    blocks: &'a [BlockId],
    first: usize,
    visible: usize,
}

impl Chunk<'_> {
    /// The online softmax over the chunk, into `state`, fresh.
    fn run(&self, state: &mut Partial) {
        match self.kv.dtype() {
            KvDtype::F32 => chunk_as::<f32>(self, state),
            KvDtype::Bf16 => chunk_as::<bf16>(self, state),
        }
    }
}

/// Compiled a second time with AVX2 and FMA enabled, used when the machine
/// has them; the arithmetic is the same lane for lane, so both give the same
/// bits.
fn chunk_as<T: KvElem>(c: &Chunk<'_>, state: &mut Partial) {
    #[cfg(target_arch = "x86_64")]
    if super::quant::Isa::selected() >= super::quant::Isa::Avx2 {
        // SAFETY: the AVX2 path is selected only where AVX2 and FMA exist.
        return unsafe { chunk_avx2::<T>(c, state) };
    }
    chunk_body::<T>(c, state)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: KvElem>(c: &Chunk<'_>, state: &mut Partial) {
    chunk_body::<T>(c, state)
}

/// A block of keys at a time, each head in turn: all of the block's scores
/// first, then one rescale of the head's running sum if its maximum moved,
/// the block's exponentials together, then the block's weighted values,
/// eight dimensions at a time so those eight sums stay in a register across
/// the block's keys (each sum still takes the keys in order).
#[inline(always)]
fn chunk_body<T: KvElem>(c: &Chunk<'_>, state: &mut Partial) {
    let Chunk {
        kv,
        layer,
        q,
        ref hs,
        heads,
        blocks,
        first,
        visible,
    } = *c;
    let hd = kv.head_dim();
    let bs = kv.block_size();
    let group = heads / kv.kv_heads();
    let scale = 1.0 / (hd as f32).sqrt();
    assert!(
        bs <= MAX_BLOCK_SIZE,
        "blocks of {bs} tokens > {MAX_BLOCK_SIZE}"
    );
    let mut weights = [0f32; MAX_BLOCK_SIZE];
    for (bi, &block) in blocks.iter().enumerate() {
        let slots = (visible - (first + bi) * bs).min(bs);
        let weights = &mut weights[..slots];
        for (i, h) in hs.clone().enumerate() {
            let (keys, values) = kv.block::<T>(layer, block, h / group);
            let acc = &mut state.acc[i * hd..(i + 1) * hd];
            scores(
                &q[h * hd..(h + 1) * hd],
                &keys[..slots * hd],
                scale,
                weights,
            );
            let block_max = weights.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let max = &mut state.max[i];
            if block_max > *max {
                let c = exp(*max - block_max);
                state.denom[i] *= c;
                acc.iter_mut().for_each(|a| *a *= c);
                *max = block_max;
            }
            exp_shifted(weights, *max);
            state.denom[i] += weights.iter().sum::<f32>();
            add_weighted(acc, weights, &values[..slots * hd]);
        }
    }
}

/// `out[j] = (q · keys[j])·scale` for the `out.len()` keys of `keys`. The
/// keys' sums are independent, so the core runs several at once.
#[inline(always)]
fn scores<T: KvElem>(q: &[f32], keys: &[T], scale: f32, out: &mut [f32]) {
    for (s, key) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
        *s = dot(q, key) * scale;
    }
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

    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HD: usize = 16;
    const BS: usize = 8;

    /// A pseudo-random value in [-1, 1) for (i, salt).
    fn value(i: usize, salt: usize) -> f32 {
        let mut x = (i as u64) << 16 ^ salt as u64 ^ 0x9E37_79B9_7F4A_7C15;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 33;
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Key element i of sequence s: growing with the position, so that
    /// later chunks raise the running maximum and every merge rescales.
    fn key(s: usize, i: usize) -> f32 {
        value(i, 2 * s) * (1.0 + (i / (KV_HEADS * HD)) as f32 / 200.0)
    }

    /// A pool holding `lens[s]` tokens for sequence s, in blocks laid out in
    /// reverse (so a sequence's blocks are not adjacent), plus its table.
    fn pool(lens: &[usize]) -> (PagedKv, Vec<Vec<BlockId>>) {
        let per: Vec<usize> = lens.iter().map(|l| l.div_ceil(BS)).collect();
        let total: usize = per.iter().sum();
        let mut kv = PagedKv::new(1, total, BS, KV_HEADS, HD, KvDtype::F32);
        let mut next = total;
        let mut tables = Vec::new();
        for (s, (&len, &n)) in lens.iter().zip(&per).enumerate() {
            let table: Vec<BlockId> = (0..n)
                .map(|_| {
                    next -= 1;
                    next as BlockId
                })
                .collect();
            let k: Vec<f32> = (0..len * KV_HEADS * HD).map(|i| key(s, i)).collect();
            let v: Vec<f32> = (0..len * KV_HEADS * HD)
                .map(|i| value(i, 2 * s + 1))
                .collect();
            kv.write(0, &table, 0, &k, &v);
            tables.push(table);
        }
        (kv, tables)
    }

    /// Plain f64 attention of query `q` (`[HEADS, HD]`) at position `pos` of
    /// sequence s.
    fn reference(s: usize, q: &[f32], pos: usize) -> Vec<f64> {
        let mut out = vec![0f64; HEADS * HD];
        for h in 0..HEADS {
            let kvh = h / (HEADS / KV_HEADS);
            let key = |j: usize, d: usize| key(s, (j * KV_HEADS + kvh) * HD + d) as f64;
            let val = |j: usize, d: usize| value((j * KV_HEADS + kvh) * HD + d, 2 * s + 1) as f64;
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..HD)
                        .map(|d| q[h * HD + d] as f64 * key(j, d))
                        .sum::<f64>()
                        / (HD as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..HD {
                out[h * HD + d] = (0..=pos).map(|j| w[j] * val(j, d)).sum::<f64>() / sum;
            }
        }
        out
    }

    /// Decodes with several chunks, a prefill crossing chunks, and grouped
    /// query heads, against f64.
    #[test]
    fn matches_an_f64_reference() {
        let lens = [200, 1, 70, 133];
        let (kv, tables) = pool(&lens);
        // Sequences 0, 1 and 3 decode their last token; 2 prefills all 70.
        let ns = [1, 1, 70, 1];
        let qs: Vec<Vec<f32>> = ns
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n * HEADS * HD).map(|i| value(i, 50 + s)).collect())
            .collect();
        let seqs: Vec<AttnSeq<'_>> = (0..lens.len())
            .map(|s| AttnSeq {
                q: &qs[s],
                n: ns[s],
                start: lens[s] - ns[s],
                table: &tables[s],
            })
            .collect();
        let out = attend(&kv, 0, HEADS, &seqs);
        let mut row = 0;
        for s in 0..lens.len() {
            for t in 0..ns[s] {
                let q = &qs[s][t * HEADS * HD..(t + 1) * HEADS * HD];
                let want = reference(s, q, lens[s] - ns[s] + t);
                let got = &out[row * HEADS * HD..(row + 1) * HEADS * HD];
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "seq {s} query {t}: {g} vs {w}"
                    );
                }
                row += 1;
            }
        }
    }

    /// A decoding sequence's result does not depend on what else is in the
    /// batch, nor on how its chunks were split into jobs, bit for bit; and
    /// a prefill's last query equals the same position decoded.
    #[test]
    fn a_sequence_gets_the_same_bits_alone_and_batched() {
        let lens = [300, 300, 90, 40, 300];
        let (kv, tables) = pool(&lens);
        let q: Vec<f32> = (0..HEADS * HD).map(|i| value(i, 77)).collect();
        let decode = |s: usize| AttnSeq {
            q: &q,
            n: 1,
            start: lens[s] - 1,
            table: &tables[s],
        };
        let alone = attend(&kv, 0, HEADS, &[decode(0)]);
        let batch: Vec<AttnSeq<'_>> = (0..lens.len()).map(decode).collect();
        let batched = attend(&kv, 0, HEADS, &batch);
        assert_eq!(alone, batched[..HEADS * HD]);
        // Sequence 4's last position as the last query of a 3-token prefill.
        let mut q3 = vec![0f32; 3 * HEADS * HD];
        q3[2 * HEADS * HD..].copy_from_slice(&q);
        let prefill = AttnSeq {
            q: &q3,
            n: 3,
            start: lens[4] - 3,
            table: &tables[4],
        };
        let as_prefill = attend(&kv, 0, HEADS, &[prefill]);
        assert_eq!(as_prefill[2 * HEADS * HD..], batched[4 * HEADS * HD..]);
    }
}
