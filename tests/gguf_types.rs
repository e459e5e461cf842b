//! Every GGUF type we load, against an independent reference: the `gguf`
//! Python package's `gguf.quants.dequantize` (run with `$AQUILA_PYTHON`,
//! which tests/run.sh provides). The tiny preset is written in each type
//! (the plain ones, llama.cpp's mixes, F16, BF16); then
//! - our dequantization of each tensor (quantized weights: through our own
//!   repacking and kernels, against activations 127·eⱼ, which quantize
//!   exactly; float weights and the embedding: as loaded) equals the
//!   package's, to f32 rounding;
//! - the model's logits are close to an f64 forward pass over the package's
//!   weights (`common::f64_llama`, q/k un-permuted back to rotate-half).
//!   The weights are the same, so the difference is our 8-bit activations
//!   (f32 arithmetic alone for float weights): tolerances per type below.
//!
//! And a file with a type we have no kernel for is refused at load, naming
//! the tensor and the type.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use aquila_worker::comm::SingleRank;
use aquila_worker::export::FloatDtype;
use aquila_worker::loader::{self, LoadOptions};
use aquila_worker::model::quant::{Format, PackedMatrix};
use aquila_worker::model::{LogitsFor, SingleSeq, WeightDtype};
use aquila_worker::presets::{self, GgufType, Preset, WeightFormat};
use aquila_worker::weights::{Weight, WeightStore, gguf_name};
use common::f64_llama::{Ref, rel_err};

const PROMPT: &[u32] = &[
    72, 101, 108, 108, 111, 44, 32, 65, 113, 117, 105, 108, 97, 33,
];

/// Dequantizes every tensor of each file with the `gguf` package: for file
/// i, `OUT/i/NAME.f32` (little-endian f32, row-major) and `OUT/i.json`
/// ({name: [type, rows, cols]}).
const DEQUANTIZE: &str = r#"
import json, sys
import numpy as np
import gguf
from gguf.quants import dequantize
out = sys.argv[1]
for i, path in enumerate(sys.argv[2:]):
    manifest = {}
    for t in gguf.GGUFReader(path).tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype="<f4")
        w.tofile(f"{out}/{i}/{t.name}.f32")
        manifest[t.name] = [t.tensor_type.name] + [int(d) for d in w.shape]
    json.dump(manifest, open(f"{out}/{i}.json", "w"))
"#;

/// Every file type, with the largest relative logit error allowed against
/// the f64 forward over the same weights (max |ours − ref| / max |ref| over
/// every prompt position). Quantized weights multiply 8-bit activations
/// (per 32 values, scale max|x|/127), and every type measured 1.6–2.2%
/// (Q8_0's weights are the closest, its logits the farthest: the error is
/// the activations'); float weights run in f32 (measured 1.1e-6; 1e-4, as
/// tests/reference.rs).
const TYPES: [(GgufType, f64); 16] = [
    (GgufType::F16, 1e-4),
    (GgufType::Bf16, 1e-4),
    (GgufType::Q8_0, 0.03),
    (GgufType::Q4_0, 0.03),
    (GgufType::Q4_1, 0.03),
    (GgufType::Q5_0, 0.03),
    (GgufType::Q5_1, 0.03),
    (GgufType::Q2k, 0.03),
    (GgufType::Q3k, 0.03),
    (GgufType::Q4k, 0.03),
    (GgufType::Q5k, 0.03),
    (GgufType::Q6k, 0.03),
    (GgufType::Q3kM, 0.03),
    (GgufType::Q4kS, 0.03),
    (GgufType::Q4kM, 0.03),
    (GgufType::Q5kM, 0.03),
];

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Our `[rows, cols]` values of a tensor as loaded: quantized weights via
/// the kernels (row j of the activations 127·eⱼ gives 127 × column j),
/// floats and norms as candle holds them.
fn ours(w: &Weight, rows: usize, cols: usize) -> (String, Vec<f32>) {
    let q = match w {
        Weight::Quantized(q) => q,
        // F32, F16 and BF16 tensors come as float tensors.
        Weight::Dense(t) => {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            return ("float".into(), t.flatten_all().unwrap().to_vec1().unwrap());
        }
    };
    let Some(format) = Format::from_ggml(q.dtype()) else {
        let t = q.dequantize(&candle_core::Device::Cpu).unwrap();
        return ("float".into(), t.flatten_all().unwrap().to_vec1().unwrap());
    };
    let packed = PackedMatrix::from_ggml(format, &q.data().unwrap(), rows, cols);
    let mut x = vec![0f32; cols * cols];
    for j in 0..cols {
        x[j * cols + j] = 127.0;
    }
    let out = packed.matmul(&x, cols);
    let mut w = vec![0f32; rows * cols];
    for j in 0..cols {
        for o in 0..rows {
            w[o * cols + j] = out[j * rows + o] / 127.0;
        }
    }
    (format.label().into(), w)
}

