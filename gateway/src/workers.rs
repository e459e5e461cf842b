//! The replica registry: every worker replica the gateway knows (from
//! `--worker`, DNS discovery or the admin API), its health, load, circuit
//! breaker and model, and the choice of a replica per request.
//!
//! A background task per replica probes `grpc.health.v1.Health/Check`
//! (healthy after `healthy_threshold` successes in a row, unhealthy after
//! `unhealthy_threshold` failures), fetches `GetModelInfo` once, and polls
//! `GetLoad` for the routing policy. A call that cannot reach a replica marks
//! it unhealthy at once (passive ejection); the probes reinstate it. The
//! gateway's readiness is SERVING while at least one replica is healthy and
//! not draining. The registry does not retry requests or touch their
//! streams: that is the service's job. It hands out an [`InFlight`] guard per
//! call, which counts the call against the replica until dropped and carries
//! the call's verdict to the replica's breaker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use aquila_proto::admin::v1 as admin;
use aquila_proto::worker::v1 as worker;
use aquila_proto::worker::v1::worker_client::WorkerClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as ProbeStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::config::{GatewayConfig, normalize_worker_address};
use crate::error::GatewayError;
use crate::model::Model;
use crate::routing::{Candidate, ReplicaLoad, Route, RoutingPolicy};
use crate::security::WorkerTls;
use crate::template::ChatTemplate;

/// Tokenizer documents run to several MB.
const MAX_MODEL_INFO_BYTES: usize = 64 * 1024 * 1024;
/// Fetching and parsing a large tokenizer takes longer than a health probe.
const MODEL_INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Services whose status says whether the gateway can serve (readiness).
pub const READINESS_SERVICES: [&str; 3] = ["", "readiness", "aquila.v1.Generation"];
/// The service that says only that the process works (liveness).
pub const LIVENESS_SERVICE: &str = "liveness";

/// How a replica entered the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--worker`: stays until drained through the admin API.
    Static,
    /// `--discover`: drained when the name stops resolving to it.
    Dns(String),
    /// `AddReplica`.
    Admin,
}

impl Source {
    fn label(&self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Dns(_) => "dns",
            Source::Admin => "admin",
        }
    }
}

/// Health-check and breaker settings shared by every replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaSettings {
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub load_interval: Duration,
    pub breaker: BreakerConfig,
}

#[derive(Debug)]
pub struct Replica {
    pub address: String,
    channel: Channel,
    in_flight: AtomicUsize,
    state: Mutex<ReplicaState>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct ReplicaState {
    source: Source,
    probes: Probes,
    model: Option<Arc<Model>>,
    load: Option<ReplicaLoad>,
    breaker: Breaker,
    draining: bool,
    last_error: String,
}

impl ReplicaState {
    /// Healthy implies the model is known.
    fn healthy(&self) -> bool {
        self.probes.healthy && self.model.is_some()
    }
}

/// Consecutive probe results against the thresholds; starts unhealthy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Probes {
    healthy: bool,
    in_row: u32,
}

impl Probes {
    /// Records a probe; returns the new health when it changed.
    fn record(&mut self, ok: bool, healthy_after: u32, unhealthy_after: u32) -> Option<bool> {
        if ok == self.healthy {
            self.in_row = 0;
            return None;
        }
        self.in_row += 1;
        let needed = if ok { healthy_after } else { unhealthy_after };
        if self.in_row >= needed.max(1) {
            self.healthy = ok;
            self.in_row = 0;
            return Some(ok);
        }
        None
    }

    /// Passive ejection: a failed call counts as enough failed probes.
    fn eject(&mut self) -> bool {
        let was = self.healthy;
        self.healthy = false;
        self.in_row = 0;
        was
    }
}

/// A replica chosen for one call.
#[derive(Debug)]
pub struct Picked {
    pub address: String,
    pub client: WorkerClient<Channel>,
    pub in_flight: InFlight,
}

/// What a call's outcome says about its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing about the replica (the client left, a bad request, overload).
    Neutral,
    Success,
    Failure,
}

/// One call on one replica: counted in its `in_flight` until dropped; the
/// verdict reaches the breaker at once; a drained replica leaves the
/// registry when its last call ends.
#[derive(Debug)]
pub struct InFlight {
    pool: Arc<WorkerPool>,
    replica: Arc<Replica>,
    decided: bool,
}

impl InFlight {
    /// The call produced its first event: the replica works.
    pub fn succeeded(&mut self) {
        self.settle(Verdict::Success, "");
    }

