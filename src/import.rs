//! `morag-jobs import-morag-dir`: brings the jobs of MoRAG's file-based prototype into
//! the configured store.
//!
//! The prototype keeps one JSON file per job (`RemoteJob.to_dict()`) in a folder per
//! status: `remote_jobs/{pending,processing,completed,failed,timeout,cancelled}/<id>.json`.
//! Each file becomes one job, stored as it is (`Store::import_job`). Running the import
//! twice is harmless: a job whose id is already stored is skipped. A file that cannot be
//! read as a job is reported and the import goes on.
//!
//! This is a boundary like `api`, so it reads JSON itself; what a job may look like is
//! still decided by the domain types and the timeout policy.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::clock::Timestamp;
use crate::domain::{
    ContentType, Job, JobId, JobResult, JobStatus, LeaseId, TimeoutPolicy, WorkerId,
};
use crate::store::{ImportJobParams, ImportOutcome, Store, StoreError};

/// MoRAG's status folders, in the order they are read.
pub const STATUS_FOLDERS: [&str; 6] = [
    "pending",
    "processing",
    "completed",
    "failed",
    "timeout",
    "cancelled",
];

/// What one import run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportSummary {
    pub n_imported: usize,
    /// Jobs whose id was already stored (from an earlier run, or created here).
    pub n_skipped: usize,
    /// Files that are not a readable job, with the reason.
    pub malformed: Vec<(PathBuf, String)>,
}

/// `RemoteJob.to_dict()`. Times are naive UTC ISO 8601 (`datetime.utcnow().isoformat()`).
#[derive(Deserialize)]
struct MoragJob {
    id: String,
    ingestion_task_id: String,
    source_file_path: String,
    content_type: String,
    #[serde(default)]
    task_options: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    started_at: Option<String>,
    #[serde(default)]
    completed_at: Option<String>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    result_data: Option<MoragResult>,
    #[serde(default)]
    retry_count: Option<u32>,
}

#[derive(Deserialize)]
struct MoragResult {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    processing_time: Option<f64>,
}

fn time(field: &str, value: &Option<String>) -> Result<Option<Timestamp>, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => Timestamp::parse_rfc3339(text)
            .map(Some)
            .ok_or_else(|| format!("{field}: {text:?} is not an ISO 8601 UTC time")),
    }
}

/// Turns one file's text into a job to import. `folder` is the status folder it was in,
/// used when the file names no status.
pub fn parse_morag_job(
    text: &str,
    folder: &str,
    timeouts: &TimeoutPolicy,
    source: &str,
    now: Timestamp,
) -> Result<ImportJobParams, String> {
    let raw: MoragJob =
        serde_json::from_str(text).map_err(|error| format!("not a MoRAG job: {error}"))?;
    let id = JobId::parse(&raw.id).map_err(|error| error.to_string())?;
    let content_type = ContentType::parse(&raw.content_type).map_err(|error| error.to_string())?;
    let status_name = raw.status.as_deref().unwrap_or(folder);
    let status = JobStatus::parse(status_name)
        .ok_or_else(|| format!("status: {status_name:?} is not a job status"))?;
    let task_options = match raw.task_options {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(options @ serde_json::Value::Object(_)) => options,
        Some(_) => return Err("task_options: must be an object".into()),
    };
    let worker_id = match raw.worker_id.as_deref() {
        None | Some("") => None,
        Some(worker) => Some(WorkerId::parse(worker).map_err(|error| error.to_string())?),
    };
    let created_at = time("created_at", &raw.created_at)?.ok_or("created_at: missing")?;
    let started_at = time("started_at", &raw.started_at)?;
    let mut completed_at = time("completed_at", &raw.completed_at)?;
    let retry_count = raw.retry_count.unwrap_or(0);
    // Retention cleanup goes by completion time: a finished job needs one.
    if status.is_finished() && completed_at.is_none() {
        completed_at = Some(started_at.unwrap_or(created_at));
    }
    if !status.is_finished() {
        completed_at = None;
    }
    // MoRAG counts failures in retry_count; a claim started each attempt.
    let attempt = match (started_at, status) {
        (None, _) => 0,
        (Some(_), JobStatus::Failed) => retry_count.max(1),
        (Some(_), _) => retry_count + 1,
    };
    let result = match (status, raw.result_data) {
        (JobStatus::Completed, Some(result)) => Some(JobResult {
            content: result.content.unwrap_or_default(),
            metadata: serde_json::value::to_raw_value(
                &result.metadata.unwrap_or_else(|| serde_json::json!({})),
            )
            .map_err(|error| format!("result_data.metadata: {error}"))?,
            processing_time: result.processing_time,
        }),
        (JobStatus::Completed, None) => {
            return Err("result_data: a completed job needs its result".into())
        }
        _ => None,
    };
    // The monitor watches an imported job like one created here: a pending job against
    // the configured pending timeout, a running one against its execution timeout from
    // when it started.
    let (execution_deadline, deadline_at, lease_id) = match status {
        JobStatus::Processing => {
            let started = started_at.ok_or("started_at: a processing job needs its start time")?;
            let execution = timeouts.claim_deadlines(&content_type, started).execution;
            // MoRAG's worker sends no lease; a fresh one fences any later attempt.
            (
                Some(execution),
                Some(execution),
                Some(LeaseId::new_random()),
            )
        }
        JobStatus::Pending => (None, timeouts.pending_deadline(created_at), None),
        _ => (None, None, None),
    };
    let updated_at = [Some(created_at), started_at, completed_at]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(created_at);
    let job = Job {
        id,
        content_type,
        source_file_path: raw.source_file_path,
        task_options,
        ingestion_task_id: raw.ingestion_task_id,
        status,
        worker_id,
        lease_id,
        attempt,
        retry_count,
        created_at,
        started_at,
        completed_at,
        updated_at,
        available_at: created_at,
        execution_deadline,
        heartbeat_deadline: None,
        last_heartbeat_at: None,
        progress: None,
        progress_message: None,
        error_message: raw.error_message,
    };
    Ok(ImportJobParams {
        job,
        result,
        deadline_at,
        reason: format!("imported from MoRAG's {source}"),
        now,
    })
}

