//! The worker side of MoRAG's protocol: poll (with optional long-poll), heartbeat,
//! download and result.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::{JobIdPath, JsonBody, QueryParams};
use super::queries::{PollArgs, PollQuery};
use super::views::*;
use super::workers::WorkerHeaders;
use crate::context::AppContext;
use crate::domain::{Job, JobStatus, LeaseId};
use crate::files;
use crate::registry::ResultSeen;
use crate::store::StoreError;
use crate::store::{
    AttemptOutcome, ClaimParams, HeartbeatParams, ReleaseParams, SubmitResultParams,
};
use crate::wakeups::Woken;

pub async fn poll(
    State(context): State<Arc<AppContext>>,
    worker_headers: WorkerHeaders,
    QueryParams(query): QueryParams<PollQuery>,
) -> Result<Json<PollResponse>, ApiError> {
    let PollArgs {
        worker_id,
        content_types,
        mut wait,
    } = query.parse()?;
    // Noted when the poll arrives (a long-polling worker is in contact while it waits),
    // and again when it takes a job.
    let caller = worker_headers.caller(Some(&worker_id));
    let requested_wait = wait;
    if let Some(caller) = &caller {
        context.worker_registry.polled(
            caller,
            &content_types,
            requested_wait,
            false,
            context.clock.now(),
        );
    }

    // Each waiting poll holds a connection and a queue entry: past the cap, a long poll is
    // answered like a short one (a job if one is due, else the empty answer), which every
    // client already handles by polling again later.
    let _long_poll_slot = if wait.is_zero() {
        None
    } else {
        match context.long_poll_slots.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => {
                wait = std::time::Duration::ZERO;
                None
            }
        }
    };
    let give_up_at = tokio::time::Instant::now() + wait;
    let mut shutting_down = context.shutting_down.clone();
    let waiter = context.wakeups.waiter(&content_types);
    let mut woken_for_a_job = false;
    loop {
        // Register for the wake-up before looking, so a job created between the look and
        // the wait is not missed.
        let mut registration = waiter.register();
        let claimed = context
            .store
            .claim_job(ClaimParams {
                worker_id: worker_id.clone(),
                content_types: content_types.clone(),
                timeouts: context.config.policy.timeouts.clone(),
                now: context.clock.now(),
            })
            .await?;
        if let Some(job) = claimed {
            if let Some(caller) = &caller {
                context.worker_registry.polled(
                    caller,
                    &content_types,
                    requested_wait,
                    true,
                    context.clock.now(),
                );
            }
            if woken_for_a_job {
                // The wake-up taken may have been for another job of these types.
                waiter.pass_on();
            }
            return Ok(Json(poll_response(&context, &job)));
        }
        if tokio::time::Instant::now() >= give_up_at || *shutting_down.borrow() {
            return Ok(Json(PollResponse::default()));
        }
        tokio::select! {
            woken = registration.woken() => woken_for_a_job = woken == Woken::Targeted,
            _ = tokio::time::sleep_until(give_up_at) => {}
            _ = shutting_down.changed() => {}
        }
    }
}

fn poll_response(context: &AppContext, job: &Job) -> PollResponse {
    let heartbeat = context.config.policy.timeouts.heartbeat.as_secs();
    PollResponse {
        job_id: Some(job.id.to_string()),
        source_file_url: Some(format!("/api/v1/remote-jobs/{}/download", job.id)),
        content_type: Some(job.content_type.to_string()),
        task_options: Some(job.task_options.clone()),
        lease_id: job.lease_id.map(|l| l.to_string()),
        attempt: Some(job.attempt),
        execution_deadline: job.execution_deadline,
        heartbeat_timeout_seconds: Some(heartbeat),
        heartbeat_interval_seconds: Some((heartbeat / 3).max(1)),
    }
}

