//! The gateway in front of several replicas, all real processes on
//! 127.0.0.1 port 0 (the DNS test runs the gateway in-process, to give it a
//! resolver whose answer the test changes): a replica killed under load,
//! prefix-aware and least-load routing measured by the workers' own
//! counters, DNS discovery, the admin API, SIGTERM drains, the concurrency
//! limit and deadlines.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aquila_gateway::discovery::{Resolved, Resolver};
use aquila_proto::admin::v1::admin_client::AdminClient;
use aquila_proto::admin::v1::{
    AddReplicaRequest, DrainReplicaRequest, ListReplicasRequest, Replica,
};
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{FinishReason, GenerateRequest};
use aquila_proto::worker::v1::worker_client::WorkerClient;
use aquila_proto::worker::v1::{GetLoadRequest, Load};
use aquila_worker::model::WeightDtype;
use aquila_worker::presets::{GgufType, WeightFormat};
use common::{Proc, eventually, spawn, spawn_worker, tiny_model, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

/// These tests measure timing-sensitive spreads and rates on 2 cores: one
/// at a time, so that none runs beside another's load.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn request(ids: &[u32], max_new_tokens: u32) -> GenerateRequest {
    common::ids_request(ids, common::greedy_params(max_new_tokens))
}

/// `n` workers on the tiny model, one compute thread each, SERVING.
async fn workers(dir: &std::path::Path, n: usize, extra: &[&str]) -> Vec<Proc> {
    let mut flags = vec!["--threads", "1"];
    flags.extend_from_slice(extra);
    let workers: Vec<Proc> = (0..n).map(|_| spawn_worker(dir, &flags)).collect();
    for w in &workers {
        wait_serving(&w.url()).await;
    }
    workers
}

