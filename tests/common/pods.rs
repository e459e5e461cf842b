//! The manifests tests/deploy.rs renders, run as processes: each pod is its
//! one app container's process, started exactly as its manifest says
//! (command, args, env, ports, volumes, probes) with this build in place of
//! the image's binary. What a cluster would provide is emulated, and only
//! that: a pod IP from 127.0.86.0/24 (where a pod listens on 0.0.0.0, its
//! process listens on its IP), volumes as folders, cluster DNS as an
//! /etc/hosts bind-mounted into each process's own mount namespace
//! (`unshare`), the kubelet's probes, SIGTERM within the grace period.
//! Controllers are the test's part: it names the pods, and sets what a
//! controller injects (the LeaderWorkerSet's variables) in `Pod::injected`.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::chart::{NAMESPACE, strings};
use super::dockerfile::{BINARY_IN_IMAGE, dockerfile};
use super::{eventually, http};

const BIN: &str = env!("CARGO_BIN_EXE_aquila");

/// One pod of a workload, its one app container run as a process.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's template (metadata and spec).
    template: Value,
    /// Its volumes, one folder each.
    dir: TempDir,
    /// Variables a controller adds (the LeaderWorkerSet's).
    pub injected: Vec<(String, String)>,
    child: Option<Child>,
}

/// The cluster around the pods: their DNS names, in an /etc/hosts that
/// every pod process sees (through its own mount namespace).
pub struct Cluster {
    dir: TempDir,
    /// The image's ENV (from the Dockerfile's cpu stage).
    image_env: Vec<(String, String)>,
    demo_model: PathBuf,
}

impl Cluster {
    /// A cluster whose pods find the demo model at `demo_model` (as a
    /// volume filled by a first start would hold it).
    pub fn new(demo_model: PathBuf) -> Cluster {
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
    pub fn set_dns(&self, records: &[(Ipv4Addr, String)]) {
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

/// Pod IP number `n`, on the loopback (so no network is needed).
pub fn pod_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 86, n)
}

impl Pod {
    pub fn new(name: String, ip: Ipv4Addr, template: &Value) -> Pod {
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

    pub fn app(&self) -> &Value {
        let cs = self.spec()["containers"].as_array().expect("containers");
        assert_eq!(cs.len(), 1, "{}: one container per pod", self.name);
        &cs[0]
    }

    /// Writes Secret files into their volumes, as the kubelet mounts them.
    pub fn mount_secrets(&self, files: &[(&str, &str, String)]) {
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
    pub fn start(&mut self, cluster: &Cluster) {
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
    pub fn port(&self, port: &Value) -> u16 {
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
    pub fn addr(&self, port: &Value) -> String {
        format!("{}:{}", self.ip, self.port(port))
    }

    pub fn url(&self, port: &Value) -> String {
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
    pub async fn wait_ready(&mut self) {
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
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
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
    pub fn assert_json_logs(&self) {
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
