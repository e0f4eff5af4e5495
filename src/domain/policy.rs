//! Timeout, retry and retention policy: plain functions of (policy, job facts, now) that
//! return a decision. Nothing here reads a clock, a database or a random source; the
//! caller passes `now` and the jitter in, so every decision is reproducible in tests.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ids::ContentType;
use super::status::JobStatus;
use crate::clock::Timestamp;

/// How long each phase of a job may take.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeoutPolicy {
    /// Execution timeout per known content type.
    pub execution_by_type: BTreeMap<String, Duration>,
    /// Execution timeout for content types not in `execution_by_type`.
    pub execution_default: Duration,
    /// How long a job may go without a heartbeat, counted from its previous one. Only
    /// applies once a worker has sent its first heartbeat: MoRAG's client never sends any.
    pub heartbeat: Duration,
    /// How long a job may wait for its first claim; `None` = forever.
    pub pending: Option<Duration>,
}

impl Default for TimeoutPolicy {
    fn default() -> Self {
        let secs = Duration::from_secs;
        let execution_by_type = [
            ("audio", secs(1800)),
            ("video", secs(3600)),
            ("document", secs(600)),
            ("image", secs(300)),
            ("web", secs(600)),
            ("youtube", secs(1800)),
        ]
        .into_iter()
        .map(|(name, timeout)| (name.to_owned(), timeout))
        .collect();
        TimeoutPolicy {
            execution_by_type,
            execution_default: secs(3600),
            heartbeat: secs(300),
            pending: None,
        }
    }
}

impl TimeoutPolicy {
    pub fn execution_timeout(&self, content_type: &ContentType) -> Duration {
        self.execution_by_type
            .get(content_type.as_str())
            .copied()
            .unwrap_or(self.execution_default)
    }

    /// The monitor's deadline for a freshly created (or re-created) pending job.
    pub fn pending_deadline(&self, created_at: Timestamp) -> Option<Timestamp> {
        self.pending.map(|timeout| created_at.plus(timeout))
    }

    /// Deadlines of an attempt that starts now.
    pub fn claim_deadlines(&self, content_type: &ContentType, now: Timestamp) -> AttemptDeadlines {
        let execution = now.plus(self.execution_timeout(content_type));
        AttemptDeadlines {
            execution,
            heartbeat: None,
        }
    }

    /// Deadlines after a heartbeat at `now`: the heartbeat deadline moves, the execution
    /// deadline never does.
    pub fn heartbeat_deadlines(&self, execution: Timestamp, now: Timestamp) -> AttemptDeadlines {
        AttemptDeadlines {
            execution,
            heartbeat: Some(now.plus(self.heartbeat)),
        }
    }
}

/// The two deadlines of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptDeadlines {
    pub execution: Timestamp,
    /// Set from the first heartbeat on.
    pub heartbeat: Option<Timestamp>,
}

impl AttemptDeadlines {
    /// When the monitor must look at the job next: the nearer of the two.
    pub fn next(&self) -> Timestamp {
        match self.heartbeat {
            Some(heartbeat) => heartbeat.min(self.execution),
            None => self.execution,
        }
    }

    /// Which deadline has passed at `now`, if any. When both have, the execution deadline
    /// is named: it is the harder limit.
    pub fn expired(&self, now: Timestamp) -> Option<Expiry> {
        if self.execution <= now {
            Some(Expiry::Execution)
        } else if self.heartbeat.is_some_and(|heartbeat| heartbeat <= now) {
            Some(Expiry::Heartbeat)
        } else {
            None
        }
    }
}

/// Which limit a job ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No worker claimed the pending job in time. Final: a retry would land in the same
    /// starved queue, and the ingestion side should fall back to local processing.
    Pending,
    Execution,
    Heartbeat,
}

impl Expiry {
    pub fn reason(self) -> &'static str {
        match self {
            Expiry::Pending => "no worker claimed the job before the pending timeout",
            Expiry::Execution => "execution timeout exceeded",
            Expiry::Heartbeat => "heartbeat timeout exceeded: no heartbeat from the worker",
        }
    }

    /// Whether a job that hit this limit may be retried automatically.
    pub fn allows_retry(self) -> bool {
        !matches!(self, Expiry::Pending)
    }
}

