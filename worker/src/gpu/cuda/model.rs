//! The LLaMA model on one GPU (one tensor-parallel rank's share): weights
//! and the paged KV cache in T (bf16 or f16) in device memory, the residual
//! stream and every sum in f32. A step is the CPU engine's step, kernel for
//! kernel: the same inputs (`SeqInput`), the same cache layout and block
//! tables, the same logits out, so the scheduler above does not know which
//! one it drives.
//!
//! Per layer: RMSNorm (with the previous residual add) → q, k, v products
//! (cuBLAS) → RoPE → cache write → paged attention → o product → all-reduce
//! → RMSNorm with the residual add → gate, up products → SiLU·mul → down
//! product → all-reduce.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device};
use cudarc::driver::CudaSlice;

use super::ops::{AttentionScratch, AttentionShape, DeviceIndex, Elem, Gpu};
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::gpu::launch::{attention_plan, step_index};
use crate::model::{LogitsFor, Rope, SeqInput, TpPlan, WeightDtype, check_step, gather_vocab};
use crate::weights::{Weight, WeightStore};

struct Layer<T> {
    input_norm: CudaSlice<T>,
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    o: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    gate: CudaSlice<T>,
    up: CudaSlice<T>,
    down: CudaSlice<T>,
}

/// A step's activations. Every kernel and product overwrites its output
/// whole, so the buffers are reused as they are while steps keep the same
/// (tokens, logit rows): a decode batch of a steady size allocates nothing.
struct Workspace<T> {
    step: (usize, usize),
    x: CudaSlice<f32>,
    xn: CudaSlice<T>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<T>,
    o: CudaSlice<f32>,
    g: CudaSlice<f32>,
    u: CudaSlice<f32>,
    gu: CudaSlice<T>,
    down: CudaSlice<f32>,
    xf: CudaSlice<T>,
    logits: CudaSlice<f32>,
}

impl<T: Elem> Workspace<T> {
    /// For `(tokens, logit rows)` and widths `[hidden, q, kv, mlp, vocab held]`.
    fn new(gpu: &Gpu, step: (usize, usize), widths: [usize; 5]) -> Result<Self> {
        let (n, rows) = step;
        let [h, qd, kvd, inter, held] = widths;
        Ok(Self {
            step,
            x: gpu.zeros(n * h)?,
            xn: gpu.zeros(n * h)?,
            q: gpu.zeros(n * qd)?,
            k: gpu.zeros(n * kvd)?,
            v: gpu.zeros(n * kvd)?,
            attn: gpu.zeros(n * qd)?,
            o: gpu.zeros(n * h)?,
            g: gpu.zeros(n * inter)?,
            u: gpu.zeros(n * inter)?,
            gu: gpu.zeros(n * inter)?,
            down: gpu.zeros(n * h)?,
            xf: gpu.zeros(rows * h)?,
            logits: gpu.zeros(rows * held)?,
        })
    }
}

/// Where the weights come from.
pub enum Source<'a> {
    /// A checkpoint (any format the CPU engine reads; GGUF quantized
    /// weights are dequantized to T).
    Store(&'a WeightStore),
    /// Uniform random weights generated on the GPU from a seed (the GPU
    /// check's Aquila-7B-shaped model: no download, no host copy).
    Random(u64),
}

pub struct CudaLlama<T: Elem> {
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
    /// Per layer, keys and values `[block][kv_head][slot][head_dim]`.
    cache: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    num_blocks: usize,
    block_size: usize,
    scratch: AttentionScratch,
    /// The last step's buffers, reused while steps keep its shape.
    workspace: Option<Workspace<T>>,
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
    /// `shape` once sliced. Random weights: uniform with the scale of a
    /// 1/√fan-in initialization, norms around 1.
    fn tensor(
        &mut self,
        name: &str,
        dim: usize,
        range: Range<usize>,
        shape: [usize; 2],
    ) -> Result<CudaSlice<T>> {
        let n = shape[0] * shape[1];
        self.bytes += n * std::mem::size_of::<T>();
        (self.progress)(name);
        let store = match self.source {
            Source::Random(seed) => {
                self.seed += 1;
                let mut d = self.gpu.zeros::<T>(n)?;
                let (center, scale) = if shape[0] == 1 {
                    (1.0, 0.05)
                } else {
                    (0.0, 1.0 / (shape[1] as f32).sqrt())
                };
                self.gpu
                    .fill_random(&mut d, seed.wrapping_mul(1000) + self.seed, center, scale)?;
                return Ok(d);
            }
            Source::Store(store) => store,
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
        if t.elem_count() != n {
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
        let host: Vec<T> = host.into_iter().map(T::from_f32).collect();
        self.gpu.upload(&host)
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
            let mut column = |name: &str, rows: &Range<usize>| {
                up.tensor(
                    &format!("{p}.{name}.weight"),
                    0,
                    rows.clone(),
                    [rows.len(), h],
                )
            };
            let (wq, wk, wv) = (
                column("self_attn.q_proj", &q)?,
                column("self_attn.k_proj", &kv)?,
                column("self_attn.v_proj", &kv)?,
            );
            let (gate, upw) = (column("mlp.gate_proj", &i)?, column("mlp.up_proj", &i)?);
            layers.push(Layer {
                input_norm: up.tensor(&format!("{p}.input_layernorm.weight"), 0, 0..h, [1, h])?,
                q: wq,
                k: wk,
                v: wv,
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
                gate,
                up: upw,
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
            cos: gpu.upload(cos)?,
            sin: gpu.upload(sin)?,
            interleaved: rope.interleaved(),
            scratch: AttentionScratch::new(&gpu)?,
            gpu,
            cfg,
            plan,
            comm,
            embed,
            layers,
            norm,
            lm_head,
            cache: Vec::new(),
            workspace: None,
            num_blocks: 0,
            block_size: 1,
            weight_bytes,
            step_bytes,
        })
    }

    /// The paged KV cache: `num_blocks` blocks of `block_size` tokens per
    /// layer, keys and values in T.
    pub fn alloc_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        let width = self.plan.kv_heads.len() * self.cfg.head_dim;
        let n = num_blocks * block_size * width;
        self.cache.clear();
        for _ in 0..self.cfg.num_layers {
            self.cache
                .push((self.gpu.zeros::<T>(n)?, self.gpu.zeros::<T>(n)?));
        }
        self.num_blocks = num_blocks;
        self.block_size = block_size;
        Ok(())
    }

    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
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
        *buf = self.gpu.upload(&host)?;
        Ok(())
    }

