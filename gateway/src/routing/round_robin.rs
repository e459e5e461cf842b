//! Round robin: each eligible replica in turn.
//!
//! Blind to load and to the prompt on purpose: it is the baseline the other
//! policies are measured against, and the safe choice when the workers'
//! load figures cannot be trusted. It must not grow any of that knowledge.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Route, RoutingPolicy};

/// Rotates over the candidates. The turn counter is shared by all calls, not
/// kept per replica, so when replicas come and go every one of the current
/// set still gets one pick in each run of `candidates.len()` picks.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn pick(&self, _route: &Route<'_>, candidates: &[Candidate]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        // Wraps at usize::MAX: one uneven turn in 2^64 picks.
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(turn % candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{PolicyKind, PrefixOptions, build};
    use clap::ValueEnum;

    const ROUTE: Route<'static> = Route { prompt: &[1, 2, 3] };

    fn candidates(addresses: &[&str]) -> Vec<Candidate> {
        addresses
            .iter()
            .map(|a| Candidate {
                address: (*a).to_owned(),
                in_flight: 0,
                load: None,
            })
            .collect()
    }

    fn picked_addresses(policy: &RoundRobin, set: &[Candidate], picks: usize) -> Vec<String> {
        (0..picks)
            .map(|_| {
                let index = policy.pick(&ROUTE, set).expect("candidates are not empty");
                set[index].address.clone()
            })
            .collect()
    }

    #[test]
    fn rotates_over_the_candidates() {
        let policy = RoundRobin::default();
        let set = candidates(&["a", "b", "c"]);
        assert_eq!(
            picked_addresses(&policy, &set, 6),
            ["a", "b", "c", "a", "b", "c"]
        );
    }

    #[test]
    fn no_candidates_picks_nothing() {
        assert_eq!(RoundRobin::default().pick(&ROUTE, &[]), None);
    }

    #[test]
    fn ignores_load_and_prompt() {
        let policy = RoundRobin::default();
        let mut set = candidates(&["a", "b"]);
        set[0].in_flight = 100;
        let other = Route { prompt: &[9; 64] };
        assert_eq!(policy.pick(&ROUTE, &set), Some(0));
        assert_eq!(policy.pick(&other, &set), Some(1));
        assert_eq!(policy.pick(&other, &set), Some(0));
    }

    #[test]
    fn every_replica_gets_its_turn_when_the_set_shrinks() {
        let policy = RoundRobin::default();
        policy.pick(&ROUTE, &candidates(&["a", "b", "c"]));
        let picks = picked_addresses(&policy, &candidates(&["a", "c"]), 4);
        assert_eq!(picks.iter().filter(|a| *a == "a").count(), 2);
        assert_eq!(picks.iter().filter(|a| *a == "c").count(), 2);
    }

    #[test]
    fn every_replica_gets_its_turn_when_the_set_grows() {
        let policy = RoundRobin::default();
        policy.pick(&ROUTE, &candidates(&["a", "b"]));
        let picks = picked_addresses(&policy, &candidates(&["a", "b", "c"]), 6);
        for address in ["a", "b", "c"] {
            assert_eq!(picks.iter().filter(|a| *a == address).count(), 2);
        }
    }

    #[test]
    fn its_name_is_its_flag_value() {
        let policy = build(PolicyKind::RoundRobin, PrefixOptions::default());
        let flag = PolicyKind::RoundRobin.to_possible_value();
        assert_eq!(flag.as_ref().map(|v| v.get_name()), Some(policy.name()));
        assert_eq!(RoundRobin::default().name(), policy.name());
    }
}
