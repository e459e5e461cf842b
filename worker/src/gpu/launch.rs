//! Launch parameters of the CUDA kernels (`cuda/kernels.cu`) and the
//! per-step index arrays they read, as plain values: this is the part of
//! the GPU path that runs, and is tested, on any machine. Each function
//! states the assumption of the kernel it feeds.

use crate::error::{Result, WorkerError};
use crate::model::SeqInput;

/// Threads of the attention blocks: 4 warps share a split's keys.
pub const ATTENTION_THREADS: u32 = 128;
/// Rows of one prefill attention tile (`PREFILL_ROWS` in kernels.cu).
pub const PREFILL_ROWS: usize = 16;
/// The prefill kernel holds a tile's q and 32 keys and values in shared
/// memory as f32, for head_dim up to this.
pub const PREFILL_MAX_HEAD_DIM: usize = 128;
/// The kernel keeps `head_dim / 32` values per lane in registers, at most 8.
pub const MAX_HEAD_DIM: usize = 256;

/// A grid and block, as CUDA takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
}

/// One block per row with `width` elements: a block of up to 1024 threads, a
/// multiple of 32 (the block reduction in `rms_norm` relies on whole warps).
pub fn per_row(rows: usize, width: usize) -> Launch {
    let block = width.div_ceil(32).clamp(1, 32) as u32 * 32;
    Launch {
        grid: (rows as u32, 1, 1),
        block,
    }
}

/// `argmax_rows`: a block of `ARGMAX_THREADS` (256 in kernels.cu) per row.
pub fn argmax_rows(rows: usize) -> Launch {
    Launch {
        grid: (rows as u32, 1, 1),
        block: 256,
    }
}

/// An element-wise kernel over `n` elements (grid-stride loop): enough
/// blocks to fill the GPU, no more than the work needs.
pub fn elementwise(n: usize, sms: usize) -> Launch {
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).clamp(1, sms.max(1) * 8);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: THREADS as u32,
    }
}

/// How one step's attention is split over the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Keys per split.
    pub partition: usize,
    /// Splits of the longest row: the stride of the partial results.
    pub max_splits: usize,
    pub launch: Launch,
    pub merge: Launch,
    /// Set where the step has prefill chunks: the tiled kernel then runs
    /// every row (`prefill_attention`), and the split kernel none.
    pub prefill: Option<Launch>,
}

/// Splits keys so a step fills the GPU: with few rows (a decode batch of
/// one, a long context) a row's keys are spread over many blocks; with many
/// rows, long partitions keep the merge cheap. `max_keys` is the longest
/// row's key count (its position + 1).
pub fn attention_plan(
    rows: usize,
    heads: usize,
    head_dim: usize,
    max_keys: usize,
    sms: usize,
) -> Result<AttentionPlan> {
    if head_dim == 0 || !head_dim.is_multiple_of(32) || head_dim > MAX_HEAD_DIM {
        return Err(WorkerError::Config(format!(
            "head_dim = {head_dim}: the CUDA attention kernel needs a multiple of 32 up to {MAX_HEAD_DIM}"
        )));
    }
    if rows == 0 || heads == 0 || max_keys == 0 || heads > 65535 {
        return Err(WorkerError::Config(format!(
            "attention over {rows} rows, {heads} heads, {max_keys} keys"
        )));
    }
    // Aim at 4 blocks per SM; a split is never shorter than 64 keys (a
    // block's four warps get 16 each) nor longer than 1024.
    let want_blocks = sms.max(1) * 4;
    let row_blocks = rows * heads;
    let splits_wanted = want_blocks.div_ceil(row_blocks).max(1);
    let partition = max_keys
        .div_ceil(splits_wanted)
        .next_power_of_two()
        .clamp(64, 1024);
    let max_splits = max_keys.div_ceil(partition);
    Ok(AttentionPlan {
        partition,
        max_splits,
        // Rows in x, whose limit is 2³¹ − 1 blocks (y and z stop at 65535).
        launch: Launch {
            grid: (rows as u32, heads as u32, max_splits as u32),
            block: ATTENTION_THREADS,
        },
        merge: Launch {
            grid: (rows as u32, heads as u32, 1),
            block: (head_dim.div_ceil(32) * 32) as u32,
        },
        prefill: None,
    })
}

