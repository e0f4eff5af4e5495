//! The ingestion side and operators: create, status, detail, list, cancel, retry,
//! statistics and cleanup.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::extract::{JobIdPath, JsonBody, OptionalJsonBody, QueryParams};
use super::queries::{CleanupArgs, CleanupQuery, ListQuery};
use super::views::*;
use crate::context::AppContext;
use crate::domain::{ContentType, JobId, JobStatus, RetentionPolicy};
use crate::files;
use crate::monitor::Cleaner;
use crate::store::{
    CancelParams, CountCleanableParams, CreateJobParams, CreateOnceOutcome, CreateOnceParams,
    IdempotencyKeyParams, ManualRetryParams,
};

const MAX_INGESTION_TASK_ID_LEN: usize = 256;

pub async fn create_job(
    State(context): State<Arc<AppContext>>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateJobRequest>,
) -> Result<Response, ApiError> {
    let idempotency_key = idempotency_key(&headers)?;
    let content_type = ContentType::parse(&request.content_type)
        .map_err(|error| ApiError::invalid("body", error))?;
    let ingestion_task_id = request.ingestion_task_id.trim();
    if ingestion_task_id.is_empty() || ingestion_task_id.len() > MAX_INGESTION_TASK_ID_LEN {
        return Err(ApiError::validation(
            &["body", "ingestion_task_id"],
            format!("must be 1 to {MAX_INGESTION_TASK_ID_LEN} bytes"),
        ));
    }
    let source = {
        let raw = request.source_file_path.clone();
        let roots = context.config.allowed_roots.clone();
        let hard_links = context.config.hard_links;
        // Resolving and opening are blocking system calls: keep them off the async workers.
        tokio::task::spawn_blocking(move || files::resolve_within_roots(&raw, &roots, hard_links))
            .await
            .map_err(|error| ApiError::Internal(format!("source check task failed: {error}")))?
            .map_err(|rejection| {
                let mut message = rejection.to_string();
                // An admin can fix this only knowing where files may be: say so.
                if rejection == files::PathRejection::OutsideRoots {
                    let roots: Vec<String> = context
                        .config
                        .allowed_roots
                        .iter()
                        .map(|root| root.display().to_string())
                        .collect();
                    message = format!(
                        "{message} ({}); the server's MORAG_REMOTE_ALLOWED_ROOTS sets them",
                        roots.join(":")
                    );
                }
                ApiError::validation(&["body", "source_file_path"], message)
            })?
    };
    // Task options come from the ingestion side: a webhook may only go where the
    // configuration allows (checked again at delivery, in case the configuration changed).
    match request.task_options.get("webhook_url") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(url)) if url.trim().is_empty() => {}
        Some(serde_json::Value::String(url)) => {
            context
                .config
                .delivery
                .check_webhook_url(url)
                .map_err(|why| {
                    ApiError::validation(&["body", "task_options", "webhook_url"], why)
                })?;
        }
        Some(_) => {
            return Err(ApiError::validation(
                &["body", "task_options", "webhook_url"],
                "must be an http(s) URL",
            ))
        }
    }
    let now = context.clock.now();
    let idempotency_key = idempotency_key.map(|key| IdempotencyKeyParams {
        key,
        request_digest: request_digest(&request),
        expires_at: now.plus(IDEMPOTENCY_KEY_LIFETIME),
    });
    let create = CreateJobParams {
        id: JobId::new_random(),
        content_type,
        source_file_path: source.to_string_lossy().into_owned(),
        task_options: serde_json::Value::Object(request.task_options),
        ingestion_task_id: ingestion_task_id.to_owned(),
        pending_deadline: context.config.policy.timeouts.pending_deadline(now),
        now,
    };
    let answer = |job_id: JobId, status: JobStatus, created_at| CreateJobResponse {
        job_id: job_id.to_string(),
        status: status.into(),
        created_at,
    };
    // A repeat is answered like the original create, and says so in a header.
    let repeated = |response: CreateJobResponse| {
        ([(IDEMPOTENT_REPLAYED, "true")], Json(response)).into_response()
    };
    if idempotency_key.is_none() && !context.config.create_match_unfinished {
        let job = context.store.create_job(create).await?;
        context.wakeups.job_available(&job.content_type);
        return Ok(Json(answer(job.id, job.status, job.created_at)).into_response());
    }
    let outcome = context
        .store
        .create_job_once(CreateOnceParams {
            create,
            idempotency_key,
            match_unfinished_job: context.config.create_match_unfinished,
        })
        .await?;
    match outcome {
        CreateOnceOutcome::Created(job) => {
            context.wakeups.job_available(&job.content_type);
            Ok(Json(answer(job.id, job.status, job.created_at)).into_response())
        }
        // Every create answers `pending`: the original answer is replayed as it was.
        CreateOnceOutcome::KeyReplayed { job_id, created_at } => {
            Ok(repeated(answer(job_id, JobStatus::Pending, created_at)))
        }
        CreateOnceOutcome::MatchedUnfinished(job) => {
            Ok(repeated(answer(job.id, job.status, job.created_at)))
        }
        CreateOnceOutcome::KeyReusedForOtherRequest => Err(ApiError::validation(
            &["header", IDEMPOTENCY_KEY],
            "this Idempotency-Key was used with a different request in the last 24 hours",
        )),
    }
}

