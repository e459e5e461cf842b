//! The gateway's one error type and its one mapping to gRPC status codes.
//!
//! Every failure a client can see goes through [`GatewayError::to_status`]; a
//! worker's status code is kept, never flattened into a string. This module
//! decides codes and labels only: it does not log or retry.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request breaks a documented rule; the message names field, value and limit.
    #[error("{0}")]
    InvalidRequest(String),

    #[error("model {requested:?} is not served here; available models: [{}]", available.join(", "))]
    UnknownModel {
        requested: String,
        available: Vec<String>,
    },

    #[error("no healthy worker serves model {model:?}")]
    NoHealthyWorker { model: String },

    #[error("model {model} has no chat template; start the gateway with --chat-template FILE")]
    NoChatTemplate { model: String },

    /// The template exists but cannot be compiled; a request cannot fix that.
    #[error("the chat template of model {model} is broken: {reason}")]
    BrokenChatTemplate { model: String, reason: String },

    /// Rendering failed, usually `raise_exception` rejecting the conversation.
    #[error("chat template of model {model} rejected the messages: {reason}")]
    TemplateRender { model: String, reason: String },

    #[error("tokenizer of model {model} failed: {reason}")]
    Tokenizer { model: String, reason: String },

    /// The gateway's own concurrency limit is reached.
    #[error(
        "the gateway is at its limit of {limit} concurrent requests (--max-concurrent-requests); retry later or on another gateway"
    )]
    Overloaded { limit: usize },

    /// SIGTERM arrived: requests in flight finish, new ones are refused.
    #[error("the gateway is shutting down; retry on another gateway")]
    ShuttingDown,

    /// The client's deadline (`grpc-timeout`) passed.
    #[error("the request's deadline of {timeout:?} passed after {tokens} generated tokens")]
    DeadlineExceeded {
        timeout: std::time::Duration,
        tokens: usize,
    },

    /// An admin call named a replica the registry does not hold.
    #[error("no replica {address:?} is registered")]
    UnknownReplica { address: String },

    /// The worker answered with a status; its code passes through to the client.
    #[error("worker {worker}: {}", status.message())]
    WorkerStatus { worker: String, status: Status },

    /// The worker could not be reached or the connection broke.
    #[error("worker {worker} is unavailable: {reason}")]
    WorkerUnavailable { worker: String, reason: String },

    /// The worker answered something the contract does not allow.
    #[error("worker {worker} broke the worker protocol: {reason}")]
    WorkerProtocol { worker: String, reason: String },

    /// Start-up: a flag failed validation.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// Start-up: a TLS flag's file is missing, unreadable or refused.
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] aquila_proto::tls::TlsError),

    /// Start-up: the reflection service could not be built.
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),

    /// Start-up: a metric could not be declared (a name registered twice).
    #[error("declaring the metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),

    /// The gRPC server itself failed.
    #[error("serving gRPC failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl GatewayError {
    /// Classifies a status returned by a call to `worker`: connection
    /// failures (UNAVAILABLE, or a transport error underneath) are
    /// [`GatewayError::WorkerUnavailable`], everything else keeps its code.
    pub fn from_worker(worker: &str, status: Status) -> Self {
        if is_unavailable(&status) {
            GatewayError::WorkerUnavailable {
                worker: worker.to_owned(),
                reason: status.message().to_owned(),
            }
        } else {
            GatewayError::WorkerStatus {
                worker: worker.to_owned(),
                status,
            }
        }
    }

    /// True when another replica might succeed where this one failed.
    pub fn is_worker_unavailable(&self) -> bool {
        matches!(self, GatewayError::WorkerUnavailable { .. })
    }

    /// True when the failure says the replica is broken (not the request,
    /// not the client, not overload): what the circuit breaker counts.
    pub fn blames_worker(&self) -> bool {
        match self {
            GatewayError::WorkerUnavailable { .. } | GatewayError::WorkerProtocol { .. } => true,
            GatewayError::WorkerStatus { status, .. } => matches!(
                status.code(),
                Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable
            ),
            _ => false,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            GatewayError::InvalidRequest(_) | GatewayError::TemplateRender { .. } => {
                Code::InvalidArgument
            }
            GatewayError::UnknownModel { .. } | GatewayError::UnknownReplica { .. } => {
                Code::NotFound
            }
            GatewayError::NoHealthyWorker { .. }
            | GatewayError::WorkerUnavailable { .. }
            | GatewayError::ShuttingDown => Code::Unavailable,
            GatewayError::Overloaded { .. } => Code::ResourceExhausted,
            GatewayError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            GatewayError::NoChatTemplate { .. } | GatewayError::BrokenChatTemplate { .. } => {
                Code::FailedPrecondition
            }
            GatewayError::WorkerStatus { status, .. } => status.code(),
            GatewayError::Tokenizer { .. }
            | GatewayError::WorkerProtocol { .. }
            | GatewayError::Config { .. }
            | GatewayError::Tls(_)
            | GatewayError::Reflection(_)
            | GatewayError::Metrics(_)
            | GatewayError::Serve(_) => Code::Internal,
        }
    }

    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }

    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::UnknownModel { .. } => "unknown_model",
            GatewayError::NoHealthyWorker { .. } => "no_healthy_worker",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::DeadlineExceeded { .. } => "deadline_exceeded",
            GatewayError::UnknownReplica { .. } => "unknown_replica",
            GatewayError::NoChatTemplate { .. } => "no_chat_template",
            GatewayError::BrokenChatTemplate { .. } => "broken_chat_template",
            GatewayError::TemplateRender { .. } => "template_render",
            GatewayError::Tokenizer { .. } => "tokenizer",
            GatewayError::WorkerStatus { .. } => "worker_status",
            GatewayError::WorkerUnavailable { .. } => "worker_unavailable",
            GatewayError::WorkerProtocol { .. } => "worker_protocol",
            GatewayError::Config { .. } => "config",
            GatewayError::Tls(_) => "tls",
            GatewayError::Reflection(_) => "reflection",
            GatewayError::Metrics(_) => "metrics",
            GatewayError::Serve(_) => "serve",
        }
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        error.to_status()
    }
}