    /// The call failed with `error`: counts against the breaker if the
    /// error blames the replica, and ejects it at once if unreachable.
    pub async fn failed(&mut self, error: &GatewayError) {
        let reason = error.to_string();
        if error.blames_worker() {
            self.settle(Verdict::Failure, &reason);
        }
        if error.is_worker_unavailable() {
            self.pool
                .mark_unavailable(&self.replica.address, &reason)
                .await;
        }
    }

    /// Records one outcome of the call; `reason` is kept as the replica's
    /// last error on failure.
    fn settle(&mut self, verdict: Verdict, reason: &str) {
        if verdict == Verdict::Neutral {
            return;
        }
        self.decided = true;
        let mut state = lock(&self.replica.state);
        match verdict {
            Verdict::Success => state.breaker.on_success(),
            Verdict::Failure => {
                state.last_error = reason.to_owned();
                if state.breaker.on_failure(Instant::now()) {
                    tracing::warn!(worker = %self.replica.address, reason, "circuit breaker opened");
                }
            }
            Verdict::Neutral => {}
        }
    }

    pub fn address(&self) -> &str {
        &self.replica.address
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.decided {
            lock(&self.replica.state).breaker.on_neutral();
        }
        let left = self.replica.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && lock(&self.replica.state).draining {
            self.pool.remove(&self.replica.address);
        }
        self.pool.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct WorkerPool {
    replicas: RwLock<BTreeMap<String, Arc<Replica>>>,
    policy: Box<dyn RoutingPolicy>,
    settings: ReplicaSettings,
    /// How workers are dialed (TLS, client certificate).
    worker_tls: WorkerTls,
    chat_template: Option<Arc<ChatTemplate>>,
    reporter: HealthReporter,
    /// Serializes readiness updates so the last one written is current.
    readiness: tokio::sync::Mutex<Option<bool>>,
    /// Set when the gateway shuts down: readiness stays NOT_SERVING.
    closing: AtomicBool,
    /// Calls in flight on all replicas.
    calls: AtomicUsize,
    /// Weak self, so replica tasks do not keep the pool alive.
    this: Weak<WorkerPool>,
}

impl WorkerPool {
    /// Registers the `--worker` replicas; their tasks start with the pool.
    /// Channels connect lazily: an unreachable worker is not an error here.
    pub fn new(
        config: &GatewayConfig,
        reporter: HealthReporter,
    ) -> Result<Arc<WorkerPool>, GatewayError> {
        let pool = Arc::new_cyclic(|this| WorkerPool {
            replicas: RwLock::new(BTreeMap::new()),
            policy: crate::routing::build(config.routing, config.prefix),
            settings: config.replicas,
            worker_tls: config.security.worker_tls.clone(),
            chat_template: config.chat_template.clone(),
            reporter,
            readiness: tokio::sync::Mutex::new(None),
            closing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            this: this.clone(),
        });
        for address in &config.workers {
            pool.add(address, Source::Static)?;
        }
        Ok(pool)
    }

    /// Registers `address` (normalized to "http://host:port") and starts its
    /// health task; a draining replica of that address is taken back.
    pub fn add(&self, address: &str, source: Source) -> Result<Arc<Replica>, GatewayError> {
        let address = normalize_worker_address(address)?;
        let mut replicas = write(&self.replicas);
        if let Some(existing) = replicas.get(&address) {
            let mut state = lock(&existing.state);
            if state.draining {
                tracing::info!(worker = %address, "replica taken back from draining");
                state.draining = false;
                state.source = source;
            }
            return Ok(Arc::clone(existing));
        }
        let endpoint = crate::security::worker_endpoint(&address, &self.worker_tls)?
            .connect_timeout(self.settings.health_timeout);
        let replica = Arc::new(Replica {
            address: address.clone(),
            channel: endpoint.connect_lazy(),
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(ReplicaState {
                source,
                probes: Probes::default(),
                model: None,
                load: None,
                breaker: Breaker::new(self.settings.breaker),
                draining: false,
                last_error: String::new(),
            }),
            task: Mutex::new(None),
        });
        // The task needs a runtime; a pool built outside one (unit tests)
        // simply has no probes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let task = runtime.spawn(watch(self.this.clone(), Arc::clone(&replica)));
            *lock_task(&replica.task) = Some(task);
        }
        tracing::info!(worker = %address, source = replica_source(&replica), "replica registered");
        replicas.insert(address, Arc::clone(&replica));
        Ok(replica)
    }

    /// Stops routing to `address`; it leaves once its calls have ended.
    pub fn drain(&self, address: &str) -> Result<Arc<Replica>, GatewayError> {
        let normalized = normalize_worker_address(address)?;
        let replica = read(&self.replicas)
            .get(&normalized)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownReplica {
                address: address.to_owned(),
            })?;
        let newly = !std::mem::replace(&mut lock(&replica.state).draining, true);
        if newly {
            tracing::info!(worker = %normalized, in_flight = replica.in_flight.load(Ordering::Acquire), "replica draining");
        }
        if replica.in_flight.load(Ordering::Acquire) == 0 {
            self.remove(&normalized);
        }
        self.spawn_readiness_refresh();
        Ok(replica)
    }

