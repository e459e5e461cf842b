//! The public `aquila.v1.Generation` service.
//!
//! Each RPC resolves the model, turns text into validated token ids, picks a
//! replica (retrying once on another one if the first is unreachable before
//! any token arrived) and hands the worker stream to [`crate::stream`]. This
//! module holds no per-request state after returning: the response stream
//! owns everything.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aquila_proto::v1;
use aquila_proto::v1::generation_server::Generation;
use aquila_proto::worker::v1 as worker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use crate::config::Limits;
use crate::error::GatewayError;
use crate::metrics::{GatewayMetrics, Method, RequestRecorder};
use crate::model::Model;
use crate::stream::{self, Deadline, ResponseStream, Upstream};
use crate::template::Message;
use crate::transcribe::RequestContext;
use crate::validation::{self, Prompt, ValidRequest};
use crate::workers::{Picked, WorkerPool};

/// Attempts per request: the first replica, then one other if it was unreachable.
const MAX_ATTEMPTS: usize = 2;

#[derive(Debug)]
pub struct GenerationService {
    pool: Arc<WorkerPool>,
    limits: Limits,
    /// One permit per request being served (`--max-concurrent-requests`).
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    metrics: Arc<GatewayMetrics>,
}

/// What every request carries from admission to its response stream.
struct Admitted {
    model: Arc<Model>,
    request_id: String,
    received: Instant,
    deadline: Option<Deadline>,
    permit: OwnedSemaphorePermit,
}

impl GenerationService {
    pub fn new(
        pool: Arc<WorkerPool>,
        limits: Limits,
        slots: Arc<Semaphore>,
        metrics: Arc<GatewayMetrics>,
    ) -> Self {
        let max_concurrent = slots.available_permits();
        GenerationService {
            pool,
            limits,
            slots,
            max_concurrent,
            metrics,
        }
    }

    /// Admission: refuses at once when shutting down or at the concurrency
    /// limit, before any work is spent on the request.
    fn accept(
        &self,
        requested_model: &str,
        metadata: &MetadataMap,
    ) -> Result<Admitted, GatewayError> {
        let received = Instant::now();
        let request_id = match client_request_id(metadata)? {
            Some(id) => id,
            None => next_request_id(),
        };
        Span::current().record("request_id", request_id.as_str());
        if self.pool.is_closing() {
            return Err(GatewayError::ShuttingDown);
        }
        let permit =
            Arc::clone(&self.slots)
                .try_acquire_owned()
                .map_err(|_| GatewayError::Overloaded {
                    limit: self.max_concurrent,
                })?;
        let model = self.pool.resolve(requested_model)?;
        Span::current().record("model", model.name());
        Ok(Admitted {
            model,
            request_id,
            received,
            deadline: deadline(metadata, received),
            permit,
        })
    }

    /// Opens a generation; its outcome is counted by `recorder`, which the
    /// response stream takes over once open.
    async fn open_generate(
        &self,
        request: Request<v1::GenerateRequest>,
        method: Method,
    ) -> Result<ResponseStream, Status> {
        let mut recorder = self.metrics.request(method);
        self.try_open_generate(request, &mut recorder)
            .await
            .map_err(|error| {
                recorder.failed(error.code());
                error.into()
            })
    }

    async fn open_chat(
        &self,
        request: Request<v1::ChatRequest>,
        method: Method,
    ) -> Result<ResponseStream, Status> {
        let mut recorder = self.metrics.request(method);
        self.try_open_chat(request, &mut recorder)
            .await
            .map_err(|error| {
                recorder.failed(error.code());
                error.into()
            })
    }

    async fn try_open_generate(
        &self,
        request: Request<v1::GenerateRequest>,
        recorder: &mut RequestRecorder,
    ) -> Result<ResponseStream, GatewayError> {
        let admitted = self.accept(&request.get_ref().model, request.metadata())?;
        let request = request.into_inner();
        let model = &admitted.model;
        // Explicit ids are sent as given; only text prompts get the bos token.
        let ids = match validation::parse_prompt(&request)? {
            Prompt::Text(text) => model.encode(&text, true)?,
            Prompt::TokenIds(ids) => ids,
        };
        let valid = validation::validate(
            ids,
            request.params.as_ref(),
            &self.limits,
            model.limits(),
            &[],
        )?;
        self.open(admitted, valid, recorder).await
    }

