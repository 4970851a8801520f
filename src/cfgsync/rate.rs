//! How often each node may change what its peers see: a token bucket per identifier.

use tokio::time::Instant;

/// How often each node may change what its peers see (its IP or metadata): a token bucket
/// per identifier, in this server's memory. A node re-registering with changing metadata
/// would otherwise make every watching node reload at every registration.
#[derive(Debug)]
pub struct ChangeRate {
    per_minute: u32,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl ChangeRate {
    /// A rate of `per_minute` changes, bursts of as many (0: unlimited).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Default::default(),
        }
    }

    /// The changes a minute it allows (0: unlimited).
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one change for `identifier`, or says in how many seconds one would be taken.
    pub(super) fn take(&self, identifier: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 50_000 {
            // Full buckets say nothing a fresh one would not.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_second < capacity
            });
        }
        let (tokens, at) = buckets
            .entry(identifier.to_string())
            .or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - *tokens) / per_second).ceil() as u64)
    }

    /// Returns a change taken for `identifier` that was never stored (the registration was
    /// refused after the take), so a refusal does not cost the node one.
    pub(super) fn give_back(&self, identifier: &str) {
        let capacity = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tokens, _)) = buckets.get_mut(identifier) {
            *tokens = (*tokens + 1.0).min(capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_node_changes_at_most_its_rate_after_a_burst() {
        let rate = ChangeRate::new(3);
        for _ in 0..3 {
            rate.take("n").unwrap();
        }
        assert_eq!(rate.take("n"), Err(20), "the next change comes in 20 s");
        assert!(rate.take("other").is_ok(), "each node has its own bucket");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(rate.take("n").is_ok(), "one change comes back every 20 s");
        assert!(rate.take("n").is_err());
        assert!(ChangeRate::new(0).take("n").is_ok(), "0 means unlimited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_given_back_can_be_taken_again_but_never_past_the_burst() {
        let rate = ChangeRate::new(3);
        for _ in 0..3 {
            rate.take("n").unwrap();
        }
        rate.give_back("n");
        assert!(rate.take("n").is_ok(), "the change given back");
        assert!(rate.take("n").is_err());
        let fresh = ChangeRate::new(2);
        fresh.take("m").unwrap();
        fresh.give_back("m");
        fresh.give_back("m");
        assert!(fresh.take("m").is_ok() && fresh.take("m").is_ok());
        assert!(fresh.take("m").is_err(), "no more than the burst");
    }
}
