//! Turns one worker's event stream into the client's response stream.
//!
//! The response stream owns the worker stream: when the client goes away
//! (the response stream is dropped) or a stop string matches, the worker
//! stream is dropped with it, which cancels the generation on the worker.
//! No task is spawned here, so nothing outlives the client. Choosing and
//! retrying workers happens before this module is involved.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use aquila_proto::v1;
use aquila_proto::worker::v1 as worker;
use futures::{Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::detokenize::{Detokenizer, token_text};
use crate::error::GatewayError;
use crate::model::Model;
use crate::stop::{StopMatcher, StopOutcome};
use crate::workers::WorkerPool;

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

/// What the gateway knows about a request once it is accepted.
pub struct RequestContext {
    pub request_id: String,
    pub model: Arc<Model>,
    pub prompt_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub received: Instant,
}

/// A worker call that has produced its first event.
pub struct Upstream {
    pub pool: Arc<WorkerPool>,
    pub worker_index: usize,
    pub worker_address: String,
    pub events: Streaming<worker::GenerateEvent>,
    pub first: worker::GenerateEvent,
}

struct State {
    ctx: RequestContext,
    upstream: Upstream,
    pending_first: Option<worker::GenerateEvent>,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    first_token_at: Option<Instant>,
    completion_tokens: u32,
}

/// Ends of a stream, other than errors.
enum Ending {
    Worker(worker::Finish),
    StopString(usize),
}

pub fn respond(ctx: RequestContext, mut upstream: Upstream) -> ResponseStream {
    let first = std::mem::take(&mut upstream.first);
    let state = State {
        detokenizer: Detokenizer::new(&ctx.prompt_token_ids),
        stop: StopMatcher::new(ctx.stop.clone()),
        ctx,
        upstream,
        pending_first: Some(first),
        first_token_at: None,
        completion_tokens: 0,
    };
    // `None` state = the stream has ended; dropping `State` drops the worker stream.
    Box::pin(futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let (item, done) = state.step().await;
        Some((item, if done { None } else { Some(state) }))
    }))
}

/// Collects a response stream into the single response of a unary call.
pub async fn collect(mut stream: ResponseStream) -> Result<v1::GenerateResponse, Status> {
    let mut all = v1::GenerateResponse::default();
    while let Some(item) = stream.next().await {
        let part = item?;
        all.text.push_str(&part.text);
        all.token_ids.extend(part.token_ids);
        all.logprobs.extend(part.logprobs);
        all.model = part.model;
        all.request_id = part.request_id;
        // Only the last message carries usage.
        if part.usage.is_some() {
            all.finish_reason = part.finish_reason;
            all.stop_sequence = part.stop_sequence;
            all.usage = part.usage;
            all.timings = part.timings;
        }
    }
    Ok(all)
}

impl State {
    /// The next item, and whether it is the last.
    async fn step(&mut self) -> (Result<v1::GenerateResponse, Status>, bool) {
        let event = match self.pending_first.take() {
            Some(event) => Ok(Some(event)),
            None => self.upstream.events.message().await,
        };
        let result = match event {
            Ok(Some(event)) => self.on_event(event),
            Ok(None) => Err(GatewayError::WorkerProtocol {
                worker: self.upstream.worker_address.clone(),
                reason: "the event stream ended without a finish event".into(),
            }),
            Err(status) => {
                let error = GatewayError::from_worker(&self.upstream.worker_address, status);
                if error.is_worker_unavailable() {
                    let reason = error.to_string();
                    self.upstream
                        .pool
                        .mark_unavailable(self.upstream.worker_index, &reason)
                        .await;
                }
                Err(error)
            }
        };
        match result {
            Ok((response, done)) => (Ok(response), done),
            Err(error) => {
                tracing::warn!(request_id = %self.ctx.request_id, %error, "generation failed");
                (Err(error.to_status()), true)
            }
        }
    }

