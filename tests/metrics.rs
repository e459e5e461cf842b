//! `/metrics` on real processes (127.0.0.1, port 0, the tiny model): after
//! a load-generator run of K requests, the gateway's counters and histogram
//! counts equal what the responses said (requests, usage, one TTFT and one
//! end-to-end observation each), the worker is idle again (no running
//! sequence, no KV block held), and the vLLM names appear with the same
//! values exactly when asked for. Also `aquila serve` (one endpoint, both
//! registries) and a `--tp 2` group (every rank serves its own metrics,
//! collective time observed on both).

mod common;

use std::time::Duration;

use aquila_loadgen::{LoadgenArgs, Report};
use aquila_worker::presets::{GgufType, WeightFormat};
use clap::Parser;
use common::prometheus::{Scrape, scrape};
use common::{eventually, spawn, spawn_gateway, spawn_worker, tiny_model, wait_serving};

async fn loadgen(url: &str, flags: &[&str]) -> Report {
    let mut args = vec!["bench", "--gateway", url, "--duration-s", "120"];
    args.extend_from_slice(flags);
    let config = LoadgenArgs::try_parse_from(args)
        .expect("flags parse")
        .into_config()
        .expect("valid config");
    let r = aquila_loadgen::run(config).await.expect("run");
    assert_eq!((r.failed, r.unfinished), (0, 0), "{:?}", r.failures);
    r
}

const K: u64 = 12;
const OUTPUT: u64 = 8;

/// A worker and a gateway with metrics on, K requests through the gateway;
/// checks every figure both sides can be held to, and returns the scrapes.
async fn run_and_check(flags: &[&str]) -> (Scrape, Scrape, String) {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let mut worker_flags = vec!["--metrics-listen", "127.0.0.1:0"];
    worker_flags.extend_from_slice(flags);
    let worker = spawn_worker(dir.path(), &worker_flags);
    let gateway = spawn_gateway(&[&worker], &worker_flags);
    wait_serving(&gateway.url()).await;
    let k = K.to_string();
    let output = OUTPUT.to_string();
    let r = loadgen(
        &gateway.url(),
        &[
            "--concurrency",
            "4",
            "--num-requests",
            &k,
            "--prompt-tokens",
            "uniform:8:32",
            "--output-tokens",
            &output,
            "--vocab-range",
            "100:300",
        ],
    )
    .await;
    assert_eq!(r.succeeded, K);
    assert_eq!(r.total_output_tokens, K * OUTPUT);

    let g = scrape(gateway.addr_of("gateway metrics")).await;
    let k = K as f64;
    let ok = [("method", "GenerateStream"), ("code", "OK")];
    assert_eq!(g.get("aquila_gateway_requests_total", &ok), k);
    assert_eq!(
        g.get("aquila_gateway_requests_total", &[]),
        k,
        "no other outcome"
    );
    // The token counters are the sums of the responses' usage.
    assert_eq!(
        g.get("aquila_gateway_prompt_tokens_total", &[]),
        r.total_prompt_tokens as f64
    );
    assert_eq!(
        g.get("aquila_gateway_generated_tokens_total", &[]),
        r.total_output_tokens as f64
    );
    for h in [
        "aquila_gateway_request_duration_seconds",
        "aquila_gateway_time_to_first_token_seconds",
        "aquila_gateway_queue_time_seconds",
    ] {
        assert_eq!(g.get(&format!("{h}_count"), &[]), k, "{h}");
        // Every observation is in the last (+Inf) bucket.
        assert_eq!(g.get(&format!("{h}_bucket"), &[("le", "+Inf")]), k, "{h}");
    }
    // One inter-token observation per token after each request's first.
    assert_eq!(
        g.get("aquila_gateway_inter_token_latency_seconds_count", &[]),
        (r.total_output_tokens - K) as f64
    );
    let ttft = g.get("aquila_gateway_time_to_first_token_seconds_sum", &[]);
    let e2e = g.get("aquila_gateway_request_duration_seconds_sum", &[]);
    assert!(0.0 < ttft && ttft <= e2e, "ttft {ttft} e2e {e2e}");
    assert_eq!(g.get("aquila_gateway_retries_total", &[]), 0.0);
    assert_eq!(g.get("aquila_gateway_requests_in_flight", &[]), 0.0);
    let replica = format!("http://{}", worker.addr);
    let this = [("replica", replica.as_str())];
    assert_eq!(g.get("aquila_gateway_replica_healthy", &this), 1.0);
    assert_eq!(g.get("aquila_gateway_replica_breaker_state", &this), 0.0);

    let w = scrape(worker.addr_of("worker metrics")).await;
    // The worker frees a sequence's blocks before its last event leaves.
    assert_eq!(w.get("aquila_worker_requests_running", &[]), 0.0);
    assert_eq!(w.get("aquila_worker_requests_waiting", &[]), 0.0);
    assert_eq!(w.get("aquila_worker_kv_blocks_used", &[]), 0.0);
    assert!(w.get("aquila_worker_kv_blocks_total", &[]) > 0.0);
    assert_eq!(
        w.get(
            "aquila_worker_requests_finished_total",
            &[("reason", "length")]
        ),
        k
    );
    assert_eq!(w.get("aquila_worker_requests_finished_total", &[]), k);
    assert_eq!(
        w.get("aquila_worker_prompt_tokens_total", &[]),
        r.total_prompt_tokens as f64
    );
    assert_eq!(
        w.get("aquila_worker_generated_tokens_total", &[]),
        r.total_output_tokens as f64
    );
    assert_eq!(
        w.get("aquila_worker_prefix_cache_query_tokens_total", &[]),
        r.total_prompt_tokens as f64
    );
    // Every token ran through the model in some step: each prompt token
    // but the prefix-cache hits, and each generated token but the last
    // (more only if a sequence were preempted and recomputed: none here).
    let hits = w.get("aquila_worker_prefix_cache_hit_tokens_total", &[]);
    assert_eq!(w.get("aquila_worker_preemptions_total", &[]), 0.0);
    assert_eq!(
        w.get("aquila_worker_step_tokens_sum", &[]),
        (r.total_prompt_tokens + r.total_output_tokens - K) as f64 - hits
    );
    let steps = w.get("aquila_worker_step_duration_seconds_count", &[]);
    assert_eq!(steps, w.get("aquila_worker_step_sequences_count", &[]));
    assert!(
        w.get(
            "aquila_worker_step_duration_seconds_count",
            &[("phase", "prefill")]
        ) >= 1.0
    );
    assert!(
        w.get(
            "aquila_worker_step_duration_seconds_count",
            &[("phase", "decode")]
        ) >= 1.0
    );
    assert_eq!(
        w.get("aquila_worker_step_collective_seconds_count", &[]),
        0.0
    );
    assert!(w.get("aquila_worker_model_load_seconds", &[]) > 0.0);
    let model = dir
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a model name")
        .to_string();
    (g, w, model)
}

