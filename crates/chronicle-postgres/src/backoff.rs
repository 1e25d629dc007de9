//! Jittered delays for retries.

use std::time::Duration;

/// `delay` scaled by a random factor in [0.5, 1.0] ("equal jitter"), so that
/// many clients retrying at once spread out.
pub(crate) fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}
