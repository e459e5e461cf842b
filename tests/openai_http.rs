//! The OpenAI-compatible HTTP API end to end: `aquila worker` on the tiny
//! model and `aquila gateway --http-listen 127.0.0.1:0` in front of it,
//! called with the tests' plain HTTP/1.1 client (`common::http`) and with
//! the official OpenAI Python client. Checks that HTTP
//! answers carry the gRPC API's tokens, that streams are OpenAI's
//! server-sent events, that bad input gets OpenAI-style errors with the
//! right status and field, and the probes.

mod common;

use std::time::Duration;

use aquila_proto::v1::{ChatMessage, ChatRequest, GenerateRequest, ListModelsRequest};
use common::http::{self, Reply};
use common::{eventually, greedy_params as greedy, http_stack};
use serde_json::{Value, json};

const PROMPT: &[u32] = &[84, 104, 101, 32, 113, 117, 105, 99, 107];

/// The JSON of each server-sent event; asserts the stream ends with `[DONE]`.
fn sse_events(reply: &Reply) -> Vec<Value> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = std::str::from_utf8(&reply.body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    let (done, events) = events.split_last().unwrap();
    assert_eq!(*done, "data: [DONE]");
    events
        .iter()
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn chat_request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }],
        params: Some(greedy(max_tokens)),
        ..Default::default()
    }
}

#[tokio::test]
async fn completions_give_the_grpc_apis_tokens() {
    let s = http_stack(&[]).await;
    let mut client =
        aquila_proto::v1::generation_client::GenerationClient::connect(s.gateway.url())
            .await
            .unwrap();
    let by_text = client
        .generate(GenerateRequest {
            prompt: "The quick".into(),
            params: Some(greedy(16)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let by_ids = client
        .generate(common::ids_request(PROMPT, greedy(16)))
        .await
        .unwrap()
        .into_inner();
    assert!(!by_text.text.is_empty());

    let greedy_json = |prompt: Value| json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let reply = http::post(&s.http, "/v1/completions", &greedy_json(json!("The quick"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"), "{body}");
    assert_eq!(body["model"], by_text.model);
    assert_eq!(body["choices"][0]["text"], by_text.text);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let usage = by_text.usage.unwrap();
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": 16,
            "total_tokens": usage.prompt_tokens + 16,
        })
    );

    let reply = http::post(&s.http, "/v1/completions", &greedy_json(json!(PROMPT))).await;
    assert_eq!(reply.json()["choices"][0]["text"], by_ids.text);
    assert_eq!(reply.json()["usage"]["prompt_tokens"], PROMPT.len());

    // Streamed, the same text arrives in pieces.
    let mut streamed = greedy_json(json!(PROMPT));
    streamed["stream"] = json!(true);
    let events = sse_events(&http::post(&s.http, "/v1/completions", &streamed).await);
    assert!(events.len() >= 2, "{events:?}");
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, by_ids.text);
    let last = events.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn chat_streams_openai_chunks_ending_with_done() {
    let s = http_stack(&[]).await;
    let mut client =
        aquila_proto::v1::generation_client::GenerationClient::connect(s.gateway.url())
            .await
            .unwrap();
    let want = client.chat(chat_request(8)).await.unwrap().into_inner();

    let request = json!({
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let events = sse_events(&http::post(&s.http, "/v1/chat/completions", &request).await);
    let id = events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    for e in &events {
        assert_eq!(e["id"], id);
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], want.model);
        assert!(e["created"].as_u64().unwrap() > 0);
    }
    // Role first, then content, then the finish, then usage with no choices.
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let (usage, with_choices) = events.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        want.usage.unwrap().prompt_tokens
    );
    let (finish, content) = with_choices.split_last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let text: String = content
        .iter()
        .map(|e| {
            assert_eq!(e["choices"][0]["finish_reason"], Value::Null);
            e["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, want.text);
    assert!(content.len() >= 2, "{} content chunks", content.len());

    // Not streamed: one body with the same text and usage.
    let mut whole = request.clone();
    whole["stream"] = json!(false);
    let body = http::post(&s.http, "/v1/chat/completions", &whole)
        .await
        .json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": want.text})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn bad_input_gets_openai_errors_naming_the_field() {
    let s = http_stack(&[]).await;
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -1})),
            "temperature",
        ),
        // The same check on a stream: an HTTP error, not an event.
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -1, "stream": true})),
            "temperature",
        ),
        ("/v1/chat/completions", chat(json!({"n": 2})), "n"),
        (
            "/v1/chat/completions",
            chat(json!({"messages": []})),
            "messages",
        ),
        ("/v1/chat/completions", chat(json!({"top_p": 1.5})), "top_p"),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].role",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 999_999]}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": ["", "a"]}),
            "stop",
        ),
    ];
    for (path, body, field) in cases {
        let reply = http::post(&s.http, path, &body).await;
        assert_eq!(
            reply.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let (kind, param, message) = reply.error();
        assert_eq!(kind, "invalid_request_error", "{body}");
        assert_eq!(param.as_deref(), Some(field), "{body}: {message}");
        let base = field.split('[').next().unwrap();
        assert!(message.contains(base), "{body}: {message}");
    }

    let reply = http::request(
        &s.http,
        "POST",
        "/v1/chat/completions",
        "{\"messages\": [",
        &[],
    )
    .await;
    assert_eq!(reply.status, 400);
    let (kind, param, message) = reply.error();
    assert_eq!((kind.as_str(), param), ("invalid_request_error", None));
    assert!(message.contains("not valid JSON"), "{message}");

    let reply = http::post(
        &s.http,
        "/v1/chat/completions",
        &chat(json!({"model": "gpt-4"})),
    )
    .await;
    assert_eq!(reply.status, 404);
    let (_, param, message) = reply.error();
    assert_eq!(param.as_deref(), Some("model"));
    assert!(message.contains("gpt-4"), "{message}");

    assert_eq!(http::get(&s.http, "/v1/engines").await.status, 404);

    // The gRPC deadline header works here too: 1 ns has passed before any worker is called.
    let reply = http::request(
        &s.http,
        "POST",
        "/v1/chat/completions",
        &chat(json!({})).to_string(),
        &[("grpc-timeout", "1n")],
    )
    .await;
    assert_eq!(
        reply.status,
        504,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["error"]["code"], "deadline_exceeded");
}

