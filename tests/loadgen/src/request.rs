//! One streaming request, timed: send it, read its stream to the end, and
//! turn what happened into an [`Outcome`]. A failed request is an outcome
//! labelled by its gRPC code, never an error of the run.

use std::time::Instant;

use aquila_proto::grpc_code_name;
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{
    ChatMessage, ChatRequest, FinishReason, GenerateRequest, GenerateResponse, SamplingParams,
};
use aquila_proto::worker::v1 as worker;
use aquila_proto::worker::v1::worker_client::WorkerClient;
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

pub(crate) async fn send(channel: Channel, config: &LoadgenConfig, spec: RequestSpec) -> Outcome {
    if config.api == Api::Worker {
        return send_to_worker(channel, config, spec).await;
    }
    let mut client = GenerationClient::new(channel);
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
        // `LoadgenArgs::into_config` refuses chat without a prompts file,
        // and sends worker requests above.
        (Api::Chat, Prompt::Ids(_)) | (Api::Worker, _) => {
            return Outcome::Failed(grpc_code_name(Code::InvalidArgument));
        }
    };
    match response {
        Ok(r) => read_stream(r.into_inner(), start).await,
        Err(status) => Outcome::Failed(grpc_code_name(status.code())),
    }
}

/// Token arrival times of one stream.
struct Clock {
    start: Instant,
    ttft_ms: Option<f64>,
    last_token_at: Option<Instant>,
    itl_ms: Vec<f64>,
    counted: u64,
}

fn ms(from: Instant, to: Instant) -> f64 {
    (to - from).as_secs_f64() * 1000.0
}

impl Clock {
    fn new(start: Instant) -> Self {
        Clock {
            start,
            ttft_ms: None,
            last_token_at: None,
            itl_ms: Vec::new(),
            counted: 0,
        }
    }

    /// A message with `k` tokens arrived now.
    fn tokens(&mut self, k: usize) {
        if k == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token_at {
            None => self.ttft_ms = Some(ms(self.start, now)),
            Some(prev) => {
                let gap = ms(prev, now) / k as f64;
                self.itl_ms.extend(std::iter::repeat_n(gap, k));
            }
        }
        self.last_token_at = Some(now);
        self.counted += k as u64;
    }

    /// The stream ended; the server's token counts when it sent them.
    fn finish(self, usage: Option<(u64, u64)>) -> Outcome {
        // The final usage is authoritative; counting ids is the fallback for
        // a server that leaves it out.
        let (prompt_tokens, output_tokens) = usage.unwrap_or((0, self.counted));
        Outcome::Ok(Measured {
            ttft_ms: self.ttft_ms,
            itl_ms: self.itl_ms,
            e2e_ms: ms(self.start, Instant::now()),
            output_tokens,
            prompt_tokens,
        })
    }
}

async fn read_stream(mut stream: Streaming<GenerateResponse>, start: Instant) -> Outcome {
    let mut clock = Clock::new(start);
    let mut last = None;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(status) => return Outcome::Failed(grpc_code_name(status.code())),
        };
        clock.tokens(msg.token_ids.len());
        if msg.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(msg);
        }
    }
    let Some(last) = last else {
        return Outcome::Failed("INCOMPLETE");
    };
    if last.finish_reason == FinishReason::Cancelled as i32 {
        return Outcome::Failed(grpc_code_name(Code::Cancelled));
    }
    let usage = last
        .usage
        .map(|u| (u64::from(u.prompt_tokens), u64::from(u.completion_tokens)));
    clock.finish(usage)
}

/// The same request straight to a worker: every sampling field resolved,
/// as the gateway would send it (no penalties, no top-k/p, no stop ids).
async fn send_to_worker(channel: Channel, config: &LoadgenConfig, spec: RequestSpec) -> Outcome {
    let Prompt::Ids(prompt_token_ids) = spec.prompt else {
        return Outcome::Failed(grpc_code_name(Code::InvalidArgument));
    };
    let request = worker::GenerateRequest {
        request_id: format!("bench-{}", spec.seed),
        prompt_token_ids,
        params: Some(worker::SamplingParams {
            max_new_tokens: spec.max_new_tokens,
            temperature: config.temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: Some(spec.seed),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            logprobs: false,
            top_logprobs: 0,
        }),
    };
    let start = Instant::now();
    let mut stream = match WorkerClient::new(channel)
        .generate(with_key(config, request))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Outcome::Failed(grpc_code_name(status.code())),
    };
    let mut clock = Clock::new(start);
    loop {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => return Outcome::Failed("INCOMPLETE"),
            Err(status) => return Outcome::Failed(grpc_code_name(status.code())),
        };
        clock.tokens(event.tokens.len());
        if let Some(finish) = event.finish {
            if finish.reason == worker::FinishReason::Cancelled as i32 {
                return Outcome::Failed(grpc_code_name(Code::Cancelled));
            }
            let usage = (
                u64::from(finish.prompt_tokens),
                u64::from(finish.completion_tokens),
            );
            return clock.finish(Some(usage));
        }
    }
}
