//! One streaming request, timed: send it, read its stream to the end, and
//! turn what happened into an [`Outcome`]. A failed request is an outcome
//! labelled by its gRPC code, never an error of the run.

use std::time::Instant;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{
    ChatMessage, ChatRequest, FinishReason, GenerateRequest, GenerateResponse, SamplingParams,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::config::{Api, LoadgenConfig};
use crate::workload::{Prompt, RequestSpec};

/// What one request measured. Times are milliseconds from just before the
/// request was sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Measured {
    /// To the first message carrying at least one token; `None` if none did.
    pub ttft_ms: Option<f64>,
    /// One sample per token after the first message with tokens: the gap
    /// since the previous token-carrying message divided by the tokens in
    /// this one.
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Ok(Measured),
    /// A gRPC code name (`RESOURCE_EXHAUSTED`), `CANCELLED` for a stream that
    /// finished as cancelled, or `INCOMPLETE` for one that ended without a
    /// final message.
    Failed(&'static str),
}

/// `message` with the run's API key, if any, as its authorization.
fn with_key<T>(config: &LoadgenConfig, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = &config.authorization {
        request
            .metadata_mut()
            .insert("authorization", key.0.clone());
    }
    request
}

pub(crate) async fn send(
    mut client: GenerationClient<Channel>,
    config: &LoadgenConfig,
    spec: RequestSpec,
) -> Outcome {
    let params = Some(SamplingParams {
        max_new_tokens: Some(spec.max_new_tokens),
        temperature: Some(config.temperature),
        seed: Some(spec.seed),
        // Exact output lengths: the point of a synthetic workload.
        ignore_eos: true,
        ..Default::default()
    });
    let model = config.model.clone();
    let start = Instant::now();
    let response = match (config.api, spec.prompt) {
        (Api::Generate, Prompt::Ids(prompt_token_ids)) => {
            let request = GenerateRequest {
                model,
                prompt_token_ids,
                params,
                ..Default::default()
            };
            client.generate_stream(with_key(config, request)).await
        }
        (Api::Generate, Prompt::Text(prompt)) => {
            let request = GenerateRequest {
                model,
                prompt,
                params,
                ..Default::default()
            };
            client.generate_stream(with_key(config, request)).await
        }
        (Api::Chat, Prompt::Text(content)) => {
            let request = ChatRequest {
                model,
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content,
                }],
                params,
            };
            client.chat_stream(with_key(config, request)).await
        }
        // `LoadgenArgs::into_config` refuses chat without a prompts file.
        (Api::Chat, Prompt::Ids(_)) => return Outcome::Failed(code_name(Code::InvalidArgument)),
    };
    match response {
        Ok(r) => read_stream(r.into_inner(), start).await,
        Err(status) => Outcome::Failed(code_name(status.code())),
    }
}

async fn read_stream(mut stream: Streaming<GenerateResponse>, start: Instant) -> Outcome {
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
    let mut ttft_ms = None;
    let mut last_token_at: Option<Instant> = None;
    let mut itl_ms = Vec::new();
    let mut counted = 0u64;
    let mut last = None;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(status) => return Outcome::Failed(code_name(status.code())),
        };
        let now = Instant::now();
        let k = msg.token_ids.len();
        if k > 0 {
            match last_token_at {
                None => ttft_ms = Some(ms(start, now)),
                Some(prev) => {
                    let gap = ms(prev, now) / k as f64;
                    itl_ms.extend(std::iter::repeat_n(gap, k));
                }
            }
            last_token_at = Some(now);
            counted += k as u64;
        }
        if msg.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(msg);
        }
    }
    let e2e_ms = ms(start, Instant::now());
    let Some(last) = last else {
        return Outcome::Failed("INCOMPLETE");
    };
    if last.finish_reason == FinishReason::Cancelled as i32 {
        return Outcome::Failed(code_name(Code::Cancelled));
    }
    let usage = last.usage.unwrap_or_default();
    // The final usage is authoritative; counting ids is the fallback for a
    // server that leaves it out.
    let output_tokens = if last.usage.is_some() {
        u64::from(usage.completion_tokens)
    } else {
        counted
    };
    Outcome::Ok(Measured {
        ttft_ms,
        itl_ms,
        e2e_ms,
        output_tokens,
        prompt_tokens: u64::from(usage.prompt_tokens),
    })
}

/// The canonical upper-case name of a gRPC code, as in the gRPC spec.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
