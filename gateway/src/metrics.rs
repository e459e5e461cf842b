//! Every gateway metric: its name, help text, labels and buckets, and the
//! per-request recorder that feeds them.
//!
//! Metrics live in a [`Registry`] the caller owns (one per process, or one
//! per gateway in tests), never in the global default. Label values are
//! bounded: gRPC method and code names, replica addresses (bounded by the
//! registry) and model names (bounded by the workers). The per-token path
//! touches only label-free histograms (atomics); label lookups happen once
//! per request. Replica gauges and in-flight requests are read when scraped,
//! so they cost nothing between scrapes.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aquila_proto::grpc_code_name;
use aquila_proto::v1;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tokio::sync::Semaphore;
use tonic::Code;

use crate::error::GatewayError;
use crate::workers::WorkerPool;

/// Seconds, from a fast first token to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];
/// Seconds between tokens: a few ms on a GPU, tens of ms on a CPU.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];

/// The public RPCs, as label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Generate,
    GenerateStream,
    Chat,
    ChatStream,
    Tokenize,
    ListModels,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Generate => "Generate",
            Method::GenerateStream => "GenerateStream",
            Method::Chat => "Chat",
            Method::ChatStream => "ChatStream",
            Method::Tokenize => "Tokenize",
            Method::ListModels => "ListModels",
        }
    }
}

#[derive(Debug)]
pub struct GatewayMetrics {
    requests: IntCounterVec,
    duration: Histogram,
    ttft: Histogram,
    itl: Histogram,
    queue: Histogram,
    retries: IntCounter,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    vllm: Option<VllmMetrics>,
}

/// The same figures under vLLM's names and labels (`model_name`,
/// `finished_reason`), for dashboards and autoscalers written for vLLM.
#[derive(Debug)]
struct VllmMetrics {
    ttft: HistogramVec,
    e2e: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    success: IntCounterVec,
}

impl GatewayMetrics {
    /// Declares every request metric in `registry`; with `vllm_names`, the
    /// vLLM-named copies too.
    pub fn new(registry: &Registry, vllm_names: bool) -> Result<Self, GatewayError> {
        let metrics = GatewayMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "aquila_gateway_requests_total",
                    "Requests by gRPC method and outcome (gRPC code name; CANCELLED when the client went away).",
                ),
                &["method", "code"],
            )?,
            duration: histogram(
                "aquila_gateway_request_duration_seconds",
                "End-to-end time of successful generations, from arrival to the last message.",
                LATENCY_BUCKETS,
            )?,
            ttft: histogram(
                "aquila_gateway_time_to_first_token_seconds",
                "Time from a generation's arrival to its first token reaching the gateway.",
                LATENCY_BUCKETS,
            )?,
            itl: histogram(
                "aquila_gateway_inter_token_latency_seconds",
                "Time between tokens of one generation, one observation per token after the first.",
                ITL_BUCKETS,
            )?,
            queue: histogram(
                "aquila_gateway_queue_time_seconds",
                "Time a generation waited in its worker's queue, as its finish event reports it.",
                LATENCY_BUCKETS,
            )?,
            retries: IntCounter::new(
                "aquila_gateway_retries_total",
                "Generations sent to a second replica because the first could not be reached.",
            )?,
            prompt_tokens: IntCounter::new(
                "aquila_gateway_prompt_tokens_total",
                "Prompt tokens of successful generations (the sum of their usage.prompt_tokens).",
            )?,
            generated_tokens: IntCounter::new(
                "aquila_gateway_generated_tokens_total",
                "Generated tokens of successful generations (the sum of their usage.completion_tokens).",
            )?,
            vllm: if vllm_names {
                Some(VllmMetrics::new()?)
            } else {
                None
            },
        };
        registry.register(Box::new(metrics.requests.clone()))?;
        for h in [
            &metrics.duration,
            &metrics.ttft,
            &metrics.itl,
            &metrics.queue,
        ] {
            registry.register(Box::new(h.clone()))?;
        }
        for c in [
            &metrics.retries,
            &metrics.prompt_tokens,
            &metrics.generated_tokens,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        if let Some(v) = &metrics.vllm {
            registry.register(Box::new(v.ttft.clone()))?;
            registry.register(Box::new(v.e2e.clone()))?;
            registry.register(Box::new(v.prompt_tokens.clone()))?;
            registry.register(Box::new(v.generation_tokens.clone()))?;
            registry.register(Box::new(v.success.clone()))?;
        }
        Ok(metrics)
    }

    /// Starts recording one generation of `method`, arrived now.
    pub fn request(self: &Arc<Self>, method: Method) -> RequestRecorder {
        RequestRecorder {
            metrics: Arc::clone(self),
            method,
            received: Instant::now(),
            first_token: None,
            last_token: None,
            armed: true,
        }
    }

    /// Counts one call of a method that is not a generation.
    pub fn count(&self, method: Method, code: Code) {
        self.requests
            .with_label_values(&[method.as_str(), grpc_code_name(code)])
            .inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }
}

