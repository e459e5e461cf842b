//! End to end through real processes: `aquila worker` on the tiny model and
//! `aquila gateway` in front of it, on 127.0.0.1 port 0, called with real
//! tonic clients. Checks tokens against the model run in-process, every bad
//! input's status, cancellation reaching the worker, and a dead worker.

mod common;

use std::time::Duration;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{
    ChatMessage, ChatRequest, FinishReason, GenerateRequest, ListModelsRequest, SamplingParams,
    TokenizeRequest,
};
use aquila_proto::worker::v1::GetLoadRequest;
use aquila_proto::worker::v1::worker_client::WorkerClient;
use aquila_worker::model::WeightDtype;
use common::{eventually, greedy_params as greedy, ids_request, tiny_stack, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

const PROMPT: &[u32] = &[84, 104, 101, 32, 113, 117, 105, 99, 107];

#[tokio::test]
async fn stream_and_unary_give_the_models_greedy_tokens() {
    let mut s = tiny_stack(&[]).await;
    let (_, want) = common::local_greedy(s.dir.path(), WeightDtype::F32, PROMPT, 24);

    let mut stream = s
        .client
        .generate_stream(ids_request(PROMPT, greedy(24)))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut messages = 0;
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        messages += 1;
        ids.extend_from_slice(&m.token_ids);
        text.push_str(&m.text);
        last = Some(m);
    }
    let last = last.unwrap();
    assert_eq!(ids, want);
    assert!(messages >= 24, "{messages} messages for 24 tokens");
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    let usage = last.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (PROMPT.len() as u32, 24)
    );
    let t = last.timings.unwrap();
    assert!(
        t.total_seconds >= t.time_to_first_token_seconds && t.time_to_first_token_seconds > 0.0
    );

    let unary = s
        .client
        .generate(ids_request(PROMPT, greedy(24)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.token_ids, want);
    assert_eq!(unary.text, text);
}

#[tokio::test]
async fn seeded_sampling_repeats_and_logprobs_are_distributions() {
    let mut s = tiny_stack(&[]).await;
    let params = SamplingParams {
        max_new_tokens: Some(16),
        temperature: Some(0.8),
        top_k: Some(50),
        top_p: Some(0.9),
        seed: Some(1234),
        ignore_eos: true,
        logprobs: true,
        top_logprobs: 5,
        ..Default::default()
    };
    let a = s
        .client
        .generate(ids_request(PROMPT, params.clone()))
        .await
        .unwrap()
        .into_inner();
    let b = s
        .client
        .generate(ids_request(PROMPT, params))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.token_ids, b.token_ids, "same seed, different tokens");
    assert_eq!(a.logprobs.len(), 16);
    for lp in &a.logprobs {
        assert_eq!(lp.top.len(), 5);
        assert!(lp.logprob <= 0.0);
        // Alternatives are sorted and the best is at least as likely as the pick.
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(lp.top[0].logprob >= lp.logprob - 1e-6);
        let mass: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "top-5 mass {mass}");
    }
}

#[tokio::test]
async fn stop_strings_trim_the_text_and_end_the_generation() {
    let mut s = tiny_stack(&[]).await;
    let full = s
        .client
        .generate(ids_request(PROMPT, greedy(40)))
        .await
        .unwrap()
        .into_inner();
    // The byte-level tiny tokenizer makes one token per byte; take a stop
    // string from the middle of what greedy decoding produces.
    let chars: Vec<char> = full.text.chars().collect();
    let cut = chars.len() / 2;
    let stop: String = chars[cut..cut + 2].iter().collect();
    let expect: String = full.text[..full.text.find(&stop).unwrap()].to_string();
    let mut params = greedy(40);
    params.stop = vec![stop.clone()];
    let r = s
        .client
        .generate(ids_request(PROMPT, params))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.text, expect);
    assert_eq!(r.finish_reason, FinishReason::Stop as i32);
    assert_eq!(r.stop_sequence, stop);
}

