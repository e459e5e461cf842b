//! `aquila bench` flags ([`LoadgenArgs`]) and their validated form
//! ([`LoadgenConfig`]). Everything a run needs is checked here, once; the
//! driver trusts a `LoadgenConfig` and does no parsing of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aquila_proto::tls::{self, ClientTlsArgs, TlsError};
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

use crate::dist::{LengthDist, MAX_TOKENS};
use crate::error::LoadgenError;
use crate::workload::{self, Workload};

/// Most closed-loop clients or in-flight requests; far above what one gateway
/// serves, low enough that a typo does not open a million streams.
pub const MAX_CONCURRENCY: usize = 10_000;
/// Longest run: one day.
pub const MAX_DURATION_S: f64 = 86_400.0;

/// Which streaming RPC of the public API to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `GenerateStream`, with token-id prompts or the texts of --prompts-file.
    Generate,
    /// `ChatStream`, one user message per request (needs --prompts-file).
    Chat,
    /// A worker's own `aquila.worker.v1.Worker/Generate`, token ids in and
    /// out, with --gateway set to the worker's address: the same load
    /// without the gateway, to measure what the gateway costs.
    Worker,
}

/// Load generator flags: drives a running gateway's public API and reports
/// throughput and latency.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "bench")]
pub struct LoadgenArgs {
    /// Gateway address (http:// or https://); the only address requests are sent to.
    #[arg(long, env = "AQUILA_GATEWAY", default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// API key, sent as "authorization: Bearer KEY" with every request.
    #[arg(long, env = "AQUILA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Streaming RPC to drive.
    #[arg(long, env = "AQUILA_BENCH_API", value_enum, default_value = "generate")]
    pub api: Api,
    /// Closed loop: this many clients, each sending its next request when its
    /// previous one ends (1 when --request-rate is not given).
    #[arg(
        long,
        env = "AQUILA_BENCH_CONCURRENCY",
        conflicts_with = "request_rate"
    )]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, env = "AQUILA_BENCH_REQUEST_RATE")]
    pub request_rate: Option<f64>,
    /// With --request-rate: at most this many requests in flight; an arrival
    /// waits for a free slot (later arrivals keep their scheduled times).
    #[arg(long, env = "AQUILA_BENCH_MAX_CONCURRENCY", requires = "request_rate")]
    pub max_concurrency: Option<usize>,
    /// Requests to measure, after warm-up. Without it the run lasts --duration-s.
    #[arg(long, env = "AQUILA_BENCH_NUM_REQUESTS")]
    pub num_requests: Option<u64>,
    /// Hard limit on the whole run in seconds, warm-up included; requests
    /// still in flight then are abandoned and reported as unfinished.
    #[arg(long, env = "AQUILA_BENCH_DURATION_S", default_value_t = 600.0)]
    pub duration_s: f64,
    /// Requests sent before measuring (closed loop), not counted.
    #[arg(long, env = "AQUILA_BENCH_WARMUP_REQUESTS", default_value_t = 0)]
    pub warmup_requests: u64,
    /// Prompt length in tokens: N, uniform:MIN:MAX or normal:MEAN:STD.
    #[arg(long, env = "AQUILA_BENCH_PROMPT_TOKENS", default_value = "32")]
    pub prompt_tokens: String,
    /// Output length in tokens (max_new_tokens, with ignore_eos so it is
    /// exact): N, uniform:MIN:MAX or normal:MEAN:STD.
    #[arg(long, env = "AQUILA_BENCH_OUTPUT_TOKENS", default_value = "32")]
    pub output_tokens: String,
    /// Prompt token ids are drawn from LO (included) to HI (excluded); keep
    /// HI at or below the model's vocabulary size.
    #[arg(long, env = "AQUILA_BENCH_VOCAB_RANGE", default_value = "100:1000")]
    pub vocab_range: String,
    /// Every prompt starts with the same this many ids (prefix-cache
    /// experiments); a shorter prompt is all prefix.
    #[arg(long, env = "AQUILA_BENCH_SHARED_PREFIX_TOKENS", default_value_t = 0)]
    pub shared_prefix_tokens: u32,
    /// JSONL prompts instead of token ids, one {"prompt": "...",
    /// "max_new_tokens": N} per line (max_new_tokens optional: then
    /// --output-tokens), used in turn and cycled.
    #[arg(long, env = "AQUILA_BENCH_PROMPTS_FILE")]
    pub prompts_file: Option<PathBuf>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, env = "AQUILA_BENCH_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Model name; empty means the gateway's only (or first) model.
    #[arg(long, env = "AQUILA_BENCH_MODEL", default_value = "")]
    pub model: String,
    /// Seeds lengths, prompt ids, arrival gaps and each request's sampling.
    #[arg(long, env = "AQUILA_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Also write the report, with this configuration, as one JSON document.
    #[arg(long, env = "AQUILA_BENCH_JSON")]
    pub json: Option<PathBuf>,
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// `concurrency` clients, each with one request in flight at a time.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` per second, optionally capped in flight.
    Open {
        rate: f64,
        max_concurrency: Option<usize>,
    },
}

