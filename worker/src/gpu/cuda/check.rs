//! The GPU check (`aquila gpu-check`), for a machine with an NVIDIA GPU and
//! no Rust toolchain: (a) the tiny preset on CPU and GPU, greedy tokens and
//! logits; (b) every kernel against the f64 references of `gpu::reference`
//! on random inputs of several shapes; (c) an Aquila-7B-shaped model with
//! random weights made on the GPU: prefill and decode speed, and batch-1
//! decode against the bandwidth roofline measured in the same run. Each
//! part adds rows to one report; a failed comparison is a row that says so,
//! and the command exits non-zero.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::{CudaLlama, Source};
use super::ops::{AttentionScratch, AttentionShape, DeviceIndex, Elem, Gpu};
use crate::backend::Next;
use crate::comm::SingleRank;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Result, WorkerError};
use crate::gpu::launch::attention_plan;
use crate::gpu::reference::{self, PagedCase, columns, max_rel_error};
use crate::model::{LogitsFor, SeqInput, WeightDtype};

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub part: &'static str,
    pub what: String,
    pub value: String,
    /// None for a measurement, Some(pass) for a comparison.
    pub pass: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    fn compare(&mut self, part: &'static str, what: String, err: f64, tolerance: f64) {
        self.rows.push(Row {
            part,
            what,
            value: format!("max rel. error {err:.2e} (≤ {tolerance:.0e})"),
            pass: Some(err <= tolerance),
        });
    }

    fn measure(&mut self, part: &'static str, what: String, value: String) {
        self.rows.push(Row {
            part,
            what,
            value,
            pass: None,
        });
    }

    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.pass != Some(false))
    }
}

/// Relative error a value rounded to T may carry (with sums over a few
/// thousand terms in f32 on top).
fn tolerance<T: Elem>() -> f64 {
    if T::SUFFIX == "bf16" { 2e-2 } else { 4e-3 }
}

pub(super) fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `v` as the kernel sees it after rounding to T.
fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

