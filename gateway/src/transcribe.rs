//! Worker events to client responses, for one request: detokenization,
//! stop strings, logprob texts, finish reason, usage and timings.
//!
//! Pure logic (no I/O, no async) so it can be tested with events built in
//! code; [`crate::stream`] drives it from a worker's stream.

use std::sync::Arc;
use std::time::Instant;

use aquila_proto::v1;
use aquila_proto::worker::v1 as worker;

use crate::detokenize::{Detokenizer, token_text};
use crate::error::GatewayError;
use crate::model::Model;
use crate::stop::{StopMatcher, StopOutcome};

/// What the gateway knows about a request once it is accepted.
pub struct RequestContext {
    pub request_id: String,
    pub model: Arc<Model>,
    pub prompt_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub received: Instant,
}

/// Ends of a generation, other than errors.
enum Ending {
    Worker(worker::Finish),
    StopString(usize),
}

pub struct Transcriber {
    ctx: RequestContext,
    worker_address: String,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    first_token_at: Option<Instant>,
    completion_tokens: u32,
}

impl Transcriber {
    pub fn new(ctx: RequestContext, worker_address: String) -> Self {
        Transcriber {
            detokenizer: Detokenizer::new(&ctx.prompt_token_ids),
            stop: StopMatcher::new(ctx.stop.clone()),
            ctx,
            worker_address,
            first_token_at: None,
            completion_tokens: 0,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.ctx.request_id
    }

    /// The response for one worker event, and whether it is the last.
    pub fn on_event(
        &mut self,
        event: worker::GenerateEvent,
        arrived: Instant,
    ) -> Result<(v1::GenerateResponse, bool), GatewayError> {
        let mut response = v1::GenerateResponse {
            model: self.ctx.model.name().to_owned(),
            request_id: self.ctx.request_id.clone(),
            ..Default::default()
        };
        if !event.tokens.is_empty() && self.first_token_at.is_none() {
            self.first_token_at = Some(arrived);
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
            worker = %self.worker_address,
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

#[cfg(test)]
#[path = "transcribe_tests.rs"]
mod tests;
