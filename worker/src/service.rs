//! The worker's gRPC face: `aquila.worker.v1.Worker` plus health and
//! reflection, on an already-bound listener. Checks every request again (the
//! gateway is not trusted to have done it) and hands it to the engine; it
//! never runs model code on an async thread.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aquila_proto::worker::v1::worker_server::{Worker, WorkerServer};
use aquila_proto::worker::v1::{
    GenerateEvent, GenerateRequest, GetLoadRequest, GetModelInfoRequest, Load, ModelInfo,
    SamplingParams,
};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::backend::Backend;
use crate::comm::tcp::TcpComm;
use crate::comm::{Communicator, SingleRank, Timed};
use crate::engine::{EngineConfig, EngineHandle};
use crate::error::{Result, WorkerError};
use crate::kv::KvDtype;
use crate::loader::Checkpoint;
use crate::loader::{self, LoadOptions};
use crate::metrics::{EngineCollector, WorkerMetrics};
use crate::model::{DtypeChoice, Shard, WeightDtype};
use crate::tp::Group;

/// How a worker loads its model and runs its engine.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Where the model runs: the CPU, or an NVIDIA GPU (a worker built with
    /// `--features cuda`; weights in bf16 or f16, so with --dtype bf16 or
    /// f16; rank r of a tensor-parallel group on GPU r).
    #[arg(long, env = "AQUILA_DEVICE", value_enum, default_value = "cpu")]
    pub device: crate::backend::Device,
    /// With --device cuda: decode batches of up to this many sequences run
    /// as CUDA graphs (one launch a step instead of a few hundred), padded
    /// to batch sizes 1, 2, 4, 8, 16, 24, ... and captured the second time
    /// a shape comes; larger batches and prefill steps run kernel by
    /// kernel. 0 turns graphs off.
    #[arg(long, env = "AQUILA_CUDA_GRAPH_MAX_BATCH", default_value_t = 256)]
    pub cuda_graph_max_batch: usize,
    /// Float type to hold weights in. auto: the checkpoint's own (float16
    /// and bfloat16 checkpoints stay 16-bit, float32 stays f32; a GPU makes
    /// f32 bf16). GGUF quantized weights stay quantized on the CPU; a GPU
    /// dequantizes them to this type.
    #[arg(long, env = "AQUILA_DTYPE", value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Chat template: a built-in (aquila-chat: AquilaChat-7B's
    /// `###Human: …###Assistant:`; aquila-v1: Aquila2's
    /// `<|startofpiece|>…<|endofpiece|>`; aquila-legacy: FlagAI's
    /// `[CLS]#用户#… #ai助手#`) or a Jinja file. Default: the checkpoint's
    /// own, and aquila-chat for the Aquila vocabulary without one.
    #[arg(long, env = "AQUILA_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Model name reported to clients (default: the folder or file name).
    #[arg(long, env = "AQUILA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Sequences decoded together in one step at most.
    #[arg(long, env = "AQUILA_MAX_RUNNING", default_value_t = 16)]
    pub max_running: usize,
    /// Tokens in one step at most (decodes plus prefill chunks); longer
    /// prompts are prefilled in chunks.
    #[arg(long, env = "AQUILA_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests that may wait for a slot; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "AQUILA_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Prompt tokens that may wait in all; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "AQUILA_MAX_WAITING_TOKENS", default_value_t = 262_144)]
    pub max_waiting_tokens: usize,
    /// Memory for the KV cache, in MiB per rank. Default: 1024 on the CPU;
    /// on a GPU, what --gpu-memory-utilization leaves.
    #[arg(long, env = "AQUILA_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<usize>,
    /// With --device cuda and no --kv-cache-mib: the share of each GPU's
    /// memory this worker may use; the KV cache gets what the weights and
    /// the step buffers leave of it (as vLLM's flag of the same name).
    #[arg(long, env = "AQUILA_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV cache size in blocks; overrides --kv-cache-mib when set.
    #[arg(long, env = "AQUILA_KV_CACHE_BLOCKS")]
    pub kv_cache_blocks: Option<usize>,
    /// Element type of the KV cache: bf16 holds twice the tokens in the
    /// same memory and halves what attention reads, at bf16's precision.
    #[arg(long, env = "AQUILA_KV_CACHE_DTYPE", value_enum, default_value = "f32")]
    pub kv_cache_dtype: KvDtype,
    /// Tokens per KV block (the unit of cache accounting).
    #[arg(long, env = "AQUILA_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: usize,
    /// Compute threads (0: one per core).
    #[arg(long, env = "AQUILA_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Give the same bits at every tensor-parallel size on GGUF quantized
    /// models: row-parallel products are summed in fixed runs of their
    /// input, in one order, whatever the ranks (about 10% slower
    /// single-stream decode on the demo). Without it, a different TP size
    /// moves some 8-bit roundings, and greedy text can part where the top
    /// two tokens nearly tie. Float weights are not affected.
    #[arg(long, env = "AQUILA_TP_INVARIANT")]
    pub tp_invariant: bool,
    /// Seconds that requests in flight get to finish after SIGTERM (new
    /// ones are refused with UNAVAILABLE, so a gateway sends them elsewhere).
    #[arg(long, env = "AQUILA_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Also export the engine's load under vLLM's names
    /// (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
    /// `vllm:kv_cache_usage_perc`, labelled `model_name`), for autoscalers
    /// written for vLLM.
    #[arg(long, env = "AQUILA_METRICS_VLLM_NAMES")]
    pub metrics_vllm_names: bool,
}

