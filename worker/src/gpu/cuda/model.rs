//! The LLaMA model on one GPU (one tensor-parallel rank's share): weights
//! and the paged KV cache in T (bf16 or f16) in device memory, the residual
//! stream and every sum in f32. A step is the CPU engine's step, kernel for
//! kernel: the same inputs (`SeqInput`), the same cache layout and block
//! tables, the same logits out, so the scheduler above does not know which
//! one it drives.
//!
//! Per layer: RMSNorm (with the previous residual add) → the q/k/v product
//! (cuBLAS; the three weights stacked at load) → RoPE and the cache write →
//! paged attention → o product → all-reduce → RMSNorm with the residual add
//! → the gate/up product (stacked too) → SiLU·mul → down product →
//! all-reduce: five kernels and four products.
//!
//! Decode steps can be replayed as CUDA graphs (`--cuda-graph-max-batch`):
//! a step's few hundred launches become one, on buffers that never move
//! (`Graphs`; the padding rules are `launch::GraphShape`'s).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice};

use super::ops::{AttentionScratch, AttentionShape, DeviceIndex, Elem, Gpu, cuda_err};
use crate::backend::Next;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::gpu::launch::{
    AttentionPlan, GraphShape, StepIndex, attention_plan, kv_budget, step_buffer_bytes,
    step_buffers, step_index,
};
use crate::model::{LogitsFor, Rope, SeqInput, TpPlan, WeightDtype, check_step, gather_vocab};
use crate::weights::{Weight, WeightStore};

struct Layer<T> {
    input_norm: CudaSlice<T>,
    /// q, k and v stacked: `[q rows | k rows | v rows][hidden]`.
    qkv: CudaSlice<T>,
    o: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    /// gate and up stacked: `[gate rows | up rows][hidden]`.
    gate_up: CudaSlice<T>,
    down: CudaSlice<T>,
}

/// A step's activations, for up to `step.0` tokens and `step.1` logit
/// rows. Every kernel and product overwrites its output whole, so the
/// buffers are reused as they are while steps keep the same (tokens, logit
/// rows): a decode batch of a steady size allocates nothing.
struct Workspace<T> {
    step: (usize, usize),
    x: CudaSlice<f32>,
    xn: CudaSlice<T>,
    /// `[tokens][q | k | v]`.
    qkv: CudaSlice<f32>,
    attn: CudaSlice<T>,
    o: CudaSlice<f32>,
    /// `[tokens][gate | up]`.
    gate_up: CudaSlice<f32>,
    act: CudaSlice<T>,
    down: CudaSlice<f32>,
    xf: CudaSlice<T>,
    logits: CudaSlice<f32>,
    /// Each logit row's largest (the greedy pick; with the whole vocabulary
    /// on this rank only).
    ids: CudaSlice<u32>,
}

impl<T: Elem> Workspace<T> {
    /// For `(tokens, logit rows)` and widths `[hidden, q, kv, mlp, vocab
    /// held]`, sized by `launch::step_buffers` (which the KV budget counts).
    fn new(gpu: &Gpu, step: (usize, usize), widths: [usize; 5]) -> Result<Self> {
        let ([x, qkv, o, gate_up, down, logits, ids], [xn, attn, act, xf]) =
            step_buffers(step.0, step.1, widths);
        Ok(Self {
            step,
            x: gpu.zeros(x)?,
            xn: gpu.zeros(xn)?,
            qkv: gpu.zeros(qkv)?,
            attn: gpu.zeros(attn)?,
            o: gpu.zeros(o)?,
            gate_up: gpu.zeros(gate_up)?,
            act: gpu.zeros(act)?,
            down: gpu.zeros(down)?,
            xf: gpu.zeros(xf)?,
            logits: gpu.zeros(logits)?,
            ids: gpu.zeros(ids)?,
        })
    }
}

/// Decode steps as CUDA graphs: buffers sized for the largest captured
/// batch, allocated once (a graph holds their addresses), and a graph per
/// (batch size, key bucket). A shape runs eagerly on these buffers the
/// first time it comes (which loads its kernels and lets cuBLAS choose its
/// algorithms) and is captured the second.
struct Graphs<T: Elem> {
    shape: GraphShape,
    index: DeviceIndex,
    ws: Workspace<T>,
    scratch: AttentionScratch,
    graphs: HashMap<(usize, usize), Graph>,
    seen: HashSet<(usize, usize)>,
}