/// GGUF's q/k rows back to Hugging Face's: row `2j + s` of each head is
/// row `s·half + j`.
fn unpermute(w: &[f64], cols: usize, n_head: usize) -> Vec<f64> {
    let rows = w.len() / cols;
    let (hd, mut out) = (rows / n_head, vec![0f64; w.len()]);
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let (dst, src) = (
                    (h * hd + s * hd / 2 + j) * cols,
                    (h * hd + 2 * j + s) * cols,
                );
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

#[test]
fn every_type_matches_the_gguf_package_and_an_f64_forward() {
    let Some(python) = common::env_or_skip("AQUILA_PYTHON", "tests/run.sh") else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = TYPES
        .iter()
        .map(|(t, _)| common::tiny_model(WeightFormat::Gguf, *t))
        .collect();
    let out = tempfile::tempdir().unwrap();
    let script = out.path().join("dequantize.py");
    std::fs::write(&script, DEQUANTIZE).unwrap();
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg(out.path());
    for (i, d) in dirs.iter().enumerate() {
        std::fs::create_dir(out.path().join(i.to_string())).unwrap();
        cmd.arg(d.path().join("model.gguf"));
    }
    let status = cmd.status().expect("run $AQUILA_PYTHON");
    assert!(status.success(), "the gguf package's dequantization failed");

    let names: Vec<String> = presets::tensors(Preset::Tiny, 7)
        .into_iter()
        .map(|t| t.name)
        .collect();
    let shape = Preset::Tiny.shape();
    let cfg = presets::config_json(Preset::Tiny, FloatDtype::F32);
    let mut summary = Vec::new();
    for (i, ((ty, tol), dir)) in TYPES.iter().zip(&dirs).enumerate() {
        let manifest: HashMap<String, (String, usize, usize)> =
            serde_json::from_str::<HashMap<String, serde_json::Value>>(
                &std::fs::read_to_string(out.path().join(format!("{i}.json"))).unwrap(),
            )
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let dim = |n: usize| v[n].as_u64().unwrap_or(1) as usize;
                let rows = if v.as_array().unwrap().len() == 3 {
                    dim(1)
                } else {
                    1
                };
                let cols = v.as_array().unwrap().last().unwrap().as_u64().unwrap() as usize;
                (k, (v[0].as_str().unwrap().to_string(), rows, cols))
            })
            .collect();
        let path = dir.path().join("model.gguf");
        let store = WeightStore::open_gguf(&path).unwrap();
        let mut reference = HashMap::new();
        let mut worst_weight = 0f64;
        for hf in &names {
            let g = gguf_name(hf).unwrap();
            let (ggml_type, rows, cols) = &manifest[&g];
            let theirs = read_f32(&out.path().join(i.to_string()).join(format!("{g}.f32")));
            let w = store.get(hf).unwrap();
            let (path_used, mine) = ours(&w, *rows, *cols);
            // f32 rounding of the scale products, relative to the tensor's
            // largest weight.
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let err = mine
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .fold(0f64, f64::max)
                / scale;
            assert!(
                err <= 1e-6,
                "{ty:?} {g} ({ggml_type}, {path_used}): our weights differ from the gguf \
                 package's by {err:e} of the largest"
            );
            worst_weight = worst_weight.max(err);
            // The lookup the model does for a quantized embedding (candle's);
            // a float one is a table of the values checked above.
            if let (true, Weight::Quantized(q)) = (hf == "model.embed_tokens.weight", &w) {
                let ids: Vec<u32> = (0..*rows as u32).collect();
                let idx =
                    candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap();
                let rows: Vec<f32> = q
                    .embedding(&idx)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, b) in rows.iter().zip(&theirs) {
                    assert!(
                        (a - b).abs() <= 1e-6 * scale as f32,
                        "{ty:?} embedding: {a} vs {b}"
                    );
                }
            }
            let mut v: Vec<f64> = theirs.iter().map(|&x| x as f64).collect();
            if hf.ends_with("q_proj.weight") {
                v = unpermute(&v, *cols, shape.heads);
            } else if hf.ends_with("k_proj.weight") {
                v = unpermute(&v, *cols, shape.kv_heads);
            }
            reference.insert(hf.clone(), v);
        }
        let reference = Ref::new(reference, &cfg);
        let opts = LoadOptions {
            dtype: WeightDtype::F32,
            name: None,
            tp_invariant: false,
        };
        let loaded = loader::load(&path, &opts, Arc::new(SingleRank)).unwrap();
        let model = &loaded.model;
        let got = SingleSeq::new(model, PROMPT.len())
            .step(model, PROMPT, LogitsFor::All)
            .unwrap();
        let want = reference.forward(PROMPT);
        let vocab = reference.vocab;
        let worst = want
            .iter()
            .enumerate()
            .map(|(pos, row)| rel_err(&got[pos * vocab..(pos + 1) * vocab], row))
            .fold(0f64, f64::max);
        assert!(
            worst <= *tol,
            "{ty:?}: logits differ from the f64 forward by {worst:e} (relative), over {tol:e}"
        );
        summary.push(format!(
            "{ty:?} ({}): weights {worst_weight:.1e}, logits {worst:.1e}",
            loaded.dtype
        ));
    }
    eprintln!("{}", summary.join("\n"));
}

