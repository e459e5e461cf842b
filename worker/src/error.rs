//! The worker's one error type. Variants that wrap a lower error say which
//! phase failed; `status()` is the single mapping to gRPC codes.

use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("loading {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("model config: {0}")]
    Config(String),
    /// Start-up: the model, cache and step buffers would not fit in the
    /// memory the process may use (the message says what would).
    #[error("{0}")]
    DoesNotFit(String),
    #[error("weight {name}: {source}")]
    Weight {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("tensor computation: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("communicator: {0}")]
    Comm(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Start-up: a metric could not be declared (a name registered twice).
    #[error("declaring the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    pub fn load(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Load {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Load { .. }
            | Self::Config(_)
            | Self::DoesNotFit(_)
            | Self::Weight { .. }
            | Self::Tokenizer(_) => "load",
            Self::Compute(_) => "compute",
            Self::InvalidRequest(_) => "invalid_request",
            Self::Overloaded(_) => "overloaded",
            Self::EngineStopped => "engine_stopped",
            Self::Comm(_) => "comm",
            Self::Io { .. } => "io",
            Self::Transport(_) => "transport",
            Self::Metrics(_) => "metrics",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest(_) => Code::InvalidArgument,
            Self::Overloaded(_) => Code::ResourceExhausted,
            Self::EngineStopped | Self::Comm(_) | Self::Transport(_) => Code::Unavailable,
            Self::DoesNotFit(_) => Code::ResourceExhausted,
            Self::Load { .. }
            | Self::Config(_)
            | Self::Weight { .. }
            | Self::Tokenizer(_)
            | Self::Compute(_)
            | Self::Io { .. }
            | Self::Metrics(_) => Code::Internal,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
