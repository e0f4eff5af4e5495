//! The JSON shapes of requests and responses. The bodies that cross between the server and
//! its clients (create, poll, heartbeat, release, result, cancel, the status answer) are
//! defined once in the client crate (`morag_jobs_client::wire`) and re-exported here; this
//! module adds the operator-only views (listings, detail, statistics, cleanup) and the
//! conversions from the domain. Field names follow MoRAG's pydantic models
//! (`models/remote_job_api.py`) exactly; fields added by this server are extra and ignored
//! by MoRAG's clients.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

pub use morag_jobs_client::wire::{
    CancelRequest, CreateJobRequest, CreateJobResponse, HeartbeatRequest, HeartbeatResponse,
    JobStatus as WireJobStatus, JobStatusView, PollResponse, ReleaseRequest, SubmitResultRequest,
    SubmitResultResponse,
};

use crate::clock::Timestamp;
use crate::domain::{HistoryEntry, Job, JobDetail, JobStatus};
use crate::store::Statistics;

/// Maps the domain's status onto the protocol's name for it. The two enums are kept apart
/// so that the wire crate knows nothing of the state machine.
impl From<JobStatus> for WireJobStatus {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Pending => WireJobStatus::Pending,
            JobStatus::Processing => WireJobStatus::Processing,
            JobStatus::Completed => WireJobStatus::Completed,
            JobStatus::Failed => WireJobStatus::Failed,
            JobStatus::Timeout => WireJobStatus::Timeout,
            JobStatus::Cancelled => WireJobStatus::Cancelled,
            JobStatus::Retrying => WireJobStatus::Retrying,
        }
    }
}

impl From<&Job> for JobStatusView {
    fn from(job: &Job) -> Self {
        JobStatusView {
            job_id: job.id.to_string(),
            status: job.status.into(),
            worker_id: job.worker_id.as_ref().map(|w| w.to_string()),
            created_at: job.created_at,
            started_at: job.started_at,
            completed_at: job.completed_at,
            error_message: job.error_message.clone(),
            retry_count: job.retry_count,
            estimated_completion: (job.status == JobStatus::Processing)
                .then_some(job.execution_deadline)
                .flatten(),
        }
    }
}

/// A job in listings: the status view plus what an operator filters on.
#[derive(Serialize)]
pub struct JobSummaryView {
    #[serde(flatten)]
    pub status: JobStatusView,
    pub content_type: String,
    pub ingestion_task_id: String,
    pub attempt: u32,
}

impl From<&Job> for JobSummaryView {
    fn from(job: &Job) -> Self {
        JobSummaryView {
            status: job.into(),
            content_type: job.content_type.to_string(),
            ingestion_task_id: job.ingestion_task_id.clone(),
            attempt: job.attempt,
        }
    }
}

#[derive(Serialize)]
pub struct JobListView {
    pub jobs: Vec<JobSummaryView>,
    pub next_cursor: Option<String>,
}

/// Borrows the stored result: the content is written into the response as it is, and the
/// metadata as the JSON text it was stored as, never parsed into a tree.
#[derive(Serialize)]
pub struct ResultView<'a> {
    pub content: &'a str,
    pub metadata: &'a RawValue,
    pub processing_time: Option<f64>,
}

#[derive(Serialize)]
pub struct HistoryView {
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub at: Timestamp,
    pub actor: &'static str,
    pub reason: String,
}

impl From<&HistoryEntry> for HistoryView {
    fn from(entry: &HistoryEntry) -> Self {
        HistoryView {
            from: entry.from.map(|s| s.as_str()),
            to: entry.to.as_str(),
            at: entry.at,
            actor: entry.actor.as_str(),
            reason: entry.reason.clone(),
        }
    }
}

/// Everything about one job, for operators.
#[derive(Serialize)]
pub struct JobDetailView<'a> {
    #[serde(flatten)]
    pub summary: JobSummaryView,
    pub source_file_path: String,
    pub task_options: Value,
    pub available_at: Timestamp,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_deadline: Option<Timestamp>,
    pub last_heartbeat_at: Option<Timestamp>,
    pub progress: Option<f64>,
    pub progress_message: Option<String>,
    pub updated_at: Timestamp,
    pub result: Option<ResultView<'a>>,
    pub history: Vec<HistoryView>,
    /// The job's outcomes on their way to the ingestion sinks (newest first).
    pub deliveries: Vec<super::deliveries::DeliveryView>,
}

