//! An Aquila-7B-format model folder end to end: the official tokenizer files
//! (`vocab.json` + `merges.txt`, from AQUILA_TOKENIZER_DIR), a `config.json`
//! that says `AquilaModel` with the published (wrong) bos 1 / eos 2, and
//! random tiny weights over the real 100,008-token vocabulary as sharded
//! PyTorch `.bin` like the official release. Through the gateway: the golden
//! encodings, the AquilaChat template (golden line 3 is exactly its rendering
//! of one question), and the real end-of-sequence tokens.

mod common;

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{
    ChatMessage, ChatRequest, ListModelsRequest, SamplingParams, TokenizeRequest,
};
use aquila_proto::worker::v1::GetModelInfoRequest;
use aquila_proto::worker::v1::worker_client::WorkerClient;
use aquila_worker::export::{ExportTensor, FloatDtype, write_pytorch_bin};
use aquila_worker::presets::{Preset, tensors};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 100_008;

fn write_aquila_folder(tok_dir: &std::path::Path, out: &std::path::Path) {
    for f in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tok_dir.join(f), out.join(f)).unwrap();
    }
    let s = Preset::Tiny.shape();
    let config = serde_json::json!({
        "architectures": ["AquilaModel"], "model_type": "aquila",
        "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    // Tiny's layers without grouped KV (Aquila has none), then embeddings
    // and lm_head over the real vocabulary.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut ts: Vec<ExportTensor> = tensors(Preset::Tiny, 3)
        .into_iter()
        .filter(|t| !t.name.contains("embed_tokens") && t.name != "lm_head.weight")
        .map(|mut t| {
            if t.name.contains("k_proj") || t.name.contains("v_proj") {
                t.shape[0] = s.hidden;
                t.data = (0..s.hidden * s.hidden)
                    .map(|_| rng.random::<f32>() * 0.4 - 0.2)
                    .collect();
            }
            t
        })
        .collect();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let data = (0..VOCAB * s.hidden)
            .map(|_| rng.random::<f32>() * 0.2 - 0.1)
            .collect();
        ts.push(ExportTensor {
            name: name.into(),
            shape: vec![VOCAB, s.hidden],
            data,
        });
    }
    // fp16, like the official release's shards.
    write_pytorch_bin(out, &ts, 2, FloatDtype::F16).unwrap();
}

#[tokio::test]
async fn aquila_folder_tokenizes_templates_and_stops_like_aquila() {
    let Some(tok_dir) = common::env_or_skip("AQUILA_TOKENIZER_DIR", ".ci/run") else {
        return;
    };
    let tok_dir = std::path::PathBuf::from(tok_dir);
    let dir = tempfile::tempdir().unwrap();
    write_aquila_folder(&tok_dir, dir.path());
    assert!(dir.path().join("pytorch_model.bin.index.json").exists());

    let worker = common::spawn_worker(dir.path(), &[]);
    let gateway = common::spawn_gateway(&[&worker], &[]);
    common::wait_serving(&gateway.url()).await;

    let mut w = WorkerClient::connect(worker.url()).await.unwrap();
    let info = w
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.eos_token_ids,
        vec![100_007, 0],
        "Aquila stops on </s> and <|endoftext|>"
    );
    assert_eq!(info.bos_token_id, None, "chat prompts are sent without bos");
    assert_eq!(info.chat_stop, vec!["###".to_string()]);

    let mut c = GenerationClient::connect(gateway.url()).await.unwrap();
    let m = &c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models[0];
    assert_eq!(
        (m.architecture.as_str(), m.vocab_size, m.has_chat_template),
        ("AquilaModel", VOCAB as u32, true)
    );
    // --dtype auto keeps an fp16 checkpoint in f16 and says why; the
    // Aquila vocabulary gets AquilaChat's template.
    assert_eq!(m.dtype, "f16");
    assert!(
        m.dtype_reason.contains("float16") && m.dtype_reason.contains("auto"),
        "{}",
        m.dtype_reason
    );
    assert_eq!(m.chat_template_name, "aquila-chat");

    // The gateway's tokenizer (shipped by the worker as JSON) reproduces
    // every golden encoding.
    let golden = std::fs::read_to_string(tok_dir.join("golden.jsonl")).unwrap();
    let mut lines = 0;
    for line in golden.lines() {
        let g: serde_json::Value = serde_json::from_str(line).unwrap();
        let want: Vec<u32> = g["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = g["text"].as_str().unwrap().to_string();
        let got = c
            .tokenize(TokenizeRequest {
                text: text.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.token_ids, want, "tokenize {text:?}");
        lines += 1;
    }
    assert!(lines >= 10);

    // Golden line 3 is the AquilaChat rendering of this question: 41 tokens.
    let r = c
        .chat(ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "北京有哪些好玩的地方？".into(),
            }],
            params: Some(SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.usage.unwrap().prompt_tokens, 41);
}

/// The prompt tokens of a chat through `gateway` against the tokens of the
/// text the template should render, and the finish of a short greedy run.
async fn chat_prompt_is(gateway: &common::Proc, messages: &[(&str, &str)], rendered: &str) {
    let mut c = GenerationClient::connect(gateway.url()).await.unwrap();
    let want = c
        .tokenize(TokenizeRequest {
            text: rendered.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    let r = c
        .chat(ChatRequest {
            messages: messages
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: role.to_string(),
                    content: content.to_string(),
                })
                .collect(),
            params: Some(SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.usage.unwrap().prompt_tokens as usize,
        want.len(),
        "chat prompt vs tokens of {rendered:?}"
    );
}

#[tokio::test]
async fn named_chat_templates_render_aquilas_other_formats() {
    let Some(tok_dir) = common::env_or_skip("AQUILA_TOKENIZER_DIR", ".ci/run") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_aquila_folder(std::path::Path::new(&tok_dir), dir.path());
    let conversation = [
        ("user", "北京有哪些好玩的地方？"),
        ("assistant", "故宫。"),
        ("user", "还有呢？"),
    ];
    for (name, rendered) in [
        // The model card's FlagAI predictor format.
        (
            "aquila-legacy",
            "[CLS]#用户#北京有哪些好玩的地方？ #ai助手#故宫。 #用户#还有呢？ #ai助手#",
        ),
        // Aquila2's.
        (
            "aquila-v1",
            "<|startofpiece|>北京有哪些好玩的地方？<|endofpiece|>故宫。</s>\
             <|startofpiece|>还有呢？<|endofpiece|>",
        ),
    ] {
        let worker = common::spawn_worker(dir.path(), &["--chat-template", name]);
        let gateway = common::spawn_gateway(&[&worker], &[]);
        common::wait_serving(&gateway.url()).await;
        let mut c = GenerationClient::connect(gateway.url()).await.unwrap();
        let m = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models
            .remove(0);
        assert_eq!(m.chat_template_name, name);
        chat_prompt_is(&gateway, &conversation, rendered).await;
    }

    // A file of the user's own, named by its path.
    let file = dir.path().join("mine.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>",
    )
    .unwrap();
    let worker = common::spawn_worker(dir.path(), &["--chat-template", file.to_str().unwrap()]);
    let gateway = common::spawn_gateway(&[&worker], &[]);
    common::wait_serving(&gateway.url()).await;
    chat_prompt_is(
        &gateway,
        &conversation[..1],
        "<user>北京有哪些好玩的地方？<assistant>",
    )
    .await;

    // An unknown name is refused at start, naming it and the built-ins.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aquila"))
        .args(["worker", "--model", dir.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--chat-template", "aquila-v9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("aquila-v9") && err.contains("aquila-legacy"),
        "{err}"
    );
}
