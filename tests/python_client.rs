//! A Python client generated from `proto/` with grpcio-tools calls Generate
//! and ChatStream on a real gateway, as a new user would. The interpreter
//! comes from AQUILA_PYTHON (tests/run.sh makes a venv with grpcio-tools);
//! without it the test says so and is skipped, except under CI.

mod common;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{GenerateRequest, SamplingParams};
use aquila_worker::presets::{GgufType, WeightFormat};

#[tokio::test]
async fn python_grpcio_client_generates_and_chats() {
    let Some(python) = common::env_or_skip("AQUILA_PYTHON", "tests/run.sh") else {
        return;
    };
    let dir = common::tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = common::spawn_worker(dir.path(), &[]);
    let gateway = common::spawn_gateway(&[&worker], &[]);
    common::wait_serving(&gateway.url()).await;

    let addr = gateway.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/client.py"
            ))
            .arg(addr)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");

    // The same request from Rust gives the same tokens.
    let mut client = GenerationClient::connect(gateway.url()).await.unwrap();
    let want = client
        .generate(GenerateRequest {
            prompt_token_ids: vec![84, 104, 101, 32, 113, 117, 105, 99, 107],
            params: Some(SamplingParams {
                max_new_tokens: Some(8),
                temperature: Some(0.0),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u32> = got["generate_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want.token_ids);
    assert_eq!(got["generate_finish"], "FINISH_REASON_LENGTH");
    assert_eq!(got["chat_tokens"], 8);
    assert!(got["chat_messages"].as_u64().unwrap() >= 8, "{got}");
    assert_eq!(got["chat_finish"], "FINISH_REASON_LENGTH");
    assert!(got["chat_prompt_tokens"].as_u64().unwrap() > 100, "{got}");
}
