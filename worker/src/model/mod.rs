//! The LLaMA-architecture model (LLaMA, Aquila, SmolLM...), written so the
//! names match the checkpoint and tensor parallelism is visible in the types.
//! `forward` takes a batch of sequences, each with its new tokens, its start
//! position and its block table in the paged KV pool, so decodes and prefill
//! chunks of different lengths share one step. It computes; it does not
//! schedule or sample.

pub mod attention;
pub mod kernels;
pub mod linear;
mod math;
mod norm;
pub mod quant;

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv::{BlockId, KvDtype, PagedKv};
use crate::weights::{ReadProgress, Weight, WeightStore};
use attention::AttnSeq;
use half::{bf16, f16};
pub use linear::{
    ColumnParallelLinear, DtypeChoice, Linear, RowParallelLinear, Shard, TpPlan, WeightDtype,
};
pub use norm::{RmsNorm, Rope};

/// One sequence's part of a step.
pub struct SeqInput<'a> {
    /// Tokens to run: (a chunk of) the prompt, or the last sampled token.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; the cache holds positions `0..start`.
    pub start: usize,
    /// Block table covering positions `0..start + tokens.len()`.
    pub table: &'a [BlockId],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only each sequence's last token (serving).
    Last,
    /// Every token (tests, scoring).
    All,
}

/// Token embedding, split by vocabulary across ranks (rank r holds rows
/// `[r·V/N, (r+1)·V/N)`; rows it lacks are zero and an all-reduce completes
/// them).
/// The token embedding, split by vocabulary rows: a rank looks up the ids
/// it holds (zeros for the others) and the all-reduce sums the ranks' rows.
struct VocabParallelEmbedding {
    table: Table,
    /// The ids this rank holds.
    vocab: Range<usize>,
    hidden: usize,
    comm: Arc<dyn Communicator>,
}

enum Table {
    F32(FloatRows<f32>),
    Bf16(FloatRows<bf16>),
    F16(FloatRows<f16>),
    Quantized(Arc<QTensor>),
}

/// A `[rows, width]` float table, row-major, read in parallel at load.
struct FloatRows<T: kernels::Elem> {
    data: crate::mem::HugeBuf<T>,
    width: usize,
}

impl<T: kernels::Elem> FloatRows<T> {
    /// Rows `rows` of the float tensor `name` (`width` columns), as `T`.
    fn load(
        store: &WeightStore,
        name: &str,
        rows: Range<usize>,
        width: usize,
        progress: &ReadProgress,
    ) -> Result<Self> {
        const RUN: usize = 256;
        let stored = store.entry(name)?.stored;
        let mut data = crate::mem::HugeBuf::zeroed(rows.len() * width);
        let failed = std::sync::Mutex::new(None);
        let parts: Vec<(usize, &mut [T])> = data
            .chunks_mut(RUN * width)
            .enumerate()
            .map(|(i, c)| (rows.start + i * RUN, c))
            .collect();
        crate::pool::run_parts(parts, |(first, out)| {
            let mut buf = Vec::new();
            let n = out.len() / width;
            let read = store.read_rows(name, *first..*first + n, 0..width, &mut buf);
            match read {
                Ok(()) => {
                    progress.add(buf.len());
                    linear::decode_into(stored, &buf, out);
                }
                Err(e) => {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                }
            }
        });
        match failed.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(Self { data, width }),
        }
    }

    /// A table from f32 values, `width` to a row.
    fn from_f32(values: &[f32], width: usize) -> Self {
        let mut data = crate::mem::HugeBuf::zeroed(values.len());
        data.iter_mut()
            .zip(values)
            .for_each(|(d, &v)| *d = T::from_f32(v));
        Self { data, width }
    }

    /// Row `i` as f32, appended to `out`.
    fn row_into(&self, i: usize, out: &mut Vec<f32>) {
        out.extend(
            self.data[i * self.width..][..self.width]
                .iter()
                .map(|v| v.to_f32()),
        );
    }

    fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<T>()
    }
}