    async fn try_open_chat(
        &self,
        request: Request<v1::ChatRequest>,
        recorder: &mut RequestRecorder,
    ) -> Result<ResponseStream, GatewayError> {
        let admitted = self.accept(&request.get_ref().model, request.metadata())?;
        let request = request.into_inner();
        let model = &admitted.model;
        validation::validate_messages(&request.messages)?;
        let messages: Vec<Message> = request
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        let ids = model.encode_chat(&messages)?;
        let valid = validation::validate(
            ids,
            request.params.as_ref(),
            &self.limits,
            model.limits(),
            &model.info.chat_stop,
        )?;
        self.open(admitted, valid, recorder).await
    }

    async fn open(
        &self,
        admitted: Admitted,
        valid: ValidRequest,
        recorder: &mut RequestRecorder,
    ) -> Result<ResponseStream, GatewayError> {
        tracing::debug!(
            prompt_tokens = valid.prompt_token_ids.len(),
            max_new_tokens = valid.params.max_new_tokens,
            "request accepted"
        );
        let Admitted {
            model,
            request_id,
            received,
            deadline,
            permit,
        } = admitted;
        let request = worker::GenerateRequest {
            request_id: request_id.clone(),
            prompt_token_ids: valid.prompt_token_ids,
            params: Some(valid.params),
        };
        let upstream = self
            .call_with_retry(model.name(), &request, deadline)
            .await?;
        let ctx = RequestContext {
            request_id,
            logprobs: request.params.as_ref().is_some_and(|p| p.logprobs),
            prompt_token_ids: request.prompt_token_ids,
            stop: valid.stop,
            model,
            received,
        };
        Ok(stream::respond(
            ctx,
            upstream,
            deadline,
            permit,
            recorder.hand_off(),
        ))
    }

    /// The first replica, then (if it could not be reached before its first
    /// event) one other: a retry can never repeat tokens the client saw.
    async fn call_with_retry(
        &self,
        model: &str,
        request: &worker::GenerateRequest,
        deadline: Option<Deadline>,
    ) -> Result<Upstream, GatewayError> {
        let mut tried: Vec<String> = Vec::new();
        let mut failed: Option<GatewayError> = None;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.metrics.retried();
            }
            let picked = match self.pool.pick(model, &request.prompt_token_ids, &tried) {
                Ok(picked) => picked,
                // No other replica: the unreachable one's error says more.
                Err(error) => return Err(failed.unwrap_or(error)),
            };
            tried.push(picked.address.clone());
            match self.call(picked, request.clone(), deadline).await {
                Ok(upstream) => return Ok(upstream),
                Err(error) if error.is_worker_unavailable() => {
                    tracing::warn!(%error, "worker unreachable; trying another replica");
                    failed = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(failed.unwrap_or_else(|| GatewayError::NoHealthyWorker {
            model: model.to_owned(),
        }))
    }

    /// Starts the generation and waits for its first event, so that a worker
    /// failing before any token can still be replaced. The client's deadline
    /// goes to the worker as its `grpc-timeout`.
    async fn call(
        &self,
        picked: Picked,
        request: worker::GenerateRequest,
        deadline: Option<Deadline>,
    ) -> Result<Upstream, GatewayError> {
        let Picked {
            address,
            mut client,
            mut in_flight,
        } = picked;
        let mut request = Request::new(request);
        if let Some(d) = deadline {
            let left = d.at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GatewayError::DeadlineExceeded {
                    timeout: d.timeout,
                    tokens: 0,
                });
            }
            request.set_timeout(left);
        }
        let started = async {
            let to_error = |status: Status| GatewayError::from_worker(&address, status);
            let mut events = client
                .generate(request)
                .await
                .map_err(to_error)?
                .into_inner();
            let first = events.message().await.map_err(to_error)?.ok_or_else(|| {
                GatewayError::WorkerProtocol {
                    worker: address.clone(),
                    reason: "the event stream ended before its first event".into(),
                }
            })?;
            Ok((events, first))
        };
        let started = match deadline {
            Some(d) => tokio::time::timeout_at(d.at.into(), started)
                .await
                .unwrap_or(Err(GatewayError::DeadlineExceeded {
                    timeout: d.timeout,
                    tokens: 0,
                })),
            None => started.await,
        };
        match started {
            Ok((events, first)) => {
                in_flight.succeeded();
                Ok(Upstream {
                    in_flight,
                    worker_address: address,
                    events,
                    first,
                    first_received: Instant::now(),
                })
            }
            Err(error) => {
                in_flight.failed(&error).await;
                Err(error)
            }
        }
    }
}

