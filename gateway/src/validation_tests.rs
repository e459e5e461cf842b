//! One test per validation rule: each checks the code and that the message
//! names the field, the value and the limit.

use super::*;
use tonic::Code;

const MODEL: ModelLimits = ModelLimits {
    vocab_size: 1000,
    context_length: 2048,
};

fn params() -> v1::SamplingParams {
    v1::SamplingParams::default()
}

fn check(prompt: Vec<u32>, p: v1::SamplingParams) -> Result<ValidRequest, GatewayError> {
    validate(prompt, Some(&p), &Limits::default(), MODEL, &[])
}

/// Asserts INVALID_ARGUMENT and that the message contains every `needle`.
fn rejects(result: Result<ValidRequest, GatewayError>, needles: &[&str]) {
    let status = result.expect_err("request must be rejected").to_status();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} does not contain {needle:?}",
            status.message()
        );
    }
}

#[test]
fn defaults_are_resolved() {
    let valid = validate(vec![1, 2, 3], None, &Limits::default(), MODEL, &[]).unwrap();
    assert_eq!(valid.prompt_token_ids, [1, 2, 3]);
    let p = &valid.params;
    assert_eq!(p.max_new_tokens, 256);
    assert_eq!(p.temperature, 1.0);
    assert_eq!((p.top_k, p.top_p, p.min_p), (0, 1.0, 0.0));
    assert_eq!(p.repetition_penalty, 1.0);
    assert_eq!((p.presence_penalty, p.frequency_penalty), (0.0, 0.0));
    assert!(!p.logprobs);
    assert!(valid.stop.is_empty());
}

#[test]
fn prompt_exactly_one_form() {
    let mut request = v1::GenerateRequest::default();
    let status = parse_prompt(&request).unwrap_err().to_status();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("prompt is empty"));

    request.prompt = "hi".into();
    request.prompt_token_ids = vec![1];
    let status = parse_prompt(&request).unwrap_err().to_status();
    assert!(status.message().contains("both set"));

    request.prompt_token_ids.clear();
    assert_eq!(parse_prompt(&request).unwrap(), Prompt::Text("hi".into()));
    request.prompt.clear();
    request.prompt_token_ids = vec![5];
    assert_eq!(parse_prompt(&request).unwrap(), Prompt::TokenIds(vec![5]));
}

#[test]
fn prompt_ids_below_vocab() {
    rejects(
        check(vec![1, 1000], params()),
        &["prompt_token_ids[1]", "1000", "vocabulary size 1000"],
    );
}

#[test]
fn prompt_must_leave_room_in_context() {
    rejects(
        check(vec![1; 3000], params()),
        &["prompt has 3000 tokens", "context is 2048 tokens"],
    );
    rejects(
        check(vec![1; 2048], params()),
        &["prompt has 2048 tokens", "2048"],
    );
}

#[test]
fn max_new_tokens_zero() {
    let p = v1::SamplingParams {
        max_new_tokens: Some(0),
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.max_new_tokens = 0", "at least 1"],
    );
}

#[test]
fn max_new_tokens_plus_prompt_exceeds_context() {
    let p = v1::SamplingParams {
        max_new_tokens: Some(100),
        ..params()
    };
    rejects(
        check(vec![1; 2000], p),
        &["params.max_new_tokens = 100", "2000", "context of 2048"],
    );
    let p = v1::SamplingParams {
        max_new_tokens: Some(48),
        ..params()
    };
    assert_eq!(check(vec![1; 2000], p).unwrap().params.max_new_tokens, 48);
}

#[test]
fn unset_max_new_tokens_is_capped_by_context() {
    assert_eq!(
        check(vec![1; 2040], params())
            .unwrap()
            .params
            .max_new_tokens,
        8
    );
}

#[test]
fn temperature_range() {
    for t in [-0.5, f32::NAN, f32::INFINITY, 100.5] {
        let p = v1::SamplingParams {
            temperature: Some(t),
            ..params()
        };
        rejects(
            check(vec![1], p),
            &["params.temperature", &t.to_string(), "[0, 100]"],
        );
    }
    let p = v1::SamplingParams {
        temperature: Some(0.0),
        ..params()
    };
    assert_eq!(check(vec![1], p).unwrap().params.temperature, 0.0);
}

