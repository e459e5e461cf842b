//! OpenAI request bodies to `aquila.v1` requests.
//!
//! This is a reading of JSON, field by field so that a wrong type names its
//! field. It checks only what the gRPC request cannot express (n, echo,
//! tools, the shape of a prompt or a message); every value the gRPC API also
//! takes (temperature, max_tokens, stop...) is validated by the Generation
//! service, the same way for both APIs. Fields OpenAI defines that do not
//! change the output (user, metadata...) are ignored.

use aquila_proto::v1;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// A request, and how its answer is to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<T> {
    pub request: T,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage`.
    pub include_usage: bool,
}

/// `POST /v1/completions`.
pub fn completion(body: &[u8]) -> Result<Parsed<v1::GenerateRequest>, ApiError> {
    let mut f = Fields::parse(body)?;
    let model = f.take("model")?.unwrap_or_default();
    let (prompt, prompt_token_ids) = prompt(f.take_value("prompt"))?;
    if f.take::<bool>("echo")? == Some(true) {
        return Err(unsupported("echo", "echo = true"));
    }
    if f.take::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix"));
    }
    one_choice(&mut f, "best_of")?;
    let max_tokens = f.take("max_tokens")?;
    let mut params = sampling(&mut f, max_tokens)?;
    // Completions' `logprobs` is a count of alternatives (0: the chosen token's only).
    if let Some(n) = f.take::<u32>("logprobs")? {
        params.logprobs = true;
        params.top_logprobs = n;
    }
    let (stream, include_usage) = streaming(&mut f)?;
    Ok(Parsed {
        request: v1::GenerateRequest {
            model,
            prompt,
            prompt_token_ids,
            params: Some(params),
        },
        stream,
        include_usage,
    })
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &[u8]) -> Result<Parsed<v1::ChatRequest>, ApiError> {
    let mut f = Fields::parse(body)?;
    let model = f.take("model")?.unwrap_or_default();
    let messages = match f.take::<Vec<Value>>("messages")? {
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<_, _>>()?,
        // The service's validation says that a chat needs a message.
        None => Vec::new(),
    };
    if f.take::<Vec<Value>>("tools")?
        .is_some_and(|t| !t.is_empty())
    {
        return Err(unsupported("tools", "tools (function calling)"));
    }
    if let Some(format) = f.take_value("response_format")
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(unsupported(
            "response_format",
            &format!("response_format = {format}"),
        ));
    }
    let max_tokens = match f.take("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.take("max_tokens")?,
    };
    let mut params = sampling(&mut f, max_tokens)?;
    params.logprobs = f.take("logprobs")?.unwrap_or(false);
    params.top_logprobs = f.take("top_logprobs")?.unwrap_or(0);
    let (stream, include_usage) = streaming(&mut f)?;
    Ok(Parsed {
        request: v1::ChatRequest {
            model,
            messages,
            params: Some(params),
        },
        stream,
        include_usage,
    })
}

/// The JSON object of a request body, whose fields are taken one by one.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
        })?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            other => Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, not {}",
                    json_kind(&other)
                ),
            )),
        }
    }

    /// The field's value; absent and `null` are both `None`.
    fn take_value(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, ApiError> {
        self.take_value(name)
            .map(|v| {
                serde_json::from_value(v)
                    .map_err(|e| ApiError::invalid(Some(name), format!("{name}: {e}")))
            })
            .transpose()
    }
}

/// The sampling fields both endpoints share, plus the extensions other
/// OpenAI-compatible servers take (top_k, min_p, repetition_penalty,
/// ignore_eos, stop_token_ids).
fn sampling(f: &mut Fields, max_tokens: Option<u32>) -> Result<v1::SamplingParams, ApiError> {
    one_choice(f, "n")?;
    if f.take::<Map<String, Value>>("logit_bias")?
        .is_some_and(|b| !b.is_empty())
    {
        return Err(unsupported("logit_bias", "logit_bias"));
    }
    let stop = match f.take_value("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(list) => serde_json::from_value(list).map_err(|e| {
            ApiError::invalid(
                Some("stop"),
                format!("stop must be a string or a list of strings: {e}"),
            )
        })?,
    };
    Ok(v1::SamplingParams {
        max_new_tokens: max_tokens,
        temperature: f.take("temperature")?,
        top_k: f.take("top_k")?,
        top_p: f.take("top_p")?,
        min_p: f.take("min_p")?,
        repetition_penalty: f.take("repetition_penalty")?,
        presence_penalty: f.take("presence_penalty")?,
        frequency_penalty: f.take("frequency_penalty")?,
        seed: f.take("seed")?,
        stop,
        stop_token_ids: f.take("stop_token_ids")?.unwrap_or_default(),
        ignore_eos: f.take("ignore_eos")?.unwrap_or(false),
        logprobs: false,
        top_logprobs: 0,
    })
}

/// `n` (or `best_of`) other than 1: one request generates one sequence here.
fn one_choice(f: &mut Fields, name: &str) -> Result<(), ApiError> {
    match f.take::<i64>(name)? {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid(
            Some(name),
            format!(
                "{name} = {n} is not supported: this server returns one choice per request ({name} = 1)"
            ),
        )),
    }
}

fn streaming(f: &mut Fields) -> Result<(bool, bool), ApiError> {
    let stream = f.take("stream")?.unwrap_or(false);
    let include_usage = match f.take_value("stream_options") {
        None => false,
        Some(options) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    format!("stream_options.include_usage = {other} is not a boolean"),
                ));
            }
        },
    };
    Ok((stream, include_usage))
}

/// A completion prompt: a string, token ids, or a list holding one of them.
fn prompt(value: Option<Value>) -> Result<(String, Vec<u32>), ApiError> {
    let bad = |why: String| ApiError::invalid(Some("prompt"), why);
    match value {
        // The service's validation says that a prompt is needed.
        None => Ok((String::new(), Vec::new())),
        Some(Value::String(text)) => Ok((text, Vec::new())),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            let ids = serde_json::from_value(Value::Array(items))
                .map_err(|e| bad(format!("prompt: token ids must be integers >= 0: {e}")))?;
            Ok((String::new(), ids))
        }
        Some(Value::Array(mut items)) if items.len() == 1 => match items.pop() {
            Some(one @ (Value::String(_) | Value::Array(_))) => prompt(Some(one)),
            _ => Err(bad(
                "prompt must be a string, a list of token ids, or a list holding one of them"
                    .into(),
            )),
        },
        Some(Value::Array(items)) => Err(bad(format!(
            "prompt holds {} prompts; this server takes one prompt per request",
            items.len()
        ))),
        Some(other) => Err(bad(format!(
            "prompt must be a string or a list of token ids, not {}",
            json_kind(&other)
        ))),
    }
}

/// One chat message; its content is a string, or text parts joined.
fn message(i: usize, value: Value) -> Result<v1::ChatMessage, ApiError> {
    let Value::Object(mut m) = value else {
        return Err(ApiError::invalid(
            Some(&format!("messages[{i}]")),
            format!("messages[{i}] must be an object with role and content"),
        ));
    };
    let role = match m.remove("role") {
        Some(Value::String(role)) => role,
        other => {
            let param = format!("messages[{i}].role");
            let shown = other.map_or("missing".into(), |v| v.to_string());
            return Err(ApiError::invalid(
                Some(&param),
                format!("{param} = {shown} is not a string"),
            ));
        }
    };
    // OpenAI's newer name for the system role.
    let role = if role == "developer" {
        "system".to_owned()
    } else {
        role
    };
    let content = match m.remove("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        let param = format!("messages[{i}].content[{j}]");
                        return Err(ApiError::invalid(
                            Some(&param),
                            format!("{param} is not a text part; only text is supported"),
                        ));
                    }
                }
            }
            text
        }
        Some(other) => {
            let param = format!("messages[{i}].content");
            return Err(ApiError::invalid(
                Some(&param),
                format!("{param} must be a string, not {}", json_kind(&other)),
            ));
        }
    };
    Ok(v1::ChatMessage { role, content })
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(
        Some(param),
        format!("{what} is not supported by this server"),
    )
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(e: ApiError) -> (u16, Option<String>, String) {
        (e.status.as_u16(), e.param, e.message)
    }

    #[test]
    fn a_completion_maps_every_field() {
        let body = br#"{"model":"m","prompt":"Hi","max_tokens":5,"temperature":0,
            "top_p":0.5,"seed":7,"stop":"x","n":1,"stream":true,
            "stream_options":{"include_usage":true},"logprobs":2,"ignore_eos":true,"user":"u"}"#;
        let p = completion(body).unwrap();
        assert!(p.stream && p.include_usage);
        assert_eq!(p.request.model, "m");
        assert_eq!(p.request.prompt, "Hi");
        let params = p.request.params.unwrap();
        assert_eq!(params.max_new_tokens, Some(5));
        assert_eq!(params.temperature, Some(0.0));
        assert_eq!(params.top_p, Some(0.5));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.stop, ["x"]);
        assert!(params.logprobs && params.ignore_eos);
        assert_eq!(params.top_logprobs, 2);
    }

    #[test]
    fn prompts_come_as_text_ids_or_a_list_of_one() {
        let ids = |body: &[u8]| completion(body).unwrap().request.prompt_token_ids;
        assert_eq!(ids(br#"{"prompt":[1,2,3]}"#), [1, 2, 3]);
        assert_eq!(ids(br#"{"prompt":[[4,5]]}"#), [4, 5]);
        assert_eq!(
            completion(br#"{"prompt":["a b"]}"#).unwrap().request.prompt,
            "a b"
        );
        let e = completion(br#"{"prompt":["a","b"]}"#).unwrap_err();
        assert_eq!(param(e).1.as_deref(), Some("prompt"));
        let e = completion(br#"{"prompt":[1,-2]}"#).unwrap_err();
        assert_eq!(param(e).1.as_deref(), Some("prompt"));
    }

    #[test]
    fn stop_is_a_string_or_a_list() {
        let stop = |body: &[u8]| chat(body).unwrap().request.params.unwrap().stop;
        assert_eq!(stop(br#"{"stop":["a","b"]}"#), ["a", "b"]);
        assert_eq!(stop(br#"{"stop":null}"#), Vec::<String>::new());
        let e = chat(br#"{"stop":[1]}"#).unwrap_err();
        assert_eq!(param(e).1.as_deref(), Some("stop"));
    }

    #[test]
    fn a_chat_maps_messages_and_token_fields() {
        let body = br#"{"messages":[{"role":"developer","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]},
            {"role":"assistant","content":null}],
            "max_completion_tokens":3,"max_tokens":9,"logprobs":true,"top_logprobs":2}"#;
        let p = chat(body).unwrap();
        assert!(!p.stream);
        let m = &p.request.messages;
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", "Be brief.")
        );
        assert_eq!(m[1].content, "Hi there");
        assert_eq!(m[2].content, "");
        let params = p.request.params.unwrap();
        assert_eq!(params.max_new_tokens, Some(3));
        assert!(params.logprobs);
        assert_eq!(params.top_logprobs, 2);
    }

    #[test]
    fn what_the_grpc_request_cannot_say_is_400_naming_the_field() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"messages":[],"n":2}"#, "n"),
            (br#"{"prompt":"x","best_of":3}"#, "best_of"),
            (br#"{"prompt":"x","echo":true}"#, "echo"),
            (br#"{"messages":[],"temperature":"hot"}"#, "temperature"),
            (
                br#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (br#"{"messages":[{"content":"x"}]}"#, "messages[0].role"),
            (br#"{"messages":[],"tools":[{"type":"function"}]}"#, "tools"),
            (br#"{"messages":[],"logit_bias":{"5":1}}"#, "logit_bias"),
        ];
        for (body, field) in cases {
            let result = if body.starts_with(br#"{"prompt""#) {
                completion(body).map(|_| ())
            } else {
                chat(body).map(|_| ())
            };
            let (status, got, message) = param(result.unwrap_err());
            assert_eq!(status, 400);
            assert_eq!(got.as_deref(), Some(field), "{message}");
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn malformed_json_is_400_saying_so() {
        let (status, got, message) = param(chat(br#"{"messages": [}"#).unwrap_err());
        assert_eq!((status, got), (400, None));
        assert!(message.contains("not valid JSON"), "{message}");
        assert!(message.contains("line 1"), "{message}");
        let (_, _, message) = param(chat(b"[1]").unwrap_err());
        assert!(
            message.contains("must be a JSON object, not a list"),
            "{message}"
        );
    }

    #[test]
    fn values_are_left_to_the_services_validation() {
        // Out-of-range values pass through: the Generation service rejects
        // them with the same messages as on gRPC.
        let p = chat(br#"{"messages":[],"temperature":-1,"max_tokens":0}"#).unwrap();
        assert!(p.request.messages.is_empty());
        let params = p.request.params.unwrap();
        assert_eq!(params.temperature, Some(-1.0));
        assert_eq!(params.max_new_tokens, Some(0));
    }
}
