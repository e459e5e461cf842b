//! `aquila generate` and `aquila chat`: a terminal client of the public API
//! that prints text as it streams in.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use aquila_proto::tls::ClientTlsArgs;
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{
    ChatMessage, ChatRequest, GenerateRequest, GenerateResponse, SamplingParams,
};
use tonic::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct CommonArgs {
    /// Gateway address (http:// or https://).
    #[arg(long, env = "AQUILA_GATEWAY", default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// API key, sent as "authorization: Bearer KEY", for a gateway started
    /// with --api-key or --api-key-file.
    #[arg(long, env = "AQUILA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Model name (default: the gateway's only model).
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<i32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Text to complete.
    prompt: String,
}

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// The message; without one, an interactive session reads lines from stdin.
    message: Option<String>,
}

impl CommonArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            ..Default::default()
        }
    }

    async fn connect(&self) -> Result<Client> {
        let endpoint = self.tls.endpoint(&self.gateway)?;
        let authorization = match &self.api_key {
            None => None,
            // The error would show the key: say only what is wrong with it.
            Some(key) => Some(
                MetadataValue::try_from(format!("Bearer {}", key.trim())).map_err(|_| {
                    anyhow::anyhow!("--api-key holds characters a header cannot carry")
                })?,
            ),
        };
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the gateway at {}", endpoint.uri()))?;
        Ok(Client {
            inner: GenerationClient::new(channel),
            authorization,
        })
    }
}

/// A gateway client that sends the API key, if any, with every call.
struct Client {
    inner: GenerationClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Client {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

pub async fn generate(args: GenerateArgs) -> Result<()> {
    let mut client = args.common.connect().await?;
    let request = client.request(GenerateRequest {
        model: args.common.model.clone(),
        prompt: args.prompt,
        prompt_token_ids: vec![],
        params: Some(args.common.params()),
    });
    let stream = client.inner.generate_stream(request).await?.into_inner();
    print_stream(stream).await?;
    Ok(())
}

pub async fn chat(args: ChatArgs) -> Result<()> {
    let mut client = args.common.connect().await?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(message("system", system));
    }
    if let Some(m) = &args.message {
        messages.push(message("user", m));
        let request = client.request(chat_request(&args, &messages));
        let stream = client.inner.chat_stream(request).await?.into_inner();
        print_stream(stream).await?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        messages.push(message("user", line.trim_end()));
        let request = client.request(chat_request(&args, &messages));
        let stream = client.inner.chat_stream(request).await?.into_inner();
        let answer = print_stream(stream).await?;
        messages.push(message("assistant", &answer));
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn chat_request(args: &ChatArgs, messages: &[ChatMessage]) -> ChatRequest {
    ChatRequest {
        model: args.common.model.clone(),
        messages: messages.to_vec(),
        params: Some(args.common.params()),
    }
}

/// Prints text as it arrives; returns the whole text.
async fn print_stream(mut stream: Streaming<GenerateResponse>) -> Result<String> {
    let mut text = String::new();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        out.write_all(msg.text.as_bytes())?;
        out.flush()?;
        text.push_str(&msg.text);
        if let Some(u) = msg.usage.filter(|_| msg.finish_reason != 0) {
            let t = msg.timings.unwrap_or_default();
            eprintln!(
                "\n[{} prompt + {} generated tokens, first token {:.0} ms, total {:.2} s]",
                u.prompt_tokens,
                u.completion_tokens,
                t.time_to_first_token_seconds * 1000.0,
                t.total_seconds
            );
        }
    }
    println!();
    Ok(text)
}