/// A captured step.
struct Graph(CudaGraph);

// SAFETY: a graph is launched and dropped only by the thread that owns the
// model (the engine's), never by two at once, which is all CUDA asks of
// graph objects; it moves to that thread once, at start.
unsafe impl Send for Graph {}

/// Where the weights come from.
pub enum Source<'a> {
    /// A checkpoint (any format the CPU engine reads; GGUF quantized
    /// weights are dequantized to T).
    Store(&'a WeightStore),
    /// Uniform random weights generated on the GPU from a seed (the GPU
    /// check's Aquila-7B-shaped model: no download, no host copy).
    Random(u64),
}

/// What every step reads apart from the KV cache: the weights, the RoPE
/// tables, the rank's share and its communicator.
struct Net<T: Elem> {
    gpu: Arc<Gpu>,
    cfg: ModelConfig,
    plan: TpPlan,
    comm: Arc<dyn Communicator>,
    embed: CudaSlice<T>,
    layers: Vec<Layer<T>>,
    norm: CudaSlice<T>,
    /// None: tied to the embedding.
    lm_head: Option<CudaSlice<T>>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    interleaved: bool,
}

pub struct CudaLlama<T: Elem> {
    net: Net<T>,
    /// Per layer, keys and values `[block][kv_head][slot][head_dim]`: the
    /// scheduler's `num_blocks`, and one more that padding rows of a graph
    /// write into.
    cache: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    num_blocks: usize,
    block_size: usize,
    scratch: AttentionScratch,
    /// The last eager step's buffers, reused while steps keep its shape.
    workspace: Option<Workspace<T>>,
    /// The largest decode batch run as a CUDA graph; 0: none.
    graph_max_batch: usize,
    graphs: Option<Graphs<T>>,
    weight_bytes: usize,
    /// Bytes a decode step reads: every weight but the embedding's rows
    /// (unless the output layer is the embedding).
    step_bytes: usize,
}

/// Loads tensors (this rank's slice) into T on the device.
struct Uploader<'a, T: Elem> {
    gpu: &'a Gpu,
    source: &'a Source<'a>,
    whole: bool,
    seed: u64,
    bytes: usize,
    progress: &'a mut dyn FnMut(&str),
    _t: std::marker::PhantomData<T>,
}

impl<T: Elem> Uploader<'_, T> {
    /// `name`'s rows (`dim` 0) or columns (`dim` 1) `range`, expected to have
    /// `shape` once sliced.
    fn tensor(
        &mut self,
        name: &str,
        dim: usize,
        range: Range<usize>,
        shape: [usize; 2],
    ) -> Result<CudaSlice<T>> {
        (self.progress)(name);
        if let Source::Random(seed) = self.source {
            return self.random(*seed, shape);
        }
        let host = self.host(name, dim, range, shape)?;
        self.upload(&host)
    }

    /// Row ranges of several tensors with `cols` columns, stacked in one
    /// matrix (`[q | k | v]`, `[gate | up]`): one product instead of several.
    fn stacked(&mut self, parts: &[(String, Range<usize>)], cols: usize) -> Result<CudaSlice<T>> {
        let rows = parts.iter().map(|(_, r)| r.len()).sum::<usize>();
        for (name, _) in parts {
            (self.progress)(name);
        }
        if let Source::Random(seed) = self.source {
            return self.random(*seed, [rows, cols]);
        }
        let mut host = Vec::with_capacity(rows * cols);
        for (name, range) in parts {
            host.extend(self.host(name, 0, range.clone(), [range.len(), cols])?);
        }
        self.upload(&host)
    }

    fn upload(&mut self, host: &[T]) -> Result<CudaSlice<T>> {
        self.bytes += std::mem::size_of_val(host);
        self.gpu.upload(host)
    }

    /// Uniform random weights with the scale of a 1/√fan-in initialization,
    /// norms (one row) around 1.
    fn random(&mut self, seed: u64, shape: [usize; 2]) -> Result<CudaSlice<T>> {
        let n = shape[0] * shape[1];
        self.bytes += n * std::mem::size_of::<T>();
        self.seed += 1;
        let mut d = self.gpu.zeros::<T>(n)?;
        let (center, scale) = if shape[0] == 1 {
            (1.0, 0.05)
        } else {
            (0.0, 1.0 / (shape[1] as f32).sqrt())
        };
        self.gpu
            .fill_random(&mut d, seed.wrapping_mul(1000) + self.seed, center, scale)?;
        Ok(d)
    }

    /// A checkpoint tensor's slice in T, in host memory.
    fn host(
        &mut self,
        name: &str,
        dim: usize,
        range: Range<usize>,
        shape: [usize; 2],
    ) -> Result<Vec<T>> {
        let Source::Store(store) = self.source else {
            unreachable!("random weights are made on the GPU")
        };
        let w = if self.whole || shape[0] == 1 {
            store.get(name)?
        } else {
            store.get_slice(name, dim, range)?
        };
        let werr = |source| WorkerError::Weight {
            name: name.into(),
            source,
        };
        let t = match w {
            Weight::Dense(t) => t,
            Weight::Quantized(q) => q.dequantize(&Device::Cpu).map_err(werr)?,
        };
        if t.elem_count() != shape[0] * shape[1] {
            return Err(WorkerError::Config(format!(
                "{name}: shape {:?}, the config implies {shape:?}",
                t.dims()
            )));
        }
        let host: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(werr)?;
        Ok(host.into_iter().map(T::from_f32).collect())
    }
}