/// How failed and timed-out attempts are retried.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Automatic retries per job (a manual retry resets the count).
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The largest fraction taken off a delay as jitter, so jobs that failed together do
    /// not all come back in the same instant.
    pub jitter_fraction: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            backoff_base: Duration::from_secs(60),
            backoff_max: Duration::from_secs(3600),
            jitter_fraction: 0.1,
        }
    }
}

/// What happens after an attempt failed or timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Move to `Retrying`; claimable again at `at`. `retry_count` is the job's new count.
    Retry { at: Timestamp, retry_count: u32 },
    /// No retry: the failure is final and must be handed off to the ingestion side.
    Final,
}

impl RetryPolicy {
    /// The delay before a retry when `retries_done` retries already happened:
    /// `min(base * 2^retries_done, max)`, less up to `jitter_fraction` of it.
    /// `jitter` is a number in `[0, 1)` chosen by the caller.
    pub fn backoff_delay(&self, retries_done: u32, jitter: f64) -> Duration {
        let factor = 2u32.checked_pow(retries_done).unwrap_or(u32::MAX);
        let raw = self
            .backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max);
        let capped = raw.min(self.backoff_max);
        let jitter = jitter.clamp(0.0, 1.0) * self.jitter_fraction.clamp(0.0, 1.0);
        capped.mul_f64(1.0 - jitter)
    }

    /// Decides between a retry and a final failure.
    pub fn after_failure(
        &self,
        retries_done: u32,
        retryable: bool,
        now: Timestamp,
        jitter: f64,
    ) -> AfterFailure {
        if !retryable || retries_done >= self.max_retries {
            return AfterFailure::Final;
        }
        AfterFailure::Retry {
            at: now.plus(self.backoff_delay(retries_done, jitter)),
            retry_count: retries_done + 1,
        }
    }
}

/// How long finished jobs are kept before the cleaner deletes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Completed and cancelled jobs.
    pub finished: Duration,
    /// Failed and timed-out jobs: kept longer by default, since failures are what
    /// operators come back to investigate.
    pub failed: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy::from_days(7, None)
    }
}

impl RetentionPolicy {
    pub fn from_days(days: u32, failed_days: Option<u32>) -> Self {
        let day = Duration::from_secs(86_400);
        RetentionPolicy {
            finished: day * days,
            failed: day * failed_days.unwrap_or(days.saturating_mul(2)),
        }
    }

    /// The same retention for every finished state (the admin cleanup endpoint's `days_old`).
    pub fn uniform(days: u32) -> Self {
        RetentionPolicy::from_days(days, Some(days))
    }

    /// Jobs of `status` that finished before the returned time are due for deletion.
    pub fn cutoff(&self, status: JobStatus, now: Timestamp) -> Option<Timestamp> {
        match status {
            JobStatus::Completed | JobStatus::Cancelled => Some(now.minus(self.finished)),
            JobStatus::Failed | JobStatus::Timeout => Some(now.minus(self.failed)),
            _ => None,
        }
    }
}