impl VocabParallelEmbedding {
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let held = |id: u32| self.vocab.contains(&(id as usize));
        let local: Vec<u32> = ids
            .iter()
            .map(|&id| {
                if held(id) {
                    id - self.vocab.start as u32
                } else {
                    0
                }
            })
            .collect();
        let mut out = Vec::with_capacity(ids.len() * self.hidden);
        match &self.table {
            Table::F32(t) => local.iter().for_each(|&i| t.row_into(i as usize, &mut out)),
            Table::Bf16(t) => local.iter().for_each(|&i| t.row_into(i as usize, &mut out)),
            Table::F16(t) => local.iter().for_each(|&i| t.row_into(i as usize, &mut out)),
            Table::Quantized(q) => {
                let idx = Tensor::from_slice(&local, local.len(), &Device::Cpu)?;
                let rows = q.embedding(&idx)?;
                out = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            }
        }
        debug_assert_eq!(out.len(), ids.len() * self.hidden);
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.hidden)) {
            if !held(id) {
                row.fill(0.0);
            }
        }
        self.comm.all_reduce_sum(&mut out)?;
        Ok(out)
    }
}

struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
}

struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

pub struct Llama {
    cfg: ModelConfig,
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// Vocabulary-parallel output layer; logits are all-gathered.
    lm_head: ColumnParallelLinear,
    rope: Rope,
    comm: Arc<dyn Communicator>,
    /// This rank's share of the model.
    plan: TpPlan,
    weight_bytes: usize,
}

/// Loads tensors by Hugging Face name, counting the bytes read; a rank of
/// a tensor-parallel group reads only its slice of each.
struct Loader<'a> {
    store: &'a WeightStore,
    dtype: WeightDtype,
    /// Query heads and MLP width (all ranks): every tensor-parallel size
    /// divides both.
    heads: usize,
    intermediate: usize,
    /// Whether row-parallel layers sum by runs (see `RowParallelLinear`).
    tp_invariant: bool,
    progress: &'a ReadProgress,
}

impl Loader<'_> {
    fn get(&mut self, name: &str) -> Result<Weight> {
        let w = self.store.get(name)?;
        self.progress.add(self.store.entry(name)?.bytes());
        Ok(w)
    }

    /// Rows `rows` of the `[out, inp]` weight `name`.
    fn column(
        &mut self,
        name: &str,
        out: usize,
        rows: Range<usize>,
        inp: usize,
    ) -> Result<ColumnParallelLinear> {
        let inner = Linear::load(
            self.store,
            name,
            [out, inp],
            rows,
            0..inp,
            self.dtype,
            self.progress,
        )?;
        Ok(ColumnParallelLinear { inner })
    }

    /// Columns `cols` of `[out, in_all]` weight `name`, summed across ranks
    /// (by fixed runs where its format allows, see [`RowParallelLinear`]).
    fn row(
        &mut self,
        name: &str,
        out: usize,
        cols: Range<usize>,
        in_all: usize,
        comm: &Arc<dyn Communicator>,
    ) -> Result<RowParallelLinear> {
        let block = match self.store.entry(name)?.stored {
            crate::weights::Stored::Ggml(t) if self.tp_invariant => {
                quant::Format::from_ggml(t).map(|f| f.block_weights())
            }
            _ => None,
        };
        let world = comm.world_size();
        let runs = block
            .map(|b| linear::row_runs(self.heads, self.intermediate, in_all, b))
            .filter(|&k| k > 1 && k.is_multiple_of(world))
            .map(|k| k / world);
        let inner = Linear::load(
            self.store,
            name,
            [out, in_all],
            0..out,
            cols,
            self.dtype,
            self.progress,
        )?;
        Ok(RowParallelLinear {
            inner,
            comm: comm.clone(),
            runs,
        })
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let w = match self.get(name)? {
            Weight::Dense(t) => t,
            Weight::Quantized(q) => {
                q.dequantize(&Device::Cpu)
                    .map_err(|source| WorkerError::Weight {
                        name: name.into(),
                        source,
                    })?
            }
        };
        RmsNorm::new(name, &w, dim, eps)
    }

    /// Rows `vocab` of the embedding, as a lookup table.
    fn table(&mut self, name: &str, vocab: Range<usize>, h: usize) -> Result<Table> {
        let e = self.store.entry(name)?;
        if e.shape.get(1) != Some(&h) {
            return Err(WorkerError::Config(format!(
                "{name}: shape {:?}, the config implies [{}, {h}]",
                e.shape, vocab.end
            )));
        }
        let (store, progress) = (self.store, self.progress);
        Ok(match e.stored {
            crate::weights::Stored::Ggml(_) => {
                let w = store.get_slice(name, 0, vocab.clone())?;
                progress.add(e.stored.bytes(vocab.len() * h));
                match w {
                    Weight::Quantized(q) => Table::Quantized(q),
                    Weight::Dense(_) => unreachable!("a GGML type reads as quantized"),
                }
            }
            _ if !store.readable_in_place(name) => {
                let Weight::Dense(t) = store.get_slice(name, 0, vocab.clone())? else {
                    unreachable!("float tensors read as dense")
                };
                progress.add(e.stored.bytes(vocab.len() * h));
                let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                match self.dtype {
                    WeightDtype::F32 => Table::F32(FloatRows::from_f32(&v, h)),
                    WeightDtype::Bf16 => Table::Bf16(FloatRows::from_f32(&v, h)),
                    WeightDtype::F16 => Table::F16(FloatRows::from_f32(&v, h)),
                }
            }
            _ => match self.dtype {
                WeightDtype::F32 => Table::F32(FloatRows::load(store, name, vocab, h, progress)?),
                WeightDtype::Bf16 => Table::Bf16(FloatRows::load(store, name, vocab, h, progress)?),
                WeightDtype::F16 => Table::F16(FloatRows::load(store, name, vocab, h, progress)?),
            },
        })
    }
}

