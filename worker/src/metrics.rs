//! Every worker metric: its name, help text, labels and buckets.
//!
//! [`WorkerMetrics`] holds what the engine thread observes per step
//! (histograms and counters: atomics, no lock); [`EngineCollector`] reads
//! the engine's shared counters (queue, KV pool, prefix cache) when
//! scraped, so they cost nothing between scrapes. Metrics live in a
//! [`Registry`] the caller owns, never the global default. Label values are
//! bounded: a fixed set of phases and finish reasons, and the model name.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::engine::LoadReader;
use crate::error::Result;

/// Seconds per step: sub-millisecond on a GPU decode, seconds for a long
/// CPU prefill.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Tokens or sequences per step: powers of two up to a large batch.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Why a request left the engine, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Length,
    StopToken,
    Eos,
    /// The client went away (or its deadline passed) before the end.
    Cancelled,
    /// Its step failed, or the tensor-parallel group broke.
    Error,
}

const FINISHED: [(Finished, &str); 5] = [
    (Finished::Length, "length"),
    (Finished::StopToken, "stop_token"),
    (Finished::Eos, "eos"),
    (Finished::Cancelled, "cancelled"),
    (Finished::Error, "error"),
];

/// What the engine thread (and a follower rank's loop) observes.
pub struct WorkerMetrics {
    step_prefill: Histogram,
    step_decode: Histogram,
    tokens_per_step: Histogram,
    batch_size: Histogram,
    collective: Histogram,
    finished: [IntCounter; FINISHED.len()],
    model_load: Gauge,
    /// Nanoseconds spent in collectives since the last step ended, added by
    /// [`crate::comm::Timed`].
    collective_nanos: Arc<AtomicU64>,
}

impl WorkerMetrics {
    /// Declares the per-step metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Arc<Self>> {
        let step = HistogramVec::new(
            HistogramOpts::new(
                "aquila_worker_step_duration_seconds",
                "Time of one engine step (forward, sampling, delivery) by phase: \
                 prefill when some sequence runs more than one token, else decode.",
            )
            .buckets(STEP_BUCKETS.to_vec()),
            &["phase"],
        )?;
        let finished = IntCounterVec::new(
            Opts::new(
                "aquila_worker_requests_finished_total",
                "Requests that left the engine, by reason.",
            ),
            &["reason"],
        )?;
        let m = WorkerMetrics {
            step_prefill: step.with_label_values(&["prefill"]),
            step_decode: step.with_label_values(&["decode"]),
            tokens_per_step: histogram(
                "aquila_worker_step_tokens",
                "Tokens run through the model in one step (decodes plus prefill chunks).",
                COUNT_BUCKETS,
            )?,
            batch_size: histogram(
                "aquila_worker_step_sequences",
                "Sequences in one step (the batch size).",
                COUNT_BUCKETS,
            )?,
            collective: histogram(
                "aquila_worker_step_collective_seconds",
                "Time one step spent in tensor-parallel collectives (all-reduce, all-gather); \
                 observed only in groups of more than one rank.",
                STEP_BUCKETS,
            )?,
            finished: FINISHED.map(|(_, label)| finished.with_label_values(&[label])),
            model_load: Gauge::new(
                "aquila_worker_model_load_seconds",
                "Time this process took to load its model (its shard, in a tensor-parallel group).",
            )?,
            collective_nanos: Arc::new(AtomicU64::new(0)),
        };
        registry.register(Box::new(step))?;
        registry.register(Box::new(finished))?;
        for h in [&m.tokens_per_step, &m.batch_size, &m.collective] {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(m.model_load.clone()))?;
        Ok(Arc::new(m))
    }

    /// The clock that [`crate::comm::Timed`] adds collective time to.
    pub fn collective_clock(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.collective_nanos)
    }

    pub fn model_loaded(&self, took: Duration) {
        self.model_load.set(took.as_secs_f64());
    }

    /// One step ran `tokens` tokens of `sequences` sequences in `took`;
    /// `prefill` when some sequence ran more than one token. Also observes
    /// (and restarts) the collective clock when `tp`.
    pub fn step(&self, tokens: usize, sequences: usize, prefill: bool, took: Duration, tp: bool) {
        let phase = if prefill {
            &self.step_prefill
        } else {
            &self.step_decode
        };
        phase.observe(took.as_secs_f64());
        self.tokens_per_step.observe(tokens as f64);
        self.batch_size.observe(sequences as f64);
        let nanos = self.collective_nanos.swap(0, Relaxed);
        if tp {
            self.collective.observe(nanos as f64 * 1e-9);
        }
    }

    pub fn finished(&self, why: Finished) {
        let index = FINISHED.iter().position(|(f, _)| *f == why).unwrap_or(0);
        self.finished[index].inc();
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram> {
    Ok(Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )?)
}

/// The engine's queue, KV pool and prefix-cache figures, read when scraped.
pub struct EngineCollector {
    load: LoadReader,
    running: IntGauge,
    waiting: IntGauge,
    kv_used: IntGauge,
    kv_total: IntGauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    vllm: Option<VllmGauges>,
    descs: Vec<Desc>,
    /// Two scrapes at once must not both add a counter's increase.
    gathering: Mutex<()>,
}

