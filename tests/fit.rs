//! The fit check against a real memory limit: a worker started inside a
//! memory cgroup of its own (v2 `memory.max` or v1 `memory.limit_in_bytes`,
//! enforced by the kernel) refuses at once what would not fit, naming the
//! limit and a flag that would, and serves what does fit without being
//! killed. And `--dtype auto` keeps a checkpoint's own float type.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{GenerateRequest, ListModelsRequest, SamplingParams};

/// A memory cgroup below this process's, removed when dropped.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// A child group limited to `limit` bytes, or why there can be none.
    fn new(limit: usize) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("aquila-fit-{}", std::process::id());
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            let (parent, file) = if controllers.is_empty() {
                (Path::new("/sys/fs/cgroup").join(rel), "memory.max")
            } else if controllers.split(',').any(|c| c == "memory") {
                (
                    Path::new("/sys/fs/cgroup/memory").join(rel),
                    "memory.limit_in_bytes",
                )
            } else {
                continue;
            };
            // A v2 group delegates memory only where its parent enables it.
            if controllers.is_empty()
                && !std::fs::read_to_string(parent.join("cgroup.subtree_control"))
                    .unwrap_or_default()
                    .contains("memory")
            {
                continue;
            }
            let dir = parent.join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = Cgroup { dir };
            if std::fs::write(cg.dir.join(file), limit.to_string()).is_ok() {
                return Ok(cg);
            }
        }
        Err(
            "no memory cgroup this test may create (needs a writable cgroup v1 memory \
             hierarchy, or v2 with memory delegated)"
                .into(),
        )
    }

    /// `aquila ARGS` run inside this group.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(self.dir.join("cgroup.procs"))
            .arg(env!("CARGO_BIN_EXE_aquila"))
            .args(args);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited (each Proc is dropped first).
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The output of `cmd`, which should exit by itself: one still running after
/// 30 s (serving what should have been refused) is killed and fails the test.
fn exit_of(mut cmd: Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out,
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{cmd:?} still running after 30 s: it should have been refused");
        }
    }
}

fn make_base_f16(out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_aquila"))
        .args(["make-model", "--preset", "base", "--dtype", "f16", "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_worker_refuses_what_its_cgroup_cannot_hold_and_serves_what_it_can() {
    // Base in f16 is about 212 MB of weights (424 MB in f32); with a 256 MiB
    // cache and the step and runtime allowances, f32 needs about 1.02 GB and
    // f16 about 0.81 GB (a worker in f32 measured 0.71 GB at most, page
    // cache included: the allowances are generous).
    const LIMIT: usize = 800 << 20;
    let cg = match Cgroup::new(LIMIT) {
        Ok(cg) => cg,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    make_base_f16(dir.path());
    let model = dir.path().to_str().unwrap();
    let worker = |extra: &[&str]| {
        let mut args = vec!["worker", "--model", model, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(&["--kv-cache-mib", "256"]);
        args.extend_from_slice(extra);
        cg.command(&args)
    };

    // f32 would not fit: refused before loading, naming the need, the limit
    // and a flag that fits.
    let started = Instant::now();
    let out = exit_of(worker(&["--dtype", "f32"]));
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "an exit of ours, not a kill: {err}"
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    for want in ["in f32", "memory.", "--dtype bf16", "would fit"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }

    // A cache that cannot fit either: the message offers a size that does.
    let out = exit_of(worker(&["--kv-cache-mib", "4096"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--kv-cache-mib "), "{err}");

    // --dtype auto (the default) holds the f16 checkpoint in f16: it fits,
    // loads under the kernel's limit and answers.
    let w = common::spawn_command(worker(&[]), "worker", "warn", Stdio::inherit());
    let gateway = common::spawn_gateway(&[&w], &[]);
    common::wait_serving(&gateway.url()).await;
    let mut c = GenerationClient::connect(gateway.url()).await.unwrap();
    let m = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .remove(0);
    assert_eq!(m.dtype, "f16", "{}", m.dtype_reason);
    assert!(m.dtype_reason.contains("float16"), "{}", m.dtype_reason);
    let r = c
        .generate(GenerateRequest {
            prompt: "The fit check".into(),
            params: Some(SamplingParams {
                temperature: Some(0.0),
                max_new_tokens: Some(16),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.usage.unwrap().completion_tokens, 16);
    drop(gateway);
    drop(w);
}