/// The weight matrices a rank holds: name, then its share's rows and
/// columns (the output layer is the embedding when tied).
fn matrices(cfg: &ModelConfig, plan: &TpPlan, tied: bool) -> Vec<(String, usize, usize)> {
    let h = cfg.hidden_size;
    let [q, kv, i] = plan.projection_rows(cfg.head_dim);
    let lm = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let mut out = vec![(lm.to_string(), plan.vocab.len(), h)];
    for l in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        out.extend([
            (p("self_attn.q_proj"), q.len(), h),
            (p("self_attn.k_proj"), kv.len(), h),
            (p("self_attn.v_proj"), kv.len(), h),
            (p("self_attn.o_proj"), h, q.len()),
            (p("mlp.gate_proj"), i.len(), h),
            (p("mlp.up_proj"), i.len(), h),
            (p("mlp.down_proj"), h, i.len()),
        ]);
    }
    out
}

/// The norms' names and widths.
fn norms(cfg: &ModelConfig) -> Vec<(String, usize)> {
    let h = cfg.hidden_size;
    let mut out = vec![("model.norm.weight".to_string(), h)];
    for l in 0..cfg.num_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("model.layers.{l}.{n}.weight"), h));
        }
    }
    out
}

fn is_tied(cfg: &ModelConfig, store: &WeightStore) -> bool {
    cfg.tie_word_embeddings || !store.contains("lm_head.weight")
}

/// The bytes a rank reads to load the model: each tensor's share, as
/// stored (the embedding twice when it is also the output layer).
fn bytes_to_read(cfg: &ModelConfig, plan: &TpPlan, store: &WeightStore, tied: bool) -> usize {
    let bytes = |name: &str, n: usize| store.entry(name).map_or(0, |e| e.stored.bytes(n));
    let h = cfg.hidden_size;
    let embed = bytes("model.embed_tokens.weight", plan.vocab.len() * h);
    let mats: usize = matrices(cfg, plan, tied)
        .iter()
        .map(|(n, r, c)| bytes(n, r * c))
        .sum();
    let norms: usize = norms(cfg).iter().map(|(n, w)| bytes(n, *w)).sum();
    embed + mats + norms
}