pub async fn heartbeat(
    State(context): State<Arc<AppContext>>,
    worker_headers: WorkerHeaders,
    JobIdPath(job_id): JobIdPath,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let lease_id =
        LeaseId::parse(&request.lease_id).map_err(|error| ApiError::invalid("body", error))?;
    if let Some(progress) = request.progress {
        if !(0.0..=100.0).contains(&progress) {
            return Err(ApiError::validation(
                &["body", "progress"],
                "must be from 0 to 100",
            ));
        }
    }
    if request
        .message
        .as_ref()
        .is_some_and(|m| m.chars().count() > 1000)
    {
        return Err(ApiError::validation(
            &["body", "message"],
            "must be at most 1000 characters",
        ));
    }
    let outcome = context
        .store
        .heartbeat(HeartbeatParams {
            job_id,
            lease_id,
            progress: request.progress,
            message: request.message,
            timeouts: context.config.policy.timeouts.clone(),
            now: context.clock.now(),
        })
        .await;
    // Heartbeats carry no worker id: only a worker that names itself in the headers is
    // counted (MoRAG's client never heartbeats).
    if let Some(caller) = worker_headers.caller(None) {
        // Only a "cancelled" answer ends the job in flight. A refused heartbeat does not:
        // it may be one that crossed the worker's own result on the wire, and the result
        // already counted the job's end (an attempt that timed out stays counted, which
        // errs towards calling a busy worker healthy).
        let still_held = !matches!(&outcome, Ok(outcome) if outcome.cancelled);
        context
            .worker_registry
            .heartbeat(&caller, still_held, context.clock.now());
    }
    let outcome = outcome.map_err(|error| ApiError::from_store(job_id, "heartbeat", error))?;
    Ok(Json(HeartbeatResponse {
        job_id: job_id.to_string(),
        status: outcome.status.into(),
        cancelled: outcome.cancelled,
        execution_deadline: outcome.execution_deadline,
        heartbeat_deadline: outcome.heartbeat_deadline,
    }))
}

/// Hands the caller's attempt back: the job is pending again at once, with no retry spent,
/// and long-polling workers of its type are woken. A stale lease is a 409, as for heartbeats.
pub async fn release(
    State(context): State<Arc<AppContext>>,
    worker_headers: WorkerHeaders,
    JobIdPath(job_id): JobIdPath,
    JsonBody(request): JsonBody<ReleaseRequest>,
) -> Result<Json<JobStatusView>, ApiError> {
    let lease_id =
        LeaseId::parse(&request.lease_id).map_err(|error| ApiError::invalid("body", error))?;
    if request
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 1000)
    {
        return Err(ApiError::validation(
            &["body", "reason"],
            "must be at most 1000 characters",
        ));
    }
    let job = context
        .store
        .release_job(ReleaseParams {
            job_id,
            lease_id,
            reason: request.reason,
            now: context.clock.now(),
        })
        .await;
    if let Some(caller) = worker_headers.caller(None) {
        if job.as_ref().err().is_none_or(attempt_settled) {
            context
                .worker_registry
                .released(&caller, context.clock.now());
        }
    }
    let job = job.map_err(|error| ApiError::from_store(job_id, "release", error))?;
    context.wakeups.job_available(&job.content_type);
    Ok(Json(JobStatusView::from(&job)))
}

pub async fn submit_result(
    State(context): State<Arc<AppContext>>,
    worker_headers: WorkerHeaders,
    JobIdPath(job_id): JobIdPath,
    JsonBody(request): JsonBody<SubmitResultRequest>,
) -> Result<Json<SubmitResultResponse>, ApiError> {
    let lease_id = request
        .lease_id
        .as_deref()
        .map(LeaseId::parse)
        .transpose()
        .map_err(|error| ApiError::invalid("body", error))?;
    require_lease(&context, lease_id.is_some(), "body")?;
    if request
        .processing_time
        .is_some_and(|t| !t.is_finite() || t < 0.0)
    {
        return Err(ApiError::validation(
            &["body", "processing_time"],
            "must be a non-negative number of seconds",
        ));
    }
    let succeeded = request.success;
    let outcome = if request.success {
        AttemptOutcome::Success {
            content: request.content.unwrap_or_default(),
            metadata: serde_json::Value::Object(request.metadata.unwrap_or_default()),
            processing_time: request.processing_time,
        }
    } else {
        AttemptOutcome::Failure {
            error_message: request
                .error_message
                .filter(|m| !m.trim().is_empty())
                .unwrap_or_else(|| "the worker reported a failure without a message".into()),
            retryable: request.retryable.unwrap_or(true),
        }
    };
    let job = context
        .store
        .submit_result(SubmitResultParams {
            job_id,
            lease_id,
            outcome,
            policy: context.config.policy.clone(),
            jitter: fastrand::f64(),
            now: context.clock.now(),
        })
        .await;
    // MoRAG's client names itself only in its polls: an accepted result is counted for
    // the job's worker.
    let seen = match &job {
        Ok(_) if succeeded => Some(ResultSeen::Completed),
        Ok(_) => Some(ResultSeen::Failed),
        Err(error) => attempt_settled(error).then_some(ResultSeen::NotHeld),
    };
    let caller = worker_headers.caller(None).or_else(|| {
        worker_headers.caller(job.as_ref().ok().and_then(|job| job.worker_id.as_ref()))
    });
    if let (Some(caller), Some(seen)) = (caller, seen) {
        context
            .worker_registry
            .result(&caller, seen, context.clock.now());
    }
    let job = job.map_err(|error| ApiError::from_store(job_id, "accept a result", error))?;
    Ok(Json(SubmitResultResponse {
        status: job.status.into(),
        // The hand-off was committed with the result; it continues ingestion only if some
        // sink will deliver it.
        ingestion_continued: matches!(job.status, JobStatus::Completed | JobStatus::Failed)
            && (context.config.delivery.has_global_sink()
                || crate::store::deliveries::webhook_url_of(&job.task_options).is_some()),
    }))
}

