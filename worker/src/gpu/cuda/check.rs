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
use crate::comm::SingleRank;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Result, WorkerError};
use crate::gpu::launch::{attention_plan, step_index};
use crate::gpu::reference::{self, max_rel_error};
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

fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `v` as the kernel sees it after rounding to T.
fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn to_f32<T: Elem>(v: &[T]) -> Vec<f32> {
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
    // RoPE, both pair layouts.
    for (heads, hd, interleaved) in [(9usize, 64usize, false), (32, 128, true), (32, 128, false)] {
        let positions: Vec<u32> = vec![0, 1, 77, 1999];
        let x = random(positions.len() * heads * hd, &mut rng);
        let style = if interleaved {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Half
        };
        let rope = crate::model::Rope::new(hd, 2048, 10000.0, style);
        let (cos, sin) = rope.tables();
        let mut dx = gpu.upload(&x)?;
        let (dc, ds, dp) = (gpu.upload(cos)?, gpu.upload(sin)?, gpu.upload(&positions)?);
        gpu.rope(
            &mut dx,
            &dp,
            positions.len(),
            &dc,
            &ds,
            heads,
            hd,
            interleaved,
        )?;
        let want = reference::rope(&x, &positions, heads, hd, 10000.0, interleaved);
        let err = max_rel_error(&gpu.download(&dx)?, &want);
        report.compare(
            "kernels",
            format!("rope_f32 {heads}×{hd} interleaved={interleaved}"),
            err,
            1e-5,
        );
    }
    // SiLU · up.
    let n = 3 * 11008;
    let (g, u) = (random(n, &mut rng), random(n, &mut rng));
    let (dg, du) = (gpu.upload(&g)?, gpu.upload(&u)?);
    let mut out = gpu.zeros::<T>(n)?;
    gpu.silu_mul(&dg, &du, n, &mut out)?;
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

/// kv_write and paged attention: grouped-query and plain heads, decodes
/// with short and long contexts (several splits), and a prefill chunk
/// after cached tokens, blocks in a shuffled order.
fn attention<T: Elem>(gpu: &Gpu, report: &mut Report, rng: &mut ChaCha8Rng) -> Result<()> {
    let s = T::SUFFIX;
    let bs = 16usize;
    for (heads, kv_heads, hd) in [(32usize, 32usize, 128usize), (9, 3, 64), (32, 8, 128)] {
        // (cached tokens, new tokens) per sequence.
        let seqs_shape: [(usize, usize); 4] = [(0, 1), (16, 1), (4000, 1), (300, 37)];
        let blocks_needed: usize = seqs_shape.iter().map(|(c, n)| (c + n).div_ceil(bs)).sum();
        let num_blocks = blocks_needed + 5;
        let mut order: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut tables = Vec::new();
        let mut next = 0;
        for (c, n) in seqs_shape {
            let k = (c + n).div_ceil(bs);
            tables.push(order[next..next + k].to_vec());
            next += k;
        }
        let width = kv_heads * hd;
        let mut ck = gpu.zeros::<T>(num_blocks * bs * width)?;
        let mut cv = gpu.zeros::<T>(num_blocks * bs * width)?;
        // Fill every position (cached and new) through kv_write, as a step would.
        let all: Vec<SeqInput<'_>> = seqs_shape
            .iter()
            .zip(&tables)
            .map(|(&(c, n), t)| SeqInput {
                tokens: &ZEROS[..c + n],
                start: 0,
                table: t,
            })
            .collect();
        let fill = step_index(&all, bs, true);
        let (k, v) = (
            random(fill.ids.len() * width, rng),
            random(fill.ids.len() * width, rng),
        );
        let (dk, dv, dslots) = (gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&fill.slots)?);
        gpu.kv_write(
            &dk,
            &dv,
            &dslots,
            fill.ids.len(),
            kv_heads,
            hd,
            bs,
            &mut ck,
            &mut cv,
        )?;
        // The reference's cache: the same values, rounded, in the same places.
        let (kr, vr) = (rounded::<T>(&k), rounded::<T>(&v));
        let mut host_k = vec![0f32; num_blocks * bs * width];
        let mut host_v = host_k.clone();
        for (t, &slot) in fill.slots.iter().enumerate() {
            let (blk, off) = (slot as usize / bs, slot as usize % bs);
            for h in 0..kv_heads {
                let at = ((blk * kv_heads + h) * bs + off) * hd;
                host_k[at..at + hd].copy_from_slice(&kr[(t * kv_heads + h) * hd..][..hd]);
                host_v[at..at + hd].copy_from_slice(&vr[(t * kv_heads + h) * hd..][..hd]);
            }
        }
        let got_k = to_f32(&gpu.download(&ck)?);
        let exact = got_k == host_k && to_f32(&gpu.download(&cv)?) == host_v;
        report.compare(
            "kernels",
            format!("kv_write_{s} {kv_heads}×{hd}"),
            if exact { 0.0 } else { 1.0 },
            0.0,
        );

        // The step: each sequence's new tokens attend their whole prefix.
        let step: Vec<SeqInput<'_>> = seqs_shape
            .iter()
            .zip(&tables)
            .map(|(&(c, n), t)| SeqInput {
                tokens: &ZEROS[..n],
                start: c,
                table: t,
            })
            .collect();
        let ix = step_index(&step, bs, true);
        let q = random(ix.ids.len() * heads * hd, rng);
        let d = DeviceIndex::upload(gpu, &ix)?;
        let plan = attention_plan(ix.ids.len(), heads, hd, ix.max_keys, gpu.sms)?;
        let dq = gpu.upload(&q)?;
        let mut out = gpu.zeros::<T>(ix.ids.len() * heads * hd)?;
        let mut scratch = AttentionScratch::new(gpu)?;
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        gpu.attention(&dq, &ck, &cv, &d, &plan, shape, &mut scratch, &mut out)?;
        let want = reference::attention(&q, &host_k, &host_v, &ix, heads, kv_heads, hd, bs);
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
    }
    Ok(())
}