#[test]
fn top_k_non_negative() {
    let p = v1::SamplingParams {
        top_k: Some(-1),
        ..params()
    };
    rejects(check(vec![1], p), &["params.top_k = -1", ">= 0"]);
    let p = v1::SamplingParams {
        top_k: Some(40),
        ..params()
    };
    assert_eq!(check(vec![1], p).unwrap().params.top_k, 40);
}

#[test]
fn top_p_range() {
    for v in [1.5, 0.0, -0.1, f32::NAN] {
        let p = v1::SamplingParams {
            top_p: Some(v),
            ..params()
        };
        rejects(
            check(vec![1], p),
            &["params.top_p", &v.to_string(), "(0, 1]"],
        );
    }
    let p = v1::SamplingParams {
        top_p: Some(1.5),
        ..params()
    };
    rejects(check(vec![1], p), &["params.top_p = 1.5 is outside (0, 1]"]);
}

#[test]
fn min_p_range() {
    for v in [-0.1, 1.1, f32::NAN] {
        let p = v1::SamplingParams {
            min_p: Some(v),
            ..params()
        };
        rejects(
            check(vec![1], p),
            &["params.min_p", &v.to_string(), "[0, 1]"],
        );
    }
}

#[test]
fn repetition_penalty_range() {
    for v in [0.0, -1.0, 10.5, f32::NAN] {
        let p = v1::SamplingParams {
            repetition_penalty: Some(v),
            ..params()
        };
        rejects(
            check(vec![1], p),
            &["params.repetition_penalty", &v.to_string(), "(0, 10]"],
        );
    }
}

#[test]
fn presence_and_frequency_penalty_range() {
    let p = v1::SamplingParams {
        presence_penalty: Some(2.5),
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.presence_penalty = 2.5", "[-2, 2]"],
    );
    let p = v1::SamplingParams {
        frequency_penalty: Some(-3.0),
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.frequency_penalty = -3", "[-2, 2]"],
    );
}

#[test]
fn too_many_stop_strings() {
    let p = v1::SamplingParams {
        stop: vec!["x".into(); 17],
        ..params()
    };
    rejects(check(vec![1], p), &["params.stop", "17", "limit of 16"]);
}

#[test]
fn empty_stop_string() {
    let p = v1::SamplingParams {
        stop: vec!["a".into(), String::new()],
        ..params()
    };
    rejects(check(vec![1], p), &["params.stop[1]", "empty"]);
}

#[test]
fn long_stop_string() {
    let p = v1::SamplingParams {
        stop: vec!["y".repeat(257)],
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.stop[0]", "257 bytes", "limit of 256 bytes"],
    );
}

#[test]
fn stop_token_ids_below_vocab() {
    let p = v1::SamplingParams {
        stop_token_ids: vec![3, 5000],
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.stop_token_ids[1] = 5000", "vocabulary size 1000"],
    );
}

#[test]
fn top_logprobs_limit_and_implication() {
    let p = v1::SamplingParams {
        top_logprobs: 21,
        ..params()
    };
    rejects(
        check(vec![1], p),
        &["params.top_logprobs = 21", "limit of 20"],
    );
    let p = v1::SamplingParams {
        top_logprobs: 5,
        ..params()
    };
    let valid = check(vec![1], p).unwrap();
    assert!(valid.params.logprobs);
    assert_eq!(valid.params.top_logprobs, 5);
}

#[test]
fn implied_stop_strings_are_appended_once() {
    let p = v1::SamplingParams {
        stop: vec!["###".into(), "END".into()],
        ..params()
    };
    let valid = validate(
        vec![1],
        Some(&p),
        &Limits::default(),
        MODEL,
        &["###".into(), "<|im_end|>".into()],
    )
    .unwrap();
    assert_eq!(valid.stop, ["###", "END", "<|im_end|>"]);
}

#[test]
fn chat_messages() {
    let status = validate_messages(&[]).unwrap_err().to_status();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("messages is empty"));

    let messages = vec![
        v1::ChatMessage {
            role: "user".into(),
            content: String::new(),
        },
        v1::ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        },
    ];
    let status = validate_messages(&messages).unwrap_err().to_status();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("messages[1].role = \"tool\""));
    assert!(status.message().contains("system, user, assistant"));

    assert!(validate_messages(&messages[..1]).is_ok());
}
