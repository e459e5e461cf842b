//! A model as the gateway knows it: the worker's `ModelInfo`, its tokenizer
//! and its chat template, built once per model name and shared by replicas.
//!
//! Text to ids happens here (plain prompts, chat, Tokenize). This module
//! never talks to a worker; the pool hands it the `ModelInfo`.

use std::str::FromStr;
use std::sync::Arc;

use aquila_proto::worker::v1 as worker;
use tokenizers::Tokenizer;

use crate::error::GatewayError;
use crate::template::{self, ChatTemplate, Message};
use crate::validation::ModelLimits;

#[derive(Debug)]
enum TemplateState {
    Missing,
    Ready(Arc<ChatTemplate>),
    Broken(String),
}

pub struct Model {
    /// The worker's model info without `tokenizer_json` (parsed into `tokenizer`).
    pub info: worker::ModelInfo,
    pub tokenizer: Tokenizer,
    template: TemplateState,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokenizer runs to megabytes; the name identifies the model.
        f.debug_struct("Model")
            .field("name", &self.info.name)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Parses the tokenizer and compiles the template (`override_template`
    /// wins over the worker's). Only an unusable tokenizer is an error; a
    /// broken template makes chat fail later with a clear message instead.
    pub fn from_info(
        mut info: worker::ModelInfo,
        override_template: Option<Arc<ChatTemplate>>,
    ) -> Result<Self, String> {
        let tokenizer = Tokenizer::from_str(&info.tokenizer_json)
            .map_err(|e| format!("tokenizer_json is not a usable tokenizer: {e}"))?;
        info.tokenizer_json = String::new();
        let template = match override_template {
            Some(t) => {
                info.chat_template_name = t.name().to_string();
                TemplateState::Ready(t)
            }
            None if info.chat_template.trim().is_empty() => TemplateState::Missing,
            None => match ChatTemplate::compile(&info.chat_template) {
                Ok(t) => TemplateState::Ready(Arc::new(t)),
                Err(e) => TemplateState::Broken(template::describe(&e)),
            },
        };
        Ok(Model {
            info,
            tokenizer,
            template,
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn has_chat_template(&self) -> bool {
        matches!(self.template, TemplateState::Ready(_))
    }

    pub fn limits(&self) -> ModelLimits {
        ModelLimits {
            vocab_size: self.info.vocab_size,
            context_length: self.info.context_length,
        }
    }

    /// Token ids of `text`, with the model's bos first when `add_bos` and the
    /// model has one. Special tokens written in the text match as specials.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, GatewayError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| GatewayError::Tokenizer {
                model: self.name().to_owned(),
                reason: e.to_string(),
            })?;
        let bos = self.info.bos_token_id.filter(|_| add_bos);
        Ok(bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    }

    /// Renders the conversation with the chat template and tokenizes it
    /// without bos (templates write it themselves).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, GatewayError> {
        let template = match &self.template {
            TemplateState::Ready(t) => t,
            TemplateState::Missing => {
                return Err(GatewayError::NoChatTemplate {
                    model: self.name().to_owned(),
                });
            }
            TemplateState::Broken(reason) => {
                return Err(GatewayError::BrokenChatTemplate {
                    model: self.name().to_owned(),
                    reason: reason.clone(),
                });
            }
        };
        let text = template
            .render(messages, &self.info.bos_token, &self.info.eos_token)
            .map_err(|e| GatewayError::TemplateRender {
                model: self.name().to_owned(),
                reason: template::describe(&e),
            })?;
        self.encode(&text, false)
    }

    /// The vocabulary entry of `id`, empty when the tokenizer has none.
    pub fn piece(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::detokenize::tests::byte_tokenizer;

    pub(crate) fn info(name: &str, chat_template: &str) -> worker::ModelInfo {
        worker::ModelInfo {
            name: name.into(),
            context_length: 64,
            vocab_size: 257,
            tokenizer_json: byte_tokenizer().to_string(false).unwrap(),
            chat_template: chat_template.into(),
            bos_token_id: Some(256),
            bos_token: "<eos>".into(),
            ..Default::default()
        }
    }

    #[test]
    fn plain_prompts_get_bos_when_asked() {
        let model = Model::from_info(info("m", ""), None).unwrap();
        assert_eq!(model.encode("hi", true).unwrap(), [256, 104, 105]);
        assert_eq!(model.encode("hi", false).unwrap(), [104, 105]);
        assert!(model.info.tokenizer_json.is_empty());
    }

    #[test]
    fn chat_renders_and_matches_special_tokens_in_the_template() {
        let model =
            Model::from_info(info("m", "{{ bos_token }}{{ messages[0].content }}"), None).unwrap();
        let messages = [Message {
            role: "user".into(),
            content: "ok".into(),
        }];
        assert_eq!(model.encode_chat(&messages).unwrap(), [256, 111, 107]);
    }

    #[test]
    fn chat_without_template_is_failed_precondition() {
        let model = Model::from_info(info("m", ""), None).unwrap();
        let status = model.encode_chat(&[]).unwrap_err().to_status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("model m has no chat template"));
    }

    #[test]
    fn override_template_wins_and_broken_ones_are_reported() {
        let over = Arc::new(ChatTemplate::compile("X").unwrap());
        let model = Model::from_info(info("m", "{% broken"), Some(over)).unwrap();
        assert_eq!(model.encode_chat(&[]).unwrap(), [u32::from(b'X')]);

        let model = Model::from_info(info("m", "{% broken"), None).unwrap();
        let status = model.encode_chat(&[]).unwrap_err().to_status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn bad_tokenizer_json_is_an_error() {
        let mut bad = info("m", "");
        bad.tokenizer_json = "{}".into();
        assert!(Model::from_info(bad, None).is_err());
    }
}