static ZEROS: [u32; 4096] = [0; 4096];

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
        cfg,
        &Source::Store(&store),
        Arc::new(SingleRank),
        &mut |_| {},
    )?;
    gpu_model.alloc_cache(16, 16)?;
    let prompt: Vec<u32> = vec![1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];
    let n = 48;
    let mut kv = cpu.new_kv(16, 16);
    let (cpu_first, cpu_tokens) = greedy_steps(&prompt, n, 16, |seqs| {
        cpu.forward(&mut kv, seqs, LogitsFor::Last)
    })?;
    let (gpu_first, gpu_tokens) = greedy_steps(&prompt, n, 16, |seqs| {
        gpu_model.forward(seqs, LogitsFor::Last)
    })?;
    // The same model the way a worker loads it (`--device cuda`): the
    // loader, the KV cache sized apart, the engine's Backend.
    let served = served_greedy(&dir, &opts, &prompt, n)?;
    let _ = std::fs::remove_dir_all(&dir);
    report.rows.push(Row {
        part: "tiny",
        what: format!(
            "greedy {n} tokens through --device cuda's Backend ({})",
            T::SUFFIX
        ),
        value: if served == gpu_tokens {
            "identical to the GPU model's".into()
        } else {
            format!("{served:?} vs {gpu_tokens:?}")
        },
        pass: Some(served == gpu_tokens),
    });
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

fn served_greedy(
    dir: &std::path::Path,
    opts: &crate::loader::LoadOptions,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>> {
    use crate::backend::{Device, load};
    let loaded = load(dir, opts, Arc::new(SingleRank), Device::Cuda)?;
    let mut backend = loaded.model.into_backend(8, 16, crate::kv::KvDtype::F32)?;
    let (_, tokens) = greedy_steps(prompt, n, 8, |seqs| backend.forward(seqs, LogitsFor::Last))?;
    Ok(tokens)
}

/// Greedy decoding of `n` tokens after `prompt`, one sequence on blocks
/// `0..blocks`, each step through `forward`: (the first step's logits, the
/// tokens).
fn greedy_steps(
    prompt: &[u32],
    n: usize,
    blocks: u32,
    mut forward: impl FnMut(&[SeqInput<'_>]) -> Result<Vec<Vec<f32>>>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let table: Vec<u32> = (0..blocks).collect();
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    let (mut first, mut out) = (None, Vec::new());
    for _ in 0..n {
        let mut logits = forward(&[SeqInput {
            tokens: &tokens,
            start,
            table: &table,
        }])?;
        let last = logits.pop().unwrap_or_default();
        let next = crate::sampler::argmax(&last);
        first.get_or_insert(last);
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
    // Blocks for the largest decode batch at 32 prompt tokens + new_tokens, or 8 × 512.
    let per_seq = (32 + new_tokens + 1).div_ceil(bs);
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
    for &batch in batches {
        let steps = new_tokens.min(32);
        let one = [1u32];
        let mut time = 0.0;
        for step in 0..steps + 2 {
            let seqs: Vec<SeqInput<'_>> = (0..batch)
                .map(|s| SeqInput {
                    tokens: &one,
                    start: 32 + step,
                    table: &decode_tables[s],
                })
                .collect();
            let t = Instant::now();
            m.forward(&seqs, LogitsFor::Last)?;
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
        report.measure("aquila-7b", format!("decode, batch {batch}"), value);
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
