//! `aquila.v1` responses to OpenAI JSON: whole completions, and the chunks
//! of a stream as server-sent events (`data: {...}\n\n`, ending with
//! `data: [DONE]\n\n`).
//!
//! Pure formatting: the text, token counts and finish reasons are the
//! Generation service's, unchanged. A stream that fails midway ends with an
//! `error` event and no `[DONE]`, so a client cannot take a cut text for a
//! whole one.

use aquila_proto::v1;
use axum::body::Bytes;
use serde_json::{Value, json};

use super::error::{ApiError, Endpoint};

/// Which endpoint's objects to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// The body of a non-streamed answer.
pub fn whole(kind: Kind, r: &v1::GenerateResponse, created: u64) -> Value {
    let choice = match kind {
        Kind::Completion => json!({
            "index": 0,
            "text": r.text,
            "logprobs": completion_logprobs(&r.logprobs),
            "finish_reason": finish_reason(r.finish_reason()),
        }),
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(&r.logprobs),
            "finish_reason": finish_reason(r.finish_reason()),
        }),
    };
    json!({
        "id": id(kind, &r.request_id),
        "object": object(kind, false),
        "created": created,
        "model": r.model,
        "choices": [choice],
        "usage": usage(r.usage.as_ref()),
    })
}

/// Turns the items of a response stream into server-sent events.
#[derive(Debug)]
pub struct Chunks {
    kind: Kind,
    include_usage: bool,
    created: u64,
    /// The id and model of the first message: every chunk repeats them.
    head: Option<(String, String)>,
}

impl Chunks {
    pub fn new(kind: Kind, include_usage: bool, created: u64) -> Self {
        Chunks {
            kind,
            include_usage,
            created,
            head: None,
        }
    }

    /// The events for one item, and whether the stream may go on (false
    /// after an error: no `[DONE]` follows).
    pub fn on_item(&mut self, item: Result<v1::GenerateResponse, tonic::Status>) -> (Bytes, bool) {
        let r = match item {
            Ok(r) => r,
            Err(status) => {
                let endpoint = match self.kind {
                    Kind::Completion => Endpoint::Completions,
                    Kind::Chat => Endpoint::Chat,
                };
                let error = ApiError::from_status(&status, endpoint);
                return (event(&error.body()), false);
            }
        };
        let mut out = Vec::new();
        if self.head.is_none() {
            self.head = Some((id(self.kind, &r.request_id), r.model.clone()));
            // OpenAI's first chat chunk names the role, with empty content.
            if self.kind == Kind::Chat {
                let delta = json!({"role": "assistant", "content": ""});
                out.extend(event(&self.chunk(delta, Value::Null, Value::Null)));
            }
        }
        if !r.text.is_empty() || !r.logprobs.is_empty() {
            let (delta, logprobs) = match self.kind {
                Kind::Completion => (json!(r.text), completion_logprobs(&r.logprobs)),
                Kind::Chat => (json!({"content": r.text}), chat_logprobs(&r.logprobs)),
            };
            out.extend(event(&self.chunk(delta, logprobs, Value::Null)));
        }
        // Only the last message carries usage.
        if let Some(u) = &r.usage {
            let delta = match self.kind {
                Kind::Completion => json!(""),
                Kind::Chat => json!({}),
            };
            let reason = json!(finish_reason(r.finish_reason()));
            out.extend(event(&self.chunk(delta, Value::Null, reason)));
            if self.include_usage {
                let mut last = self.chunk(Value::Null, Value::Null, Value::Null);
                last["choices"] = json!([]);
                last["usage"] = usage(Some(u));
                out.extend(event(&last));
            }
        }
        (out.into(), true)
    }

    fn chunk(&self, delta: Value, logprobs: Value, finish_reason: Value) -> Value {
        let (id, model) = self.head.clone().unwrap_or_default();
        let mut choice = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish_reason});
        match self.kind {
            Kind::Completion => choice["text"] = delta,
            Kind::Chat => choice["delta"] = delta,
        }
        let mut chunk = json!({
            "id": id,
            "object": object(self.kind, true),
            "created": self.created,
            "model": model,
            "choices": [choice],
        });
        if self.include_usage {
            // OpenAI's chunks say "usage": null until the last one.
            chunk["usage"] = Value::Null;
        }
        chunk
    }
}

fn event(value: &Value) -> Bytes {
    format!("data: {value}\n\n").into()
}

fn id(kind: Kind, request_id: &str) -> String {
    match kind {
        Kind::Completion => format!("cmpl-{request_id}"),
        Kind::Chat => format!("chatcmpl-{request_id}"),
    }
}

fn object(kind: Kind, chunk: bool) -> &'static str {
    match (kind, chunk) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    }
}

