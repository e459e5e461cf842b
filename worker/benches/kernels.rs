//! `cargo bench -p aquila-worker --bench kernels`: each quantized kernel on
//! the demo model's shapes (and every GGUF type on the `base` preset's MLP
//! shape), on every path this machine runs, as GB/s of weights (as repacked,
//! and as the GGUF file stores them) and GMAC/s, next to the machine's
//! measured read bandwidth and f32 FMA peak. Prints one JSON line per
//! measurement.
//!
//! `AQUILA_BENCH_QUICK=1` runs each measurement briefly (a smoke test);
//! `AQUILA_BENCH_ONLY=float|attention|quant` runs one part, and
//! `AQUILA_BENCH_FORMAT=Q5_K` (GGML's name) only that type's quant lines;
//! `AQUILA_BENCH_CYCLE=1` reads every shape from memory, not only the 7B one.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aquila_worker::model::kernels::{FloatPath, PackedFloat};
use aquila_worker::model::quant::{Format, Isa, PackedMatrix};
use half::f16;

fn main() {
    // As a worker does: freed step buffers stay in the heap (without this,
    // every product with an output over 128 KiB faulted it in afresh).
    aquila_worker::service::init_threads(0);
    let quick = std::env::var_os("AQUILA_BENCH_QUICK").is_some();
    let budget = Duration::from_millis(if quick { 20 } else { 400 });
    let threads = rayon::current_num_threads();
    let bandwidth = read_bandwidth(budget);
    let peak = fma_peak(budget);
    println!(
        "{}",
        serde_json::json!({"machine": {"threads": threads, "read_gb_per_s": bandwidth,
            "f32_fma_gflop_per_s": peak}})
    );
    let only = std::env::var("AQUILA_BENCH_ONLY").ok();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("float") {
        float_kernels(budget);
    }
    if run("attention") {
        attention(budget);
    }
    if !run("quant") {
        return;
    }
    // SmolLM2-135M: ffn up/gate, ffn down, q/o, k/v, and the tied lm_head.
    let shapes = [
        ("ffn_up", Format::Q4_1, 1536, 576),
        ("ffn_down", Format::Q4_1, 576, 1536),
        ("attn_q", Format::Q4_1, 576, 576),
        ("attn_k", Format::Q4_1, 192, 576),
        ("lm_head", Format::Q8_0, 49152, 576),
        ("ffn_up_q4_0", Format::Q4_0, 1536, 576),
    ];
    let base: Vec<(&str, Format, usize, usize)> = Format::ALL
        .into_iter()
        .map(|f| ("base_mlp_up", f, 2048, 768))
        .collect();
    // 7B's MLP (15–48 MB of weights, as GGUF stores them), read from memory
    // as in decoding a real model (see the copies below). Rows 1 and 16 on
    // the SIMD paths only.
    let large: Vec<(&str, Format, usize, usize)> = Format::ALL
        .into_iter()
        .map(|f| ("7b_mlp_up", f, 11008, 4096))
        .collect();
    let only_format = std::env::var("AQUILA_BENCH_FORMAT").ok();
    for (name, format, out, inp) in shapes.into_iter().chain(base).chain(large) {
        if only_format.as_deref().is_some_and(|f| f != format.label()) {
            continue;
        }
        let raw = random_blocks(format, out * inp / format.block_weights());
        let packed = PackedMatrix::from_ggml(format, &raw, out, inp);
        // The 7B shape cycles through copies of its matrix that together
        // pass 128 MiB, four times the L3, so every call reads from memory
        // as decoding a 7B model does (one copy would partly stay cached);
        // AQUILA_BENCH_CYCLE does so for every shape.
        let copies = if name == "7b_mlp_up" || std::env::var_os("AQUILA_BENCH_CYCLE").is_some() {
            (128usize << 20).div_ceil(packed.bytes())
        } else {
            1
        };
        let cycle: Vec<PackedMatrix> = (1..copies)
            .map(|_| PackedMatrix::from_ggml(format, &raw, out, inp))
            .chain(std::iter::once(packed))
            .collect();
        let packed = &cycle[cycle.len() - 1];
        for isa in Isa::available() {
            for rows in [1, 4, 16, 64] {
                if isa == Isa::Scalar && rows > 4 {
                    continue;
                }
                if name == "7b_mlp_up" && (isa == Isa::Scalar || rows == 4 || rows == 64) {
                    continue;
                }
                let x: Vec<f32> = (0..rows * inp)
                    .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                    .collect();
                let mut next = 0;
                let secs = time(budget, || {
                    next = (next + 1) % cycle.len();
                    black_box(cycle[next].matmul_with(isa, black_box(&x), rows));
                });
                let macs = (rows * out * inp) as f64;
                let gguf_bytes = out * inp / format.block_weights() * format.ggml_block_bytes();
                println!(
                    "{}",
                    serde_json::json!({"kernel": name, "format": format.label(),
                        "isa": isa.label(), "rows": rows, "out": out, "in": inp,
                        "us": secs * 1e6,
                        "weight_gb_per_s": packed.bytes() as f64 / secs / 1e9,
                        "gguf_gb_per_s": gguf_bytes as f64 / secs / 1e9,
                        "gmac_per_s": macs / secs / 1e9})
                );
            }
        }
    }
}