    /// One step, as `Llama::forward`: per sequence, logits `[n, vocab]`.
    pub fn forward(&mut self, seqs: &[SeqInput<'_>], which: LogitsFor) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        check_step(seqs, self.block_size, self.num_blocks, cfg.context_length)?;
        let ix = step_index(seqs, self.block_size, which == LogitsFor::All);
        let n = ix.ids.len();
        let gpu = self.gpu.clone();
        let d = DeviceIndex::upload(&gpu, &ix)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (self.plan.heads.len(), self.plan.kv_heads.len());
        let (qd, kvd, inter) = (heads * hd, kv_heads * hd, self.plan.intermediate.len());
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: self.block_size,
        };
        let plan = attention_plan(n, heads, hd, ix.max_keys, gpu.sms)?;
        let eps = cfg.rms_norm_eps as f32;

        let held = self.plan.vocab.len();
        let step = (n, d.logit_count);
        let ws = match self.workspace.take() {
            Some(ws) if ws.step == step => ws,
            _ => Workspace::new(&gpu, step, [h, qd, kvd, inter, held])?,
        };
        let Workspace {
            mut x,
            mut xn,
            mut q,
            mut k,
            mut v,
            mut attn,
            mut o,
            mut g,
            mut u,
            mut gu,
            mut down,
            mut xf,
            mut logits,
            ..
        } = ws;
        gpu.embedding(&d.ids, n, &self.embed, self.plan.vocab.clone(), h, &mut x)?;
        self.all_reduce(&mut x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // The previous layer's MLP output joins the residual here.
            let delta = (l > 0).then_some(&down);
            gpu.rms_norm(&mut x, delta, None, n, &layer.input_norm, eps, h, &mut xn)?;
            gpu.gemm(&xn, &layer.q, n, h, qd, &mut q)?;
            gpu.gemm(&xn, &layer.k, n, h, kvd, &mut k)?;
            gpu.gemm(&xn, &layer.v, n, h, kvd, &mut v)?;
            gpu.rope(
                &mut q,
                &d.positions,
                n,
                &self.cos,
                &self.sin,
                heads,
                hd,
                self.interleaved,
            )?;
            gpu.rope(
                &mut k,
                &d.positions,
                n,
                &self.cos,
                &self.sin,
                kv_heads,
                hd,
                self.interleaved,
            )?;
            let (ck, cv) = &mut self.cache[l];
            gpu.kv_write(&k, &v, &d.slots, n, kv_heads, hd, self.block_size, ck, cv)?;
            gpu.attention(&q, ck, cv, &d, &plan, shape, &mut self.scratch, &mut attn)?;
            gpu.gemm(&attn, &layer.o, n, qd, h, &mut o)?;
            self.all_reduce(&mut o)?;
            gpu.rms_norm(&mut x, Some(&o), None, n, &layer.post_norm, eps, h, &mut xn)?;
            gpu.gemm(&xn, &layer.gate, n, h, inter, &mut g)?;
            gpu.gemm(&xn, &layer.up, n, h, inter, &mut u)?;
            gpu.silu_mul(&g, &u, n * inter, &mut gu)?;
            gpu.gemm(&gu, &layer.down, n, inter, h, &mut down)?;
            self.all_reduce(&mut down)?;
        }
        // The last MLP output joins the residual in the final norm, for the
        // rows whose logits are wanted.
        let rows = d.logit_count;
        let delta = (!self.layers.is_empty()).then_some(&down);
        gpu.rms_norm(
            &mut x,
            delta,
            Some(&d.logit_rows),
            rows,
            &self.norm,
            eps,
            h,
            &mut xf,
        )?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        gpu.gemm(&xf, head, rows, h, held, &mut logits)?;
        let local = gpu.download(&logits)?;
        self.workspace = Some(Workspace {
            step,
            x,
            xn,
            q,
            k,
            v,
            attn,
            o,
            g,
            u,
            gu,
            down,
            xf,
            logits,
        });
        let logits = gather_vocab(&*self.comm, &self.plan, cfg.vocab_size, local, rows)?;
        let vocab = cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            let count = if which == LogitsFor::All {
                s.tokens.len()
            } else {
                1
            };
            out.push(logits[at * vocab..(at + count) * vocab].to_vec());
            at += count;
        }
        Ok(out)
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

    pub fn forward(&mut self, seqs: &[SeqInput<'_>], which: LogitsFor) -> Result<Vec<Vec<f32>>> {
        each!(self, m => m.forward(seqs, which))
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