/// A validated run: built only by [`LoadgenArgs::into_config`].
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// The URI dialed, for reports.
    pub(crate) gateway: String,
    /// The gateway with its TLS settings.
    pub(crate) endpoint: Endpoint,
    pub(crate) authorization: Option<Authorization>,
    pub(crate) api: Api,
    pub(crate) arrival: Arrival,
    pub(crate) num_requests: Option<u64>,
    pub(crate) duration: Duration,
    pub(crate) warmup_requests: u64,
    pub(crate) workload: Workload,
    pub(crate) temperature: f32,
    pub(crate) model: String,
    pub(crate) seed: u64,
    pub(crate) json: Option<PathBuf>,
}

impl LoadgenArgs {
    /// Checks every flag; errors name the flag, its value and the reason.
    /// Reads --prompts-file.
    pub fn into_config(self) -> Result<LoadgenConfig, LoadgenError> {
        let (gateway, endpoint) = gateway_endpoint(&self.gateway, &self.tls)?;
        let authorization = match &self.api_key {
            None => None,
            Some(key) => Some(Authorization::bearer(key)?),
        };
        let arrival = match (self.request_rate, self.concurrency) {
            (Some(_), Some(_)) => {
                return Err(LoadgenError::config(
                    "--concurrency",
                    self.concurrency.unwrap_or_default(),
                    "give either --concurrency or --request-rate, not both",
                ));
            }
            (Some(rate), None) => {
                if !(rate.is_finite() && rate > 0.0 && rate <= 1e6) {
                    return Err(LoadgenError::config(
                        "--request-rate",
                        rate,
                        "must be a number of requests per second in (0, 1e6]",
                    ));
                }
                if let Some(m) = self.max_concurrency {
                    check_concurrency("--max-concurrency", m)?;
                }
                Arrival::Open {
                    rate,
                    max_concurrency: self.max_concurrency,
                }
            }
            (None, c) => {
                if let Some(m) = self.max_concurrency {
                    return Err(LoadgenError::config(
                        "--max-concurrency",
                        m,
                        "only applies with --request-rate (--concurrency already caps a closed loop)",
                    ));
                }
                let concurrency = c.unwrap_or(1);
                check_concurrency("--concurrency", concurrency)?;
                Arrival::Closed { concurrency }
            }
        };
        if self.num_requests == Some(0) {
            return Err(LoadgenError::config(
                "--num-requests",
                0,
                "must be at least 1",
            ));
        }
        let d = self.duration_s;
        if !(d.is_finite() && d > 0.0 && d <= MAX_DURATION_S) {
            return Err(LoadgenError::config(
                "--duration-s",
                d,
                format!("must be in (0, {MAX_DURATION_S}] seconds"),
            ));
        }
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(LoadgenError::config(
                "--temperature",
                t,
                "must be 0 (greedy) or positive",
            ));
        }
        let prompt = dist("--prompt-tokens", &self.prompt_tokens)?;
        let output = dist("--output-tokens", &self.output_tokens)?;
        let workload = match &self.prompts_file {
            Some(path) => {
                if self.shared_prefix_tokens > 0 {
                    return Err(LoadgenError::config(
                        "--shared-prefix-tokens",
                        self.shared_prefix_tokens,
                        "applies to token-id prompts, not to --prompts-file",
                    ));
                }
                if self.api == Api::Worker {
                    return Err(LoadgenError::config(
                        "--api",
                        "worker",
                        "a worker takes token ids: drop --prompts-file",
                    ));
                }
                Workload::File {
                    prompts: workload::read_prompts(path)?,
                    output,
                }
            }
            None => {
                if self.api == Api::Chat {
                    return Err(LoadgenError::config(
                        "--api",
                        "chat",
                        "ChatStream takes text: give --prompts-file",
                    ));
                }
                let vocab = vocab_range(&self.vocab_range)?;
                if self.shared_prefix_tokens > MAX_TOKENS {
                    return Err(LoadgenError::config(
                        "--shared-prefix-tokens",
                        self.shared_prefix_tokens,
                        format!("must be at most {MAX_TOKENS}"),
                    ));
                }
                Workload::synthetic(prompt, output, vocab, self.shared_prefix_tokens, self.seed)
            }
        };
        Ok(LoadgenConfig {
            gateway,
            endpoint,
            authorization,
            api: self.api,
            arrival,
            num_requests: self.num_requests,
            duration: Duration::from_secs_f64(d),
            warmup_requests: self.warmup_requests,
            workload,
            temperature: t,
            model: self.model,
            seed: self.seed,
            json: self.json,
        })
    }
}

