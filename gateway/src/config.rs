//! Gateway flags and the validated configuration they convert into.
//!
//! [`GatewayArgs`] is what clap parses (each flag also readable from an
//! `AQUILA_GATEWAY_*` variable); [`GatewayArgs::into_config`] checks it once
//! and yields a [`GatewayConfig`]. Nothing here touches the network.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::GatewayError;
use crate::security::{SecurityArgs, SecurityConfig};
use crate::template::{self, ChatTemplate};

pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_MAX_STOP_STRINGS: usize = 16;
pub const DEFAULT_MAX_STOP_STRING_BYTES: usize = 256;
pub const DEFAULT_MAX_TOP_LOGPROBS: u32 = 20;
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1000;
/// Same bound as the validation of request temperatures.
const MAX_TEMPERATURE: f32 = 100.0;

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Worker address ("host:port" or "http://host:port"); repeat for each worker.
    /// Workers reporting the same model name are replicas of one model.
    #[arg(long = "worker", env = "AQUILA_GATEWAY_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// Jinja chat template file used for every model instead of the models' own templates.
    #[arg(long, env = "AQUILA_GATEWAY_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// Tokens to generate when a request leaves max_new_tokens unset (capped by the context).
    #[arg(long, env = "AQUILA_GATEWAY_DEFAULT_MAX_NEW_TOKENS", default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub default_max_new_tokens: u32,

    /// Temperature when a request leaves it unset (0 = greedy).
    #[arg(long, env = "AQUILA_GATEWAY_DEFAULT_TEMPERATURE", default_value_t = DEFAULT_TEMPERATURE)]
    pub default_temperature: f32,

    /// Most stop strings one request may give.
    #[arg(long, env = "AQUILA_GATEWAY_MAX_STOP_STRINGS", default_value_t = DEFAULT_MAX_STOP_STRINGS)]
    pub max_stop_strings: usize,

    /// Longest stop string allowed, in UTF-8 bytes.
    #[arg(long, env = "AQUILA_GATEWAY_MAX_STOP_STRING_BYTES", default_value_t = DEFAULT_MAX_STOP_STRING_BYTES)]
    pub max_stop_string_bytes: usize,

    /// Most alternatives per token a request may ask for with top_logprobs.
    #[arg(long, env = "AQUILA_GATEWAY_MAX_TOP_LOGPROBS", default_value_t = DEFAULT_MAX_TOP_LOGPROBS)]
    pub max_top_logprobs: u32,

    /// Milliseconds between health checks of each worker.
    #[arg(long, env = "AQUILA_GATEWAY_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS)]
    pub health_interval_ms: u64,

    /// Milliseconds a worker health check may take before the worker counts as unhealthy.
    #[arg(long, env = "AQUILA_GATEWAY_HEALTH_TIMEOUT_MS", default_value_t = DEFAULT_HEALTH_TIMEOUT_MS)]
    pub health_timeout_ms: u64,

    #[command(flatten)]
    pub security: SecurityArgs,
}

impl GatewayArgs {
    /// Arguments with every default and the given workers, for embedding and tests.
    pub fn with_workers(workers: Vec<String>) -> Self {
        GatewayArgs {
            workers,
            chat_template: None,
            default_max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            default_temperature: DEFAULT_TEMPERATURE,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_string_bytes: DEFAULT_MAX_STOP_STRING_BYTES,
            max_top_logprobs: DEFAULT_MAX_TOP_LOGPROBS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            health_timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            security: SecurityArgs::default(),
        }
    }

