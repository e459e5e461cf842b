//! Gateway flags and the validated configuration they convert into.
//!
//! [`GatewayArgs`] is what clap parses (each flag also readable from an
//! `AQUILA_GATEWAY_*` variable); [`GatewayArgs::into_config`] checks it once
//! and yields a [`GatewayConfig`]. Nothing here touches the network.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;

use crate::breaker::BreakerConfig;
use crate::discovery::DnsTarget;
use crate::error::GatewayError;
use crate::routing::{PolicyKind, PrefixOptions};
use crate::security::{SecurityArgs, SecurityConfig};
use crate::template::{self, ChatTemplate};
use crate::workers::ReplicaSettings;

pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_MAX_STOP_STRINGS: usize = 16;
pub const DEFAULT_MAX_STOP_STRING_BYTES: usize = 256;
pub const DEFAULT_MAX_TOP_LOGPROBS: u32 = 20;
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_LOAD_POLL_MS: u64 = 500;
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN_MS: u64 = 10_000;
pub const DEFAULT_DISCOVER_INTERVAL_MS: u64 = 5000;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;
pub const DEFAULT_SHUTDOWN_GRACE_S: u64 = 30;
/// Same bound as the validation of request temperatures.
const MAX_TEMPERATURE: f32 = 100.0;

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Worker address ("host:port" or "http://host:port"); repeat for each worker.
    /// Workers reporting the same model name are replicas of one model.
    #[arg(long = "worker", env = "AQUILA_GATEWAY_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// Discover workers by DNS: "dns:///NAME:PORT" (e.g. a Kubernetes headless
    /// Service, one address per pod), re-resolved every --discover-interval-ms.
    /// Addresses that appear are added; those that disappear are drained.
    #[arg(
        long = "discover",
        env = "AQUILA_GATEWAY_DISCOVER",
        value_delimiter = ','
    )]
    pub discover: Vec<String>,

    /// Milliseconds between DNS resolutions of each --discover name.
    #[arg(long, env = "AQUILA_GATEWAY_DISCOVER_INTERVAL_MS", default_value_t = DEFAULT_DISCOVER_INTERVAL_MS)]
    pub discover_interval_ms: u64,

    /// How a request's replica is chosen among the healthy ones.
    #[arg(
        long,
        env = "AQUILA_GATEWAY_ROUTING",
        value_enum,
        default_value = "least-load"
    )]
    pub routing: PolicyKind,

    /// prefix-aware: leading prompt tokens that choose the replica (whole KV blocks).
    #[arg(long, env = "AQUILA_GATEWAY_PREFIX_TOKENS", default_value_t = PrefixOptions::default().prefix_tokens)]
    pub prefix_tokens: usize,

    /// prefix-aware: a replica takes at most (1 + this) × the mean in-flight
    /// load before a prefix spills to the next replica on the ring.
    #[arg(long, env = "AQUILA_GATEWAY_PREFIX_LOAD_FACTOR", default_value_t = PrefixOptions::default().load_factor)]
    pub prefix_load_factor: f64,

    /// prefix-aware: requests in flight below which a replica always keeps its prefixes.
    #[arg(long, env = "AQUILA_GATEWAY_PREFIX_MIN_LOAD", default_value_t = PrefixOptions::default().min_load)]
    pub prefix_min_load: usize,

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

    /// Milliseconds a worker health check may take before it counts as failed.
    #[arg(long, env = "AQUILA_GATEWAY_HEALTH_TIMEOUT_MS", default_value_t = DEFAULT_HEALTH_TIMEOUT_MS)]
    pub health_timeout_ms: u64,

    /// Passed health checks in a row that put a worker (back) in rotation.
    #[arg(long, env = "AQUILA_GATEWAY_HEALTHY_THRESHOLD", default_value_t = DEFAULT_HEALTHY_THRESHOLD)]
    pub healthy_threshold: u32,

    /// Failed health checks in a row that take a worker out of rotation
    /// (a call that cannot reach it takes it out at once).
    #[arg(long, env = "AQUILA_GATEWAY_UNHEALTHY_THRESHOLD", default_value_t = DEFAULT_UNHEALTHY_THRESHOLD)]
    pub unhealthy_threshold: u32,

    /// Milliseconds between polls of each worker's load (running, waiting, free KV blocks).
    #[arg(long, env = "AQUILA_GATEWAY_LOAD_POLL_MS", default_value_t = DEFAULT_LOAD_POLL_MS)]
    pub load_poll_ms: u64,

    /// Failed calls in a row (unreachable, internal errors) that open a
    /// worker's circuit breaker; 0 disables the breaker.
    #[arg(long, env = "AQUILA_GATEWAY_BREAKER_FAILURES", default_value_t = DEFAULT_BREAKER_FAILURES)]
    pub breaker_failures: u32,

    /// Milliseconds an open breaker keeps traffic away before one trial call.
    #[arg(long, env = "AQUILA_GATEWAY_BREAKER_OPEN_MS", default_value_t = DEFAULT_BREAKER_OPEN_MS)]
    pub breaker_open_ms: u64,

    /// Requests the gateway serves at once; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "AQUILA_GATEWAY_MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub max_concurrent_requests: usize,

    /// Seconds that requests in flight get to finish after SIGTERM before the gateway exits.
    #[arg(long, env = "AQUILA_GATEWAY_SHUTDOWN_GRACE_S", default_value_t = DEFAULT_SHUTDOWN_GRACE_S)]
    pub shutdown_grace_s: u64,

    /// Also export request metrics under vLLM's names (`vllm:…`, labelled
    /// `model_name`), for dashboards and autoscalers written for vLLM.
    #[arg(long, env = "AQUILA_METRICS_VLLM_NAMES")]
    pub metrics_vllm_names: bool,

    #[command(flatten)]
    pub security: SecurityArgs,
}

