//! The wire protocol: every request and response body that crosses between the server and
//! its clients (ingestion, workers), defined once here and used by both sides. Field names
//! follow MoRAG's pydantic models (`models/remote_job_api.py`) exactly; fields this server
//! added are extra, and MoRAG's clients ignore them.
//!
//! The free-form values (`task_options`, `metadata`, result `content`) are parsed within
//! limits (`bounded_json`): the server installs its configured limits around each parse.

pub mod bounded_json;
mod timestamp;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use timestamp::Timestamp;

/// Headers sent with every request to the server, so that its worker registry can tell
/// worker processes apart (MoRAG's client sends none of them, and need not): the worker's
/// name (heartbeats and results carry none otherwise), an instance id new at each process
/// start (a restarted worker never hides what its previous life left behind), and the
/// version of this program.
pub const WORKER_ID_HEADER: &str = "x-morag-worker-id";
pub const WORKER_INSTANCE_HEADER: &str = "x-morag-worker-instance";
pub const WORKER_VERSION_HEADER: &str = "x-morag-worker-version";

/// A job's status as the protocol names it. A status this library does not know (from a
/// newer server) reads as `Unknown` rather than failing the whole answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Timeout,
    Cancelled,
    Retrying,
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Timeout => "timeout",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Retrying => "retrying",
            JobStatus::Unknown => "unknown",
        }
    }

    /// True for the states a job never leaves by itself: completed, cancelled, and failed
    /// or timed out for good. (A failed job with retries left is `retrying` on the wire.)
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Timeout | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /api/v1/remote-jobs`: a job for a file the server can read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateJobRequest {
    pub source_file_path: String,
    pub content_type: String,
    /// Absent means `{}`; an explicit `null` is rejected, as MoRAG's model does.
    #[serde(default, deserialize_with = "bounded_json::task_options")]
    pub task_options: Map<String, Value>,
    pub ingestion_task_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateJobResponse {
    pub job_id: String,
    pub status: JobStatus,
    pub created_at: Timestamp,
}

/// `GET /api/v1/remote-jobs/poll`: MoRAG's four fields, all null when no job is due, plus
/// the lease and deadlines.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct PollResponse {
    pub job_id: Option<String>,
    pub source_file_url: Option<String>,
    pub content_type: Option<String>,
    pub task_options: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_deadline: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_seconds: Option<u64>,
    /// How often the worker should heartbeat: a third of the heartbeat timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<u64>,
}

/// `POST /api/v1/remote-jobs/{id}/heartbeat`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub lease_id: String,
    /// Percent done, 0 to 100.
    #[serde(default)]
    pub progress: Option<f64>,
    /// At most 1000 characters.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub job_id: String,
    pub status: JobStatus,
    /// True when the job was cancelled: the worker should stop working on it.
    pub cancelled: bool,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_deadline: Option<Timestamp>,
}

/// `POST /api/v1/remote-jobs/{id}/release`: a worker handing its attempt back (for
/// instance because it is shutting down). Answered with a `JobStatusView`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub lease_id: String,
    /// Recorded in the job's history.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /api/v1/remote-jobs/{id}/result`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SubmitResultRequest {
    pub success: bool,
    #[serde(default, deserialize_with = "bounded_json::content")]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "bounded_json::metadata")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub processing_time: Option<f64>,
    /// The fencing token from the poll; MoRAG's client sends none.
    #[serde(default)]
    pub lease_id: Option<String>,
    /// `false` makes a failure final at once (retrying cannot help).
    #[serde(default)]
    pub retryable: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitResultResponse {
    pub status: JobStatus,
    /// True when the outcome was durably queued for the ingestion pipeline (a completion
    /// or a final failure); false while a retry is pending.
    pub ingestion_continued: bool,
}

/// `POST /api/v1/remote-jobs/{id}/cancel` (the body is optional).
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// MoRAG's `JobStatusResponse`: the answer of a status read, a cancel, a manual retry and
/// a release.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobStatusView {
    pub job_id: String,
    pub status: JobStatus,
    pub worker_id: Option<String>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub error_message: Option<String>,
    pub retry_count: u32,
    /// While processing: the attempt's execution deadline, the latest it can end.
    pub estimated_completion: Option<Timestamp>,
}

/// The `{"detail": ...}` body of every error answer (FastAPI's shape).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub detail: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_empty_poll_answer_is_four_nulls() {
        let empty = serde_json::to_value(PollResponse::default()).unwrap();
        assert_eq!(
            empty,
            json!({"job_id": null, "source_file_url": null, "content_type": null, "task_options": null})
        );
        let read: PollResponse = serde_json::from_value(empty).unwrap();
        assert!(read.job_id.is_none() && read.lease_id.is_none());
    }

    #[test]
    fn statuses_use_the_protocol_names_and_tolerate_new_ones() {
        assert_eq!(
            serde_json::to_value(JobStatus::Timeout).unwrap(),
            json!("timeout")
        );
        let read: JobStatus = serde_json::from_value(json!("retrying")).unwrap();
        assert_eq!(read, JobStatus::Retrying);
        let read: JobStatus = serde_json::from_value(json!("parked")).unwrap();
        assert_eq!(read, JobStatus::Unknown);
        for status in [
            JobStatus::Pending,
            JobStatus::Processing,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Timeout,
            JobStatus::Cancelled,
            JobStatus::Retrying,
        ] {
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
        }
    }

    #[test]
    fn a_result_request_reads_back_what_a_client_writes() {
        let mut metadata = Map::new();
        metadata.insert("pages".into(), json!(3));
        let request = SubmitResultRequest {
            success: true,
            content: Some("text".into()),
            metadata: Some(metadata),
            lease_id: Some("lease".into()),
            ..Default::default()
        };
        let text = serde_json::to_string(&request).unwrap();
        let read: SubmitResultRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(read.content.as_deref(), Some("text"));
        assert_eq!(read.metadata.unwrap()["pages"], json!(3));
        assert_eq!(read.lease_id.as_deref(), Some("lease"));
    }
}
