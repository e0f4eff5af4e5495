//! A job as the store returns it, and its history.

use super::ids::{ContentType, JobId, LeaseId, WorkerId};
use super::status::{Actor, JobStatus};
use crate::clock::Timestamp;

/// Everything known about one job but its result, which can be hundreds of megabytes:
/// only the detail read (`JobDetail`) loads it, so listings, status reads and the
/// answers of transitions never hold results in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub content_type: ContentType,
    /// The canonical path of the file the worker converts; always inside an allowed root.
    pub source_file_path: String,
    /// Opaque options passed through to the worker (a JSON object).
    pub task_options: serde_json::Value,
    /// The MoRAG ingestion task waiting for this job's result.
    pub ingestion_task_id: String,
    pub status: JobStatus,
    /// The worker of the current (or last) attempt.
    pub worker_id: Option<WorkerId>,
    /// The fencing token of the current (or last) attempt.
    pub lease_id: Option<LeaseId>,
    /// How many times the job was claimed.
    pub attempt: u32,
    /// Automatic retries used since creation or the last manual retry.
    pub retry_count: u32,
    pub created_at: Timestamp,
    /// When the current (or last) attempt started.
    pub started_at: Option<Timestamp>,
    /// When the job reached a finished state.
    pub completed_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    /// When a pending or retrying job may be claimed.
    pub available_at: Timestamp,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_deadline: Option<Timestamp>,
    pub last_heartbeat_at: Option<Timestamp>,
    /// Progress the worker reported, 0 to 100.
    pub progress: Option<f64>,
    pub progress_message: Option<String>,
    pub error_message: Option<String>,
}

/// What a worker delivered for a successful attempt.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub content: String,
    /// The metadata object as JSON text, as stored: readers pass it through without
    /// parsing it into a tree, which for many small keys costs many times its size.
    pub metadata: Box<serde_json::value::RawValue>,
    /// Seconds, as measured by the worker.
    pub processing_time: Option<f64>,
}

impl PartialEq for JobResult {
    fn eq(&self, other: &JobResult) -> bool {
        self.content == other.content
            && self.metadata.get() == other.metadata.get()
            && self.processing_time == other.processing_time
    }
}

/// One transition in a job's life.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    /// `None` for the creation entry.
    pub from: Option<JobStatus>,
    pub to: JobStatus,
    pub at: Timestamp,
    pub actor: Actor,
    pub reason: String,
}

/// A job with its result and full history, for the detail endpoint: the one read that
/// loads a result.
#[derive(Clone, Debug, PartialEq)]
pub struct JobDetail {
    pub job: Job,
    pub result: Option<JobResult>,
    pub history: Vec<HistoryEntry>,
}

/// The kind of hand-off to the ingestion pipeline a finished job needs. Recorded in the
/// same write as the transition that causes it, so it can never be lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    /// The result is ready: ingestion continues with it.
    Completed,
    /// The job failed or timed out for good: ingestion fails or falls back to local processing.
    Failed,
    /// An admin cancelled the job.
    Cancelled,
}

impl HandoffKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffKind::Completed => "job.completed",
            HandoffKind::Failed => "job.failed",
            HandoffKind::Cancelled => "job.cancelled",
        }
    }

    pub fn for_final_status(status: JobStatus) -> Option<HandoffKind> {
        match status {
            JobStatus::Completed => Some(HandoffKind::Completed),
            JobStatus::Failed | JobStatus::Timeout => Some(HandoffKind::Failed),
            JobStatus::Cancelled => Some(HandoffKind::Cancelled),
            _ => None,
        }
    }
}
