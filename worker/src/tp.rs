//! Tensor-parallel replicas as rank processes. Rank 0, the leader, serves
//! the worker API and runs the scheduler; before each step it broadcasts
//! the step's inputs (tokens, positions, block tables) to the followers,
//! and every rank runs its shard of the step, meeting at the collectives.
//! While idle the leader sends a heartbeat every second, so a follower
//! notices a dead leader, and the leader a dead follower, within a second
//! (a silent one within the communicator's deadline).
//!
//! - `aquila worker --tp N`: this process launches N rank processes on
//!   this host and supervises them; when one exits it stops the others and
//!   starts the group again.
//! - `aquila worker --rank R --world-size N --leader HOST:PORT`: one rank,
//!   for Kubernetes (one pod per rank); it exits non-zero when the group
//!   breaks, and Kubernetes restarts it.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::Communicator;
use crate::comm::tcp::TcpComm;
use crate::error::{Result, WorkerError};
use crate::kv::BlockId;
use crate::model::{LogitsFor, SeqInput};

/// How often an idle leader tells the followers it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the launcher lets the other ranks of a broken group stop on
/// their own before it stops them.
const SETTLE: Duration = Duration::from_secs(10);

/// The tensor-parallel flags of `aquila worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct TpArgs {
    /// Tensor-parallel size: launch this many rank processes on this host
    /// and supervise them (the group restarts when a rank fails).
    #[arg(long, env = "AQUILA_TP", default_value_t = 1)]
    pub tp: usize,
    /// Run one rank only (0 is the leader, which serves the API); with
    /// --world-size and --leader. For one pod per rank.
    #[arg(long, env = "AQUILA_RANK")]
    pub rank: Option<usize>,
    /// Ranks in the group (with --rank).
    #[arg(long, env = "AQUILA_WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// The leader's communicator address, HOST:PORT: rank 0 listens there,
    /// the other ranks connect to it (with --rank).
    #[arg(long, env = "AQUILA_LEADER")]
    pub leader: Option<String>,
    /// Deadline of one collective or control message, in milliseconds: a
    /// rank silent for longer is taken as failed.
    #[arg(long, env = "AQUILA_COMM_TIMEOUT_MS", default_value_t = 4000)]
    pub comm_timeout_ms: u64,
    /// Deadline for every rank to join and load the model, in seconds.
    #[arg(long, env = "AQUILA_STARTUP_TIMEOUT_S", default_value_t = 600)]
    pub startup_timeout_s: u64,
    /// What carries the model's all-reduces and gathers: TCP (any machine)
    /// or NCCL (rank r on GPU r; builds with `--features cuda`). The
    /// control plane is TCP either way.
    #[arg(long, env = "AQUILA_COLLECTIVES", value_enum, default_value = "tcp")]
    pub collectives: Collectives,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Collectives {
    Tcp,
    Nccl,
}

/// A rank's links to its group: the control plane (steps, heartbeats, the
/// startup barrier) and the model's collectives (the same TCP links, or
/// NCCL).
pub struct Group {
    pub control: Arc<TcpComm>,
    pub collectives: Arc<dyn Communicator>,
}

/// What this process is.
pub enum Role {
    /// A worker of its own (no tensor parallelism).
    Single,
    /// The launcher of `n` local ranks.
    Launcher(usize),
    /// One rank of a group.
    Rank {
        rank: usize,
        world: usize,
        leader: String,
    },
}

impl TpArgs {
    pub fn role(&self) -> Result<Role> {
        let bad = |m: String| Err(WorkerError::Config(m));
        if self.collectives == Collectives::Nccl && !cfg!(feature = "cuda") {
            return bad("--collectives nccl needs a build with --features cuda".into());
        }
        match (self.rank, self.world_size, &self.leader) {
            (None, None, None) => match self.tp {
                0 => bad("--tp = 0 must be at least 1".into()),
                1 => Ok(Role::Single),
                n => Ok(Role::Launcher(n)),
            },
            (Some(rank), Some(world), Some(leader)) => {
                if world == 0 || rank >= world {
                    return bad(format!(
                        "--rank = {rank} must be below --world-size = {world}"
                    ));
                }
                if world == 1 {
                    return Ok(Role::Single);
                }
                Ok(Role::Rank {
                    rank,
                    world,
                    leader: leader.clone(),
                })
            }
            _ => bad("--rank, --world-size and --leader go together".into()),
        }
    }

