//! Bearer API keys. Worker keys may poll, heartbeat, submit results and download; admin
//! keys may do everything. With no keys configured every endpoint is open (the config
//! refuses that on a non-loopback address unless told otherwise). Keys are never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use crate::config::ApiKey;
use crate::context::AppContext;

pub async fn require_worker(
    State(context): State<Arc<AppContext>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = &context.config;
    check(
        &request,
        &[&config.worker_api_keys, &config.admin_api_keys],
        config.is_open(),
    )?;
    Ok(next.run(request).await)
}

pub async fn require_admin(
    State(context): State<Arc<AppContext>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = &context.config;
    check(&request, &[&config.admin_api_keys], config.is_open())?;
    Ok(next.run(request).await)
}

fn check(request: &Request, accepted: &[&Vec<ApiKey>], open: bool) -> Result<(), ApiError> {
    if open {
        return Ok(());
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            // Authentication schemes are case-insensitive (RFC 9110, 11.1).
            let (scheme, key) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        })
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    // Compare against every key without stopping early, so timing says nothing about which
    // key (or how much of one) matched.
    let mut matched = false;
    for keys in accepted {
        for key in keys.iter() {
            matched |= constant_time_eq(presented.as_bytes(), key.expose().as_bytes());
        }
    }
    if matched {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