/// The client's deadline, from its `grpc-timeout` header.
fn deadline(metadata: &MetadataMap, received: Instant) -> Option<Deadline> {
    let timeout = aquila_proto::grpc_timeout(metadata)?;
    Some(Deadline {
        at: received + timeout,
        timeout,
    })
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStreamStream = ResponseStream;
    type ChatStreamStream = ResponseStream;

    #[instrument(skip_all, fields(request_id, model))]
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let stream = self.open_generate(request, Method::Generate).await?;
        Ok(Response::new(stream::collect(stream).await?))
    }

    #[instrument(skip_all, fields(request_id, model))]
    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        Ok(Response::new(
            self.open_generate(request, Method::GenerateStream).await?,
        ))
    }

    #[instrument(skip_all, fields(request_id, model))]
    async fn chat(
        &self,
        request: Request<v1::ChatRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let stream = self.open_chat(request, Method::Chat).await?;
        Ok(Response::new(stream::collect(stream).await?))
    }

    #[instrument(skip_all, fields(request_id, model))]
    async fn chat_stream(
        &self,
        request: Request<v1::ChatRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        Ok(Response::new(
            self.open_chat(request, Method::ChatStream).await?,
        ))
    }

    #[instrument(skip_all, fields(model))]
    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let result = self.tokenize_text(request.into_inner());
        let code = result
            .as_ref()
            .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
        self.metrics.count(Method::Tokenize, code);
        Ok(Response::new(result?))
    }

    #[instrument(skip_all)]
    async fn list_models(
        &self,
        _request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        self.metrics.count(Method::ListModels, tonic::Code::Ok);
        Ok(Response::new(self.list()))
    }
}

impl GenerationService {
    fn tokenize_text(
        &self,
        request: v1::TokenizeRequest,
    ) -> Result<v1::TokenizeResponse, GatewayError> {
        let model = self.pool.resolve(&request.model)?;
        Span::current().record("model", model.name());
        let token_ids = model.encode(&request.text, request.add_special_tokens)?;
        let tokens = token_ids.iter().map(|&id| model.piece(id)).collect();
        Ok(v1::TokenizeResponse { token_ids, tokens })
    }

    fn list(&self) -> v1::ListModelsResponse {
        let models = self
            .pool
            .models()
            .iter()
            .map(|model| {
                let info = &model.info;
                v1::ModelInfo {
                    name: info.name.clone(),
                    architecture: info.architecture.clone(),
                    context_length: info.context_length,
                    vocab_size: info.vocab_size,
                    dtype: info.dtype.clone(),
                    tensor_parallel_size: info.tensor_parallel_size,
                    has_chat_template: model.has_chat_template(),
                    replicas: u32::try_from(self.pool.healthy_replicas(&info.name))
                        .unwrap_or(u32::MAX),
                    dtype_reason: info.dtype_reason.clone(),
                    chat_template_name: info.chat_template_name.clone(),
                }
            })
            .collect();
        v1::ListModelsResponse { models }
    }
}

/// The longest `x-request-id` a client may send.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// The client's own request id (`x-request-id`), used instead of ours so
/// that one id follows the request through the client's, the gateway's and
/// the worker's logs. Bounded and printable, since it lands in log lines.
fn client_request_id(metadata: &MetadataMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = metadata.get("x-request-id") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_REQUEST_ID_BYTES
        || !bytes.iter().all(|b| b.is_ascii_graphic())
    {
        let shown: String = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into();
        return Err(GatewayError::InvalidRequest(format!(
            "metadata x-request-id = {shown:?} ({} bytes) must be 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters without spaces",
            bytes.len()
        )));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Unique across restarts: the process start time, then a counter.
fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: OnceLock<u64> = OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    format!("{start:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_request_id_is_kept_when_sane() {
        let mut m = MetadataMap::new();
        assert_eq!(client_request_id(&m).unwrap(), None);
        m.insert("x-request-id", "trace-42".parse().unwrap());
        assert_eq!(client_request_id(&m).unwrap().as_deref(), Some("trace-42"));
        for bad in ["has space".to_owned(), "x".repeat(129)] {
            m.insert("x-request-id", bad.parse().unwrap());
            let text = client_request_id(&m).unwrap_err().to_string();
            assert!(
                text.contains("x-request-id") && text.contains("128"),
                "{text}"
            );
        }
    }

    #[test]
    fn request_ids_are_unique() {
        let a = next_request_id();
        let b = next_request_id();
        assert_ne!(a, b);
        assert_eq!(a.split('-').next(), b.split('-').next());
    }
}
