//! The job lifecycle without IO: identifiers, the state machine, and the timeout, retry
//! and retention policy. Nothing in here reads a clock, touches a database or is async.

pub mod attempt;
pub mod ids;
pub mod job;
pub mod outcome;
pub mod policy;
pub mod status;
pub mod worker_health;

pub use attempt::{judge_result, AttemptFacts, ResultRefusal, ResultTiming};
pub use ids::{ContentType, InvalidValue, JobId, LeaseId, WorkerId};
pub use job::{HandoffKind, HistoryEntry, Job, JobDetail, JobResult};
pub use policy::{
    AfterFailure, AttemptDeadlines, Expiry, LifecyclePolicy, RetentionPolicy, RetryPolicy,
    TimeoutPolicy,
};
pub use status::{Actor, JobStatus};
pub use worker_health::{judge_worker_health, WorkerContact, WorkerHealth, WorkerHealthPolicy};
