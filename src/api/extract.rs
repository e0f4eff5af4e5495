//! Extractors that turn bad input into clear 422 JSON errors instead of axum's plain-text
//! rejections. JSON bodies are parsed whatever the Content-Type, as FastAPI does.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::domain::JobId;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection: BytesRejection| {
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::PayloadTooLarge
                    } else {
                        ApiError::validation(&["body"], rejection.body_text())
                    }
                })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::validation(&["body"], "a JSON body is required"));
        }
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error(&mut deserializer)?;
        Ok(JsonBody(value))
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

/// The `{id}` path segment, checked to be a UUID.
pub struct JobIdPath(pub JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| {
                    ApiError::validation(&["path", "job_id"], rejection.body_text())
                })?;
        JobId::parse(&raw)
            .map(JobIdPath)
            .map_err(|error| ApiError::invalid("path", error))
    }
}
