//! The `/metrics` endpoint (`--metrics-listen`): the Prometheus text
//! exposition of this process's registries over plain HTTP. It declares
//! no metric itself (each crate has its own `metrics` module) and holds no
//! state beyond the registries it is given.

use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Serves `registries` at `/metrics` on `listener` in a background task
/// that lives as long as the process.
pub fn spawn(listener: TcpListener, registries: Vec<Registry>) {
    let registries = Arc::new(registries);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registries = Arc::clone(&registries);
            async move { exposition(&registries) }
        }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
}

fn exposition(registries: &[Registry]) -> ([(axum::http::HeaderName, String); 1], Vec<u8>) {
    // One process's registries declare disjoint names (gateway, worker).
    let families: Vec<_> = registries.iter().flat_map(Registry::gather).collect();
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(error) = encoder.encode(&families, &mut body) {
        tracing::error!(%error, "encoding the metrics failed");
    }
    ([(CONTENT_TYPE, encoder.format_type().to_owned())], body)
}
