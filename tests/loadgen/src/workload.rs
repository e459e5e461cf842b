//! What each request asks for: a prompt (token ids, or text from a JSONL
//! file) and an output length. Request `i` is a pure function of the seed and
//! `i`, whatever order requests are sent in, so two runs send the same set.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;

use crate::dist::LengthDist;
use crate::error::LoadgenError;

/// Random streams of one seed, kept apart so that, say, changing the arrival
/// rate does not change the prompts. Request `i` uses stream `i`.
const WARMUP_STREAM: u64 = 1 << 63;
const PREFIX_STREAM: u64 = 1 << 62;
pub(crate) const ARRIVAL_STREAM: u64 = 1 << 61;

/// The random stream `stream` of `seed`.
pub(crate) fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// One line of a prompts file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilePrompt {
    pub prompt: String,
    pub max_new_tokens: Option<u32>,
}

#[derive(Debug, Clone)]
pub(crate) enum Workload {
    Synthetic {
        prompt: LengthDist,
        output: LengthDist,
        /// Ids are drawn from `vocab.0..vocab.1`.
        vocab: (u32, u32),
        /// The first ids of every prompt.
        prefix: Vec<u32>,
    },
    File {
        /// Never empty.
        prompts: Vec<FilePrompt>,
        /// For lines without `max_new_tokens`.
        output: LengthDist,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// Everything that differs between two requests of a run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RequestSpec {
    pub prompt: Prompt,
    pub max_new_tokens: u32,
    /// The request's own sampling seed.
    pub seed: u64,
}

impl Workload {
    pub(crate) fn synthetic(
        prompt: LengthDist,
        output: LengthDist,
        vocab: (u32, u32),
        shared_prefix: u32,
        seed: u64,
    ) -> Self {
        let mut r = rng(seed, PREFIX_STREAM);
        let prefix = (0..shared_prefix)
            .map(|_| r.random_range(vocab.0..vocab.1))
            .collect();
        Workload::Synthetic {
            prompt,
            output,
            vocab,
            prefix,
        }
    }

    /// Request `index` of the measured run, or of the warm-up.
    pub(crate) fn request(&self, seed: u64, index: u64, warmup: bool) -> RequestSpec {
        let stream = if warmup { WARMUP_STREAM | index } else { index };
        let mut r = rng(seed, stream);
        match self {
            Workload::Synthetic {
                prompt,
                output,
                vocab,
                prefix,
            } => {
                let len = prompt.sample(&mut r) as usize;
                let shared = len.min(prefix.len());
                let mut ids = prefix[..shared].to_vec();
                ids.extend((shared..len).map(|_| r.random_range(vocab.0..vocab.1)));
                RequestSpec {
                    prompt: Prompt::Ids(ids),
                    max_new_tokens: output.sample(&mut r),
                    seed: r.random(),
                }
            }
            Workload::File { prompts, output } => {
                let line = &prompts[(index % prompts.len() as u64) as usize];
                let sampled = output.sample(&mut r);
                RequestSpec {
                    prompt: Prompt::Text(line.prompt.clone()),
                    max_new_tokens: line.max_new_tokens.unwrap_or(sampled),
                    seed: r.random(),
                }
            }
        }
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Workload::Synthetic {
                prompt,
                output,
                vocab,
                prefix,
            } => json!({
                "kind": "token_ids",
                "prompt_tokens": prompt.to_string(),
                "output_tokens": output.to_string(),
                "vocab_range": [vocab.0, vocab.1],
                "shared_prefix_tokens": prefix.len(),
            }),
            Workload::File { prompts, output } => json!({
                "kind": "prompts_file",
                "prompts": prompts.len(),
                "output_tokens": output.to_string(),
            }),
        }
    }
}