/// End-of-sequence and stop strings or ids are all "stop" to OpenAI; a
/// generation the server cancelled (draining) is "abort", as vLLM says.
fn finish_reason(reason: v1::FinishReason) -> &'static str {
    match reason {
        v1::FinishReason::Length => "length",
        v1::FinishReason::Stop | v1::FinishReason::Eos | v1::FinishReason::Unspecified => "stop",
        v1::FinishReason::Cancelled => "abort",
    }
}

fn usage(u: Option<&v1::Usage>) -> Value {
    let u = u.cloned().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn chat_logprobs(logprobs: &[v1::TokenLogprob]) -> Value {
    if logprobs.is_empty() {
        return Value::Null;
    }
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = logprobs
        .iter()
        .map(|lp| {
            let mut e = entry(&lp.token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|t| entry(&t.token, t.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

fn completion_logprobs(logprobs: &[v1::TokenLogprob]) -> Value {
    if logprobs.is_empty() {
        return Value::Null;
    }
    let top: Vec<Value> = logprobs
        .iter()
        .map(|lp| {
            let map: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|t| (t.token.clone(), json!(t.logprob)))
                .collect();
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": logprobs.iter().map(|lp| lp.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(text: &str) -> v1::GenerateResponse {
        v1::GenerateResponse {
            text: text.into(),
            token_ids: vec![1],
            model: "m".into(),
            request_id: "r1".into(),
            ..Default::default()
        }
    }

    fn last(text: &str, reason: v1::FinishReason) -> v1::GenerateResponse {
        let mut r = part(text);
        r.set_finish_reason(reason);
        r.usage = Some(v1::Usage {
            prompt_tokens: 4,
            completion_tokens: 2,
        });
        r
    }

    /// The JSON of each `data:` event.
    fn events(bytes: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_chat_stream_has_role_content_and_finish_chunks() {
        let mut c = Chunks::new(Kind::Chat, false, 99);
        let (first, more) = c.on_item(Ok(part("Hel")));
        assert!(more);
        let first = events(&first);
        assert_eq!(first.len(), 2);
        assert_eq!(
            first[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(first[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(first[1]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(first[1]["object"], "chat.completion.chunk");
        assert_eq!(first[1]["id"], "chatcmpl-r1");
        assert_eq!(first[1]["created"], 99);
        assert!(first[1].get("usage").is_none());

        let (end, more) = c.on_item(Ok(last("lo", v1::FinishReason::Length)));
        assert!(more);
        let end = events(&end);
        assert_eq!(end[0]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(end[1]["choices"][0]["delta"], json!({}));
        assert_eq!(end[1]["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn include_usage_adds_a_last_chunk_without_choices() {
        let mut c = Chunks::new(Kind::Completion, true, 0);
        let (bytes, _) = c.on_item(Ok(last("", v1::FinishReason::Eos)));
        let e = events(&bytes);
        // No text: only the finish chunk and the usage chunk.
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["choices"][0]["text"], "");
        assert_eq!(e[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(e[0]["usage"], Value::Null);
        assert_eq!(e[1]["choices"], json!([]));
        assert_eq!(e[1]["usage"]["total_tokens"], 6);
    }

    #[test]
    fn an_error_midway_is_an_error_event_and_the_end() {
        let mut c = Chunks::new(Kind::Chat, false, 0);
        let _ = c.on_item(Ok(part("a")));
        let (bytes, more) = c.on_item(Err(tonic::Status::unavailable("worker w died")));
        assert!(!more);
        let e = events(&bytes);
        assert_eq!(e[0]["error"]["message"], "worker w died");
        assert_eq!(e[0]["error"]["code"], "unavailable");
    }

    #[test]
    fn whole_answers_have_usage_and_logprobs() {
        let mut r = last("Hi", v1::FinishReason::Stop);
        r.logprobs = vec![v1::TokenLogprob {
            token_id: 1,
            token: "Hi".into(),
            logprob: -0.5,
            top: vec![v1::TopLogprob {
                token_id: 1,
                token: "Hi".into(),
                logprob: -0.5,
            }],
        }];
        let chat = whole(Kind::Chat, &r, 5);
        assert_eq!(chat["object"], "chat.completion");
        assert_eq!(chat["choices"][0]["message"]["content"], "Hi");
        assert_eq!(chat["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            chat["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
        );
        let lp = &chat["choices"][0]["logprobs"]["content"][0];
        assert_eq!(
            (lp["token"].as_str(), lp["logprob"].as_f64()),
            (Some("Hi"), Some(-0.5))
        );
        assert_eq!(lp["top_logprobs"][0]["bytes"], json!([72, 105]));

        let completion = whole(Kind::Completion, &r, 5);
        assert_eq!(completion["object"], "text_completion");
        assert_eq!(completion["id"], "cmpl-r1");
        assert_eq!(completion["choices"][0]["text"], "Hi");
        assert_eq!(
            completion["choices"][0]["logprobs"]["top_logprobs"][0]["Hi"],
            -0.5
        );
    }
}
