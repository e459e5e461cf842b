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
    // Q8_0 weights and 8-bit activations (candle quantizes activations to
    // Q8_0 too): logits within 5% of the largest logit (measured: 2.3% on
    // this 64-wide model), and the first tokens agree.
    let (base_logits, base) = run(WeightFormat::Safetensors, GgufType::F32, WeightDtype::F32);
    let (q_logits, q) = run(WeightFormat::Gguf, GgufType::Q8_0, WeightDtype::F32);
    let d = max_rel_diff(&q_logits, &base_logits);
    assert!(d <= 0.05, "Q8_0 logits differ by {d} (relative)");
    assert_eq!(q[..4], base[..4], "Q8_0 first tokens differ");
    // bf16 and f16 weights, f32 accumulation.
    for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
        let (l, t) = run(WeightFormat::Safetensors, GgufType::F32, dtype);
        let d = max_rel_diff(&l, &base_logits);
        let tol = if dtype == WeightDtype::Bf16 {
            0.02
        } else {
            0.005
        };
        assert!(d <= tol, "{dtype:?} logits differ by {d} (relative)");
        assert_eq!(t[..4], base[..4], "{dtype:?} first tokens differ");
    }
}
