//! Prefix-aware routing: requests whose prompts share their first KV blocks
//! go to the same replica, whose prefix cache then already holds them.
//!
//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", SODA 2018): a prompt prefix's key
//! lands on a ring of replica points and takes the first replica clockwise
//! whose in-flight count is under `ceil((1 + load_factor) × mean)`, so a hot
//! prefix spills onto its ring neighbours instead of swamping one replica.
//!
//! The choice must depend only on the prompt, the replicas' addresses and
//! their in-flight counts: never on candidate order, on the process (the
//! hash is seedless, so every gateway and every release maps a prefix the
//! same way), or on state kept between calls.

use super::{Candidate, PrefixOptions, Route, RoutingPolicy};

/// Ring points per replica. With 160, 4 replicas addressed like the tests'
/// own 0.97–1.04× a fair share of the ring each, 16 own 0.81–1.20×.
const VIRTUAL_POINTS: u32 = 160;
/// Block size assumed until a worker reports its own.
const DEFAULT_BLOCK_SIZE: usize = 16;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Debug, Clone)]
pub struct PrefixAware {
    options: PrefixOptions,
}

impl PrefixAware {
    pub fn new(options: PrefixOptions) -> Self {
        PrefixAware { options }
    }
}

impl RoutingPolicy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix-aware"
    }

    fn pick(&self, route: &Route<'_>, candidates: &[Candidate]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let key = prefix_key(
            route.prompt,
            self.options.prefix_tokens,
            block_size(candidates),
        );
        let total: usize = candidates.iter().map(load).sum();
        let bound = load_bound(total, candidates.len(), self.options.load_factor)
            .max(self.options.min_load);
        Some(choose(candidates, key, bound))
    }
}

/// The first replica clockwise from `key` with fewer than `bound` in flight.
///
/// The ring is never built: walking it clockwise from the key meets each
/// replica first at that replica's nearest point, so the first one under the
/// bound is the one under the bound whose nearest point is closest. Ties
/// (equal points) go to the smaller address, as a ring sorted by (point,
/// address) would. That costs `n × VIRTUAL_POINTS` hashes per call, no sort
/// and no allocation (about 20 µs for 32 replicas in a release build), and
/// keeps no state: a cached ring would need a lock on every pick and
/// invalidation whenever the eligible set changes, which it does per model
/// and on every health change.
fn choose(candidates: &[Candidate], key: u64, bound: usize) -> usize {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| load(c) < bound)
        .min_by_key(|&(index, c)| (distance(&c.address, key), c.address.as_str(), index))
        .map(|(index, _)| index)
        // Unreachable while `bound` is at least the mean (n replicas cannot
        // all hold `bound` out of `total < n × bound`), kept so that a bug in
        // the bound degrades to least load rather than to a panic.
        .unwrap_or_else(|| least_in_flight(candidates))
}

/// Clockwise distance on the ring from `key` to `address`'s nearest point;
/// point `i` of an address is the hash of (address, i).
fn distance(address: &str, key: u64) -> u64 {
    let seed = fnv1a(FNV_OFFSET, address.as_bytes());
    (0..VIRTUAL_POINTS)
        .map(|i| mix(fnv1a(seed, &i.to_le_bytes())).wrapping_sub(key))
        .min()
        .unwrap_or(u64::MAX)
}

fn least_in_flight(candidates: &[Candidate]) -> usize {
    (0..candidates.len())
        .min_by_key(|&i| (load(&candidates[i]), candidates[i].address.as_str()))
        .unwrap_or(0)
}

/// This gateway's requests on the replica, plus the others its last poll saw.
fn load(candidate: &Candidate) -> usize {
    candidate.in_flight + candidate.load.map_or(0, |l| l.others as usize)
}

/// The most requests a replica may hold once this one is placed:
/// `ceil((1 + load_factor) × (total_in_flight + 1) / n)`, the request being
/// routed included. A negative or NaN factor counts as 0 (the bound is then
/// the mean, still always met by some replica); an infinite one disables it.
fn load_bound(total_in_flight: usize, replicas: usize, load_factor: f64) -> usize {
    let factor = load_factor.max(0.0);
    let mean = (total_in_flight as f64 + 1.0) / replicas.max(1) as f64;
    // Float to usize saturates, so an infinite bound becomes usize::MAX.
    ((1.0 + factor) * mean).ceil() as usize
}