pub(super) fn to_f32<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn up<T: Elem>(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<T>> {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    gpu.upload(&t)
}

/// (b): each kernel on random inputs against its reference.
pub fn kernels<T: Elem>(gpu: &Gpu, report: &mut Report) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let s = T::SUFFIX;
    let tol = tolerance::<T>();
    // RMSNorm with the residual add and row picking.
    for (rows, dim) in [(1usize, 576usize), (7, 4096), (33, 5120)] {
        let (x, delta, w) = (
            random(rows * dim, &mut rng),
            random(rows * dim, &mut rng),
            random(dim, &mut rng),
        );
        let picked: Vec<u32> = (0..rows as u32).rev().step_by(2).collect();
        let mut dx = gpu.upload(&x)?;
        let dd = gpu.upload(&delta)?;
        let dr = gpu.upload(&picked)?;
        let dw = up::<T>(gpu, &w)?;
        let mut out = gpu.zeros::<T>(picked.len() * dim)?;
        gpu.rms_norm(
            &mut dx,
            Some(&dd),
            Some(&dr),
            picked.len(),
            &dw,
            1e-6,
            dim,
            &mut out,
        )?;
        let (after, want) = reference::rms_norm(&x, Some(&delta), &picked, &rounded::<T>(&w), 1e-6);
        let got = to_f32(&gpu.download(&out)?);
        report.compare(
            "kernels",
            format!("rms_norm_{s} {rows}×{dim}"),
            max_rel_error(&got, &want),
            tol,
        );
        report.compare(
            "kernels",
            format!("rms_norm_{s} residual {rows}×{dim}"),
            max_rel_error(&gpu.download(&dx)?, &after),
            1e-6,
        );
    }
    // SiLU · up, rows of [gate | up].
    let (rows, inter) = (3usize, 11008usize);
    let gu = random(rows * 2 * inter, &mut rng);
    let (g, u): (Vec<f32>, Vec<f32>) = (0..rows * inter)
        .map(|i| {
            (
                gu[i / inter * 2 * inter + i % inter],
                gu[i / inter * 2 * inter + inter + i % inter],
            )
        })
        .unzip();
    let dgu = gpu.upload(&gu)?;
    let mut out = gpu.zeros::<T>(rows * inter)?;
    gpu.silu_mul(&dgu, rows, inter, &mut out)?;
    let err = max_rel_error(&to_f32(&gpu.download(&out)?), &reference::silu_mul(&g, &u));
    report.compare("kernels", format!("silu_mul_{s} 3×11008"), err, tol);
    // Embedding, a rank holding ids 100..400.
    let (hidden, held) = (256usize, 300usize);
    let table = random(held * hidden, &mut rng);
    let ids: Vec<u32> = vec![100, 5, 399, 400, 250];
    let (dt, di) = (up::<T>(gpu, &table)?, gpu.upload(&ids)?);
    let mut out = gpu.zeros::<f32>(ids.len() * hidden)?;
    gpu.embedding(&di, ids.len(), &dt, 100..400, hidden, &mut out)?;
    let want = reference::embedding(&ids, &rounded::<T>(&table), 100, hidden);
    report.compare(
        "kernels",
        format!("embedding_{s}"),
        max_rel_error(&gpu.download(&out)?, &want),
        0.0,
    );
    // Matrix products through cuBLAS.
    for (rows, input, output) in [
        (1usize, 4096usize, 4096usize),
        (17, 4096, 11008),
        (64, 11008, 4096),
    ] {
        let (x, w) = (
            random(rows * input, &mut rng),
            random(output * input, &mut rng),
        );
        let (dx, dw) = (up::<T>(gpu, &x)?, up::<T>(gpu, &w)?);
        let mut y = gpu.zeros::<f32>(rows * output)?;
        gpu.gemm(&dx, &dw, rows, input, output, &mut y)?;
        let (xr, wr) = (rounded::<T>(&x), rounded::<T>(&w));
        let want: Vec<f64> = (0..rows)
            .flat_map(|r| {
                let (xr, wr) = (&xr, &wr);
                (0..output).map(move |o| {
                    (0..input)
                        .map(|i| xr[r * input + i] as f64 * wr[o * input + i] as f64)
                        .sum::<f64>()
                })
            })
            .collect();
        let err = max_rel_error(&gpu.download(&y)?, &want);
        report.compare(
            "kernels",
            format!("gemm_{s} {rows}×{input} · {output}×{input}ᵀ"),
            err,
            1e-3,
        );
    }
    attention::<T>(gpu, report, &mut rng)
}