/// A gateway with an admin listener in front of `workers`.
fn gateway(workers: &[&Proc], flags: &[&str]) -> Proc {
    let mut args = vec![
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    for w in workers {
        args.extend(["--worker", &w.addr]);
    }
    args.extend_from_slice(flags);
    spawn(&args, "gateway")
}

async fn client(url: &str) -> GenerationClient<Channel> {
    wait_serving(url).await;
    GenerationClient::connect(url.to_string())
        .await
        .expect("connect")
}

async fn admin(gateway: &Proc) -> AdminClient<Channel> {
    AdminClient::connect(gateway.url_of("gateway admin"))
        .await
        .expect("connect to the admin API")
}

async fn replicas(admin: &mut AdminClient<Channel>) -> Vec<Replica> {
    admin
        .list_replicas(ListReplicasRequest {})
        .await
        .expect("ListReplicas")
        .into_inner()
        .replicas
}

async fn load(worker: &Proc) -> Load {
    let mut c = WorkerClient::connect(worker.url()).await.expect("connect");
    c.get_load(GetLoadRequest {})
        .await
        .expect("GetLoad")
        .into_inner()
}

/// What one streamed request saw.
#[derive(Debug)]
struct Outcome {
    prompt: usize,
    tokens: Vec<u32>,
    error: Option<tonic::Status>,
}

/// Streams `req`, collecting tokens until the end or an error; `started`
/// is told when the first tokens arrive.
async fn stream(
    mut client: GenerationClient<Channel>,
    req: GenerateRequest,
    prompt: usize,
    started: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Outcome {
    let mut tokens = Vec::new();
    let mut events = match client.generate_stream(req).await {
        Ok(r) => r.into_inner(),
        Err(error) => {
            return Outcome {
                prompt,
                tokens,
                error: Some(error),
            };
        }
    };
    loop {
        match events.message().await {
            Ok(Some(m)) => {
                if tokens.is_empty()
                    && let Some(s) = &started
                {
                    let _ = s.send(());
                }
                tokens.extend(m.token_ids);
            }
            Ok(None) => {
                return Outcome {
                    prompt,
                    tokens,
                    error: None,
                };
            }
            Err(error) => {
                return Outcome {
                    prompt,
                    tokens,
                    error: Some(error),
                };
            }
        }
    }
}

/// Starts `n` streams of `request(PROMPTS[prompt], len)` and returns once
/// every one has received tokens.
async fn streaming(
    c: &GenerationClient<Channel>,
    n: usize,
    prompt: usize,
    len: u32,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks = (0..n)
        .map(|_| {
            let req = request(PROMPTS[prompt], len);
            tokio::spawn(stream(c.clone(), req, prompt, Some(tx.clone())))
        })
        .collect();
    for _ in 0..n {
        rx.recv().await.expect("a stream started");
    }
    tasks
}

/// Every stream of `tasks` ended normally with `tokens` tokens.
async fn all_complete(tasks: Vec<tokio::task::JoinHandle<Outcome>>, tokens: usize) {
    for t in tasks {
        let o = t.await.unwrap();
        assert!(o.error.is_none(), "{:?}", o.error);
        assert_eq!(o.tokens.len(), tokens);
    }
}

const PROMPTS: [&[u32]; 3] = [
    &[84, 104, 101, 32, 113, 117, 105, 99, 107],
    &[10, 20, 30, 40, 50],
    &[7, 7, 7, 300, 301, 302, 5],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_only_the_streams_it_served_and_comes_back() {
    let _serial = SERIAL.lock().await;
    const GEN: u32 = 200;
    let interval = Duration::from_millis(500);
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let mut ws = workers(dir.path(), 3, &[]).await;
    let g = gateway(
        &ws.iter().collect::<Vec<_>>(),
        &["--health-interval-ms", "500", "--routing", "round-robin"],
    );
    let c = client(&g.url()).await;
    let want: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| common::local_greedy(dir.path(), WeightDtype::F32, p, GEN as usize).1)
        .collect();

    // 36 requests, 12 at a time; each client sends its next request as
    // soon as the previous ends, so requests keep arriving after the kill.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for client_no in 0..12 {
        let c = c.clone();
        let started = started_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for round in 0..3 {
                let prompt = (client_no + round) % PROMPTS.len();
                let req = request(PROMPTS[prompt], GEN);
                outcomes.push(stream(c.clone(), req, prompt, Some(started.clone())).await);
            }
            outcomes
        }));
    }
    drop(started_tx);
    // Kill the second replica once it is streaming.
    for _ in 0..6 {
        started_rx.recv().await.expect("a stream started");
    }
    eventually(Duration::from_secs(30), "replica 1 running", || async {
        load(&ws[1]).await.running > 0
    })
    .await;
    let killed_addr = ws[1].addr.clone();
    ws[1].kill();

    let all = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("no request hangs");
    let outcomes: Vec<Outcome> = all.into_iter().flat_map(|r| r.unwrap()).collect();
    assert_eq!(outcomes.len(), 36);
    let mut cut = 0;
    for o in &outcomes {
        match &o.error {
            None => assert_eq!(o.tokens, want[o.prompt], "a completed request is exact"),
            Some(status) => {
                cut += 1;
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    !o.tokens.is_empty(),
                    "a request that had not streamed must be retried, not failed: {status:?}"
                );
                assert!(status.message().contains("incomplete"), "{status:?}");
                assert_eq!(o.tokens[..], want[o.prompt][..o.tokens.len()]);
            }
        }
    }
    assert!(cut > 0, "the killed replica was streaming");
    assert!(cut <= 12, "only streams in flight at the kill fail: {cut}");

    // The replica, restarted on its port, is back within one health interval.
    let a = admin(&g).await;
    let url = format!("http://{killed_addr}");
    let restarted = spawn_worker(dir.path(), &["--threads", "1", "--listen", &killed_addr]);
    wait_serving(&restarted.url()).await;
    let ready = Instant::now();
    eventually(interval * 4, "the restarted replica healthy", || {
        let mut a = a.clone();
        let url = url.clone();
        async move {
            replicas(&mut a)
                .await
                .iter()
                .any(|r| r.address == url && r.healthy)
        }
    })
    .await;
    let back = ready.elapsed();
    assert!(
        back <= interval + Duration::from_millis(250),
        "back in rotation after {back:?}, the interval is {interval:?}"
    );
    // And it takes requests again.
    for i in 0..3 {
        let mut c = c.clone();
        let r = c.generate(request(PROMPTS[i], 4)).await.unwrap();
        assert_eq!(r.into_inner().token_ids, want[i][..4]);
    }
    assert!(load(&restarted).await.requests_finished_total >= 1);
}

/// What the workers' counters say about some requests.
#[derive(Debug, Default)]
struct CacheUse {
    hit_tokens: u64,
    query_tokens: u64,
    /// Requests each replica finished.
    served: Vec<u64>,
}

impl CacheUse {
    fn hit_rate(&self) -> f64 {
        self.hit_tokens as f64 / self.query_tokens as f64
    }
}