/// Sizes the compute pools (ours, and rayon's for what candle runs); 0 keeps
/// one thread per core.
pub fn init_threads(threads: usize) {
    keep_freed_memory();
    crate::pool::init(threads);
    if threads > 0 {
        // Fails only if the pool already exists (several workers in one
        // process); the first size then stays.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
}

/// Every step allocates its activations and logits (megabytes at a batch
/// of 16) and frees them. glibc's default gives such blocks back to the
/// kernel (`mmap` above a threshold that moves, trimming the heap's top),
/// so the next step faults them in again, zeroed page by page, on the
/// engine thread while the compute threads wait: 3% of a base 16-stream
/// step. Blocks under 32 MiB now come from the heap, which is not trimmed
/// below 512 MiB; the weights and the KV cache, larger, are still mapped.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters, under glibc's own
    // lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Checks the engine flags, loads this rank's share of `model` (all of it
/// for a group of one) and takes its KV pool, returning the pool's size in
/// blocks: `--kv-cache-mib` per rank, for the KV heads this rank holds, so
/// every rank of a group gets the same number of blocks. In a group, the
/// model's collectives are timed into `metrics`.
fn load_rank(
    model: &std::path::Path,
    args: &WorkerArgs,
    comm: Arc<dyn Communicator>,
    metrics: &WorkerMetrics,
) -> Result<(loader::Loaded<Backend>, usize)> {
    init_threads(args.threads);
    for (flag, value) in [
        ("--kv-block-size", args.kv_block_size),
        ("--max-running", args.max_running),
        ("--max-batch-tokens", args.max_batch_tokens),
    ] {
        if value == 0 {
            return Err(WorkerError::Config(format!("{flag} = 0 must be positive")));
        }
    }
    let max_block = crate::model::attention::MAX_BLOCK_SIZE;
    if args.kv_block_size > max_block {
        return Err(WorkerError::Config(format!(
            "--kv-block-size = {} exceeds the limit of {max_block} tokens",
            args.kv_block_size
        )));
    }
    let template = args
        .chat_template
        .as_deref()
        .map(crate::chat_template::from_flag)
        .transpose()?;
    crate::backend::ensure_built(args.device)?;
    let ckpt = Checkpoint::open(model)?;
    let gpu = args.device != crate::backend::Device::Cpu;
    let (dtype, dtype_reason) = ckpt.resolve_dtype(args.dtype, gpu);
    tracing::info!("weights in {}: {dtype_reason}", dtype.label());
    if !gpu {
        let shard = Shard {
            rank: comm.rank(),
            world_size: comm.world_size(),
        };
        check_fits(&ckpt, args, dtype, shard, 1)?;
    }
    let opts = LoadOptions {
        dtype,
        name: args.served_model_name.clone(),
        tp_invariant: args.tp_invariant,
    };
    let comm: Arc<dyn Communicator> = if comm.world_size() > 1 {
        Arc::new(Timed::new(comm, metrics.collective_clock()))
    } else {
        comm
    };
    let started = Instant::now();
    let mut loaded = crate::backend::load_checkpoint(ckpt, &opts, comm, args.device)?;
    loaded.dtype_reason = dtype_reason;
    if let Some(t) = template {
        loaded.chat_template = Some(t.template);
        loaded.chat_template_name = t.name;
        loaded.chat_stop = t.stop;
    }
    loaded
        .model
        .set_cuda_graph_max_batch(args.cuda_graph_max_batch.min(args.max_running));
    metrics.model_loaded(started.elapsed());
    let block_bytes = loaded.model.kv_bytes_per_token(args.kv_cache_dtype) * args.kv_block_size;
    let kv_bytes = match (args.kv_cache_blocks, args.kv_cache_mib) {
        (Some(blocks), _) => blocks * block_bytes,
        (None, Some(mib)) => mib * 1024 * 1024,
        (None, None) => {
            let u = args.gpu_memory_utilization;
            if !(u > 0.0 && u <= 1.0) {
                return Err(WorkerError::Config(format!(
                    "--gpu-memory-utilization = {u}: expected a share of the GPU's memory, above 0 and at most 1"
                )));
            }
            let budget =
                loaded
                    .model
                    .device_kv_budget(u, args.max_batch_tokens, args.max_running)?;
            budget.unwrap_or(1024 * 1024 * 1024)
        }
    };
    let kv_blocks = kv_bytes / block_bytes;
    if kv_blocks == 0 {
        return Err(WorkerError::Config(format!(
            "the KV cache holds no block: {} MiB is less than one block of {} tokens ({block_bytes} bytes); give --kv-cache-mib more",
            kv_bytes >> 20,
            args.kv_block_size
        )));
    }
    tracing::info!(
        "KV cache: {kv_blocks} blocks of {} tokens, {} ({:.1} MiB)",
        args.kv_block_size,
        loaded.model.kv_label(args.kv_cache_dtype),
        (kv_blocks * block_bytes) as f64 / (1024.0 * 1024.0)
    );
    // The pool is taken here, before the group's barrier, so that the
    // startup deadline covers it: on the CPU it is faulted in page by
    // page, seconds for a few GiB, longer than one operation's deadline.
    let loaded =
        loaded.try_map(|m| m.into_backend(kv_blocks, args.kv_block_size, args.kv_cache_dtype))?;
    Ok((loaded, kv_blocks))
}

/// Refuses, before any weight is read, a model that `ranks` ranks of
/// `shard`'s size on this host cannot hold in the memory they may use (see
/// [`crate::fit`]), with the flags that would fit.
pub fn check_fits(
    ckpt: &Checkpoint,
    args: &WorkerArgs,
    dtype: WeightDtype,
    shard: Shard,
    ranks: usize,
) -> Result<()> {
    use crate::fit;
    let cfg = &ckpt.cfg;
    let kv_mib = args.kv_cache_mib.unwrap_or(1024);
    let kv = |shard: Shard, mib: usize| {
        fit::kv_bytes(
            cfg,
            shard,
            args.kv_cache_dtype,
            args.kv_block_size,
            args.kv_cache_blocks,
            mib,
        )
    };
    let need = |dtype: WeightDtype, shard: Shard, kv_bytes: usize| {
        fit::need(
            ckpt,
            dtype,
            shard,
            kv_bytes,
            args.max_batch_tokens,
            args.max_running,
        )
    };
    let here = need(dtype, shard, kv(shard, kv_mib)?)?;
    let avail = fit::available();
    if here.total() * ranks <= avail.bytes {
        return Ok(());
    }
    let mut alternatives = Vec::new();
    let is_float = !matches!(
        ckpt.store.weight_type(),
        Some(crate::weights::Stored::Ggml(_))
    );
    if is_float && dtype == WeightDtype::F32 {
        let n = need(WeightDtype::Bf16, shard, here.kv)?;
        alternatives.push(fit::Alternative {
            flags: "--dtype bf16".into(),
            needs: n.total() * ranks,
        });
    }
    // A smaller cache, if the rest fits with room for some of it.
    let rest = (here.total() - here.kv) * ranks;
    if rest < avail.bytes && args.kv_cache_blocks.is_none() {
        let mib = ((avail.bytes - rest) / ranks) >> 20;
        let bytes = kv(shard, mib)?;
        if bytes > 0 {
            alternatives.push(fit::Alternative {
                flags: format!("--kv-cache-mib {mib}"),
                needs: rest + bytes * ranks,
            });
        }
    }
    // Ranks on separate machines: each holds a share.
    if shard.world_size == 1 {
        for world in [2, 4, 8] {
            let part = Shard {
                rank: 0,
                world_size: world,
            };
            let Ok(kv_part) = kv(part, kv_mib) else {
                continue;
            };
            let Ok(n) = need(dtype, part, kv_part) else {
                continue;
            };
            if n.total() <= avail.bytes {
                alternatives.push(fit::Alternative {
                    flags: format!(
                        "--tp {world} with one rank per machine (--rank R --world-size {world} \
                         --leader HOST:PORT), each"
                    ),
                    needs: n.total(),
                });
                break;
            }
        }
    }
    fit::check(&here, ranks, dtype, &avail, &alternatives)
}

/// Every rank has loaded (the startup deadline still applies); from now on
/// an operation has `op_timeout`.
fn ready(comm: &TcpComm, op_timeout: Duration) -> Result<()> {
    comm.barrier()?;
    comm.set_timeout(op_timeout)
}

/// A follower rank: loads its shard and runs the leader's steps until the
/// group breaks. Blocking; returns only with the error that broke it.
/// Its steps and collectives are observed in `registry`.
pub fn run_follower(
    model: PathBuf,
    args: &WorkerArgs,
    group: Group,
    op_timeout: Duration,
    registry: &prometheus::Registry,
) -> WorkerError {
    let run = || -> Result<()> {
        let metrics = WorkerMetrics::new(registry)?;
        let (loaded, _) = load_rank(&model, args, group.collectives.clone(), &metrics)?;
        ready(&group.control, op_timeout)?;
        crate::tp::follow(loaded.model, &group.control, &metrics)
    };
    match run() {
        Ok(()) => WorkerError::Comm("the group ended".into()),
        Err(e) => e,
    }
}

/// A loaded model with its engine, ready to serve.
pub struct WorkerState {
    info: ModelInfo,
    engine: EngineHandle,
    /// Set on SIGTERM: new requests are refused while running ones finish.
    draining: AtomicBool,
    shutdown_grace: Duration,
}

impl WorkerState {
    /// Loads the model and starts the engine thread, declaring the
    /// worker's metrics in `registry`. Blocking.
    pub fn start(
        model: PathBuf,
        args: &WorkerArgs,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let metrics = WorkerMetrics::new(registry)?;
        let (loaded, kv_blocks) = load_rank(&model, args, Arc::new(SingleRank), &metrics)?;
        Self::with_engine(loaded, kv_blocks, args, None, metrics, registry)
    }

    /// Rank 0 of a tensor-parallel group: loads its shard and starts the
    /// engine, which sends each step to the other ranks over the group's
    /// control plane.
    pub fn start_leader(
        model: PathBuf,
        args: &WorkerArgs,
        group: Group,
        op_timeout: Duration,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let metrics = WorkerMetrics::new(registry)?;
        let (loaded, kv_blocks) = load_rank(&model, args, group.collectives.clone(), &metrics)?;
        ready(&group.control, op_timeout)?;
        Self::with_engine(
            loaded,
            kv_blocks,
            args,
            Some(group.control),
            metrics,
            registry,
        )
    }

    fn with_engine(
        loaded: loader::Loaded<Backend>,
        kv_blocks: usize,
        args: &WorkerArgs,
        control: Option<Arc<TcpComm>>,
        metrics: Arc<WorkerMetrics>,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let cfg = loaded.model.config().clone();
        let world = control.as_ref().map_or(1, |c| c.world_size());
        let tok = &loaded.tokenizer;
        let info = ModelInfo {
            name: loaded.name.clone(),
            architecture: loaded.architecture.clone(),
            context_length: cfg.context_length as u32,
            vocab_size: cfg.vocab_size as u32,
            dtype: loaded.dtype.clone(),
            tensor_parallel_size: world as u32,
            tokenizer_json: tok
                .tokenizer
                .to_string(false)
                .map_err(|e| WorkerError::Config(format!("serializing the tokenizer: {e}")))?,
            chat_template: loaded.chat_template.clone().unwrap_or_default(),
            eos_token_ids: tok.eos_ids.clone(),
            chat_stop: loaded.chat_stop.clone(),
            bos_token_id: tok.bos.as_ref().map(|b| b.0),
            bos_token: tok.bos.as_ref().map(|b| b.1.clone()).unwrap_or_default(),
            eos_token: tok.eos_token.clone(),
            dtype_reason: loaded.dtype_reason.clone(),
            chat_template_name: loaded.chat_template_name.clone(),
        };
        let engine = EngineHandle::start(
            loaded.model,
            tok.eos_ids.clone(),
            EngineConfig {
                max_running: args.max_running,
                max_batch_tokens: args.max_batch_tokens,
                max_waiting: args.max_waiting,
                max_waiting_tokens: args.max_waiting_tokens,
                block_size: args.kv_block_size,
                kv_blocks,
            },
            control.map(|c| c as Arc<dyn Communicator>),
            metrics,
        )?;
        EngineCollector::register(
            registry,
            engine.load_reader(),
            &info.name,
            args.metrics_vllm_names,
        )?;
        Ok(Self {
            info,
            engine,
            draining: AtomicBool::new(false),
            shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        })
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Checks a request against the model's limits; every message names the
    /// field, the value and the limit.
    fn validate(&self, req: &GenerateRequest) -> Result<SamplingParams> {
        let bad = |m: String| Err(WorkerError::InvalidRequest(m));
        let vocab = self.info.vocab_size;
        let ctx = self.info.context_length as usize;
        let n = req.prompt_token_ids.len();
        if n == 0 {
            return bad("prompt_token_ids is empty".into());
        }
        if let Some((i, id)) = req
            .prompt_token_ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id >= vocab)
        {
            return bad(format!(
                "prompt_token_ids[{i}] = {id} is not below the vocabulary size {vocab}"
            ));
        }
        let Some(p) = req.params.clone() else {
            return bad("params is missing".into());
        };
        if p.max_new_tokens == 0 {
            return bad("params.max_new_tokens = 0 must be at least 1".into());
        }
        if n + p.max_new_tokens as usize > ctx {
            return bad(format!(
                "prompt ({n} tokens) + params.max_new_tokens ({}) = {} exceeds the context length {ctx}",
                p.max_new_tokens,
                n + p.max_new_tokens as usize
            ));
        }
        let ranges = [
            ("temperature", p.temperature, 0.0, 100.0),
            ("top_p", p.top_p, f32::MIN_POSITIVE, 1.0),
            ("min_p", p.min_p, 0.0, 1.0),
            (
                "repetition_penalty",
                p.repetition_penalty,
                f32::MIN_POSITIVE,
                10.0,
            ),
            ("presence_penalty", p.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", p.frequency_penalty, -2.0, 2.0),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return bad(format!("params.{field} = {v} is outside [{lo}, {hi}]"));
            }
        }
        if let Some(id) = p.stop_token_ids.iter().find(|id| **id >= vocab) {
            return bad(format!(
                "params.stop_token_ids contains {id}, not below the vocabulary size {vocab}"
            ));
        }
        if p.top_logprobs > vocab {
            return bad(format!(
                "params.top_logprobs = {} exceeds the vocabulary size {vocab}",
                p.top_logprobs
            ));
        }
        Ok(p)
    }
}

struct WorkerService {
    state: Arc<WorkerState>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = EventStream;

    #[tracing::instrument(skip_all, fields(request_id = %req.get_ref().request_id))]
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let arrived = Instant::now();
        if self.state.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "the worker is shutting down; retry on another replica",
            ));
        }
        let timeout = aquila_proto::grpc_timeout(req.metadata());
        let req = req.into_inner();
        let params = self.state.validate(&req)?;
        // In the request's span: the line carries the gateway's request id.
        tracing::debug!(
            prompt_tokens = req.prompt_token_ids.len(),
            max_new_tokens = params.max_new_tokens,
            "request queued"
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.state.engine.submit(crate::engine::Request {
            id: req.request_id,
            prompt: req.prompt_token_ids,
            params,
            events: tx,
            arrived,
        })?;
        let events = UnboundedReceiverStream::new(rx);
        Ok(Response::new(match timeout {
            None => Box::pin(events),
            Some(timeout) => with_deadline(events, arrived + timeout, timeout),
        }))
    }

    async fn get_model_info(
        &self,
        _: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(self.state.info.clone()))
    }

    async fn get_load(&self, _: Request<GetLoadRequest>) -> Result<Response<Load>, Status> {
        Ok(Response::new(self.state.engine.load()))
    }
}

