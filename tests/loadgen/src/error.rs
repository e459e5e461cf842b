//! The load generator's one error type. Only set-up failures are errors: a
//! request that fails during a run is a measurement (counted in the report by
//! its gRPC code), never a `LoadgenError`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A flag failed validation; names the flag, the value and why.
    #[error("invalid {flag} {value:?}: {reason}")]
    Config {
        flag: &'static str,
        value: String,
        reason: String,
    },

    #[error("reading prompts file {}: {source}", path.display())]
    PromptsFileRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("prompts file {} line {line}: {reason}", path.display())]
    PromptsFileLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// A TLS flag's file is missing, unreadable or refused.
    #[error("TLS: {0}")]
    Tls(#[from] aquila_proto::tls::TlsError),

    /// The gateway could not be reached before the first request.
    #[error("connecting to the gateway at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

impl LoadgenError {
    pub(crate) fn config(flag: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        LoadgenError::Config {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}
