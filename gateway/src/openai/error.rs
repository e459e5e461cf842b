//! OpenAI-style errors: one HTTP status per gRPC code, and the JSON body
//! OpenAI clients parse (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Errors from the Generation service arrive as `tonic::Status` and keep
//! their message; only the leading field name is translated from the gRPC
//! request's naming to the OpenAI request's (`params.max_new_tokens` →
//! `max_tokens`), so `param` names what the HTTP client sent. This module
//! decides nothing about whether a request is valid.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// gRPC field names (after `params.`) that an OpenAI request spells
/// differently, per endpoint.
const COMPLETION_FIELDS: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    ("prompt_token_ids", "prompt"),
    ("top_logprobs", "logprobs"),
];
const CHAT_FIELDS: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    // The rendered conversation is the prompt.
    ("prompt", "messages"),
];
/// Fields a validation message may start with (see `crate::validation`).
const KNOWN_FIELDS: &[&str] = &[
    "prompt",
    "prompt_token_ids",
    "messages",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "top_logprobs",
    "seed",
];

/// Which request shape an error is reported against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Code,
}

impl ApiError {
    /// 400 for a request the HTTP layer itself cannot read.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_owned),
            code: Code::InvalidArgument,
        }
    }

    /// A failure of the Generation service, with the HTTP status of its code.
    pub fn from_status(status: &tonic::Status, endpoint: Endpoint) -> Self {
        let code = status.code();
        let (param, message) = match code {
            Code::InvalidArgument => translate(status.message(), endpoint),
            Code::NotFound if status.message().starts_with("model ") => {
                (Some("model".to_owned()), status.message().to_owned())
            }
            _ => (None, status.message().to_owned()),
        };
        ApiError {
            status: http_status(code),
            message,
            param,
            code,
        }
    }

    /// OpenAI's error kinds: what its clients branch on besides the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                // The gRPC code in snake case: bounded, and the same word a
                // gRPC client sees.
                "code": aquila_proto::grpc_code_name(self.code).to_ascii_lowercase(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        super::json_response(self.status, &self.body())
    }
}

fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The field a validation message starts with, in the OpenAI request's
/// spelling, and the message with that first word respelled.
fn translate(message: &str, endpoint: Endpoint) -> (Option<String>, String) {
    let (first, rest) = message.split_once(' ').unwrap_or((message, ""));
    let field = first.strip_prefix("params.").unwrap_or(first);
    let (base, index) = match field.find(['[', '.']) {
        Some(at) => field.split_at(at),
        None => (field, ""),
    };
    if !KNOWN_FIELDS.contains(&base) {
        // e.g. a chat template rejecting the conversation.
        let param = message.contains("messages").then(|| "messages".to_owned());
        return (param, message.to_owned());
    }
    let renames = match endpoint {
        Endpoint::Completions => COMPLETION_FIELDS,
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Other => &[],
    };
    let base = renames
        .iter()
        .find(|(grpc, _)| *grpc == base)
        .map_or(base, |(_, openai)| openai);
    let word = format!("{base}{index}");
    let message = if rest.is_empty() {
        word.clone()
    } else {
        format!("{word} {rest}")
    };
    // The parameter itself, without an index into it: "stop", "messages[0].role".
    let param = if base == "messages" {
        word
    } else {
        base.to_owned()
    };
    (Some(param), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(message: &str, endpoint: Endpoint) -> ApiError {
        ApiError::from_status(&tonic::Status::invalid_argument(message), endpoint)
    }

    #[test]
    fn validation_errors_are_400_naming_the_openai_field() {
        let e = invalid(
            "params.temperature = -1 is outside [0, 100]",
            Endpoint::Chat,
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(e.message, "temperature = -1 is outside [0, 100]");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert_eq!(e.body()["error"]["code"], "invalid_argument");

        let e = invalid(
            "params.max_new_tokens = 0 must be at least 1",
            Endpoint::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "max_tokens = 0 must be at least 1");

        let e = invalid(
            "prompt_token_ids[2] = 999 is not below the vocabulary size 256",
            Endpoint::Completions,
        );
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.starts_with("prompt[2] = 999"), "{}", e.message);

        let e = invalid("params.stop[0] = \"\" is empty", Endpoint::Completions);
        assert_eq!(e.param.as_deref(), Some("stop"));

        let e = invalid(
            "messages[1].role = \"tool\" is not one of system, user, assistant",
            Endpoint::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));

        let e = invalid(
            "messages is empty; a chat needs at least one message",
            Endpoint::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn other_messages_are_kept_whole() {
        let message = "chat template of model m rejected the messages: roles must alternate";
        let e = invalid(message, Endpoint::Chat);
        assert_eq!(e.message, message);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = invalid("worker w: bad thing", Endpoint::Chat);
        assert_eq!((e.param, e.message.as_str()), (None, "worker w: bad thing"));
    }

    #[test]
    fn codes_map_to_http_statuses() {
        let cases = [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::Unauthenticated, 401, "authentication_error"),
            (Code::NotFound, 404, "invalid_request_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "server_error"),
            (Code::DeadlineExceeded, 504, "server_error"),
            (Code::Internal, 500, "server_error"),
            (Code::FailedPrecondition, 500, "server_error"),
        ];
        for (code, http, kind) in cases {
            let e = ApiError::from_status(&tonic::Status::new(code, "x"), Endpoint::Other);
            assert_eq!((e.status.as_u16(), e.kind()), (http, kind), "{code:?}");
        }
    }

    #[test]
    fn unknown_model_names_the_model_param() {
        let status = tonic::Status::not_found("model \"gpt\" is not served here");
        let e = ApiError::from_status(&status, Endpoint::Chat);
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.param.as_deref(), Some("model"));
    }
}