/// The tiny Q8_0 model with `blk.0.attn_q.weight` rewritten as `Q8_K` (a
/// type candle reads but we have no kernel for), other tensors as they were.
fn with_q8k_tensor(dir: &Path) -> std::path::PathBuf {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let src = dir.join("model.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let mut t = content
            .tensor(&mut f, name, &candle_core::Device::Cpu)
            .unwrap();
        if name == "blk.0.attn_q.weight" {
            let values = t.dequantize(&candle_core::Device::Cpu).unwrap();
            t = QTensor::quantize(&values, GgmlDType::Q8K).unwrap();
        }
        tensors.push((name.clone(), t));
    }
    let md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let out = dir.join("q8k.gguf");
    let mut w = std::fs::File::create(&out).unwrap();
    gguf_file::write(&mut w, &md, &ts).unwrap();
    out
}

/// `path` with tensor `name`'s type id set to `id` in the header.
fn with_type_id(path: &Path, name: &str, id: u32) -> std::path::PathBuf {
    let mut bytes = std::fs::read(path).unwrap();
    // Tensor info: u64 name length, name, u32 dims, dims × u64, u32 type.
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("the tensor's info");
    let dims_at = at + key.len();
    let dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let type_at = dims_at + 4 + 8 * dims;
    bytes[type_at..type_at + 4].copy_from_slice(&id.to_le_bytes());
    let out = path.with_file_name("patched.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn a_type_without_a_kernel_is_refused_naming_tensor_and_type() {
    let dir = common::tiny_model(WeightFormat::Gguf, GgufType::Q8_0);
    let opts = LoadOptions {
        dtype: WeightDtype::F32,
        name: None,
        tp_invariant: false,
    };
    let load = |p: &Path| match loader::load(p, &opts, Arc::new(SingleRank)) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };
    // A type candle knows but cannot read from GGUF: refused when its
    // tensor is asked for.
    let err = load(&with_q8k_tensor(dir.path()));
    for part in [
        "blk.0.attn_q.weight",
        "Q8_K",
        "supported weight types: F32, F16, BF16, Q4_0",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    // One candle cannot parse (IQ4_XS, id 23): refused when the file opens.
    let err = load(&with_type_id(
        &dir.path().join("model.gguf"),
        "blk.1.ffn_up.weight",
        23,
    ));
    for part in ["blk.1.ffn_up.weight", "IQ4_XS", "Q5_K"] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    // An id GGML never had: still named.
    let err = load(&with_type_id(
        &dir.path().join("model.gguf"),
        "output.weight",
        77,
    ));
    assert!(
        err.contains("output.weight") && err.contains("unknown type 77"),
        "{err}"
    );
}
