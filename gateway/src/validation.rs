//! Parses public requests into [`ValidRequest`]: resolved sampling parameters
//! the worker can use as they are.
//!
//! Every error is INVALID_ARGUMENT and names the field, the value and the
//! limit. This module is pure: no tokenizer, no network; the caller turns
//! text into ids first.

use aquila_proto::v1;
use aquila_proto::worker::v1 as worker;

use crate::config::Limits;
use crate::error::GatewayError;

const MAX_TEMPERATURE: f32 = 100.0;
const MAX_REPETITION_PENALTY: f32 = 10.0;
const PENALTY_RANGE: f32 = 2.0;
const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// What the model imposes on a request.
#[derive(Debug, Clone, Copy)]
pub struct ModelLimits {
    pub vocab_size: u32,
    pub context_length: u32,
}

/// A request the worker will accept: every parameter resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt_token_ids: Vec<u32>,
    pub params: worker::SamplingParams,
    /// The client's stop strings followed by any the chat template implies.
    pub stop: Vec<String>,
}

/// The prompt of a `GenerateRequest`, exactly one of its two forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

fn invalid(message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
}

pub fn parse_prompt(request: &v1::GenerateRequest) -> Result<Prompt, GatewayError> {
    match (
        request.prompt.is_empty(),
        request.prompt_token_ids.is_empty(),
    ) {
        (false, true) => Ok(Prompt::Text(request.prompt.clone())),
        (true, false) => Ok(Prompt::TokenIds(request.prompt_token_ids.clone())),
        (true, true) => Err(invalid(
            "prompt is empty and prompt_token_ids is empty; set exactly one of them",
        )),
        (false, false) => Err(invalid(format!(
            "prompt ({} bytes) and prompt_token_ids ({} ids) are both set; set exactly one of them",
            request.prompt.len(),
            request.prompt_token_ids.len()
        ))),
    }
}

pub fn validate_messages(messages: &[v1::ChatMessage]) -> Result<(), GatewayError> {
    if messages.is_empty() {
        return Err(invalid(
            "messages is empty; a chat needs at least one message",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}].role = {:?} is not one of system, user, assistant",
                m.role
            )));
        }
    }
    Ok(())
}

/// Checks the prompt ids and the sampling parameters against the gateway's
/// limits and the model's, resolving every default.
pub fn validate(
    prompt_token_ids: Vec<u32>,
    params: Option<&v1::SamplingParams>,
    limits: &Limits,
    model: ModelLimits,
    implied_stop: &[String],
) -> Result<ValidRequest, GatewayError> {
    let default_params = v1::SamplingParams::default();
    let p = params.unwrap_or(&default_params);
    let context = model.context_length;

    if let Some((i, id)) = first_out_of_vocab(&prompt_token_ids, model.vocab_size) {
        return Err(invalid(format!(
            "prompt_token_ids[{i}] = {id} is not below the vocabulary size {}",
            model.vocab_size
        )));
    }
    let prompt_len = u32::try_from(prompt_token_ids.len()).unwrap_or(u32::MAX);
    if prompt_len >= context {
        return Err(invalid(format!(
            "prompt has {prompt_len} tokens; the model's context is {context} tokens \
             and at least one must be left to generate"
        )));
    }
    let room = context - prompt_len;
    let max_new_tokens = match p.max_new_tokens {
        Some(0) => return Err(invalid("params.max_new_tokens = 0 must be at least 1")),
        Some(n) if n > room => {
            return Err(invalid(format!(
                "params.max_new_tokens = {n} plus the prompt's {prompt_len} tokens exceeds \
                 the model's context of {context} tokens"
            )));
        }
        Some(n) => n,
        None => limits.default_max_new_tokens.min(room),
    };

    let temperature = p.temperature.unwrap_or(limits.default_temperature);
    if !temperature.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(invalid(format!(
            "params.temperature = {temperature} is outside [0, {MAX_TEMPERATURE}]"
        )));
    }
    let top_k = p.top_k.unwrap_or(0);
    let top_k = u32::try_from(top_k).map_err(|_| {
        invalid(format!(
            "params.top_k = {top_k} is negative; it must be >= 0 (0 disables)"
        ))
    })?;
    let top_p = p.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(invalid(format!("params.top_p = {top_p} is outside (0, 1]")));
    }
    let min_p = p.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid(format!("params.min_p = {min_p} is outside [0, 1]")));
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty.is_nan()
        || repetition_penalty <= 0.0
        || repetition_penalty > MAX_REPETITION_PENALTY
    {
        return Err(invalid(format!(
            "params.repetition_penalty = {repetition_penalty} is outside (0, {MAX_REPETITION_PENALTY}]"
        )));
    }
    let presence_penalty = penalty("presence_penalty", p.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", p.frequency_penalty)?;

    let stop = validate_stop(&p.stop, limits)?;
    if let Some((i, id)) = first_out_of_vocab(&p.stop_token_ids, model.vocab_size) {
        return Err(invalid(format!(
            "params.stop_token_ids[{i}] = {id} is not below the vocabulary size {}",
            model.vocab_size
        )));
    }
    if p.top_logprobs > limits.max_top_logprobs {
        return Err(invalid(format!(
            "params.top_logprobs = {} exceeds the limit of {}",
            p.top_logprobs, limits.max_top_logprobs
        )));
    }

    let mut stop = stop;
    for s in implied_stop {
        if !s.is_empty() && !stop.contains(s) {
            stop.push(s.clone());
        }
    }
    Ok(ValidRequest {
        prompt_token_ids,
        params: worker::SamplingParams {
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed: p.seed,
            stop_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
            logprobs: p.logprobs || p.top_logprobs > 0,
            top_logprobs: p.top_logprobs,
        },
        stop,
    })
}

fn first_out_of_vocab(ids: &[u32], vocab_size: u32) -> Option<(usize, u32)> {
    ids.iter()
        .copied()
        .enumerate()
        .find(|&(_, id)| id >= vocab_size)
}

fn penalty(field: &str, value: Option<f32>) -> Result<f32, GatewayError> {
    let value = value.unwrap_or(0.0);
    if !(-PENALTY_RANGE..=PENALTY_RANGE).contains(&value) {
        return Err(invalid(format!(
            "params.{field} = {value} is outside [-{PENALTY_RANGE}, {PENALTY_RANGE}]"
        )));
    }
    Ok(value)
}

fn validate_stop(stop: &[String], limits: &Limits) -> Result<Vec<String>, GatewayError> {
    if stop.len() > limits.max_stop_strings {
        return Err(invalid(format!(
            "params.stop has {} strings, more than the limit of {}",
            stop.len(),
            limits.max_stop_strings
        )));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return Err(invalid(format!(
                "params.stop[{i}] = \"\" is empty; stop strings must be at least 1 byte"
            )));
        }
        if s.len() > limits.max_stop_string_bytes {
            return Err(invalid(format!(
                "params.stop[{i}] = {s:?} is {} bytes, more than the limit of {} bytes",
                s.len(),
                limits.max_stop_string_bytes
            )));
        }
    }
    Ok(stop.to_vec())
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;
