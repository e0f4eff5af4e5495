//! The one error type of the HTTP layer. Every failure becomes a JSON body in FastAPI's
//! shape (`{"detail": ...}`), so MoRAG's clients read our errors like the prototype's.
//! Internal causes are logged, never sent to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::domain::{InvalidValue, JobId, JobStatus};
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// 422 in FastAPI's validation format; `location` is like `["body", "content_type"]`.
    Validation {
        location: Vec<String>,
        message: String,
    },
    Unauthorized,
    Forbidden(String),
    JobNotFound(JobId),
    NotFound(String),
    /// The job is not in a state that allows the request.
    Conflict {
        message: String,
        current: Option<JobStatus>,
    },
    /// 413; the message names the limit and its variable.
    PayloadTooLarge(String),
    /// 408: the body did not arrive within its deadline.
    RequestTimeout(String),
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    pub fn validation(location: &[&str], message: impl Into<String>) -> Self {
        ApiError::Validation {
            location: location.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
        }
    }

    pub fn invalid(place: &str, error: InvalidValue) -> Self {
        ApiError::validation(&[place, error.field], error.message)
    }

    /// Maps a store error for an operation on one job.
    pub fn from_store(job_id: JobId, action: &str, error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::JobNotFound(job_id),
            StoreError::InvalidTransition { current } => ApiError::Conflict {
                message: format!("Job {job_id} is {current}: cannot {action}"),
                current: Some(current),
            },
            StoreError::LeaseMismatch { current } => ApiError::Conflict {
                message: format!(
                    "Job {job_id}: stale lease, this attempt is no longer the job's current one (job is {current})"
                ),
                current: Some(current),
            },
            StoreError::DeadlinePassed => ApiError::Conflict {
                message: format!("Job {job_id}: the attempt's deadline has passed; it is being timed out"),
                current: Some(JobStatus::Processing),
            },
            StoreError::ReleaseLimitReached { limit } => ApiError::Conflict {
                message: format!(
                    "Job {job_id} was released {limit} times already, the most a job may be: finish it, or let it time out (which counts a retry)"
                ),
                current: Some(JobStatus::Processing),
            },
            other => other.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => ApiError::Unavailable(cause),
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::InvalidTransition { current } | StoreError::LeaseMismatch { current } => {
                ApiError::Conflict {
                    message: format!("job is {current}"),
                    current: Some(current),
                }
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::Validation { location, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": [{"loc": location, "msg": message, "type": "value_error"}]}),
            ),
            ApiError::Unauthorized => {
                let mut response = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"detail": "Invalid or missing API key"})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            ApiError::Forbidden(message) => (StatusCode::FORBIDDEN, json!({"detail": message})),
            ApiError::JobNotFound(id) => (
                StatusCode::NOT_FOUND,
                json!({"detail": format!("Job {id} not found")}),
            ),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, json!({"detail": message})),
            ApiError::Conflict { message, current } => (
                StatusCode::CONFLICT,
                json!({"detail": message, "current_status": current.map(JobStatus::as_str)}),
            ),
            ApiError::PayloadTooLarge(message) => {
                (StatusCode::PAYLOAD_TOO_LARGE, json!({"detail": message}))
            }
            ApiError::RequestTimeout(message) => {
                (StatusCode::REQUEST_TIMEOUT, json!({"detail": message}))
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "store unavailable");
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"detail": "storage temporarily unavailable, try again"})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"detail": "internal server error"}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

/// Gives error answers that are not JSON (axum's own rejections, such as a body over the
/// limit on a route that reads raw bytes) the `{"detail": ...}` shape.
pub async fn json_error_bodies(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let body = serde_json::json!({ "detail": text }).to_string();
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
