//! Whether a worker seen by the registry is still alive: a pure decision from what the
//! registry recorded about it, the server's heartbeat timeout and `now`.

use std::time::Duration;

use crate::clock::Timestamp;

/// How many poll waits a worker that holds no job may stay silent before it counts as
/// stale: one missed poll is a slow network, three are a worker that is gone.
pub const POLL_WAITS_BEFORE_STALE: u32 = 3;

/// The time between two polls assumed for a worker that polls without waiting (`wait` 0
/// or absent, as MoRAG's remote-converter does): its poll interval is its own setting, and
/// ten seconds is that client's default.
pub const ASSUMED_POLL_INTERVAL_WITHOUT_WAIT: Duration = Duration::from_secs(10);

/// What the registry knows about one worker process when judging it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerContact {
    /// The last poll, heartbeat, result or release from it.
    pub last_seen_at: Timestamp,
    /// The `wait` of its last poll (zero when it polls without waiting).
    pub poll_wait: Duration,
    /// Jobs it claimed and has not yet finished, released or been told it lost.
    pub jobs_in_flight: i64,
    /// Whether it ever sent a heartbeat. MoRAG's remote-converter never does, so a job it
    /// holds says nothing about when it will next be heard from.
    pub sends_heartbeats: bool,
}

/// What the judgement depends on besides the worker itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerHealthPolicy {
    /// The server's heartbeat timeout: a worker holding a job heartbeats well within it.
    pub heartbeat_timeout: Duration,
    /// The longest execution timeout of any content type: how long a worker that never
    /// heartbeats may work on a job in silence.
    pub longest_execution_timeout: Duration,
}

impl WorkerHealthPolicy {
    /// The windows that follow from the server's timeouts.
    pub fn from_timeouts(timeouts: &super::TimeoutPolicy) -> Self {
        let longest_execution_timeout = timeouts
            .execution_by_type
            .values()
            .copied()
            .fold(timeouts.execution_default, Duration::max);
        WorkerHealthPolicy {
            heartbeat_timeout: timeouts.heartbeat,
            longest_execution_timeout,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerHealth {
    /// Heard from within the time its way of working allows.
    Healthy,
    /// Silent for longer than that: crashed, stopped, or cut off.
    Stale,
}

impl WorkerHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerHealth::Healthy => "healthy",
            WorkerHealth::Stale => "stale",
        }
    }
}

/// How long `contact`'s worker may be silent before it counts as stale.
///
/// A worker holding a job is expected to heartbeat: it is stale once silent for the
/// heartbeat timeout (the same time after which the monitor takes its job away). A holder
/// that never heartbeats is allowed the longest execution timeout. A worker holding no job
/// is expected to poll again after each poll's wait: three of those without contact and it
/// is stale. (Taking the longer of the two windows for a holder would call a worker killed
/// mid-job healthy for three poll waits after its job was already timed out.)
pub fn silence_allowed(contact: &WorkerContact, policy: &WorkerHealthPolicy) -> Duration {
    if contact.jobs_in_flight > 0 {
        if contact.sends_heartbeats {
            policy.heartbeat_timeout
        } else {
            policy.longest_execution_timeout
        }
    } else {
        let period = if contact.poll_wait.is_zero() {
            ASSUMED_POLL_INTERVAL_WITHOUT_WAIT
        } else {
            contact.poll_wait
        };
        period * POLL_WAITS_BEFORE_STALE
    }
}

/// Healthy while the worker's silence is within `silence_allowed`, stale after.
pub fn judge_worker_health(
    contact: &WorkerContact,
    policy: &WorkerHealthPolicy,
    now: Timestamp,
) -> WorkerHealth {
    if now.since(contact.last_seen_at) > silence_allowed(contact, policy) {
        WorkerHealth::Stale
    } else {
        WorkerHealth::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000_000;

    fn at(secs: f64) -> Timestamp {
        Timestamp::from_micros(T0 + (secs * 1_000_000.0) as i64)
    }

    fn policy() -> WorkerHealthPolicy {
        WorkerHealthPolicy {
            heartbeat_timeout: Duration::from_secs(300),
            longest_execution_timeout: Duration::from_secs(3600),
        }
    }

    fn contact(poll_wait: u64, jobs_in_flight: i64, sends_heartbeats: bool) -> WorkerContact {
        WorkerContact {
            last_seen_at: at(0.0),
            poll_wait: Duration::from_secs(poll_wait),
            jobs_in_flight,
            sends_heartbeats,
        }
    }

    fn check(contact: WorkerContact, healthy_until: f64) {
        let policy = policy();
        assert_eq!(
            judge_worker_health(&contact, &policy, at(healthy_until)),
            WorkerHealth::Healthy,
            "{contact:?} at {healthy_until}"
        );
        assert_eq!(
            judge_worker_health(&contact, &policy, at(healthy_until + 0.001)),
            WorkerHealth::Stale,
            "{contact:?} just after {healthy_until}"
        );
    }

    #[test]
    fn an_idle_worker_is_stale_after_three_poll_waits_without_contact() {
        check(contact(30, 0, true), 90.0);
        check(contact(2, 0, false), 6.0);
    }

    #[test]
    fn a_worker_polling_without_waiting_is_allowed_three_of_morags_poll_intervals() {
        check(contact(0, 0, false), 30.0);
    }

    #[test]
    fn a_heartbeating_worker_holding_a_job_is_stale_after_the_heartbeat_timeout() {
        check(contact(30, 1, true), 300.0);
        // Even when three poll waits would allow it longer.
        check(contact(200, 2, true), 300.0);
    }

    #[test]
    fn a_holder_that_never_heartbeats_is_allowed_the_longest_execution_timeout() {
        check(contact(0, 1, false), 3600.0);
    }

    #[test]
    fn a_negative_in_flight_count_is_no_job_held() {
        // Counts merged from several replicas may pass below zero for a moment.
        check(contact(5, -1, true), 15.0);
    }
}