/// RoPE with the cache write, and paged attention: grouped-query and
/// plain heads, both RoPE pair layouts, decodes with short and long
/// contexts (several splits), and a prefill chunk after cached tokens,
/// blocks in a shuffled order; q read from rows of the fused q/k/v product.
fn attention<T: Elem>(gpu: &Gpu, report: &mut Report, rng: &mut ChaCha8Rng) -> Result<()> {
    let s = T::SUFFIX;
    let bs = 16usize;
    let theta = 10000.0;
    for (heads, kv_heads, hd, interleaved) in [
        (32usize, 32usize, 128usize, false),
        (9, 3, 64, true),
        (32, 8, 128, false),
    ] {
        // (cached tokens, new tokens) per sequence.
        let case = PagedCase::new(&[(0, 1), (16, 1), (4000, 1), (300, 37)], bs, rng);
        let num_blocks = case.num_blocks;
        let (qd, width) = (heads * hd, kv_heads * hd);
        let row = qd + 2 * width;
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        let style = if interleaved {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Half
        };
        let rope = crate::model::Rope::new(hd, 4096, theta, style);
        let (cos, sin) = rope.tables();
        let (dcos, dsin) = (gpu.upload(cos)?, gpu.upload(sin)?);
        let mut ck = gpu.zeros::<T>(num_blocks * bs * width)?;
        let mut cv = gpu.zeros::<T>(num_blocks * bs * width)?;
        // Every position (cached and new) through the fused RoPE and cache
        // write, as steps would have written them.
        let fill = case.fill();
        let tokens = fill.ids.len();
        let qkv = random(tokens * row, rng);
        let part = |from: usize, len: usize| columns(&qkv, row, from, len);
        let (q, k, v) = (part(0, qd), part(qd, width), part(qd + width, width));
        let mut dqkv = gpu.upload(&qkv)?;
        let dfill = DeviceIndex::upload(gpu, &fill)?;
        gpu.rope_kv_write(
            &mut dqkv,
            &dfill,
            &dcos,
            &dsin,
            shape,
            interleaved,
            &mut ck,
            &mut cv,
        )?;
        let after = gpu.download(&dqkv)?;
        let q_after = columns(&after, row, 0, qd);
        let q_want = reference::rope(&q, &fill.positions, heads, hd, theta, interleaved);
        report.compare(
            "kernels",
            format!("rope_kv_write_{s} q in place, {heads}×{hd} interleaved={interleaved}"),
            max_rel_error(&q_after, &q_want),
            1e-5,
        );
        // The cache as the GPU wrote it, and where each token's rows went.
        let (got_k, got_v) = (to_f32(&gpu.download(&ck)?), to_f32(&gpu.download(&cv)?));
        let k_want = reference::rope(&k, &fill.positions, kv_heads, hd, theta, interleaved);
        let v_want = rounded::<T>(&v);
        let (k_got, v_got) = (
            case.gather(&fill, &got_k, kv_heads, hd),
            case.gather(&fill, &got_v, kv_heads, hd),
        );
        report.compare(
            "kernels",
            format!("rope_kv_write_{s} keys in their slots, {kv_heads}×{hd}"),
            max_rel_error(&k_got, &k_want),
            tolerance::<T>(),
        );
        report.compare(
            "kernels",
            format!("rope_kv_write_{s} values in their slots, {kv_heads}×{hd}"),
            if v_got == v_want { 0.0 } else { 1.0 },
            0.0,
        );

        // The step: each sequence's new tokens attend their whole prefix;
        // q is the first part of rows of a fused product.
        let ix = case.step();
        let rows_q = random(ix.ids.len() * row, rng);
        let q = columns(&rows_q, row, 0, qd);
        let d = DeviceIndex::upload(gpu, &ix)?;
        let plan = attention_plan(ix.ids.len(), heads, hd, ix.max_keys, gpu.sms)?;
        let dq = gpu.upload(&rows_q)?;
        let mut out = gpu.zeros::<T>(ix.ids.len() * qd)?;
        let mut scratch = AttentionScratch::new(gpu)?;
        gpu.attention(&dq, row, &ck, &cv, &d, &plan, shape, &mut scratch, &mut out)?;
        let want = reference::attention(&q, &got_k, &got_v, &ix, heads, kv_heads, hd, bs);
        let err = max_rel_error(&to_f32(&gpu.download(&out)?), &want);
        report.compare(
            "kernels",
            format!(
                "attention_{s} {heads}/{kv_heads} heads ×{hd}, contexts 1–4001, {} splits",
                plan.max_splits
            ),
            err,
            tolerance::<T>(),
        );
        // The same step through the tiled prefill kernel.
        let prefill = plan.with_prefill(&ix, heads, hd);
        if prefill.prefill.is_some() {
            let mut out = gpu.zeros::<T>(ix.ids.len() * qd)?;
            gpu.attention(
                &dq,
                row,
                &ck,
                &cv,
                &d,
                &prefill,
                shape,
                &mut scratch,
                &mut out,
            )?;
            report.compare(
                "kernels",
                format!("attention_prefill_{s} {heads}/{kv_heads} heads ×{hd}, tiles of 16 rows"),
                max_rel_error(&to_f32(&gpu.download(&out)?), &want),
                tolerance::<T>(),
            );
        }
        // One decode row of a short context: a single split, no merge.
        let ix1 = case.step_of(1);
        let plan1 = attention_plan(1, heads, hd, ix1.max_keys, 1)?;
        let d1 = DeviceIndex::upload(gpu, &ix1)?;
        let mut out1 = gpu.zeros::<T>(qd)?;
        gpu.attention(
            &dq,
            row,
            &ck,
            &cv,
            &d1,
            &plan1,
            shape,
            &mut scratch,
            &mut out1,
        )?;
        let want1 = reference::attention(&q[..qd], &got_k, &got_v, &ix1, heads, kv_heads, hd, bs);
        report.compare(
            "kernels",
            format!(
                "attention_{s} {heads}/{kv_heads} heads ×{hd}, one row, {} split",
                plan1.max_splits
            ),
            max_rel_error(&to_f32(&gpu.download(&out1)?), &want1),
            tolerance::<T>(),
        );
    }
    Ok(())
}

