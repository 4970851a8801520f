//! Exponential backoff: capped, jittered, reset on success.

use std::time::Duration;

/// The delay before the next attempt grows as `base · 2^(failures-1)` up to `cap`, with up to
/// ±20 % jitter so replicas and initialisers do not retry in lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Records a failure and returns the delay before the next attempt.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(20);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let jitter = 0.8 + fastrand::f64() * 0.4;
        raw.mul_f64(jitter).min(self.cap)
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_stop_at_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(60));
        let first = backoff.fail();
        assert!((8.0..=12.0).contains(&first.as_secs_f64()), "{first:?}");
        let second = backoff.fail();
        assert!((16.0..=24.0).contains(&second.as_secs_f64()), "{second:?}");
        for _ in 0..10 {
            assert!(backoff.fail() <= Duration::from_secs(60));
        }
        assert_eq!(backoff.failures(), 12);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(60));
        for _ in 0..5 {
            backoff.fail();
        }
        backoff.reset();
        assert!(backoff.fail() <= Duration::from_secs(12));
    }
}
