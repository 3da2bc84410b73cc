//! Reconnect backoff: exponential with full jitter, no I/O, no clock.
//!
//! After a rendezvous restart every camera reconnects; full jitter spreads them over the
//! whole window instead of in synchronized waves.

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never above `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// Forgets past failures (call after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The ceiling of the next delay: `base * 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay, uniformly in `[0, ceiling]`; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings: Vec<_> = (0..10)
            .map(|_| {
                let c = b.ceiling();
                b.next_delay(0.5);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings[..6], [100, 200, 400, 800, 1600, 3200]);
        assert_eq!(ceilings[9], 5000);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(0.999_999).as_millis(), 199);
        // Many attempts never overflow.
        for _ in 0..1000 {
            assert!(b.next_delay(1.0) <= Duration::from_secs(5));
        }
    }
}