/// The memory a rank's share of the model takes once loaded with float
/// weights as `dtype`: each matrix as our kernels pack it, the embedding
/// table, the norms. What `forward` needs besides is not counted.
pub fn resident_bytes(
    cfg: &ModelConfig,
    plan: &TpPlan,
    store: &WeightStore,
    dtype: WeightDtype,
) -> usize {
    use crate::weights::Stored;
    let elem = match dtype {
        WeightDtype::F32 => 4,
        WeightDtype::Bf16 | WeightDtype::F16 => 2,
    };
    let h = cfg.hidden_size;
    let tied = is_tied(cfg, store);
    let packed = |name: &str, rows: usize, cols: usize| match store.entry(name).map(|e| e.stored) {
        Ok(Stored::Ggml(t)) => match quant::Format::from_ggml(t) {
            Some(f) => f.packed_bytes(rows, cols),
            None => Stored::Ggml(t).bytes(rows * cols),
        },
        _ => kernels::PackedFloat::<f32>::packed_len(rows, cols) * elem,
    };
    let embed = match store.entry("model.embed_tokens.weight").map(|e| e.stored) {
        Ok(s @ Stored::Ggml(_)) => s.bytes(plan.vocab.len() * h),
        _ => plan.vocab.len() * h * elem,
    };
    let mats: usize = matrices(cfg, plan, tied)
        .iter()
        .map(|(n, r, c)| packed(n, *r, *c))
        .sum();
    embed + mats + norms(cfg).len() * h * 4
}