/// Every policy the lifecycle needs, passed to the store with each operation that
/// decides something.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LifecyclePolicy {
    pub timeouts: TimeoutPolicy,
    pub retry: RetryPolicy,
    pub retention: RetentionPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_micros(secs * 1_000_000)
    }

    fn ct(name: &str) -> ContentType {
        ContentType::parse(name).unwrap()
    }

    #[test]
    fn execution_timeouts_per_type_with_default() {
        let policy = TimeoutPolicy::default();
        let expected = [
            ("audio", 1800),
            ("video", 3600),
            ("document", 600),
            ("image", 300),
            ("web", 600),
            ("youtube", 1800),
        ];
        for (name, secs) in expected {
            assert_eq!(
                policy.execution_timeout(&ct(name)),
                Duration::from_secs(secs),
                "{name}"
            );
        }
        assert_eq!(
            policy.execution_timeout(&ct("spreadsheet")),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn heartbeat_deadline_applies_only_after_first_heartbeat_and_never_moves_execution() {
        let policy = TimeoutPolicy {
            heartbeat: Duration::from_secs(30),
            ..Default::default()
        };
        let claimed = policy.claim_deadlines(&ct("image"), at(0));
        assert_eq!(
            claimed,
            AttemptDeadlines {
                execution: at(300),
                heartbeat: None
            }
        );
        assert_eq!(claimed.next(), at(300));
        // Without heartbeats only the execution deadline counts.
        assert_eq!(claimed.expired(at(299)), None);
        assert_eq!(claimed.expired(at(300)), Some(Expiry::Execution));

        let beat = policy.heartbeat_deadlines(claimed.execution, at(100));
        assert_eq!(
            beat,
            AttemptDeadlines {
                execution: at(300),
                heartbeat: Some(at(130))
            }
        );
        assert_eq!(beat.next(), at(130));
        assert_eq!(beat.expired(at(129)), None);
        assert_eq!(beat.expired(at(130)), Some(Expiry::Heartbeat));

        // Heartbeats near the end cannot extend past the execution deadline.
        let late = policy.heartbeat_deadlines(claimed.execution, at(290));
        assert_eq!(late.next(), at(300));
        assert_eq!(late.expired(at(300)), Some(Expiry::Execution));
    }

    #[test]
    fn pending_timeout_is_off_by_default_and_final() {
        assert_eq!(TimeoutPolicy::default().pending_deadline(at(5)), None);
        let policy = TimeoutPolicy {
            pending: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        assert_eq!(policy.pending_deadline(at(5)), Some(at(15)));
        assert!(!Expiry::Pending.allows_retry());
        assert!(Expiry::Execution.allows_retry() && Expiry::Heartbeat.allows_retry());
    }

    #[test]
    fn backoff_doubles_then_caps_and_jitter_only_shortens() {
        let policy = RetryPolicy::default();
        let no_jitter: Vec<u64> = (0..8)
            .map(|n| policy.backoff_delay(n, 0.0).as_secs())
            .collect();
        assert_eq!(no_jitter, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(
            policy.backoff_delay(200, 0.0),
            Duration::from_secs(3600),
            "no overflow"
        );
        for n in 0..8 {
            for jitter in [0.0, 0.3, 0.999] {
                let delay = policy.backoff_delay(n, jitter);
                let full = policy.backoff_delay(n, 0.0);
                assert!(
                    delay <= full && delay >= full.mul_f64(0.9),
                    "n={n} jitter={jitter}"
                );
            }
        }
    }

    #[test]
    fn retries_until_exhausted_unless_not_retryable() {
        let policy = RetryPolicy {
            max_retries: 2,
            jitter_fraction: 0.0,
            ..Default::default()
        };
        assert_eq!(
            policy.after_failure(0, true, at(0), 0.5),
            AfterFailure::Retry {
                at: at(60),
                retry_count: 1
            }
        );
        assert_eq!(
            policy.after_failure(1, true, at(0), 0.5),
            AfterFailure::Retry {
                at: at(120),
                retry_count: 2
            }
        );
        assert_eq!(
            policy.after_failure(2, true, at(0), 0.5),
            AfterFailure::Final
        );
        assert_eq!(
            policy.after_failure(0, false, at(0), 0.5),
            AfterFailure::Final
        );
        let none = RetryPolicy {
            max_retries: 0,
            ..Default::default()
        };
        assert_eq!(none.after_failure(0, true, at(0), 0.0), AfterFailure::Final);
    }

    #[test]
    fn failures_are_kept_twice_as_long_by_default() {
        let policy = RetentionPolicy::from_days(7, None);
        let now = at(100 * 86_400);
        assert_eq!(
            policy.cutoff(JobStatus::Completed, now),
            Some(at(93 * 86_400))
        );
        assert_eq!(
            policy.cutoff(JobStatus::Cancelled, now),
            Some(at(93 * 86_400))
        );
        assert_eq!(policy.cutoff(JobStatus::Failed, now), Some(at(86 * 86_400)));
        assert_eq!(
            policy.cutoff(JobStatus::Timeout, now),
            Some(at(86 * 86_400))
        );
        for unfinished in [
            JobStatus::Pending,
            JobStatus::Processing,
            JobStatus::Retrying,
        ] {
            assert_eq!(policy.cutoff(unfinished, now), None);
        }
        let explicit = RetentionPolicy::from_days(7, Some(3));
        assert_eq!(explicit.failed, Duration::from_secs(3 * 86_400));
        assert_eq!(
            RetentionPolicy::uniform(2).failed,
            RetentionPolicy::uniform(2).finished
        );
    }
}
