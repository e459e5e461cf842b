//! The OpenAI-compatible HTTP front (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models`, and the probes `GET /health`
//! (liveness) and `GET /ready` (readiness, as gRPC health reports it).
//!
//! A translation layer only: each request is read into an `aquila.v1`
//! request and handed to the same [`GenerationService`] the gRPC server
//! holds, through its [`Generation`] methods, so admission, the concurrency
//! limit, validation, routing, retries and deadlines (a `grpc-timeout`
//! header) are exactly the gRPC API's. API keys are checked by the same
//! [`ApiKeyCheck`], before the body is read; the probes stay open. Nothing
//! here may decide whether a request is valid beyond what the gRPC request
//! cannot express (see [`request`]).

pub mod error;
pub mod request;
pub mod response;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aquila_proto::v1;
use aquila_proto::v1::generation_server::Generation;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;

use crate::security::ApiKeyCheck;
use crate::service::GenerationService;
use crate::stream::ResponseStream;
use crate::workers::WorkerPool;
use error::{ApiError, Endpoint};
use response::{Chunks, Kind};

/// What the handlers share: the gRPC server's own service and pool.
#[derive(Clone)]
pub struct HttpState {
    pub service: Arc<GenerationService>,
    pub pool: Arc<WorkerPool>,
    pub api_keys: ApiKeyCheck,
}

/// The routes; a request body over `max_body_bytes` gets 413.
pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Serves `router` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router) {
    // Tokens are small writes: without TCP_NODELAY, Nagle holds them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "the HTTP API stopped");
    }
}

async fn authorize(
    State(s): State<HttpState>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let mut probe = tonic::Request::new(());
    *probe.metadata_mut() = MetadataMap::from_headers(request.headers().clone());
    let mut check = s.api_keys.clone();
    match check.call(probe) {
        Ok(_) => next.run(request).await,
        Err(status) => ApiError::from_status(&status, Endpoint::Other).into_response(),
    }
}

async fn completions(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = match body
        .map_err(body_error)
        .and_then(|b| request::completion(&b))
    {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let request = grpc_request(&headers, parsed.request);
    if parsed.stream {
        let opened = s.service.generate_stream(request).await;
        streamed(Kind::Completion, parsed.include_usage, opened)
    } else {
        whole(Kind::Completion, s.service.generate(request).await)
    }
}

async fn chat(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = match body.map_err(body_error).and_then(|b| request::chat(&b)) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let request = grpc_request(&headers, parsed.request);
    if parsed.stream {
        let opened = s.service.chat_stream(request).await;
        streamed(Kind::Chat, parsed.include_usage, opened)
    } else {
        whole(Kind::Chat, s.service.chat(request).await)
    }
}

async fn models(State(s): State<HttpState>) -> Response {
    let listed = s
        .service
        .list_models(tonic::Request::new(v1::ListModelsRequest {}))
        .await;
    match listed {
        Ok(r) => {
            let data: Vec<Value> = r
                .into_inner()
                .models
                .into_iter()
                .map(|m| {
                    json!({
                        "id": m.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "aquila",
                        "context_length": m.context_length,
                        "replicas": m.replicas,
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        Err(status) => ApiError::from_status(&status, Endpoint::Other).into_response(),
    }
}

/// Liveness: the process answers.
async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: a replica can take requests and the gateway is not draining.
async fn ready(State(s): State<HttpState>) -> Response {
    if s.pool.is_ready() {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not ready", "reason": "no healthy worker, or the gateway is shutting down"}),
        )
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    let mut error = ApiError::invalid(None, format!("no route for {method} {}", uri.path()));
    error.status = StatusCode::NOT_FOUND;
    error.code = Code::NotFound;
    error.into_response()
}

/// The gRPC request the service gets: the HTTP headers become its metadata
/// (a `grpc-timeout` sets the deadline, as on gRPC).
fn grpc_request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = MetadataMap::from_headers(headers.clone());
    request
}

fn whole(
    kind: Kind,
    answer: Result<tonic::Response<v1::GenerateResponse>, tonic::Status>,
) -> Response {
    match answer {
        Ok(r) => json_response(StatusCode::OK, &response::whole(kind, r.get_ref(), now())),
        Err(status) => ApiError::from_status(&status, endpoint(kind)).into_response(),
    }
}

/// Errors before the first token keep their HTTP status; later ones end the
/// event stream with an error event.
fn streamed(
    kind: Kind,
    include_usage: bool,
    opened: Result<tonic::Response<ResponseStream>, tonic::Status>,
) -> Response {
    let stream = match opened {
        Ok(r) => r.into_inner(),
        Err(status) => return ApiError::from_status(&status, endpoint(kind)).into_response(),
    };
    let chunks = Chunks::new(kind, include_usage, now());
    // Dropping the body (the client went away) drops the response stream,
    // which cancels the generation on the worker.
    let events = futures::stream::unfold(Some((stream, chunks)), |state| async move {
        let (mut stream, mut chunks) = state?;
        let (bytes, more) = match stream.next().await {
            Some(item) => chunks.on_item(item),
            None => return Some((Ok(Bytes::from_static(response::DONE)), None)),
        };
        Some((
            Ok::<_, std::convert::Infallible>(bytes),
            more.then_some((stream, chunks)),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn endpoint(kind: Kind) -> Endpoint {
    match kind {
        Kind::Completion => Endpoint::Completions,
        Kind::Chat => Endpoint::Chat,
    }
}

/// A body that could not be read: too large (413), or broken off.
fn body_error(rejection: BytesRejection) -> ApiError {
    let mut error = ApiError::invalid(None, rejection.body_text());
    error.status = rejection.status();
    if error.status == StatusCode::PAYLOAD_TOO_LARGE {
        error.code = Code::OutOfRange;
    }
    error
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
