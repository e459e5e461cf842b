//! The Aquila-7B tokenizer, loaded both from `tokenizer.json` and from the published
//! `vocab.json` + `merges.txt`, must reproduce the golden ids of `golden.jsonl`.
//!
//! The files live outside the repository; CI points `AQUILA_TOKENIZER_DIR` at them (.ci/run), and
//! under CI a missing variable fails the tests instead of skipping them. Nothing is copied into
//! the repository (the second form is assembled in a temporary directory).

mod common;

use std::path::{Path, PathBuf};

use aquila_worker::tokenizer::{LoadedTokenizer, from_hf_folder};

fn tokenizer_dir() -> Option<PathBuf> {
    common::env_or_skip("AQUILA_TOKENIZER_DIR", ".ci/run").map(PathBuf::from)
}

fn golden(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(dir.join("golden.jsonl")).unwrap();
    let lines: Vec<_> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = v["ids"].as_array().unwrap().iter();
            let ids = ids.map(|i| i.as_u64().unwrap() as u32).collect();
            (v["text"].as_str().unwrap().to_owned(), ids)
        })
        .collect();
    assert!(
        lines.len() >= 10,
        "golden.jsonl has only {} lines",
        lines.len()
    );
    lines
}

fn check(loaded: &LoadedTokenizer, golden: &[(String, Vec<u32>)], form: &str) {
    assert!(
        loaded.is_aquila,
        "{form}: not recognised as the Aquila vocabulary"
    );
    assert!(loaded.bos.is_none(), "{form}: bos {:?}", loaded.bos);
    assert!(
        loaded.eos_ids.contains(&100_007),
        "{form}: eos {:?}",
        loaded.eos_ids
    );
    assert!(
        loaded.eos_ids.contains(&0),
        "{form}: eos {:?}",
        loaded.eos_ids
    );
    assert_eq!(loaded.eos_token, "</s>", "{form}");
    for (text, ids) in golden {
        let got = loaded.tokenizer.encode(text.as_str(), false).unwrap();
        assert_eq!(got.get_ids(), ids.as_slice(), "{form}: encode({text:?})");
        let decoded = loaded.tokenizer.decode(ids, false).unwrap();
        assert_eq!(&decoded, text, "{form}: decode({ids:?})");
    }
}

#[test]
fn aquila_tokenizer_json_matches_golden() {
    let Some(dir) = tokenizer_dir() else { return };
    let loaded = from_hf_folder(&dir).unwrap();
    check(&loaded, &golden(&dir), "tokenizer.json");
}

#[test]
fn aquila_vocab_and_merges_match_golden() {
    let Some(dir) = tokenizer_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(file), tmp.path().join(file)).unwrap();
    }
    let loaded = from_hf_folder(tmp.path()).unwrap();
    assert_eq!(loaded.tokenizer.get_vocab_size(true), 100_008);
    check(&loaded, &golden(&dir), "vocab.json + merges.txt");
}