    pub fn comm_timeout(&self) -> Duration {
        Duration::from_millis(self.comm_timeout_ms.max(1))
    }

    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_s.max(1))
    }
}

/// Joins (rank > 0) or forms (rank 0, listening on `leader`) the group.
pub fn connect(rank: usize, world: usize, leader: &str, args: &TpArgs) -> Result<Group> {
    let addr = resolve_leader(leader, args.startup_timeout())?;
    let control = Arc::new(if rank == 0 {
        let listener = TcpListener::bind(addr)
            .map_err(|e| WorkerError::io(format!("listening for ranks on {addr}"), e))?;
        TcpComm::lead(listener, world, args.startup_timeout())?
    } else {
        TcpComm::join(addr, rank, world, args.startup_timeout())?
    });
    tracing::info!(rank, world, %addr, collectives = ?args.collectives, "joined the tensor-parallel group");
    let collectives: Arc<dyn Communicator> = match args.collectives {
        Collectives::Tcp => control.clone(),
        #[cfg(feature = "cuda")]
        Collectives::Nccl => Arc::new(crate::comm::nccl::NcclComm::new(&control, rank)?),
        #[cfg(not(feature = "cuda"))]
        Collectives::Nccl => unreachable!("refused by TpArgs::role"),
    };
    Ok(Group {
        control,
        collectives,
    })
}