    fn remove(&self, address: &str) {
        let removed = {
            let mut replicas = write(&self.replicas);
            // Only if still draining and idle: it may have been taken back.
            match replicas.get(address) {
                Some(r) if lock(&r.state).draining && r.in_flight.load(Ordering::Acquire) == 0 => {
                    replicas.remove(address)
                }
                _ => None,
            }
        };
        if let Some(replica) = removed {
            if let Some(task) = lock_task(&replica.task).take() {
                task.abort();
            }
            tracing::info!(worker = %address, "replica removed");
        }
    }

    /// Addresses registered from `source`, draining ones included.
    pub fn addresses_from(&self, source: &Source) -> Vec<String> {
        read(&self.replicas)
            .values()
            .filter(|r| lock(&r.state).source == *source)
            .map(|r| r.address.clone())
            .collect()
    }

    /// Every replica, as the admin API lists them.
    pub fn list(&self) -> Vec<admin::Replica> {
        let now = Instant::now();
        read(&self.replicas)
            .values()
            .map(|r| describe(r, now))
            .collect()
    }

    /// The model `requested` names; empty means the first known model.
    pub fn resolve(&self, requested: &str) -> Result<Arc<Model>, GatewayError> {
        let models = self.models();
        let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
        let index = resolve_name(&names, requested)?;
        Ok(Arc::clone(&models[index]))
    }

    /// Every known model once, in address order.
    pub fn models(&self) -> Vec<Arc<Model>> {
        let mut models: Vec<Arc<Model>> = Vec::new();
        for r in read(&self.replicas).values() {
            if let Some(model) = lock(&r.state).model.clone()
                && !models.iter().any(|m| m.name() == model.name())
            {
                models.push(model);
            }
        }
        models
    }

    pub fn healthy_replicas(&self, model: &str) -> usize {
        let now = Instant::now();
        read(&self.replicas)
            .values()
            .filter(|r| routable(&lock(&r.state), model, now))
            .count()
    }

    /// Calls in flight on all replicas.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }

    /// A replica of `model` for a request with `prompt`, other than those in
    /// `exclude`: healthy, not draining, its breaker letting calls through,
    /// chosen by the routing policy.
    pub fn pick(
        &self,
        model: &str,
        prompt: &[u32],
        exclude: &[String],
    ) -> Result<Picked, GatewayError> {
        let now = Instant::now();
        let mut skip: Vec<String> = exclude.to_vec();
        // A replica whose breaker went half-open and gave its trial slot to
        // another call between listing and acquiring is skipped; each retry
        // has one candidate fewer, so this ends.
        loop {
            let replicas: Vec<Arc<Replica>> = read(&self.replicas)
                .values()
                .filter(|r| !skip.contains(&r.address) && routable(&lock(&r.state), model, now))
                .cloned()
                .collect();
            let candidates: Vec<Candidate> = replicas
                .iter()
                .map(|r| Candidate {
                    address: r.address.clone(),
                    in_flight: r.in_flight.load(Ordering::Acquire),
                    load: lock(&r.state).load,
                })
                .collect();
            let index = self
                .policy
                .pick(&Route { prompt }, &candidates)
                .filter(|&i| i < replicas.len())
                .ok_or_else(|| GatewayError::NoHealthyWorker {
                    model: model.to_owned(),
                })?;
            let replica = &replicas[index];
            if !lock(&replica.state).breaker.acquire(now) {
                skip.push(replica.address.clone());
                continue;
            }
            replica.in_flight.fetch_add(1, Ordering::AcqRel);
            self.calls.fetch_add(1, Ordering::AcqRel);
            let pool = self
                .this
                .upgrade()
                .ok_or_else(|| GatewayError::NoHealthyWorker {
                    model: model.to_owned(),
                })?;
            return Ok(Picked {
                address: replica.address.clone(),
                client: WorkerClient::new(replica.channel.clone()),
                in_flight: InFlight {
                    pool,
                    replica: Arc::clone(replica),
                    decided: false,
                },
            });
        }
    }

