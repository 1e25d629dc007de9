//! The retry policy: exponential backoff with jitter.

use std::time::Duration;

/// How often and how patiently a failing event is retried before it is
/// dead-lettered.
///
/// The delay before retry `n` (1-based) is
/// `min(initial_delay * multiplier^(n-1), max_delay)`, scaled by a random
/// factor in `[1 - jitter, 1]` so that workers failing together spread out.
///
/// ```
/// use std::time::Duration;
/// use chronicle_step::RetryPolicy;
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.max_retries, 3);
/// // Without the random part: 100 ms, 200 ms, 400 ms.
/// assert_eq!(policy.delay_with(3, 1.0), Duration::from_millis(400));
/// assert_eq!(policy.delay_with(3, 0.0), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 3, as the spec says); `0`
    /// dead-letters on the first failure.
    pub max_retries: u32,
    /// The delay before the first retry (default 100 ms).
    pub initial_delay: Duration,
    /// The factor between consecutive delays (default 2).
    pub multiplier: f64,
    /// The longest delay (default 10 s).
    pub max_delay: Duration,
    /// The fraction of each delay that is random, in `[0, 1]` (default 0.5:
    /// "equal jitter").
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// No retries and no delay: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// The delay before retry `retry` (1-based), before jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(64) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before retry `retry` with the random draw `unit` in
    /// `[0, 1]`: `base * (1 - jitter + jitter * unit)`.
    pub fn delay_with(&self, retry: u32, unit: f64) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + jitter * unit.clamp(0.0, 1.0);
        self.base_delay(retry).mul_f64(factor)
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |option, reason: &str| {
            Err(crate::Error::Config {
                option,
                reason: reason.to_owned(),
            })
        };
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return bad("retry.multiplier", "must be a finite number of at least 1");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("retry.jitter", "must be between 0 and 1");
        }
        if self.initial_delay > self.max_delay {
            return bad("retry.initial_delay", "must not exceed retry.max_delay");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_three_retries_doubling_from_100ms() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_retries, 3);
        let bases: Vec<_> = (1..=3).map(|n| p.base_delay(n)).collect();
        assert_eq!(
            bases,
            [100, 200, 400].map(Duration::from_millis).to_vec(),
            "exponential: each delay doubles"
        );
    }

    #[test]
    fn delays_are_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.base_delay(8), Duration::from_secs(10));
        assert_eq!(p.base_delay(10_000), Duration::from_secs(10));
        assert_eq!(p.delay_with(10_000, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = RetryPolicy::default();
        for retry in 1..=5 {
            let base = p.base_delay(retry);
            assert_eq!(p.delay_with(retry, 0.0), base / 2, "lower edge is base/2");
            assert_eq!(p.delay_with(retry, 1.0), base, "upper edge is base");
            for i in 0..=200 {
                let d = p.delay_with(retry, f64::from(i) / 200.0);
                assert!(
                    d >= base / 2 && d <= base,
                    "retry {retry}: {d:?} outside [{:?}, {base:?}]",
                    base / 2
                );
            }
        }
    }

    #[test]
    fn jitter_actually_spreads_delays() {
        let p = RetryPolicy::default();
        let draws: std::collections::HashSet<_> = (0..50)
            .map(|i| p.delay_with(2, f64::from(i) / 49.0))
            .collect();
        assert_eq!(draws.len(), 50, "each draw gives its own delay: {draws:?}");
    }

    #[test]
    fn no_jitter_is_exact() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_with(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay_with(2, 1.0), Duration::from_millis(200));
    }

    #[test]
    fn impossible_values_are_refused() {
        let bad = [
            RetryPolicy {
                multiplier: 0.5,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                jitter: 1.5,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                initial_delay: Duration::from_secs(60),
                ..RetryPolicy::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?} should be refused");
        }
        assert!(RetryPolicy::default().validate().is_ok());
    }
}
