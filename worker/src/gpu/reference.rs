//! Plain f64 implementations of what each CUDA kernel computes, on the same
//! layouts: the yardstick of the GPU check (`aquila gpu-check`), and tested
//! here against the CPU engine's own code, so the yardstick itself is right
//! on a machine without a GPU.

use super::launch::StepIndex;

/// `x += delta` (when given), then `out[r] = x[rows[r]] / rms · w`.
/// Returns (x after the add, out).
pub fn rms_norm(
    x: &[f32],
    delta: Option<&[f32]>,
    rows: &[u32],
    w: &[f32],
    eps: f32,
) -> (Vec<f64>, Vec<f64>) {
    let dim = w.len();
    let x: Vec<f64> = match delta {
        Some(d) => x
            .iter()
            .zip(d)
            .map(|(a, b)| *a as f64 + *b as f64)
            .collect(),
        None => x.iter().map(|&a| a as f64).collect(),
    };
    let mut out = Vec::with_capacity(rows.len() * dim);
    for &r in rows {
        let row = &x[r as usize * dim..(r as usize + 1) * dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| v * inv * *w as f64));
    }
    (x, out)
}

/// Rotary embedding of `x` (`[tokens][heads][head_dim]`), angles in f64.
pub fn rope(
    x: &[f32],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f64,
    interleaved: bool,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let v = &mut out[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            for i in 0..half {
                let angle = p as f64 * theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let (a, b) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * angle.cos() - x1 * angle.sin();
                v[b] = x0 * angle.sin() + x1 * angle.cos();
            }
        }
    }
    out
}

/// Causal attention of every row of `ix` over its sequence's keys
/// `0..=position`, read from one layer's paged cache (`[block][kv_head]
/// [slot][head_dim]`). `q` is `[rows][heads][head_dim]`; so is the result.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    cache_k: &[f32],
    cache_v: &[f32],
    ix: &StepIndex,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Vec<f64> {
    let scale = 1.0 / (head_dim as f64).sqrt();
    let group = heads / kv_heads;
    let mut out = vec![0f64; q.len()];
    for (r, (&seq, &pos)) in ix.row_seq.iter().zip(&ix.positions).enumerate() {
        let table =
            &ix.tables[seq as usize * ix.table_stride..(seq as usize + 1) * ix.table_stride];
        for h in 0..heads {
            let qr = &q[(r * heads + h) * head_dim..(r * heads + h + 1) * head_dim];
            let at = |k: usize| {
                let blk = table[k / block_size] as usize;
                ((blk * kv_heads + h / group) * block_size + k % block_size) * head_dim
            };
            let scores: Vec<f64> = (0..=pos as usize)
                .map(|k| {
                    let kr = &cache_k[at(k)..at(k) + head_dim];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let o = &mut out[(r * heads + h) * head_dim..(r * heads + h + 1) * head_dim];
            for (k, w) in weights.iter().enumerate() {
                let vr = &cache_v[at(k)..at(k) + head_dim];
                o.iter_mut()
                    .zip(vr)
                    .for_each(|(o, v)| *o += w / sum * *v as f64);
            }
        }
    }
    out
}

/// `silu(gate) · up`.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect()
}

/// Rows of `table` (`[vocab_len][hidden]`, ids from `vocab_start`); zeros
/// for ids this rank does not hold.
pub fn embedding(ids: &[u32], table: &[f32], vocab_start: u32, hidden: usize) -> Vec<f64> {
    let held = table.len() / hidden;
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        match id.checked_sub(vocab_start).filter(|&i| (i as usize) < held) {
            Some(i) => out.extend(
                table[i as usize * hidden..(i as usize + 1) * hidden]
                    .iter()
                    .map(|&v| v as f64),
            ),
            None => out.extend(std::iter::repeat_n(0.0, hidden)),
        }
    }
    out
}

