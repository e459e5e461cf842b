//! Events built in code (with a one-token-per-byte tokenizer) through the
//! transcriber: text deltas, stop strings, finish reasons, logprobs, usage.

use std::time::Duration;

use super::*;
use crate::model::tests::info;

fn transcriber(stop: &[&str], logprobs: bool) -> Transcriber {
    let model = Arc::new(Model::from_info(info("m", ""), None).unwrap());
    let ctx = RequestContext {
        request_id: "r1".into(),
        model,
        prompt_token_ids: vec![1, 2, 3],
        stop: stop.iter().map(|s| s.to_string()).collect(),
        logprobs,
        received: Instant::now(),
    };
    Transcriber::new(ctx, "http://w:1".into())
}

fn tokens(text: &str) -> Vec<worker::Token> {
    text.bytes()
        .map(|b| worker::Token {
            id: u32::from(b),
            ..Default::default()
        })
        .collect()
}

fn event(text: &str, finish: Option<worker::FinishReason>) -> worker::GenerateEvent {
    worker::GenerateEvent {
        tokens: tokens(text),
        finish: finish.map(|reason| worker::Finish {
            reason: reason as i32,
            queue_seconds: 0.25,
            ..Default::default()
        }),
    }
}

fn feed(t: &mut Transcriber, e: worker::GenerateEvent) -> (v1::GenerateResponse, bool) {
    t.on_event(e, Instant::now()).unwrap()
}

#[test]
fn stop_string_across_events_ends_and_is_trimmed() {
    let mut t = transcriber(&["###"], false);
    let (r, done) = feed(&mut t, event("Hi #", None));
    assert_eq!((r.text.as_str(), done), ("Hi ", false));
    assert_eq!(r.model, "m");
    assert_eq!(r.request_id, "r1");
    let (r, done) = feed(&mut t, event("#", None));
    assert_eq!((r.text.as_str(), done), ("", false));
    let (r, done) = feed(&mut t, event("#!", None));
    assert!(done);
    assert_eq!(r.text, "");
    // Tokens after the one completing the stop string are not reported.
    assert_eq!(r.token_ids, [u32::from(b'#')]);
    assert_eq!(r.finish_reason(), v1::FinishReason::Stop);
    assert_eq!(r.stop_sequence, "###");
    let usage = r.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 6));
}

#[test]
fn false_stop_prefix_is_released() {
    let mut t = transcriber(&["###"], false);
    assert_eq!(feed(&mut t, event("a#", None)).0.text, "a");
    assert_eq!(feed(&mut t, event("#b", None)).0.text, "##b");
}

#[test]
fn split_character_and_eos_finish() {
    let mut t = transcriber(&[], false);
    let bytes = "中".as_bytes();
    let one = |b: u8| worker::GenerateEvent {
        tokens: vec![worker::Token {
            id: u32::from(b),
            ..Default::default()
        }],
        finish: None,
    };
    assert_eq!(feed(&mut t, one(bytes[0])).0.text, "");
    assert_eq!(feed(&mut t, one(bytes[1])).0.text, "");
    let mut last = one(bytes[2]);
    last.finish = event("", Some(worker::FinishReason::Eos)).finish;
    let (r, done) = feed(&mut t, last);
    assert!(done);
    assert_eq!(r.text, "中");
    assert_eq!(r.finish_reason(), v1::FinishReason::Eos);
    let timings = r.timings.unwrap();
    assert_eq!(timings.queue_seconds, 0.25);
    assert!(timings.total_seconds >= timings.time_to_first_token_seconds);
}

#[test]
fn held_text_is_released_when_the_worker_finishes() {
    let mut t = transcriber(&["STOP"], false);
    let (r, done) = feed(&mut t, event("go ST", Some(worker::FinishReason::Length)));
    assert!(done);
    assert_eq!(r.text, "go ST");
    assert_eq!(r.finish_reason(), v1::FinishReason::Length);
    assert_eq!(r.stop_sequence, "");
}

#[test]
fn worker_finish_reasons_map_to_public_ones() {
    for (worker_reason, public) in [
        (worker::FinishReason::Length, v1::FinishReason::Length),
        (worker::FinishReason::StopToken, v1::FinishReason::Stop),
        (worker::FinishReason::Eos, v1::FinishReason::Eos),
        (worker::FinishReason::Cancelled, v1::FinishReason::Cancelled),
    ] {
        let mut t = transcriber(&[], false);
        let (r, _) = feed(&mut t, event("x", Some(worker_reason)));
        assert_eq!(r.finish_reason(), public);
    }
}

#[test]
fn logprobs_carry_token_texts_and_alternatives() {
    let mut t = transcriber(&[], true);
    let e = worker::GenerateEvent {
        tokens: vec![worker::Token {
            id: 0xE4,
            logprob: -0.5,
            top: vec![worker::TopToken {
                id: u32::from(b'a'),
                logprob: -1.5,
            }],
        }],
        finish: None,
    };
    let (r, _) = feed(&mut t, e);
    assert_eq!(r.logprobs.len(), 1);
    let lp = &r.logprobs[0];
    assert_eq!((lp.token_id, lp.logprob), (0xE4, -0.5));
    // 0xE4 alone is not UTF-8: the vocabulary piece stands in.
    assert_eq!(lp.token, "ä");
    assert_eq!(lp.top[0].token, "a");
    assert_eq!(lp.top[0].logprob, -1.5);
}

#[test]
fn time_to_first_token_uses_the_arrival_time() {
    let mut t = transcriber(&[], false);
    let arrived = t.ctx.received + Duration::from_millis(200);
    let (r, _) = t
        .on_event(event("x", Some(worker::FinishReason::Length)), arrived)
        .unwrap();
    let ttft = r.timings.unwrap().time_to_first_token_seconds;
    assert!((ttft - 0.2).abs() < 1e-6, "{ttft}");
}