impl<T: Elem> Net<T> {
    fn shape(&self, block_size: usize) -> AttentionShape {
        AttentionShape {
            heads: self.plan.heads.len(),
            kv_heads: self.plan.kv_heads.len(),
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// `[hidden, q, kv, mlp, vocab held]` on this rank.
    fn widths(&self) -> [usize; 5] {
        let hd = self.cfg.head_dim;
        [
            self.cfg.hidden_size,
            self.plan.heads.len() * hd,
            self.plan.kv_heads.len() * hd,
            self.plan.intermediate.len(),
            self.plan.vocab.len(),
        ]
    }

    /// Whether a step can be captured in a CUDA graph: alone, or with
    /// collectives on the device (NCCL); a sum through host memory cannot.
    fn capturable(&self) -> bool {
        self.plan.world == 1 || self.comm.cuda_stream().is_some()
    }

    /// Sums `buf` over the ranks: in place on the device through NCCL,
    /// else (a CPU communicator) through host memory.
    fn all_reduce(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        if self.plan.world == 1 {
            return Ok(());
        }
        if let Some(done) = self.comm.all_reduce_device(buf) {
            return done;
        }
        let mut host = self.gpu.download(buf)?;
        self.comm.all_reduce_sum(&mut host)?;
        self.gpu.copy_into(&host, buf)
    }

    /// Enqueues one step, from the token ids in `d` to the logits of its
    /// logit rows in `ws.logits` (this rank's vocabulary share) and, alone
    /// with the whole vocabulary, each row's greedy pick in `ws.ids`.
    /// Nothing here allocates or waits for the GPU, so a step can be
    /// captured.
    fn step(
        &self,
        cache: &mut [(CudaSlice<T>, CudaSlice<T>)],
        block_size: usize,
        d: &DeviceIndex,
        attention: &AttentionPlan,
        scratch: &mut AttentionScratch,
        ws: &mut Workspace<T>,
    ) -> Result<()> {
        let gpu = &*self.gpu;
        let (n, rows) = (d.rows, d.logit_count);
        let [h, qd, kvd, inter, held] = self.widths();
        let shape = self.shape(block_size);
        let eps = self.cfg.rms_norm_eps as f32;
        gpu.embedding(
            &d.ids,
            n,
            &self.embed,
            self.plan.vocab.clone(),
            h,
            &mut ws.x,
        )?;
        self.all_reduce(&mut ws.x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // The previous layer's MLP output joins the residual here.
            let delta = (l > 0).then_some(&ws.down);
            gpu.rms_norm(
                &mut ws.x,
                delta,
                None,
                n,
                &layer.input_norm,
                eps,
                h,
                &mut ws.xn,
            )?;
            gpu.gemm(&ws.xn, &layer.qkv, n, h, qd + 2 * kvd, &mut ws.qkv)?;
            let (ck, cv) = &mut cache[l];
            let (cos, sin) = (&self.cos, &self.sin);
            gpu.rope_kv_write(&mut ws.qkv, d, cos, sin, shape, self.interleaved, ck, cv)?;
            gpu.attention(
                &ws.qkv,
                qd + 2 * kvd,
                ck,
                cv,
                d,
                attention,
                shape,
                scratch,
                &mut ws.attn,
            )?;
            gpu.gemm(&ws.attn, &layer.o, n, qd, h, &mut ws.o)?;
            self.all_reduce(&mut ws.o)?;
            gpu.rms_norm(
                &mut ws.x,
                Some(&ws.o),
                None,
                n,
                &layer.post_norm,
                eps,
                h,
                &mut ws.xn,
            )?;
            gpu.gemm(&ws.xn, &layer.gate_up, n, h, 2 * inter, &mut ws.gate_up)?;
            gpu.silu_mul(&ws.gate_up, n, inter, &mut ws.act)?;
            gpu.gemm(&ws.act, &layer.down, n, inter, h, &mut ws.down)?;
            self.all_reduce(&mut ws.down)?;
        }
        // The last MLP output joins the residual in the final norm, for the
        // rows whose logits are wanted.
        let delta = (!self.layers.is_empty()).then_some(&ws.down);
        let picked = Some(&d.logit_rows);
        gpu.rms_norm(
            &mut ws.x, delta, picked, rows, &self.norm, eps, h, &mut ws.xf,
        )?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        gpu.gemm(&ws.xf, head, rows, h, held, &mut ws.logits)?;
        if self.plan.world == 1 {
            gpu.argmax_rows(&ws.logits, rows, held, &mut ws.ids)?;
        }
        Ok(())
    }
}

impl<T: Elem> CudaLlama<T> {
    /// This rank's share of the model on `gpu`; `progress` hears of each
    /// tensor. `comm` sums the row-parallel products. The KV cache comes
    /// after ([`alloc_cache`](Self::alloc_cache)), sized from what is left.
    pub fn load(
        gpu: Arc<Gpu>,
        cfg: ModelConfig,
        source: &Source<'_>,
        comm: Arc<dyn Communicator>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let plan = TpPlan::of(&cfg, &*comm)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let [q, kv, i] = plan.projection_rows(hd);
        let mut up = Uploader::<T> {
            gpu: &gpu,
            source,
            whole: plan.world == 1,
            seed: 0,
            bytes: 0,
            progress,
            _t: std::marker::PhantomData,
        };
        let embed = up.tensor(
            "model.embed_tokens.weight",
            0,
            plan.vocab.clone(),
            [plan.vocab.len(), h],
        )?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let part =
                |name: &str, rows: &Range<usize>| (format!("{p}.{name}.weight"), rows.clone());
            let qkv = up.stacked(
                &[
                    part("self_attn.q_proj", &q),
                    part("self_attn.k_proj", &kv),
                    part("self_attn.v_proj", &kv),
                ],
                h,
            )?;
            let gate_up = up.stacked(&[part("mlp.gate_proj", &i), part("mlp.up_proj", &i)], h)?;
            layers.push(Layer {
                input_norm: up.tensor(&format!("{p}.input_layernorm.weight"), 0, 0..h, [1, h])?,
                qkv,
                o: up.tensor(
                    &format!("{p}.self_attn.o_proj.weight"),
                    1,
                    q.clone(),
                    [h, q.len()],
                )?,
                post_norm: up.tensor(
                    &format!("{p}.post_attention_layernorm.weight"),
                    0,
                    0..h,
                    [1, h],
                )?,
                gate_up,
                down: up.tensor(
                    &format!("{p}.mlp.down_proj.weight"),
                    1,
                    i.clone(),
                    [h, i.len()],
                )?,
            });
        }
        let norm = up.tensor("model.norm.weight", 0, 0..h, [1, h])?;
        let has_head = match source {
            Source::Store(s) => !cfg.tie_word_embeddings && s.contains("lm_head.weight"),
            Source::Random(_) => !cfg.tie_word_embeddings,
        };
        let lm_head = if has_head {
            Some(up.tensor(
                "lm_head.weight",
                0,
                plan.vocab.clone(),
                [plan.vocab.len(), h],
            )?)
        } else {
            None
        };
        let weight_bytes = up.bytes;
        let embed_bytes = plan.vocab.len() * h * std::mem::size_of::<T>();
        let step_bytes = weight_bytes - if lm_head.is_some() { embed_bytes } else { 0 };
        let rope = Rope::new(hd, cfg.context_length, cfg.rope_theta, cfg.rope_style);
        let (cos, sin) = rope.tables();
        Ok(Self {
            scratch: AttentionScratch::new(&gpu)?,
            net: Net {
                cos: gpu.upload(cos)?,
                sin: gpu.upload(sin)?,
                interleaved: rope.interleaved(),
                gpu,
                cfg,
                plan,
                comm,
                embed,
                layers,
                norm,
                lm_head,
            },
            cache: Vec::new(),
            workspace: None,
            num_blocks: 0,
            block_size: 1,
            graph_max_batch: 0,
            graphs: None,
            weight_bytes,
            step_bytes,
        })
    }

    /// The paged KV cache: `num_blocks` blocks of `block_size` tokens per
    /// layer, keys and values in T (and one block more, where the padding
    /// rows of a graph's batch write).
    pub fn alloc_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        let width = self.net.plan.kv_heads.len() * self.net.cfg.head_dim;
        let n = (num_blocks + 1) * block_size * width;
        // Graphs hold the old cache's addresses.
        self.graphs = None;
        self.cache.clear();
        for _ in 0..self.net.cfg.num_layers {
            let gpu = &self.net.gpu;
            self.cache.push((gpu.zeros::<T>(n)?, gpu.zeros::<T>(n)?));
        }
        self.num_blocks = num_blocks;
        self.block_size = block_size;
        Ok(())
    }

