//! What a finished job hands to the ingestion side: one `OutboundEvent` per outcome, and
//! the sinks it can go to. Plain data; `delivery` sends it, `store` builds it.

use crate::clock::Timestamp;
use crate::domain::JobId;

/// Which sink a delivery goes to. Stored by name in the deliveries table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkKind {
    /// The job's own `task_options.webhook_url`, in MoRAG's notification shape.
    Webhook,
    /// `MORAG_INGESTION_CALLBACK_URL`, with the full processing result or failure info.
    IngestionCallback,
    /// A Celery task message on `MORAG_CELERY_BROKER_URL`.
    Celery,
}

impl SinkKind {
    pub const ALL: [SinkKind; 3] = [
        SinkKind::Webhook,
        SinkKind::IngestionCallback,
        SinkKind::Celery,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::IngestionCallback => "ingestion_callback",
            SinkKind::Celery => "celery",
        }
    }

    pub fn parse(text: &str) -> Option<SinkKind> {
        SinkKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

impl std::fmt::Display for SinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to the job, as the ingestion side needs to tell the cases apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The result is ready: ingestion continues with it.
    Completed,
    /// The job failed for good.
    Failed,
    /// The job timed out for good, including a job no worker claimed in time: ingestion
    /// may fall back to local processing.
    TimedOut,
    /// An admin cancelled the job before it had an outcome.
    Cancelled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Completed => "job.completed",
            EventKind::Failed => "job.failed",
            EventKind::TimedOut => "job.timed_out",
            EventKind::Cancelled => "job.cancelled",
        }
    }

    /// The `reason` in `failure_info`; `None` for a completion.
    pub fn failure_reason(self) -> Option<&'static str> {
        match self {
            EventKind::Completed => None,
            EventKind::Failed => Some("failed"),
            EventKind::TimedOut => Some("timed_out"),
            EventKind::Cancelled => Some("cancelled"),
        }
    }
}

/// One job outcome on its way to a sink. Built from the stored hand-off (a snapshot taken
/// in the transition's transaction) and the job's stored result.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundEvent {
    /// Stable across attempts, replicas and restarts: `evt_` and a UUID, stored once when
    /// the hand-off is fanned out. Receivers deduplicate by it (the `webhook-id` header,
    /// the Celery task id).
    pub event_id: String,
    pub kind: EventKind,
    pub job_id: JobId,
    /// The MoRAG ingestion task waiting for this outcome.
    pub ingestion_task_id: String,
    /// For `Completed`, MoRAG's `processing_result`:
    /// `{success: true, content, metadata, processing_time}`. Otherwise `failure_info`:
    /// `{error_message, retry_count, job_id, reason}` with `reason` from
    /// `EventKind::failure_reason`.
    pub payload: serde_json::Value,
    /// The job's `task_options` as the ingestion side sent them.
    pub task_options: serde_json::Value,
    /// When the job reached this outcome (the hand-off's time).
    pub completed_at: Timestamp,
}

impl OutboundEvent {
    pub fn is_success(&self) -> bool {
        self.kind == EventKind::Completed
    }
}