    /// Validates every flag; reads and compiles the chat template file.
    pub fn into_config(self) -> Result<GatewayConfig, GatewayError> {
        if self.workers.is_empty() {
            return Err(config_error(
                "worker",
                "[]",
                "at least one --worker is required",
            ));
        }
        let workers = self
            .workers
            .iter()
            .map(|w| normalize_worker_address(w))
            .collect::<Result<Vec<_>, _>>()?;

        let chat_template = match &self.chat_template {
            None => None,
            Some(path) => Some(Arc::new(load_template(path)?)),
        };
        if self.default_max_new_tokens == 0 {
            return Err(config_error(
                "default_max_new_tokens",
                0,
                "must be at least 1",
            ));
        }
        let t = self.default_temperature;
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(config_error(
                "default_temperature",
                t,
                format!("must be in [0, {MAX_TEMPERATURE}]"),
            ));
        }
        if self.max_stop_string_bytes == 0 {
            return Err(config_error(
                "max_stop_string_bytes",
                0,
                "must be at least 1",
            ));
        }
        if self.health_interval_ms == 0 {
            return Err(config_error("health_interval_ms", 0, "must be at least 1"));
        }
        if self.health_timeout_ms == 0 {
            return Err(config_error("health_timeout_ms", 0, "must be at least 1"));
        }
        Ok(GatewayConfig {
            workers,
            chat_template,
            limits: Limits {
                default_max_new_tokens: self.default_max_new_tokens,
                default_temperature: self.default_temperature,
                max_stop_strings: self.max_stop_strings,
                max_stop_string_bytes: self.max_stop_string_bytes,
                max_top_logprobs: self.max_top_logprobs,
            },
            health_interval: Duration::from_millis(self.health_interval_ms),
            health_timeout: Duration::from_millis(self.health_timeout_ms),
            security: self.security.into_config()?,
        })
    }
}

/// The checked configuration `run` serves with.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Worker URIs, each with a scheme ("http://host:port").
    pub workers: Vec<String>,
    /// Overrides every model's own template when set.
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub limits: Limits,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub security: SecurityConfig,
}

/// Request limits and defaults that validation applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub default_max_new_tokens: u32,
    pub default_temperature: f32,
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
    pub max_top_logprobs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            default_temperature: DEFAULT_TEMPERATURE,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_string_bytes: DEFAULT_MAX_STOP_STRING_BYTES,
            max_top_logprobs: DEFAULT_MAX_TOP_LOGPROBS,
        }
    }
}

/// "host:port" gets "http://"; the result must parse as a tonic endpoint.
pub fn normalize_worker_address(address: &str) -> Result<String, GatewayError> {
    let address = address.trim();
    if address.is_empty() {
        return Err(config_error("worker", "\"\"", "an address is empty"));
    }
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    match tonic::transport::Endpoint::from_shared(uri.clone()) {
        Ok(_) => Ok(uri),
        Err(e) => Err(config_error(
            "worker",
            address,
            format!("not a valid address: {e}"),
        )),
    }
}

fn load_template(path: &std::path::Path) -> Result<ChatTemplate, GatewayError> {
    let shown = path.display();
    let source = std::fs::read_to_string(path)
        .map_err(|e| config_error("chat_template", &shown, format!("cannot read: {e}")))?;
    ChatTemplate::compile(&source).map_err(|e| {
        config_error(
            "chat_template",
            &shown,
            format!("not a valid Jinja template: {}", template::describe(&e)),
        )
    })
}

fn config_error(
    field: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> GatewayError {
    GatewayError::Config {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli =
            Cli::try_parse_from(["x", "--worker", "w1:1", "--worker", "http://w2:2"]).unwrap();
        let config = cli.gateway.into_config().unwrap();
        assert_eq!(config.workers, ["http://w1:1", "http://w2:2"]);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.health_interval, Duration::from_millis(1000));
        assert!(config.chat_template.is_none());
    }

    #[test]
    fn no_worker_is_an_error_naming_the_field() {
        let error = GatewayArgs::with_workers(vec![]).into_config().unwrap_err();
        assert!(error.to_string().contains("worker"));
    }

    #[test]
    fn bad_values_name_field_and_value() {
        let mut args = GatewayArgs::with_workers(vec!["w:1".into()]);
        args.default_temperature = -1.0;
        let text = args.into_config().unwrap_err().to_string();
        assert!(text.contains("default_temperature = -1"), "{text}");

        let mut args = GatewayArgs::with_workers(vec!["w:1".into()]);
        args.health_interval_ms = 0;
        let text = args.into_config().unwrap_err().to_string();
        assert!(text.contains("health_interval_ms = 0"), "{text}");
    }

    #[test]
    fn missing_template_file_is_reported() {
        let mut args = GatewayArgs::with_workers(vec!["w:1".into()]);
        args.chat_template = Some("/nonexistent/chat.jinja".into());
        let text = args.into_config().unwrap_err().to_string();
        assert!(
            text.contains("chat_template = /nonexistent/chat.jinja"),
            "{text}"
        );
    }
}
