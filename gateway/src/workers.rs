//! The worker pool: one entry per `--worker`, its health, its model, and the
//! choice of a replica per request.
//!
//! A background task per worker probes `grpc.health.v1.Health/Check` and, on
//! the first success, fetches `GetModelInfo` once; the model (tokenizer
//! included) stays known while the worker is down. A failed call marks a
//! worker unhealthy at once. The gateway's own health is SERVING while at
//! least one worker is healthy with its model loaded. The pool does not
//! retry requests or touch their streams: that is the service's job.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aquila_proto::worker::v1 as worker;
use aquila_proto::worker::v1::worker_client::WorkerClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as ProbeStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::model::Model;
use crate::routing::{RoundRobin, RoutingPolicy};
use crate::template::ChatTemplate;

/// Tokenizer documents run to several MB.
const MAX_MODEL_INFO_BYTES: usize = 64 * 1024 * 1024;
/// Fetching and parsing a large tokenizer takes longer than a health probe.
const MODEL_INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Services whose status the gateway reports.
const GATEWAY_SERVICES: [&str; 2] = ["", "aquila.v1.Generation"];

#[derive(Debug)]
struct Worker {
    address: String,
    channel: Channel,
    state: Mutex<WorkerState>,
}

#[derive(Debug, Default, Clone)]
struct WorkerState {
    /// Healthy implies `model` is set.
    healthy: bool,
    model: Option<Arc<Model>>,
}

/// A replica chosen for one call.
#[derive(Debug, Clone)]
pub struct Picked {
    pub index: usize,
    pub address: String,
    pub client: WorkerClient<Channel>,
}

#[derive(Debug)]
pub struct WorkerPool {
    workers: Vec<Worker>,
    policy: Box<dyn RoutingPolicy>,
    chat_template: Option<Arc<ChatTemplate>>,
    reporter: HealthReporter,
    /// Serializes readiness updates so the last one written is current.
    readiness: tokio::sync::Mutex<Option<bool>>,
}

impl WorkerPool {
    /// Channels connect lazily: an unreachable worker is not an error here.
    pub fn new(config: &GatewayConfig, reporter: HealthReporter) -> Result<Self, GatewayError> {
        let workers = config
            .workers
            .iter()
            .map(|address| {
                let endpoint =
                    crate::security::worker_endpoint(address, &config.security.worker_tls)?;
                Ok(Worker {
                    address: address.clone(),
                    channel: endpoint
                        .connect_timeout(config.health_timeout)
                        .connect_lazy(),
                    state: Mutex::new(WorkerState::default()),
                })
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(WorkerPool {
            workers,
            policy: Box::new(RoundRobin::default()),
            chat_template: config.chat_template.clone(),
            reporter,
            readiness: tokio::sync::Mutex::new(None),
        })
    }

    /// Starts one health task per worker; they end when the handles are aborted.
    pub fn spawn_health_checks(
        self: &Arc<Self>,
        interval: Duration,
        timeout: Duration,
    ) -> Vec<JoinHandle<()>> {
        (0..self.workers.len())
            .map(|index| {
                let pool = Arc::clone(self);
                tokio::spawn(async move { pool.watch(index, interval, timeout).await })
            })
            .collect()
    }

    /// The model `requested` names; empty means the first known model.
    pub fn resolve(&self, requested: &str) -> Result<Arc<Model>, GatewayError> {
        let models = self.models();
        let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
        let index = resolve_name(&names, requested)?;
        Ok(Arc::clone(&models[index]))
    }

    /// Every known model once, in worker order.
    pub fn models(&self) -> Vec<Arc<Model>> {
        let mut models: Vec<Arc<Model>> = Vec::new();
        for w in &self.workers {
            if let Some(model) = lock(&w.state).model.clone()
                && !models.iter().any(|m| m.name() == model.name())
            {
                models.push(model);
            }
        }
        models
    }

    pub fn healthy_replicas(&self, model: &str) -> usize {
        eligible(&self.snapshot(), model, None).len()
    }

    /// A healthy replica of `model`, other than `exclude`.
    pub fn pick(&self, model: &str, exclude: Option<usize>) -> Result<Picked, GatewayError> {
        let candidates = eligible(&self.snapshot(), model, exclude);
        let index = self
            .policy
            .pick(&candidates)
            .ok_or_else(|| GatewayError::NoHealthyWorker {
                model: model.to_owned(),
            })?;
        let w = &self.workers[index];
        Ok(Picked {
            index,
            address: w.address.clone(),
            client: WorkerClient::new(w.channel.clone()),
        })
    }

    /// Passive health: a call to this worker failed to connect.
    pub async fn mark_unavailable(&self, index: usize, reason: &str) {
        let w = &self.workers[index];
        let was_healthy = std::mem::replace(&mut lock(&w.state).healthy, false);
        if was_healthy {
            tracing::warn!(worker = %w.address, reason, "worker marked unhealthy after a failed call");
            self.refresh_readiness().await;
        }
    }

    fn snapshot(&self) -> Vec<(bool, Option<String>)> {
        self.workers
            .iter()
            .map(|w| {
                let state = lock(&w.state);
                (
                    state.healthy,
                    state.model.as_ref().map(|m| m.name().to_owned()),
                )
            })
            .collect()
    }

    async fn watch(&self, index: usize, interval: Duration, timeout: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let healthy = match self.probe(index, timeout).await {
                Ok(()) => self.ensure_model(index).await.is_ok(),
                Err(reason) => {
                    tracing::debug!(worker = %self.workers[index].address, reason, "health probe failed");
                    false
                }
            };
            let w = &self.workers[index];
            let was = std::mem::replace(&mut lock(&w.state).healthy, healthy);
            if was != healthy {
                tracing::info!(worker = %w.address, healthy, "worker health changed");
            }
            self.refresh_readiness().await;
        }
    }

    async fn probe(&self, index: usize, timeout: Duration) -> Result<(), String> {
        let mut client = HealthClient::new(self.workers[index].channel.clone());
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match tokio::time::timeout(timeout, client.check(request)).await {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(status)) => Err(status.to_string()),
            Ok(Ok(response)) => match response.into_inner().status() {
                ProbeStatus::Serving => Ok(()),
                other => Err(format!("worker reports {}", other.as_str_name())),
            },
        }
    }