/// Tokens per KV block: the first non-zero size a replica reported.
fn block_size(candidates: &[Candidate]) -> usize {
    candidates
        .iter()
        .filter_map(|c| c.load)
        .map(|l| l.kv_block_size as usize)
        .find(|&size| size > 0)
        .unwrap_or(DEFAULT_BLOCK_SIZE)
}

/// The key of a prompt's prefix: its first `prefix_tokens` tokens, cut back
/// to whole blocks when that leaves at least one, because the worker's cache
/// reuses whole blocks only; prompts that share those blocks share the key.
fn prefix_key(prompt: &[u32], prefix_tokens: usize, block_size: usize) -> u64 {
    let mut len = prompt.len().min(prefix_tokens);
    if len >= block_size {
        len -= len % block_size;
    }
    let hash = prompt[..len]
        .iter()
        .fold(FNV_OFFSET, |hash, token| fnv1a(hash, &token.to_le_bytes()));
    mix(hash)
}

/// FNV-1a 64: fixed by its spec, unlike std's `DefaultHasher`, whose output
/// may change between Rust releases.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's 64-bit finalizer. FNV-1a's last bytes barely reach its high
/// bits, so without it points hashed from `(address, i)` for consecutive `i`
/// would bunch up on the ring.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Lcg, PolicyKind, ReplicaLoad, build};
    use clap::ValueEnum;

    use crate::routing::idle_candidates as replicas;

    /// No floor under the bound, so that the bound's own arithmetic shows.
    fn policy() -> PrefixAware {
        PrefixAware::new(PrefixOptions {
            prefix_tokens: 256,
            load_factor: 0.25,
            min_load: 0,
        })
    }

    /// The address `policy` picks for `prompt` among `set`.
    fn route(policy: &PrefixAware, prompt: &[u32], set: &[Candidate]) -> String {
        let index = policy
            .pick(&Route { prompt }, set)
            .expect("candidates are not empty");
        set[index].address.clone()
    }

    #[test]
    fn the_key_hash_never_changes() {
        // FNV-1a's published test vector for "a".
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        // Changing this value remaps every prefix: during a rolling upgrade
        // old and new gateways would send one prefix to two replicas.
        assert_eq!(prefix_key(&[1, 2, 3], 256, 16), 0xf50e_90aa_e860_fe4c);
        // Likewise for the ring points.
        assert_eq!(distance("http://10.0.0.1:50051", 0), 0x0811_3865_1b9d_2fb6);
    }

    #[test]
    fn no_candidates_picks_nothing() {
        assert_eq!(policy().pick(&Route { prompt: &[1, 2] }, &[]), None);
    }

    #[test]
    fn a_prefix_maps_to_one_replica_whatever_the_candidate_order() {
        let policy = policy();
        let sorted = replicas(5);
        let mut reversed = sorted.clone();
        reversed.reverse();
        let mut rotated = sorted.clone();
        rotated.rotate_left(2);
        let mut rng = Lcg(1);
        for _ in 0..50 {
            let prompt = rng.prompt(40);
            let address = route(&policy, &prompt, &sorted);
            assert_eq!(route(&policy, &prompt, &sorted), address);
            assert_eq!(route(&policy, &prompt, &reversed), address);
            assert_eq!(route(&policy, &prompt, &rotated), address);
        }
    }

    #[test]
    fn prompts_sharing_their_first_blocks_share_the_key() {
        let mut rng = Lcg(2);
        let shared = rng.prompt(32);
        let with_tail = |tail: &[u32]| [shared.as_slice(), tail].concat();
        // 40 and 47 tokens both cut back to the 32 shared ones.
        let a = with_tail(&rng.prompt(8));
        let b = with_tail(&rng.prompt(15));
        assert_eq!(prefix_key(&a, 256, 16), prefix_key(&b, 256, 16));
        // 48 tokens are three whole blocks: the third differs from a's tail.
        let c = with_tail(&rng.prompt(16));
        assert_ne!(prefix_key(&a, 256, 16), prefix_key(&c, 256, 16));
        // Past prefix_tokens nothing counts, even whole blocks.
        assert_eq!(prefix_key(&a, 32, 16), prefix_key(&c, 32, 16));
        // A change inside the first block always counts.
        let mut d = a.clone();
        d[3] += 1;
        assert_ne!(prefix_key(&a, 256, 16), prefix_key(&d, 256, 16));
    }

    #[test]
    fn the_block_size_comes_from_the_replicas() {
        let mut set = replicas(4);
        assert_eq!(block_size(&set), DEFAULT_BLOCK_SIZE);
        let load = |kv_block_size| {
            Some(ReplicaLoad {
                kv_block_size,
                ..ReplicaLoad::default()
            })
        };
        set[1].load = load(0);
        set[2].load = load(32);
        set[3].load = load(64);
        assert_eq!(block_size(&set), 32);

        // With 32-token blocks, 50-token prompts sharing 32 tokens go
        // together; with the default 16 they would differ in the third block.
        let mut rng = Lcg(3);
        let shared = rng.prompt(32);
        let a = [shared.as_slice(), &rng.prompt(18)].concat();
        let b = [shared.as_slice(), &rng.prompt(18)].concat();
        assert_ne!(prefix_key(&a, 256, 16), prefix_key(&b, 256, 16));
        let policy = policy();
        for _ in 0..20 {
            let shared = rng.prompt(32);
            let a = [shared.as_slice(), &rng.prompt(18)].concat();
            let b = [shared.as_slice(), &rng.prompt(18)].concat();
            assert_eq!(route(&policy, &a, &set), route(&policy, &b, &set));
        }
    }

    #[test]
    fn a_prompt_shorter_than_a_block_counts_every_token() {
        assert_ne!(
            prefix_key(&[1, 2, 3], 256, 16),
            prefix_key(&[1, 2, 4], 256, 16)
        );
        assert_ne!(
            prefix_key(&[1, 2, 3], 256, 16),
            prefix_key(&[1, 2, 3, 4], 256, 16)
        );
    }

    #[test]
    fn removing_a_replica_moves_only_the_keys_it_held() {
        let policy = policy();
        let all = replicas(5);
        let removed = all[2].address.clone();
        let rest: Vec<Candidate> = all
            .iter()
            .filter(|c| c.address != removed)
            .cloned()
            .collect();
        let mut rng = Lcg(4);
        let mut moved = 0;
        let mut landed = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let prompt = rng.prompt(16);
            let before = route(&policy, &prompt, &all);
            let after = route(&policy, &prompt, &rest);
            if before == removed {
                moved += 1;
                landed.insert(after);
            } else {
                assert_eq!(after, before);
            }
        }
        // Its keys existed, and they spread over the survivors rather than
        // all falling on one neighbour.
        assert!(moved > 100, "{moved} keys were on the removed replica");
        assert_eq!(landed.len(), 4, "{landed:?}");
    }

    #[test]
    fn distinct_prefixes_stick_while_nothing_is_in_flight() {
        let policy = policy();
        let set = replicas(4);
        let mut rng = Lcg(5);
        let prompts: Vec<Vec<u32>> = (0..8).map(|_| rng.prompt(64)).collect();
        let first: Vec<String> = prompts.iter().map(|p| route(&policy, p, &set)).collect();
        for _ in 0..10 {
            for (prompt, address) in prompts.iter().zip(&first) {
                assert_eq!(&route(&policy, prompt, &set), address);
            }
        }
        let used: std::collections::BTreeSet<&String> = first.iter().collect();
        assert!(used.len() >= 2, "8 prefixes all on {used:?}");
    }

    #[test]
    fn a_replica_at_the_bound_passes_its_prefix_along_the_ring() {
        let policy = policy();
        let prompt = Lcg(6).prompt(64);
        let mut set = replicas(4);
        let preferred = policy
            .pick(&Route { prompt: &prompt }, &set)
            .expect("candidates are not empty");

        // 1 in flight of 1: bound = ceil(1.25 × 2 / 4) = 1, and it is reached.
        set[preferred].in_flight = 1;
        let without: Vec<Candidate> = (0..set.len())
            .filter(|&i| i != preferred)
            .map(|i| set[i].clone())
            .collect();
        let next = route(&policy, &prompt, &without);
        assert_ne!(next, set[preferred].address);
        assert_eq!(route(&policy, &prompt, &set), next);

        // 2 each, 8 in all: bound = ceil(1.25 × 9 / 4) = 3, and it is not.
        for c in &mut set {
            c.in_flight = 2;
        }
        assert_eq!(route(&policy, &prompt, &set), set[preferred].address);
    }

    #[test]
    fn a_hot_prefix_never_pushes_a_replica_past_the_bound() {
        let policy = policy();
        let prompt = Lcg(7).prompt(64);
        let set = replicas(4);
        let preferred = policy
            .pick(&Route { prompt: &prompt }, &set)
            .expect("candidates are not empty");
        // ceil(1.25 × (total + 1) / 4) in integers.
        let bound = |total: usize| (5 * (total + 1)).div_ceil(16);
        let pick = |in_flight: &[usize]| {
            let mut set = set.clone();
            for (c, &n) in set.iter_mut().zip(in_flight) {
                c.in_flight = n;
            }
            policy
                .pick(&Route { prompt: &prompt }, &set)
                .expect("candidates are not empty")
        };

        // 100 concurrent requests: the preferred replica takes all the bound
        // allows, ceil(1.25 × 100 / 4) = 32, and the rest spill over.
        let mut in_flight = [0usize; 4];
        for _ in 0..100 {
            let total = in_flight.iter().sum();
            let i = pick(&in_flight);
            in_flight[i] += 1;
            assert!(in_flight[i] <= bound(total), "{in_flight:?}");
        }
        assert_eq!(in_flight[preferred], 32, "{in_flight:?}");
        assert!(in_flight.iter().all(|&n| n <= 32), "{in_flight:?}");

        // Requests ending at random in between.
        let mut rng = Lcg(8);
        for _ in 0..2000 {
            let total: usize = in_flight.iter().sum();
            if total > 0 && rng.next() % 5 < 2 {
                let mut request = rng.next() as usize % total;
                for n in in_flight.iter_mut() {
                    if request < *n {
                        *n -= 1;
                        break;
                    }
                    request -= *n;
                }
            } else {
                let i = pick(&in_flight);
                in_flight[i] += 1;
                assert!(in_flight[i] <= bound(total), "{in_flight:?}");
            }
        }
    }

    #[test]
    fn the_bound_counts_the_request_being_routed() {
        assert_eq!(load_bound(0, 4, 0.25), 1);
        assert_eq!(load_bound(7, 4, 0.25), 3);
        assert_eq!(load_bound(8, 4, 0.25), 3);
        assert_eq!(load_bound(7, 4, -1.0), 2);
        assert_eq!(load_bound(7, 4, f64::NAN), 2);
        assert_eq!(load_bound(7, 4, f64::INFINITY), usize::MAX);
    }

    #[test]
    fn with_every_replica_at_the_bound_the_least_loaded_is_picked() {
        let mut set = replicas(3);
        set[0].in_flight = 4;
        set[1].in_flight = 2;
        set[2].in_flight = 2;
        assert_eq!(choose(&set, 12345, 0), 1);
    }

    #[test]
    fn below_the_floor_a_replica_keeps_its_prefixes() {
        let set = replicas(4);
        let prompt: Vec<u32> = (0..64).collect();
        let home = route(&policy(), &prompt, &set);
        let floored = PrefixAware::new(PrefixOptions {
            min_load: 2,
            ..PrefixOptions::default()
        });
        let mut busy = set.clone();
        let at = busy.iter().position(|c| c.address == home).unwrap();
        // One in flight, three idle: the bare bound (ceil(1.25 × 2 / 4) = 1)
        // moves the prefix; the floor of 2 keeps it home.
        busy[at].in_flight = 1;
        assert_ne!(route(&policy(), &prompt, &busy), home);
        assert_eq!(route(&floored, &prompt, &busy), home);
        busy[at].in_flight = 2;
        assert_ne!(route(&floored, &prompt, &busy), home);
    }

    #[test]
    fn other_clients_requests_count_as_load() {
        let set = replicas(4);
        let prompt: Vec<u32> = (0..64).collect();
        let home = route(&policy(), &prompt, &set);
        let mut busy = set.clone();
        let at = busy.iter().position(|c| c.address == home).unwrap();
        busy[at].load = Some(ReplicaLoad {
            others: 1,
            ..ReplicaLoad::default()
        });
        assert_ne!(route(&policy(), &prompt, &busy), home);
    }

    #[test]
    fn keys_spread_evenly_over_the_replicas() {
        let policy = policy();
        let set = replicas(4);
        let mut rng = Lcg(9);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..1000 {
            let prompt = rng.prompt(32);
            *counts.entry(route(&policy, &prompt, &set)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        // Each owns 24–26% of the ring; 1000 keys add about ±1.4% (1 σ).
        for (address, &count) in &counts {
            assert!((200..=300).contains(&count), "{address}: {count} of 1000");
        }
    }

    #[test]
    fn its_name_is_its_flag_value() {
        let built = build(PolicyKind::PrefixAware, PrefixOptions::default());
        let flag = PolicyKind::PrefixAware.to_possible_value();
        assert_eq!(flag.as_ref().map(|v| v.get_name()), Some(built.name()));
        assert_eq!(policy().name(), built.name());
    }
}