/// Adds what `run`'s requests did to the workers' prefix caches to `into`.
async fn count_cache_use(
    ws: &[Proc],
    into: &mut CacheUse,
    run: impl std::future::Future<Output = ()>,
) {
    let before: Vec<Load> = futures::future::join_all(ws.iter().map(load)).await;
    run.await;
    let after: Vec<Load> = futures::future::join_all(ws.iter().map(load)).await;
    into.served.resize(ws.len(), 0);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        into.hit_tokens += a.prefix_cache_hit_tokens_total - b.prefix_cache_hit_tokens_total;
        into.query_tokens += a.prefix_cache_query_tokens_total - b.prefix_cache_query_tokens_total;
        into.served[i] += a.requests_finished_total - b.requests_finished_total;
    }
}

/// 8 shared 64-token prefixes (4 KV blocks), 3 requests each with its own
/// 8-token suffix, in a shuffled order, 16 at a time.
async fn shared_prefix_load(c: &GenerationClient<Channel>, salt: u32) {
    let mut order: Vec<(u32, u32)> = (0..8).flat_map(|p| (0..3).map(move |i| (p, i))).collect();
    let mut x = 12345 + u64::from(salt);
    for i in (1..order.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let order = Arc::new(Mutex::new(order));
    let tasks = (0..16).map(|_| {
        let (mut c, order) = (c.clone(), order.clone());
        tokio::spawn(async move {
            loop {
                let Some((p, i)) = order.lock().unwrap().pop() else {
                    return;
                };
                let mut prompt: Vec<u32> = (0..64)
                    .map(|k| (salt * 97 + p * 31 + k * 7) % 300 + 10)
                    .collect();
                prompt.extend((0..8).map(|k| (p * 13 + i * 5 + k) % 300 + 10));
                let r = c.generate(request(&prompt, 2)).await.unwrap().into_inner();
                assert_eq!(r.token_ids.len(), 2);
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_routing_doubles_the_prefix_cache_hit_rate_of_round_robin() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let ws = workers(dir.path(), 4, &[]).await;
    let refs: Vec<&Proc> = ws.iter().collect();
    let rr = gateway(&refs, &["--routing", "round-robin"]);
    let pa = gateway(
        &refs,
        &["--routing", "prefix-aware", "--prefix-tokens", "64"],
    );
    let (rr_c, pa_c) = (client(&rr.url()).await, client(&pa.url()).await);

    // Three rounds each, alternated, every run with prefixes of its own
    // (salts 1 to 6 give 48 distinct ones), so no run finds another's blocks.
    let (mut rr_use, mut pa_use) = (CacheUse::default(), CacheUse::default());
    for round in 0..3 {
        count_cache_use(&ws, &mut rr_use, shared_prefix_load(&rr_c, 2 * round + 1)).await;
        count_cache_use(&ws, &mut pa_use, shared_prefix_load(&pa_c, 2 * round + 2)).await;
    }
    let (rr_rate, pa_rate) = (rr_use.hit_rate(), pa_use.hit_rate());
    let served = &pa_use.served;
    eprintln!(
        "prefix cache hit rate: round robin {rr_rate:.3}, prefix-aware {pa_rate:.3}; prefix-aware served {served:?}"
    );
    assert!(pa_rate >= 2.0 * rr_rate, "{pa_rate:.3} vs {rr_rate:.3}");
    let mean = served.iter().sum::<u64>() as f64 / served.len() as f64;
    assert!(
        served.iter().all(|&s| s as f64 <= 2.0 * mean),
        "no replica above 2x the mean: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_keeps_running_counts_within_one() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let ws = workers(dir.path(), 3, &[]).await;
    let g = gateway(&ws.iter().collect::<Vec<_>>(), &["--routing", "least-load"]);
    let c = client(&g.url()).await;
    // 9 closed-loop clients, outputs of 20 to 160 tokens: uneven lengths
    // that round robin would pile up unevenly.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..9u32)
        .map(|i| {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = n.wrapping_mul(1103515245).wrapping_add(12345);
                    let len = 20 + (n >> 16) % 141;
                    let r = c.generate(request(PROMPTS[(i % 3) as usize], len)).await;
                    assert_eq!(r.unwrap().into_inner().token_ids.len(), len as usize);
                }
            })
        })
        .collect();
    let mut clients: Vec<WorkerClient<Channel>> = Vec::new();
    for w in &ws {
        clients.push(WorkerClient::connect(w.url()).await.unwrap());
    }
    // Steady state: every client has a request in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut spreads = HashMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let loads = futures::future::join_all(clients.iter().map(|c| {
            let mut c = c.clone();
            async move { c.get_load(GetLoadRequest {}).await.unwrap().into_inner() }
        }))
        .await;
        let counts: Vec<u32> = loads.iter().map(|l| l.running + l.waiting).collect();
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        *spreads.entry(spread).or_insert(0u32) += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let samples: u32 = spreads.values().sum();
    let within_one: u32 = spreads
        .iter()
        .filter(|(s, _)| **s <= 1)
        .map(|(_, n)| n)
        .sum();
    eprintln!("spread of running counts over {samples} samples: {spreads:?}");
    // A sample can fall between a request's end and its client's next
    // request, or read the three workers a moment apart.
    assert!(
        within_one as f64 >= 0.9 * samples as f64,
        "within 1 in {within_one} of {samples} samples: {spreads:?}"
    );
}

/// A resolver whose answer the test sets.
#[derive(Default)]
struct TestResolver {
    answer: Mutex<Vec<SocketAddr>>,
}

impl Resolver for TestResolver {
    fn resolve<'a>(&'a self, host: &'a str, _port: u16) -> Resolved<'a> {
        assert_eq!(host, "workers.test");
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move { Ok(answer) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_answer_without_a_restart() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let ws = workers(dir.path(), 2, &[]).await;
    let addr = |w: &Proc| -> SocketAddr { w.addr.parse().unwrap() };
    let resolver = Arc::new(TestResolver::default());
    *resolver.answer.lock().unwrap() = vec![addr(&ws[0])];

    let mut args = aquila_gateway::GatewayArgs::with_workers(vec![]);
    args.discover = vec!["dns:///workers.test:1".into()];
    args.discover_interval_ms = 50;
    args.health_interval_ms = 50;
    let config = args.into_config().unwrap();
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (url, admin_url) = (
        format!("http://{}", public.local_addr().unwrap()),
        format!("http://{}", admin_l.local_addr().unwrap()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = aquila_gateway::Listeners {
        public,
        admin: Some(admin_l),
        http: None,
    };
    let server = tokio::spawn(aquila_gateway::serve(
        listeners,
        config,
        async move {
            let _ = stop_rx.await;
        },
        resolver.clone(),
    ));
    let mut c = client(&url).await;
    let mut a = AdminClient::connect(admin_url).await.unwrap();
    let listed = |a: &AdminClient<Channel>| {
        let mut a = a.clone();
        async move {
            let mut r: Vec<(String, bool, bool)> = replicas(&mut a)
                .await
                .into_iter()
                .map(|r| (r.address, r.healthy, r.draining))
                .collect();
            r.sort();
            r
        }
    };
    let (u0, u1) = (ws[0].url(), ws[1].url());
    assert_eq!(listed(&a).await, [(u0.clone(), true, false)]);
    assert_eq!(replicas(&mut a).await[0].source, "dns");

    // The name gains an address: it joins and serves.
    *resolver.answer.lock().unwrap() = vec![addr(&ws[0]), addr(&ws[1])];
    eventually(Duration::from_secs(10), "two healthy replicas", || {
        let a = a.clone();
        let want = {
            let mut w = vec![(u0.clone(), true, false), (u1.clone(), true, false)];
            w.sort();
            w
        };
        async move { listed(&a).await == want }
    })
    .await;

    // It loses one: that one leaves once idle, and requests go to the other.
    *resolver.answer.lock().unwrap() = vec![addr(&ws[1])];
    eventually(Duration::from_secs(10), "only the second replica", || {
        let a = a.clone();
        let want = vec![(u1.clone(), true, false)];
        async move { listed(&a).await == want }
    })
    .await;
    let before = load(&ws[0]).await.requests_finished_total;
    for _ in 0..4 {
        c.generate(request(PROMPTS[0], 2)).await.unwrap();
    }
    assert_eq!(load(&ws[0]).await.requests_finished_total, before);

    // An empty or failed answer keeps what there is.
    resolver.answer.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(listed(&a).await, [(u1.clone(), true, false)]);

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_replica_finishes_its_requests_and_leaves() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let ws = workers(dir.path(), 2, &[]).await;
    let g = gateway(
        &ws.iter().collect::<Vec<_>>(),
        &["--routing", "round-robin"],
    );
    let c = client(&g.url()).await;
    let mut a = admin(&g).await;
    // A long request on each replica.
    let long: Vec<_> = (0..2)
        .map(|_| tokio::spawn(stream(c.clone(), request(PROMPTS[0], 600), 0, None)))
        .collect();
    eventually(Duration::from_secs(30), "both replicas busy", || async {
        load(&ws[0]).await.running == 1 && load(&ws[1]).await.running == 1
    })
    .await;
    let drained = a
        .drain_replica(DrainReplicaRequest {
            address: ws[0].addr.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    assert_eq!(drained.in_flight, 1);
    // New requests avoid it while its request runs on.
    let before = load(&ws[0]).await.requests_finished_total;
    for _ in 0..4 {
        c.clone().generate(request(PROMPTS[1], 2)).await.unwrap();
    }
    assert_eq!(load(&ws[0]).await.requests_finished_total, before);
    all_complete(long, 600).await;
    // Its last request over, it is gone.
    let listed = replicas(&mut a).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].address, ws[1].url());
    let unknown = a
        .drain_replica(DrainReplicaRequest {
            address: "127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Added back through the admin API, it serves again.
    let added = a
        .add_replica(AddReplicaRequest {
            address: ws[0].addr.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((added.source.as_str(), added.draining), ("admin", false));
    eventually(Duration::from_secs(10), "the added replica healthy", || {
        let mut a = a.clone();
        let url = ws[0].url();
        async move {
            replicas(&mut a)
                .await
                .iter()
                .any(|r| r.address == url && r.healthy)
        }
    })
    .await;
    let before = load(&ws[0]).await.requests_finished_total;
    for _ in 0..4 {
        c.clone().generate(request(PROMPTS[1], 2)).await.unwrap();
    }
    assert_eq!(load(&ws[0]).await.requests_finished_total, before + 2);
    let bad = a
        .add_replica(AddReplicaRequest {
            address: "not a uri".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("not a uri"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_gateway_and_the_worker() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let mut ws = workers(dir.path(), 1, &[]).await;
    let mut g = gateway(&[&ws[0]], &[]);
    let c = client(&g.url()).await;

    // The gateway: streams in flight finish; then it exits 0.
    let running = streaming(&c, 3, 1, 400).await;
    let exited = tokio::task::spawn_blocking(move || {
        let status = g.terminate();
        (g, status)
    });
    // Meanwhile a new request is refused (UNAVAILABLE while draining, or
    // the connection once the gateway is gone).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = c
        .clone()
        .generate(request(PROMPTS[0], 2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    all_complete(running, 400).await;
    let (_g, status) = exited.await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");

    // The worker: the same, seen through a new gateway.
    let g2 = gateway(&[&ws[0]], &[]);
    let c2 = client(&g2.url()).await;
    let running = streaming(&c2, 2, 2, 400).await;
    let mut w = ws.remove(0);
    let worker_url = w.url();
    let exited = tokio::task::spawn_blocking(move || w.terminate());
    eventually(Duration::from_secs(10), "the worker NOT_SERVING", || {
        let url = worker_url.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect_lazy();
            let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            !r.is_ok_and(|r| r.into_inner().status == 1)
        }
    })
    .await;
    let refused = c2
        .clone()
        .generate(request(PROMPTS[0], 2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    all_complete(running, 400).await;
    let status = exited.await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_refuses_at_once_and_deadlines_reach_the_worker() {
    let _serial = SERIAL.lock().await;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let ws = workers(dir.path(), 1, &[]).await;
    let g = gateway(&[&ws[0]], &["--max-concurrent-requests", "4"]);
    let c = client(&g.url()).await;

    // 10 at once: 4 run, 6 are refused at once naming the limit.
    let long = streaming(&c, 4, 0, 300).await;
    for _ in 0..6 {
        let start = Instant::now();
        let e = c
            .clone()
            .generate(request(PROMPTS[1], 2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("limit of 4"), "{}", e.message());
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    all_complete(long, 300).await;
    // The slots are free again.
    c.clone().generate(request(PROMPTS[1], 2)).await.unwrap();

    // A deadline (set as the header, so only the servers enforce it) ends
    // a long generation with DEADLINE_EXCEEDED and frees it on the worker.
    let mut req = tonic::Request::new(request(PROMPTS[0], 1000));
    req.metadata_mut()
        .insert("grpc-timeout", "150m".parse().unwrap());
    let start = Instant::now();
    let mut s = c.clone().generate_stream(req).await.unwrap().into_inner();
    let mut tokens = 0;
    let status = loop {
        match s.message().await {
            Ok(Some(m)) => tokens += m.token_ids.len(),
            Ok(None) => panic!("finished {tokens} tokens within the deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(tokens > 0 && tokens < 1000);
    assert!(start.elapsed() < Duration::from_secs(2));
    eventually(Duration::from_secs(5), "the worker idle", || async {
        let l = load(&ws[0]).await;
        l.running + l.waiting == 0 && l.kv_blocks_free == l.kv_blocks_total
    })
    .await;
    let finished = FinishReason::Length;
    let r = c.clone().generate(request(PROMPTS[0], 3)).await.unwrap();
    assert_eq!(r.into_inner().finish_reason(), finished);
}
