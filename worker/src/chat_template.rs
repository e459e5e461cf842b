//! The chat templates a worker can serve besides a checkpoint's own:
//! `--chat-template NAME|FILE`. Each built-in is a Jinja template in Hugging
//! Face conventions (rendered by the gateway with `trim_blocks` and
//! `lstrip_blocks`), with the stop strings its format implies. They are
//! text only: rendering is the gateway's job.

use std::path::Path;

use crate::error::{Result, WorkerError};

/// AquilaChat-7B's conversation format (FastChat's `aquila-chat`): system
/// text, then `###Human: q###Assistant: a` turns, no bos; generation stops
/// at `###` as well as at the end-of-sequence tokens.
pub const AQUILA_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}\
{{ messages[0]['content'] }}{% set rest = messages[1:] %}\
{% else %}A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.\
{% set rest = messages %}{% endif %}\
{% for m in rest %}{% if m['role'] == 'user' %}###Human: {{ m['content'] }}\
{% else %}###Assistant: {{ m['content'] }}{% endif %}{% endfor %}###Assistant:";

/// Aquila2 chat models' format (AquilaChat2-7B's `aquila-v1`):
/// `<|startofpiece|>q<|endofpiece|>a</s>` per turn, a system message as
/// plain text first; the model ends its answer with `</s>` (an
/// end-of-sequence token already).
const AQUILA_V1_TEMPLATE: &str = "{% for m in messages %}\
{% if m['role'] == 'system' %}{{ m['content'] }}\
{% elif m['role'] == 'user' %}<|startofpiece|>{{ m['content'] }}\
{% else %}<|endofpiece|>{{ m['content'] }}</s>{% endif %}{% endfor %}\
<|endofpiece|>";

/// The format of FlagAI's predictor for AquilaChat-7B, as its model card
/// shows: `[CLS]` then `#用户#{question} #ai助手#` per turn, turns joined by
/// a space, a system message as plain text after `[CLS]`; stop where the
/// model starts the next user turn.
const AQUILA_LEGACY_TEMPLATE: &str = "[CLS]{% for m in messages %}\
{% if m['role'] == 'system' %}{{ m['content'] }}\
{% elif m['role'] == 'user' %}#用户#{{ m['content'] }} #ai助手#\
{% else %}{{ m['content'] }} {% endif %}{% endfor %}";

/// A built-in template.
pub struct BuiltIn {
    pub name: &'static str,
    pub template: &'static str,
    pub stop: &'static [&'static str],
}

pub const BUILT_INS: [BuiltIn; 3] = [
    BuiltIn {
        name: "aquila-chat",
        template: AQUILA_CHAT_TEMPLATE,
        stop: &["###"],
    },
    BuiltIn {
        name: "aquila-v1",
        template: AQUILA_V1_TEMPLATE,
        stop: &[],
    },
    BuiltIn {
        name: "aquila-legacy",
        template: AQUILA_LEGACY_TEMPLATE,
        stop: &["#用户#"],
    },
];

/// A template to serve: its name (a built-in's, "model" for the
/// checkpoint's own, or the file's path), its text and its stop strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub name: String,
    pub template: String,
    pub stop: Vec<String>,
}

impl Chosen {
    pub fn built_in(name: &str) -> Option<Self> {
        BUILT_INS.iter().find(|b| b.name == name).map(|b| Self {
            name: b.name.to_string(),
            template: b.template.to_string(),
            stop: b.stop.iter().map(|s| s.to_string()).collect(),
        })
    }
}

/// `--chat-template`'s value: a built-in's name, or a file holding a Jinja
/// template (no stop strings of its own).
pub fn from_flag(value: &str) -> Result<Chosen> {
    if let Some(b) = Chosen::built_in(value) {
        return Ok(b);
    }
    let path = Path::new(value);
    if !path.exists() {
        let names: Vec<&str> = BUILT_INS.iter().map(|b| b.name).collect();
        return Err(WorkerError::Config(format!(
            "--chat-template = {value}: neither a built-in template ({}) nor a file",
            names.join(", ")
        )));
    }
    let template = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::io(format!("--chat-template: reading {}", path.display()), e))?;
    Ok(Chosen {
        name: path.display().to_string(),
        template,
        stop: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files_resolve_and_anything_else_is_refused() {
        assert_eq!(from_flag("aquila-v1").unwrap().name, "aquila-v1");
        assert_eq!(from_flag("aquila-chat").unwrap().stop, vec!["###"]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jinja");
        std::fs::write(&file, "{{ messages[0]['content'] }}").unwrap();
        let chosen = from_flag(file.to_str().unwrap()).unwrap();
        assert_eq!(chosen.template, "{{ messages[0]['content'] }}");
        assert_eq!(chosen.name, file.display().to_string());
        let e = from_flag("chatml").unwrap_err().to_string();
        assert!(
            e.contains("--chat-template = chatml: neither a built-in template (aquila-chat, aquila-v1, aquila-legacy) nor a file"),
            "{e}"
        );
    }
}
