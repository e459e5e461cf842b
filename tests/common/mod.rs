//! The one place of the end-to-end tests' support: tiny models written from
//! a seed, real `aquila` processes on 127.0.0.1 port 0 and the stacks built
//! of them, waited for by health checks or [`eventually`] (never by
//! sleeping), and the one [`skip`] rule for what a machine lacks. Beside it:
//! the HTTP client (`http`), the `/metrics` reader (`prometheus`), the
//! f64 reference model (`f64_llama`), and for `deploy/` the Dockerfile
//! reader (`dockerfile`), the chart tools (`chart`) and the pod emulator
//! (`pods`). Each test file is its own crate and uses only part of it.
#![allow(dead_code)]

pub mod chart;
pub mod dockerfile;
pub mod f64_llama;
pub mod http;
pub mod pods;
pub mod prometheus;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_worker::comm::SingleRank;
use aquila_worker::loader::{self, LoadOptions};
use aquila_worker::model::{Llama, LogitsFor, SingleSeq, WeightDtype};
use aquila_worker::presets::{GgufType, Preset, WeightFormat};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Greedy sampling of exactly `max_new_tokens` (EOS ignored).
pub fn greedy_params(max_new_tokens: u32) -> aquila_proto::v1::SamplingParams {
    aquila_proto::v1::SamplingParams {
        max_new_tokens: Some(max_new_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

/// A public-API request for the token ids `ids`.
pub fn ids_request(
    ids: &[u32],
    params: aquila_proto::v1::SamplingParams,
) -> aquila_proto::v1::GenerateRequest {
    aquila_proto::v1::GenerateRequest {
        prompt_token_ids: ids.to_vec(),
        params: Some(params),
        ..Default::default()
    }
}

/// The tiny preset (seed 7) written in `format` into a fresh temp folder.
pub fn tiny_model(format: WeightFormat, gguf: GgufType) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    aquila_worker::presets::make(Preset::Tiny, dir.path(), 7, format, 2, gguf)
        .expect("make tiny model");
    dir
}

/// The path a worker is given for a model written by `tiny_model`.
pub fn model_path(dir: &Path, format: WeightFormat) -> std::path::PathBuf {
    match format {
        WeightFormat::Gguf => dir.join("model.gguf"),
        _ => dir.to_path_buf(),
    }
}

/// A running `aquila` process, killed when dropped.
pub struct Proc {
    pub child: Child,
    /// "127.0.0.1:PORT" as the process printed it.
    pub addr: String,
    /// Other "aquila WHAT listening on ADDR" lines printed before it, as (WHAT, ADDR).
    pub others: Vec<(String, String)>,
}

impl Proc {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of another listener the process printed (e.g. "gateway admin").
    pub fn url_of(&self, what: &str) -> String {
        format!("http://{}", self.addr_of(what))
    }

    /// "127.0.0.1:PORT" of another listener the process printed.
    pub fn addr_of(&self, what: &str) -> &str {
        let (_, addr) = self
            .others
            .iter()
            .find(|(w, _)| w == what)
            .unwrap_or_else(|| panic!("no {what} listener in {:?}", self.others));
        addr
    }

    /// Sends SIGTERM (a graceful stop) and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.child.wait().expect("wait for the process")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `aquila ARGS` and waits for its "aquila WHAT listening on ADDR" line.
pub fn spawn(args: &[&str], what: &str) -> Proc {
    spawn_with_log(args, what, "warn", Stdio::inherit())
}

/// As `spawn`, logging at `level` (a `RUST_LOG` value) into `log`.
pub fn spawn_with_log(args: &[&str], what: &str, level: &str, log: Stdio) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aquila"));
    cmd.args(args);
    spawn_command(cmd, what, level, log)
}

/// Starts `cmd` (which runs aquila, perhaps through a wrapper) and waits for
/// its "aquila WHAT listening on ADDR" line.
pub fn spawn_command(mut cmd: Command, what: &str, level: &str, log: Stdio) -> Proc {
    let args = format!("{cmd:?}");
    let mut child = cmd
        .env("RUST_LOG", level)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn aquila");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let prefix = format!("aquila {what} listening on ");
    let mut others = Vec::new();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.strip_prefix(&prefix) {
                    break a.trim().to_string();
                }
                let other = line
                    .strip_prefix("aquila ")
                    .and_then(|rest| rest.split_once(" listening on "));
                if let Some((w, a)) = other {
                    others.push((w.to_string(), a.trim().to_string()));
                }
            }
            _ => panic!("{args} exited before listening"),
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc {
        child,
        addr,
        others,
    }
}

pub fn spawn_worker(model: &Path, extra: &[&str]) -> Proc {
    let model = model.to_str().expect("utf-8 path");
    let mut args = vec![
        "worker",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "2",
    ];
    args.extend_from_slice(extra);
    spawn(&args, "worker")
}

pub fn spawn_gateway(workers: &[&Proc], extra: &[&str]) -> Proc {
    let mut args = vec![
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--health-interval-ms",
        "100",
    ];
    for w in workers {
        args.push("--worker");
        args.push(&w.addr);
    }
    args.extend_from_slice(extra);
    spawn(&args, "gateway")
}

/// Polls `grpc.health.v1` on `url` until it reports SERVING (60 s at most).
pub async fn wait_serving(url: &str) {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string()).expect("a valid URL");
    wait_serving_at(&endpoint).await;
}