    /// Runs decode batches of up to `max_batch` sequences as CUDA graphs
    /// (0: never). Off, with a note in the log, where collectives go
    /// through host memory.
    pub fn set_graph_max_batch(&mut self, max_batch: usize) {
        if max_batch > 0 && !self.net.capturable() {
            tracing::info!(
                "CUDA graphs are off: this group's collectives go through host memory (use --collectives nccl)"
            );
        }
        self.graph_max_batch = if self.net.capturable() { max_batch } else { 0 };
        self.graphs = None;
    }

    /// Bytes the KV cache may take on this GPU: `utilization` of its
    /// memory less what is in use (the weights) and the step buffers to
    /// come (the largest eager step: `max_tokens` tokens, logits for
    /// `max_seqs`; the graphs' buffers; 256 MiB for cuBLAS, NCCL and the
    /// allocator). An error that says what takes the memory if nothing is
    /// left.
    pub fn kv_budget(&self, utilization: f64, max_tokens: usize, max_seqs: usize) -> Result<usize> {
        let (free, total) = self
            .net
            .gpu
            .stream
            .context()
            .mem_get_info()
            .map_err(|e| cuda_err("memory info", e))?;
        let widths = self.net.widths();
        let graphs = self.graph_max_batch;
        let reserve = step_buffer_bytes(max_tokens, max_seqs.min(max_tokens), widths)
            + step_buffer_bytes(graphs, graphs, widths)
            + (256 << 20);
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        kv_budget(free, total, utilization, reserve).ok_or_else(|| {
            WorkerError::Config(format!(
                "--gpu-memory-utilization {utilization} leaves the KV cache nothing on {}: \
                 {:.1} GiB of {:.1} GiB are in use (the weights: {:.1} GiB) and steps need \
                 {:.1} GiB more; raise it, or give --kv-cache-mib",
                self.net.gpu.name,
                gib(total - free),
                gib(total),
                gib(self.weight_bytes),
                gib(reserve)
            ))
        })
    }

