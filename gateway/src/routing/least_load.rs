//! Least load: the replica with the fewest requests running or queued.
//!
//! Looks only at load, never at the prompt: keeping a prefix on the replica
//! that caches it is `prefix_aware`'s job. It must not keep per-replica
//! state of its own either: the registry's counts are the only truth about
//! what is in flight, and a second copy here would drift from them.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Route, RoutingPolicy};

/// Picks the candidate with the smallest [`score`]; among equals, the one
/// with the most free KV blocks, then each of the still-equal ones in turn.
#[derive(Debug, Default)]
pub struct LeastLoad {
    /// Advanced only on a tie, so that a unique winner does not use up a
    /// turn: with two replicas alternately tied and not, advancing on every
    /// pick would hand every tie to the same one.
    turn: AtomicUsize,
}

/// Requests the replica is working on or holding, as best known: this
/// gateway's own, exact and current, plus the others the last poll saw.
///
/// The polled `running + waiting` alone is as old as the poll: a replica
/// that reported five requests a moment ago may have finished them all, and
/// scoring it by that figure would starve it until the next poll while the
/// others pile up. Only the part this gateway cannot count itself comes
/// from the poll.
fn score(candidate: &Candidate) -> u64 {
    // usize fits in u64 on every target Rust supports.
    let own = candidate.in_flight as u64;
    own + candidate.load.map_or(0, |l| u64::from(l.others))
}