impl GatewayArgs {
    /// Arguments with every default and the given workers, for embedding and tests.
    pub fn with_workers(workers: Vec<String>) -> Self {
        GatewayArgs {
            workers,
            discover: Vec::new(),
            discover_interval_ms: DEFAULT_DISCOVER_INTERVAL_MS,
            routing: PolicyKind::LeastLoad,
            prefix_tokens: PrefixOptions::default().prefix_tokens,
            prefix_load_factor: PrefixOptions::default().load_factor,
            prefix_min_load: PrefixOptions::default().min_load,
            chat_template: None,
            default_max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            default_temperature: DEFAULT_TEMPERATURE,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_string_bytes: DEFAULT_MAX_STOP_STRING_BYTES,
            max_top_logprobs: DEFAULT_MAX_TOP_LOGPROBS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            health_timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            load_poll_ms: DEFAULT_LOAD_POLL_MS,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_open_ms: DEFAULT_BREAKER_OPEN_MS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            shutdown_grace_s: DEFAULT_SHUTDOWN_GRACE_S,
            metrics_vllm_names: false,
            security: SecurityArgs::default(),
        }
    }

    /// Validates every flag; reads and compiles the chat template file.
    /// With `admin`, the gateway may start with no worker (the admin API adds them).
    pub fn into_config(self) -> Result<GatewayConfig, GatewayError> {
        self.into_config_with(false)
    }

    pub fn into_config_with(self, admin: bool) -> Result<GatewayConfig, GatewayError> {
        if self.workers.is_empty() && self.discover.is_empty() && !admin {
            return Err(config_error(
                "worker",
                "[]",
                "at least one --worker or --discover is required (or --admin-listen to add workers later)",
            ));
        }
        let discover = self
            .discover
            .iter()
            .map(|d| DnsTarget::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let positive = [
            ("discover_interval_ms", self.discover_interval_ms),
            ("load_poll_ms", self.load_poll_ms),
            ("healthy_threshold", u64::from(self.healthy_threshold)),
            ("unhealthy_threshold", u64::from(self.unhealthy_threshold)),
            (
                "max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(config_error(field, 0, "must be at least 1"));
            }
        }
        if self.prefix_tokens == 0 {
            return Err(config_error("prefix_tokens", 0, "must be at least 1"));
        }
        let f = self.prefix_load_factor;
        if !(f > 0.0 && f <= 100.0) {
            return Err(config_error("prefix_load_factor", f, "must be in (0, 100]"));
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
            discover,
            discover_interval: Duration::from_millis(self.discover_interval_ms),
            routing: self.routing,
            prefix: PrefixOptions {
                prefix_tokens: self.prefix_tokens,
                load_factor: self.prefix_load_factor,
                min_load: self.prefix_min_load,
            },
            replicas: ReplicaSettings {
                health_interval: Duration::from_millis(self.health_interval_ms),
                health_timeout: Duration::from_millis(self.health_timeout_ms),
                healthy_threshold: self.healthy_threshold,
                unhealthy_threshold: self.unhealthy_threshold,
                load_interval: Duration::from_millis(self.load_poll_ms),
                breaker: BreakerConfig {
                    failures: self.breaker_failures,
                    open_for: Duration::from_millis(self.breaker_open_ms),
                },
            },
            max_concurrent_requests: self.max_concurrent_requests,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            metrics: Registry::new(),
            metrics_vllm_names: self.metrics_vllm_names,
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
    pub discover: Vec<DnsTarget>,
    pub discover_interval: Duration,
    pub routing: PolicyKind,
    pub prefix: PrefixOptions,
    pub replicas: ReplicaSettings,
    pub max_concurrent_requests: usize,
    pub shutdown_grace: Duration,
    /// Where the gateway declares its metrics; the caller serves it (a
    /// fresh one per config, so gateways in one process do not collide).
    pub metrics: Registry,
    pub metrics_vllm_names: bool,
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
    ChatTemplate::compile(&source)
        .map(|t| t.named(shown.to_string()))
        .map_err(|e| {
            config_error(
                "chat_template",
                &shown,
                format!("not a valid Jinja template: {}", template::describe(&e)),
            )
        })
}

pub(crate) fn config_error(
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
        assert_eq!(config.replicas.health_interval, Duration::from_millis(1000));
        assert_eq!(config.routing, PolicyKind::LeastLoad);
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