#[tokio::test]
async fn counters_match_the_responses_and_the_worker_is_idle_after() {
    let (g, w, _) = run_and_check(&[]).await;
    assert!(!g.has_prefix("vllm:"), "vLLM names without the flag");
    assert!(!w.has_prefix("vllm:"), "vLLM names without the flag");
}

#[tokio::test]
async fn vllm_names_carry_the_same_values() {
    let (g, w, model) = run_and_check(&["--metrics-vllm-names"]).await;
    let k = K as f64;
    let m = [("model_name", model.as_str())];
    assert_eq!(
        g.get("vllm:prompt_tokens_total", &m),
        g.get("aquila_gateway_prompt_tokens_total", &[])
    );
    assert_eq!(
        g.get("vllm:generation_tokens_total", &m),
        (K * OUTPUT) as f64
    );
    assert_eq!(
        g.get(
            "vllm:request_success_total",
            &[("model_name", &model), ("finished_reason", "length")]
        ),
        k
    );
    assert_eq!(g.get("vllm:e2e_request_latency_seconds_count", &m), k);
    assert_eq!(g.get("vllm:time_to_first_token_seconds_count", &m), k);
    // The same K observations in both, added in whatever order concurrent
    // requests finished: equal up to the last bits of an f64 sum.
    let (ours, vllm) = (
        g.get("aquila_gateway_request_duration_seconds_sum", &[]),
        g.get("vllm:e2e_request_latency_seconds_sum", &m),
    );
    assert!((ours - vllm).abs() <= 1e-9 * ours.abs(), "{ours} vs {vllm}");
    assert_eq!(w.get("vllm:num_requests_running", &m), 0.0);
    assert_eq!(w.get("vllm:num_requests_waiting", &m), 0.0);
    assert_eq!(w.get("vllm:kv_cache_usage_perc", &m), 0.0);
}

/// The metric names an expression mentions (`aquila_…`, `vllm:…`), with a
/// histogram's `_bucket`/`_sum`/`_count` suffix kept: the exposition has them.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("aquila_") || w.starts_with("vllm:"))
        .map(str::to_owned)
        .collect()
}

/// `deploy/`'s Grafana dashboard and Prometheus alerts query only what the
/// processes export: every name in every expression appears in a scrape of
/// a gateway and a worker after a run.
#[tokio::test]
async fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let (g, w, _) = run_and_check(&[]).await;
    let exported: std::collections::BTreeSet<&str> =
        g.0.iter().chain(&w.0).map(|s| s.name.as_str()).collect();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/aquila-serve.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs: Vec<String> = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("each panel has targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("a query").to_owned());
        }
    }
    assert!(panels.len() >= 10, "{} panels", panels.len());

    let alerts = std::fs::read_to_string(deploy.join("prometheus/alerts.yaml")).expect("alerts");
    let rules: Vec<String> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_owned())
        .collect();
    assert!(rules.len() >= 5, "{} alert rules", rules.len());
    assert_eq!(
        rules.len(),
        alerts.matches("- alert:").count(),
        "one expr per alert"
    );

    for expr in exprs.iter().chain(&rules) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{name} (in {expr}) is not exported"
            );
        }
    }
}

