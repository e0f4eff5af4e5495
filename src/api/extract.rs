//! Extractors that turn bad input into clear 422 JSON errors instead of axum's plain-text
//! rejections. JSON bodies are parsed whatever the Content-Type, as FastAPI does.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::BytesMut;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use super::bounded_json;
use super::error::ApiError;
use crate::context::AppContext;
use crate::domain::JobId;
use crate::http_server::BodyDeadline;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppContext>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, context: &Arc<AppContext>) -> Result<Self, ApiError> {
        let bytes = read_body(request, context).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::validation(&["body"], "a JSON body is required"));
        }
        parse_within_limits(&bytes, context).map(JsonBody)
    }
}

/// A JSON body that may be absent (empty): then `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<Arc<AppContext>> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, context: &Arc<AppContext>) -> Result<Self, ApiError> {
        let bytes = read_body(request, context).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_within_limits(&bytes, context).map(OptionalJsonBody)
    }
}

/// Reads the whole body within its size limit and the request's body deadline. The
/// buffer is sized once from Content-Length (when it is within the limit), so a large
/// body is held once, not grown by doubling and then copied into one piece.
async fn read_body(request: Request, context: &Arc<AppContext>) -> Result<Bytes, ApiError> {
    let limits = &context.config.limits;
    // Results carry whole transcripts; creates carry task options; everything else is small.
    let (limit, too_large) = if request.method() == axum::http::Method::PUT {
        (
            limits.max_result_body_bytes(),
            "MORAG_REMOTE_MAX_RESULT_BYTES for content plus MORAG_REMOTE_MAX_METADATA_BYTES for metadata plus 64 KiB",
        )
    } else {
        (
            limits.max_create_body_bytes().max(2 * 1024 * 1024),
            "MORAG_REMOTE_MAX_METADATA_BYTES for task_options plus 64 KiB, at least 2 MiB",
        )
    };
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body larger than {limit} bytes ({too_large})"
        ))
    };
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let deadline = request.extensions().get::<BodyDeadline>().copied();
    let mut body = request.into_body();
    let mut buffer = BytesMut::with_capacity(declared.unwrap_or(0));
    let read_all = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                ApiError::validation(&["body"], format!("failed to read the body: {error}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if buffer.len() + data.len() > limit {
                    return Err(too_large());
                }
                buffer.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match deadline {
        Some(BodyDeadline(deadline)) => tokio::time::timeout_at(deadline, read_all)
            .await
            .map_err(|_| {
                ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s (MORAG_JOBS_HTTP_BODY_TIMEOUT)",
                    limits.body_timeout.as_secs()
                ))
            })??,
        None => read_all.await?,
    }
    Ok(buffer.freeze())
}

/// Parses with the JSON limits installed; a limit exceeded is a 413 naming it.
fn parse_within_limits<T: DeserializeOwned>(
    bytes: &[u8],
    context: &AppContext,
) -> Result<T, ApiError> {
    let limits = &context.config.limits;
    let (parsed, exceeded) =
        bounded_json::with_limits(limits.json, limits.max_result_bytes, || {
            let mut deserializer = serde_json::Deserializer::from_slice(bytes);
            serde_path_to_error::<T>(&mut deserializer)
        });
    match exceeded {
        Some(message) => Err(ApiError::PayloadTooLarge(message)),
        None => parsed,
    }
}

/// Deserializes, naming the field that failed where serde tells us.
fn serde_path_to_error<T: DeserializeOwned>(
    deserializer: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<T, ApiError> {
    let value = T::deserialize(&mut *deserializer).map_err(json_error)?;
    deserializer.end().map_err(json_error)?;
    Ok(value)
}

fn json_error(error: serde_json::Error) -> ApiError {
    let message = error.to_string();
    // serde names missing and unknown fields in backticks: "missing field `content_type`".
    // Other data errors put the offending *value* in backticks ("invalid type: integer `5`"),
    // which must not be reported as a field name.
    let names_a_field =
        message.starts_with("missing field") || message.starts_with("unknown field");
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| error.is_data() && names_a_field)
        .unwrap_or("")
        .to_owned();
    if field.is_empty() {
        ApiError::validation(&["body"], message)
    } else {
        ApiError::validation(&["body", &field], message)
    }
}

pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| QueryParams(value))
            .map_err(|rejection| ApiError::validation(&["query"], rejection.body_text()))
    }
}

/// The route's one `{id}` path segment as text; a 422 names it `field`.
pub async fn path_segment<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    field: &str,
) -> Result<String, ApiError> {
    axum::extract::Path::<String>::from_request_parts(parts, state)
        .await
        .map(|axum::extract::Path(raw)| raw)
        .map_err(|rejection| ApiError::validation(&["path", field], rejection.body_text()))
}

/// The `{id}` path segment, checked to be a UUID.
pub struct JobIdPath(pub JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = path_segment(parts, state, "job_id").await?;
        JobId::parse(&raw)
            .map(JobIdPath)
            .map_err(|error| ApiError::invalid("path", error))
    }
}
