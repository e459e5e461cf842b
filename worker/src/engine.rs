//! The engine: one OS thread that owns the model, the KV pool and the
//! scheduler, and runs steps. Requests arrive over a channel; each step runs
//! the scheduler's plan (decodes and prefill chunks of many sequences) in one
//! batched forward, samples, and sends each sequence its token.
//!
//! Admission control happens before any work: at most `max_waiting` requests
//! (and `max_waiting_tokens` prompt tokens) may wait; more are refused at
//! once with RESOURCE_EXHAUSTED. A sequence whose client went away is dropped
//! at the next step and its blocks freed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::Instant;

use aquila_proto::worker::v1::{Finish, FinishReason, GenerateEvent, Load, SamplingParams, Token};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::backend::Next;
use crate::comm::Communicator;
use crate::error::{Result, WorkerError};
use crate::metrics::{Finished, WorkerMetrics};
use crate::model::SeqInput;
use crate::sampler::Sampler;
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId, Sequence, StepPlan};
use crate::tp::{Control, HEARTBEAT};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub max_waiting: usize,
    pub max_waiting_tokens: usize,
    pub block_size: usize,
    pub kv_blocks: usize,
}

pub type EventSender = UnboundedSender<Result<GenerateEvent, Status>>;

pub struct Request {
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: EventSender,
    pub arrived: Instant,
}

/// Figures shared between the engine thread and the gRPC side.
#[derive(Default)]
struct Stats {
    running: AtomicU32,
    /// Requests submitted and not yet admitted (or dropped), and their
    /// prompt tokens: what admission control bounds.
    queued: AtomicU32,
    queued_tokens: AtomicU64,
    kv_blocks_free: AtomicU32,
    finished_total: AtomicU64,
    cancelled_total: AtomicU64,
    tokens_total: AtomicU64,
    prompt_tokens_total: AtomicU64,
    prefix_query_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    preemptions: AtomicU64,
    computed_tokens: AtomicU64,
    /// Why the engine stopped, if a tensor-parallel rank failed.
    failure: std::sync::Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    load: LoadReader,
    cfg: EngineConfig,
}

/// Reads the engine's load without keeping the engine alive (it ends when
/// every [`EngineHandle`] is dropped): what metrics scrapes hold.
#[derive(Clone)]
pub struct LoadReader {
    stats: Arc<Stats>,
    kv_blocks: u32,
    block_size: u32,
}

