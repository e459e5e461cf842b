//! Chat templates: Hugging Face-style Jinja rendered with minijinja.
//!
//! A template is compiled once (at start-up for `--chat-template`, when a
//! model is first loaded otherwise) and rendered per request with `messages`,
//! `add_generation_prompt = true`, `bos_token` and `eos_token`. This module
//! turns messages into text only; tokenizing and validation live elsewhere.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

/// One conversation turn as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from (a file's path), for ListModels.
    name: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; the error says where the syntax is wrong.
    pub fn compile(source: &str) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // Hugging Face renders with these Jinja settings; templates are
        // written for them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        Ok(ChatTemplate {
            env,
            name: String::new(),
        })
    }

    /// The same template, known as `name`.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..self
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn render(
        &self,
        messages: &[Message],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, minijinja::Error> {
        self.env.get_template(TEMPLATE_NAME)?.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
    }
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The full error text, including the chain minijinja keeps in `source`.
pub fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const AQUILA: &str = "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}{% else %}A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.{% set rest = messages %}{% endif %}{% for m in rest %}{% if m['role'] == 'user' %}###Human: {{ m['content'] }}{% else %}###Assistant: {{ m['content'] }}{% endif %}{% endfor %}###Assistant:";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_chatml_adds_default_system_prompt() {
        let template = ChatTemplate::compile(SMOLLM2).unwrap();
        let text = template
            .render(&[msg("user", "What is the capital of France?")], "", "")
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_chatml_keeps_given_system_prompt() {
        let template = ChatTemplate::compile(SMOLLM2).unwrap();
        let text = template
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], "", "")
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn aquila_template_renders_exactly() {
        let template = ChatTemplate::compile(AQUILA).unwrap();
        let text = template
            .render(&[msg("user", "北京有哪些好玩的地方？")], "", "</s>")
            .unwrap();
        assert_eq!(
            text,
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.###Human: 北京有哪些好玩的地方？###Assistant:"
        );
    }

    #[test]
    fn aquila_template_multi_turn_with_system() {
        let template = ChatTemplate::compile(AQUILA).unwrap();
        let text = template
            .render(
                &[
                    msg("system", "S."),
                    msg("user", "q1"),
                    msg("assistant", "a1"),
                    msg("user", "q2"),
                ],
                "",
                "",
            )
            .unwrap();
        assert_eq!(
            text,
            "S.###Human: q1###Assistant: a1###Human: q2###Assistant:"
        );
    }

    #[test]
    fn pycompat_methods_and_special_variables_work() {
        let template = ChatTemplate::compile(
            "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% endfor %}{{ eos_token }}",
        )
        .unwrap();
        let text = template
            .render(&[msg("user", "  padded  ")], "<s>", "</s>")
            .unwrap();
        assert_eq!(text, "<s>padded</s>");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let template = ChatTemplate::compile(
            "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}{% endif %}",
        )
        .unwrap();
        let error = template
            .render(&[msg("assistant", "x")], "", "")
            .unwrap_err();
        assert!(describe(&error).contains("must start with user"));
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(ChatTemplate::compile("{% for m in messages %}").is_err());
    }
}