/// The leader's address. In a cluster its DNS name can appear a moment
/// after the pods start (a headless Service learns the leader's IP once it
/// has one), so a failed lookup is retried until the startup deadline.
fn resolve_leader(leader: &str, timeout: Duration) -> Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    let mut warned = false;
    loop {
        let error = match leader.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => return Ok(addr),
                None => "no address".to_string(),
            },
            Err(e) => e.to_string(),
        };
        // A malformed value (no port, a bad port) will not heal by waiting.
        if leader
            .rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(WorkerError::Config(format!("--leader = {leader}: {error}")));
        }
        if Instant::now() >= deadline {
            return Err(WorkerError::Config(format!(
                "--leader = {leader}: {error} (still, after {timeout:?})"
            )));
        }
        if !warned {
            tracing::warn!(%leader, %error, "the leader's address does not resolve yet; retrying");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Refuses, before any rank starts, a model that `n` ranks cannot split
/// (the same checks every rank makes at load, with the same messages).
pub fn check_layout(model: &std::path::Path, n: usize) -> Result<()> {
    let cfg = crate::loader::read_config(model)?;
    crate::model::TpPlan::new(
        crate::model::Shard {
            rank: n - 1,
            world_size: n,
        },
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    .map(|_| ())
}

/// The leader's messages to the followers.
#[derive(Debug, PartialEq)]
pub enum Control {
    /// Run one step: per sequence its new tokens, start and block table.
    Step(Vec<StepSeq>),
    /// Nothing to do; still alive.
    Heartbeat,
}

#[derive(Debug, PartialEq)]
pub struct StepSeq {
    pub tokens: Vec<u32>,
    pub start: u32,
    pub table: Vec<BlockId>,
}

impl Control {
    pub fn step(inputs: &[SeqInput<'_>]) -> Self {
        Control::Step(
            inputs
                .iter()
                .map(|s| StepSeq {
                    tokens: s.tokens.to_vec(),
                    start: s.start as u32,
                    table: s.table.to_vec(),
                })
                .collect(),
        )
    }

    /// Little-endian u32s: a tag (0 heartbeat, 1 step), then for a step the
    /// sequence count and per sequence start, token count, tokens, block
    /// count, blocks.
    pub fn encode(&self) -> Vec<u8> {
        let mut w: Vec<u32> = Vec::new();
        match self {
            Control::Heartbeat => w.push(0),
            Control::Step(seqs) => {
                w.extend([1, seqs.len() as u32]);
                for s in seqs {
                    w.extend([s.start, s.tokens.len() as u32]);
                    w.extend(&s.tokens);
                    w.push(s.table.len() as u32);
                    w.extend(&s.table);
                }
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || WorkerError::Comm("a malformed control message from the leader".into());
        if !bytes.len().is_multiple_of(4) {
            return Err(bad());
        }
        let mut words = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let mut next = || words.next().ok_or_else(bad);
        let take = |n: u32, next: &mut dyn FnMut() -> Result<u32>| {
            (0..n).map(|_| next()).collect::<Result<Vec<u32>>>()
        };
        match next()? {
            0 => Ok(Control::Heartbeat),
            1 => {
                let n = next()?;
                let mut seqs = Vec::new();
                for _ in 0..n {
                    let start = next()?;
                    let len = next()?;
                    let tokens = take(len, &mut next)?;
                    let blocks = next()?;
                    let table = take(blocks, &mut next)?;
                    seqs.push(StepSeq {
                        tokens,
                        start,
                        table,
                    });
                }
                Ok(Control::Step(seqs))
            }
            _ => Err(bad()),
        }
    }
}

/// A follower's life: receive the leader's messages and run each step's
/// shard, until the group breaks (a communicator error: the process exits
/// non-zero).
pub fn follow(
    mut backend: crate::backend::Backend,
    comm: &TcpComm,
    metrics: &crate::metrics::WorkerMetrics,
) -> Result<()> {
    loop {
        let mut buf = Vec::new();
        comm.broadcast(&mut buf, 0)?;
        match Control::decode(&buf)? {
            Control::Heartbeat => {}
            Control::Step(seqs) => {
                let started = Instant::now();
                let inputs: Vec<SeqInput<'_>> = seqs
                    .iter()
                    .map(|s| SeqInput {
                        tokens: &s.tokens,
                        start: s.start as usize,
                        table: &s.table,
                    })
                    .collect();
                match backend.forward(&inputs, LogitsFor::Last) {
                    Ok(_) => {}
                    Err(e @ WorkerError::Comm(_)) => return Err(e),
                    // The leader meets the same error on the same inputs,
                    // fails those requests and goes on; so do we.
                    Err(e) => tracing::warn!(error = %e, "step failed"),
                }
                let tokens = seqs.iter().map(|s| s.tokens.len()).sum();
                let prefill = seqs.iter().any(|s| s.tokens.len() > 1);
                metrics.step(tokens, seqs.len(), prefill, started.elapsed(), true);
            }
        }
    }
}

/// The launcher: runs `n` ranks of this very command line on this host,
/// rank 0 on `listen` (a fixed port, so it stays the same across
/// restarts; its metrics on `metrics` as given, the other ranks' on a free
/// port of the same IP, since they cannot share one), each with `threads` compute threads (0: the cores divided
/// among the ranks), and starts the group again whenever a rank exits. Returns
/// when `stop` is set (SIGTERM), after stopping the ranks.
pub fn supervise(
    n: usize,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    threads: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use std::process::{Child, Command};
    use std::sync::atomic::Ordering;
    let exe = std::env::current_exe().map_err(|e| WorkerError::io("finding this binary", e))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let listen = if listen.port() == 0 {
        free_port(listen.ip())?
    } else {
        listen
    };
    // Ranks share this host's cores: without --threads, each gets its
    // share, not one thread per core (their spinning pools would fight).
    let threads = match threads {
        0 => std::thread::available_parallelism()
            .map_or(1, |c| c.get() / n)
            .max(1),
        t => t,
    };
    let mut restarts = 0u32;
    loop {
        let started = Instant::now();
        let leader = free_port(std::net::Ipv4Addr::LOCALHOST.into())?;
        let mut ranks: Vec<Child> = Vec::with_capacity(n);
        for rank in 0..n {
            let mut cmd = Command::new(&exe);
            #[cfg(target_os = "linux")]
            // SAFETY: prctl is async-signal-safe, as pre_exec requires. A
            // rank gets SIGTERM if the launcher dies, instead of living on.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            cmd.args(&args)
                .arg("--listen")
                .arg(listen.to_string())
                .args(["--threads", &threads.to_string()])
                .args(["--rank", &rank.to_string(), "--world-size", &n.to_string()])
                .arg("--leader")
                .arg(leader.to_string());
            if let (Some(m), true) = (metrics, rank > 0) {
                cmd.arg("--metrics-listen")
                    .arg(SocketAddr::new(m.ip(), 0).to_string());
            }
            let child = cmd
                .spawn()
                .map_err(|e| WorkerError::io(format!("starting rank {rank}"), e))?;
            tracing::info!(rank, pid = child.id(), "started a rank");
            ranks.push(child);
        }
        // Wait until a rank exits or we are told to stop.
        let failed = loop {
            if stop.load(Ordering::Relaxed) {
                break None;
            }
            if let Some((rank, status)) = ranks
                .iter_mut()
                .enumerate()
                .find_map(|(r, c)| c.try_wait().ok().flatten().map(|s| (r, s)))
            {
                break Some((rank, status));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if failed.is_some() {
            // The others notice on their own (the leader fails its requests
            // naming the rank and turns NOT_SERVING first); give them the
            // time to, then stop whoever is left.
            let settle = Instant::now() + SETTLE;
            while Instant::now() < settle
                && ranks.iter_mut().any(|c| matches!(c.try_wait(), Ok(None)))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for c in &mut ranks {
            if matches!(c.try_wait(), Ok(None)) {
                terminate(c);
            }
        }
        for c in &mut ranks {
            let _ = c.wait();
        }
        match failed {
            None => return Ok(()),
            Some((rank, status)) => {
                // The pause grows while the group keeps failing, and starts
                // again from the shortest once it has run for a while.
                if started.elapsed() > Duration::from_secs(60) {
                    restarts = 0;
                }
                restarts += 1;
                let pause = Duration::from_millis(500 * u64::from(restarts.min(10)));
                tracing::error!(
                    rank, %status, restarts,
                    "a rank exited; restarting the group in {pause:?}"
                );
                std::thread::sleep(pause);
            }
        }
    }
}

/// SIGTERM (a rank drains and exits), or a kill where there is no such thing.
fn terminate(c: &mut std::process::Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a pid we own; at worst it names an exited child.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = c.kill();
}

/// A port free on `ip` now (the OS picks it; released for the rank to bind).
fn free_port(ip: std::net::IpAddr) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0)).map_err(|e| WorkerError::io("finding a free port", e))?;
    l.local_addr()
        .map_err(|e| WorkerError::io("finding a free port", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_name_is_retried_until_the_deadline_and_a_bad_value_is_not() {
        assert_eq!(
            resolve_leader("127.0.0.1:29500", Duration::from_secs(1)).unwrap(),
            "127.0.0.1:29500".parse().unwrap()
        );
        let started = Instant::now();
        let e = resolve_leader("leader.invalid:29500", Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("still, after 300ms"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let started = Instant::now();
        let e = resolve_leader("leader-without-port", Duration::from_secs(30)).unwrap_err();
        assert!(
            e.to_string().contains("--leader = leader-without-port"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn control_messages_round_trip() {
        let step = Control::Step(vec![
            StepSeq {
                tokens: vec![1, 2, 3],
                start: 0,
                table: vec![4, 5],
            },
            StepSeq {
                tokens: vec![9],
                start: 40,
                table: vec![0, 1, 2],
            },
        ]);
        assert_eq!(Control::decode(&step.encode()).unwrap(), step);
        assert_eq!(
            Control::decode(&Control::Heartbeat.encode()).unwrap(),
            Control::Heartbeat
        );
        let bytes = step.encode();
        assert!(Control::decode(&bytes[..bytes.len() - 4]).is_err());
        assert!(Control::decode(&[7, 0, 0, 0]).is_err());
    }
}
