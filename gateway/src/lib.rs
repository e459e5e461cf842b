//! The Aquila gateway: the front door clients talk to.
//!
//! It serves `aquila.v1.Generation` (plus gRPC health and reflection),
//! turns text into validated token ids, routes each request to a healthy
//! worker replica and streams detokenized text back. It never loads a model:
//! everything model-specific (tokenizer, chat template, limits) comes from
//! the workers' `GetModelInfo`.

pub mod admin;
pub mod breaker;
pub mod config;
pub mod detokenize;
pub mod discovery;
pub mod error;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod routing;
pub mod security;
pub mod service;
pub mod stop;
pub mod stream;
pub mod template;
pub mod transcribe;
pub mod validation;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aquila_proto::admin::v1::admin_server::AdminServer;
use aquila_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::{GatewayArgs, GatewayConfig};
pub use error::GatewayError;

use admin::AdminService;
use discovery::{Resolver, SystemResolver};
use metrics::{GatewayMetrics, PoolCollector};
use service::GenerationService;
use workers::WorkerPool;

/// How often a draining gateway looks whether its requests have ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// After the grace period, how long connections get to close by themselves.
const CLOSE_AFTER_GRACE: Duration = Duration::from_secs(1);

/// The sockets the gateway serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The public API (`aquila.v1.Generation`, health, reflection).
    pub public: TcpListener,
    /// The operator API (`aquila.admin.v1.Admin`), when wanted.
    pub admin: Option<TcpListener>,
    /// The OpenAI-compatible HTTP API (see [`openai`]), when wanted.
    pub http: Option<TcpListener>,
}

/// Serves the gateway on `listener` until `shutdown` completes, then drains.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let listeners = Listeners {
        public: listener,
        admin: None,
        http: None,
    };
    serve(listeners, config, shutdown, Arc::new(SystemResolver)).await
}

/// Serves the gateway, with `resolver` answering `--discover` names.
///
/// Replicas are probed in the background; readiness ("", "readiness",
/// "aquila.v1.Generation") is SERVING while one is healthy, liveness
/// ("liveness") as long as the process serves. When `shutdown` completes the
/// gateway drains: readiness turns NOT_SERVING, new requests get
/// UNAVAILABLE, requests in flight get up to the grace period to finish,
/// then it returns.
pub async fn serve(
    listeners: Listeners,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    resolver: Arc<dyn Resolver>,
) -> Result<(), GatewayError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let pool = WorkerPool::new(&config, reporter)?;
    pool.report_not_ready().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut tasks: Vec<JoinHandle<()>> = config
        .discover
        .iter()
        .map(|target| {
            tokio::spawn(discovery::follow(
                Arc::downgrade(&pool),
                target.clone(),
                Arc::clone(&resolver),
                config.discover_interval,
            ))
        })
        .collect();
    if let Some(listener) = listeners.admin {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "admin API listening");
        }
        let admin = tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminService::new(Arc::clone(&pool))))
            .serve_with_incoming(TcpIncoming::from(listener));
        tasks.push(tokio::spawn(async move {
            if let Err(error) = admin.await {
                tracing::error!(%error, "the admin API stopped");
            }
        }));
    }
    let _tasks = AbortOnDrop(tasks);

    let slots = Arc::new(Semaphore::new(config.max_concurrent_requests));
    let metrics = Arc::new(GatewayMetrics::new(
        &config.metrics,
        config.metrics_vllm_names,
    )?);
    config.metrics.register(Box::new(PoolCollector::new(
        Arc::downgrade(&pool),
        Arc::clone(&slots),
        config.max_concurrent_requests,
    )?))?;
    let generation = Arc::new(GenerationService::new(
        Arc::clone(&pool),
        config.limits.clone(),
        Arc::clone(&slots),
        metrics,
    ));
    let _http = listeners
        .http
        .map(|listener| AbortOnDrop(vec![spawn_http(listener, &generation, &pool, &config)]));
    if let Ok(address) = listeners.public.local_addr() {
        tracing::info!(
            %address,
            workers = ?config.workers,
            discover = ?config.discover,
            routing = ?config.routing,
            tls = config.security.tls.is_some(),
            api_keys = config.security.api_keys.is_enabled(),
            "gateway listening"
        );
    }
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
    let drain = {
        let pool = Arc::clone(&pool);
        let (grace, limit) = (config.shutdown_grace, config.max_concurrent_requests);
        async move {
            shutdown.await;
            pool.close().await;
            let busy = || limit - slots.available_permits();
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
        }
    };
    let security = &config.security;
    let mut server =
        tonic::transport::Server::builder().max_concurrent_streams(security.max_concurrent_streams);
    if let Some(tls) = &security.tls {
        server = server.tls_config(tls.clone())?;
    }
    // Only Generation needs a key: health and reflection stay open because
    // Kubernetes' native gRPC probes cannot send headers. The key is checked
    // before the request body is decoded.
    let generation = InterceptedService::new(
        GenerationServer::from_arc(generation)
            .max_decoding_message_size(security.max_message_bytes),
        security.api_keys.clone(),
    );
    let server = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        // Tokens are small writes: without TCP_NODELAY, Nagle and delayed ACKs
        // hold them back ~40 ms.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.public).with_nodelay(Some(true)),
            drain,
        );
    // Graceful shutdown waits for every connection to close; one whose
    // stream outlived the grace period is cut shortly after.
    let cut = async {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(CLOSE_AFTER_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        _ = cut => tracing::warn!("connections still open after the drain; closed"),
    }
    pool.stop_tasks();
    tracing::info!("gateway stopped");
    Ok(())
}

/// The OpenAI-compatible HTTP API on the gRPC server's own service: it
/// drains with it and stops when `serve` returns.
fn spawn_http(
    listener: TcpListener,
    generation: &Arc<GenerationService>,
    pool: &Arc<WorkerPool>,
    config: &GatewayConfig,
) -> JoinHandle<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "OpenAI-compatible HTTP API listening");
    }
    if config.security.tls.is_some() {
        tracing::warn!("the HTTP API is plaintext; terminate TLS in front of it");
    }
    let state = openai::HttpState {
        service: Arc::clone(generation),
        pool: Arc::clone(pool),
        api_keys: config.security.api_keys.clone(),
    };
    let router = openai::router(state, config.security.max_message_bytes);
    tokio::spawn(openai::serve(listener, router))
}

/// Background tasks that must not outlive `run`.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
