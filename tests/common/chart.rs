//! The Helm chart (deploy/helm/aquila-serve) as the tests get it: rendered
//! by `helm template`, read into JSON, validated against the Kubernetes API
//! schemas, and the pod templates found in what it rendered. The tools come
//! from tests/run.sh's venv; without them the chart tests skip
//! (see [`skip`](super::skip)).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tempfile::TempDir;

use super::env_or_skip;

pub const NAMESPACE: &str = "aquila";
pub const RELEASE: &str = "demo";

/// The chart's folder in this checkout.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/aquila-serve")
}

/// helm and the test venv's Python (PyYAML, kubernetes-validate).
pub struct Tools {
    helm: String,
    python: String,
}

/// The tools from AQUILA_HELM and AQUILA_PYTHON, or None once
/// [`skip`](super::skip) has said which is missing.
pub fn tools() -> Option<Tools> {
    Some(Tools {
        helm: env_or_skip("AQUILA_HELM", "tests/run.sh")?,
        python: env_or_skip("AQUILA_PYTHON", "tests/run.sh")?,
    })
}

impl Tools {
    /// `helm template` with `--set` values (`@FILE`: a values file of the
    /// chart): the YAML, or helm's error.
    pub fn template(&self, values: &[&str]) -> Result<String, String> {
        let chart = chart_dir();
        let mut cmd = Command::new(&self.helm);
        cmd.args(["template", RELEASE])
            .arg(&chart)
            .args(["--namespace", NAMESPACE]);
        for v in values {
            match v.strip_prefix('@') {
                Some(file) => cmd.arg("-f").arg(chart.join(file)),
                None => cmd.args(["--set", v]),
            };
        }
        let out = cmd.output().expect("run helm");
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).expect("utf-8 manifests"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `helm lint --strict`: helm's report where it fails.
    pub fn lint(&self) -> Result<(), String> {
        let out = Command::new(&self.helm)
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .output()
            .expect("run helm lint");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }

    /// The rendered objects, as JSON (PyYAML from the test venv parses).
    pub fn render(&self, values: &[&str]) -> Vec<Value> {
        let yaml = self
            .template(values)
            .unwrap_or_else(|e| panic!("helm template {values:?}: {e}"));
        let script = "import sys, json, yaml\n\
                      json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
        let mut child = Command::new(&self.python)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write manifests");
        let out = child.wait_with_output().expect("python");
        assert!(out.status.success(), "the rendered YAML does not parse");
        serde_json::from_slice(&out.stdout).expect("JSON from python")
    }

    /// `kubernetes-validate --strict` at Kubernetes `version`: the kinds it
    /// has no schema for (custom resources), or its complaint.
    pub fn validate(&self, yaml: &str, version: &str) -> Result<BTreeSet<String>, String> {
        let dir = TempDir::new().expect("temp dir");
        let file = dir.path().join("manifests.yaml");
        std::fs::write(&file, yaml).expect("write manifests");
        let bin = Path::new(&self.python).with_file_name("kubernetes-validate");
        let out = Command::new(bin)
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("ERROR") {
            return Err(text);
        }
        Ok(text
            .lines()
            .filter_map(|l| l.split_once("Couldn't find schema for kind "))
            .filter_map(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }
}

/// Every pod template in `docs` (the LeaderWorkerSet has two).
pub fn pod_templates(docs: &[Value]) -> Vec<(&str, &Value)> {
    let mut pods = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        match kind {
            "Deployment" | "StatefulSet" => pods.push((kind, &d["spec"]["template"])),
            "LeaderWorkerSet" => {
                let t = &d["spec"]["leaderWorkerTemplate"];
                pods.push(("leader", &t["leaderTemplate"]));
                pods.push(("follower", &t["workerTemplate"]));
            }
            _ => {}
        }
    }
    pods
}

/// A pod spec's init containers, then its containers.
pub fn containers(pod_spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod_spec[*k].as_array().into_iter().flatten())
        .collect()
}

/// A JSON list of strings (none: empty).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}
