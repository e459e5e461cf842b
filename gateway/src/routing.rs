//! Routing policies: which of the eligible replicas gets the next request.
//!
//! A policy sees only the indices of replicas that are healthy and serve the
//! requested model; health, model lookup and retries are the pool's job.

use std::sync::atomic::{AtomicUsize, Ordering};

pub trait RoutingPolicy: Send + Sync + std::fmt::Debug {
    /// Picks one of `eligible` (worker indices, ascending); `None` when empty.
    fn pick(&self, eligible: &[usize]) -> Option<usize>;
}

/// Rotates over the eligible replicas; every replica gets its turn even as
/// others come and go.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn pick(&self, eligible: &[usize]) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(eligible[turn % eligible.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_over_the_eligible_workers() {
        let policy = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| policy.pick(&[1, 3, 4]).unwrap()).collect();
        assert_eq!(picks, [1, 3, 4, 1, 3, 4]);
    }

    #[test]
    fn nothing_eligible_picks_nothing() {
        assert_eq!(RoundRobin::default().pick(&[]), None);
    }

    #[test]
    fn every_replica_is_used_when_the_set_shrinks() {
        let policy = RoundRobin::default();
        policy.pick(&[0, 1, 2]);
        let picks: Vec<_> = (0..4).map(|_| policy.pick(&[0, 2]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&w| w == 0).count(), 2);
        assert_eq!(picks.iter().filter(|&&w| w == 2).count(), 2);
    }
}
