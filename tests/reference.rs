//! The model against an independent reference: a plain f64 LLaMA forward
//! written here from the checkpoint's tensors (read with the `safetensors`
//! crate, not our loader). Logits must agree to a relative error of 1e-4
//! (f32 arithmetic against f64), through prefill and through the KV cache one
//! token at a time, and greedy decoding must agree token for token.

mod common;

use std::sync::Arc;

use common::f64_llama::{Ref, argmax64, rel_err};

use aquila_worker::comm::SingleRank;
use aquila_worker::kv::{BlockId, KvDtype};
use aquila_worker::loader::{self, LoadOptions, LoadedModel};
use aquila_worker::model::{LogitsFor, SeqInput, SingleSeq, WeightDtype};
use aquila_worker::presets::{GgufType, WeightFormat};

/// The tiny preset as f32 safetensors, loaded (the folder lives as long as
/// the returned guard).
fn tiny() -> (tempfile::TempDir, LoadedModel) {
    let dir = common::tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let opts = LoadOptions {
        dtype: WeightDtype::F32,
        name: None,
        tp_invariant: false,
    };
    let loaded = loader::load(dir.path(), &opts, Arc::new(SingleRank)).unwrap();
    (dir, loaded)
}

const PROMPT: &[u32] = &[
    72, 101, 108, 108, 111, 44, 32, 65, 113, 117, 105, 108, 97, 33,
];

#[test]
fn logits_and_greedy_tokens_match_an_f64_reference() {
    let (dir, loaded) = tiny();
    let reference = Ref::load(dir.path());
    let model = &loaded.model;

    // Prefill: every position's logits.
    let want = reference.forward(PROMPT);
    let mut seq = SingleSeq::new(model, PROMPT.len() + 40);
    let got = seq.step(model, PROMPT, LogitsFor::All).unwrap();
    let vocab = reference.vocab;
    for (pos, row) in want.iter().enumerate() {
        let err = rel_err(&got[pos * vocab..(pos + 1) * vocab], row);
        assert!(
            err <= 1e-4,
            "prefill position {pos}: relative error {err:e} > 1e-4"
        );
    }

    // Greedy decode of 32 tokens through the cache, each step checked.
    let mut tokens = PROMPT.to_vec();
    let mut next = argmax64(want.last().unwrap());
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut our_next = aquila_worker::sampler::argmax(&got[(PROMPT.len() - 1) * vocab..]);
    for step in 0..32 {
        theirs.push(next);
        ours.push(our_next);
        tokens.push(next);
        let got = seq.step(model, &[our_next], LogitsFor::Last).unwrap();
        let want = reference.forward(&tokens);
        let row = want.last().unwrap();
        let err = rel_err(&got, row);
        assert!(
            err <= 1e-4,
            "decode step {step}: relative error {err:e} > 1e-4"
        );
        next = argmax64(row);
        our_next = aquila_worker::sampler::argmax(&got);
    }
    assert_eq!(ours, theirs, "greedy tokens differ from the f64 reference");
}

#[test]
fn batches_scattered_blocks_and_chunks_change_nothing() {
    // Two sequences in one step, their blocks scattered through one pool,
    // must give what each gives alone; so must a prompt run in chunks. The
    // batch shares weights, never state.
    let (_dir, loaded) = tiny();
    let model = &loaded.model;
    let a: &[u32] = &PROMPT[..9];
    let b: &[u32] = &PROMPT[3..];
    let alone = |t: &[u32]| {
        SingleSeq::new(model, t.len())
            .step(model, t, LogitsFor::Last)
            .unwrap()
    };
    let close = |x: &[f32], y: &[f32], what: &str| {
        for (x, y) in x.iter().zip(y) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{what}: {x} vs alone {y}"
            );
        }
    };
    let (la, lb) = (alone(a), alone(b));
    let mut kv = model.new_kv(8, 4);
    let (ta, tb): (&[BlockId], &[BlockId]) = (&[5, 0, 2], &[7, 1, 3]);
    let both = model
        .forward(
            &mut kv,
            &[
                SeqInput {
                    tokens: a,
                    start: 0,
                    table: ta,
                },
                SeqInput {
                    tokens: b,
                    start: 0,
                    table: tb,
                },
            ],
            LogitsFor::Last,
        )
        .unwrap();
    close(&both[0], &la, "batched a");
    close(&both[1], &lb, "batched b");

    // The same prompt in chunks of 5, 1 and the rest, into scattered blocks.
    let mut kv = model.new_kv(8, 4);
    let table: &[BlockId] = &[6, 4, 2, 0];
    let mut last = Vec::new();
    for (start, end) in [(0, 5), (5, 6), (6, PROMPT.len())] {
        let input = SeqInput {
            tokens: &PROMPT[start..end],
            start,
            table,
        };
        last = model
            .forward(&mut kv, &[input], LogitsFor::Last)
            .unwrap()
            .remove(0);
    }
    close(&last, &alone(PROMPT), "chunked prefill");
}

#[test]
fn a_bf16_kv_cache_stays_close_to_the_f64_reference() {
    // `--kv-cache-dtype bf16` rounds every key and value to 8 bits of
    // mantissa; the logits must stay within 1% of the largest logit.
    let (dir, loaded) = tiny();
    let reference = Ref::load(dir.path());
    let model = &loaded.model;
    let mut kv = model.new_kv_with(8, 4, KvDtype::Bf16);
    let table: &[BlockId] = &[3, 6, 1, 7];
    let input = SeqInput {
        tokens: PROMPT,
        start: 0,
        table,
    };
    let got = model
        .forward(&mut kv, &[input], LogitsFor::All)
        .unwrap()
        .remove(0);
    let want = reference.forward(PROMPT);
    let vocab = reference.vocab;
    let mut worst = 0f64;
    for (pos, row) in want.iter().enumerate() {
        let err = rel_err(&got[pos * vocab..(pos + 1) * vocab], row);
        assert!(err <= 1e-2, "position {pos}: relative error {err:e} > 1e-2");
        worst = worst.max(err);
    }
    // bf16 rounding must show, or the cache did not hold bf16.
    assert!(worst > 1e-6, "no difference from f32 at all: {worst:e}");
    eprintln!("bf16 KV cache: worst relative logit error {worst:e}");
}