/// Whether a refused heartbeat, result or release means the worker no longer holds the
/// job (as opposed to a store outage, after which it may try again).
fn attempt_settled(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::NotFound
            | StoreError::InvalidTransition { .. }
            | StoreError::LeaseMismatch { .. }
            | StoreError::DeadlinePassed
            | StoreError::ReleaseLimitReached { .. }
    )
}

/// With `MORAG_REMOTE_REQUIRE_LEASE`, results and downloads must name the attempt's lease
/// (a wrong one is a 409 from the store's check), so a worker key alone cannot complete or
/// read a job it was not given.
fn require_lease(context: &AppContext, presented: bool, place: &str) -> Result<(), ApiError> {
    if context.config.limits.require_lease && !presented {
        return Err(ApiError::validation(
            &[place, "lease_id"],
            "lease_id is required: this server refuses results and downloads without the job's current lease (MORAG_REMOTE_REQUIRE_LEASE)",
        ));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
pub struct DownloadQuery {
    pub lease_id: Option<String>,
}

pub async fn download(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
    QueryParams(query): QueryParams<DownloadQuery>,
) -> Result<Response, ApiError> {
    let job = context
        .store
        .get_job(job_id)
        .await?
        .ok_or(ApiError::JobNotFound(job_id))?;
    if job.status != JobStatus::Processing {
        return Err(ApiError::Forbidden(format!(
            "Job {job_id} is {}: its file is only served while processing",
            job.status
        )));
    }
    require_lease(&context, query.lease_id.is_some(), "query")?;
    if let Some(lease) = query.lease_id.as_deref() {
        let lease = LeaseId::parse(lease).map_err(|error| ApiError::invalid("query", error))?;
        if job.lease_id != Some(lease) {
            return Err(ApiError::from_store(
                job_id,
                "download",
                crate::store::StoreError::LeaseMismatch {
                    current: job.status,
                },
            ));
        }
    }
    // Open beneath the root, not by name: a directory on the path may have been swapped
    // for a symlink, or the file for a FIFO, since the job was created.
    let path = std::path::PathBuf::from(&job.source_file_path);
    let opened = {
        let path = path.clone();
        let roots = context.config.allowed_roots.clone();
        let hard_links = context.config.hard_links;
        tokio::task::spawn_blocking(move || files::open_within_roots(&path, &roots, hard_links))
            .await
            .map_err(|error| ApiError::Internal(format!("source open task failed: {error}")))?
    };
    let opened = opened.map_err(|rejection| {
        ApiError::NotFound(match rejection {
            files::PathRejection::NotAFile => {
                format!("Source file for job {job_id} is not a regular file")
            }
            files::PathRejection::HardLinked => format!(
                "Source file for job {job_id} has more than one hard link, which this server refuses"
            ),
            _ => format!("Source file for job {job_id} not found"),
        })
    })?;
    let length = opened.len;
    let file = tokio::fs::File::from_std(opened.file);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", files::download_name(&path)),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length.into());
    Ok(response)
}
