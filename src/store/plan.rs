//! The planning layer: every transition is decided here, once, for both backends.
//!
//! A backend reads the columns of a job's row that a transition depends on (`Row`), asks
//! a `plan_*` function (or a planner, for the monitor's batches) what to write, and
//! applies the answer as one conditional write: the state the write must still find (so
//! a concurrent change makes it match nothing), the new columns, the history entries with
//! their reasons and the hand-off. When no transition is allowed the plan says why, as
//! the `StoreError` the caller gets. The statistics counters follow from the planned
//! status change (`from` -> `status`): SQLite's triggers and PostgreSQL's delta statements
//! count exactly that. Reasons, windows and every status decision live in this file;
//! backends contain no lifecycle policy (`backends_contain_no_lifecycle_policy` checks it).
//!
//! Pure: no SQL, no IO, no clock. `now` and the jitter come in with the request.

use std::time::Duration;

use super::{
    AttemptOutcome, CancelParams, CleanupParams, CleanupReport, HeartbeatOutcome, HeartbeatParams,
    ManualRetryParams, ReleaseParams, RescueParams, RescueReport, StoreError, SubmitResultParams,
};
use crate::clock::Timestamp;
use crate::domain::{
    judge_result, Actor, AfterFailure, AttemptDeadlines, AttemptFacts, ContentType, Expiry,
    HandoffKind, JobStatus, LeaseId, ResultRefusal, ResultTiming, RetentionPolicy, RetryPolicy,
    TimeoutPolicy,
};

/// Every history reason a backend writes, but the free-form ones (an admin's cancel
/// reason, a worker's error message, an import's source).
pub mod reasons {
    /// A job's first entry.
    pub const CREATED: &str = "created";
    pub const WORKER_SUCCESS: &str = "worker reported success";
    pub const LATE_SUCCESS: &str = "late result of a timed-out attempt";
    pub const MANUAL_RETRY: &str = "manual retry: retry budget reset";
    /// A worker handed its attempt back (shutting down): claimable at once, no retry spent.
    pub const RELEASE: &str = "released by its worker: claimable again, no retry spent";
    /// Appended to a worker's error message when it said retrying cannot help.
    pub const NOT_RETRYABLE_SUFFIX: &str = " (not retryable)";
    /// A claim's reason, with `{worker}` and `{attempt}` filled in by `claim_reason` (or,
    /// where the attempt number is only known inside a batch statement, by the backend's
    /// text replacement of `{attempt}` in `claim_reason_template`'s answer).
    pub const CLAIM: &str = "claimed by worker {worker} (attempt {attempt})";
    /// The placeholder a claim reason template leaves for the attempt number.
    pub const ATTEMPT_PLACEHOLDER: &str = "{attempt}";
}

/// How long per-minute creation counters are kept: twice the statistics' 24-hour window.
pub const CREATION_COUNTER_RETENTION: Duration = Duration::from_secs(2 * 86_400);
/// The window of `Statistics::created_last_24h`.
pub const CREATED_RECENTLY_WINDOW: Duration = Duration::from_secs(86_400);

/// The minute (since the epoch) a timestamp falls in, as the creation counters count.
pub fn minute_of(at: Timestamp) -> i64 {
    at.as_micros() / 60_000_000
}

/// Creation counters of minutes before this one are no longer needed.
pub fn stale_creation_counters_before(now: Timestamp) -> i64 {
    minute_of(now.minus(CREATION_COUNTER_RETENTION))
}

/// The first minute counted in `created_last_24h`.
pub fn created_recently_since(now: Timestamp) -> i64 {
    minute_of(now.minus(CREATED_RECENTLY_WINDOW))
}

/// One history entry a transition writes, in the same write.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryStep {
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub actor: Actor,
    pub reason: String,
}