#[tokio::test]
async fn models_and_probes() {
    let mut s = http_stack(&[]).await;
    let mut client =
        aquila_proto::v1::generation_client::GenerationClient::connect(s.gateway.url())
            .await
            .unwrap();
    let listed = client
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();

    let reply = http::get(&s.http, "/v1/models").await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], listed.models[0].name);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(
        body["data"][0]["context_length"],
        listed.models[0].context_length
    );

    assert_eq!(http::get(&s.http, "/health").await.status, 200);
    assert_eq!(http::get(&s.http, "/ready").await.status, 200);

    // With its only worker gone the gateway is alive but not ready.
    s.worker.kill();
    eventually(
        Duration::from_secs(30),
        "/ready 503 with the worker dead",
        async || {
            let status = http::get(&s.http, "/ready").await.status;
            if status != 503 {
                assert_eq!(status, 200);
            }
            status == 503
        },
    )
    .await;
    assert_eq!(http::get(&s.http, "/health").await.status, 200);
    let reply = http::post(
        &s.http,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(
        reply.status,
        503,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.error().0, "server_error");
}

#[tokio::test]
async fn api_keys_are_checked_as_on_grpc() {
    let s = http_stack(&["--api-key", "sesame"]).await;
    for auth in [None, Some("Bearer wrong"), Some("sesame")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let reply = http::request(&s.http, "GET", "/v1/models", "", &headers).await;
        assert_eq!(reply.status, 401, "{auth:?}");
        let (kind, _, message) = reply.error();
        assert_eq!(kind, "authentication_error");
        assert!(!message.contains("sesame"), "{message}");
    }
    let with_key = [("authorization", "Bearer sesame")];
    assert_eq!(
        http::request(&s.http, "GET", "/v1/models", "", &with_key)
            .await
            .status,
        200
    );
    // The key is checked before the body is read: a bad body still gets 401.
    let reply = http::request(&s.http, "POST", "/v1/chat/completions", "{", &[]).await;
    assert_eq!(reply.status, 401);
    let reply = http::request(&s.http, "POST", "/v1/chat/completions", "{", &with_key).await;
    assert_eq!(reply.status, 400);
    // Probes stay open, as gRPC health does.
    assert_eq!(http::get(&s.http, "/health").await.status, 200);
    assert_eq!(http::get(&s.http, "/ready").await.status, 200);
}

/// The official `openai` package (installed by tests/run.sh into its venv)
/// streams a chat from the gateway and gets BadRequestError for bad input.
#[tokio::test]
async fn the_openai_python_client_streams_a_chat() {
    let Some(python) = common::env_or_skip("AQUILA_PYTHON", "tests/run.sh") else {
        return;
    };
    let s = http_stack(&[]).await;
    let base_url = format!("http://{}/v1", s.http);
    let out = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(python);
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/openai_client.py"
            ))
            .arg(base_url);
        // The server is on loopback: a proxy from the environment must not be used.
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            command.env_remove(var);
        }
        command.output().expect("run python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");

    let mut client =
        aquila_proto::v1::generation_client::GenerationClient::connect(s.gateway.url())
            .await
            .unwrap();
    let want = client.chat(chat_request(8)).await.unwrap().into_inner();
    assert_eq!(got["models"], json!([want.model]));
    assert_eq!(got["content"], want.text, "{got}");
    assert_eq!(got["first_role"], "assistant");
    assert_eq!(got["finish_reasons"], json!(["length"]));
    assert_eq!(got["objects"], json!(["chat.completion.chunk"]));
    assert_eq!(got["ids"].as_array().unwrap().len(), 1, "{got}");
    assert_eq!(got["usage"]["completion_tokens"], 8);
    assert!(got["chunks"].as_u64().unwrap() >= 5, "{got}");
    let bad = &got["bad"];
    assert_eq!(bad["raised"], "BadRequestError", "{got}");
    assert_eq!(bad["status"], 400);
    assert_eq!(bad["type"], "invalid_request_error");
    assert_eq!(bad["param"], "temperature");
    assert_eq!(bad["code"], "invalid_argument");
}