impl Llama {
    /// Builds the model from a store, counting the bytes it reads in
    /// `progress` (whose total it sets first).
    pub fn load(
        cfg: ModelConfig,
        store: &WeightStore,
        opts: &crate::loader::LoadOptions,
        comm: Arc<dyn Communicator>,
        progress: &ReadProgress,
    ) -> Result<Self> {
        let dtype = opts.dtype;
        let plan = TpPlan::of(&cfg, &*comm)?;
        let h = cfg.hidden_size;
        let [q, kv, i] = plan.projection_rows(cfg.head_dim);
        let (kv_all, vocab) = (cfg.num_kv_heads * cfg.head_dim, cfg.vocab_size);
        // Tied checkpoints (and GGUF files without `output.weight`) reuse
        // the embedding as the output layer.
        let tied = is_tied(&cfg, store);
        progress.set_total(bytes_to_read(&cfg, &plan, store, tied));
        let mut ld = Loader {
            store,
            dtype,
            heads: cfg.num_heads,
            intermediate: cfg.intermediate_size,
            tp_invariant: opts.tp_invariant,
            progress,
        };
        let embed_name = "model.embed_tokens.weight";
        let table = ld.table(embed_name, plan.vocab.clone(), h)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            layers.push(DecoderLayer {
                input_layernorm: ld.norm(
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                self_attn: Attention {
                    q_proj: ld.column(
                        &format!("{p}.self_attn.q_proj.weight"),
                        cfg.q_dim(),
                        q.clone(),
                        h,
                    )?,
                    k_proj: ld.column(
                        &format!("{p}.self_attn.k_proj.weight"),
                        kv_all,
                        kv.clone(),
                        h,
                    )?,
                    v_proj: ld.column(
                        &format!("{p}.self_attn.v_proj.weight"),
                        kv_all,
                        kv.clone(),
                        h,
                    )?,
                    o_proj: ld.row(
                        &format!("{p}.self_attn.o_proj.weight"),
                        h,
                        q.clone(),
                        cfg.q_dim(),
                        &comm,
                    )?,
                },
                post_attention_layernorm: ld.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: ld.column(
                        &format!("{p}.mlp.gate_proj.weight"),
                        cfg.intermediate_size,
                        i.clone(),
                        h,
                    )?,
                    up_proj: ld.column(
                        &format!("{p}.mlp.up_proj.weight"),
                        cfg.intermediate_size,
                        i.clone(),
                        h,
                    )?,
                    down_proj: ld.row(
                        &format!("{p}.mlp.down_proj.weight"),
                        h,
                        i.clone(),
                        cfg.intermediate_size,
                        &comm,
                    )?,
                },
            });
        }
        let norm = ld.norm("model.norm.weight", h, cfg.rms_norm_eps)?;
        let lm_name = if tied { embed_name } else { "lm_head.weight" };
        let lm_head = ld.column(lm_name, vocab, plan.vocab.clone(), h)?;
        let rope = Rope::new(
            cfg.head_dim,
            cfg.context_length,
            cfg.rope_theta,
            cfg.rope_style,
        );
        // A tied embedding shares the output layer's tensor: count it once.
        let mut weight_bytes = lm_head.inner.weight_bytes();
        if !tied {
            weight_bytes += match &table {
                Table::F32(t) => t.bytes(),
                Table::Bf16(t) => t.bytes(),
                Table::F16(t) => t.bytes(),
                Table::Quantized(qt) => qt.storage_size_in_bytes(),
            };
        }
        for layer in &layers {
            let a = &layer.self_attn;
            let m = &layer.mlp;
            weight_bytes += [
                &a.q_proj.inner,
                &a.k_proj.inner,
                &a.v_proj.inner,
                &a.o_proj.inner,
            ]
            .iter()
            .chain([&m.gate_proj.inner, &m.up_proj.inner, &m.down_proj.inner].iter())
            .map(|l| l.weight_bytes())
            .sum::<usize>();
        }
        Ok(Self {
            embed_tokens: VocabParallelEmbedding {
                table,
                vocab: plan.vocab.clone(),
                hidden: h,
                comm: comm.clone(),
            },
            layers,
            norm,
            lm_head,
            rope,
            comm,
            plan,
            weight_bytes,
            cfg,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights held in memory, a tied embedding counted once. One
    /// decode step reads all of it but the embedding rows it does not use.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// An f32 KV pool of `num_blocks` blocks of `block_size` tokens for this
    /// model.
    pub fn new_kv(&self, num_blocks: usize, block_size: usize) -> PagedKv {
        self.new_kv_with(num_blocks, block_size, KvDtype::F32)
    }

    /// [`new_kv`](Self::new_kv) holding `dtype`.
    pub fn new_kv_with(&self, num_blocks: usize, block_size: usize, dtype: KvDtype) -> PagedKv {
        PagedKv::new(
            self.cfg.num_layers,
            num_blocks,
            block_size,
            self.plan.kv_heads.len(),
            self.cfg.head_dim,
            dtype,
        )
    }

    /// This rank's share of the model.
    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }

    /// Runs one step for a batch of sequences, writing their new keys and
    /// values into `kv`. Returns, per sequence, logits `[n, vocab]`
    /// row-major, where n is 1 for [`LogitsFor::Last`] and the sequence's
    /// token count for [`LogitsFor::All`].
    pub fn forward(
        &self,
        kv: &mut PagedKv,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        check_step(seqs, kv.block_size(), kv.num_blocks(), cfg.context_length)?;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs {
            ids.extend_from_slice(s.tokens);
            positions.extend(s.start..s.start + s.tokens.len());
        }
        let total = ids.len();
        let mut x = self.embed_tokens.forward(&ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = layer.input_layernorm.forward(&x, total);
            let a = &layer.self_attn;
            let [mut q, mut k, v] =
                ColumnParallelLinear::forward_many([&a.q_proj, &a.k_proj, &a.v_proj], &xn, total)?;
            let heads = q.len() / (total * hd);
            let kv_heads = k.len() / (total * hd);
            self.rope.apply(&mut q, &positions, heads);
            self.rope.apply(&mut k, &positions, kv_heads);
            let mut row = 0;
            let mut queries = Vec::with_capacity(seqs.len());
            for s in seqs {
                let n = s.tokens.len();
                let (a, b) = (row * kv_heads * hd, (row + n) * kv_heads * hd);
                kv.write(l, s.table, s.start, &k[a..b], &v[a..b]);
                queries.push(AttnSeq {
                    q: &q[row * heads * hd..(row + n) * heads * hd],
                    n,
                    start: s.start,
                    table: s.table,
                });
                row += n;
            }
            let attn = attention::attend(kv, l, heads, &queries);
            let o = a.o_proj.forward(&attn, total)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let xn = layer.post_attention_layernorm.forward(&x, total);
            let m = &layer.mlp;
            let [mut g, u] =
                ColumnParallelLinear::forward_many([&m.gate_proj, &m.up_proj], &xn, total)?;
            silu_mul_on_pool(&mut g, &u);
            let d = m.down_proj.forward(&g, total)?;
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        // Rows whose logits are wanted, in batch order.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs.iter() {
            let n = s.tokens.len();
            match which {
                LogitsFor::Last => {
                    rows.push(row + n - 1);
                    counts.push(1);
                }
                LogitsFor::All => {
                    rows.extend(row..row + n);
                    counts.push(n);
                }
            }
            row += n;
        }
        let mut picked = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            picked.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let picked = self.norm.forward(&picked, rows.len());
        let local = self.lm_head.forward(&picked, rows.len())?;
        let logits = gather_vocab(&*self.comm, &self.plan, cfg.vocab_size, local, rows.len())?;
        let vocab = cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for n in counts {
            out.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(out)
    }
}

/// `g = SiLU(g)·u`, elementwise, in chunks on the compute pool: a batch's
/// `[rows, intermediate]` done by the engine thread alone kept the other
/// threads waiting (about 1% of a 16-row step). One row is one chunk, done
/// in place.
fn silu_mul_on_pool(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 4096;
    let chunks = g.chunks_mut(CHUNK).zip(u.chunks(CHUNK)).collect();
    crate::pool::run_parts(chunks, |(g, u)| math::silu_mul(g, u));
}

/// Refuses a step a sequence of which does not fit its block table, the
/// pool or the context.
pub(crate) fn check_step(
    seqs: &[SeqInput<'_>],
    block_size: usize,
    num_blocks: usize,
    context: usize,
) -> Result<()> {
    for s in seqs {
        let end = s.start + s.tokens.len();
        let fits =
            s.table.len() * block_size >= end && s.table.iter().all(|&b| (b as usize) < num_blocks);
        if s.tokens.is_empty() || !fits || end > context {
            return Err(WorkerError::InvalidRequest(format!(
                "step of {} tokens at position {} with {} blocks of {} does not fit (context {})",
                s.tokens.len(),
                s.start,
                s.table.len(),
                block_size,
                context
            )));
        }
    }
    Ok(())
}

/// Reassembles `[rows, vocab]` from each rank's `[rows, held]`: each rank's
/// part padded to the same width, gathered, the padding dropped.
pub(crate) fn gather_vocab(
    comm: &dyn Communicator,
    plan: &TpPlan,
    vocab: usize,
    local: Vec<f32>,
    rows: usize,
) -> Result<Vec<f32>> {
    let n = comm.world_size();
    if n == 1 {
        return Ok(local);
    }
    let (held, part) = (plan.vocab.len(), plan.vocab_part);
    let mut padded = Vec::with_capacity(rows * part);
    for r in 0..rows {
        padded.extend_from_slice(&local[r * held..(r + 1) * held]);
        padded.resize((r + 1) * part, f32::NEG_INFINITY);
    }
    let all = comm.all_gather(&padded)?;
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let start = out.len();
        for rank in 0..n {
            let base = (rank * rows + r) * part;
            out.extend_from_slice(&all[base..base + part]);
        }
        out.truncate(start + vocab);
    }
    Ok(out)
}

/// One sequence with a pool of its own: for tests, benchmarks and scoring,
/// where no scheduler hands out blocks.
pub struct SingleSeq {
    kv: PagedKv,
    table: Vec<BlockId>,
    len: usize,
}

impl SingleSeq {
    pub fn new(model: &Llama, capacity: usize) -> Self {
        Self::with_dtype(model, capacity, KvDtype::F32)
    }

    /// [`new`](Self::new) with a cache of `dtype`.
    pub fn with_dtype(model: &Llama, capacity: usize, dtype: KvDtype) -> Self {
        const BLOCK: usize = 16;
        let blocks = capacity.div_ceil(BLOCK).max(1);
        Self {
            kv: model.new_kv_with(blocks, BLOCK, dtype),
            table: (0..blocks as BlockId).collect(),
            len: 0,
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `tokens` after what the cache holds.
    pub fn step(&mut self, model: &Llama, tokens: &[u32], which: LogitsFor) -> Result<Vec<f32>> {
        let input = SeqInput {
            tokens,
            start: self.len,
            table: &self.table,
        };
        let mut out = model.forward(&mut self.kv, &[input], which)?;
        self.len += tokens.len();
        Ok(out.remove(0))
    }
}