impl AttentionPlan {
    /// With the tiled prefill kernel where `ix` has a sequence of several
    /// new tokens (and head_dim fits it): one block per (tile, head). A
    /// step of decodes alone keeps the split kernel, which spreads a long
    /// context over many blocks.
    pub fn with_prefill(mut self, ix: &StepIndex, heads: usize, head_dim: usize) -> Self {
        let tiles = ix.tiles.len() / 2;
        let prefill = tiles < ix.ids.len() && head_dim <= PREFILL_MAX_HEAD_DIM;
        self.prefill = prefill.then_some(Launch {
            grid: (tiles as u32, heads as u32, 1),
            block: ATTENTION_THREADS,
        });
        self
    }
}

/// The index arrays of one step, flattened for the kernels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepIndex {
    /// Every new token, in batch order.
    pub ids: Vec<u32>,
    /// Its position in its sequence.
    pub positions: Vec<u32>,
    /// Its cache slot: block id × block_size + offset.
    pub slots: Vec<u32>,
    /// Its sequence (a row of `tables`).
    pub row_seq: Vec<u32>,
    /// Block tables, one row per sequence, padded to `table_stride`.
    pub tables: Vec<u32>,
    pub table_stride: usize,
    /// Rows whose logits are wanted (each sequence's last token, or all).
    pub logit_rows: Vec<u32>,
    /// Keys of the longest row.
    pub max_keys: usize,
    /// Prefill attention's tiles, as pairs (first row, rows): each
    /// sequence's rows in runs of up to `PREFILL_ROWS`.
    pub tiles: Vec<u32>,
}

/// Flattens a step's sequences. `all_logits` asks for every row's logits
/// instead of each sequence's last.
pub fn step_index(seqs: &[SeqInput<'_>], block_size: usize, all_logits: bool) -> StepIndex {
    let stride = seqs.iter().map(|s| s.table.len()).max().unwrap_or(0).max(1);
    let mut ix = StepIndex {
        table_stride: stride,
        ..StepIndex::default()
    };
    for (i, s) in seqs.iter().enumerate() {
        for first in (0..s.tokens.len()).step_by(PREFILL_ROWS) {
            let rows = PREFILL_ROWS.min(s.tokens.len() - first);
            ix.tiles
                .extend([(ix.ids.len() + first) as u32, rows as u32]);
        }
        for (j, &id) in s.tokens.iter().enumerate() {
            let p = s.start + j;
            ix.logit_rows
                .extend((all_logits || j + 1 == s.tokens.len()).then_some(ix.ids.len() as u32));
            ix.ids.push(id);
            ix.positions.push(p as u32);
            ix.slots
                .push(s.table[p / block_size] * block_size as u32 + (p % block_size) as u32);
            ix.row_seq.push(i as u32);
        }
        ix.max_keys = ix.max_keys.max(s.start + s.tokens.len());
        ix.tables.extend_from_slice(s.table);
        ix.tables.resize((i + 1) * stride, 0);
    }
    ix
}

/// Decode steps replayed as CUDA graphs. A graph fixes every launch's shape
/// and every buffer's address, so a decode batch runs as the smallest
/// captured batch size that holds it (the extra rows decode a dummy token
/// into a block of their own), its block tables padded to the longest a
/// sequence can have, and its attention planned for the next power of two
/// of its keys (rows with fewer keys leave the extra splits idle). One
/// graph per (batch size, key bucket) then serves every step of that shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphShape {
    /// The batch sizes captured: 1, 2, 4, then every 8 (as vLLM), up to the
    /// largest asked for.
    pub sizes: Vec<usize>,
    /// Block-table entries per sequence: a sequence's longest table.
    pub stride: usize,
    pub block_size: usize,
}