/// Columns `from..from + len` of each row of `rows` (rows `width` long): a
/// part of a fused product's output (`[q | k | v]`, `[gate | up]`).
#[cfg(feature = "cuda")]
pub fn columns(rows: &[f32], width: usize, from: usize, len: usize) -> Vec<f32> {
    rows.chunks(width)
        .flat_map(|r| r[from..from + len].iter().copied())
        .collect()
}

/// Sequences for a paged-attention check: each has `cached` tokens already
/// in the cache and `new` tokens in the step, on blocks given out in a
/// shuffled order (so neighbouring blocks in a table are far apart).
#[cfg(feature = "cuda")]
pub struct PagedCase {
    pub lens: Vec<(usize, usize)>,
    pub tables: Vec<Vec<u32>>,
    pub num_blocks: usize,
    pub block_size: usize,
    zeros: Vec<u32>,
}

#[cfg(feature = "cuda")]
impl PagedCase {
    /// `lens` as (cached, new) per sequence; a few blocks are left unused.
    pub fn new(lens: &[(usize, usize)], block_size: usize, rng: &mut impl rand::Rng) -> Self {
        let per_seq: Vec<usize> = lens
            .iter()
            .map(|(c, n)| (c + n).div_ceil(block_size))
            .collect();
        let num_blocks = per_seq.iter().sum::<usize>() + 5;
        let mut order: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut next = 0;
        let tables = per_seq
            .iter()
            .map(|&k| {
                next += k;
                order[next - k..next].to_vec()
            })
            .collect();
        let longest = lens.iter().map(|(c, n)| c + n).max().unwrap_or(0);
        PagedCase {
            lens: lens.to_vec(),
            tables,
            num_blocks,
            block_size,
            zeros: vec![0; longest],
        }
    }

    /// Every position of every sequence (cached and new), as the steps that
    /// wrote the cache would have had them; every row's logits.
    pub fn fill(&self) -> StepIndex {
        self.index(|c, n| (0, c + n))
    }

    /// The step: each sequence's new tokens, attending their whole prefix.
    pub fn step(&self) -> StepIndex {
        self.index(|c, n| (c, n))
    }

    /// The step of sequence `s` alone.
    pub fn step_of(&self, s: usize) -> StepIndex {
        let (c, n) = self.lens[s];
        let seq = crate::model::SeqInput {
            tokens: &self.zeros[..n],
            start: c,
            table: &self.tables[s],
        };
        super::launch::step_index(&[seq], self.block_size, true)
    }

    fn index(&self, range: impl Fn(usize, usize) -> (usize, usize)) -> StepIndex {
        let seqs: Vec<crate::model::SeqInput<'_>> = self
            .lens
            .iter()
            .zip(&self.tables)
            .map(|(&(c, n), table)| {
                let (start, len) = range(c, n);
                crate::model::SeqInput {
                    tokens: &self.zeros[..len],
                    start,
                    table,
                }
            })
            .collect();
        super::launch::step_index(&seqs, self.block_size, true)
    }

    /// The keys (or values) of each token of `ix` read back from a cache
    /// `[block][kv_head][slot][head_dim]`: rows `[tokens][kv_heads][head_dim]`.
    pub fn gather(
        &self,
        ix: &StepIndex,
        cache: &[f32],
        kv_heads: usize,
        head_dim: usize,
    ) -> Vec<f32> {
        let bs = self.block_size;
        let mut rows = Vec::with_capacity(ix.slots.len() * kv_heads * head_dim);
        for &slot in &ix.slots {
            let (blk, off) = (slot as usize / bs, slot as usize % bs);
            for h in 0..kv_heads {
                let at = ((blk * kv_heads + h) * bs + off) * head_dim;
                rows.extend_from_slice(&cache[at..at + head_dim]);
            }
        }
        rows
    }
}

