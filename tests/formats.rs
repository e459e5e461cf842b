//! Every checkpoint format gives the same model: the tiny preset written as
//! sharded safetensors, sharded PyTorch `.bin`, and GGUF (F32 and Q8_0, with
//! q/k permuted for interleaved RoPE as llama.cpp does) must decode the same
//! greedy tokens as the single-file safetensors. A wrong RoPE convention or
//! a misread shard shows up here.

mod common;

use aquila_worker::model::WeightDtype;
use aquila_worker::presets::{GgufType, WeightFormat};

const PROMPT: &[u32] = &[
    87, 104, 97, 116, 32, 105, 115, 32, 97, 32, 108, 108, 97, 109, 97, 63,
];
const STEPS: usize = 24;

/// First-step logits and `STEPS` greedy tokens of the tiny model in `format`.
fn run(format: WeightFormat, gguf: GgufType, dtype: WeightDtype) -> (Vec<f32>, Vec<u32>) {
    let dir = common::tiny_model(format, gguf);
    common::local_greedy(
        &common::model_path(dir.path(), format),
        dtype,
        PROMPT,
        STEPS,
    )
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f32::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn every_format_decodes_the_same_tokens() {
    let (base_logits, base) = run(WeightFormat::Safetensors, GgufType::F32, WeightDtype::F32);
    for (name, format, gguf) in [
        (
            "sharded safetensors",
            WeightFormat::SafetensorsSharded,
            GgufType::F32,
        ),
        ("sharded .bin", WeightFormat::BinSharded, GgufType::F32),
        ("single .bin", WeightFormat::Bin, GgufType::F32),
        ("GGUF F32", WeightFormat::Gguf, GgufType::F32),
    ] {
        let (logits, tokens) = run(format, gguf, WeightDtype::F32);
        assert_eq!(tokens, base, "{name}: greedy tokens differ");
        let d = max_rel_diff(&logits, &base_logits);
        assert!(d <= 1e-5, "{name}: logits differ by {d:e} (relative)");
    }
}

#[test]
fn quantized_and_half_precision_stay_close() {
    // Quantized weights (and, in candle's kernels, 8-bit activations): the
    // first step's logits within a stated fraction of the largest logit, and
    // the first greedy tokens agree where the format keeps 8 bits or more.
    let (base_logits, base) = run(WeightFormat::Safetensors, GgufType::F32, WeightDtype::F32);
    for (gguf, tol, same_tokens) in [
        (GgufType::F16, 0.005, 4),
        (GgufType::Q8_0, 0.05, 4),
        (GgufType::Q6k, 0.10, 1),
        (GgufType::Q4_1, 0.25, 0),
        (GgufType::Q4_0, 0.25, 0),
        (GgufType::Q4k, 0.25, 0),
    ] {
        let (l, t) = run(WeightFormat::Gguf, gguf, WeightDtype::F32);
        let d = max_rel_diff(&l, &base_logits);
        assert!(
            d <= tol,
            "GGUF {gguf:?}: logits differ by {d} (relative), over {tol}"
        );
        assert_eq!(
            t[..same_tokens],
            base[..same_tokens],
            "GGUF {gguf:?}: first tokens differ"
        );
        eprintln!("GGUF {gguf:?}: relative logit difference {d:.4}");
    }
    // bf16 and f16 weights kept as 16 bits, f32 accumulation.
    for (dtype, tol) in [(WeightDtype::Bf16, 0.02), (WeightDtype::F16, 0.005)] {
        let (l, t) = run(WeightFormat::Safetensors, GgufType::F32, dtype);
        let d = max_rel_diff(&l, &base_logits);
        assert!(d <= tol, "{dtype:?} logits differ by {d} (relative)");
        assert_eq!(t[..4], base[..4], "{dtype:?} first tokens differ");
    }
}
