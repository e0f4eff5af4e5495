//! The worker side of MoRAG's protocol: poll (with optional long-poll), heartbeat,
//! download and result.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::{JobIdPath, JsonBody, QueryParams};
use super::views::*;
use crate::app::AppContext;
use crate::domain::{ContentType, Job, JobStatus, LeaseId, WorkerId};
use crate::files;
use crate::store::{AttemptOutcome, ClaimParams, HeartbeatParams, SubmitResultParams};
use crate::wakeups::Woken;

/// The longest a poll may wait for a job.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// The protocol answers one job per poll; larger `max_jobs` values are accepted for
/// compatibility but still claim one job (the prototype claimed several and lost all but one).
const MAX_JOBS_LIMIT: u32 = 100;
/// Each requested type costs one index probe per claim attempt; a worker converts a
/// handful of types, so a long list is a mistake (or an attack), not a need.
const MAX_CONTENT_TYPES_PER_POLL: usize = 32;

pub async fn poll(
    State(context): State<Arc<AppContext>>,
    QueryParams(query): QueryParams<PollQuery>,
) -> Result<Json<PollResponse>, ApiError> {
    let worker_id = WorkerId::parse(query.worker_id.as_deref().unwrap_or(""))
        .map_err(|error| ApiError::invalid("query", error))?;
    let mut content_types: Vec<ContentType> = Vec::new();
    for part in query
        .content_types
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let content_type =
            ContentType::parse(part).map_err(|error| ApiError::invalid("query", error))?;
        if !content_types.contains(&content_type) {
            content_types.push(content_type);
        }
        if content_types.len() > MAX_CONTENT_TYPES_PER_POLL {
            return Err(ApiError::validation(
                &["query", "content_types"],
                format!("at most {MAX_CONTENT_TYPES_PER_POLL} content types per poll"),
            ));
        }
    }
    if let Some(max_jobs) = query.max_jobs.as_deref() {
        match max_jobs.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_JOBS_LIMIT).contains(&n) => {}
            _ => {
                return Err(ApiError::validation(
                    &["query", "max_jobs"],
                    format!("must be an integer from 1 to {MAX_JOBS_LIMIT}"),
                ))
            }
        }
    }
    let wait = match query.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => match text.trim().parse::<f64>() {
            Ok(secs) if (0.0..=MAX_POLL_WAIT.as_secs_f64()).contains(&secs) => {
                Duration::from_secs_f64(secs)
            }
            _ => {
                return Err(ApiError::validation(
                    &["query", "wait"],
                    "must be a number of seconds from 0 to 30",
                ))
            }
        },
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
        .await
        .map_err(|error| ApiError::from_store(job_id, "heartbeat", error))?;
    Ok(Json(HeartbeatResponse {
        job_id: job_id.to_string(),
        status: outcome.status.as_str(),
        cancelled: outcome.cancelled,
        execution_deadline: outcome.execution_deadline,
        heartbeat_deadline: outcome.heartbeat_deadline,
    }))
}

pub async fn submit_result(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
    JsonBody(request): JsonBody<SubmitResultRequest>,
) -> Result<Json<SubmitResultResponse>, ApiError> {
    let lease_id = request
        .lease_id
        .as_deref()
        .map(LeaseId::parse)
        .transpose()
        .map_err(|error| ApiError::invalid("body", error))?;
    if request
        .processing_time
        .is_some_and(|t| !t.is_finite() || t < 0.0)
    {
        return Err(ApiError::validation(
            &["body", "processing_time"],
            "must be a non-negative number of seconds",
        ));
    }
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
        .await
        .map_err(|error| ApiError::from_store(job_id, "accept a result", error))?;
    Ok(Json(SubmitResultResponse {
        status: job.status.as_str(),
        // The hand-off was committed with the result; it continues ingestion only if some
        // sink will deliver it.
        ingestion_continued: matches!(job.status, JobStatus::Completed | JobStatus::Failed)
            && (context.config.delivery.has_global_sink()
                || crate::store::deliveries::webhook_url_of(&job.task_options).is_some()),
    }))
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
    // Resolve again: the file may have been replaced by a link since the job was created.
    let path = files::resolve_within_roots(&job.source_file_path, &context.config.allowed_roots)
        .map_err(|_| ApiError::NotFound(format!("Source file for job {job_id} not found")))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::NotFound(format!("Source file for job {job_id} not found")))?;
    let length = file.metadata().await.ok().map(|m| m.len());
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
    if let Some(length) = length {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}