impl RoutingPolicy for LeastLoad {
    fn name(&self) -> &'static str {
        "least-load"
    }

    fn pick(&self, _route: &Route<'_>, candidates: &[Candidate]) -> Option<usize> {
        let least = candidates.iter().map(score).min()?;
        let mut tied: Vec<usize> = (0..candidates.len())
            .filter(|&i| score(&candidates[i]) == least)
            .collect();
        // Free blocks decide only when every tied replica reports them: a
        // replica not yet polled is most likely new and empty, and ranking
        // it below (or above) the others would be a guess.
        let free: Option<Vec<u32>> = tied
            .iter()
            .map(|&i| candidates[i].load.map(|l| l.kv_blocks_free))
            .collect();
        if let Some(free) = free
            && let Some(&most) = free.iter().max()
        {
            tied = tied
                .into_iter()
                .zip(free)
                .filter(|&(_, f)| f == most)
                .map(|(i, _)| i)
                .collect();
        }
        match tied.as_slice() {
            [only] => Some(*only),
            _ => {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                tied.get(turn % tied.len()).copied()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Lcg, PolicyKind, PrefixOptions, ReplicaLoad, build};
    use clap::ValueEnum;

    const ROUTE: Route<'static> = Route { prompt: &[1, 2, 3] };

    use crate::routing::idle_candidates as idle;

    fn with_in_flight(in_flight: &[usize]) -> Vec<Candidate> {
        let mut set = idle(in_flight.len());
        for (c, &n) in set.iter_mut().zip(in_flight) {
            c.in_flight = n;
        }
        set
    }

    /// A poll that saw `others` requests besides this gateway's.
    fn polled(others: u32, kv_blocks_free: u32) -> Option<ReplicaLoad> {
        Some(ReplicaLoad {
            running: others,
            waiting: 0,
            kv_blocks_free,
            kv_blocks_total: 1000,
            kv_block_size: 16,
            others,
        })
    }

    fn picks(policy: &LeastLoad, set: &[Candidate], count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| policy.pick(&ROUTE, set).expect("candidates are not empty"))
            .collect()
    }

    fn spread(in_flight: &[usize]) -> usize {
        let max = in_flight.iter().max().copied().unwrap_or(0);
        let min = in_flight.iter().min().copied().unwrap_or(0);
        max - min
    }

    /// Ends one request, chosen uniformly among those in flight.
    fn finish_any(in_flight: &mut [usize], rng: &mut Lcg) {
        let total: usize = in_flight.iter().sum();
        let mut request = rng.below(total);
        for n in in_flight.iter_mut() {
            if request < *n {
                *n -= 1;
                return;
            }
            request -= *n;
        }
    }

    #[test]
    fn picks_the_least_loaded() {
        let policy = LeastLoad::default();
        assert_eq!(picks(&policy, &with_in_flight(&[3, 1, 2]), 3), [1, 1, 1]);
    }

    #[test]
    fn no_candidates_picks_nothing() {
        assert_eq!(LeastLoad::default().pick(&ROUTE, &[]), None);
    }

    #[test]
    fn polled_load_counts_other_gateways_requests() {
        let mut set = with_in_flight(&[1, 3]);
        set[0].load = polled(7, 100);
        // 0 scores 1 + 7 = 8, 1 scores 3.
        assert_eq!(LeastLoad::default().pick(&ROUTE, &set), Some(1));
    }

    #[test]
    fn own_count_adds_to_what_only_the_poll_sees() {
        let mut set = with_in_flight(&[6, 2]);
        set[0].load = polled(0, 100);
        set[1].load = polled(3, 100);
        // 0 scores 6, 1 scores 2 + 3 = 5.
        assert_eq!(LeastLoad::default().pick(&ROUTE, &set), Some(1));
        set[1].load = polled(5, 100);
        assert_eq!(LeastLoad::default().pick(&ROUTE, &set), Some(0));
    }

    #[test]
    fn ties_go_to_more_free_kv_blocks() {
        let mut set = with_in_flight(&[2, 1, 0, 1]);
        set[0].load = polled(0, 10);
        set[1].load = polled(1, 50);
        set[2].load = polled(2, 30);
        set[3].load = polled(1, 900);
        // All score 2; 3 has the most free blocks.
        assert_eq!(picks(&LeastLoad::default(), &set, 3), [3, 3, 3]);
    }

    #[test]
    fn equally_free_ties_take_turns() {
        let mut set = with_in_flight(&[0, 0, 0]);
        set[0].load = polled(0, 50);
        set[1].load = polled(0, 20);
        set[2].load = polled(0, 50);
        assert_eq!(picks(&LeastLoad::default(), &set, 4), [0, 2, 0, 2]);
    }

    #[test]
    fn free_blocks_decide_only_when_every_tied_replica_reports_them() {
        let mut set = idle(2);
        set[1].load = polled(0, 500);
        assert_eq!(picks(&LeastLoad::default(), &set, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn tied_replicas_take_turns() {
        let policy = LeastLoad::default();
        assert_eq!(picks(&policy, &idle(3), 6), [0, 1, 2, 0, 1, 2]);
        // Only the tied ones share: 1 is busier.
        assert_eq!(picks(&policy, &with_in_flight(&[0, 1, 0]), 4), [0, 2, 0, 2]);
    }

    #[test]
    fn a_unique_minimum_does_not_use_up_a_turn() {
        let policy = LeastLoad::default();
        let mut in_flight = [0, 0];
        let mut picked = Vec::new();
        for _ in 0..6 {
            let i = policy
                .pick(&ROUTE, &with_in_flight(&in_flight))
                .expect("candidates are not empty");
            in_flight[i] += 1;
            picked.push(i);
        }
        // Ties at 0-0, 1-1, 2-2 go to 0, then 1, then 0.
        assert_eq!(picked, [0, 1, 1, 0, 0, 1]);
    }

    /// What can be guaranteed with requests ending at random: each pick goes
    /// to a replica that had the fewest in flight, so picks never widen the
    /// spread (max − min) beyond what finishes made it, or beyond 1.
    #[test]
    fn each_pick_is_least_loaded_and_never_widens_the_spread() {
        let policy = LeastLoad::default();
        let mut rng = Lcg(7);
        let mut in_flight = [0usize; 5];
        let mut widest = 0;
        for _ in 0..10_000 {
            if in_flight.iter().sum::<usize>() > 0 && rng.below(5) < 2 {
                finish_any(&mut in_flight, &mut rng);
                widest = widest.max(spread(&in_flight));
                continue;
            }
            let before = spread(&in_flight);
            let i = policy
                .pick(&ROUTE, &with_in_flight(&in_flight))
                .expect("candidates are not empty");
            assert_eq!(Some(&in_flight[i]), in_flight.iter().min());
            in_flight[i] += 1;
            assert!(spread(&in_flight) <= before.max(1), "{in_flight:?}");
        }
        // Random finishes do unbalance the replicas, so the bound above is
        // the one that holds, not "spread ≤ 1".
        assert!(widest > 1, "the simulation never unbalanced the replicas");
    }

    /// Spread ≤ 1 holds only while every finish comes off a most loaded
    /// replica. Ending the oldest request is not enough: picks 0, 1, 1 (the
    /// tie at [1, 1] went to 1), then the oldest, on 0, ends: [0, 2].
    #[test]
    fn with_finishes_on_a_busiest_replica_the_spread_stays_within_one() {
        let policy = LeastLoad::default();
        let mut rng = Lcg(11);
        let mut in_flight = [0usize; 4];
        for _ in 0..10_000 {
            let max = in_flight.iter().max().copied().unwrap_or(0);
            if max > 0 && rng.below(2) == 0 {
                let busiest: Vec<usize> = (0..in_flight.len())
                    .filter(|&i| in_flight[i] == max)
                    .collect();
                in_flight[busiest[rng.below(busiest.len())]] -= 1;
            } else {
                let i = policy
                    .pick(&ROUTE, &with_in_flight(&in_flight))
                    .expect("candidates are not empty");
                in_flight[i] += 1;
            }
            assert!(spread(&in_flight) <= 1, "{in_flight:?}");
        }
    }

    /// After random finishes, Σ(max − in_flight) picks fill every replica up
    /// to the busiest one, and the spread is back to 0.
    #[test]
    fn picks_refill_the_replicas_that_finishes_emptied() {
        let policy = LeastLoad::default();
        let mut rng = Lcg(3);
        let mut in_flight = [40usize; 4];
        for _ in 0..100 {
            finish_any(&mut in_flight, &mut rng);
        }
        let max = in_flight.iter().max().copied().unwrap_or(0);
        let deficit: usize = in_flight.iter().map(|&n| max - n).sum();
        assert!(deficit > 0, "{in_flight:?}");
        for _ in 0..deficit {
            let i = policy
                .pick(&ROUTE, &with_in_flight(&in_flight))
                .expect("candidates are not empty");
            in_flight[i] += 1;
        }
        assert_eq!(in_flight, [max; 4]);
    }

    #[test]
    fn its_name_is_its_flag_value() {
        let policy = build(PolicyKind::LeastLoad, PrefixOptions::default());
        let flag = PolicyKind::LeastLoad.to_possible_value();
        assert_eq!(flag.as_ref().map(|v| v.get_name()), Some(policy.name()));
        assert_eq!(LeastLoad::default().name(), policy.name());
    }
}
