//! The load generator against real processes: `aquila worker` on the tiny
//! model and `aquila gateway` in front of it, on 127.0.0.1 port 0. Checks the
//! report's counts and token totals exactly and its latencies for order.

mod common;

use aquila_loadgen::{LoadgenArgs, Report};
use aquila_worker::presets::{GgufType, WeightFormat};
use clap::Parser;
use common::{spawn_gateway, spawn_worker, tiny_model, wait_serving};

/// Runs `aquila bench FLAGS` against a fresh tiny-model stack.
async fn bench(flags: &[&str]) -> Report {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(dir.path(), &[]);
    let gateway = spawn_gateway(&[&worker], &[]);
    wait_serving(&gateway.url()).await;
    let url = gateway.url();
    let mut args = vec!["bench", "--gateway", &url, "--duration-s", "120"];
    args.extend_from_slice(flags);
    let config = LoadgenArgs::try_parse_from(args)
        .expect("flags parse")
        .into_config()
        .expect("valid config");
    aquila_loadgen::run(config).await.expect("run")
}

/// Every request succeeded with exactly `output` tokens, and the summaries
/// are ordered the way any real run must be.
fn check_all_succeeded(r: &Report, requests: u64, output: u64) {
    assert_eq!(
        (r.succeeded, r.failed, r.unfinished),
        (requests, 0, 0),
        "failures: {:?}",
        r.failures
    );
    assert!(!r.hit_duration_limit);
    assert_eq!(r.total_output_tokens, requests * output);
    assert!(r.failures.is_empty());
    let ttft = r.ttft_ms.expect("ttft samples");
    let itl = r.itl_ms.expect("itl samples");
    let e2e = r.e2e_ms.expect("e2e samples");
    assert_eq!(
        (ttft.count, e2e.count),
        (requests as usize, requests as usize)
    );
    // One inter-token sample per token after the first message with tokens;
    // the first message carries at least one token, so at least 7 remain per request.
    assert!(itl.count as u64 <= requests * (output - 1), "{itl:?}");
    assert!(itl.count as u64 >= requests, "{itl:?}");
    for s in [ttft, itl, e2e] {
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.max, "{s:?}");
        assert!(s.mean >= 0.0 && s.mean <= s.max, "{s:?}");
    }
    assert!(ttft.mean <= e2e.mean && ttft.p50 <= e2e.p50 && ttft.max <= e2e.max);
    assert!(r.wall_s > 0.0);
    let rps = r.succeeded as f64 / r.wall_s;
    assert!((r.requests_per_s - rps).abs() < 1e-9);
    assert!((r.output_tokens_per_s - rps * output as f64).abs() < 1e-6);
}

#[tokio::test]
async fn closed_loop_of_four_gets_every_token() {
    let r = bench(&[
        "--concurrency",
        "4",
        "--num-requests",
        "12",
        "--prompt-tokens",
        "uniform:8:32",
        "--output-tokens",
        "8",
        "--vocab-range",
        "100:300",
    ])
    .await;
    check_all_succeeded(&r, 12, 8);
    assert!(
        (12 * 8..=12 * 32).contains(&r.total_prompt_tokens),
        "{} prompt tokens",
        r.total_prompt_tokens
    );
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
    assert_eq!(json["config"]["concurrency"], 4);
    assert_eq!(json["total_output_tokens"], 96);
}

#[tokio::test]
async fn the_worker_api_takes_the_same_load_without_a_gateway() {
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(dir.path(), &[]);
    wait_serving(&worker.url()).await;
    let url = worker.url();
    let flags = [
        "bench",
        "--gateway",
        &url,
        "--api",
        "worker",
        "--concurrency",
        "3",
        "--num-requests",
        "9",
        "--prompt-tokens",
        "16",
        "--output-tokens",
        "8",
        "--vocab-range",
        "100:300",
    ];
    let config = LoadgenArgs::try_parse_from(flags)
        .unwrap()
        .into_config()
        .unwrap();
    let r = aquila_loadgen::run(config).await.expect("run");
    check_all_succeeded(&r, 9, 8);
    assert_eq!(r.total_prompt_tokens, 9 * 16);
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["config"]["api"], "worker");
}

#[tokio::test]
async fn poisson_arrivals_with_warmup_and_a_shared_prefix() {
    let r = bench(&[
        "--request-rate",
        "20",
        "--max-concurrency",
        "8",
        "--num-requests",
        "10",
        "--warmup-requests",
        "2",
        "--prompt-tokens",
        "16",
        "--shared-prefix-tokens",
        "8",
        "--output-tokens",
        "8",
        "--vocab-range",
        "100:300",
        "--seed",
        "3",
    ])
    .await;
    check_all_succeeded(&r, 10, 8);
    assert_eq!(r.total_prompt_tokens, 10 * 16);
    assert_eq!((r.warmup_succeeded, r.warmup_failed), (2, 0));
    // Ten arrivals at 20/s span nine gaps: 0.45 s on average; far below 3 s.
    assert!(r.wall_s < 3.0, "{} s", r.wall_s);
}

#[tokio::test]
async fn rejected_requests_are_counted_by_code() {
    // Ids up to 399 do not fit the tiny model's 320-token vocabulary.
    let r = bench(&[
        "--num-requests",
        "3",
        "--output-tokens",
        "4",
        "--vocab-range",
        "300:400",
    ])
    .await;
    assert_eq!((r.succeeded, r.failed, r.unfinished), (0, 3, 0));
    assert_eq!(r.failures.get("INVALID_ARGUMENT"), Some(&3));
    assert_eq!(r.e2e_ms, None);
}
