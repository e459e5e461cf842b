//! GGUF tokenizers give llama.cpp's ids. `tests/python/gguf_tokenizers.py` makes the fixtures
//! (a SentencePiece model trained with the `sentencepiece` package, written as GGUF in
//! variants; the Aquila byte-level BPE vocabulary written once per `tokenizer.ggml.pre` value;
//! the demo model's GGUF) and tokenizes a set of texts with llama.cpp's C API. Each fixture is
//! loaded here with `tokenizer::from_gguf`, and again from the JSON the gateway receives, and
//! must give the same ids on every text, the same bos, and the same decoded text.
//!
//! Needs AQUILA_PYTHON (tests/run.sh installs sentencepiece, gguf and llama-cpp-cffi in its
//! venv); the BPE fixtures need AQUILA_TOKENIZER_DIR (.ci/run) and the demo AQUILA_DEMO_MODEL.
//! Without them the test says what it skipped, except under CI where they must be set.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use aquila_worker::tokenizer::{LoadedTokenizer, from_gguf, llama_pre};
use candle_core::quantized::gguf_file::Content;
use serde_json::Value;
use tokenizers::Tokenizer;

fn load(path: &Path) -> Result<LoadedTokenizer, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| format!("{}: {e}", path.display()))?;
    from_gguf(&content).map_err(|e| e.to_string())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|i| i.as_u64().expect("an id") as u32)
        .collect()
}

/// What llama.cpp's detokenizer does to text when `clean_spaces` is on for the vocabulary: its
/// three in-place passes over the bytes (space before `?!.,`; a lone apostrophe between
/// spaces; a space before `'s`, `'m`, `'re`, `'ve`).
fn llama_clean_spaces(text: &str) -> String {
    let mut t = text.as_bytes().to_vec();
    let n = t.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
    let n = t.len();
    let mut total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = t[i];
        if x == b'\'' && i + 1 < n && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    t.truncate(total);
    let n = t.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = t[i + 1];
            let re_ve = i + 2 < n && matches!((x1, t[i + 2]), (b'r', b'e') | (b'v', b'e'));
            if matches!(x1, b's' | b'm') || re_ve {
                total -= 1;
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
    String::from_utf8_lossy(&t).into_owned()
}

/// Checks one fixture; returns its mismatches.
fn check_fixture(fx: &Value) -> Vec<String> {
    let name = fx["name"].as_str().unwrap_or("?");
    let path = Path::new(fx["path"].as_str().expect("a fixture path"));
    let mut bad = Vec::new();
    if let Some(err) = fx["load_error"].as_str() {
        // llama.cpp refuses the file; so must we, naming the value.
        match load(path) {
            Ok(_) => bad.push(format!(
                "{name}: llama.cpp refuses it ({err}) but we load it"
            )),
            Err(e) => {
                let pre = fx["pre"].as_str().unwrap_or("");
                if !e.contains(pre) || !e.contains("supported") {
                    bad.push(format!("{name}: the error does not name {pre:?}: {e}"));
                }
            }
        }
        return bad;
    }
    let loaded = match load(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("{name}: llama.cpp loads it, we do not: {e}")],
    };
    let json = loaded.tokenizer.to_string(false).expect("serialize");
    let gateway = Tokenizer::from_str(&json).expect("the gateway's tokenizer");

    let llama_bos = fx["add_bos"]
        .as_bool()
        .unwrap_or(false)
        .then(|| fx["bos"].as_u64().unwrap_or(0) as u32);
    let our_bos = loaded.bos.as_ref().map(|b| b.0);
    if our_bos != llama_bos {
        bad.push(format!("{name}: bos {our_bos:?}, llama.cpp {llama_bos:?}"));
    }
    let is_spm = fx["model"] == "llama";
    let clean = match fx["pre"].as_str() {
        Some(pre) if !is_spm => llama_pre::lookup(pre).is_some_and(|p| p.llama_clean_spaces),
        _ if is_spm => false,
        // No `pre` key: llama.cpp's `default`.
        _ => true,
    };
    let added_tokens = loaded.tokenizer.get_added_tokens_decoder();
    let added: HashSet<u32> = added_tokens.keys().copied().collect();
    let specials: HashSet<u32> = added_tokens
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();

    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        for (form, tok) in [("from_gguf", &loaded.tokenizer), ("JSON", &gateway)] {
            let got = tok.encode(text, false).expect("encode");
            if got.get_ids() != want.as_slice() {
                bad.push(format!(
                    "{name} ({form}): {text:?}\n    ours  {:?}\n    llama {want:?}",
                    got.get_ids()
                ));
            }
        }
        // What the gateway sends for a plain prompt: bos (when the model wants one), then the
        // text's ids; llama.cpp's add_special gives the same.
        let with_bos: Vec<u32> = our_bos.into_iter().chain(want.iter().copied()).collect();
        if with_bos != ids(&case["ids_add_special"]) {
            bad.push(format!(
                "{name}: {text:?} with add_special: ours {with_bos:?}, llama {}",
                case["ids_add_special"]
            ));
        }

        let decoded = gateway.decode(&want, false).expect("decode");
        let expect = case["detokenized"].as_str().unwrap_or_default();
        let ours_as_llama = if clean {
            llama_clean_spaces(&decoded)
        } else {
            decoded.clone()
        };
        if ours_as_llama != expect {
            bad.push(format!(
                "{name}: decode of {text:?}: ours {decoded:?}, llama {expect:?}"
            ));
        }
        let has_special = want.iter().any(|id| specials.contains(id));
        if !has_special {
            let plain = gateway.decode(&want, true).expect("decode");
            let plain = if clean {
                llama_clean_spaces(&plain)
            } else {
                plain
            };
            if plain != case["detokenized_plain"].as_str().unwrap_or_default() {
                bad.push(format!(
                    "{name}: decode (skipping specials) of {text:?}: ours {plain:?}, llama {}",
                    case["detokenized_plain"]
                ));
            }
        }
        // Decoding is lossless wherever llama.cpp's is (up to its clean_spaces), except that a
        // SentencePiece space prefix after an added token is not text, nor is `▁`.
        let has_added = want.iter().any(|id| added.contains(id));
        let llama_lossless = expect == text || (clean && expect == llama_clean_spaces(text));
        let spm_exception = is_spm && (has_added || text.contains('▁'));
        if llama_lossless && !spm_exception && decoded != text {
            bad.push(format!("{name}: decode of {text:?} is {decoded:?}"));
        }
    }
    bad
}