    /// CUDA graphs captured so far.
    pub fn graphs_captured(&self) -> usize {
        self.graphs.as_ref().map_or(0, |g| g.graphs.len())
    }

    pub fn plan(&self) -> &TpPlan {
        &self.net.plan
    }

    pub fn config(&self) -> &ModelConfig {
        &self.net.cfg
    }

    /// Bytes of weights on this rank's GPU.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weights one decode step reads (the embedding table only
    /// where it is also the output layer): the bandwidth floor's numerator.
    pub fn step_bytes(&self) -> usize {
        self.step_bytes
    }

    /// One step, as `Llama::forward`: per sequence, logits `[n, vocab]`.
    pub fn forward(&mut self, seqs: &[SeqInput<'_>], which: LogitsFor) -> Result<Vec<Vec<f32>>> {
        let out = self.run(seqs, which, &[])?;
        Ok(out
            .into_iter()
            .map(|n| match n {
                Next::Logits(l) => l,
                Next::Token(_) => unreachable!("no sequence asked for a greedy pick"),
            })
            .collect())
    }

    /// One step of the engine (the last token's logits per sequence): the
    /// token itself for each sequence `greedy` marks, picked on the GPU
    /// (alone, with the whole vocabulary here), so its logits never leave
    /// the device; the logits of the others.
    pub fn step(&mut self, seqs: &[SeqInput<'_>], greedy: &[bool]) -> Result<Vec<Next>> {
        self.run(seqs, LogitsFor::Last, greedy)
    }

    fn run(
        &mut self,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
        greedy: &[bool],
    ) -> Result<Vec<Next>> {
        let context = self.net.cfg.context_length;
        check_step(seqs, self.block_size, self.num_blocks, context)?;
        let ix = step_index(seqs, self.block_size, which == LogitsFor::All);
        let rows = ix.logit_rows.len();
        let on_graph = self.graph_step(&ix)?;
        if !on_graph {
            self.eager_step(&ix)?;
        }
        let ws = match (on_graph, &self.graphs, &self.workspace) {
            (true, Some(g), _) => &g.ws,
            (false, _, Some(ws)) => ws,
            _ => unreachable!("the step just ran on these buffers"),
        };
        let gpu = &self.net.gpu;
        let (vocab, held) = (self.net.cfg.vocab_size, self.net.plan.vocab.len());
        let picks = self.net.plan.world == 1 && which == LogitsFor::Last && greedy.contains(&true);
        if picks {
            // One row per sequence; the whole vocabulary is here.
            let ids = gpu.download_range(&ws.ids, 0..rows)?;
            return (0..seqs.len())
                .map(|i| match greedy.get(i) {
                    Some(true) => Ok(Next::Token(ids[i])),
                    _ => gpu
                        .download_range(&ws.logits, i * held..(i + 1) * held)
                        .map(Next::Logits),
                })
                .collect();
        }
        let local = gpu.download_range(&ws.logits, 0..rows * held)?;
        let logits = gather_vocab(&*self.net.comm, &self.net.plan, vocab, local, rows)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            let count = if which == LogitsFor::All {
                s.tokens.len()
            } else {
                1
            };
            out.push(Next::Logits(
                logits[at * vocab..(at + count) * vocab].to_vec(),
            ));
            at += count;
        }
        Ok(out)
    }

    /// A step launched kernel by kernel, its results left in `self.workspace`.
    fn eager_step(&mut self, ix: &StepIndex) -> Result<()> {
        let gpu = self.net.gpu.clone();
        let d = DeviceIndex::upload(&gpu, ix)?;
        let shape = self.net.shape(self.block_size);
        let plan = attention_plan(d.rows, shape.heads, shape.head_dim, ix.max_keys, gpu.sms)?
            .with_prefill(ix, shape.heads, shape.head_dim);
        let step = (d.rows, d.logit_count);
        let mut ws = match self.workspace.take() {
            Some(ws) if ws.step == step => ws,
            old => {
                drop(old); // before the new one: one step's buffers at a time
                Workspace::new(&gpu, step, self.net.widths())?
            }
        };
        let bs = self.block_size;
        self.net
            .step(&mut self.cache, bs, &d, &plan, &mut self.scratch, &mut ws)?;
        self.workspace = Some(ws);
        Ok(())
    }

    /// A decode step through a CUDA graph (see [`Graphs`]), its results
    /// left in the graphs' workspace; false where graphs are off or do not
    /// serve this step (a prefill, a batch larger than the largest
    /// captured), which then runs eagerly. A capture that fails turns
    /// graphs off, with a warning, and the step runs eagerly.
    fn graph_step(&mut self, ix: &StepIndex) -> Result<bool> {
        if self.graph_max_batch == 0 || self.cache.is_empty() {
            return Ok(false);
        }
        let gpu = self.net.gpu.clone();
        let shape = self.net.shape(self.block_size);
        let context = self.net.cfg.context_length;
        if self.graphs.is_none() {
            let gs = GraphShape::new(self.graph_max_batch, context, self.block_size);
            let max = gs.max_batch();
            let entries = gs.scratch_entries(shape.heads, shape.head_dim, context, gpu.sms);
            self.graphs = Some(Graphs {
                index: DeviceIndex::with_capacity(&gpu, max, gs.stride)?,
                ws: Workspace::new(&gpu, (max, max), self.net.widths())?,
                scratch: AttentionScratch::with_capacity(&gpu, entries, shape.head_dim)?,
                shape: gs,
                graphs: HashMap::new(),
                seen: HashSet::new(),
            });
        }
        let Some(g) = self.graphs.as_mut() else {
            return Ok(false);
        };
        let Some(rows) = g.shape.batch_for(ix.ids.len()) else {
            return Ok(false);
        };
        let Some(padded) = g.shape.pad(ix, rows, self.num_blocks as u32) else {
            return Ok(false);
        };
        let keys = GraphShape::keys_for(ix.max_keys);
        let plan = attention_plan(rows, shape.heads, shape.head_dim, keys, gpu.sms)?;
        g.index.write(&gpu, &padded)?;
        let bs = self.block_size;
        let key = (rows, keys);
        if let Some(Graph(graph)) = g.graphs.get(&key) {
            graph
                .launch()
                .map_err(|e| cuda_err("replaying a decode step's graph", e))?;
        } else if g.seen.insert(key) {
            let (d, scratch, ws) = (&g.index, &mut g.scratch, &mut g.ws);
            self.net.step(&mut self.cache, bs, d, &plan, scratch, ws)?;
        } else {
            let stream = &gpu.stream;
            let captured = match stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            {
                Err(e) => Err(format!("{e:?}")),
                Ok(()) => {
                    let (d, scratch, ws) = (&g.index, &mut g.scratch, &mut g.ws);
                    let body = self.net.step(&mut self.cache, bs, d, &plan, scratch, ws);
                    // Ends the capture whatever the body did.
                    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
                    match (body, ended) {
                        (Ok(()), Ok(Some(graph))) => Ok(graph),
                        (Err(e), _) => Err(e.to_string()),
                        (_, Err(e)) => Err(format!("{e:?}")),
                        (Ok(()), Ok(None)) => Err("the capture was empty".to_string()),
                    }
                }
            };
            let graph = match captured {
                Ok(graph) => graph,
                Err(why) => {
                    tracing::warn!(
                        %why,
                        rows,
                        "capturing a decode step as a CUDA graph failed; decode steps run without graphs from now on"
                    );
                    self.graph_max_batch = 0;
                    self.graphs = None;
                    return Ok(false);
                }
            };
            graph
                .launch()
                .map_err(|e| cuda_err("replaying a decode step's graph", e))?;
            g.graphs.insert(key, Graph(graph));
        }
        Ok(true)
    }
}

/// The model on a GPU, in the type `--dtype` names.
pub enum CudaModel {
    Bf16(CudaLlama<half::bf16>),
    F16(CudaLlama<half::f16>),
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            CudaModel::Bf16($m) => $e,
            CudaModel::F16($m) => $e,
        }
    };
}