    /// Fetches the model info once per worker; replicas share one `Model`.
    async fn ensure_model(&self, index: usize) -> Result<(), ()> {
        let w = &self.workers[index];
        if lock(&w.state).model.is_some() {
            return Ok(());
        }
        let mut client =
            WorkerClient::new(w.channel.clone()).max_decoding_message_size(MAX_MODEL_INFO_BYTES);
        let info = match tokio::time::timeout(
            MODEL_INFO_TIMEOUT,
            client.get_model_info(worker::GetModelInfoRequest {}),
        )
        .await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(worker = %w.address, %status, "GetModelInfo failed");
                return Err(());
            }
            Err(_) => {
                tracing::warn!(worker = %w.address, "GetModelInfo timed out");
                return Err(());
            }
        };
        let known = self.models().into_iter().find(|m| m.name() == info.name);
        let model = match known {
            Some(model) => model,
            None => {
                let template = self.chat_template.clone();
                match tokio::task::spawn_blocking(move || Model::from_info(info, template)).await {
                    Ok(Ok(model)) => Arc::new(model),
                    Ok(Err(reason)) => {
                        tracing::error!(worker = %w.address, reason, "unusable model info");
                        return Err(());
                    }
                    Err(e) => {
                        tracing::error!(worker = %w.address, error = %e, "building the model panicked");
                        return Err(());
                    }
                }
            }
        };
        tracing::info!(worker = %w.address, model = model.name(), "model info loaded");
        lock(&w.state).model = Some(model);
        Ok(())
    }

    async fn refresh_readiness(&self) {
        let mut last = self.readiness.lock().await;
        let ready = self.snapshot().iter().any(|(healthy, _)| *healthy);
        if *last == Some(ready) {
            return;
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in GATEWAY_SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
        tracing::info!(ready, "gateway readiness changed");
        *last = Some(ready);
    }

    /// Reports NOT_SERVING until the first worker is ready.
    pub async fn report_not_ready(&self) {
        let mut last = self.readiness.lock().await;
        for service in GATEWAY_SERVICES {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        *last = Some(false);
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// data (a flag and an `Arc`); the data is still usable.
fn lock(state: &Mutex<WorkerState>) -> MutexGuard<'_, WorkerState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Indices of healthy workers serving `model`, except `exclude`.
fn eligible(workers: &[(bool, Option<String>)], model: &str, exclude: Option<usize>) -> Vec<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(i, (healthy, name))| {
            *healthy && name.as_deref() == Some(model) && Some(*i) != exclude
        })
        .map(|(i, _)| i)
        .collect()
}

/// Index into `known` of the model `requested` names; "" = the first.
fn resolve_name(known: &[&str], requested: &str) -> Result<usize, GatewayError> {
    if requested.is_empty() {
        return if known.is_empty() {
            Err(GatewayError::NoHealthyWorker {
                model: String::new(),
            })
        } else {
            Ok(0)
        };
    }
    known
        .iter()
        .position(|name| *name == requested)
        .ok_or_else(|| GatewayError::UnknownModel {
            requested: requested.to_owned(),
            available: known.iter().map(|s| s.to_string()).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn state(healthy: bool, model: Option<&str>) -> (bool, Option<String>) {
        (healthy, model.map(str::to_owned))
    }

    #[test]
    fn eligible_needs_health_and_the_model() {
        let workers = [
            state(true, Some("a")),
            state(false, Some("a")),
            state(true, Some("b")),
            state(true, Some("a")),
            state(false, None),
        ];
        assert_eq!(eligible(&workers, "a", None), [0, 3]);
        assert_eq!(eligible(&workers, "a", Some(0)), [3]);
        assert_eq!(eligible(&workers, "b", Some(2)), Vec::<usize>::new());
    }

    #[test]
    fn round_robin_over_replicas_of_one_model() {
        let workers = [
            state(true, Some("a")),
            state(true, Some("b")),
            state(true, Some("a")),
        ];
        let policy = RoundRobin::default();
        let picks: Vec<_> = (0..4)
            .map(|_| policy.pick(&eligible(&workers, "a", None)).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn empty_model_name_means_the_first_known() {
        assert_eq!(resolve_name(&["a", "b"], "").unwrap(), 0);
        assert_eq!(resolve_name(&["a", "b"], "b").unwrap(), 1);
        let status = resolve_name(&[], "").unwrap_err().to_status();
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn unknown_model_lists_the_available_ones() {
        let status = resolve_name(&["a", "b"], "c").unwrap_err().to_status();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("\"c\""));
        assert!(status.message().contains("[a, b]"));
    }
}