    /// Passive health: a call to this replica could not reach it.
    pub async fn mark_unavailable(&self, address: &str, reason: &str) {
        let Some(replica) = read(&self.replicas).get(address).cloned() else {
            return;
        };
        let was_healthy = {
            let mut state = lock(&replica.state);
            state.last_error = reason.to_owned();
            state.probes.eject()
        };
        if was_healthy {
            tracing::warn!(worker = %address, reason, "worker marked unhealthy after a failed call");
            self.refresh_readiness().await;
        }
    }

    /// Readiness stays NOT_SERVING from now on (the gateway is shutting down).
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.refresh_readiness().await;
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Stops every replica's background task.
    pub fn stop_tasks(&self) {
        for replica in read(&self.replicas).values() {
            if let Some(task) = lock_task(&replica.task).take() {
                task.abort();
            }
        }
    }

    /// Reports NOT_SERVING until the first replica is ready, and SERVING for
    /// liveness from now on.
    pub async fn report_not_ready(&self) {
        let mut last = self.readiness.lock().await;
        for service in READINESS_SERVICES {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        self.reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        *last = Some(false);
    }

    /// What readiness reports: not shutting down, and some replica healthy,
    /// not draining, its breaker not open.
    pub fn is_ready(&self) -> bool {
        let now = Instant::now();
        !self.is_closing()
            && read(&self.replicas).values().any(|r| {
                let state = lock(&r.state);
                state.healthy() && !state.draining && state.breaker.state(now) != BreakerState::Open
            })
    }

    async fn refresh_readiness(&self) {
        let mut last = self.readiness.lock().await;
        let ready = self.is_ready();
        if *last == Some(ready) {
            return;
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in READINESS_SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
        tracing::info!(ready, "gateway readiness changed");
        *last = Some(ready);
    }

    fn spawn_readiness_refresh(&self) {
        if let (Some(pool), Ok(runtime)) =
            (self.this.upgrade(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move { pool.refresh_readiness().await });
        }
    }

    /// One probe of `replica`'s health; fetches its model on success.
    async fn check(&self, replica: &Replica) {
        let ok = match probe(&replica.channel, self.settings.health_timeout).await {
            Ok(()) => self.ensure_model(replica).await.is_ok(),
            Err(reason) => {
                tracing::debug!(worker = %replica.address, reason, "health probe failed");
                lock(&replica.state).last_error = reason;
                false
            }
        };
        let changed = lock(&replica.state).probes.record(
            ok,
            self.settings.healthy_threshold,
            self.settings.unhealthy_threshold,
        );
        if let Some(healthy) = changed {
            tracing::info!(worker = %replica.address, healthy, "worker health changed");
        }
        self.refresh_readiness().await;
    }

    async fn poll_load(&self, replica: &Replica) {
        let mut client = WorkerClient::new(replica.channel.clone());
        let call = client.get_load(worker::GetLoadRequest {});
        if let Ok(Ok(response)) = tokio::time::timeout(self.settings.health_timeout, call).await {
            let load = response.into_inner();
            // Ours as of the answer: a call that ended during the poll may
            // still be counted by the worker, so `others` errs low, never high.
            let ours = u32::try_from(replica.in_flight.load(Ordering::Acquire)).unwrap_or(u32::MAX);
            lock(&replica.state).load = Some(ReplicaLoad {
                running: load.running,
                waiting: load.waiting,
                kv_blocks_free: load.kv_blocks_free,
                kv_blocks_total: load.kv_blocks_total,
                kv_block_size: load.kv_block_size,
                others: (load.running + load.waiting).saturating_sub(ours),
            });
        }
    }

    /// Fetches the model info once per replica; replicas share one `Model`.
    async fn ensure_model(&self, replica: &Replica) -> Result<(), ()> {
        if lock(&replica.state).model.is_some() {
            return Ok(());
        }
        let address = &replica.address;
        let mut client = WorkerClient::new(replica.channel.clone())
            .max_decoding_message_size(MAX_MODEL_INFO_BYTES);
        let info = match tokio::time::timeout(
            MODEL_INFO_TIMEOUT,
            client.get_model_info(worker::GetModelInfoRequest {}),
        )
        .await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::warn!(worker = %address, %status, "GetModelInfo failed");
                return Err(());
            }
            Err(_) => {
                tracing::warn!(worker = %address, "GetModelInfo timed out");
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
                        tracing::error!(worker = %address, reason, "unusable model info");
                        return Err(());
                    }
                    Err(e) => {
                        tracing::error!(worker = %address, error = %e, "building the model panicked");
                        return Err(());
                    }
                }
            }
        };
        tracing::info!(worker = %address, model = model.name(), "model info loaded");
        lock(&replica.state).model = Some(model);
        Ok(())
    }
}