impl LoadgenConfig {
    /// Where the report's JSON goes, if anywhere.
    pub fn json_path(&self) -> Option<&Path> {
        self.json.as_deref()
    }

    /// The configuration as recorded in the JSON report.
    pub fn to_json(&self) -> serde_json::Value {
        let (concurrency, rate, max_concurrency) = match self.arrival {
            Arrival::Closed { concurrency } => (Some(concurrency), None, None),
            Arrival::Open {
                rate,
                max_concurrency,
            } => (None, Some(rate), max_concurrency),
        };
        json!({
            "gateway": self.gateway,
            "api": match self.api {
                Api::Generate => "generate",
                Api::Chat => "chat",
                Api::Worker => "worker",
            },
            "concurrency": concurrency,
            "request_rate": rate,
            "max_concurrency": max_concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration.as_secs_f64(),
            "warmup_requests": self.warmup_requests,
            "workload": self.workload.to_json(),
            "temperature": self.temperature,
            "model": self.model,
            "seed": self.seed,
        })
    }
}

fn check_concurrency(flag: &'static str, n: usize) -> Result<(), LoadgenError> {
    if n == 0 || n > MAX_CONCURRENCY {
        return Err(LoadgenError::config(
            flag,
            n,
            format!("must be in 1..={MAX_CONCURRENCY}"),
        ));
    }
    Ok(())
}

fn dist(flag: &'static str, s: &str) -> Result<LengthDist, LoadgenError> {
    LengthDist::parse(s).map_err(|reason| LoadgenError::config(flag, s, reason))
}

/// `LO:HI`, ids from LO (included) to HI (excluded).
fn vocab_range(s: &str) -> Result<(u32, u32), LoadgenError> {
    let bad = |reason: &str| LoadgenError::config("--vocab-range", s, reason);
    let (lo, hi) = s
        .split_once(':')
        .ok_or_else(|| bad("expected LO:HI, e.g. 100:1000"))?;
    let lo: u32 = lo.trim().parse().map_err(|_| bad("LO is not a token id"))?;
    let hi: u32 = hi.trim().parse().map_err(|_| bad("HI is not a token id"))?;
    if lo >= hi {
        return Err(bad("LO must be below HI"));
    }
    Ok((lo, hi))
}

/// The gateway's URI, as `aquila generate` dials it (a scheme added when
/// missing; https:// exactly when --tls-ca is given), and its endpoint with
/// the TLS files read.
fn gateway_endpoint(s: &str, tls: &ClientTlsArgs) -> Result<(String, Endpoint), LoadgenError> {
    let address = |e: TlsError| match e {
        TlsError::Address { reason, .. } => LoadgenError::config("--gateway", s, reason),
        other => LoadgenError::Tls(other),
    };
    let uri = tls::dial_uri(s, tls.tls_ca.is_some()).map_err(address)?;
    let endpoint = tls.endpoint(s).map_err(address)?;
    Ok((uri, endpoint))
}