impl HistoryStep {
    fn new(
        from: Option<JobStatus>,
        to: JobStatus,
        actor: Actor,
        reason: impl Into<String>,
    ) -> Self {
        HistoryStep {
            from,
            to,
            actor,
            reason: reason.into(),
        }
    }
}

/// The columns of a job's row that transitions are decided from, as a backend read them.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub status: JobStatus,
    /// The lease as stored (text); a conditional write compares it as it was read.
    pub lease_id: Option<String>,
    pub retry_count: u32,
    /// Whether the current attempt's worker already reported (`result_received_at`).
    pub result_received: bool,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_deadline: Option<Timestamp>,
}

/// Which lease a conditional write requires.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseCondition {
    /// Any: a result without a lease, written without reading the job first; the write's
    /// other conditions are exactly the in-time case of `judge_result`.
    Any,
    /// The stored lease must still be this one (`IS`: NULL matches NULL).
    Is(Option<String>),
}

impl LeaseCondition {
    pub fn any(&self) -> bool {
        matches!(self, LeaseCondition::Any)
    }

    /// The lease to compare with, when one is required.
    pub fn expected(&self) -> Option<&str> {
        match self {
            LeaseCondition::Any => None,
            LeaseCondition::Is(lease) => lease.as_deref(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Creation and claims.

/// The creation entry of a new job.
pub fn created_step() -> HistoryStep {
    HistoryStep::new(None, JobStatus::Pending, Actor::Client, reasons::CREATED)
}

/// The first entry of an imported job, stored in whatever status it had elsewhere.
pub fn imported_step(status: JobStatus, reason: &str) -> HistoryStep {
    HistoryStep::new(None, status, Actor::Admin, reason)
}

/// The status of a job that was just created.
pub const CREATED_STATUS: JobStatus = JobStatus::Pending;
/// The status a claim moves a job to.
pub const CLAIMED_STATUS: JobStatus = JobStatus::Processing;
/// Who claims.
pub const CLAIM_ACTOR: Actor = Actor::Worker;

/// A claim's history reason.
pub fn claim_reason(worker: &str, attempt: u32) -> String {
    claim_reason_template(worker).replace(reasons::ATTEMPT_PLACEHOLDER, &attempt.to_string())
}

/// A claim's history reason with the attempt number left as `reasons::ATTEMPT_PLACEHOLDER`.
pub fn claim_reason_template(worker: &str) -> String {
    reasons::CLAIM.replace("{worker}", worker)
}

/// A claim's history entry from `previous` (pending or retrying).
pub fn claim_step(previous: JobStatus, worker: &str, attempt: u32) -> HistoryStep {
    HistoryStep::new(
        Some(previous),
        CLAIMED_STATUS,
        CLAIM_ACTOR,
        claim_reason(worker, attempt),
    )
}

/// The execution deadline of an attempt of `content_type` that starts at `now`.
pub fn claim_deadlines(
    timeouts: &TimeoutPolicy,
    content_type: &ContentType,
    now: Timestamp,
) -> AttemptDeadlines {
    timeouts.claim_deadlines(content_type, now)
}

/// For a batch claim that may pick a job of any of several types: each type with its own
/// execution timeout and that attempt's deadline, plus the deadline for any other type.
/// `wanted` empty means any type: the types the policy names, deduplicated and sorted.
pub fn claim_deadline_table(
    timeouts: &TimeoutPolicy,
    wanted: &[ContentType],
    now: Timestamp,
) -> (Vec<ContentType>, Vec<Timestamp>, Timestamp) {
    let mut types: Vec<ContentType> = if wanted.is_empty() {
        timeouts
            .execution_by_type
            .keys()
            .filter_map(|name| ContentType::parse(name).ok())
            .collect()
    } else {
        wanted.to_vec()
    };
    types.sort();
    types.dedup();
    let deadlines = types
        .iter()
        .map(|t| timeouts.claim_deadlines(t, now).execution)
        .collect();
    let other = now.plus(timeouts.execution_default);
    (types, deadlines, other)
}

// ---------------------------------------------------------------------------------------
// Attempts that end badly: a worker's failure or the monitor's timeout.

/// The write of an attempt (or a wait for a worker) that failed or timed out: either a
/// retry (`Retrying`, claimable at `available_at`) or a final outcome handed off.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptEnd {
    pub status: JobStatus,
    /// `None` keeps the stored count.
    pub retry_count: Option<u32>,
    /// `None` keeps the stored time.
    pub available_at: Option<Timestamp>,
    pub deadline_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub error_message: String,
    pub history: Vec<HistoryStep>,
    pub handoff: Option<HandoffKind>,
    pub retry_scheduled: bool,
}

/// The history reason of an automatic retry.
pub fn retry_reason(retry_count: u32, max_retries: u32, at: Timestamp) -> String {
    format!("automatic retry {retry_count} of {max_retries}, claimable from {at}")
}

/// Decides what follows an attempt of a job in `from` that ended in `ended` (failed or
/// timed out): the retry policy picks a retry or a final outcome.
#[allow(clippy::too_many_arguments)]
fn attempt_end(
    from: JobStatus,
    ended: JobStatus,
    actor: Actor,
    error_message: String,
    history_reason: String,
    retries_done: u32,
    retryable: bool,
    retry: &RetryPolicy,
    now: Timestamp,
    jitter: f64,
) -> AttemptEnd {
    let mut history = vec![HistoryStep::new(Some(from), ended, actor, history_reason)];
    match retry.after_failure(retries_done, retryable, now, jitter) {
        AfterFailure::Retry { at, retry_count } => {
            history.push(HistoryStep::new(
                Some(ended),
                JobStatus::Retrying,
                actor,
                retry_reason(retry_count, retry.max_retries, at),
            ));
            AttemptEnd {
                status: JobStatus::Retrying,
                retry_count: Some(retry_count),
                available_at: Some(at),
                deadline_at: Some(at),
                completed_at: None,
                error_message,
                history,
                handoff: None,
                retry_scheduled: true,
            }
        }
        AfterFailure::Final => AttemptEnd {
            status: ended,
            retry_count: Some(retries_done),
            available_at: Some(now),
            deadline_at: None,
            completed_at: Some(now),
            error_message,
            history,
            handoff: HandoffKind::for_final_status(ended),
            retry_scheduled: false,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Results.

/// A worker's result, planned: the state the write must find, and what it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultPlan {
    pub expected_status: JobStatus,
    pub expected_lease: LeaseCondition,
    /// `None`: any count (the in-time success written without reading the job).
    pub expected_retry_count: Option<u32>,
    pub change: ResultChange,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ResultChange {
    /// The job completes with the result; `progress` becomes 100.
    Success {
        status: JobStatus,
        completed_at: Timestamp,
        history: HistoryStep,
        handoff: HandoffKind,
    },
    Failure(AttemptEnd),
}

impl ResultPlan {
    pub fn status(&self) -> JobStatus {
        match &self.change {
            ResultChange::Success { status, .. } => *status,
            ResultChange::Failure(end) => end.status,
        }
    }

    pub fn history(&self) -> Vec<&HistoryStep> {
        match &self.change {
            ResultChange::Success { history, .. } => vec![history],
            ResultChange::Failure(end) => end.history.iter().collect(),
        }
    }

    pub fn handoff(&self) -> Option<HandoffKind> {
        match &self.change {
            ResultChange::Success { handoff, .. } => Some(*handoff),
            ResultChange::Failure(end) => end.handoff,
        }
    }
}

fn success_change(previous: JobStatus, reason: &str, now: Timestamp) -> ResultChange {
    ResultChange::Success {
        status: JobStatus::Completed,
        completed_at: now,
        history: HistoryStep::new(Some(previous), JobStatus::Completed, Actor::Worker, reason),
        handoff: HandoffKind::Completed,
    }
}

/// A success written without reading the job first, for the common case: the write's
/// conditions (processing, not yet reported, the presented lease or none) are exactly
/// `judge_result`'s in-time case, so it applies only where `plan_result` would have
/// planned the same write. Anything else matches nothing and goes through `plan_result`.
pub fn plan_in_time_success(p: &SubmitResultParams) -> Option<ResultPlan> {
    if !matches!(p.outcome, AttemptOutcome::Success { .. }) {
        return None;
    }
    Some(ResultPlan {
        expected_status: JobStatus::Processing,
        expected_lease: match p.lease_id {
            Some(lease) => LeaseCondition::Is(Some(lease.to_string())),
            None => LeaseCondition::Any,
        },
        expected_retry_count: None,
        change: success_change(JobStatus::Processing, reasons::WORKER_SUCCESS, p.now),
    })
}

/// Decides what the result `p` does to a job in `row`, or why it is refused.
pub fn plan_result(row: &Row, p: &SubmitResultParams) -> Result<ResultPlan, StoreError> {
    let success = matches!(p.outcome, AttemptOutcome::Success { .. });
    let facts = AttemptFacts {
        status: row.status,
        lease: row.lease_id.as_deref().and_then(|l| LeaseId::parse(l).ok()),
        reported: row.result_received,
    };
    let timing = judge_result(facts, p.lease_id, success).map_err(|refusal| match refusal {
        ResultRefusal::StaleLease => StoreError::LeaseMismatch {
            current: row.status,
        },
        ResultRefusal::NotAccepting => StoreError::InvalidTransition {
            current: row.status,
        },
    })?;
    let change = match &p.outcome {
        AttemptOutcome::Success { .. } => {
            let reason = match timing {
                ResultTiming::InTime => reasons::WORKER_SUCCESS,
                ResultTiming::LateSuccess => reasons::LATE_SUCCESS,
            };
            success_change(row.status, reason, p.now)
        }
        AttemptOutcome::Failure {
            error_message,
            retryable,
        } => {
            let history_reason = if *retryable {
                error_message.clone()
            } else {
                format!("{error_message}{}", reasons::NOT_RETRYABLE_SUFFIX)
            };
            ResultChange::Failure(attempt_end(
                row.status,
                JobStatus::Failed,
                Actor::Worker,
                error_message.clone(),
                history_reason,
                row.retry_count,
                *retryable,
                &p.policy.retry,
                p.now,
                p.jitter,
            ))
        }
    };
    Ok(ResultPlan {
        expected_status: row.status,
        expected_lease: LeaseCondition::Is(row.lease_id.clone()),
        expected_retry_count: Some(row.retry_count),
        change,
    })
}

// ---------------------------------------------------------------------------------------
// Heartbeats.

#[derive(Clone, Debug, PartialEq)]
pub enum HeartbeatPlan {
    /// An admin cancelled the job: nothing is written, the worker is told to stop.
    Cancelled,
    /// The heartbeat deadline moves; the write applies only while the job still runs
    /// this attempt (status, lease, execution deadline) and no deadline has passed
    /// (`deadline_at > now`): the monitor's `rescue_expired` is what enforces the
    /// deadlines, and a late heartbeat cannot revive an attempt it is about to time out.
    Extend {
        expected_status: JobStatus,
        expected_lease: String,
        expected_execution_deadline: Timestamp,
        deadlines: AttemptDeadlines,
        /// The monitor's next look at the job (`deadline_at`).
        deadline_at: Timestamp,
    },
}

impl HeartbeatPlan {
    /// The answer to the worker once the plan is applied.
    pub fn outcome(&self) -> HeartbeatOutcome {
        match self {
            HeartbeatPlan::Cancelled => HeartbeatOutcome {
                status: JobStatus::Cancelled,
                cancelled: true,
                execution_deadline: None,
                heartbeat_deadline: None,
            },
            HeartbeatPlan::Extend {
                expected_status,
                deadlines,
                ..
            } => HeartbeatOutcome {
                status: *expected_status,
                cancelled: false,
                execution_deadline: Some(deadlines.execution),
                heartbeat_deadline: deadlines.heartbeat,
            },
        }
    }
}

pub fn plan_heartbeat(row: &Row, p: &HeartbeatParams) -> Result<HeartbeatPlan, StoreError> {
    let lease = p.lease_id.to_string();
    if row.lease_id.as_deref() != Some(lease.as_str()) {
        return Err(StoreError::LeaseMismatch {
            current: row.status,
        });
    }
    if row.status == JobStatus::Cancelled {
        return Ok(HeartbeatPlan::Cancelled);
    }
    let execution = match (row.status, row.execution_deadline) {
        (JobStatus::Processing, Some(execution)) => execution,
        _ => {
            return Err(StoreError::InvalidTransition {
                current: row.status,
            })
        }
    };
    let deadlines = p.timeouts.heartbeat_deadlines(execution, p.now);
    Ok(HeartbeatPlan::Extend {
        expected_status: JobStatus::Processing,
        expected_lease: lease,
        expected_execution_deadline: execution,
        deadline_at: deadlines.next(),
        deadlines,
    })
}

/// Why a planned heartbeat matched nothing, given the job's status now.
pub fn heartbeat_not_applied(current: Option<JobStatus>) -> StoreError {
    match current {
        // Still processing: its deadline passed and the monitor is about to act.
        Some(JobStatus::Processing) => StoreError::DeadlinePassed,
        Some(current) => StoreError::InvalidTransition { current },
        None => StoreError::NotFound,
    }
}

// ---------------------------------------------------------------------------------------
// Release: a worker hands its attempt back.

/// A released attempt: the job is claimable again at once, with its retry count kept.
/// The write applies only while the job still runs this attempt (status and lease).
/// It clears the lease, the attempt's deadlines and the monitor's `deadline_at` (a
/// released job has no pending deadline any more: it was claimed in time once), and the
/// progress the attempt reported. `available_at` is kept, so the job keeps its place at
/// the front of the queue.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleasePlan {
    pub expected_status: JobStatus,
    pub expected_lease: String,
    pub status: JobStatus,
    pub history: HistoryStep,
}

/// The most times one job may be released. A worker that claims and releases in a loop (a
/// crash loop, or a misbehaving client holding the worker key) would otherwise keep the job
/// from ever failing: past the limit a release is refused, so the attempt ends as an
/// abandoned one does, at its heartbeat or execution timeout, which spends a retry.
pub const MAX_RELEASES_PER_JOB: u32 = 10;

/// The history step every release records (and only a release): how releases are counted.
pub const RELEASE_STEP: (JobStatus, JobStatus) = (JobStatus::Processing, JobStatus::Pending);

/// The history reason of a release, with the worker's own words when it gave any.
pub fn release_reason(worker_reason: Option<&str>) -> String {
    match worker_reason.map(str::trim).filter(|r| !r.is_empty()) {
        Some(said) => format!("{} ({said})", reasons::RELEASE),
        None => reasons::RELEASE.to_owned(),
    }
}

/// Only the current attempt's worker may release it, only while it is processing (a
/// cancelled job stays cancelled; a finished one keeps its outcome), and only while the job
/// was released fewer than `MAX_RELEASES_PER_JOB` times (`n_released`, counted from its
/// history by `RELEASE_STEP`).
pub fn plan_release(
    row: &Row,
    p: &ReleaseParams,
    n_released: u32,
) -> Result<ReleasePlan, StoreError> {
    let lease = p.lease_id.to_string();
    if row.lease_id.as_deref() != Some(lease.as_str()) {
        return Err(StoreError::LeaseMismatch {
            current: row.status,
        });
    }
    if !row.status.can_move_to(JobStatus::Pending) || row.result_received {
        return Err(StoreError::InvalidTransition {
            current: row.status,
        });
    }
    if n_released >= MAX_RELEASES_PER_JOB {
        return Err(StoreError::ReleaseLimitReached {
            limit: MAX_RELEASES_PER_JOB,
        });
    }
    Ok(ReleasePlan {
        expected_status: row.status,
        expected_lease: lease,
        status: JobStatus::Pending,
        history: HistoryStep::new(
            Some(row.status),
            JobStatus::Pending,
            Actor::Worker,
            release_reason(p.reason.as_deref()),
        ),
    })
}

/// Why a planned release matched nothing, given the job's status now.
pub fn release_not_applied(current: Option<JobStatus>) -> StoreError {
    match current {
        // Someone moved the attempt on (a timeout and a new claim) since it was read.
        Some(current) => StoreError::LeaseMismatch { current },
        None => StoreError::NotFound,
    }
}

// ---------------------------------------------------------------------------------------
// Admin: cancel and manual retry.

#[derive(Clone, Debug, PartialEq)]
pub struct CancelPlan {
    pub expected_status: JobStatus,
    pub status: JobStatus,
    /// `None` keeps the stored time: a job that already had its outcome keeps when it had it.
    pub completed_at: Option<Timestamp>,
    pub history: HistoryStep,
    /// `None` when the job's outcome was already handed off: each outcome is handed off once.
    pub handoff: Option<HandoffKind>,
}

/// Cancelling a live job stops it and hands the cancellation off. Cancelling a job that
/// already has its outcome (completed, or failed or timed out for good) only records the
/// cancellation: it keeps its result and `completed_at`, and nothing is handed off again.
pub fn plan_cancel(row: &Row, p: &CancelParams) -> Result<CancelPlan, StoreError> {
    if !row.status.can_move_to(JobStatus::Cancelled) {
        return Err(StoreError::InvalidTransition {
            current: row.status,
        });
    }
    let had_outcome = row.status.is_finished();
    Ok(CancelPlan {
        expected_status: row.status,
        status: JobStatus::Cancelled,
        completed_at: (!had_outcome).then_some(p.now),
        history: HistoryStep::new(
            Some(row.status),
            JobStatus::Cancelled,
            Actor::Admin,
            p.reason.as_str(),
        ),
        handoff: (!had_outcome).then_some(HandoffKind::Cancelled),
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPlan {
    pub expected_status: JobStatus,
    pub status: JobStatus,
    pub retry_count: u32,
    pub available_at: Timestamp,
    pub history: HistoryStep,
}

/// A manual retry: claimable at once, with a fresh retry budget.
pub fn plan_manual_retry(row: &Row, p: &ManualRetryParams) -> Result<RetryPlan, StoreError> {
    if !row.status.can_move_to(JobStatus::Retrying) {
        return Err(StoreError::InvalidTransition {
            current: row.status,
        });
    }
    Ok(RetryPlan {
        expected_status: row.status,
        status: JobStatus::Retrying,
        retry_count: 0,
        available_at: p.now,
        history: HistoryStep::new(
            Some(row.status),
            JobStatus::Retrying,
            Actor::Admin,
            reasons::MANUAL_RETRY,
        ),
    })
}

// ---------------------------------------------------------------------------------------
// The monitor: expired deadlines and retention.

/// What the monitor does with one job whose `deadline_at` passed.
#[derive(Clone, Debug, PartialEq)]
pub enum RescuePlan {
    /// A pending job no worker claimed in time: a final timeout. Written only while the
    /// job is still pending with its deadline passed.
    PendingTimeout(AttemptEnd),
    /// An attempt past its execution or heartbeat deadline. Written only while the job
    /// still runs that attempt (lease, retry count) with its deadline passed.
    AttemptTimeout {
        expected_lease: Option<String>,
        expected_retry_count: u32,
        end: AttemptEnd,
    },
    /// A retry's backoff passed: only the deadline is cleared (the job is claimable by
    /// its `available_at`); the caller wakes long-polling workers.
    RetryDue,
    /// A job that keeps a deadline it does not need (finished, or a processing row whose
    /// deadlines have not passed): the deadline is cleared or left, nothing else changes.
    ClearDeadline,
    /// Nothing to do yet.
    Skip,
}

impl RescuePlan {
    /// The status the write must find.
    pub fn expected_status(&self) -> Option<JobStatus> {
        match self {
            RescuePlan::PendingTimeout(_) => Some(JobStatus::Pending),
            RescuePlan::AttemptTimeout { .. } => Some(JobStatus::Processing),
            RescuePlan::RetryDue => Some(JobStatus::Retrying),
            RescuePlan::ClearDeadline | RescuePlan::Skip => None,
        }
    }

    /// Counts the plan in `report`, once its write changed the job.
    pub fn count(&self, report: &mut RescueReport) {
        match self {
            RescuePlan::PendingTimeout(_) => report.n_pending_timed_out += 1,
            RescuePlan::AttemptTimeout { end, .. } => {
                report.n_attempts_timed_out += 1;
                if end.retry_scheduled {
                    report.n_retries_scheduled += 1;
                }
            }
            RescuePlan::RetryDue => report.n_retries_due += 1,
            RescuePlan::ClearDeadline | RescuePlan::Skip => {}
        }
    }
}

/// Plans one rescue pass: one plan per expired row, each retry with its own jitter drawn
/// from the pass's seed.
pub struct RescuePlanner<'a> {
    params: &'a RescueParams,
    rng: fastrand::Rng,
}

impl<'a> RescuePlanner<'a> {
    pub fn new(params: &'a RescueParams) -> Self {
        RescuePlanner {
            params,
            rng: fastrand::Rng::with_seed(params.jitter_seed),
        }
    }

    pub fn plan(&mut self, row: &Row) -> RescuePlan {
        let p = self.params;
        match row.status {
            JobStatus::Pending => {
                let expiry = Expiry::Pending;
                RescuePlan::PendingTimeout(AttemptEnd {
                    status: JobStatus::Timeout,
                    retry_count: None,
                    available_at: None,
                    deadline_at: None,
                    completed_at: Some(p.now),
                    error_message: expiry.reason().to_owned(),
                    history: vec![HistoryStep::new(
                        Some(JobStatus::Pending),
                        JobStatus::Timeout,
                        Actor::Monitor,
                        expiry.reason(),
                    )],
                    handoff: HandoffKind::for_final_status(JobStatus::Timeout),
                    retry_scheduled: false,
                })
            }
            JobStatus::Processing => {
                let Some(execution) = row.execution_deadline else {
                    return RescuePlan::Skip;
                };
                let deadlines = AttemptDeadlines {
                    execution,
                    heartbeat: row.heartbeat_deadline,
                };
                let Some(expiry) = deadlines.expired(p.now) else {
                    return RescuePlan::Skip;
                };
                let jitter = self.rng.f64();
                RescuePlan::AttemptTimeout {
                    expected_lease: row.lease_id.clone(),
                    expected_retry_count: row.retry_count,
                    end: attempt_end(
                        JobStatus::Processing,
                        JobStatus::Timeout,
                        Actor::Monitor,
                        expiry.reason().to_owned(),
                        expiry.reason().to_owned(),
                        row.retry_count,
                        expiry.allows_retry(),
                        &p.policy.retry,
                        p.now,
                        jitter,
                    ),
                }
            }
            JobStatus::Retrying => RescuePlan::RetryDue,
            // A finished job never keeps a deadline; clearing a stray one moves the scan on.
            _ => RescuePlan::ClearDeadline,
        }
    }
}

/// One step of a cleanup pass: delete at most `limit` jobs of `status` finished before
/// `cutoff`, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanupBatch {
    pub status: JobStatus,
    pub cutoff: Timestamp,
    pub limit: usize,
}

/// The order cleanup deletes in: quick-to-expire states first.
const CLEANUP_ORDER: [JobStatus; 4] = [
    JobStatus::Completed,
    JobStatus::Cancelled,
    JobStatus::Failed,
    JobStatus::Timeout,
];

/// Whether a result that left the job in `status` recorded a hand-off (the dispatcher is
/// woken after the commit): only a final outcome is handed off.
pub fn result_hands_off(status: JobStatus) -> bool {
    status.is_finished()
}

/// Whether a rescue pass recorded hand-offs: pending timeouts are final, and so is every
/// timed-out attempt that was not scheduled for a retry.
pub fn rescue_hands_off(report: &RescueReport) -> bool {
    report.n_pending_timed_out > 0 || report.n_attempts_timed_out > report.n_retries_scheduled
}

/// The statuses and cutoffs a cleanup with `retention` at `now` deletes from, in order; a
/// dry run counts the same rows.
pub fn cleanup_targets(retention: RetentionPolicy, now: Timestamp) -> Vec<(JobStatus, Timestamp)> {
    CLEANUP_ORDER
        .iter()
        .filter_map(|&status| Some((status, retention.cutoff(status, now)?)))
        .collect()
}

/// Plans one cleanup pass: which statuses, cutoffs and how many, within the pass's
/// budget, and which deleted jobs' source files are left without a job.
pub struct CleanupPlanner {
    retention: RetentionPolicy,
    now: Timestamp,
    budget: usize,
    next_status: usize,
    report: CleanupReport,
    /// Source files of the jobs deleted so far, to check once the deletions are done.
    deleted_source_files: std::collections::BTreeSet<String>,
}

impl CleanupPlanner {
    pub fn new(p: &CleanupParams) -> Self {
        CleanupPlanner {
            retention: p.retention,
            now: p.now,
            budget: p.limit,
            next_status: 0,
            report: CleanupReport::default(),
            deleted_source_files: Default::default(),
        }
    }

    /// The next batch to delete, or `None` when the pass is done.
    pub fn next_batch(&mut self) -> Option<CleanupBatch> {
        while self.budget > 0 {
            let status = *CLEANUP_ORDER.get(self.next_status)?;
            self.next_status += 1;
            if let Some(cutoff) = self.retention.cutoff(status, self.now) {
                return Some(CleanupBatch {
                    status,
                    cutoff,
                    limit: self.budget,
                });
            }
        }
        None
    }

    /// Records one deleted job and its source file.
    pub fn deleted(&mut self, source_file_path: String) {
        self.report.n_deleted += 1;
        self.budget = self.budget.saturating_sub(1);
        self.deleted_source_files.insert(source_file_path);
    }

    /// The deleted jobs' source files, each once: the backend looks, after all of the
    /// pass's deletions (so a file two deleted jobs shared is not found still in use by
    /// the second), whether another job still uses it, and calls `orphaned` if none does.
    /// Many jobs share a file (MoRAG converts one upload in several ways): one look each.
    pub fn source_files_to_check(&mut self) -> Vec<String> {
        std::mem::take(&mut self.deleted_source_files)
            .into_iter()
            .collect()
    }

    /// No remaining job uses this source file: the caller may delete it.
    pub fn orphaned(&mut self, source_file_path: String) {
        if !self
            .report
            .orphaned_source_files
            .contains(&source_file_path)
        {
            self.report.orphaned_source_files.push(source_file_path);
        }
    }

    /// The creation counters this pass deletes: minutes before the returned one.
    pub fn stale_creation_counters_before(&self) -> i64 {
        stale_creation_counters_before(self.now)
    }

    pub fn finish(self) -> CleanupReport {
        self.report
    }
}

#[cfg(test)]
mod tests;
