//! Tensor parallelism on CPU: the tiny model (4 query heads, 2 KV heads)
//! loaded as 2 and 4 ranks, each rank on its own thread with its own slice
//! of the weights and a TCP communicator to the leader, gives the logits and
//! greedy tokens of the unsharded model. At 4 ranks the KV heads are
//! replicated (fewer KV heads than ranks). Summation order changes with the
//! all-reduce, so logits are compared within a tolerance.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aquila_worker::comm::Communicator;
use aquila_worker::comm::tcp::TcpComm;
use aquila_worker::loader::{self, LoadOptions};
use aquila_worker::model::{LogitsFor, SingleSeq, WeightDtype};
use aquila_worker::presets::{GgufType, WeightFormat};
use common::{local_greedy, model_path, tiny_model};

const PROMPT: [u32; 12] = [1, 40, 41, 42, 100, 7, 300, 12, 13, 250, 251, 5];
const GEN: usize = 8;

/// Every rank loads `path` and decodes greedily; returns rank 0's first
/// logits and tokens, after checking that every rank saw the same, and the
/// largest weight bytes a rank holds.
fn sharded_greedy(path: &Path, world: usize) -> (Vec<f32>, Vec<u32>, usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_secs(30);
    let run = move |comm: Arc<dyn Communicator>, path: std::path::PathBuf| {
        let opts = LoadOptions {
            dtype: WeightDtype::F32,
            name: None,
        };
        let m = loader::load(&path, &opts, comm)
            .expect("load a shard")
            .model;
        let mut seq = SingleSeq::new(&m, PROMPT.len() + GEN);
        let mut tokens = PROMPT.to_vec();
        let (mut first, mut out) = (None, Vec::new());
        for _ in 0..GEN {
            let logits = seq.step(&m, &tokens, LogitsFor::Last).expect("forward");
            let next = aquila_worker::sampler::argmax(&logits);
            first.get_or_insert(logits);
            out.push(next);
            tokens = vec![next];
        }
        (first.unwrap(), out, m.weight_bytes())
    };
    let followers: Vec<_> = (1..world)
        .map(|rank| {
            let path = path.to_path_buf();
            std::thread::spawn(move || {
                let comm = TcpComm::join(addr, rank, world, timeout).expect("join");
                run(Arc::new(comm), path)
            })
        })
        .collect();
    let lead = TcpComm::lead(listener, world, timeout).expect("lead");
    let mut leader = run(Arc::new(lead), path.to_path_buf());
    for f in followers {
        let got = f.join().expect("follower");
        assert_eq!(got.1, leader.1, "every rank samples the same tokens");
        assert_eq!(got.0, leader.0, "every rank gathers the same logits");
        leader.2 = leader.2.max(got.2);
    }
    leader
}

fn check(format: WeightFormat, gguf: GgufType, tolerance: f32) {
    let dir = tiny_model(format, gguf);
    let path = model_path(dir.path(), format);
    let (want_logits, want_tokens) = local_greedy(&path, WeightDtype::F32, &PROMPT, GEN);
    let scale = want_logits.iter().fold(0f32, |m, l| m.max(l.abs()));
    let opts = LoadOptions {
        dtype: WeightDtype::F32,
        name: None,
    };
    let whole = loader::load(&path, &opts, Arc::new(aquila_worker::comm::SingleRank))
        .unwrap()
        .model
        .weight_bytes();
    for world in [2, 4] {
        let (logits, tokens, bytes) = sharded_greedy(&path, world);
        // 1/N of the weights, but for replicated KV heads (at 4 ranks each
        // holds one of the two, where an even split would be half of one):
        // 11% more on this model.
        assert!(
            bytes as f64 <= 1.12 * whole as f64 / world as f64,
            "{format:?} TP={world}: a rank holds {bytes} of {whole} weight bytes"
        );
        assert_eq!(logits.len(), want_logits.len());
        let worst = logits
            .iter()
            .zip(&want_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tolerance * scale,
            "{format:?} TP={world}: logits differ by {worst} (largest {scale})"
        );
        assert_eq!(tokens, want_tokens, "{format:?} TP={world}: greedy tokens");
    }
}

#[test]
fn safetensors_shards_equal_the_whole_model() {
    check(WeightFormat::Safetensors, GgufType::F32, 1e-5);
    check(WeightFormat::SafetensorsSharded, GgufType::F32, 1e-5);
}

