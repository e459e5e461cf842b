//! The engine: one OS thread that owns the model and runs steps. Requests
//! arrive over a channel; every step runs the prefills of newly admitted
//! sequences and one decode token for every running sequence in a single
//! batched forward, then samples and sends each sequence its token.
//!
//! Admission is bounded: at most `max_waiting` requests wait (more are
//! refused at once), at most `max_running` run, and a sequence is admitted
//! only when the KV budget (in blocks of `block_size` tokens) holds its whole
//! prompt + max_new_tokens. A sequence whose client went away is dropped at
//! the next step and its cache freed. Paged blocks, chunked prefill and
//! preemption belong to the serving-engine work; this loop is their frame.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::Instant;

use aquila_proto::worker::v1::{Finish, FinishReason, GenerateEvent, Load, SamplingParams, Token};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::error::{Result, WorkerError};
use crate::kv_cache::SeqCache;
use crate::model::{Llama, LogitsFor, SeqInput};
use crate::sampler::Sampler;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_running: usize,
    pub max_waiting: usize,
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
pub struct Stats {
    running: AtomicU32,
    waiting: AtomicU32,
    kv_blocks_free: AtomicU32,
    finished_total: AtomicU64,
    cancelled_total: AtomicU64,
    tokens_total: AtomicU64,
    prompt_tokens_total: AtomicU64,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    stats: Arc<Stats>,
    cfg: EngineConfig,
}

impl EngineHandle {
    /// Starts the engine thread; it ends when every handle is dropped.
    pub fn start(model: Llama, eos_ids: Vec<u32>, cfg: EngineConfig) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        stats.kv_blocks_free.store(cfg.kv_blocks as u32, Relaxed);
        let engine = Engine {
            model,
            eos_ids,
            cfg: cfg.clone(),
            stats: stats.clone(),
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_blocks: cfg.kv_blocks,
        };
        std::thread::Builder::new()
            .name("aquila-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| WorkerError::io("starting the engine thread", e))?;
        Ok(Self { tx, stats, cfg })
    }

    /// Queues a request, or refuses it at once when the queue is full or the
    /// request could never fit the KV budget.
    pub fn submit(&self, req: Request) -> Result<()> {
        let need = blocks_for(
            req.prompt.len() + req.params.max_new_tokens as usize,
            self.cfg.block_size,
        );
        if need > self.cfg.kv_blocks {
            return Err(WorkerError::InvalidRequest(format!(
                "prompt ({}) + max_new_tokens ({}) needs {need} KV blocks of {} tokens; the cache has {} in all",
                req.prompt.len(),
                req.params.max_new_tokens,
                self.cfg.block_size,
                self.cfg.kv_blocks
            )));
        }
        let waiting = self.stats.waiting.fetch_add(1, Relaxed);
        if waiting as usize >= self.cfg.max_waiting {
            self.stats.waiting.fetch_sub(1, Relaxed);
            return Err(WorkerError::Overloaded(format!(
                "waiting queue is full: {waiting} of {} requests waiting, {} running",
                self.cfg.max_waiting,
                self.stats.running.load(Relaxed)
            )));
        }
        self.stats
            .prompt_tokens_total
            .fetch_add(req.prompt.len() as u64, Relaxed);
        self.tx.send(req).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Relaxed);
            WorkerError::EngineStopped
        })
    }

    pub fn load(&self) -> Load {
        let s = &self.stats;
        Load {
            running: s.running.load(Relaxed),
            waiting: s.waiting.load(Relaxed),
            kv_blocks_total: self.cfg.kv_blocks as u32,
            kv_blocks_free: s.kv_blocks_free.load(Relaxed),
            kv_block_size: self.cfg.block_size as u32,
            requests_finished_total: s.finished_total.load(Relaxed),
            requests_cancelled_total: s.cancelled_total.load(Relaxed),
            tokens_generated_total: s.tokens_total.load(Relaxed),
            prompt_tokens_total: s.prompt_tokens_total.load(Relaxed),
        }
    }
}

pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

struct Seq {
    req: Request,
    sampler: Sampler,
    cache: SeqCache,
    blocks: usize,
    generated: Vec<u32>,
    admitted: Instant,
    first_token: Option<Instant>,
}