impl LoadReader {
    pub fn load(&self) -> Load {
        let s = &self.stats;
        Load {
            running: s.running.load(Relaxed),
            waiting: s.queued.load(Relaxed),
            kv_blocks_total: self.kv_blocks,
            kv_blocks_free: s.kv_blocks_free.load(Relaxed),
            kv_block_size: self.block_size,
            requests_finished_total: s.finished_total.load(Relaxed),
            requests_cancelled_total: s.cancelled_total.load(Relaxed),
            tokens_generated_total: s.tokens_total.load(Relaxed),
            prompt_tokens_total: s.prompt_tokens_total.load(Relaxed),
            prefix_cache_query_tokens_total: s.prefix_query_tokens.load(Relaxed),
            prefix_cache_hit_tokens_total: s.prefix_hit_tokens.load(Relaxed),
            preemptions_total: s.preemptions.load(Relaxed),
            computed_tokens_total: s.computed_tokens.load(Relaxed),
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread; it ends when every handle is dropped, or
    /// when the tensor-parallel group breaks. `control` (the leader of a
    /// group) carries each step to the other ranks, and a heartbeat while
    /// idle. Each step is observed in `metrics`.
    pub fn start(
        backend: crate::backend::Backend,
        eos_ids: Vec<u32>,
        cfg: EngineConfig,
        control: Option<Arc<dyn Communicator>>,
        metrics: Arc<WorkerMetrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        stats.kv_blocks_free.store(cfg.kv_blocks as u32, Relaxed);
        let scheduler = Scheduler::new(SchedulerConfig {
            max_running: cfg.max_running,
            max_batch_tokens: cfg.max_batch_tokens,
            num_blocks: cfg.kv_blocks,
            block_size: cfg.block_size,
        });
        let engine = Engine {
            backend,
            eos_ids,
            stats: stats.clone(),
            rx,
            scheduler,
            active: HashMap::new(),
            next_id: 0,
            control,
            broken: false,
            metrics,
        };
        std::thread::Builder::new()
            .name("aquila-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| WorkerError::io("starting the engine thread", e))?;
        let load = LoadReader {
            stats,
            kv_blocks: cfg.kv_blocks as u32,
            block_size: cfg.block_size as u32,
        };
        Ok(Self { tx, load, cfg })
    }

    /// Queues a request, or refuses it at once when the queue is full or the
    /// request could never fit the KV pool.
    pub fn submit(&self, req: Request) -> Result<()> {
        let tokens = req.prompt.len() + req.params.max_new_tokens as usize;
        let need = tokens.div_ceil(self.cfg.block_size);
        if need > self.cfg.kv_blocks {
            return Err(WorkerError::InvalidRequest(format!(
                "prompt ({}) + max_new_tokens ({}) needs {need} KV blocks of {} tokens; the cache has {} in all",
                req.prompt.len(),
                req.params.max_new_tokens,
                self.cfg.block_size,
                self.cfg.kv_blocks
            )));
        }
        let s = &self.load.stats;
        let n = req.prompt.len() as u64;
        let queued = s.queued.fetch_add(1, Relaxed) as usize;
        let queued_tokens = s.queued_tokens.fetch_add(n, Relaxed) as usize;
        if queued >= self.cfg.max_waiting
            || queued_tokens + n as usize > self.cfg.max_waiting_tokens
        {
            s.queued.fetch_sub(1, Relaxed);
            s.queued_tokens.fetch_sub(n, Relaxed);
            return Err(WorkerError::Overloaded(format!(
                "waiting queue is full: {queued} of {} requests and {queued_tokens} of {} prompt tokens waiting \
                 ({} running); retry later",
                self.cfg.max_waiting,
                self.cfg.max_waiting_tokens,
                s.running.load(Relaxed)
            )));
        }
        s.prompt_tokens_total.fetch_add(n, Relaxed);
        self.tx.send(req).map_err(|_| {
            s.queued.fetch_sub(1, Relaxed);
            s.queued_tokens.fetch_sub(n, Relaxed);
            self.failure()
                .map(WorkerError::Comm)
                .unwrap_or(WorkerError::EngineStopped)
        })
    }

    /// Why the engine stopped serving, if it did (a rank of its group failed).
    pub fn failure(&self) -> Option<String> {
        self.load.stats.failure.lock().ok().and_then(|f| f.clone())
    }

    pub fn load(&self) -> Load {
        self.load.load()
    }

    pub fn load_reader(&self) -> LoadReader {
        self.load.clone()
    }
}

/// What the engine keeps of a request beside the scheduler's sequence.
struct Active {
    req: Request,
    sampler: Sampler,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

struct Engine {
    backend: crate::backend::Backend,
    eos_ids: Vec<u32>,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<Request>,
    scheduler: Scheduler,
    active: HashMap<SeqId, Active>,
    next_id: SeqId,
    /// The other ranks of a tensor-parallel group, as their leader.
    control: Option<Arc<dyn Communicator>>,
    /// Set when the group broke: the engine stops.
    broken: bool,
    metrics: Arc<WorkerMetrics>,
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.scheduler.is_idle() {
                let next = match &self.control {
                    None => self.rx.recv().map_err(|_| false),
                    Some(_) => self
                        .rx
                        .recv_timeout(HEARTBEAT)
                        .map_err(|e| matches!(e, mpsc::RecvTimeoutError::Timeout)),
                };
                match next {
                    Ok(r) => self.add(r),
                    // Idle: tell the followers we are alive.
                    Err(true) => {
                        if let Err(e) = self.send_control(&Control::Heartbeat) {
                            self.fail(e);
                            return;
                        }
                        continue;
                    }
                    Err(false) => return,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.add(r);
            }
            self.drop_cancelled();
            let plan = self.scheduler.schedule();
            self.mark_admitted(&plan);
            if !plan.seqs.is_empty() {
                self.step(&plan);
                if self.broken {
                    return;
                }
            }
            self.publish();
        }
    }

    fn add(&mut self, req: Request) {
        let id = self.next_id;
        self.next_id += 1;
        let sampler = Sampler::new(req.params.clone(), &req.prompt);
        self.scheduler.add(id, Sequence::new(req.prompt.clone()));
        self.active.insert(
            id,
            Active {
                req,
                sampler,
                admitted: None,
                first_token: None,
            },
        );
    }

    /// Admitted requests leave the admission-control queue.
    fn mark_admitted(&mut self, plan: &StepPlan) {
        let now = Instant::now();
        for id in &plan.newly_admitted {
            if let Some(a) = self.active.get_mut(id) {
                a.admitted = Some(now);
                self.stats.queued.fetch_sub(1, Relaxed);
                self.stats
                    .queued_tokens
                    .fetch_sub(a.req.prompt.len() as u64, Relaxed);
            }
        }
    }

    fn remove(&mut self, id: SeqId) {
        self.scheduler.finish(id);
        if let Some(a) = self.active.remove(&id)
            && a.admitted.is_none()
        {
            self.stats.queued.fetch_sub(1, Relaxed);
            self.stats
                .queued_tokens
                .fetch_sub(a.req.prompt.len() as u64, Relaxed);
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.req.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(request_id = %self.active[&id].req.id, "client went away; generation cancelled");
            self.remove(id);
            self.stats.cancelled_total.fetch_add(1, Relaxed);
            self.metrics.finished(Finished::Cancelled);
        }
    }

    /// Runs a step, records it, then sends its tokens: a client that has
    /// its last token finds the step in the metrics already.
    fn step(&mut self, plan: &StepPlan) {
        let started = Instant::now();
        let sampled = self.run_step(plan);
        let tokens = plan.seqs.iter().map(|s| s.len).sum();
        let prefill = plan.seqs.iter().any(|s| s.len > 1);
        let tp = self.control.is_some();
        self.metrics
            .step(tokens, plan.seqs.len(), prefill, started.elapsed(), tp);
        for (id, token) in sampled {
            self.deliver(id, token);
        }
    }

    /// The step's forward pass and sampling: the tokens to deliver.
    fn run_step(&mut self, plan: &StepPlan) -> Vec<(SeqId, Token)> {
        // The plan comes straight from the scheduler, so every sequence in
        // it exists; inputs stay index-aligned with `plan.seqs`.
        let mut inputs = Vec::with_capacity(plan.seqs.len());
        for s in &plan.seqs {
            let Some(seq) = self.scheduler.seq(s.id) else {
                tracing::error!(seq = s.id, "scheduled sequence is gone; skipping the step");
                return Vec::new();
            };
            inputs.push(SeqInput {
                tokens: &seq.tokens[s.start..s.start + s.len],
                start: s.start,
                table: &seq.table,
            });
        }
        if let Err(e) = self.send_control(&Control::step(&inputs)) {
            drop(inputs);
            self.fail(e);
            return Vec::new();
        }
        // Sequences whose next token is a plain argmax: a GPU picks them.
        let greedy: Vec<bool> = plan
            .seqs
            .iter()
            .map(|s| {
                s.sample
                    && self
                        .active
                        .get(&s.id)
                        .is_some_and(|a| a.sampler.plain_greedy())
            })
            .collect();
        // A panic in model code fails this step's requests, not the engine.
        let backend = &mut self.backend;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.step(&inputs, &greedy)
        }))
        .unwrap_or_else(|_| Err(WorkerError::EngineStopped));
        drop(inputs);
        let logits = match result {
            Ok(l) => l,
            // A rank failed during the step: the group is broken.
            Err(e @ WorkerError::Comm(_)) => {
                self.fail(e);
                return Vec::new();
            }
            Err(e) => {
                tracing::error!(error = %e, "step failed; failing its requests");
                for s in &plan.seqs {
                    if let Some(a) = self.active.get(&s.id) {
                        let _ = a
                            .req
                            .events
                            .send(Err(Status::internal(format!("step failed: {e}"))));
                        self.metrics.finished(Finished::Error);
                    }
                    self.remove(s.id);
                }
                return Vec::new();
            }
        };
        let now = Instant::now();
        let mut sampled = Vec::new();
        for (s, next) in plan.seqs.iter().zip(logits) {
            if !s.sample {
                continue;
            }
            if let Some(a) = self.active.get_mut(&s.id) {
                let token = match next {
                    Next::Logits(mut l) => a.sampler.sample(&mut l),
                    Next::Token(id) => a.sampler.take(id),
                };
                a.first_token.get_or_insert(now);
                sampled.push((s.id, token));
            }
        }
        let ids: Vec<(SeqId, u32)> = sampled.iter().map(|(id, t)| (*id, t.id)).collect();
        self.scheduler.complete(plan, &ids);
        sampled
    }

