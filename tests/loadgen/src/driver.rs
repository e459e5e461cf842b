//! Sends the requests of a run: a warm-up, then the measured phase, in a
//! closed or an open (Poisson) loop. Every phase ends by itself: when its
//! request count is reached or at the run's deadline, whichever comes first;
//! at the deadline, requests still in flight are abandoned.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::config::{Arrival, LoadgenConfig};
use crate::dist::poisson_gap;
use crate::error::LoadgenError;
use crate::report::Report;
use crate::request::{self, Outcome};
use crate::workload::{self, ARRIVAL_STREAM};

/// In-flight streams per HTTP/2 connection; servers commonly cap concurrent
/// streams per connection (often at 100-200), so more load needs more connections.
const STREAMS_PER_CONNECTION: usize = 64;
const MAX_CONNECTIONS: usize = 32;
/// Connections for an uncapped open loop, whose in-flight count is unknown.
const OPEN_LOOP_CONNECTIONS: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the load described by `config` against its gateway and reports.
/// Returns an error only if the gateway cannot be reached at all; failed
/// requests are counted in the report. Takes at most `--duration-s` after
/// connecting.
pub async fn run(config: LoadgenConfig) -> Result<Report, LoadgenError> {
    let clients = connect(&config).await?;
    let deadline = Instant::now() + config.duration;
    let config = Arc::new(config);
    let warmup = if config.warmup_requests > 0 {
        Some(run_phase(&config, &clients, true, deadline).await)
    } else {
        None
    };
    let start = Instant::now();
    let measured = run_phase(&config, &clients, false, deadline).await;
    let wall = start.elapsed();
    Ok(Report::new(&config, wall, warmup.as_ref(), &measured))
}

/// What one phase sent and got back.
pub(crate) struct Phase {
    pub outcomes: Vec<Outcome>,
    /// Requests sent; those without an outcome were cut off by the deadline.
    pub issued: u64,
    pub hit_deadline: bool,
}

async fn connect(config: &LoadgenConfig) -> Result<Vec<Channel>, LoadgenError> {
    let peak = match config.arrival {
        Arrival::Closed { concurrency } => Some(concurrency),
        Arrival::Open {
            max_concurrency, ..
        } => max_concurrency,
    };
    let n = peak.map_or(OPEN_LOOP_CONNECTIONS, |p| {
        p.div_ceil(STREAMS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS)
    });
    let fail = |source| LoadgenError::Connect {
        addr: config.gateway.clone(),
        source,
    };
    let endpoint = config.endpoint.clone().connect_timeout(CONNECT_TIMEOUT);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(endpoint.connect().await.map_err(fail)?);
    }
    Ok(clients)
}

/// Drives one phase and collects outcomes until every request is answered
/// or `deadline` passes.
async fn run_phase(
    config: &Arc<LoadgenConfig>,
    clients: &[Channel],
    warmup: bool,
    deadline: Instant,
) -> Phase {
    // Bounded: senders wait if the collector falls behind, which it only
    // could for a moment (it does nothing but push).
    let (tx, mut rx) = mpsc::channel(1024);
    let issued = Arc::new(AtomicU64::new(0));
    let sender = Sender {
        config: config.clone(),
        clients: clients.to_vec(),
        warmup,
        tx,
        issued: issued.clone(),
    };
    let driver = tokio::spawn(sender.drive(deadline));
    let mut outcomes = Vec::new();
    let hit_deadline = loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => outcomes.push(o),
                // Every sender is gone: all requests are answered.
                None => break false,
            },
            _ = tokio::time::sleep_until(deadline) => break true,
        }
    };
    if hit_deadline {
        // Dropping the driver's JoinSet aborts the requests still in flight.
        driver.abort();
        let _ = driver.await;
        while let Ok(o) = rx.try_recv() {
            outcomes.push(o);
        }
    }
    Phase {
        outcomes,
        issued: issued.load(Ordering::Relaxed),
        hit_deadline,
    }
}

/// What every request task of a phase shares.
#[derive(Clone)]
struct Sender {
    config: Arc<LoadgenConfig>,
    /// Never empty; request `i` uses connection `i % len`.
    clients: Vec<Channel>,
    warmup: bool,
    tx: mpsc::Sender<Outcome>,
    issued: Arc<AtomicU64>,
}

impl Sender {
    async fn drive(self, deadline: Instant) {
        let c = &self.config;
        let total = if self.warmup {
            Some(c.warmup_requests)
        } else {
            c.num_requests
        };
        let mut tasks = JoinSet::new();
        match c.arrival {
            Arrival::Open {
                rate,
                max_concurrency,
            } if !self.warmup => {
                self.open_loop(&mut tasks, rate, max_concurrency, total, deadline)
                    .await
            }
            // Warm-up is always a closed loop: it only has to get the server hot.
            Arrival::Open {
                max_concurrency, ..
            } => self.closed_loop(&mut tasks, max_concurrency.unwrap_or(1), total),
            Arrival::Closed { concurrency } => self.closed_loop(&mut tasks, concurrency, total),
        }
        while tasks.join_next().await.is_some() {}
    }

    /// `concurrency` clients share one request counter; each sends its next
    /// request when the previous one is answered.
    fn closed_loop(&self, tasks: &mut JoinSet<()>, concurrency: usize, total: Option<u64>) {
        let next = Arc::new(AtomicU64::new(0));
        for _ in 0..concurrency {
            let s = self.clone();
            let next = next.clone();
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if total.is_some_and(|n| i >= n) {
                        break;
                    }
                    if s.tx.send(s.one(i).await).await.is_err() {
                        break;
                    }
                }
            });
        }
    }

    /// Poisson arrivals on a fixed schedule (the first at once): a late
    /// arrival, held back by `max_concurrency`, does not push later ones back.
    async fn open_loop(
        &self,
        tasks: &mut JoinSet<()>,
        rate: f64,
        max_concurrency: Option<usize>,
        total: Option<u64>,
        deadline: Instant,
    ) {
        let mut gaps = workload::rng(self.config.seed, ARRIVAL_STREAM);
        let slots = max_concurrency.map(|m| Arc::new(Semaphore::new(m)));
        let start = Instant::now();
        let mut at = 0.0f64;
        for i in 0.. {
            if total.is_some_and(|n| i >= n) {
                break;
            }
            let Some(when) = Duration::try_from_secs_f64(at)
                .ok()
                .and_then(|d| start.checked_add(d))
                .filter(|&w| w < deadline)
            else {
                break;
            };
            tokio::time::sleep_until(when).await;
            let permit = match &slots {
                Some(s) => match s.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                None => None,
            };
            let s = self.clone();
            tasks.spawn(async move {
                let outcome = s.one(i).await;
                drop(permit);
                let _ = s.tx.send(outcome).await;
            });
            // Reap finished tasks so the set holds only what is in flight.
            while tasks.try_join_next().is_some() {}
            at += poisson_gap(rate, &mut gaps);
        }
    }

    async fn one(&self, i: u64) -> Outcome {
        self.issued.fetch_add(1, Ordering::Relaxed);
        let spec = self
            .config
            .workload
            .request(self.config.seed, i, self.warmup);
        let client = self.clients[(i % self.clients.len() as u64) as usize].clone();
        request::send(client, &self.config, spec).await
    }
}
