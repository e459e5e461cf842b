//! A per-replica circuit breaker: after `failures` failed calls in a row the
//! replica gets no traffic for `open_for`, then one trial call decides
//! whether it closes again or stays open for another period.
//!
//! It complements health checks: a replica can answer its probes and still
//! fail every request (a broken engine, a full disk, a bad GPU). What counts
//! as a failure is the caller's decision; this is a plain state machine with
//! the clock passed in, so it never sleeps and its tests need no runtime.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Failed calls in a row that open the breaker (0: never opens).
    pub failures: u32,
    /// How long an open breaker refuses traffic before a trial call.
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// One trial call may go through; its outcome closes or reopens.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    failed_in_row: u32,
    /// Set while open: when the next trial may start.
    open_until: Option<Instant>,
    /// A trial call is in flight (half-open).
    trial: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            failed_in_row: 0,
            open_until: None,
            trial: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may be routed here now, without taking the trial slot:
    /// routing asks this of every candidate, then [`Breaker::acquire`]s the one picked.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !self.trial,
        }
    }

    /// Records that a call is starting; in half-open state it becomes the
    /// trial and later calls are refused until it ends. False if refused.
    pub fn acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.trial => false,
            BreakerState::HalfOpen => {
                self.trial = true;
                true
            }
        }
    }

    pub fn on_success(&mut self) {
        self.failed_in_row = 0;
        self.open_until = None;
        self.trial = false;
    }

    /// Returns true when this failure opened the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.failed_in_row = self.failed_in_row.saturating_add(1);
        let was_open = self.open_until.is_some();
        let trip =
            self.trial || (self.config.failures > 0 && self.failed_in_row >= self.config.failures);
        self.trial = false;
        if trip {
            self.open_until = Some(now + self.config.open_for);
        }
        trip && !was_open
    }

    /// A call that ended with no verdict on the replica (the client went
    /// away, a bad request): frees the trial slot without deciding.
    pub fn on_neutral(&mut self) {
        self.trial = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(10);

    fn breaker(failures: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failures,
            open_for: OPEN,
        })
    }

    #[test]
    fn opens_after_the_configured_failures_in_a_row() {
        let t = Instant::now();
        let mut b = breaker(3);
        assert!(!b.on_failure(t));
        assert!(!b.on_failure(t));
        assert_eq!(b.state(t), BreakerState::Closed);
        assert!(b.on_failure(t), "the third failure opens it");
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.allows(t + OPEN / 2));
        assert!(!b.clone().acquire(t + OPEN / 2));
    }

    #[test]
    fn a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = breaker(2);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let t = Instant::now();
        let mut b = breaker(1);
        b.on_failure(t);
        let later = t + OPEN;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.allows(later));
        assert!(b.acquire(later), "the trial");
        assert!(!b.allows(later) && !b.acquire(later), "one trial at a time");

        // A failed trial reopens for a full period from its end.
        let end = later + Duration::from_secs(1);
        b.on_failure(end);
        assert_eq!(b.state(end + OPEN / 2), BreakerState::Open);
        assert_eq!(b.state(end + OPEN), BreakerState::HalfOpen);

        // A successful one closes.
        assert!(b.acquire(end + OPEN));
        b.on_success();
        assert_eq!(b.state(end + OPEN), BreakerState::Closed);
        assert!(b.acquire(end + OPEN) && b.acquire(end + OPEN));
    }

    #[test]
    fn a_neutral_end_frees_the_trial_slot() {
        let t = Instant::now();
        let mut b = breaker(1);
        b.on_failure(t);
        assert!(b.acquire(t + OPEN));
        b.on_neutral();
        assert_eq!(b.state(t + OPEN), BreakerState::HalfOpen);
        assert!(b.acquire(t + OPEN));
    }

    #[test]
    fn zero_failures_never_opens() {
        let t = Instant::now();
        let mut b = breaker(0);
        for _ in 0..100 {
            assert!(!b.on_failure(t));
        }
        assert_eq!(b.state(t), BreakerState::Closed);
    }
}
