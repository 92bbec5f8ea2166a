//! Delays: exponential unlock-retry backoff and jittered check intervals.
//!
//! Jitter spreads the Key Vault calls of a fleet that booted together (or lost the vault
//! together) so they do not hit the vault in step when it comes back.

use std::time::Duration;

use rand::Rng;

use super::config::RetryConfig;

/// Exponential backoff: `initial * multiplier^attempt`, capped at `max`, then ±`jitter`.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: RetryConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(cfg: RetryConfig) -> Self {
        Self { cfg, attempt: 0 }
    }

    /// Delay before the next attempt; each call grows the delay.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.base(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter never pushes the delay above the cap: the cap is what operators plan with.
        jitter(base, self.cfg.jitter, rng).min(self.cfg.max)
    }

    /// Start again from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn base(&self, attempt: u32) -> Duration {
        let f = self.cfg.multiplier.powi(attempt.min(64) as i32);
        let secs = self.cfg.initial.as_secs_f64() * f;
        if !secs.is_finite() || secs >= self.cfg.max.as_secs_f64() {
            self.cfg.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// `d` scaled by a uniform factor in `[1 - frac, 1 + frac]`.
pub fn jitter(d: Duration, frac: f64, rng: &mut impl Rng) -> Duration {
    if frac <= 0.0 {
        return d;
    }
    let f = rng.gen_range((1.0 - frac).max(0.0)..=(1.0 + frac));
    Duration::from_secs_f64(d.as_secs_f64() * f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(jitter: f64) -> RetryConfig {
        RetryConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut b = Backoff::new(cfg(0.0));
        let got: Vec<u64> = (0..6).map(|_| b.next_delay(&mut rng).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_band_and_under_cap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(cfg(0.5));
        let first = b.next_delay(&mut rng);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(1500));
        for _ in 0..50 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(10));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(jitter(Duration::from_secs(30), 0.1, &mut rng).as_millis());
        }
        assert!(seen.len() > 1, "jitter must vary the delay");
        assert!(seen.iter().all(|m| (27_000..=33_000).contains(m)));
    }
}
