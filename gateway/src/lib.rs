//! The Aquila gateway: the front door clients talk to.
//!
//! It serves `aquila.v1.Generation` (plus gRPC health and reflection),
//! turns text into validated token ids, routes each request to a healthy
//! worker replica and streams detokenized text back. It never loads a model:
//! everything model-specific (tokenizer, chat template, limits) comes from
//! the workers' `GetModelInfo`.

pub mod config;
pub mod detokenize;
pub mod error;
pub mod model;
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

use aquila_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::{GatewayArgs, GatewayConfig};
pub use error::GatewayError;

use service::GenerationService;
use workers::WorkerPool;

/// Serves the gateway on `listener` until `shutdown` completes.
///
/// Workers are probed in the background; the gateway's health reports
/// SERVING (for "" and "aquila.v1.Generation") once one is ready.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let pool = Arc::new(WorkerPool::new(&config, reporter)?);
    pool.report_not_ready().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aquila_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let _health_tasks =
        AbortOnDrop(pool.spawn_health_checks(config.health_interval, config.health_timeout));
    let generation = GenerationService::new(Arc::clone(&pool), config.limits.clone());
    if let Ok(address) = listener.local_addr() {
        tracing::info!(
            %address,
            workers = ?config.workers,
            tls = config.security.tls.is_some(),
            api_keys = config.security.api_keys.is_enabled(),
            "gateway listening"
        );
    }
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
        GenerationServer::new(generation).max_decoding_message_size(security.max_message_bytes),
        security.api_keys.clone(),
    );
    server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        // Tokens are small writes: without TCP_NODELAY, Nagle and delayed ACKs
        // hold them back ~40 ms.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    tracing::info!("gateway stopped");
    Ok(())
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