    fn send_control(&self, msg: &Control) -> Result<()> {
        match &self.control {
            Some(c) => c.broadcast(&mut msg.encode(), 0),
            None => Ok(()),
        }
    }

    /// The tensor-parallel group broke: every request in flight gets
    /// UNAVAILABLE with the reason (which names the rank), the failure is
    /// published for health checks, and the engine stops; submits are
    /// refused from now on.
    fn fail(&mut self, e: WorkerError) {
        let reason = match e {
            WorkerError::Comm(m) => format!("the tensor-parallel group failed: {m}"),
            e => format!("the tensor-parallel group failed: {e}"),
        };
        tracing::error!("{reason}; failing {} requests", self.active.len());
        if let Ok(mut f) = self.stats.failure.lock() {
            *f = Some(reason.clone());
        }
        let queued = self.rx.try_iter().collect::<Vec<_>>();
        for events in self
            .active
            .drain()
            .map(|(_, a)| a.req.events)
            .chain(queued.into_iter().map(|r| r.events))
        {
            let _ = events.send(Err(Status::unavailable(reason.clone())));
            self.metrics.finished(Finished::Error);
        }
        self.stats.running.store(0, Relaxed);
        self.stats.queued.store(0, Relaxed);
        self.broken = true;
    }

    /// Sends a sampled token to its client and ends the sequence if done.
    fn deliver(&mut self, id: SeqId, token: Token) {
        let (Some(a), Some(seq)) = (self.active.get(&id), self.scheduler.seq(id)) else {
            return;
        };
        self.stats.tokens_total.fetch_add(1, Relaxed);
        let generated = seq.generated().len();
        let reason = finish_reason(&a.req.params, &token, generated, &self.eos_ids);
        let finish = reason.map(|r| Finish {
            reason: r as i32,
            prompt_tokens: seq.prompt_len as u32,
            completion_tokens: generated as u32,
            queue_seconds: a
                .admitted
                .map_or(0.0, |t| (t - a.req.arrived).as_secs_f64()),
            time_to_first_token_seconds: a
                .first_token
                .map_or(0.0, |t| (t - a.req.arrived).as_secs_f64()),
        });
        let done = finish.is_some();
        let event = GenerateEvent {
            tokens: vec![token],
            finish,
        };
        if done {
            // Free the blocks and publish the counters before the client
            // hears that it is done, so that what it asks next (load, a
            // request reusing the prefix) sees this sequence's effects.
            let events = a.req.events.clone();
            self.stats.finished_total.fetch_add(1, Relaxed);
            self.metrics.finished(match reason {
                Some(FinishReason::StopToken) => Finished::StopToken,
                Some(FinishReason::Eos) => Finished::Eos,
                _ => Finished::Length,
            });
            self.remove(id);
            self.publish();
            let _ = events.send(Ok(event));
        } else if a.req.events.send(Ok(event)).is_err() {
            self.stats.cancelled_total.fetch_add(1, Relaxed);
            self.metrics.finished(Finished::Cancelled);
            self.remove(id);
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        let c = &self.scheduler.counters;
        s.running
            .store(self.scheduler.num_running() as u32, Relaxed);
        s.kv_blocks_free
            .store(self.scheduler.blocks().num_available() as u32, Relaxed);
        s.prefix_query_tokens.store(c.prefix_query_tokens, Relaxed);
        s.prefix_hit_tokens.store(c.prefix_hit_tokens, Relaxed);
        s.preemptions.store(c.preemptions, Relaxed);
        s.computed_tokens.store(c.computed_tokens, Relaxed);
    }
}

fn finish_reason(
    p: &SamplingParams,
    token: &Token,
    generated: usize,
    eos_ids: &[u32],
) -> Option<FinishReason> {
    if p.stop_token_ids.contains(&token.id) {
        Some(FinishReason::StopToken)
    } else if !p.ignore_eos && eos_ids.contains(&token.id) {
        Some(FinishReason::Eos)
    } else if generated >= p.max_new_tokens as usize {
        Some(FinishReason::Length)
    } else {
        None
    }
}
