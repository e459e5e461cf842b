//! The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) through `aquila
//! serve`: a greedy chat answer that names Paris, as llama.cpp's does, and a
//! 64-token stream that arrives as many messages. The model file comes from
//! the project's own setup (`tests/run.sh` runs `aquila fetch-demo` and sets
//! AQUILA_DEMO_MODEL); without it the test says so and is skipped, except
//! under CI where it must be present.

mod common;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{ChatMessage, ChatRequest, FinishReason, GenerateRequest, SamplingParams};

#[tokio::test]
async fn the_demo_model_answers_paris_and_streams() {
    let Some(model) = common::env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    let server = common::spawn(
        &[
            "serve",
            "--model",
            &model,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--threads",
            "2",
        ],
        "gateway",
    );
    common::wait_serving(&server.url()).await;
    let mut client = GenerationClient::connect(server.url()).await.unwrap();

    let answer = client
        .chat(ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "What is the capital of France? Answer in one word.".into(),
            }],
            params: Some(SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(24),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.text.contains("Paris"), "answer: {:?}", answer.text);
    // llama.cpp (llama-cpp-python 0.3.36) on the same file and template
    // answers "The capital of France is Paris." with these ids, then
    // <|im_end|> (2), which ends the turn and is not text.
    assert_eq!(answer.text, "The capital of France is Paris.");
    assert_eq!(answer.token_ids, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(answer.finish_reason, FinishReason::Eos as i32, "{answer:?}");
    assert_eq!(answer.usage.unwrap().prompt_tokens, 42);

    let mut stream = client
        .generate_stream(GenerateRequest {
            prompt: "Once upon a time".into(),
            params: Some(SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(64),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    let mut tokens = 0;
    let mut text = String::new();
    while let Some(m) = stream.message().await.unwrap() {
        messages += 1;
        tokens += m.token_ids.len();
        text.push_str(&m.text);
    }
    assert_eq!(tokens, 64);
    assert!(
        messages >= 32,
        "64 tokens arrived in only {messages} messages"
    );
    assert!(
        text.split_whitespace().count() >= 20,
        "too little text: {text:?}"
    );
}