/// Reads a JSONL prompts file: one object per non-blank line.
pub(crate) fn read_prompts(path: &Path) -> Result<Vec<FilePrompt>, LoadgenError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadgenError::PromptsFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: usize, reason: String| LoadgenError::PromptsFileLine {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: FilePrompt = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        if p.prompt.is_empty() {
            return Err(bad(i + 1, "prompt is empty".into()));
        }
        if p.max_new_tokens == Some(0) {
            return Err(bad(i + 1, "max_new_tokens must be at least 1".into()));
        }
        prompts.push(p);
    }
    if prompts.is_empty() {
        return Err(bad(0, "no prompts in the file".into()));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn synthetic(prefix: u32) -> Workload {
        Workload::synthetic(
            LengthDist::Uniform { min: 8, max: 32 },
            LengthDist::Fixed(8),
            (100, 300),
            prefix,
            5,
        )
    }

    #[test]
    fn requests_are_deterministic_and_in_range() {
        let w = synthetic(0);
        for i in 0..200 {
            let r = w.request(5, i, false);
            assert_eq!(r, w.request(5, i, false));
            let Prompt::Ids(ids) = &r.prompt else {
                panic!("token-id workload gave text")
            };
            assert!((8..=32).contains(&ids.len()));
            assert!(ids.iter().all(|id| (100..300).contains(id)));
            assert_eq!(r.max_new_tokens, 8);
        }
        assert_ne!(w.request(5, 0, false), w.request(5, 1, false));
        assert_ne!(
            w.request(5, 0, false),
            w.request(5, 0, true),
            "warm-up differs"
        );
        assert_ne!(
            w.request(5, 0, false),
            w.request(6, 0, false),
            "seed matters"
        );
    }

    #[test]
    fn shared_prefix_starts_every_prompt() {
        let ids = |w: &Workload, i| match w.request(5, i, false).prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(_) => unreachable!(),
        };
        // Shorter than every prompt (8..=32): all share it, the rest differs.
        let w = synthetic(6);
        let a = ids(&w, 0);
        for i in 1..50 {
            assert_eq!(a[..6], ids(&w, i)[..6]);
        }
        assert_ne!(a[6..], ids(&w, 1)[6..]);
        // Longer than some prompts: those are all prefix.
        let w = synthetic(20);
        let prefix = (0..100)
            .map(|i| ids(&w, i))
            .max_by_key(|p| p.len())
            .unwrap();
        for i in 0..100 {
            let p = ids(&w, i);
            let n = p.len().min(20);
            assert_eq!(p[..n], prefix[..n], "request {i}");
        }
    }

    #[test]
    fn prompts_file_is_read_and_cycled() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{{\"prompt\": \"one\", \"max_new_tokens\": 3}}").unwrap();
        writeln!(f).unwrap();
        writeln!(f, "{{\"prompt\": \"two\"}}").unwrap();
        let prompts = read_prompts(f.path()).unwrap();
        let w = Workload::File {
            prompts,
            output: LengthDist::Fixed(9),
        };
        let r: Vec<_> = (0..4).map(|i| w.request(0, i, false)).collect();
        assert_eq!(r[0].prompt, Prompt::Text("one".into()));
        assert_eq!(r[0].max_new_tokens, 3);
        assert_eq!(r[1].prompt, Prompt::Text("two".into()));
        assert_eq!(r[1].max_new_tokens, 9);
        assert_eq!(r[2].prompt, r[0].prompt);
    }

    #[test]
    fn prompts_file_errors_name_the_line() {
        for (body, line, why) in [
            ("{\"prompt\": \"a\"}\n{\"prompt\": 3}\n", 2, "invalid type"),
            ("{\"prompt\": \"\"}\n", 1, "empty"),
            (
                "{\"prompt\": \"a\", \"max_tokens\": 3}\n",
                1,
                "unknown field",
            ),
            (
                "{\"prompt\": \"a\", \"max_new_tokens\": 0}\n",
                1,
                "at least 1",
            ),
            ("\n\n", 0, "no prompts"),
        ] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(body.as_bytes()).unwrap();
            match read_prompts(f.path()) {
                Err(LoadgenError::PromptsFileLine {
                    line: l, reason, ..
                }) => {
                    assert_eq!(l, line, "{body:?}");
                    assert!(reason.contains(why), "{body:?}: {reason}");
                }
                other => panic!("{body:?}: {other:?}"),
            }
        }
        assert!(matches!(
            read_prompts(Path::new("/nonexistent/prompts.jsonl")),
            Err(LoadgenError::PromptsFileRead { .. })
        ));
    }
}