impl VllmMetrics {
    fn new() -> Result<Self, GatewayError> {
        let model = &["model_name"];
        Ok(VllmMetrics {
            ttft: HistogramVec::new(
                HistogramOpts::new(
                    "vllm:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                model,
            )?,
            e2e: HistogramVec::new(
                HistogramOpts::new(
                    "vllm:e2e_request_latency_seconds",
                    "Histogram of e2e request latency in seconds.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                model,
            )?,
            prompt_tokens: IntCounterVec::new(
                Opts::new(
                    "vllm:prompt_tokens_total",
                    "Number of prefill tokens processed.",
                ),
                model,
            )?,
            generation_tokens: IntCounterVec::new(
                Opts::new(
                    "vllm:generation_tokens_total",
                    "Number of generation tokens processed.",
                ),
                model,
            )?,
            success: IntCounterVec::new(
                Opts::new(
                    "vllm:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["finished_reason", "model_name"],
            )?,
        })
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, GatewayError> {
    Ok(Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )?)
}

/// One generation's figures, from arrival to its outcome. Counted exactly
/// once: as OK when its last message is produced, with the error's code
/// when it fails, as CANCELLED if dropped before either (the client left).
#[derive(Debug)]
pub struct RequestRecorder {
    metrics: Arc<GatewayMetrics>,
    method: Method,
    received: Instant,
    first_token: Option<Duration>,
    last_token: Option<Instant>,
    /// Not yet counted.
    armed: bool,
}

impl RequestRecorder {
    /// Moves the recording into the response stream: this recorder counts
    /// nothing more, the returned one counts the outcome.
    pub fn hand_off(&mut self) -> RequestRecorder {
        self.armed = false;
        RequestRecorder {
            metrics: Arc::clone(&self.metrics),
            method: self.method,
            received: self.received,
            first_token: self.first_token,
            last_token: self.last_token,
            armed: true,
        }
    }

    /// `n` tokens arrived from the worker at `arrived` in one event; each
    /// token after the first gets an equal share of the gap.
    pub fn on_tokens(&mut self, n: usize, arrived: Instant) {
        if n == 0 {
            return;
        }
        let m = &self.metrics;
        match self.last_token {
            None => {
                let ttft = arrived.saturating_duration_since(self.received);
                m.ttft.observe(ttft.as_secs_f64());
                self.first_token = Some(ttft);
                // Tokens after the first in the very first event came with it.
                for _ in 1..n {
                    m.itl.observe(0.0);
                }
            }
            Some(last) => {
                let each = arrived.saturating_duration_since(last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    m.itl.observe(each);
                }
            }
        }
        self.last_token = Some(arrived);
    }

    /// The generation's last message, carrying its usage, was produced.
    pub fn succeeded(&mut self, response: &v1::GenerateResponse) {
        if !std::mem::replace(&mut self.armed, false) {
            return;
        }
        let m = &self.metrics;
        let e2e = self.received.elapsed().as_secs_f64();
        let usage = response.usage.unwrap_or_default();
        m.requests
            .with_label_values(&[self.method.as_str(), grpc_code_name(Code::Ok)])
            .inc();
        m.duration.observe(e2e);
        m.prompt_tokens.inc_by(u64::from(usage.prompt_tokens));
        m.generated_tokens
            .inc_by(u64::from(usage.completion_tokens));
        // A stop string ends the stream at the gateway, before the worker's
        // finish event (the only source of the queue time).
        if response.stop_sequence.is_empty()
            && let Some(t) = &response.timings
        {
            m.queue.observe(t.queue_seconds);
        }
        if let Some(v) = &m.vllm {
            let model = [response.model.as_str()];
            if let Some(ttft) = self.first_token {
                v.ttft.with_label_values(&model).observe(ttft.as_secs_f64());
            }
            v.e2e.with_label_values(&model).observe(e2e);
            v.prompt_tokens
                .with_label_values(&model)
                .inc_by(u64::from(usage.prompt_tokens));
            v.generation_tokens
                .with_label_values(&model)
                .inc_by(u64::from(usage.completion_tokens));
            let reason = vllm_finished_reason(response.finish_reason());
            v.success
                .with_label_values(&[reason, response.model.as_str()])
                .inc();
        }
    }

    /// The generation failed with `code` (before or during its stream).
    pub fn failed(&mut self, code: Code) {
        if std::mem::replace(&mut self.armed, false) {
            self.metrics.count(self.method, code);
        }
    }
}

impl Drop for RequestRecorder {
    fn drop(&mut self) {
        self.failed(Code::Cancelled);
    }
}

/// vLLM's `finished_reason` values.
fn vllm_finished_reason(reason: v1::FinishReason) -> &'static str {
    match reason {
        v1::FinishReason::Length => "length",
        v1::FinishReason::Cancelled => "abort",
        v1::FinishReason::Stop | v1::FinishReason::Eos | v1::FinishReason::Unspecified => "stop",
    }
}

/// Figures read from the replica registry and the concurrency limit when
/// scraped: per-replica health and breaker state, requests in flight.
pub struct PoolCollector {
    pool: Weak<WorkerPool>,
    slots: Arc<Semaphore>,
    limit: usize,
    healthy: IntGaugeVec,
    breaker: IntGaugeVec,
    in_flight: IntGauge,
    descs: Vec<Desc>,
    /// Two scrapes at once must not interleave reset and fill.
    gathering: Mutex<()>,
}

impl PoolCollector {
    pub fn new(
        pool: Weak<WorkerPool>,
        slots: Arc<Semaphore>,
        limit: usize,
    ) -> Result<Self, GatewayError> {
        let replica = &["replica"];
        let healthy = IntGaugeVec::new(
            Opts::new(
                "aquila_gateway_replica_healthy",
                "1 while the replica passes its health checks and has its model loaded, else 0.",
            ),
            replica,
        )?;
        let breaker = IntGaugeVec::new(
            Opts::new(
                "aquila_gateway_replica_breaker_state",
                "The replica's circuit breaker: 0 closed, 1 half-open (one trial call), 2 open.",
            ),
            replica,
        )?;
        let in_flight = IntGauge::new(
            "aquila_gateway_requests_in_flight",
            "Generations being served (holding one of --max-concurrent-requests).",
        )?;
        let descs = [healthy.desc(), breaker.desc(), in_flight.desc()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        Ok(PoolCollector {
            pool,
            slots,
            limit,
            healthy,
            breaker,
            in_flight,
            descs,
            gathering: Mutex::new(()),
        })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self
            .gathering
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Replicas that left the registry leave the metrics.
        self.healthy.reset();
        self.breaker.reset();
        if let Some(pool) = self.pool.upgrade() {
            for r in pool.list() {
                let labels = [r.address.as_str()];
                self.healthy
                    .with_label_values(&labels)
                    .set(i64::from(r.healthy));
                let state = match r.breaker.as_str() {
                    "open" => 2,
                    "half_open" => 1,
                    _ => 0,
                };
                self.breaker.with_label_values(&labels).set(state);
            }
        }
        let free = self.slots.available_permits();
        self.in_flight.set(self.limit.saturating_sub(free) as i64);
        let mut families = self.healthy.collect();
        families.extend(self.breaker.collect());
        families.extend(self.in_flight.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn done(model: &str, prompt: u32, completion: u32) -> v1::GenerateResponse {
        v1::GenerateResponse {
            model: model.into(),
            finish_reason: v1::FinishReason::Length as i32,
            usage: Some(v1::Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
            }),
            timings: Some(v1::Timings {
                queue_seconds: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_generation_is_counted_once_with_its_tokens() {
        let registry = Registry::new();
        let m = Arc::new(GatewayMetrics::new(&registry, true).unwrap());
        let mut ok = m.request(Method::GenerateStream);
        let t0 = Instant::now();
        ok.on_tokens(1, t0);
        ok.on_tokens(2, t0 + Duration::from_millis(20));
        ok.succeeded(&done("m", 5, 3));
        ok.failed(Code::Internal); // already counted: ignored
        drop(ok);
        let mut bad = m.request(Method::Generate);
        bad.failed(Code::InvalidArgument);
        drop(m.request(Method::Chat)); // the client left

        let text = text(&registry);
        for line in [
            "aquila_gateway_requests_total{code=\"OK\",method=\"GenerateStream\"} 1",
            "aquila_gateway_requests_total{code=\"INVALID_ARGUMENT\",method=\"Generate\"} 1",
            "aquila_gateway_requests_total{code=\"CANCELLED\",method=\"Chat\"} 1",
            "aquila_gateway_prompt_tokens_total 5",
            "aquila_gateway_generated_tokens_total 3",
            "aquila_gateway_inter_token_latency_seconds_count 2",
            "aquila_gateway_inter_token_latency_seconds_sum 0.02",
            "aquila_gateway_time_to_first_token_seconds_count 1",
            "aquila_gateway_queue_time_seconds_sum 0.5",
            "vllm:generation_tokens_total{model_name=\"m\"} 3",
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1",
            "vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn vllm_names_only_on_request() {
        let registry = Registry::new();
        let m = Arc::new(GatewayMetrics::new(&registry, false).unwrap());
        m.request(Method::Generate).succeeded(&done("m", 1, 1));
        let text = text(&registry);
        assert!(text.contains("aquila_gateway_prompt_tokens_total 1"));
        assert!(!text.contains("vllm:"), "{text}");
    }
}
