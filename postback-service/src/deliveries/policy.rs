//! Which answers count as delivered, which are retried, and when (pure).

use std::time::Duration;

/// What an attempt's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Delivered,
    /// 5xx, 408, 429, timeouts, connection errors: try again later.
    Retry,
    /// Any other answer (4xx, a redirect we do not follow): give up now.
    Permanent,
}

/// Classifies an HTTP status.
pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Delivered,
        408 | 429 | 500..=599 => Class::Retry,
        _ => Class::Permanent,
    }
}

/// How retries are spaced and when they stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the second attempt; each later one doubles it.
    pub first_retry: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No attempt is scheduled later than this after the first.
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(10),
            max_attempts: 10,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// When to try again after `attempts` failed attempts, the first at
    /// `first_attempt_ms`; `None`: give up. `jitter_seed` spreads retries of
    /// different deliveries by ±20 % so a recovering endpoint is not hit by a wave.
    pub fn next_attempt_ms(
        &self,
        attempts: u32,
        first_attempt_ms: i64,
        now_ms: i64,
        jitter_seed: u64,
    ) -> Option<i64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let base = self.first_retry.as_millis() as u64;
        let delay = base.saturating_mul(1u64 << attempts.saturating_sub(1).min(40));
        // ±20 %, from the seed.
        let jittered = delay.saturating_mul(80 + jitter_seed % 41) / 100;
        let next = now_ms.saturating_add(jittered as i64);
        let deadline = first_attempt_ms.saturating_add(self.max_age.as_millis() as i64);
        (next <= deadline).then_some(next)
    }
}

/// A stable 64-bit seed from a delivery id (FNV-1a), for jitter.
pub fn seed(delivery_id: &str) -> u64 {
    delivery_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert_eq!(classify(200), Class::Delivered);
        assert_eq!(classify(204), Class::Delivered);
        for s in [408, 429, 500, 502, 503] {
            assert_eq!(classify(s), Class::Retry, "{s}");
        }
        for s in [301, 302, 400, 401, 403, 404, 410] {
            assert_eq!(classify(s), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_stops() {
        let p = RetryPolicy {
            first_retry: Duration::from_secs(10),
            max_attempts: 4,
            max_age: Duration::from_secs(3600),
        };
        for (attempts, base) in [(1u32, 10_000i64), (2, 20_000), (3, 40_000)] {
            for seed in [0u64, 7, 40, 12345] {
                let d = p.next_attempt_ms(attempts, 0, 1000, seed).unwrap() - 1000;
                assert!(
                    d >= base * 8 / 10 && d <= base * 12 / 10,
                    "attempt {attempts} seed {seed}: {d}"
                );
            }
        }
        assert_eq!(
            p.next_attempt_ms(4, 0, 1000, 0),
            None,
            "max attempts reached"
        );
    }

    #[test]
    fn stops_at_max_age() {
        let p = RetryPolicy {
            first_retry: Duration::from_secs(10),
            max_attempts: 100,
            max_age: Duration::from_secs(60),
        };
        assert!(p.next_attempt_ms(1, 0, 30_000, 0).is_some());
        assert_eq!(
            p.next_attempt_ms(1, 0, 55_000, 40),
            None,
            "would land after the first attempt + 60 s"
        );
    }

    #[test]
    fn seeds_differ_by_delivery() {
        assert_ne!(seed("a"), seed("b"));
        assert_eq!(seed("a"), seed("a"));
    }
}