/// vLLM's names for the figures autoscalers read, labelled `model_name`.
struct VllmGauges {
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_usage: GaugeVec,
    model: String,
}

impl EngineCollector {
    /// Declares the engine's figures in `registry`; with `vllm_names`, also
    /// under vLLM's names for model `model`.
    pub fn register(
        registry: &Registry,
        load: LoadReader,
        model: &str,
        vllm_names: bool,
    ) -> Result<()> {
        let vllm = if vllm_names {
            let model_name = &["model_name"];
            Some(VllmGauges {
                running: IntGaugeVec::new(
                    Opts::new(
                        "vllm:num_requests_running",
                        "Number of requests in model execution batches.",
                    ),
                    model_name,
                )?,
                waiting: IntGaugeVec::new(
                    Opts::new(
                        "vllm:num_requests_waiting",
                        "Number of requests waiting to be processed.",
                    ),
                    model_name,
                )?,
                kv_usage: GaugeVec::new(
                    Opts::new(
                        "vllm:kv_cache_usage_perc",
                        "KV-cache usage. 1 means 100 percent usage.",
                    ),
                    model_name,
                )?,
                model: model.to_owned(),
            })
        } else {
            None
        };
        let mut c = EngineCollector {
            load,
            running: IntGauge::new(
                "aquila_worker_requests_running",
                "Sequences admitted to the running batch.",
            )?,
            waiting: IntGauge::new(
                "aquila_worker_requests_waiting",
                "Requests accepted and not yet admitted.",
            )?,
            kv_used: IntGauge::new(
                "aquila_worker_kv_blocks_used",
                "KV blocks held by sequences (cached prefix blocks no sequence holds count as free).",
            )?,
            kv_total: IntGauge::new("aquila_worker_kv_blocks_total", "KV blocks in the pool.")?,
            prefix_queries: IntCounter::new(
                "aquila_worker_prefix_cache_query_tokens_total",
                "Prompt tokens looked up in the prefix cache at admission.",
            )?,
            prefix_hits: IntCounter::new(
                "aquila_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache at admission.",
            )?,
            preemptions: IntCounter::new(
                "aquila_worker_preemptions_total",
                "Running sequences preempted (blocks freed, recomputed later) for lack of KV blocks.",
            )?,
            prompt_tokens: IntCounter::new(
                "aquila_worker_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
            )?,
            generated_tokens: IntCounter::new(
                "aquila_worker_generated_tokens_total",
                "Tokens sampled and sent.",
            )?,
            vllm,
            descs: Vec::new(),
            gathering: Mutex::new(()),
        };
        let mut descs: Vec<Desc> = c.own().iter().flat_map(|m| m.desc()).cloned().collect();
        if let Some(v) = &c.vllm {
            descs.extend(v.running.desc().into_iter().cloned());
            descs.extend(v.waiting.desc().into_iter().cloned());
            descs.extend(v.kv_usage.desc().into_iter().cloned());
        }
        c.descs = descs;
        registry.register(Box::new(c))?;
        Ok(())
    }

    fn own(&self) -> [&dyn Collector; 9] {
        [
            &self.running,
            &self.waiting,
            &self.kv_used,
            &self.kv_total,
            &self.prefix_queries,
            &self.prefix_hits,
            &self.preemptions,
            &self.prompt_tokens,
            &self.generated_tokens,
        ]
    }
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self
            .gathering
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let l = self.load.load();
        let used = l.kv_blocks_total.saturating_sub(l.kv_blocks_free);
        self.running.set(i64::from(l.running));
        self.waiting.set(i64::from(l.waiting));
        self.kv_used.set(i64::from(used));
        self.kv_total.set(i64::from(l.kv_blocks_total));
        for (counter, value) in [
            (&self.prefix_queries, l.prefix_cache_query_tokens_total),
            (&self.prefix_hits, l.prefix_cache_hit_tokens_total),
            (&self.preemptions, l.preemptions_total),
            (&self.prompt_tokens, l.prompt_tokens_total),
            (&self.generated_tokens, l.tokens_generated_total),
        ] {
            // Counters only move up; this sets them to the engine's total.
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        let mut families: Vec<MetricFamily> = self.own().iter().flat_map(|m| m.collect()).collect();
        if let Some(v) = &self.vllm {
            let model = [v.model.as_str()];
            v.running
                .with_label_values(&model)
                .set(i64::from(l.running));
            v.waiting
                .with_label_values(&model)
                .set(i64::from(l.waiting));
            let usage = match l.kv_blocks_total {
                0 => 0.0,
                total => f64::from(used) / f64::from(total),
            };
            v.kv_usage.with_label_values(&model).set(usage);
            families.extend(v.running.collect());
            families.extend(v.waiting.collect());
            families.extend(v.kv_usage.collect());
        }
        families
    }
}