/// The float kernel on the `base` preset's shapes (f32 and bf16 weights).
fn float_kernels(budget: Duration) {
    let shapes = [
        ("base_mlp_up", 2048, 768),
        ("base_mlp_down", 768, 2048),
        ("base_attn_q", 768, 768),
        ("base_lm_head", 32000, 768),
    ];
    for (name, out, inp) in shapes {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919) % 2001) as f32 / 1e4 - 0.1)
            .collect();
        let f32w = PackedFloat::from_rows(&w, out, inp);
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let bf16w = PackedFloat::from_rows(&wb, out, inp);
        drop((w, wb));
        for path in FloatPath::available() {
            for rows in [1, 16, 64, 512] {
                if path == FloatPath::Scalar && rows > 16 {
                    continue;
                }
                let x: Vec<f32> = (0..rows * inp)
                    .map(|i| ((i * 31) % 201) as f32 / 100.0 - 1.0)
                    .collect();
                for (dtype, bytes, secs) in [
                    (
                        "f32",
                        f32w.bytes(),
                        time(budget, || {
                            black_box(f32w.matmul_with(path, black_box(&x), rows));
                        }),
                    ),
                    (
                        "bf16",
                        bf16w.bytes(),
                        time(budget, || {
                            black_box(bf16w.matmul_with(path, black_box(&x), rows));
                        }),
                    ),
                ] {
                    println!(
                        "{}",
                        serde_json::json!({"kernel": name, "format": dtype,
                            "isa": path.label(), "rows": rows,
                            "out": out, "in": inp, "us": secs * 1e6,
                            "weight_gb_per_s": bytes as f64 / secs / 1e9,
                            "gflop_per_s": 2.0 * (rows * out * inp) as f64 / secs / 1e9})
                    );
                }
            }
        }
    }
}