/// A replica's background task: health probes every interval, load polls
/// in between. Ends when the pool is gone or the task is aborted.
async fn watch(pool: Weak<WorkerPool>, replica: Arc<Replica>) {
    let (health_every, load_every) = match pool.upgrade() {
        Some(pool) => (pool.settings.health_interval, pool.settings.load_interval),
        None => return,
    };
    let mut health = tokio::time::interval(health_every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load = tokio::time::interval(load_every);
    load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = health.tick() => {
                let Some(pool) = pool.upgrade() else { return };
                pool.check(&replica).await;
            }
            _ = load.tick() => {
                let Some(pool) = pool.upgrade() else { return };
                if lock(&replica.state).healthy() {
                    pool.poll_load(&replica).await;
                }
            }
        }
    }
}

async fn probe(channel: &Channel, timeout: Duration) -> Result<(), String> {
    let mut client = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, client.check(request)).await {
        Err(_) => Err(format!("no answer to a health check within {timeout:?}")),
        Ok(Err(status)) => Err(format!("health check failed: {}", status.message())),
        Ok(Ok(response)) => match response.into_inner().status() {
            ProbeStatus::Serving => Ok(()),
            other => Err(format!("worker reports {}", other.as_str_name())),
        },
    }
}

fn routable(state: &ReplicaState, model: &str, now: Instant) -> bool {
    state.healthy()
        && !state.draining
        && state.model.as_ref().is_some_and(|m| m.name() == model)
        && state.breaker.allows(now)
}

fn replica_source(replica: &Replica) -> &'static str {
    lock(&replica.state).source.label()
}

fn describe(replica: &Replica, now: Instant) -> admin::Replica {
    let state = lock(&replica.state);
    let load = state.load.unwrap_or_default();
    admin::Replica {
        address: replica.address.clone(),
        source: state.source.label().to_owned(),
        healthy: state.healthy(),
        draining: state.draining,
        breaker: state.breaker.state(now).as_str().to_owned(),
        model: state
            .model
            .as_ref()
            .map(|m| m.name().to_owned())
            .unwrap_or_default(),
        in_flight: u32::try_from(replica.in_flight.load(Ordering::Acquire)).unwrap_or(u32::MAX),
        running: load.running,
        waiting: load.waiting,
        kv_blocks_free: load.kv_blocks_free,
        kv_blocks_total: load.kv_blocks_total,
        last_error: state.last_error.clone(),
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// data (flags, counters, `Arc`s); the data is still usable.
fn lock(state: &Mutex<ReplicaState>) -> MutexGuard<'_, ReplicaState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock_task(task: &Mutex<Option<JoinHandle<()>>>) -> MutexGuard<'_, Option<JoinHandle<()>>> {
    task.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Replicas = BTreeMap<String, Arc<Replica>>;

fn read(replicas: &RwLock<Replicas>) -> std::sync::RwLockReadGuard<'_, Replicas> {
    replicas
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(replicas: &RwLock<Replicas>) -> std::sync::RwLockWriteGuard<'_, Replicas> {
    replicas
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    #[test]
    fn probes_need_their_thresholds_in_a_row() {
        let mut p = Probes::default();
        assert_eq!(p.record(true, 2, 3), None);
        assert_eq!(p.record(true, 2, 3), Some(true), "two successes");
        assert_eq!(p.record(false, 2, 3), None);
        assert_eq!(p.record(false, 2, 3), None);
        assert_eq!(p.record(true, 2, 3), None, "a success breaks the run");
        for _ in 0..2 {
            assert_eq!(p.record(false, 2, 3), None);
        }
        assert_eq!(p.record(false, 2, 3), Some(false), "three failures");
        assert!(!p.healthy);
    }

    #[test]
    fn ejection_is_immediate_and_probes_reinstate() {
        let mut p = Probes::default();
        p.record(true, 1, 3);
        assert!(p.eject());
        assert!(!p.healthy);
        assert!(!p.eject(), "already out");
        assert_eq!(p.record(true, 1, 3), Some(true));
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
