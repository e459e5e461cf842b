//! Whether a model fits in memory, decided before any weight is read: the
//! weights as they will be held (dtype and tensor-parallel share), the KV
//! pool and the step buffers, against what the process may use (its cgroup's
//! `memory.max`, where one is set, and the host's `MemAvailable`). A worker
//! that would not fit refuses to start, saying what it needs, what there is,
//! and which flags would fit, instead of being killed by the kernel halfway
//! through loading. It only measures; it loads nothing.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::kv::KvDtype;
use crate::loader::{Checkpoint, human_bytes};
use crate::model::{Shard, TpPlan, WeightDtype};

/// What one rank will hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    pub weights: usize,
    pub kv: usize,
    /// Activations and logits of the largest step, with room for the
    /// allocator's copies.
    pub step: usize,
    /// The rest of the process: code, tokenizer, threads, gRPC.
    pub runtime: usize,
}

impl Need {
    pub fn total(&self) -> usize {
        self.weights + self.kv + self.step + self.runtime
    }
}

/// Memory the process may still take, and where the figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub bytes: usize,
    pub source: String,
}

/// Bytes of the process itself beyond weights, cache and step buffers
/// (measured: about 150 MB for a worker with a 100k-token tokenizer).
const RUNTIME: usize = 256 << 20;

/// What a rank `rank` of `world` needs for `ckpt` with weights in `dtype`
/// and a KV pool of `kv_bytes`, stepping `max_batch_tokens` tokens and
/// `max_running` sequences at most.
pub fn need(
    ckpt: &Checkpoint,
    dtype: WeightDtype,
    shard: Shard,
    kv_bytes: usize,
    max_batch_tokens: usize,
    max_running: usize,
) -> crate::Result<Need> {
    let cfg = &ckpt.cfg;
    let plan = plan(cfg, shard)?;
    Ok(Need {
        weights: crate::model::resident_bytes(cfg, &plan, &ckpt.store, dtype),
        kv: kv_bytes,
        step: step_bytes(cfg, &plan, max_batch_tokens, max_running),
        runtime: RUNTIME,
    })
}

fn plan(cfg: &ModelConfig, shard: Shard) -> crate::Result<TpPlan> {
    TpPlan::new(
        shard,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
}

/// The f32 buffers of one step of `tokens` tokens: the residual stream and
/// its norm, q/k/v, attention's output, gate/up/down, quantized
/// activations; and the logits of `seqs` sequences (this rank's share, the
/// gathered rows, the copies handed on). Doubled: a step's buffers are
/// freed and taken again, and the allocator keeps what it freed.
fn step_bytes(cfg: &ModelConfig, plan: &TpPlan, tokens: usize, seqs: usize) -> usize {
    let h = cfg.hidden_size;
    let [q, kv, i] = plan.projection_rows(cfg.head_dim);
    let per_token = 4 * h + 2 * q.len() + 2 * kv.len() + 3 * i.len();
    let activations = 4 * tokens * per_token + tokens * (h.max(i.len()) + 64);
    let logits = 4 * seqs * (plan.vocab_part + 2 * cfg.vocab_size);
    2 * (activations + logits)
}

/// Bytes of a KV pool of `--kv-cache-mib`/`--kv-cache-blocks` for rank
/// `shard` (its KV heads), as the worker sizes it: whole blocks.
pub fn kv_bytes(
    cfg: &ModelConfig,
    shard: Shard,
    dtype: KvDtype,
    block_size: usize,
    blocks: Option<usize>,
    mib: usize,
) -> crate::Result<usize> {
    let plan = plan(cfg, shard)?;
    let per_token = cfg.kv_bytes_per_token(dtype) * plan.kv_heads.len() / cfg.num_kv_heads;
    let block = per_token * block_size;
    Ok(match blocks {
        Some(b) => b * block,
        None => (mib << 20) / block.max(1) * block,
    })
}

/// What this process may still take: the host's `MemAvailable`, and the
/// room left under every cgroup limit above it (limit less what the group
/// uses besides reclaimable page cache), whichever is least.
pub fn available() -> Available {
    let host = meminfo_available();
    let cgroup = cgroup_room();
    match (host, cgroup) {
        (Some(h), Some((c, what))) if c < h => Available {
            bytes: c,
            source: what,
        },
        (Some(h), cg) => Available {
            bytes: h,
            source: match cg {
                Some(_) => "MemAvailable (below the cgroup limit)".into(),
                None => "MemAvailable; no cgroup memory limit".into(),
            },
        },
        (None, Some((c, what))) => Available {
            bytes: c,
            source: what,
        },
        (None, None) => Available {
            bytes: usize::MAX,
            source: "unknown (no /proc/meminfo)".into(),
        },
    }
}

fn meminfo_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemAvailable:")
}