/// [`wait_serving`] for an endpoint with its own settings (TLS).
pub async fn wait_serving_at(endpoint: &tonic::transport::Endpoint) {
    let what = format!("{} SERVING", endpoint.uri());
    eventually(Duration::from_secs(60), &what, async || {
        is_serving(endpoint).await
    })
    .await;
}

/// What a check given to [`eventually`] answers: a `bool`, or a `Result`
/// whose `Ok` is the value waited for and whose `Err` is what was seen
/// instead (formatted only if the wait fails).
pub trait Check {
    type Done;
    type Seen: std::fmt::Debug;
    fn done(self) -> Result<Self::Done, Self::Seen>;
}

impl Check for bool {
    type Done = ();
    type Seen = bool;
    fn done(self) -> Result<(), bool> {
        if self { Ok(()) } else { Err(false) }
    }
}

impl<T, E: std::fmt::Debug> Check for Result<T, E> {
    type Done = T;
    type Seen = E;
    fn done(self) -> Result<T, E> {
        self
    }
}

/// Runs `check` every 10 ms until it holds and returns what it gave; fails
/// the test, naming `what` and the last answer, once `limit` has passed.
/// The one way the tests wait for a state they cannot be told about.
pub async fn eventually<C: Check>(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> C,
) -> C::Done {
    let start = Instant::now();
    loop {
        match check().await.done() {
            Ok(done) => return done,
            Err(seen) => assert!(
                start.elapsed() < limit,
                "not within {limit:?}: {what} (last seen: {seen:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One health check of `endpoint` (service ""): true only for SERVING; an
/// unreachable server or a check taking over 5 s is false.
pub async fn is_serving(endpoint: &tonic::transport::Endpoint) -> bool {
    let mut c = HealthClient::new(endpoint.connect_lazy());
    let check = c.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(r)) => r.into_inner().status == ServingStatus::Serving as i32,
        _ => false,
    }
}

/// Loads `path` in this process and decodes `n` greedy tokens after
/// `prompt`, with no server in between. Returns the first step's logits and
/// the tokens.
pub fn local_greedy(
    path: &Path,
    dtype: WeightDtype,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let opts = LoadOptions {
        dtype,
        name: None,
        tp_invariant: false,
    };
    let m = loader::load(path, &opts, Arc::new(SingleRank))
        .expect("load model")
        .model;
    greedy(&m, prompt, n)
}

/// Decodes `n` greedy tokens after `prompt` with `m` (a whole model, or one
/// rank's shard while the other ranks do the same). Returns the first
/// step's logits and the tokens.
pub fn greedy(m: &Llama, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut seq = SingleSeq::new(m, prompt.len() + n);
    let mut tokens = prompt.to_vec();
    let mut first = None;
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = seq.step(m, &tokens, LogitsFor::Last).expect("forward");
        let next = aquila_worker::sampler::argmax(&logits);
        first.get_or_insert(logits);
        out.push(next);
        tokens = vec![next];
    }
    (first.unwrap_or_default(), out)
}

/// A test, or a part of one, that cannot run here for `why`: under CI (`CI`
/// set) a failure, never a silent skip; otherwise a `SKIPPED: why` line,
/// written to stderr itself so that it shows past the harness's capture.
pub fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}: under CI nothing is skipped");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// The value of `var`, or None once [`skip`] has said that it is not set
/// (and that `set_by` sets it).
pub fn env_or_skip(var: &str, set_by: &str) -> Option<String> {
    let value = std::env::var(var).ok();
    if value.is_none() {
        skip(&format!("{var} is not set ({set_by} sets it)"));
    }
    value
}

/// The tiny model served by a worker process behind a gateway process, and
/// a client of the gateway, ready (SERVING).
pub struct Stack {
    pub dir: TempDir,
    pub worker: Proc,
    pub gateway: Proc,
    pub client: GenerationClient<Channel>,
}

pub async fn tiny_stack(worker_flags: &[&str]) -> Stack {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(dir.path(), worker_flags);
    let gateway = spawn_gateway(&[&worker], &[]);
    wait_serving(&gateway.url()).await;
    let client = GenerationClient::connect(gateway.url())
        .await
        .expect("connect to the gateway");
    Stack {
        dir,
        worker,
        gateway,
        client,
    }
}

/// The tiny model behind a gateway with the HTTP API on, ready (SERVING).
pub struct HttpStack {
    pub dir: TempDir,
    pub worker: Proc,
    pub gateway: Proc,
    /// "127.0.0.1:PORT" of the HTTP API.
    pub http: String,
}

pub async fn http_stack(gateway_flags: &[&str]) -> HttpStack {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(dir.path(), &[]);
    let mut flags = vec!["--http-listen", "127.0.0.1:0"];
    flags.extend_from_slice(gateway_flags);
    let gateway = spawn_gateway(&[&worker], &flags);
    wait_serving(&gateway.url()).await;
    let http = gateway.addr_of("gateway http").to_owned();
    HttpStack {
        dir,
        worker,
        gateway,
        http,
    }
}