    fn on_event(
        &mut self,
        event: worker::GenerateEvent,
    ) -> Result<(v1::GenerateResponse, bool), GatewayError> {
        let mut response = v1::GenerateResponse {
            model: self.ctx.model.name().to_owned(),
            request_id: self.ctx.request_id.clone(),
            ..Default::default()
        };
        if !event.tokens.is_empty() && self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        for token in &event.tokens {
            self.completion_tokens += 1;
            response.token_ids.push(token.id);
            if self.ctx.logprobs {
                response.logprobs.push(self.logprob(token));
            }
            let delta = self.decode(|d, t| d.push(t, token.id))?;
            match self.stop.push(&delta) {
                StopOutcome::Continue(text) => response.text.push_str(&text),
                StopOutcome::Matched { text, stop } => {
                    response.text.push_str(&text);
                    self.finish(&mut response, Ending::StopString(stop));
                    return Ok((response, true));
                }
            }
        }
        let Some(finish) = event.finish else {
            return Ok((response, false));
        };
        let tail = self.decode(|d, t| d.flush(t))?;
        match self.stop.push(&tail) {
            StopOutcome::Continue(text) => {
                response.text.push_str(&text);
                response.text.push_str(&self.stop.finish());
                self.finish(&mut response, Ending::Worker(finish));
            }
            StopOutcome::Matched { text, stop } => {
                response.text.push_str(&text);
                self.finish(&mut response, Ending::StopString(stop));
            }
        }
        Ok((response, true))
    }

    fn decode(
        &mut self,
        f: impl FnOnce(&mut Detokenizer, &tokenizers::Tokenizer) -> Result<String, tokenizers::Error>,
    ) -> Result<String, GatewayError> {
        f(&mut self.detokenizer, &self.ctx.model.tokenizer).map_err(|e| GatewayError::Tokenizer {
            model: self.ctx.model.name().to_owned(),
            reason: e.to_string(),
        })
    }

    fn logprob(&self, token: &worker::Token) -> v1::TokenLogprob {
        let tokenizer = &self.ctx.model.tokenizer;
        v1::TokenLogprob {
            token_id: token.id,
            token: token_text(tokenizer, token.id),
            logprob: token.logprob,
            top: token
                .top
                .iter()
                .map(|t| v1::TopLogprob {
                    token_id: t.id,
                    token: token_text(tokenizer, t.id),
                    logprob: t.logprob,
                })
                .collect(),
        }
    }

    fn finish(&self, response: &mut v1::GenerateResponse, ending: Ending) {
        let now = Instant::now();
        let (reason, queue_seconds) = match &ending {
            Ending::Worker(finish) => (finish_reason(finish.reason()), finish.queue_seconds),
            Ending::StopString(index) => {
                response.stop_sequence = self.stop.stop_string(*index).to_owned();
                (v1::FinishReason::Stop, 0.0)
            }
        };
        response.set_finish_reason(reason);
        response.usage = Some(v1::Usage {
            prompt_tokens: u32::try_from(self.ctx.prompt_token_ids.len()).unwrap_or(u32::MAX),
            completion_tokens: self.completion_tokens,
        });
        let since_received = |t: Instant| t.duration_since(self.ctx.received).as_secs_f64();
        let timings = v1::Timings {
            queue_seconds,
            time_to_first_token_seconds: self.first_token_at.map_or(0.0, since_received),
            total_seconds: since_received(now),
        };
        tracing::info!(
            request_id = %self.ctx.request_id,
            model = self.ctx.model.name(),
            worker = %self.upstream.worker_address,
            finish_reason = reason.as_str_name(),
            completion_tokens = self.completion_tokens,
            ttft_seconds = timings.time_to_first_token_seconds,
            total_seconds = timings.total_seconds,
            "generation finished"
        );
        response.timings = Some(timings);
    }
}

fn finish_reason(reason: worker::FinishReason) -> v1::FinishReason {
    match reason {
        worker::FinishReason::Length => v1::FinishReason::Length,
        worker::FinishReason::StopToken => v1::FinishReason::Stop,
        worker::FinishReason::Eos => v1::FinishReason::Eos,
        worker::FinishReason::Cancelled => v1::FinishReason::Cancelled,
        worker::FinishReason::Unspecified => v1::FinishReason::Unspecified,
    }
}