fn meminfo_field(text: &str, key: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: usize = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The least room under this process's cgroup limits (v2: `memory.max`,
/// walking up to the root; v1: `memory.limit_in_bytes`), and what it is.
fn cgroup_room() -> Option<(usize, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let mut best: Option<(usize, String)> = None;
    let mut consider = |room: usize, what: String| {
        if best.as_ref().is_none_or(|(b, _)| room < *b) {
            best = Some((room, what));
        }
    };
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        // v2's unified line has no controllers; v1 walks up too, as with
        // use_hierarchy: every level from ours to the hierarchy's root.
        type Room = fn(&Path) -> Option<(usize, usize, usize)>;
        let (top, limit, room): (PathBuf, &str, Room) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", v2_room)
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", v1_room)
        } else {
            continue;
        };
        let mut dir = top.join(path.trim_start_matches('/'));
        loop {
            if let Some((left, max, used)) = room(&dir) {
                consider(
                    left,
                    format!(
                        "cgroup {limit} {} of {} (less {} in use)",
                        human_bytes(max),
                        dir.display(),
                        human_bytes(used)
                    ),
                );
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
    }
    best
}

fn read_number(path: &Path) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(dir: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// (room, limit, used) under a v2 group's `memory.max`; None when unlimited.
fn v2_room(dir: &Path) -> Option<(usize, usize, usize)> {
    let max = read_number(&dir.join("memory.max"))?; // "max" does not parse
    let current = read_number(&dir.join("memory.current")).unwrap_or(0);
    // Page cache is given back under pressure: it does not count against us.
    let file = stat_field(dir, "file").unwrap_or(0);
    let used = current.saturating_sub(file);
    Some((max.saturating_sub(used), max, used))
}

/// (room, limit, used) under a v1 group's limit; None when unlimited.
fn v1_room(dir: &Path) -> Option<(usize, usize, usize)> {
    let limit = read_number(&dir.join("memory.limit_in_bytes"))?;
    // v1 reports "no limit" as a huge number (page-aligned i64::MAX).
    if limit >= 1 << 60 {
        return None;
    }
    let usage = read_number(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
    let cache = stat_field(dir, "total_cache")
        .or_else(|| stat_field(dir, "cache"))
        .unwrap_or(0);
    let used = usage.saturating_sub(cache);
    Some((limit.saturating_sub(used), limit, used))
}

/// One way to fit, for the refusal's message.
pub struct Alternative {
    pub flags: String,
    pub needs: usize,
}

/// Refuses `need` × `ranks` (ranks on this host) beyond `avail`, naming
/// each part, the source of the figure, and `alternatives` that would fit.
pub fn check(
    need: &Need,
    ranks: usize,
    dtype: WeightDtype,
    avail: &Available,
    alternatives: &[Alternative],
) -> crate::Result<()> {
    let total = need.total() * ranks;
    if total <= avail.bytes {
        return Ok(());
    }
    let who = if ranks > 1 {
        format!(
            "{ranks} ranks on this host need {} each, ",
            human_bytes(need.total())
        )
    } else {
        String::new()
    };
    let fits: Vec<String> = alternatives
        .iter()
        .filter(|a| a.needs <= avail.bytes)
        .map(|a| format!("{} (needs {})", a.flags, human_bytes(a.needs)))
        .collect();
    let advice = if fits.is_empty() {
        "nothing smaller on this host would: use a machine with more memory, or spread \
         --tp ranks over machines (--rank/--world-size)"
            .to_string()
    } else {
        format!("would fit: {}", fits.join("; or "))
    };
    Err(crate::WorkerError::DoesNotFit(format!(
        "the model does not fit in memory: {who}needs {} (weights {} in {}, KV cache {}, \
         step buffers {}, runtime {}) but {} is available ({}); {advice}",
        human_bytes(total),
        human_bytes(need.weights),
        dtype.label(),
        human_bytes(need.kv),
        human_bytes(need.step),
        human_bytes(need.runtime),
        human_bytes(avail.bytes),
        avail.source,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text =
            "MemTotal:       24683860 kB\nMemFree:         1234 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(
            meminfo_field(text, "MemAvailable:"),
            Some(23_000_000 * 1024)
        );
        assert_eq!(meminfo_field(text, "Nope:"), None);
    }

    #[test]
    fn a_cgroup_limit_counts_what_the_group_uses_less_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, v: &str| std::fs::write(dir.path().join(f), v).unwrap();
        w("memory.max", "8589934592\n");
        w("memory.current", "3221225472\n");
        w(
            "memory.stat",
            "anon 1073741824\nfile 2147483648\nkernel 0\n",
        );
        // 8 GiB less (3 GiB used − 2 GiB of page cache).
        assert_eq!(v2_room(dir.path()), Some((7 << 30, 8 << 30, 1 << 30)));
        w("memory.max", "max\n");
        assert_eq!(v2_room(dir.path()), None);
    }

    #[test]
    fn the_refusal_names_needs_availability_and_what_would_fit() {
        let need = Need {
            weights: 29_000_000_000,
            kv: 1 << 30,
            step: 300_000_000,
            runtime: RUNTIME,
        };
        let avail = Available {
            bytes: 23_000_000_000,
            source: "MemAvailable; no cgroup memory limit".into(),
        };
        let alts = [
            Alternative {
                flags: "--dtype bf16".into(),
                needs: 16_000_000_000,
            },
            Alternative {
                flags: "--kv-cache-mib 64".into(),
                needs: 29_600_000_000,
            },
        ];
        let e = check(&need, 1, WeightDtype::F32, &avail, &alts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 30.64 GB (weights 29.00 GB in f32, KV cache 1.07 GB"),
            "{e}"
        );
        assert!(e.contains("but 23.00 GB is available (MemAvailable"), "{e}");
        assert!(
            e.contains("would fit: --dtype bf16 (needs 16.00 GB)"),
            "{e}"
        );
        assert!(!e.contains("--kv-cache-mib 64"), "{e}");
        assert!(
            check(
                &need,
                1,
                WeightDtype::F32,
                &Available {
                    bytes: usize::MAX,
                    source: String::new()
                },
                &alts
            )
            .is_ok()
        );
        let e = check(&need, 2, WeightDtype::F32, &avail, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 ranks on this host need 30.64 GB each"), "{e}");
        assert!(e.contains("nothing smaller on this host would"), "{e}");
    }
}