/// (a): the tiny preset, greedy on the CPU engine (weights rounded to T)
/// and on the GPU from the same files: the same tokens, logits close.
pub fn tiny<T: Elem>(gpu: &Arc<Gpu>, report: &mut Report) -> Result<()> {
    use crate::presets::{GgufType, Preset, WeightFormat, make};
    let dir = std::env::temp_dir().join(format!(
        "aquila-gpu-check-{}-{}",
        std::process::id(),
        T::SUFFIX
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| WorkerError::io("a temp folder", e))?;
    make(
        Preset::Tiny,
        &dir,
        7,
        WeightFormat::Safetensors,
        1,
        GgufType::F32,
    )?;
    let dtype = if T::SUFFIX == "bf16" {
        WeightDtype::Bf16
    } else {
        WeightDtype::F16
    };
    let opts = crate::loader::LoadOptions {
        dtype,
        name: None,
        tp_invariant: false,
    };
    let cpu = crate::loader::load(&dir, &opts, Arc::new(SingleRank))?.model;
    let store = crate::weights::WeightStore::open_hf(&dir)?;
    let cfg: ModelConfig = crate::loader::read_config(&dir)?;
    let mut gpu_model = CudaLlama::<T>::load(
        gpu.clone(),
        cfg.clone(),
        &Source::Store(&store),
        Arc::new(SingleRank),
        &mut |_| {},
    )?;
    gpu_model.alloc_cache(16, 16)?;
    let prompt: Vec<u32> = vec![1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];
    let n = 48;
    let mut kv = cpu.new_kv(16, 16);
    let logits = |l: Vec<Vec<f32>>| l.into_iter().map(Next::Logits).collect();
    let (cpu_first, cpu_tokens) = greedy_steps(&prompt, n, 16, |seqs| {
        cpu.forward(&mut kv, seqs, LogitsFor::Last).map(logits)
    })?;
    let (gpu_first, gpu_tokens) = greedy_steps(&prompt, n, 16, |seqs| {
        gpu_model.forward(seqs, LogitsFor::Last).map(logits)
    })?;
    // The same model the way a worker loads it (`--device cuda`): the
    // loader, the KV cache sized apart, the engine's Backend, CUDA graphs;
    // the tokens picked on the host from the logits, and on the GPU.
    let (served, picked) = served_greedy(&dir, &opts, &prompt, n)?;
    graphs_vs_eager::<T>(gpu, &store, &cfg, report)?;
    let _ = std::fs::remove_dir_all(&dir);
    for (how, tokens) in [
        ("the logits sent to the host", &served),
        ("picked on the GPU", &picked),
    ] {
        report.rows.push(Row {
            part: "tiny",
            what: format!(
                "greedy {n} tokens through --device cuda's Backend, CUDA graphs on, {how} ({})",
                T::SUFFIX
            ),
            value: if *tokens == gpu_tokens {
                "identical to the GPU model's".into()
            } else {
                format!("{tokens:?} vs {gpu_tokens:?}")
            },
            pass: Some(*tokens == gpu_tokens),
        });
    }
    let same = gpu_tokens == cpu_tokens;
    report.rows.push(Row {
        part: "tiny",
        what: format!(
            "greedy {n} tokens, CPU ({}) vs GPU ({})",
            T::SUFFIX,
            T::SUFFIX
        ),
        value: if same {
            "identical".into()
        } else {
            let at = gpu_tokens
                .iter()
                .zip(&cpu_tokens)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            format!(
                "differ from token {at}: {:?} vs {:?}",
                &gpu_tokens[at..],
                &cpu_tokens[at..]
            )
        },
        pass: Some(same),
    });
    let first: Vec<f64> = cpu_first.iter().map(|&v| v as f64).collect();
    let err = max_rel_error(&gpu_first, &first);
    report.compare(
        "tiny",
        format!("first-step logits, CPU vs GPU ({})", T::SUFFIX),
        err,
        tolerance::<T>(),
    );
    Ok(())
}

/// Greedy tokens through the Backend a worker drives (`--device cuda`,
/// CUDA graphs on): (with the logits sent to the host, picked on the GPU).
fn served_greedy(
    dir: &std::path::Path,
    opts: &crate::loader::LoadOptions,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    use crate::backend::{Device, load};
    let mut loaded = load(dir, opts, Arc::new(SingleRank), Device::Cuda)?;
    loaded.model.set_cuda_graph_max_batch(16);
    let mut backend = loaded.model.into_backend(8, 16, crate::kv::KvDtype::F32)?;
    // Each run rewrites the same cache blocks from position 0.
    let mut run = |greedy: bool| -> Result<Vec<u32>> {
        let (_, tokens) = greedy_steps(prompt, n, 8, |seqs| backend.step(seqs, &[greedy]))?;
        Ok(tokens)
    };
    Ok((run(false)?, run(true)?))
}

/// Decode batches through CUDA graphs (three sequences, run as a graph of
/// four with a padding row, across two key buckets) against the same
/// batches launched kernel by kernel. The graphs' run is fed the eager
/// run's tokens, so every step compares logits of the same inputs: a
/// product over 4 rows instead of 3 may round differently, and greedy
/// tokens at a near-tie could part for that alone.
fn graphs_vs_eager<T: Elem>(
    gpu: &Arc<Gpu>,
    store: &crate::weights::WeightStore,
    cfg: &ModelConfig,
    report: &mut Report,
) -> Result<()> {
    let load = |graphs: usize| -> Result<CudaLlama<T>> {
        let source = Source::Store(store);
        let mut m = CudaLlama::<T>::load(
            gpu.clone(),
            cfg.clone(),
            &source,
            Arc::new(SingleRank),
            &mut |_| {},
        )?;
        m.alloc_cache(48, 16)?;
        m.set_graph_max_batch(graphs);
        Ok(m)
    };
    let prompts: [&[u32]; 3] = [
        &[1, 72, 101],
        &[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        &[1, 300],
    ];
    let steps = 80;
    // Greedy, or following `forced` (tokens per sequence): (tokens, logits per step).
    type Run = (Vec<Vec<u32>>, Vec<Vec<f32>>);
    let run = |m: &mut CudaLlama<T>, forced: Option<&[Vec<u32>]>| -> Result<Run> {
        let tables: Vec<Vec<u32>> = (0..3u32)
            .map(|s| (s * 16..(s + 1) * 16).collect())
            .collect();
        let mut tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut starts = [0usize; 3];
        let (mut out, mut all) = (vec![Vec::new(); 3], Vec::new());
        for step in 0..steps {
            let seqs: Vec<SeqInput<'_>> = (0..3)
                .map(|s| SeqInput {
                    tokens: &tokens[s],
                    start: starts[s],
                    table: &tables[s],
                })
                .collect();
            let logits = m.forward(&seqs, LogitsFor::Last)?;
            for s in 0..3 {
                starts[s] += tokens[s].len();
                let next =
                    forced.map_or_else(|| crate::sampler::argmax(&logits[s]), |f| f[s][step]);
                out[s].push(next);
                tokens[s] = vec![next];
            }
            all.push(logits.concat());
        }
        Ok((out, all))
    };
    let (eager_tokens, eager_logits) = run(&mut load(0)?, None)?;
    let mut graphed = load(8)?;
    let (_, graph_logits) = run(&mut graphed, Some(&eager_tokens))?;
    let captured = graphed.graphs_captured();
    let err = eager_logits
        .iter()
        .zip(&graph_logits)
        .map(|(e, g)| max_rel_error(g, &e.iter().map(|&v| v as f64).collect::<Vec<_>>()))
        .fold(0f64, f64::max);
    report.rows.push(Row {
        part: "tiny",
        what: format!(
            "decode batch of 3 as CUDA graphs, {steps} steps ({})",
            T::SUFFIX
        ),
        value: format!("{captured} graphs captured (2 key buckets)"),
        pass: Some(captured == 2),
    });
    report.compare(
        "tiny",
        format!(
            "every step's logits, CUDA graphs vs kernel by kernel ({})",
            T::SUFFIX
        ),
        err,
        tolerance::<T>(),
    );
    Ok(())
}

/// Greedy decoding of `n` tokens after `prompt`, one sequence on blocks
/// `0..blocks`, each step through `forward`: (the first step's logits, the
/// tokens).
fn greedy_steps(
    prompt: &[u32],
    n: usize,
    blocks: u32,
    mut forward: impl FnMut(&[SeqInput<'_>]) -> Result<Vec<Next>>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let table: Vec<u32> = (0..blocks).collect();
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    let (mut first, mut out) = (None, Vec::new());
    for _ in 0..n {
        let result = forward(&[SeqInput {
            tokens: &tokens,
            start,
            table: &table,
        }])?;
        let next = match result.into_iter().next() {
            Some(Next::Token(id)) => id,
            Some(Next::Logits(last)) => {
                let id = crate::sampler::argmax(&last);
                first.get_or_insert(last);
                id
            }
            None => return Err(WorkerError::Config("a step returned nothing".into())),
        };
        start += tokens.len();
        out.push(next);
        tokens = vec![next];
    }
    Ok((first.unwrap_or_default(), out))
}

/// The shape of Aquila-7B (DESIGN.md).
pub fn aquila_7b() -> ModelConfig {
    ModelConfig {
        architecture: "AquilaForCausalLM".into(),
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        vocab_size: 100_008,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        context_length: 2048,
        tie_word_embeddings: false,
        rope_style: RopeStyle::Half,
    }
}

/// Device-to-device copy bandwidth in bytes/s (read + write, as the copy
/// moves both), 1 GiB copied 10 times.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let n = 1usize << 28; // f32s: 1 GiB
    let src = gpu.zeros::<f32>(n)?;
    let mut dst = gpu.zeros::<f32>(n)?;
    let copy = |dst: &mut CudaSlice<f32>| {
        gpu.stream
            .memcpy_dtod(&src, dst)
            .map_err(|e| super::ops::cuda_err("copy", e))
    };
    copy(&mut dst)?;
    let ms = gpu.time(|| (0..10).try_for_each(|_| copy(&mut dst)))?;
    Ok(2.0 * 10.0 * (n * 4) as f64 / (ms as f64 / 1e3))
}

/// (c): the Aquila-7B shape with random weights on the GPU.
pub fn speed<T: Elem>(gpu: &Arc<Gpu>, report: &mut Report, batches: &[usize]) -> Result<()> {
    let cfg = aquila_7b();
    let bs = 16;
    let (prompt, new_tokens) = (512usize, 64usize);
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(8);
    // Blocks for the largest decode batch at 64 cached tokens + the steps, or 8 × 512.
    let per_seq = (64 + new_tokens + 1).div_ceil(bs);
    let num_blocks = (max_batch * per_seq).max(8 * (prompt / bs + 1));
    let started = Instant::now();
    let mut m = CudaLlama::<T>::load(
        gpu.clone(),
        cfg,
        &Source::Random(1),
        Arc::new(SingleRank),
        &mut |_| {},
    )?;
    m.alloc_cache(num_blocks, bs)?;
    gpu.sync()?;
    report.measure(
        "aquila-7b",
        format!("random {} weights made on the GPU", T::SUFFIX),
        format!(
            "{:.1} GB in {:.1} s",
            m.weight_bytes() as f64 / 1e9,
            started.elapsed().as_secs_f64()
        ),
    );
    let tables: Vec<Vec<u32>> = (0..max_batch.max(8))
        .map(|s| {
            let per = if s < 8 { prompt / bs + 1 } else { per_seq };
            let base = if s < 8 { s * (prompt / bs + 1) } else { 0 };
            (base..base + per).map(|b| b as u32).collect()
        })
        .collect();
    // Prefill: 8 sequences of 512 tokens in one step.
    let ids: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919) % 100_000).collect();
    let seqs: Vec<SeqInput<'_>> = (0..8)
        .map(|s| SeqInput {
            tokens: &ids,
            start: 0,
            table: &tables[s],
        })
        .collect();
    m.forward(&seqs, LogitsFor::Last)?; // warm-up
    let t = Instant::now();
    m.forward(&seqs, LogitsFor::Last)?;
    let secs = t.elapsed().as_secs_f64();
    report.measure(
        "aquila-7b",
        "prefill 8 × 512 tokens".into(),
        format!("{:.0} tokens/s", 8.0 * prompt as f64 / secs),
    );
    // Decode at each batch: blocks shared from 0 (contents do not matter for speed).
    let bw = copy_bandwidth(gpu)?;
    report.measure(
        "aquila-7b",
        "device-to-device copy bandwidth".into(),
        format!("{:.0} GB/s", bw / 1e9),
    );
    let decode_tables: Vec<Vec<u32>> = (0..max_batch)
        .map(|s| {
            ((s * per_seq)..(s + 1) * per_seq)
                .map(|b| b as u32)
                .collect()
        })
        .collect();
    // Contexts of 65–98 keys: one key bucket for the graphs throughout.
    // Each batch three ways: as the engine runs greedy requests (graphs,
    // the tokens picked on the GPU: what transformers' greedy `generate`
    // does too), without graphs, and with every logit sent to the host (as
    // for requests that sample or want log probabilities).
    let first = 64;
    let variants = [
        (true, true, ""),
        (false, true, ", without CUDA graphs"),
        (true, false, ", logits to the host"),
    ];
    for &batch in batches {
        for (graphs, picked, label) in variants {
            m.set_graph_max_batch(if graphs { batch } else { 0 });
            let greedy = vec![picked; batch];
            let steps = 32;
            let one = [1u32];
            let mut time = 0.0;
            // Two untimed steps: the first runs eagerly, the second is captured.
            for step in 0..steps + 2 {
                let seqs: Vec<SeqInput<'_>> = (0..batch)
                    .map(|s| SeqInput {
                        tokens: &one,
                        start: first + step,
                        table: &decode_tables[s],
                    })
                    .collect();
                let t = Instant::now();
                m.step(&seqs, &greedy)?;
                if step >= 2 {
                    time += t.elapsed().as_secs_f64();
                }
            }
            let per_step = time / steps as f64;
            let mut value = format!(
                "{:.0} tokens/s ({:.2} ms a step)",
                batch as f64 / per_step,
                per_step * 1e3
            );
            if batch == 1 {
                let floor = m.step_bytes() as f64 / bw;
                value += &format!(
                    ", {:.0}% of the roofline ({:.2} ms)",
                    100.0 * floor / per_step,
                    floor * 1e3
                );
            }
            report.measure("aquila-7b", format!("decode, batch {batch}{label}"), value);
        }
    }
    Ok(())
}

/// Runs every part on GPU 0 and returns the report. A part that stops
/// with an error is a failed row with the error, and the next part runs:
/// one run on a borrowed GPU should say as much as it can.
pub fn run(skip_speed: bool, batches: &[usize]) -> Result<Report> {
    let gpu = Arc::new(Gpu::new(0)?);
    let mut report = Report::default();
    report.measure(
        "device",
        "GPU".into(),
        format!("{} ({} SMs)", gpu.name, gpu.sms),
    );
    report.measure("device", "kernels".into(), gpu.kernels.clone());
    type Part<'a> = (&'static str, Box<dyn Fn(&mut Report) -> Result<()> + 'a>);
    let mut parts: Vec<Part<'_>> = vec![
        ("kernels bf16", Box::new(|r| kernels::<bf16>(&gpu, r))),
        ("kernels f16", Box::new(|r| kernels::<f16>(&gpu, r))),
        ("tiny bf16", Box::new(|r| tiny::<bf16>(&gpu, r))),
        ("tiny f16", Box::new(|r| tiny::<f16>(&gpu, r))),
    ];
    if !skip_speed {
        parts.push((
            "aquila-7b bf16",
            Box::new(|r| speed::<bf16>(&gpu, r, batches)),
        ));
    }
    for (name, part) in parts {
        let started = Instant::now();
        eprintln!("gpu-check: {name}...");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part(&mut report)));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>().map_or("?", |s| s.as_str())
            )),
        };
        if let Some(value) = error {
            report.rows.push(Row {
                part: "error",
                what: name.to_string(),
                value,
                pass: Some(false),
            });
        }
        eprintln!(
            "gpu-check: {name} done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(report)
}