const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
const IDEMPOTENCY_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters, if present.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |message: &str| ApiError::validation(&["header", IDEMPOTENCY_KEY], message);
    if values.next().is_some() {
        return Err(invalid("send one Idempotency-Key, not several"));
    }
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| {
            !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        })
        .ok_or_else(|| invalid("must be 1 to 255 visible ASCII characters"))?;
    Ok(Some(key.to_owned()))
}

/// SHA-256 (hex) of the request as parsed, so whitespace does not make a repeat differ.
fn request_digest(request: &CreateJobRequest) -> String {
    use sha2::Digest;
    let canonical = json!({
        "source_file_path": request.source_file_path,
        "content_type": request.content_type,
        "task_options": request.task_options,
        "ingestion_task_id": request.ingestion_task_id,
    });
    let digest = sha2::Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub async fn job_status(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
) -> Result<Json<JobStatusView>, ApiError> {
    let job = context
        .store
        .get_job(job_id)
        .await?
        .ok_or(ApiError::JobNotFound(job_id))?;
    Ok(Json(JobStatusView::from(&job)))
}

pub async fn job_detail(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
) -> Result<Response, ApiError> {
    let detail = context
        .store
        .get_job_detail(job_id)
        .await?
        .ok_or(ApiError::JobNotFound(job_id))?;
    let deliveries = context
        .store
        .list_deliveries(crate::store::deliveries::DeliveryListParams {
            job_id: Some(job_id),
            limit: 100,
            ..Default::default()
        })
        .await?;
    let mut view = JobDetailView::from(&detail);
    view.deliveries = deliveries
        .deliveries
        .iter()
        .map(super::deliveries::DeliveryView::from)
        .collect();
    // Serialized here, while the view borrows the stored result (no copy of it).
    Ok(Json(view).into_response())
}

pub async fn list_jobs(
    State(context): State<Arc<AppContext>>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<JobListView>, ApiError> {
    let page = context.store.list_jobs(query.parse()?).await?;
    Ok(Json(JobListView {
        jobs: page.jobs.iter().map(JobSummaryView::from).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

pub async fn cancel_job(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
    // The body is optional: `{"reason": "..."}`.
    OptionalJsonBody(request): OptionalJsonBody<CancelRequest>,
) -> Result<Json<JobStatusView>, ApiError> {
    let reason = request
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "cancelled by an admin".into());
    let job = context
        .store
        .cancel_job(CancelParams {
            job_id,
            reason,
            now: context.clock.now(),
        })
        .await
        .map_err(|error| ApiError::from_store(job_id, "cancel", error))?;
    Ok(Json(JobStatusView::from(&job)))
}

pub async fn retry_job(
    State(context): State<Arc<AppContext>>,
    JobIdPath(job_id): JobIdPath,
) -> Result<Json<JobStatusView>, ApiError> {
    let job = context
        .store
        .retry_job(ManualRetryParams {
            job_id,
            now: context.clock.now(),
        })
        .await
        .map_err(|error| {
            ApiError::from_store(
                job_id,
                "retry (only failed or timed-out jobs can be retried)",
                error,
            )
        })?;
    context.wakeups.job_available(&job.content_type);
    Ok(Json(JobStatusView::from(&job)))
}

pub async fn statistics(
    State(context): State<Arc<AppContext>>,
) -> Result<Json<StatisticsView>, ApiError> {
    let now = context.clock.now();
    let stats = context.store.statistics(now).await?;
    let deliveries = context.store.delivery_statistics().await?;
    let mut view = StatisticsView::new(stats, now);
    view.deliveries = super::deliveries::DeliveryStatisticsView::new(deliveries, now);
    view.workers = super::workers::statistics(&context).await?;
    view.cleanup = context
        .cleanup_progress
        .last_pass()
        .as_ref()
        .map(super::views::CleanupPassView::new);
    Ok(Json(view))
}

pub async fn cleanup(
    State(context): State<Arc<AppContext>>,
    QueryParams(query): QueryParams<CleanupQuery>,
) -> Result<Response, ApiError> {
    let CleanupArgs { days_old, dry_run } = query.parse()?;
    let retention = RetentionPolicy::uniform(days_old);
    if dry_run {
        let would_clean_jobs = context
            .store
            .count_cleanable(CountCleanableParams {
                retention,
                now: context.clock.now(),
            })
            .await?;
        return Ok(Json(CleanupDryRunResponse {
            dry_run: true,
            would_clean_jobs,
            days_old,
        })
        .into_response());
    }
    let cleaner = Cleaner::new(
        context.store.clone(),
        context.clock.clone(),
        context.config.files_dir.clone(),
    )
    .fanning_out_first(context.dispatcher.clone());
    let summary = cleaner.cleanup(retention).await?;
    Ok(Json(CleanupResponse {
        cleaned_jobs: summary.n_jobs_deleted,
        days_old,
    })
    .into_response())
}

pub async fn health(State(context): State<Arc<AppContext>>) -> Response {
    let now = context.clock.now();
    let store = match context.store.ping().await {
        Ok(()) => match write_probe(&context).await {
            Ok(()) => "ok",
            Err(error) => {
                tracing::warn!(%error, "health check: the store cannot write");
                "not writable"
            }
        },
        Err(error) => {
            tracing::warn!(%error, "health check: store unavailable");
            "unavailable"
        }
    };
    if store == "ok" {
        Json(json!({"status": "healthy", "store": store, "timestamp": now})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unhealthy", "store": store, "timestamp": now})),
        )
            .into_response()
    }
}

/// How long a write probe's outcome answers `/health`: health checks every second from
/// several places must not become a stream of writes.
const WRITE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes one row through the store, at most every `WRITE_PROBE_INTERVAL`; in between
/// answers the last outcome. A store that could not write is probed again after the
/// interval, so health recovers by itself.
async fn write_probe(context: &AppContext) -> Result<(), String> {
    let lock = || {
        context
            .write_probe
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    if let Some((at, outcome)) = lock().as_ref() {
        if at.elapsed() < WRITE_PROBE_INTERVAL {
            return outcome.clone();
        }
    }
    let outcome = context
        .store
        .probe_write(context.clock.now())
        .await
        .map_err(|error| error.to_string());
    *lock() = Some((tokio::time::Instant::now(), outcome.clone()));
    outcome
}