/// The largest |a − b| relative to the largest |b| (1 when b is all zeros).
pub fn max_rel_error(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared lengths");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()))
        / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeStyle;
    use crate::gpu::launch::step_index;
    use crate::kv::{KvDtype, PagedKv};
    use crate::model::SeqInput;
    use crate::model::attention::{AttnSeq, attend};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The reference attention against the CPU engine's paged attention:
    /// grouped-query heads, a prefill chunk after cached tokens and a
    /// decode, blocks out of order.
    #[test]
    fn reference_attention_matches_the_cpu_engine() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (heads, kv_heads, hd, bs, blocks) = (8, 2, 64, 16, 12);
        let mut kv = PagedKv::new(1, blocks, bs, kv_heads, hd, KvDtype::F32);
        let (t0, t1) = ([5u32, 2, 9], [7u32, 0]);
        // Sequence 0: 20 cached tokens, then a chunk of 6 (positions 20..26);
        // sequence 1: 30 cached tokens, then one decode token at 30.
        let lens = [(0usize, 20usize, 6usize, &t0[..]), (1, 30, 1, &t1[..])];
        for &(_, cached, new, table) in &lens {
            let n = cached + new;
            let (k, v) = (
                random(n * kv_heads * hd, &mut rng),
                random(n * kv_heads * hd, &mut rng),
            );
            kv.write(0, table, 0, &k, &v);
        }
        let q0 = random(6 * heads * hd, &mut rng);
        let q1 = random(heads * hd, &mut rng);
        let cpu = attend(
            &kv,
            0,
            heads,
            &[
                AttnSeq {
                    q: &q0,
                    n: 6,
                    start: 20,
                    table: &t0,
                },
                AttnSeq {
                    q: &q1,
                    n: 1,
                    start: 30,
                    table: &t1,
                },
            ],
        );
        let ids = [0u32; 6];
        let seqs = [
            SeqInput {
                tokens: &ids,
                start: 20,
                table: &t0,
            },
            SeqInput {
                tokens: &ids[..1],
                start: 30,
                table: &t1,
            },
        ];
        let ix = step_index(&seqs, bs, true);
        // The cache as the GPU holds it: the CPU pool's blocks, flattened.
        let (mut ck, mut cv) = (Vec::new(), Vec::new());
        for b in 0..blocks as u32 {
            for h in 0..kv_heads {
                let (k, v) = kv.block::<f32>(0, b, h);
                ck.extend_from_slice(k);
                cv.extend_from_slice(v);
            }
        }
        let q: Vec<f32> = q0.iter().chain(&q1).copied().collect();
        let reference = attention(&q, &ck, &cv, &ix, heads, kv_heads, hd, bs);
        let err = max_rel_error(&cpu, &reference);
        assert!(err < 1e-5, "CPU engine vs reference: {err}");
    }

    #[test]
    fn reference_rope_and_norm_match_the_cpu_engine() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (heads, hd) = (3, 64);
        let positions = [0u32, 5, 17, 300];
        let x = random(positions.len() * heads * hd, &mut rng);
        for (style, interleaved) in [(RopeStyle::Half, false), (RopeStyle::Interleaved, true)] {
            let rope = crate::model::Rope::new(hd, 512, 10000.0, style);
            let mut cpu = x.clone();
            let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
            rope.apply(&mut cpu, &pos, heads);
            let reference = super::rope(&x, &positions, heads, hd, 10000.0, interleaved);
            assert!(max_rel_error(&cpu, &reference) < 1e-5, "{style:?}");
        }
        let w = random(hd, &mut rng);
        let delta = random(x.len(), &mut rng);
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        let cpu =
            crate::model::RmsNorm::from_weights(w.clone(), 1e-5).forward(&summed, x.len() / hd);
        let rows: Vec<u32> = (0..(x.len() / hd) as u32).collect();
        let (after, reference) = rms_norm(&x, Some(&delta), &rows, &w, 1e-5);
        assert!(max_rel_error(&summed, &after) < 1e-6);
        assert!(max_rel_error(&cpu, &reference) < 1e-5);
    }

    #[test]
    fn reference_embedding_zeroes_ids_another_rank_holds() {
        let table = [1.0f32, 2.0, 3.0, 4.0]; // ids 10 and 11, hidden 2
        assert_eq!(
            embedding(&[11, 9, 10, 12], &table, 10, 2),
            [3.0, 4.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0]
        );
    }
}