impl GraphShape {
    pub fn new(max_batch: usize, context: usize, block_size: usize) -> Self {
        let mut sizes: Vec<usize> = [1, 2, 4]
            .into_iter()
            .chain((1..).map(|i| 8 * i))
            .take_while(|&b| b < max_batch)
            .collect();
        if max_batch > 0 {
            sizes.push(max_batch);
        }
        GraphShape {
            sizes,
            stride: context.div_ceil(block_size.max(1)).max(1),
            block_size,
        }
    }

    pub fn max_batch(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// The captured size a decode batch of `batch` runs as, if any.
    pub fn batch_for(&self, batch: usize) -> Option<usize> {
        self.sizes
            .iter()
            .copied()
            .find(|&b| b >= batch && batch > 0)
    }

    /// Attention is planned for this many keys: the next power of two, at
    /// least 64 (one split's minimum).
    pub fn keys_for(max_keys: usize) -> usize {
        max_keys.next_power_of_two().max(64)
    }

    /// The key buckets a context of `context` tokens can reach.
    pub fn key_buckets(context: usize) -> impl Iterator<Item = usize> {
        let last = Self::keys_for(context.max(1));
        (6..).map(|p| 1usize << p).take_while(move |&k| k <= last)
    }

    /// Partial-result entries (rows × heads × splits) the largest graph's
    /// attention needs, so one scratch allocation, made before any capture,
    /// serves every graph (a graph must not see a buffer move).
    pub fn scratch_entries(
        &self,
        heads: usize,
        head_dim: usize,
        context: usize,
        sms: usize,
    ) -> usize {
        self.sizes
            .iter()
            .flat_map(|&rows| {
                Self::key_buckets(context).filter_map(move |keys| {
                    attention_plan(rows, heads, head_dim, keys, sms)
                        .ok()
                        .map(|p| rows * heads * p.max_splits)
                })
            })
            .max()
            .unwrap_or(0)
    }

    /// `ix` (a decode step: one token per sequence) padded to `rows` rows
    /// and this shape's table stride. Padding row r decodes token 0 at
    /// position 0 into slot 0 of `pad_block`, through a table of its own;
    /// every row's logits are computed. None if the step is not a decode
    /// step that fits (more rows than `rows`, a table longer than the
    /// stride).
    pub fn pad(&self, ix: &StepIndex, rows: usize, pad_block: u32) -> Option<StepIndex> {
        let real = ix.ids.len();
        let decode = ix.row_seq.iter().enumerate().all(|(i, &s)| s as usize == i)
            && ix.logit_rows.len() == real
            && ix.tables.len() == real * ix.table_stride;
        if !decode || real > rows || ix.table_stride > self.stride {
            return None;
        }
        let stride = self.stride;
        let mut tables = vec![0u32; rows * stride];
        for (s, t) in ix.tables.chunks(ix.table_stride).enumerate() {
            tables[s * stride..s * stride + t.len()].copy_from_slice(t);
        }
        for r in real..rows {
            tables[r * stride] = pad_block;
        }
        let pad = |v: &[u32], with: &dyn Fn(usize) -> u32| {
            v.iter()
                .copied()
                .chain((real..rows).map(with))
                .collect::<Vec<u32>>()
        };
        Some(StepIndex {
            ids: pad(&ix.ids, &|_| 0),
            positions: pad(&ix.positions, &|_| 0),
            slots: pad(&ix.slots, &|_| pad_block * self.block_size as u32),
            row_seq: pad(&ix.row_seq, &|r| r as u32),
            tables,
            table_stride: stride,
            logit_rows: (0..rows as u32).collect(),
            max_keys: ix.max_keys,
            tiles: (0..rows as u32).flat_map(|r| [r, 1]).collect(),
        })
    }
}

/// Element counts of one step's buffers (`Workspace` in cuda/model.rs) for
/// `tokens` tokens and `rows` logit rows, with this rank's widths `[hidden,
/// q, kv, mlp, vocab held]`: 4-byte `[x, qkv, o, gate_up, down, logits,
/// ids]` (the residual stream, the products' outputs, the logits and each
/// row's greedy pick), 16-bit `[xn, attn, act, xf]` (the products' inputs).
pub fn step_buffers(tokens: usize, rows: usize, widths: [usize; 5]) -> ([usize; 7], [usize; 4]) {
    let [h, qd, kvd, inter, held] = widths;
    let n = tokens;
    (
        [
            n * h,
            n * (qd + 2 * kvd),
            n * h,
            n * 2 * inter,
            n * h,
            rows * held,
            rows,
        ],
        [n * h, n * qd, n * inter, rows * h],
    )
}

/// Device bytes of those buffers.
pub fn step_buffer_bytes(tokens: usize, rows: usize, widths: [usize; 5]) -> usize {
    let (words, halves) = step_buffers(tokens, rows, widths);
    4 * words.iter().sum::<usize>() + 2 * halves.iter().sum::<usize>()
}

/// What is left for the KV cache on a GPU with `free` of `total` bytes
/// free now (the weights loaded): `utilization` of the whole, less what is
/// in use and `reserve` for the step buffers to come. None if nothing is
/// left.
pub fn kv_budget(free: usize, total: usize, utilization: f64, reserve: usize) -> Option<usize> {
    let used = total.saturating_sub(free);
    let allowed = (total as f64 * utilization) as usize;
    allowed
        .checked_sub(used)
        .and_then(|b| b.checked_sub(reserve))
        .filter(|&b| b > 0)
}

/// cuBLAS is column-major; our matrices are row-major. `Y[rows][out] =
/// X[rows][in] · W[out][in]ᵀ` is, read column-major, `Yᶜ(out × rows) =
/// Wᶜ(in × out)ᵀ · Xᶜ(in × rows)`: `gemm(T, N, m = out, n = rows, k = in,
/// A = W, lda = in, B = X, ldb = in, C = Y, ldc = out)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
}

