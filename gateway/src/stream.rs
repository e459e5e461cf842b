//! Turns one worker's event stream into the client's response stream.
//!
//! The response stream owns the worker stream: when the client goes away
//! (the response stream is dropped) or a stop string matches, the worker
//! stream is dropped with it, which cancels the generation on the worker.
//! No task is spawned here, so nothing outlives the client. Choosing and
//! retrying workers happens before this module is involved.

use std::pin::Pin;
use std::time::{Duration, Instant};

use aquila_proto::v1;
use aquila_proto::worker::v1 as worker;
use futures::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Status, Streaming};

use crate::error::GatewayError;
use crate::metrics::RequestRecorder;
use crate::transcribe::{RequestContext, Transcriber};
use crate::workers::InFlight;

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

/// A worker call that has produced its first event.
pub struct Upstream {
    /// Counts the call against its replica until the stream ends.
    pub in_flight: InFlight,
    pub worker_address: String,
    pub events: Streaming<worker::GenerateEvent>,
    pub first: worker::GenerateEvent,
    /// When `first` arrived at the gateway.
    pub first_received: Instant,
}

/// The client's deadline, from its `grpc-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

struct State {
    transcriber: Transcriber,
    upstream: Upstream,
    pending_first: Option<worker::GenerateEvent>,
    deadline: Option<Deadline>,
    tokens: usize,
    /// Counts the outcome: OK, the error's code, or CANCELLED if dropped first.
    recorder: RequestRecorder,
    /// The gateway's concurrency slot, released when the stream ends.
    _permit: OwnedSemaphorePermit,
}

pub fn respond(
    ctx: RequestContext,
    mut upstream: Upstream,
    deadline: Option<Deadline>,
    permit: OwnedSemaphorePermit,
    recorder: RequestRecorder,
) -> ResponseStream {
    let first = std::mem::take(&mut upstream.first);
    let transcriber = Transcriber::new(ctx, upstream.worker_address.clone());
    let state = State {
        transcriber,
        upstream,
        pending_first: Some(first),
        deadline,
        tokens: 0,
        recorder,
        _permit: permit,
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
            Some(event) => Ok(Some((event, self.upstream.first_received))),
            None => {
                let next = self.upstream.events.message();
                let event = match self.deadline {
                    // The worker enforces the deadline too (it got the
                    // grpc-timeout); this covers a worker that stopped answering.
                    Some(d) => tokio::time::timeout_at(d.at.into(), next)
                        .await
                        .map_err(|_| d),
                    None => Ok(next.await),
                };
                match event {
                    Ok(event) => event.map(|e| e.map(|e| (e, Instant::now()))),
                    Err(d) => {
                        let error = GatewayError::DeadlineExceeded {
                            timeout: d.timeout,
                            tokens: self.tokens,
                        };
                        return self.end(error);
                    }
                }
            }
        };
        let result = match event {
            Ok(Some((event, arrived))) => {
                self.tokens += event.tokens.len();
                self.recorder.on_tokens(event.tokens.len(), arrived);
                self.transcriber.on_event(event, arrived)
            }
            Ok(None) => Err(GatewayError::WorkerProtocol {
                worker: self.upstream.worker_address.clone(),
                reason: "the event stream ended without a finish event".into(),
            }),
            Err(status) => {
                let error = match GatewayError::from_worker(&self.upstream.worker_address, status) {
                    // Tokens were already sent: no retry is possible, and the
                    // client must know the text is cut short.
                    GatewayError::WorkerUnavailable { worker, reason } => {
                        GatewayError::WorkerUnavailable {
                            worker,
                            reason: format!(
                                "{reason} (the stream broke after {} generated tokens; the text is incomplete)",
                                self.tokens
                            ),
                        }
                    }
                    other => other,
                };
                self.upstream.in_flight.failed(&error).await;
                Err(error)
            }
        };
        match result {
            Ok((response, done)) => {
                if done {
                    self.recorder.succeeded(&response);
                }
                (Ok(response), done)
            }
            Err(error) => self.end(error),
        }
    }

    fn end(&mut self, error: GatewayError) -> (Result<v1::GenerateResponse, Status>, bool) {
        tracing::warn!(request_id = %self.transcriber.request_id(), %error, "generation failed");
        self.recorder.failed(error.code());
        (Err(error.to_status()), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_joins_parts_and_keeps_the_last_message_fields() {
        let parts = vec![
            Ok(v1::GenerateResponse {
                text: "Hel".into(),
                token_ids: vec![1, 2],
                request_id: "r".into(),
                ..Default::default()
            }),
            Ok(v1::GenerateResponse {
                text: "lo".into(),
                token_ids: vec![3],
                finish_reason: v1::FinishReason::Eos as i32,
                usage: Some(v1::Usage {
                    prompt_tokens: 4,
                    completion_tokens: 3,
                }),
                request_id: "r".into(),
                ..Default::default()
            }),
        ];
        let all =
            futures::executor::block_on(collect(Box::pin(futures::stream::iter(parts)))).unwrap();
        assert_eq!(all.text, "Hello");
        assert_eq!(all.token_ids, [1, 2, 3]);
        assert_eq!(all.finish_reason(), v1::FinishReason::Eos);
        assert_eq!(all.usage.unwrap().completion_tokens, 3);
        assert_eq!(all.request_id, "r");
    }

    #[test]
    fn collect_returns_a_mid_stream_error() {
        let parts = vec![
            Ok(v1::GenerateResponse::default()),
            Err(Status::resource_exhausted("worker w: full")),
        ];
        let error = futures::executor::block_on(collect(Box::pin(futures::stream::iter(parts))))
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    }
}