/// Ends `events` with DEADLINE_EXCEEDED at `at`. Dropping the engine's
/// receiver then cancels the sequence and frees its blocks, as when the
/// client goes away. (tonic enforces `grpc-timeout` only until the
/// response starts, not over a stream.)
fn with_deadline(
    events: UnboundedReceiverStream<Result<GenerateEvent, Status>>,
    at: Instant,
    timeout: Duration,
) -> EventStream {
    let at = tokio::time::Instant::from_std(at);
    Box::pin(futures::stream::unfold(
        Some(events),
        move |events| async move {
            let mut events = events?;
            match tokio::time::timeout_at(at, events.next()).await {
                Ok(Some(item)) => Some((item, Some(events))),
                Ok(None) => None,
                Err(_) => {
                    let status = Status::deadline_exceeded(format!(
                        "the request's deadline of {timeout:?} passed"
                    ));
                    Some((Err(status), None))
                }
            }
        },
    ))
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains:
/// readiness turns NOT_SERVING, new requests get UNAVAILABLE, running and
/// waiting ones get `--shutdown-grace-s` to finish. If the engine
/// stops because a tensor-parallel rank failed, health turns NOT_SERVING at
/// once, the server keeps answering (UNAVAILABLE) for `FAILED_GRACE`, so
/// that health checks see it, and then returns the failure: the process
/// exits non-zero and its supervisor (the launcher, or Kubernetes)
/// restarts the group. With `tls` (see `aquila_proto::tls::ServerTlsArgs`)
/// the port speaks only TLS, and only to clients with a certificate from
/// its client CA when it has one.
pub async fn run(
    listener: TcpListener,
    state: Arc<WorkerState>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    const FAILED_GRACE: Duration = Duration::from_secs(2);
    const DRAIN_POLL: Duration = Duration::from_millis(20);
    const CLOSE_AFTER_GRACE: Duration = Duration::from_secs(1);
    let (reporter, health) = tonic_health::server::health_reporter();
    set_readiness(&reporter, ServingStatus::Serving).await;
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| WorkerError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| WorkerError::Config(format!("reflection: {e}")))?;
    let watched = state.clone();
    let failing = reporter.clone();
    let failed = async move {
        loop {
            if let Some(reason) = watched.engine.failure() {
                set_readiness(&failing, ServingStatus::NotServing).await;
                tokio::time::sleep(FAILED_GRACE).await;
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let draining = state.clone();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
    let drain = async move {
        shutdown.await;
        draining.draining.store(true, Ordering::Release);
        set_readiness(&reporter, ServingStatus::NotServing).await;
        let busy = || {
            let load = draining.engine.load();
            load.running + load.waiting
        };
        let grace = draining.shutdown_grace;
        tracing::info!(in_flight = busy(), ?grace, "draining");
        let deadline = Instant::now() + grace;
        while busy() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        match busy() {
            0 => tracing::info!("drained"),
            left => tracing::warn!(left, "grace period over; cutting the remaining requests"),
        }
        let _ = drained_tx.send(());
    };
    let (failure_tx, failure_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            _ = drain => {}
            reason = failed => { let _ = failure_tx.send(reason); }
        }
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let server = server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(WorkerServer::new(WorkerService { state }))
        // Tokens are small writes: without TCP_NODELAY, Nagle and delayed ACKs
        // hold them back ~40 ms.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stop);
    // Graceful shutdown waits for every stream to end; one that outlived the
    // grace period is cut shortly after, so the process does exit.
    let cut = async {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(CLOSE_AFTER_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        _ = cut => tracing::warn!("streams still open after the drain; closed"),
    }
    match failure_rx.await {
        Ok(reason) => Err(WorkerError::Comm(reason)),
        Err(_) => Ok(()),
    }
}

/// Health services that say whether the worker takes requests: all ranks
/// alive (a failed rank stops the engine), model loaded, KV pool sized
/// (both before `run`), and not shutting down.
const READINESS_SERVICES: [&str; 3] = ["", "readiness", "aquila.worker.v1.Worker"];
/// The service that says only that the process serves.
const LIVENESS_SERVICE: &str = "liveness";

async fn set_readiness(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in READINESS_SERVICES {
        reporter.set_service_status(service, status).await;
    }
}