/// The authorization metadata of every request; never printed.
#[derive(Clone)]
pub(crate) struct Authorization(pub(crate) MetadataValue<Ascii>);

impl Authorization {
    fn bearer(key: &str) -> Result<Self, LoadgenError> {
        MetadataValue::try_from(format!("Bearer {}", key.trim()))
            .map(Authorization)
            // The value would show the key.
            .map_err(|_| LoadgenError::config("--api-key", "(hidden)", "not a valid header value"))
    }
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorization(hidden)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> LoadgenArgs {
        let mut v = vec!["bench"];
        v.extend_from_slice(extra);
        LoadgenArgs::try_parse_from(v).expect("flags parse")
    }

    fn err(extra: &[&str]) -> (String, String) {
        match args(extra).into_config() {
            Err(LoadgenError::Config { flag, reason, .. }) => (flag.to_string(), reason),
            other => panic!("{extra:?}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_a_closed_loop_of_one() {
        let c = args(&[]).into_config().unwrap();
        assert_eq!(c.gateway, "http://127.0.0.1:50051");
        assert_eq!(c.arrival, Arrival::Closed { concurrency: 1 });
        assert_eq!(c.duration, Duration::from_secs(600));
        assert_eq!(c.num_requests, None);
        assert_eq!(c.api, Api::Generate);
    }

    #[test]
    fn open_loop_and_gateway_without_scheme() {
        let c = args(&[
            "--gateway",
            "10.0.0.1:7000",
            "--request-rate",
            "2.5",
            "--max-concurrency",
            "3",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.gateway, "http://10.0.0.1:7000");
        assert!(c.authorization.is_none());
        assert_eq!(
            c.arrival,
            Arrival::Open {
                rate: 2.5,
                max_concurrency: Some(3)
            }
        );
    }

    #[test]
    fn errors_name_the_flag() {
        for (flags, flag, why) in [
            (&["--concurrency", "0"][..], "--concurrency", "1..="),
            (&["--request-rate", "0"], "--request-rate", "(0, 1e6]"),
            (&["--request-rate", "inf"], "--request-rate", "(0, 1e6]"),
            (
                &["--request-rate", "1", "--max-concurrency", "0"],
                "--max-concurrency",
                "1..=",
            ),
            (&["--num-requests", "0"], "--num-requests", "at least 1"),
            (&["--duration-s", "0"], "--duration-s", "(0,"),
            (&["--duration-s", "1e9"], "--duration-s", "(0,"),
            (&["--temperature=-1"], "--temperature", "positive"),
            (
                &["--prompt-tokens", "uniform:5:2"],
                "--prompt-tokens",
                "above",
            ),
            (
                &["--output-tokens", "zero"],
                "--output-tokens",
                "whole number",
            ),
            (&["--vocab-range", "300:100"], "--vocab-range", "below"),
            (&["--vocab-range", "100"], "--vocab-range", "LO:HI"),
            (&["--api", "chat"], "--api", "--prompts-file"),
            (&["--gateway", "ftp://x:1"], "--gateway", "http"),
            (&["--gateway", "https://x:1"], "--gateway", "tls-ca"),
            (&["--api-key", "a\nb"], "--api-key", "header"),
        ] {
            let (f, reason) = err(flags);
            assert_eq!(f, flag, "{flags:?}");
            assert!(reason.contains(why), "{flags:?}: {reason}");
        }
    }

    #[test]
    fn clap_rejects_conflicting_arrivals() {
        let mut v = vec!["bench", "--concurrency", "2", "--request-rate", "1"];
        assert!(LoadgenArgs::try_parse_from(&v).is_err());
        v = vec!["bench", "--max-concurrency", "2"];
        assert!(LoadgenArgs::try_parse_from(&v).is_err());
    }

    #[test]
    fn config_json_records_the_run() {
        let c = args(&["--concurrency", "4", "--prompt-tokens", "uniform:8:32"])
            .into_config()
            .unwrap();
        let j = c.to_json();
        assert_eq!(j["concurrency"], 4);
        assert_eq!(j["request_rate"], serde_json::Value::Null);
        assert_eq!(j["workload"]["prompt_tokens"], "uniform:8:32");
        assert_eq!(j["workload"]["vocab_range"], serde_json::json!([100, 1000]));
    }
}