struct Engine {
    model: Llama,
    eos_ids: Vec<u32>,
    cfg: EngineConfig,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<Request>,
    waiting: VecDeque<Request>,
    running: Vec<Seq>,
    free_blocks: usize,
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match self.rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.waiting.push_back(r);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.events.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone as u32, Relaxed);
            self.stats.cancelled_total.fetch_add(gone as u64, Relaxed);
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.events.is_closed() {
                let seq = self.running.swap_remove(i);
                tracing::debug!(request_id = %seq.req.id, "client went away; generation cancelled");
                self.release(seq);
                self.stats.cancelled_total.fetch_add(1, Relaxed);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let capacity = front.prompt.len() + front.params.max_new_tokens as usize;
            let blocks = blocks_for(capacity, self.cfg.block_size);
            if blocks > self.free_blocks {
                break;
            }
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Relaxed);
            self.free_blocks -= blocks;
            let sampler = Sampler::new(req.params.clone(), &req.prompt);
            self.running.push(Seq {
                cache: self.model.new_cache(capacity),
                sampler,
                blocks,
                generated: Vec::new(),
                admitted: Instant::now(),
                first_token: None,
                req,
            });
        }
    }

    fn step(&mut self) {
        let mut last = Vec::with_capacity(self.running.len());
        for s in &self.running {
            last.push(s.generated.last().copied());
        }
        let mut inputs: Vec<SeqInput<'_>> = self
            .running
            .iter_mut()
            .zip(&last)
            .map(|(s, last)| SeqInput {
                tokens: match last {
                    Some(t) => std::slice::from_ref(t),
                    None => &s.req.prompt,
                },
                start: s.cache.len(),
                cache: &mut s.cache,
            })
            .collect();
        // A panic in model code fails this step's requests, not the engine.
        let model = &self.model;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward(&mut inputs, LogitsFor::Last)
        }))
        .unwrap_or_else(|_| Err(WorkerError::EngineStopped));
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "step failed; failing its requests");
                for seq in std::mem::take(&mut self.running) {
                    let _ = seq
                        .req
                        .events
                        .send(Err(Status::internal(format!("step failed: {e}"))));
                    self.release(seq);
                }
                return;
            }
        };
        drop(inputs);
        let now = Instant::now();
        let mut finished = Vec::new();
        for (i, (seq, mut l)) in self.running.iter_mut().zip(logits).enumerate() {
            let token = seq.sampler.sample(&mut l);
            seq.first_token.get_or_insert(now);
            seq.generated.push(token.id);
            self.stats.tokens_total.fetch_add(1, Relaxed);
            let reason = finish_reason(seq, &token, &self.eos_ids);
            let finish = reason.map(|r| Finish {
                reason: r as i32,
                prompt_tokens: seq.req.prompt.len() as u32,
                completion_tokens: seq.generated.len() as u32,
                queue_seconds: (seq.admitted - seq.req.arrived).as_secs_f64(),
                time_to_first_token_seconds: seq
                    .first_token
                    .map_or(0.0, |t| (t - seq.req.arrived).as_secs_f64()),
            });
            let done = finish.is_some();
            let event = GenerateEvent {
                tokens: vec![token],
                finish,
            };
            if seq.req.events.send(Ok(event)).is_err() {
                self.stats.cancelled_total.fetch_add(1, Relaxed);
                finished.push(i);
            } else if done {
                self.stats.finished_total.fetch_add(1, Relaxed);
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            self.release(seq);
        }
    }

    fn release(&mut self, seq: Seq) {
        self.free_blocks += seq.blocks;
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len() as u32, Relaxed);
        self.stats
            .kv_blocks_free
            .store(self.free_blocks as u32, Relaxed);
    }
}

fn finish_reason(seq: &Seq, token: &Token, eos_ids: &[u32]) -> Option<FinishReason> {
    let p = seq.sampler.params();
    if p.stop_token_ids.contains(&token.id) {
        Some(FinishReason::StopToken)
    } else if !p.ignore_eos && eos_ids.contains(&token.id) {
        Some(FinishReason::Eos)
    } else if seq.generated.len() >= p.max_new_tokens as usize
        || seq.cache.len() + 1 > seq.cache.capacity()
    {
        Some(FinishReason::Length)
    } else {
        None
    }
}