impl<'a> From<&'a JobDetail> for JobDetailView<'a> {
    fn from(detail: &'a JobDetail) -> Self {
        let job = &detail.job;
        JobDetailView {
            summary: job.into(),
            source_file_path: job.source_file_path.clone(),
            task_options: job.task_options.clone(),
            available_at: job.available_at,
            execution_deadline: job.execution_deadline,
            heartbeat_deadline: job.heartbeat_deadline,
            last_heartbeat_at: job.last_heartbeat_at,
            progress: job.progress,
            progress_message: job.progress_message.clone(),
            updated_at: job.updated_at,
            result: detail.result.as_ref().map(|r| ResultView {
                content: &r.content,
                metadata: &r.metadata,
                processing_time: r.processing_time,
            }),
            history: detail.history.iter().map(HistoryView::from).collect(),
            deliveries: Vec::new(),
        }
    }
}

#[derive(Serialize)]
pub struct CleanupResponse {
    pub cleaned_jobs: usize,
    pub days_old: u32,
}

/// The answer of a cleanup with `dry_run=true`.
#[derive(Serialize)]
pub struct CleanupDryRunResponse {
    pub dry_run: bool,
    pub would_clean_jobs: u64,
    pub days_old: u32,
}

/// The prototype's statistics fields.
#[derive(Serialize)]
pub struct StatisticsView {
    pub status_counts: BTreeMap<&'static str, u64>,
    pub content_type_counts: BTreeMap<String, u64>,
    pub total_jobs: u64,
    pub storage_size_mb: f64,
    pub avg_processing_times: BTreeMap<String, f64>,
    pub recent_jobs_24h: u64,
    pub timestamp: Timestamp,
    /// Pending and dead deliveries per sink, and the oldest pending one's age.
    pub deliveries: super::deliveries::DeliveryStatisticsView,
    /// Healthy and stale workers, and the healthy ones per content type.
    pub workers: super::workers::WorkerStatisticsView,
    /// The monitor's last retention cleanup; `null` before the first one.
    pub cleanup: Option<CleanupPassView>,
}

/// The monitor's last retention cleanup pass.
#[derive(Serialize)]
pub struct CleanupPassView {
    pub finished_at: Timestamp,
    pub jobs_deleted: usize,
    pub seconds: f64,
    /// The share of the pass's time its batches kept the store busy.
    pub store_busy_share: f64,
    /// The share the pass allowed them, averaged over its batches: what spreading its
    /// work over most of the cleanup interval needed, from 0.01 up to 0.3 (its work did
    /// not fit in less).
    pub store_share_allowed: f64,
    /// False when the pass ran out of time before it deleted the finished jobs that were
    /// past retention at its start: cleanup cannot keep up with job creation, and
    /// storage grows.
    pub keeping_up: bool,
    /// Passes in a row that could not finish.
    pub passes_behind: u32,
    /// Free space returned to the file system after the pass (SQLite).
    pub released_mb: f64,
}

impl CleanupPassView {
    pub fn new(pass: &crate::monitor::CleanupPass) -> Self {
        let summary = &pass.summary;
        let elapsed = summary.elapsed.as_secs_f64();
        let round = |value: f64, places: i32| {
            let scale = 10f64.powi(places);
            (value * scale).round() / scale
        };
        CleanupPassView {
            finished_at: pass.finished_at,
            jobs_deleted: summary.n_jobs_deleted,
            seconds: round(elapsed, 3),
            store_busy_share: if elapsed > 0.0 {
                round(summary.busy.as_secs_f64() / elapsed, 3)
            } else {
                0.0
            },
            store_share_allowed: round(summary.store_share_allowed, 3),
            keeping_up: summary.caught_up,
            passes_behind: pass.passes_behind,
            released_mb: round(summary.released_bytes as f64 / (1024.0 * 1024.0), 2),
        }
    }
}

impl StatisticsView {
    pub fn new(stats: Statistics, now: Timestamp) -> Self {
        StatisticsView {
            status_counts: stats
                .status_counts
                .iter()
                .map(|(s, n)| (s.as_str(), *n))
                .collect(),
            content_type_counts: stats.content_type_counts,
            total_jobs: stats.total_jobs,
            storage_size_mb: (stats.storage_bytes as f64 / (1024.0 * 1024.0) * 100.0).round()
                / 100.0,
            avg_processing_times: stats.avg_processing_secs,
            recent_jobs_24h: stats.created_last_24h,
            timestamp: now,
            deliveries: Default::default(),
            workers: Default::default(),
            cleanup: None,
        }
    }
}
