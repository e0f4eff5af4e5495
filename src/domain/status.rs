//! The job state machine: the states, who moves a job out of each, and the one table of
//! allowed transitions that every store write is checked against.

use std::fmt;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    /// Created (or released by its worker), waiting for a worker. Left by a claim (worker), a cancel (admin) or the
    /// pending timeout (monitor).
    Pending,
    /// Claimed by a worker under a lease. Left by the worker's result or release, a cancel
    /// (admin), or the execution / heartbeat timeout (monitor).
    Processing,
    /// The worker delivered a result. Left only by a cancel (admin).
    Completed,
    /// The attempt failed. A job rests here only when its failure is final; with retries
    /// left it moves on to `Retrying` in the same write. Left by a manual retry or a cancel (admin).
    Failed,
    /// The attempt (or the wait for a worker) ran out of time. Like `Failed`, a job rests
    /// here only when the timeout is final. Left by a manual retry or a cancel (admin).
    Timeout,
    /// Stopped by an admin. Terminal.
    Cancelled,
    /// Waiting for its backoff delay to pass; claimable once it has. Left by a claim or a
    /// late success of the previous attempt (worker), or a cancel (admin).
    Retrying,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pending,
        JobStatus::Processing,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Timeout,
        JobStatus::Cancelled,
        JobStatus::Retrying,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Timeout => "timeout",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Retrying => "retrying",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    /// Waiting to be claimed by a worker.
    pub fn is_claimable(self) -> bool {
        matches!(self, JobStatus::Pending | JobStatus::Retrying)
    }

    /// Finished: nothing moves the job on without an admin. These are the states that
    /// retention cleanup deletes.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Timeout | JobStatus::Cancelled
        )
    }

    /// Whether `self -> to` is allowed. This is the whole transition table; see
    /// ARCHITECTURE.md for why it differs from MoRAG's in two places (`Retrying -> Completed`,
    /// `Processing -> Pending`).
    pub fn can_move_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Pending, Processing | Cancelled | Timeout)
                | (
                    Processing,
                    Completed | Failed | Timeout | Cancelled | Pending
                )
                | (Failed, Retrying | Cancelled)
                | (Timeout, Retrying | Cancelled)
                | (Retrying, Processing | Failed | Cancelled | Completed)
                | (Completed, Cancelled)
        )
    }

    /// The states a job may be cancelled from.
    pub fn cancellable_states() -> Vec<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .filter(|s| s.can_move_to(JobStatus::Cancelled))
            .collect()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who caused a transition; recorded in the job's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The ingestion side creating the job.
    Client,
    Worker,
    Monitor,
    Admin,
}

impl Actor {
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Client => "client",
            Actor::Worker => "worker",
            Actor::Monitor => "monitor",
            Actor::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Actor> {
        [Actor::Client, Actor::Worker, Actor::Monitor, Actor::Admin]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    /// The full 7x7 table, written out by hand so a change to `can_move_to` must be
    /// mirrored here on purpose.
    #[test]
    fn transition_table_is_exactly_the_documented_one() {
        let allowed: &[(JobStatus, &[JobStatus])] = &[
            (Pending, &[Processing, Cancelled, Timeout]),
            (
                Processing,
                &[Completed, Failed, Timeout, Cancelled, Pending],
            ),
            (Completed, &[Cancelled]),
            (Failed, &[Retrying, Cancelled]),
            (Timeout, &[Retrying, Cancelled]),
            (Cancelled, &[]),
            (Retrying, &[Processing, Failed, Cancelled, Completed]),
        ];
        for (from, tos) in allowed {
            for to in JobStatus::ALL {
                assert_eq!(from.can_move_to(to), tos.contains(&to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn no_state_moves_to_itself_and_only_a_release_moves_back_to_pending() {
        for s in JobStatus::ALL {
            assert!(!s.can_move_to(s), "{s}");
            assert_eq!(s.can_move_to(Pending), s == Processing, "{s}");
        }
    }

    #[test]
    fn cancelled_is_terminal_and_reachable_from_everything_else() {
        for s in JobStatus::ALL {
            assert!(!Cancelled.can_move_to(s));
            assert_eq!(s.can_move_to(Cancelled), s != Cancelled, "{s}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn claimable_and_finished_partition_correctly() {
        for s in JobStatus::ALL {
            assert!(!(s.is_claimable() && s.is_finished()), "{s}");
            assert_eq!(s.is_claimable(), s.can_move_to(Processing), "{s}");
        }
        assert!(!Processing.is_claimable() && !Processing.is_finished());
    }
}
