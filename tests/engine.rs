//! The serving engine under load, through real worker and gateway processes
//! on the tiny model: batched greedy and seeded results equal the results of
//! each request alone; a shared prefix is computed once; a KV pool too small
//! for everything preempts and still answers everything correctly; no block
//! leaks after cancellations; a full queue refuses at once.

mod common;

use std::time::{Duration, Instant};

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{GenerateRequest, SamplingParams};
use aquila_proto::worker::v1::worker_client::WorkerClient;
use aquila_proto::worker::v1::{GetLoadRequest, Load};
use common::{Stack, eventually, tiny_stack};
use futures::future::join_all;
use tonic::transport::Channel;
use tonic::{Code, Status};

async fn load(s: &Stack) -> Load {
    let mut w = WorkerClient::connect(s.worker.url()).await.unwrap();
    w.get_load(GetLoadRequest {}).await.unwrap().into_inner()
}

/// Prompt `i` of a mixed set: lengths 3..=93, distinct contents.
fn prompt(i: usize) -> Vec<u32> {
    let len = 3 + (i * 37) % 91;
    (0..len)
        .map(|j| 32 + ((i * 7 + j * 13) % 90) as u32)
        .collect()
}

fn request(prompt: Vec<u32>, max_new_tokens: u32, seed: Option<u64>) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: prompt,
        params: Some(SamplingParams {
            max_new_tokens: Some(max_new_tokens),
            temperature: Some(if seed.is_some() { 0.9 } else { 0.0 }),
            top_k: seed.map(|_| 40),
            seed,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_all(
    client: &GenerationClient<Channel>,
    reqs: Vec<GenerateRequest>,
) -> Vec<Result<Vec<u32>, Status>> {
    join_all(reqs.into_iter().map(|r| {
        let mut c = client.clone();
        async move { c.generate(r).await.map(|r| r.into_inner().token_ids) }
    }))
    .await
}

/// Alone, one at a time; then all at once: the same tokens.
async fn alone_equals_batched(s: &mut Stack, reqs: Vec<GenerateRequest>) {
    let mut alone = Vec::new();
    for r in reqs.clone() {
        alone.push(s.client.generate(r).await.unwrap().into_inner().token_ids);
    }
    let batched = run_all(&s.client, reqs).await;
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(&b.unwrap(), a, "request {i} differs when batched");
    }
}

#[tokio::test]
async fn sixty_four_concurrent_requests_return_what_they_return_alone() {
    // Small steps so that prefills are chunked and mixed with decodes.
    let mut s = tiny_stack(&["--max-running", "16", "--max-batch-tokens", "48"]).await;
    let greedy: Vec<_> = (0..64).map(|i| request(prompt(i), 12, None)).collect();
    alone_equals_batched(&mut s, greedy).await;
    let seeded: Vec<_> = (0..24)
        .map(|i| request(prompt(i), 12, Some(i as u64)))
        .collect();
    alone_equals_batched(&mut s, seeded).await;
    let l = load(&s).await;
    assert_eq!(l.kv_blocks_free, l.kv_blocks_total);
}

#[tokio::test]
async fn a_shared_prefix_is_computed_once() {
    let mut s = tiny_stack(&[]).await;
    let shared: Vec<u32> = (0..512).map(|j| 32 + (j * 11 % 90) as u32).collect();
    let with = |tail: &[u32]| [shared.as_slice(), tail].concat();
    s.client
        .generate(request(with(&[1; 10]), 1, None))
        .await
        .unwrap();
    let before = load(&s).await;
    let second = s
        .client
        .generate(request(with(&[2; 20]), 1, None))
        .await
        .unwrap()
        .into_inner();
    let after = load(&s).await;
    // All 512 shared tokens (32 full blocks of 16) came from the cache;
    // only the 20 new ones ran.
    assert_eq!(
        after.prefix_cache_hit_tokens_total - before.prefix_cache_hit_tokens_total,
        512
    );
    assert_eq!(
        after.computed_tokens_total - before.computed_tokens_total,
        20
    );
    // And the answer is what a cold worker gives.
    let mut cold = tiny_stack(&[]).await;
    let want = cold
        .client
        .generate(request(with(&[2; 20]), 1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.token_ids, want.token_ids);
}

#[tokio::test]
async fn a_small_kv_pool_preempts_and_still_answers_correctly() {
    // 24 blocks of 16 tokens; 12 requests of up to 93 + 30 tokens cannot all
    // run at once.
    let mut s = tiny_stack(&["--kv-cache-blocks", "24", "--max-running", "12"]).await;
    let reqs: Vec<_> = (0..12).map(|i| request(prompt(i), 30, None)).collect();
    alone_equals_batched(&mut s, reqs).await;
    let l = load(&s).await;
    assert!(l.preemptions_total > 0, "nothing was preempted: {l:?}");
    assert_eq!(l.kv_blocks_free, l.kv_blocks_total, "blocks leaked: {l:?}");
}

#[tokio::test]
async fn cancellations_under_load_leak_no_blocks() {
    let s = tiny_stack(&["--max-batch-tokens", "64"]).await;
    let mut streams = Vec::new();
    for i in 0..16 {
        let mut c = s.client.clone();
        streams.push(
            c.generate_stream(request(prompt(i), 200, None))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // Read a little of each, then drop every other one mid-generation.
    for st in streams.iter_mut() {
        st.message().await.unwrap().unwrap();
    }
    let mut kept = Vec::new();
    for (i, st) in streams.into_iter().enumerate() {
        if i % 2 == 0 {
            kept.push(st);
        }
    }
    for mut st in kept {
        let mut tokens = 0;
        while let Some(m) = st.message().await.unwrap() {
            tokens += m.token_ids.len();
        }
        assert!(tokens >= 199);
    }
    let l = eventually(Duration::from_secs(30), "blocks returned", async || {
        let l = load(&s).await;
        if l.running == 0 && l.kv_blocks_free == l.kv_blocks_total {
            Ok(l)
        } else {
            Err(l)
        }
    })
    .await;
    assert_eq!(l.requests_cancelled_total, 8);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_the_rest_complete() {
    let s = tiny_stack(&["--max-waiting", "8", "--max-running", "4"]).await;
    let reqs: Vec<_> = (0..100).map(|i| request(prompt(i), 8, None)).collect();
    let started = Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(120), run_all(&s.client, reqs))
        .await
        .expect("requests hung");
    let mut ok = 0;
    let mut refused = 0;
    for r in results {
        match r {
            Ok(ids) => {
                assert_eq!(ids.len(), 8);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains("waiting queue is full"),
                    "{}",
                    e.message()
                );
                refused += 1;
            }
        }
    }
    assert_eq!(ok + refused, 100);
    assert!(ok >= 8, "only {ok} served");
    assert!(refused >= 50, "only {refused} refused");
    eprintln!("{ok} served, {refused} refused in {:?}", started.elapsed());
    let l = load(&s).await;
    assert_eq!((l.running, l.waiting), (0, 0));
    assert_eq!(l.requests_finished_total, ok);
}

#[tokio::test]
async fn a_bf16_kv_cache_holds_twice_the_blocks_and_serves() {
    let f32_stack = tiny_stack(&["--kv-cache-mib", "4"]).await;
    let mut bf16_stack = tiny_stack(&["--kv-cache-mib", "4", "--kv-cache-dtype", "bf16"]).await;
    let (a, b) = (load(&f32_stack).await, load(&bf16_stack).await);
    assert!(a.kv_blocks_total > 0);
    assert_eq!(b.kv_blocks_total, 2 * a.kv_blocks_total);
    let out = bf16_stack
        .client
        .generate(request(prompt(3), 8, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.token_ids.len(), 8);
    let after = load(&bf16_stack).await;
    assert_eq!(after.kv_blocks_free, after.kv_blocks_total);
}

/// Sizes the worker cannot serve with stop it at start, with an exit
/// status and a message naming the flag, the value and the limit: a KV
/// block larger than attention takes, a KV cache smaller than one block, a
/// share of GPU memory that is no share.
#[test]
fn impossible_kv_sizes_are_refused_at_start() {
    use aquila_worker::presets::{GgufType, WeightFormat};
    let dir = common::tiny_model(WeightFormat::Safetensors, GgufType::F32);
    for (flags, message) in [
        (
            ["--kv-block-size", "512"],
            "--kv-block-size = 512 exceeds the limit of 256 tokens",
        ),
        (
            ["--kv-cache-mib", "0"],
            "the KV cache holds no block: 0 MiB is less than one block of 16 tokens",
        ),
        (
            ["--gpu-memory-utilization", "1.5"],
            "--gpu-memory-utilization = 1.5: expected a share of the GPU's memory, above 0 and at most 1",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aquila"))
            .args(["worker", "--listen", "127.0.0.1:0"])
            .args(flags)
            .arg("--model")
            .arg(dir.path())
            .output()
            .expect("run aquila worker");
        assert!(!out.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{flags:?}: {stderr}");
    }
}

/// The engine over a tensor-parallel group (2 rank processes): chunked
/// prefill, prefix-cache hits and preemption happen on the leader's blocks,
/// and the followers' KV shards must follow them exactly. Every request
/// gets the tokens a single worker gives it.
#[tokio::test]
async fn two_ranks_prefill_in_chunks_share_prefixes_preempt_and_agree_with_one() {
    let flags = [
        "--kv-cache-blocks",
        "24",
        "--max-running",
        "12",
        "--max-batch-tokens",
        "48",
        "--threads",
        "1",
    ];
    let shared: Vec<u32> = (0..40).map(|j| 32 + (j * 11 % 90) as u32).collect();
    let reqs: Vec<_> = (0..12)
        .map(|i| {
            let p = if i % 2 == 0 {
                [shared.as_slice(), &prompt(i)[..3]].concat()
            } else {
                prompt(i)
            };
            request(p, 30, None)
        })
        .collect();
    let mut answers = Vec::new();
    let mut loads = Vec::new();
    for tp in [&[][..], &["--tp", "2"][..]] {
        let s = tiny_stack(&[&flags[..], tp].concat()).await;
        let got: Vec<Vec<u32>> = run_all(&s.client, reqs.clone())
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        answers.push(got);
        loads.push(load(&s).await);
    }
    assert_eq!(answers[1], answers[0]);
    let l = &loads[1];
    assert!(l.preemptions_total > 0, "nothing was preempted: {l:?}");
    assert!(l.prefix_cache_hit_tokens_total > 0, "no prefix hit: {l:?}");
    assert_eq!(l.kv_blocks_free, l.kv_blocks_total, "blocks leaked: {l:?}");
}
