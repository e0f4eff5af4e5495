//! Whether a worker's result may change a job: a pure decision both stores apply inside
//! their conditional write.

use super::ids::LeaseId;
use super::status::JobStatus;

/// How an accepted result relates to the job's attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultTiming {
    /// The job is processing the attempt the result is for.
    InTime,
    /// The attempt timed out and the job waits for its retry, not yet claimed again; the
    /// worker proved with the attempt's lease that it ran it, and it succeeded.
    LateSuccess,
}

/// Why a result is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultRefusal {
    /// The presented lease is not the job's current one: the attempt was taken away.
    StaleLease,
    /// The job is in no state to take this result (finished, never claimed, already
    /// reported, or a late failure).
    NotAccepting,
}

/// The facts a store reads about the job before it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptFacts {
    pub status: JobStatus,
    /// The lease of the job's current (or last) attempt.
    pub lease: Option<LeaseId>,
    /// Whether that attempt's worker already reported.
    pub reported: bool,
}

/// Decides whether a result with `presented` lease (MoRAG's client sends none) may be
/// applied. Without a lease, only an attempt in progress can take it.
pub fn judge_result(
    facts: AttemptFacts,
    presented: Option<LeaseId>,
    success: bool,
) -> Result<ResultTiming, ResultRefusal> {
    if presented.is_some() && presented != facts.lease {
        return Err(ResultRefusal::StaleLease);
    }
    match facts.status {
        JobStatus::Processing if !facts.reported => Ok(ResultTiming::InTime),
        JobStatus::Retrying if presented.is_some() && success && !facts.reported => {
            Ok(ResultTiming::LateSuccess)
        }
        _ => Err(ResultRefusal::NotAccepting),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_lease_and_outcome_combination() {
        let lease = LeaseId::new_random();
        let other = LeaseId::new_random();
        for status in JobStatus::ALL {
            for reported in [false, true] {
                for success in [false, true] {
                    let facts = AttemptFacts {
                        status,
                        lease: Some(lease),
                        reported,
                    };
                    assert_eq!(
                        judge_result(facts, Some(other), success),
                        Err(ResultRefusal::StaleLease)
                    );
                    let with_lease = judge_result(facts, Some(lease), success);
                    let without = judge_result(facts, None, success);
                    let expected_with = match (status, reported, success) {
                        (JobStatus::Processing, false, _) => Ok(ResultTiming::InTime),
                        (JobStatus::Retrying, false, true) => Ok(ResultTiming::LateSuccess),
                        _ => Err(ResultRefusal::NotAccepting),
                    };
                    let expected_without = match (status, reported) {
                        (JobStatus::Processing, false) => Ok(ResultTiming::InTime),
                        _ => Err(ResultRefusal::NotAccepting),
                    };
                    assert_eq!(
                        with_lease, expected_with,
                        "{status} reported={reported} success={success}"
                    );
                    assert_eq!(
                        without, expected_without,
                        "{status} reported={reported} success={success}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_job_never_claimed_takes_no_result() {
        let facts = AttemptFacts {
            status: JobStatus::Pending,
            lease: None,
            reported: false,
        };
        assert_eq!(
            judge_result(facts, None, true),
            Err(ResultRefusal::NotAccepting)
        );
        assert_eq!(
            judge_result(facts, Some(LeaseId::new_random()), true),
            Err(ResultRefusal::StaleLease)
        );
    }
}