/// A `.bin` tensor is read whole and then cut (one at a time).
#[test]
fn pytorch_bin_shards_equal_the_whole_model() {
    check(WeightFormat::BinSharded, GgufType::F32, 1e-5);
}

/// Q8_0 weights sliced by rows and by whole blocks of columns: the integer
/// sums per block are exact, but activations are quantized per rank slice
/// as in the whole model (the slices fall on block boundaries), so only the
/// all-reduce order differs.
#[test]
fn gguf_q8_0_shards_equal_the_whole_model() {
    check(WeightFormat::Gguf, GgufType::Q8_0, 1e-4);
}

/// Q4_K blocks hold 256 weights: the tiny model's 256 attention columns
/// cannot be split in two on block boundaries, and the load says so.
#[test]
fn k_quant_columns_that_split_inside_a_block_are_refused() {
    let dir = tiny_model(WeightFormat::Gguf, GgufType::Q4k);
    let path = model_path(dir.path(), WeightFormat::Gguf);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Duration::from_secs(30);
    let p = path.clone();
    let follower = std::thread::spawn(move || {
        let comm = TcpComm::join(addr, 1, 2, t).unwrap();
        let opts = LoadOptions {
            dtype: WeightDtype::F32,
            name: None,
        };
        loader::load(&p, &opts, Arc::new(comm))
            .err()
            .map(|e| e.to_string())
    });
    let comm = TcpComm::lead(listener, 2, t).unwrap();
    let opts = LoadOptions {
        dtype: WeightDtype::F32,
        name: None,
    };
    let err = loader::load(&path, &opts, Arc::new(comm))
        .err()
        .expect("a Q4_K split inside a block fails")
        .to_string();
    assert!(
        err.contains("do not fall on its 256-weight q4k block boundaries"),
        "{err}"
    );
    assert!(follower.join().unwrap().is_some());
}

/// The pid of rank `rank` among the launcher's children (started by any of
/// its threads).
fn rank_pid(launcher: u32, rank: usize) -> u32 {
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{launcher}/task")).expect("the launcher's threads")
    {
        let path = task.unwrap().path().join("children");
        children += &std::fs::read_to_string(path).unwrap_or_default();
        children.push(' ');
    }
    let flag = format!("--rank\0{rank}\0");
    children
        .split_whitespace()
        .map(|p| p.parse::<u32>().unwrap())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&flag))
        })
        .unwrap_or_else(|| panic!("no rank {rank} under {launcher}"))
}

async fn health(url: &str) -> Option<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

async fn worker_greedy(url: &str) -> Result<Vec<u32>, tonic::Status> {
    use aquila_proto::worker::v1::worker_client::WorkerClient;
    use aquila_proto::worker::v1::{GenerateRequest, SamplingParams};
    let mut c = WorkerClient::connect(url.to_string()).await.unwrap();
    let mut stream = c
        .generate(GenerateRequest {
            prompt_token_ids: PROMPT.to_vec(),
            params: Some(SamplingParams {
                max_new_tokens: GEN as u32,
                ignore_eos: true,
                top_p: 1.0,
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = stream.message().await? {
        tokens.extend(event.tokens.iter().map(|t| t.id));
    }
    Ok(tokens)
}

/// `aquila worker --tp 2`: two rank processes under a launcher give the
/// unsharded model's greedy tokens. When rank 1 is killed, a request fails
/// with UNAVAILABLE naming rank 1, health turns NOT_SERVING within 5 s, and
/// the launcher starts the group again, which then serves the same tokens.
#[tokio::test]
async fn a_rank_group_serves_fails_cleanly_and_comes_back() {
    use std::time::Instant;
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let path = model_path(dir.path(), WeightFormat::Safetensors);
    let (_, want) = local_greedy(&path, WeightDtype::F32, &PROMPT, GEN);
    // One compute thread per rank: two ranks share this machine's cores.
    let worker = common::spawn_worker(dir.path(), &["--tp", "2", "--threads", "1"]);
    let url = worker.url();
    common::wait_serving(&url).await;
    assert_eq!(worker_greedy(&url).await.unwrap(), want);

    let killed = Instant::now();
    let pid = rank_pid(worker.child.id(), 1);
    // SAFETY: kill(2) on a child of our child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let err = worker_greedy(&url).await.expect_err("a broken group fails");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("rank 1"), "{}", err.message());
    loop {
        if health(&url).await == Some(ServingStatus::NotServing as i32) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "not NOT_SERVING within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::wait_serving(&url).await;
    assert_eq!(worker_greedy(&url).await.unwrap(), want);
}
