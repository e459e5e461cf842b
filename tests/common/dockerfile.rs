//! deploy/Dockerfile as the tests read it: its stages, each a list of
//! instructions (continuation lines joined, comments dropped). Enough for
//! the instructions tests/deploy.rs checks and the pod emulator needs, not a
//! Dockerfile parser: no ARG substitution, no heredocs.

use std::path::Path;

/// Where the images put the binary (tests/deploy.rs checks it against the
/// Dockerfile; the pod emulator runs this build in its place).
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/aquila";

/// One `FROM … AS name` stage: its instructions as (KEYWORD, rest).
pub struct Stage {
    pub name: String,
    lines: Vec<(String, String)>,
}

impl Stage {
    pub fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
    }

    pub fn exec_form(&self, keyword: &str) -> Vec<String> {
        let rest = self.all(keyword).last().unwrap_or_else(|| {
            panic!("stage {} has no {keyword}", self.name);
        });
        serde_json::from_str(rest).unwrap_or_else(|e| {
            panic!(
                "{keyword} of stage {} is not exec form: {rest} ({e})",
                self.name
            )
        })
    }

    /// `ENV K=V …` pairs, in order.
    pub fn env(&self) -> Vec<(String, String)> {
        self.all("ENV")
            .flat_map(|rest| rest.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("ENV in K=V form");
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

/// The stages of deploy/Dockerfile, in order.
pub fn dockerfile() -> Vec<Stage> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile");
    let text = std::fs::read_to_string(path).expect("deploy/Dockerfile");
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in joined.iter().filter(|l| !l.is_empty()) {
        let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let name = rest.rsplit_once(" AS ").map_or("", |(_, n)| n.trim());
            stages.push(Stage {
                name: name.to_string(),
                lines: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.lines.push((keyword, rest.trim().to_string()));
        }
    }
    stages
}