#[tokio::test]
async fn chat_tokenize_and_list_models() {
    let mut s = tiny_stack(&[]).await;
    let models = s
        .client
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(
        (m.context_length, m.vocab_size, m.tensor_parallel_size),
        (1024, 320, 1)
    );
    assert_eq!(m.architecture, "AquilaForCausalLM");
    assert!(m.has_chat_template);

    let tok = s
        .client
        .tokenize(TokenizeRequest {
            text: "héllo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // One token per byte: h, é (2 bytes), l, l, o...
    assert_eq!(tok.token_ids, vec![104, 195, 169, 108, 108, 111]);
    // ...except the merges: " the" is one token, "Ġthe".
    let the = s
        .client
        .tokenize(TokenizeRequest {
            text: " the".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(the.token_ids, vec![258]);
    assert_eq!(the.tokens, vec!["Ġthe".to_string()]);

    let r = s
        .client
        .chat(ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
            params: Some(greedy(4)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The Aquila template, tokenized as the preset tokenizer does.
    let rendered = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.###Human: Hi###Assistant:";
    let want = aquila_worker::presets::tokenizer()
        .unwrap()
        .encode(rendered, false)
        .unwrap()
        .len();
    assert!(want < rendered.len(), "the merges never fired");
    assert_eq!(r.usage.unwrap().prompt_tokens as usize, want);
}

async fn expect_invalid(
    client: &mut GenerationClient<Channel>,
    params: SamplingParams,
    needles: &[&str],
) {
    let err = client
        .generate(ids_request(PROMPT, params))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for n in needles {
        assert!(
            err.message().contains(n),
            "{:?} does not mention {n:?}",
            err.message()
        );
    }
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_naming_field_value_and_limit() {
    let mut s = tiny_stack(&[]).await;
    // A long generation runs throughout and must come through whole.
    let mut other = s.client.clone();
    let long_run =
        tokio::spawn(async move { other.generate(ids_request(PROMPT, greedy(200))).await });
    let c = &mut s.client;
    let empty = c.generate(GenerateRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(
        empty.message().contains("prompt is empty"),
        "{}",
        empty.message()
    );

    let long = c
        .generate(ids_request(&[65; 1100], greedy(1)))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(
        long.message().contains("1100") && long.message().contains("1024"),
        "{}",
        long.message()
    );

    let p = |f: fn(&mut SamplingParams)| {
        let mut p = greedy(8);
        f(&mut p);
        p
    };
    expect_invalid(
        c,
        p(|p| p.max_new_tokens = Some(0)),
        &["max_new_tokens", "0", "at least 1"],
    )
    .await;
    expect_invalid(
        c,
        p(|p| p.max_new_tokens = Some(1500)),
        &["max_new_tokens", "1500", "1024"],
    )
    .await;
    expect_invalid(
        c,
        p(|p| p.temperature = Some(-0.5)),
        &["temperature", "-0.5", "[0, 100]"],
    )
    .await;
    expect_invalid(
        c,
        p(|p| p.temperature = Some(f32::NAN)),
        &["temperature", "NaN"],
    )
    .await;
    expect_invalid(c, p(|p| p.top_p = Some(1.5)), &["top_p", "1.5", "(0, 1]"]).await;
    expect_invalid(c, p(|p| p.top_p = Some(0.0)), &["top_p", "0", "(0, 1]"]).await;
    expect_invalid(c, p(|p| p.top_k = Some(-3)), &["top_k", "-3", ">= 0"]).await;
    expect_invalid(
        c,
        p(|p| p.stop = vec!["ok".into(), String::new()]),
        &["stop[1]", "empty"],
    )
    .await;
    expect_invalid(
        c,
        p(|p| p.stop = (0..17).map(|i| i.to_string()).collect()),
        &["stop", "17", "16"],
    )
    .await;
    expect_invalid(c, p(|p| p.top_logprobs = 21), &["top_logprobs", "21", "20"]).await;
    expect_invalid(
        c,
        p(|p| p.stop_token_ids = vec![999]),
        &["stop_token_ids", "999", "320"],
    )
    .await;

    let unknown = c
        .generate(GenerateRequest {
            model: "no-such-model".into(),
            ..ids_request(PROMPT, greedy(1))
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("no-such-model"));

    // After all that, the server still serves, and the long run finished.
    let ok = c
        .generate(ids_request(PROMPT, greedy(3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 3);
    let long = long_run.await.unwrap().unwrap().into_inner();
    assert_eq!(long.token_ids.len(), 200);
    assert_eq!(long.finish_reason, FinishReason::Length as i32);
}

#[tokio::test]
async fn a_cancelled_stream_stops_the_generation_on_the_worker() {
    let mut s = tiny_stack(&[]).await;
    let mut worker = WorkerClient::connect(s.worker.url()).await.unwrap();
    let mut stream = s
        .client
        .generate_stream(ids_request(PROMPT, greedy(240)))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    drop(stream);
    let load = eventually(
        Duration::from_secs(20),
        "the worker cancelled",
        async || {
            let load = worker
                .get_load(GetLoadRequest {})
                .await
                .unwrap()
                .into_inner();
            if load.requests_cancelled_total == 1 && load.running == 0 {
                Ok(load)
            } else {
                Err(load)
            }
        },
    )
    .await;
    assert!(
        load.tokens_generated_total < 240,
        "generated all {} tokens",
        load.tokens_generated_total
    );
    assert_eq!(load.kv_blocks_free, load.kv_blocks_total, "cache not freed");
    // Another request is served normally afterwards.
    let ok = s
        .client
        .generate(ids_request(PROMPT, greedy(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token_ids.len(), 2);
}

#[tokio::test]
async fn a_dead_worker_gives_unavailable() {
    let mut s = tiny_stack(&[]).await;
    s.client
        .generate(ids_request(PROMPT, greedy(2)))
        .await
        .unwrap();
    s.worker.kill();
    let err = s
        .client
        .generate(ids_request(PROMPT, greedy(2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    drop(s.gateway);
}

#[tokio::test]
async fn a_client_request_id_reaches_the_gateway_and_worker_logs() {
    let dir = common::tiny_model(
        aquila_worker::presets::WeightFormat::Safetensors,
        aquila_worker::presets::GgufType::F32,
    );
    let logs = tempfile::tempdir().unwrap();
    let log = |name: &str| std::fs::File::create(logs.path().join(name)).unwrap();
    let model = dir.path().to_str().unwrap();
    let worker = common::spawn_with_log(
        &[
            "worker",
            "--model",
            model,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
        ],
        "worker",
        "debug",
        log("worker.log").into(),
    );
    let gateway = common::spawn_with_log(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--worker",
            &worker.addr,
        ],
        "gateway",
        "debug",
        log("gateway.log").into(),
    );
    wait_serving(&gateway.url()).await;
    let mut client = GenerationClient::connect(gateway.url()).await.unwrap();
    let mut req = tonic::Request::new(ids_request(PROMPT, greedy(2)));
    req.metadata_mut()
        .insert("x-request-id", "trace-me-4711".parse().unwrap());
    let r = client.generate(req).await.unwrap().into_inner();
    assert_eq!(r.request_id, "trace-me-4711");
    drop((gateway, worker));
    for name in ["gateway.log", "worker.log"] {
        let text = std::fs::read_to_string(logs.path().join(name)).unwrap();
        assert!(
            text.lines().any(|l| l.contains("trace-me-4711")),
            "{name} has no line with the request id"
        );
    }
    // A malformed id is refused, naming the header and the limit.
    let mut bad = tonic::Request::new(ids_request(PROMPT, greedy(2)));
    bad.metadata_mut()
        .insert("x-request-id", "two words".parse().unwrap());
    let stack = tiny_stack(&[]).await;
    let e = stack.client.clone().generate(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("x-request-id"), "{}", e.message());
}

#[tokio::test]
async fn health_and_reflection_on_both_servers() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let s = tiny_stack(&[]).await;
    wait_serving(&s.worker.url()).await;
    for (url, service) in [
        (s.gateway.url(), "aquila.v1.Generation"),
        (s.worker.url(), "aquila.worker.v1.Worker"),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection reply");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == service), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
    }
}
