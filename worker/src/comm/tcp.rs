//! The CPU communicator between rank processes on one host (or several):
//! every follower holds one TCP connection to the leader (rank 0), and every
//! collective goes through it. The leader adds the ranks' buffers in rank
//! order, so every rank gets the same bits on every run; the star costs the
//! leader N-1 transfers each way, which is fine for CPU ranks (GPU ranks use
//! NCCL).
//!
//! Every operation has a deadline: a peer that dies closes its socket, one
//! that hangs runs out the read timeout, and either way the operation fails
//! with an error naming the rank, never a hang. Messages carry a sequence
//! number, so ranks that fall out of step fail instead of mixing buffers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Communicator;
use crate::error::{Result, WorkerError};

/// A rank's end of the group.
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// The leader: one stream per follower, index r - 1. A follower: one
    /// stream, to the leader.
    links: Mutex<Links>,
}

struct Links {
    streams: Vec<TcpStream>,
    /// The next operation's sequence number.
    seq: u64,
}

/// What every message starts with.
const MAGIC: u32 = 0x4151_4331; // "AQC1"

impl TcpComm {
    /// The leader's side: accepts `world - 1` followers on `listener` until
    /// `timeout` has passed, each announcing its rank.
    pub fn lead(listener: TcpListener, world: usize, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| WorkerError::io("communicator listener", e))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| WorkerError::io("communicator stream", e))?;
                    configure(&stream, timeout)?;
                    let mut hello = [0u8; 12];
                    read_exact(&stream, &mut hello, "a joining rank")?;
                    let (magic, rank, size) = (
                        u32::from_le_bytes(hello[0..4].try_into().unwrap()),
                        u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize,
                        u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize,
                    );
                    if magic != MAGIC || size != world || rank == 0 || rank >= world {
                        return Err(WorkerError::Comm(format!(
                            "a peer joined as rank {rank} of {size}; this group has {world} ranks"
                        )));
                    }
                    if slots[rank - 1].replace(stream).is_some() {
                        return Err(WorkerError::Comm(format!("rank {rank} joined twice")));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(WorkerError::Comm(format!(
                            "rank(s) {} did not join within {timeout:?}",
                            missing.join(", ")
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(WorkerError::io("accepting a rank", e)),
            }
        }
        Ok(Self {
            rank: 0,
            world,
            links: Mutex::new(Links {
                streams: slots.into_iter().map(|s| s.expect("all joined")).collect(),
                seq: 0,
            }),
        })
    }

    /// A follower's side: connects to the leader at `leader` (retrying until
    /// `timeout`, as the leader may start later) and announces `rank`.
    pub fn join(leader: SocketAddr, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        assert!(rank > 0 && rank < world, "followers are ranks 1..{world}");
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect_timeout(&leader, timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%leader, error = %e, "leader not reachable yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(WorkerError::Comm(format!(
                        "rank {rank} could not reach the leader at {leader} within {timeout:?}: {e}"
                    )));
                }
            }
        };
        configure(&stream, timeout)?;
        let mut hello = Vec::with_capacity(12);
        hello.extend_from_slice(&MAGIC.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        write_all(&stream, &hello, "the leader (rank 0)")?;
        Ok(Self {
            rank,
            world,
            links: Mutex::new(Links {
                streams: vec![stream],
                seq: 0,
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Links>> {
        self.links
            .lock()
            .map_err(|_| WorkerError::Comm("an earlier operation panicked".into()))
    }

    /// The core of every collective: each follower sends `mine` to the
    /// leader; the leader combines its own and theirs (in rank order) with
    /// `combine` and sends the result back to every follower. Returns the
    /// result on every rank.
    fn exchange(
        &self,
        mine: &[u8],
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut links = self.lock()?;
        let seq = links.seq;
        links.seq += 1;
        if self.rank == 0 {
            let mut parts = vec![mine.to_vec()];
            for (i, s) in links.streams.iter().enumerate() {
                parts.push(recv(s, seq, i + 1)?);
            }
            let result = combine(parts)?;
            for (i, s) in links.streams.iter().enumerate() {
                send(s, seq, &result, i + 1)?;
            }
            Ok(result)
        } else {
            let s = &links.streams[0];
            send(s, seq, mine, 0)?;
            recv(s, seq, 0)
        }
    }

    /// The deadline of every later read and write (a long one while the
    /// ranks load the model, a short one once they serve).
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        for s in &self.lock()?.streams {
            configure(s, timeout)?;
        }
        Ok(())
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let len = buf.len();
        let sum = self.exchange(&f32_bytes(buf), |parts| {
            let mut acc = vec![0f32; len];
            for (r, p) in parts.iter().enumerate() {
                if p.len() != len * 4 {
                    return Err(WorkerError::Comm(format!(
                        "all-reduce: rank {r} sent {} values, rank 0 has {len}",
                        p.len() / 4
                    )));
                }
                for (a, b) in acc.iter_mut().zip(p.chunks_exact(4)) {
                    *a += f32::from_le_bytes(b.try_into().unwrap());
                }
            }
            Ok(f32_bytes(&acc))
        })?;
        if sum.len() != len * 4 {
            return Err(WorkerError::Comm(format!(
                "all-reduce: the leader returned {} values for {len}",
                sum.len() / 4
            )));
        }
        for (a, b) in buf.iter_mut().zip(sum.chunks_exact(4)) {
            *a = f32::from_le_bytes(b.try_into().unwrap());
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let all = self.exchange(&f32_bytes(local), |parts| Ok(parts.concat()))?;
        Ok(all
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(WorkerError::Comm(format!(
                "broadcast from rank {root} in a group of {}",
                self.world
            )));
        }
        let mine = if self.rank == root {
            buf.clone()
        } else {
            Vec::new()
        };
        *buf = self.exchange(&mine, |mut parts| Ok(std::mem::take(&mut parts[root])))?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&[], |_| Ok(Vec::new())).map(|_| ())
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> Result<()> {
    let err = |e| WorkerError::io("configuring a communicator stream", e);
    stream.set_nodelay(true).map_err(err)?;
    stream.set_read_timeout(Some(timeout)).map_err(err)?;
    stream.set_write_timeout(Some(timeout)).map_err(err)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A message: magic, sequence number, length, payload.
fn send(s: &TcpStream, seq: u64, payload: &[u8], peer: usize) -> Result<()> {
    let mut head = Vec::with_capacity(20);
    head.extend_from_slice(&MAGIC.to_le_bytes());
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let who = format!("rank {peer}");
    write_all(s, &head, &who)?;
    write_all(s, payload, &who)
}

fn recv(s: &TcpStream, seq: u64, peer: usize) -> Result<Vec<u8>> {
    let who = format!("rank {peer}");
    let mut head = [0u8; 20];
    read_exact(s, &mut head, &who)?;
    let magic = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let got = u64::from_le_bytes(head[4..12].try_into().unwrap());
    let len = u64::from_le_bytes(head[12..20].try_into().unwrap());
    if magic != MAGIC || got != seq {
        return Err(WorkerError::Comm(format!(
            "{who} is out of step: operation {got}, expected {seq}"
        )));
    }
    const LIMIT: u64 = 1 << 34;
    if len > LIMIT {
        return Err(WorkerError::Comm(format!(
            "{who} sent {len} bytes, more than the {LIMIT} a message may hold"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact(s, &mut payload, &who)?;
    Ok(payload)
}

fn read_exact(mut s: &TcpStream, buf: &mut [u8], who: &str) -> Result<()> {
    s.read_exact(buf).map_err(|e| peer_error(e, who, s))
}

fn write_all(mut s: &TcpStream, buf: &[u8], who: &str) -> Result<()> {
    s.write_all(buf).map_err(|e| peer_error(e, who, s))
}

fn peer_error(e: std::io::Error, who: &str, s: &TcpStream) -> WorkerError {
    let timeout = s.read_timeout().ok().flatten().unwrap_or_default();
    WorkerError::Comm(match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{who} did not answer within {timeout:?}")
        }
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            format!("{who} closed the connection (it has stopped)")
        }
        _ => format!("{who}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// Runs `f(comm)` on every rank of a group of `world`, each on its own
    /// thread, and returns their results in rank order.
    fn group<R: Send + 'static>(
        world: usize,
        f: impl Fn(TcpComm) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let f = std::sync::Arc::new(f);
        let mut handles = Vec::new();
        for rank in 1..world {
            let f = f.clone();
            handles.push(std::thread::spawn(move || {
                f(TcpComm::join(addr, rank, world, T).unwrap())
            }));
        }
        let lead = TcpComm::lead(listener, world, T).unwrap();
        let mut out = vec![f(lead)];
        out.extend(handles.into_iter().map(|h| h.join().unwrap()));
        out
    }

    #[test]
    fn collectives_give_every_rank_the_same_answer() {
        let results = group(3, |c| {
            let r = c.rank() as f32;
            let mut sum = vec![r, 10.0 * r, 0.5];
            c.all_reduce_sum(&mut sum).unwrap();
            let gathered = c.all_gather(&[r, r]).unwrap();
            let mut b = if c.rank() == 2 {
                b"from two".to_vec()
            } else {
                vec![]
            };
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            (sum, gathered, b)
        });
        for (sum, gathered, b) in results {
            assert_eq!(sum, vec![3.0, 30.0, 1.5]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(b, b"from two");
        }
    }

    /// A follower that stops: the leader's next collective fails at once,
    /// naming it.
    #[test]
    fn a_dead_rank_is_an_error_naming_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let follower = std::thread::spawn(move || {
            let c = TcpComm::join(addr, 1, 2, T).unwrap();
            drop(c);
        });
        let lead = TcpComm::lead(listener, 2, T).unwrap();
        follower.join().unwrap();
        let err = lead.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 closed the connection"), "{err}");
    }

    /// A follower that is alive but never answers: the collective fails
    /// after the deadline, naming it, instead of hanging.
    #[test]
    fn a_silent_rank_runs_out_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let follower = std::thread::spawn(move || {
            let _c = TcpComm::join(addr, 1, 2, T).unwrap();
            let _ = rx.recv();
        });
        let short = Duration::from_millis(300);
        let lead = TcpComm::lead(listener, 2, short).unwrap();
        let start = Instant::now();
        let err = lead.barrier().unwrap_err().to_string();
        assert!(err.contains("rank 1 did not answer within 300ms"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        tx.send(()).unwrap();
        follower.join().unwrap();
    }

    /// A rank that never joins: the leader gives up at the deadline.
    #[test]
    fn a_missing_rank_fails_the_start() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = TcpComm::lead(listener, 3, Duration::from_millis(200))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rank(s) 1, 2 did not join within 200ms"),
            "{err}"
        );
    }
}