impl CudaModel {
    pub fn load(
        gpu: Arc<Gpu>,
        cfg: ModelConfig,
        store: &WeightStore,
        comm: Arc<dyn Communicator>,
        dtype: WeightDtype,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let source = Source::Store(store);
        Ok(match dtype {
            WeightDtype::Bf16 => Self::Bf16(CudaLlama::load(gpu, cfg, &source, comm, progress)?),
            WeightDtype::F16 => Self::F16(CudaLlama::load(gpu, cfg, &source, comm, progress)?),
            WeightDtype::F32 => {
                return Err(WorkerError::Config(
                    "--device cuda holds weights in bf16 or f16: pass --dtype bf16 (or f16)".into(),
                ));
            }
        })
    }

    pub fn alloc_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        each!(self, m => m.alloc_cache(num_blocks, block_size))
    }

    pub fn set_graph_max_batch(&mut self, max_batch: usize) {
        each!(self, m => m.set_graph_max_batch(max_batch))
    }

    pub fn kv_budget(&self, utilization: f64, max_tokens: usize, max_seqs: usize) -> Result<usize> {
        each!(self, m => m.kv_budget(utilization, max_tokens, max_seqs))
    }

    pub fn forward(&mut self, seqs: &[SeqInput<'_>], which: LogitsFor) -> Result<Vec<Vec<f32>>> {
        each!(self, m => m.forward(seqs, which))
    }

    pub fn step(&mut self, seqs: &[SeqInput<'_>], greedy: &[bool]) -> Result<Vec<Next>> {
        each!(self, m => m.step(seqs, greedy))
    }

    pub fn config(&self) -> &ModelConfig {
        each!(self, m => m.config())
    }

    pub fn plan(&self) -> &TpPlan {
        each!(self, m => m.plan())
    }

    pub fn weight_bytes(&self) -> usize {
        each!(self, m => m.weight_bytes())
    }
}
