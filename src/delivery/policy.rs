//! When to try a failed delivery again, and when to give up. Pure: the caller passes the
//! attempt number, `now` and the jitter in.

use std::time::Duration;

use super::DeliveryError;
use crate::clock::Timestamp;
use crate::store::deliveries::AttemptResult;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrySchedule {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetrySchedule {
    /// `min(base * 2^(attempt - 1), max)`, of which a random half is taken off (so
    /// deliveries that failed together, say while a receiver was down, spread out when it
    /// comes back). `jitter` is a number in `[0, 1)`.
    pub fn delay_after(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        let full = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.backoff_max);
        full.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// What attempt number `attempt` (1 for the first) coming to `outcome` means.
    pub fn decide(
        &self,
        attempt: u32,
        outcome: Result<(), DeliveryError>,
        jitter: f64,
        now: Timestamp,
    ) -> AttemptResult {
        match outcome {
            Ok(()) => AttemptResult::Delivered,
            Err(DeliveryError::Permanent(error)) => AttemptResult::Dead { error },
            Err(DeliveryError::Retryable(error)) if attempt >= self.max_attempts => {
                AttemptResult::Dead {
                    error: format!("{error} (gave up after {attempt} attempts)"),
                }
            }
            Err(DeliveryError::Retryable(error)) => AttemptResult::RetryAt {
                at: now.plus(self.delay_after(attempt, jitter)),
                error,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_takes_at_most_half() {
        let s = schedule();
        assert_eq!(s.delay_after(1, 0.0), Duration::from_secs(1));
        assert_eq!(s.delay_after(2, 0.0), Duration::from_secs(2));
        assert_eq!(s.delay_after(3, 0.0), Duration::from_secs(3));
        assert_eq!(s.delay_after(60, 0.0), Duration::from_secs(3));
        assert_eq!(
            s.delay_after(2, 0.999_999),
            Duration::from_secs(2).mul_f64(0.5000005)
        );
    }

    #[test]
    fn permanent_errors_and_the_last_attempt_dead_letter() {
        let s = schedule();
        let now = Timestamp::from_micros(0);
        let retryable = || Err(DeliveryError::Retryable("HTTP 503".into()));
        assert_eq!(
            s.decide(1, retryable(), 0.0, now),
            AttemptResult::RetryAt {
                at: now.plus(Duration::from_secs(1)),
                error: "HTTP 503".into()
            }
        );
        assert!(matches!(
            s.decide(3, retryable(), 0.0, now),
            AttemptResult::Dead { .. }
        ));
        assert!(matches!(
            s.decide(
                1,
                Err(DeliveryError::Permanent("HTTP 410".into())),
                0.0,
                now
            ),
            AttemptResult::Dead { .. }
        ));
        assert_eq!(s.decide(3, Ok(()), 0.0, now), AttemptResult::Delivered);
    }
}