/// One decode step's attention on the `base` preset's shape (8 layers, 12
/// heads of 64): 16 sequences of 96 or 512 tokens, or one of 2048, every
/// layer in turn as the model runs it, so the cache (75 MB in f32 for 16 ×
/// 96 tokens) comes from memory. GB/s counts the keys and values read.
fn attention(budget: Duration) {
    use aquila_worker::kv::{KvDtype, PagedKv};
    use aquila_worker::model::attention::{AttnSeq, attend};
    const LAYERS: usize = 8;
    const HEADS: usize = 12;
    const HEAD_DIM: usize = 64;
    const BLOCK: usize = 16;
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        for (n_seqs, context) in [(16usize, 96usize), (16, 512), (1, 2048)] {
            let per_seq = context.div_ceil(BLOCK);
            let mut kv = PagedKv::new(LAYERS, n_seqs * per_seq, BLOCK, HEADS, HEAD_DIM, dtype);
            let tables: Vec<Vec<u32>> = (0..n_seqs)
                .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
                .collect();
            let rows: Vec<f32> = (0..context * HEADS * HEAD_DIM)
                .map(|i| ((i * 7919) % 2001) as f32 / 1e3 - 1.0)
                .collect();
            for layer in 0..LAYERS {
                for table in &tables {
                    kv.write(layer, table, 0, &rows, &rows);
                }
            }
            let q: Vec<f32> = rows[..HEADS * HEAD_DIM].to_vec();
            let seqs: Vec<AttnSeq<'_>> = tables
                .iter()
                .map(|table| AttnSeq {
                    q: &q,
                    n: 1,
                    start: context - 1,
                    table,
                })
                .collect();
            let secs = time(budget, || {
                for layer in 0..LAYERS {
                    black_box(attend(&kv, layer, HEADS, black_box(&seqs)));
                }
            });
            let elem = if dtype == KvDtype::F32 { 4 } else { 2 };
            let bytes = 2 * LAYERS * n_seqs * context * HEADS * HEAD_DIM * elem;
            println!(
                "{}",
                serde_json::json!({"kernel": "attention_decode_step", "kv": dtype.label(),
                    "seqs": n_seqs, "context": context, "us": secs * 1e6,
                    "kv_gb_per_s": bytes as f64 / secs / 1e9})
            );
        }
    }
}

/// GGML blocks with random quants (and scale and high-bit bytes) and small
/// random f16 super-scales, each field where GGML puts it.
fn random_blocks(format: Format, blocks: usize) -> Vec<u8> {
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let bytes = format.ggml_block_bytes();
    // f16 fields before and after the block's other bytes.
    let (before, after) = match format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => (1, 0),
        Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K => (2, 0),
        Format::Q2K => (0, 2),
        Format::Q3K | Format::Q6K => (0, 1),
    };
    let mut raw = Vec::with_capacity(blocks * bytes);
    let scale = |v: u64| f16::from_f32((v % 1000) as f32 / 1e5).to_le_bytes();
    for _ in 0..blocks {
        (0..before).for_each(|_| raw.extend_from_slice(&scale(next())));
        raw.extend((0..bytes - 2 * (before + after)).map(|_| next() as u8));
        (0..after).for_each(|_| raw.extend_from_slice(&scale(next())));
    }
    raw
}

/// Median seconds per call of `f`, run for about `budget`.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 5 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// GB/s reading a 512 MiB buffer with every thread (far past any cache).
fn read_bandwidth(budget: Duration) -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 64 << 20];
    let secs = time(budget, || {
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .sum();
        black_box(s);
    });
    (buf.len() * 8) as f64 / secs / 1e9
}

/// GFLOP/s of independent f32 FMAs on every thread (AVX2 if available).
fn fma_peak(budget: Duration) -> f64 {
    use rayon::prelude::*;
    const N: usize = 1 << 22;
    let threads = rayon::current_num_threads();
    let secs = time(budget, || {
        let s: f32 = (0..threads)
            .into_par_iter()
            .map(|t| fma_loop(N, t as f32))
            .sum();
        black_box(s);
    });
    // 8 lanes × 12 chains × 2 flops per iteration.
    (threads * N * 8 * 12 * 2) as f64 / secs / 1e9
}

fn fma_loop(n: usize, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: checked above.
        return unsafe { fma_loop_avx2(n, seed) };
    }
    let mut acc = [seed; 96];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    black_box(acc.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(n: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(seed); 12];
    let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, a);
        }
    }
    let mut out = [0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
    // SAFETY: out has 8 lanes.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}