/// UNAVAILABLE, or a status tonic made from a local error (a transport
/// error, a connection or stream the worker's death broke): a status the
/// worker sent carries no source error.
fn is_unavailable(status: &Status) -> bool {
    status.code() == Code::Unavailable || std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_codes_pass_through_with_the_worker_named() {
        let error = GatewayError::from_worker(
            "http://w1:50051",
            Status::resource_exhausted("queue is full"),
        );
        let status = error.to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "worker http://w1:50051: queue is full");
        assert!(!error.is_worker_unavailable());
    }

    #[test]
    fn unavailable_worker_is_retryable_and_unavailable() {
        let error = GatewayError::from_worker("http://w1:50051", Status::unavailable("refused"));
        assert!(error.is_worker_unavailable());
        let status = error.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("http://w1:50051"));
    }

    #[test]
    fn only_broken_workers_count_against_the_breaker() {
        let worker = |status| GatewayError::from_worker("w", status);
        assert!(worker(Status::unavailable("refused")).blames_worker());
        assert!(worker(Status::internal("engine failed")).blames_worker());
        assert!(!worker(Status::resource_exhausted("full")).blames_worker());
        assert!(!worker(Status::invalid_argument("bad")).blames_worker());
        assert!(!worker(Status::cancelled("gone")).blames_worker());
        assert!(!GatewayError::Overloaded { limit: 1 }.blames_worker());
    }

    #[test]
    fn gateway_overload_is_resource_exhausted_naming_the_limit() {
        let status = GatewayError::Overloaded { limit: 8 }.to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("limit of 8"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("--max-concurrent-requests"));
    }

    #[test]
    fn unknown_model_names_requested_and_available() {
        let status = GatewayError::UnknownModel {
            requested: "gpt".into(),
            available: vec!["aquila-7b".into(), "smollm2".into()],
        }
        .to_status();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("\"gpt\""));
        assert!(status.message().contains("aquila-7b, smollm2"));
    }

    #[test]
    fn missing_template_is_failed_precondition() {
        let status = GatewayError::NoChatTemplate { model: "m".into() }.to_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("--chat-template FILE"));
    }
}