pub fn gemm(rows: usize, input: usize, output: usize) -> Result<Gemm> {
    let fits = |v: usize| i32::try_from(v).ok().filter(|&v| v > 0);
    match (fits(rows), fits(input), fits(output)) {
        (Some(n), Some(k), Some(m)) => Ok(Gemm {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: m,
        }),
        _ => Err(WorkerError::Config(format!(
            "a {rows} × {input} by {output} × {input} product does not fit cuBLAS's 32-bit sizes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_row_blocks_are_whole_warps_up_to_1024() {
        assert_eq!(per_row(3, 576).block, 576);
        assert_eq!(per_row(3, 4096).block, 1024);
        assert_eq!(per_row(3, 10).block, 32);
        assert_eq!(per_row(7, 100).grid, (7, 1, 1));
        assert_eq!(per_row(1, 100).block, 128);
    }

    #[test]
    fn elementwise_fills_the_gpu_without_idle_blocks() {
        assert_eq!(elementwise(100, 132).grid.0, 1);
        assert_eq!(elementwise(256 * 10, 132).grid.0, 10);
        assert_eq!(elementwise(1 << 30, 132).grid.0, 132 * 8);
    }

    #[test]
    fn attention_splits_cover_every_key_and_fill_the_gpu() {
        for (rows, heads, keys) in [(1, 32, 4096), (1, 32, 1), (256, 32, 600), (4096, 32, 512)] {
            let p = attention_plan(rows, heads, 128, keys, 132).unwrap();
            // Every key of the longest row is in a split, and no split is empty.
            assert!(p.partition * p.max_splits >= keys);
            assert!(p.partition * (p.max_splits - 1) < keys);
            assert_eq!(
                p.launch.grid,
                (rows as u32, heads as u32, p.max_splits as u32)
            );
            assert!((64..=1024).contains(&p.partition));
            assert_eq!(p.merge.block, 128);
        }
        // One decoding sequence with a long context spreads over the SMs...
        let one = attention_plan(1, 32, 128, 4096, 132).unwrap();
        assert!(32 * one.max_splits >= 132, "{one:?}");
        // ... and a big batch keeps whole 1024-key partitions.
        let many = attention_plan(256, 32, 128, 1000, 132).unwrap();
        assert_eq!(many.max_splits, 1);
    }

    #[test]
    fn prefill_steps_take_the_tiled_kernel_in_runs_of_16_rows() {
        let table: Vec<u32> = (0..8).collect();
        let tokens = [7u32; 40];
        let seqs = [
            SeqInput {
                tokens: &tokens[..1],
                start: 9,
                table: &table,
            },
            SeqInput {
                tokens: &tokens[..35],
                start: 20,
                table: &table,
            },
        ];
        let ix = step_index(&seqs, 16, false);
        // The decode is a tile of one; the chunk of 35 is 16 + 16 + 3.
        assert_eq!(ix.tiles, [0, 1, 1, 16, 17, 16, 33, 3]);
        let plan = attention_plan(36, 8, 128, 55, 132).unwrap();
        let p = plan.with_prefill(&ix, 8, 128).prefill.unwrap();
        assert_eq!(p.grid, (4, 8, 1));
        assert_eq!(p.block, ATTENTION_THREADS);
        // Decodes alone, or heads too wide for its shared memory: the split kernel.
        let decode = step_index(&seqs[..1], 16, false);
        assert_eq!(plan.with_prefill(&decode, 8, 128).prefill, None);
        assert_eq!(plan.with_prefill(&ix, 8, 256).prefill, None);
    }

    #[test]
    fn attention_refuses_head_dims_the_kernel_cannot_hold() {
        for hd in [0, 48, 288] {
            let e = attention_plan(1, 8, hd, 10, 132).unwrap_err();
            assert!(e.to_string().contains(&format!("head_dim = {hd}")), "{e}");
        }
        assert!(attention_plan(1, 8, 64, 10, 132).is_ok());
        assert!(attention_plan(1, 8, 256, 10, 132).is_ok());
    }

    #[test]
    fn step_index_flattens_tables_slots_and_logit_rows() {
        let (t0, t1) = ([4u32, 9], [7u32]);
        let seqs = [
            // A prefill chunk at positions 14..18, spanning blocks 4 and 9.
            SeqInput {
                tokens: &[10, 11, 12, 13],
                start: 14,
                table: &t0,
            },
            // A decode at position 3 in block 7.
            SeqInput {
                tokens: &[20],
                start: 3,
                table: &t1,
            },
        ];
        let ix = step_index(&seqs, 16, false);
        assert_eq!(ix.ids, [10, 11, 12, 13, 20]);
        assert_eq!(ix.positions, [14, 15, 16, 17, 3]);
        assert_eq!(
            ix.slots,
            [4 * 16 + 14, 4 * 16 + 15, 9 * 16, 9 * 16 + 1, 7 * 16 + 3]
        );
        assert_eq!(ix.row_seq, [0, 0, 0, 0, 1]);
        assert_eq!(ix.table_stride, 2);
        assert_eq!(ix.tables, [4, 9, 7, 0]);
        assert_eq!(ix.logit_rows, [3, 4]);
        assert_eq!(ix.max_keys, 18);
        assert_eq!(ix.tiles, [0, 4, 4, 1]);
        assert_eq!(step_index(&seqs, 16, true).logit_rows, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn graph_sizes_cover_every_batch_up_to_the_largest() {
        let g = GraphShape::new(20, 2048, 16);
        assert_eq!(g.sizes, [1, 2, 4, 8, 16, 20]);
        assert_eq!(g.stride, 128);
        assert_eq!(
            (1..=21).map(|b| g.batch_for(b)).collect::<Vec<_>>(),
            [
                1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20
            ]
            .map(Some)
            .into_iter()
            .chain([None])
            .collect::<Vec<_>>()
        );
        assert_eq!(g.batch_for(0), None);
        assert_eq!(GraphShape::new(256, 2048, 16).sizes.len(), 3 + 32);
        assert_eq!(GraphShape::new(1, 100, 16).sizes, [1]);
        assert!(GraphShape::new(0, 100, 16).sizes.is_empty());
        assert_eq!(GraphShape::new(3, 100, 16).sizes, [1, 2, 3]);
    }

    #[test]
    fn graph_key_buckets_are_powers_of_two_from_64() {
        assert_eq!(GraphShape::keys_for(1), 64);
        assert_eq!(GraphShape::keys_for(64), 64);
        assert_eq!(GraphShape::keys_for(65), 128);
        assert_eq!(
            GraphShape::key_buckets(2000).collect::<Vec<_>>(),
            [64, 128, 256, 512, 1024, 2048]
        );
        // The scratch for the largest graph holds every graph's partials.
        let g = GraphShape::new(16, 2048, 16);
        let most = g.scratch_entries(32, 128, 2048, 132);
        for &rows in &g.sizes {
            for keys in GraphShape::key_buckets(2048) {
                let p = attention_plan(rows, 32, 128, keys, 132).unwrap();
                assert!(rows * 32 * p.max_splits <= most);
            }
        }
    }

    #[test]
    fn graph_padding_keeps_real_rows_and_parks_the_rest() {
        let (t0, t1) = ([4u32, 9], [7u32]);
        let seqs = [
            SeqInput {
                tokens: &[10],
                start: 20,
                table: &t0,
            },
            SeqInput {
                tokens: &[20],
                start: 3,
                table: &t1,
            },
        ];
        let g = GraphShape::new(8, 64, 16);
        let ix = step_index(&seqs, 16, false);
        let p = g.pad(&ix, 4, 99).unwrap();
        assert_eq!(p.ids, [10, 20, 0, 0]);
        assert_eq!(p.positions, [20, 3, 0, 0]);
        assert_eq!(p.slots, [9 * 16 + 4, 7 * 16 + 3, 99 * 16, 99 * 16]);
        assert_eq!(p.row_seq, [0, 1, 2, 3]);
        assert_eq!(p.table_stride, 4);
        assert_eq!(p.tables, [4, 9, 0, 0, 7, 0, 0, 0, 99, 0, 0, 0, 99, 0, 0, 0]);
        assert_eq!(p.logit_rows, [0, 1, 2, 3]);
        assert_eq!(p.max_keys, 21);
        assert_eq!(p.tiles, [0, 1, 1, 1, 2, 1, 3, 1]);
        // Not a decode step, or too big: no graph.
        let prefill = [SeqInput {
            tokens: &[1, 2],
            start: 0,
            table: &t1,
        }];
        assert_eq!(g.pad(&step_index(&prefill, 16, false), 4, 99), None);
        assert_eq!(g.pad(&ix, 1, 99), None);
        let long: Vec<u32> = (0..5).collect();
        let past = [SeqInput {
            tokens: &[1],
            start: 70,
            table: &long,
        }];
        assert_eq!(g.pad(&step_index(&past, 16, false), 4, 99), None);
    }

    #[test]
    fn the_kv_cache_gets_what_utilization_leaves_after_weights_and_buffers() {
        const GIB: usize = 1 << 30;
        // 141 GiB, 14 in use (weights): 90% is 126.9, so 112.9 minus 1 reserved.
        let b = kv_budget(127 * GIB, 141 * GIB, 0.9, GIB).unwrap();
        assert_eq!(b, (141.0 * 0.9 * GIB as f64) as usize - 15 * GIB);
        assert_eq!(kv_budget(127 * GIB, 141 * GIB, 0.1, GIB), None);
        assert_eq!(kv_budget(0, 141 * GIB, 1.0, 0), None);
        // Aquila-7B on one GPU, 512 tokens with their logits: about 324 MB.
        let w = [4096, 4096, 4096, 11008, 100_008];
        let bytes = step_buffer_bytes(512, 512, w);
        let f32s = 512 * (4096 + 3 * 4096 + 4096 + 2 * 11008 + 4096) + 512 * 100_008 + 512;
        let halves = 512 * (4096 + 4096 + 11008) + 512 * 4096;
        assert_eq!(bytes, 4 * f32s + 2 * halves);
        assert!((320e6..330e6).contains(&(bytes as f64)), "{bytes}");
    }

    #[test]
    fn gemm_maps_row_major_products_onto_cublas() {
        let g = gemm(5, 4096, 11008).unwrap();
        assert_eq!((g.m, g.n, g.k), (11008, 5, 4096));
        assert_eq!((g.lda, g.ldb, g.ldc), (4096, 4096, 11008));
        assert!(gemm(0, 1, 1).is_err());
        assert!(gemm(1, 1 << 31, 1).is_err());
    }
}