/// `aquila serve`: one endpoint with the gateway's and the worker's metrics.
#[tokio::test]
async fn serve_exposes_both_registries_on_one_endpoint() {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let model = dir.path().to_str().expect("utf-8 path");
    let args = [
        "serve",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--metrics-vllm-names",
    ];
    let serve = spawn(&args, "gateway");
    wait_serving(&serve.url()).await;
    let r = loadgen(
        &serve.url(),
        &[
            "--num-requests",
            "3",
            "--prompt-tokens",
            "8",
            "--output-tokens",
            "4",
            "--vocab-range",
            "100:300",
        ],
    )
    .await;
    assert_eq!(r.succeeded, 3);
    let s = scrape(serve.addr_of("metrics")).await;
    assert_eq!(
        s.get("aquila_gateway_requests_total", &[("code", "OK")]),
        3.0
    );
    assert_eq!(s.get("aquila_gateway_generated_tokens_total", &[]), 12.0);
    assert_eq!(s.get("aquila_worker_generated_tokens_total", &[]), 12.0);
    assert_eq!(s.get("vllm:generation_tokens_total", &[]), 12.0);
    assert_eq!(s.get("vllm:num_requests_running", &[]), 0.0);
}

/// `aquila worker --tp 2`: each rank serves its own metrics (rank 1 on a
/// port of its own); both observe every step and its collective time.
#[tokio::test]
async fn every_rank_of_a_group_serves_its_metrics() {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let flags = [
        "--tp",
        "2",
        "--threads",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let worker = spawn_worker(dir.path(), &flags);
    wait_serving(&worker.url()).await;
    let r = loadgen(
        &worker.url(),
        &[
            "--api",
            "worker",
            "--num-requests",
            "2",
            "--prompt-tokens",
            "8",
            "--output-tokens",
            "4",
            "--vocab-range",
            "100:300",
        ],
    )
    .await;
    assert_eq!(r.succeeded, 2);
    let addrs: Vec<&String> = worker
        .others
        .iter()
        .filter(|(w, _)| w == "worker metrics")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(addrs.len(), 2, "one endpoint per rank: {:?}", worker.others);
    let steps = "aquila_worker_step_duration_seconds_count";
    let collective = "aquila_worker_step_collective_seconds";
    // The follower observes a step just after its last collective: wait for it.
    let (a, b, a_steps) = eventually(
        Duration::from_secs(10),
        "both ranks counting the same steps",
        async || {
            let (a, b) = (scrape(addrs[0]).await, scrape(addrs[1]).await);
            match (a.get(steps, &[]), b.get(steps, &[])) {
                (a_steps, b_steps) if a_steps == b_steps => Ok((a, b, a_steps)),
                seen => Err(seen),
            }
        },
    )
    .await;
    assert!(a_steps > 0.0);
    for s in [&a, &b] {
        assert_eq!(s.get(&format!("{collective}_count"), &[]), a_steps);
        assert!(s.get(&format!("{collective}_sum"), &[]) > 0.0);
    }
    // Only the leader runs the engine (and its queue and KV pool).
    let leaders = [&a, &b]
        .iter()
        .filter(|s| s.has_prefix("aquila_worker_kv_blocks_total"))
        .count();
    assert_eq!(leaders, 1);
}

/// The reader itself, on what the servers' output does not show: escapes,
/// a comma inside a label value, a trailing comma, empty braces, NaN.
#[test]
fn the_exposition_reader_reads_labels_escapes_and_values() {
    let s = Scrape::parse(
        "# HELP a_total A.\n# TYPE a_total counter\n\
         a_total 3\n\
         b_bucket{le=\"+Inf\",path=\"a,\\\"b\\\"\"} 2\n\
         b_bucket{le=\"0.5\",} 1\n\
         c{} NaN\n",
    );
    assert_eq!(s.get("a_total", &[]), 3.0);
    assert_eq!(s.get("b_bucket", &[("le", "+Inf")]), 2.0);
    assert_eq!(s.get("b_bucket", &[("path", "a,\"b\"")]), 2.0);
    assert_eq!(s.get("b_bucket", &[]), 3.0);
    assert!(s.get("c", &[]).is_nan());
    assert_eq!(s.sum("d_total", &[]), 0.0);
    assert!(s.has_prefix("b_"));
}