#[test]
fn gguf_tokenizers_match_llama_cpp() {
    let Some(python) = common::env_or_skip("AQUILA_PYTHON", "tests/run.sh") else {
        return;
    };
    // The script reads these itself; without one, its part is skipped.
    for (var, set_by, part) in [
        (
            "AQUILA_TOKENIZER_DIR",
            ".ci/run",
            "the byte-level BPE fixtures",
        ),
        (
            "AQUILA_DEMO_MODEL",
            "tests/run.sh",
            "the demo model's tokenizer",
        ),
    ] {
        if std::env::var_os(var).is_none() {
            common::skip(&format!("{part}: {var} is not set ({set_by} sets it)"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/gguf_tokenizers.py"
        ))
        .arg(dir.path())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "gguf_tokenizers.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("reference.json")).expect("reference.json"),
    )
    .expect("reference.json is JSON");
    let fixtures = reference["fixtures"].as_array().expect("fixtures");
    let mut bad = Vec::new();
    let mut texts = 0;
    for fx in fixtures {
        bad.extend(check_fixture(fx));
        texts += fx["cases"].as_array().map_or(0, Vec::len);
    }
    // Straight to stderr, past the test harness's capture: the log says what gave the ids.
    let _ = writeln!(
        std::io::stderr(),
        "gguf_tokenizers: reference ids from {}: {} fixtures, {texts} fixture texts",
        reference["reference"].as_str().unwrap_or("?"),
        fixtures.len()
    );
    // Every supported pre-tokenizer was checked (when the BPE fixtures were made).
    if std::env::var_os("AQUILA_TOKENIZER_DIR").is_some() {
        let checked: HashSet<&str> = fixtures.iter().filter_map(|f| f["pre"].as_str()).collect();
        for name in llama_pre::names() {
            if !checked.contains(name) {
                bad.push(format!("pre-tokenizer {name} has no fixture"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches with llama.cpp:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn clean_spaces_is_llama_cpps() {
    assert_eq!(
        llama_clean_spaces("Hello , world . Ok ?"),
        "Hello, world. Ok?"
    );
    assert_eq!(llama_clean_spaces("a ' b"), "a'b");
    assert_eq!(llama_clean_spaces("it 's we 're I 'd"), "it's we're I 'd");
    assert_eq!(llama_clean_spaces(""), "");
}