/// Imports every `*.json` file under `dir`'s status folders. Store errors stop the run
/// (the store is down; running again later is safe); unreadable files do not.
pub async fn import_morag_dir(
    store: &dyn Store,
    dir: &Path,
    timeouts: &TimeoutPolicy,
    now: Timestamp,
) -> Result<ImportSummary, ImportError> {
    if !dir.is_dir() {
        return Err(ImportError::NotADirectory(dir.to_owned()));
    }
    let mut summary = ImportSummary::default();
    for folder in STATUS_FOLDERS {
        let folder_path = dir.join(folder);
        let Ok(entries) = std::fs::read_dir(&folder_path) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        for path in files {
            let source = format!(
                "remote_jobs/{folder}/{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            let parsed = std::fs::read_to_string(&path)
                .map_err(|error| format!("cannot read: {error}"))
                .and_then(|text| parse_morag_job(&text, folder, timeouts, &source, now));
            let params = match parsed {
                Ok(params) => params,
                Err(reason) => {
                    summary.malformed.push((path, reason));
                    continue;
                }
            };
            match store.import_job(params).await? {
                ImportOutcome::Imported => summary.n_imported += 1,
                ImportOutcome::AlreadyExists => summary.n_skipped += 1,
            }
        }
    }
    Ok(summary)
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0:?} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, folder: &str) -> Result<ImportJobParams, String> {
        parse_morag_job(
            text,
            folder,
            &TimeoutPolicy::default(),
            "test",
            Timestamp::from_micros(0),
        )
    }

    #[test]
    fn a_processing_job_gets_a_lease_and_its_execution_deadline() {
        let params = parse(
            r#"{"id": "0b0e5f3c-6a3c-4d5e-9c61-1d8c6f0f8a11", "ingestion_task_id": "t", "source_file_path": "/x",
                "content_type": "audio", "task_options": {}, "status": "processing", "worker_id": "w",
                "created_at": "2026-11-29T16:00:00", "started_at": "2026-11-29T16:00:10.5", "retry_count": 0}"#,
            "processing",
        )
        .unwrap();
        let started = Timestamp::parse_rfc3339("2026-11-29T16:00:10.5Z").unwrap();
        assert_eq!(params.job.attempt, 1);
        assert!(params.job.lease_id.is_some());
        assert_eq!(
            params.deadline_at,
            Some(started.plus(std::time::Duration::from_secs(1800)))
        );
    }

    #[test]
    fn bad_files_say_why() {
        for (text, why) in [
            ("{", "not a MoRAG job"),
            (
                r#"{"id": "nope", "ingestion_task_id": "t", "source_file_path": "/x", "content_type": "audio"}"#,
                "job_id",
            ),
            (
                r#"{"id": "0b0e5f3c-6a3c-4d5e-9c61-1d8c6f0f8a11", "ingestion_task_id": "t", "source_file_path": "/x", "content_type": "audio", "status": "done", "created_at": "2026-11-29T16:00:00"}"#,
                "status",
            ),
            (
                r#"{"id": "0b0e5f3c-6a3c-4d5e-9c61-1d8c6f0f8a11", "ingestion_task_id": "t", "source_file_path": "/x", "content_type": "audio", "created_at": "yesterday"}"#,
                "created_at",
            ),
        ] {
            let error = parse(text, "pending").unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
