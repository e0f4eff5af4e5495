//! HTTP: the routes of MoRAG's remote-job protocol and the admin API. Only this module
//! knows JSON; handlers validate input into domain types and call the store.

mod admin;
mod auth;
use morag_jobs_client::wire::bounded_json;
pub mod deliveries;
mod error;
mod extract;
mod queries;
pub mod views;
mod worker;
mod workers;

use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::{middleware, Router};

pub use error::ApiError;

use crate::context::AppContext;

pub fn router(context: Arc<AppContext>) -> Router {
    let jobs = "/api/v1/remote-jobs";
    let worker = Router::new()
        .route(&format!("{jobs}/poll"), get(worker::poll))
        .route(&format!("{jobs}/{{id}}/heartbeat"), post(worker::heartbeat))
        .route(&format!("{jobs}/{{id}}/release"), post(worker::release))
        .route(
            &format!("{jobs}/{{id}}/result"),
            // Bodies are read by `extract`, within limits set by the configuration.
            put(worker::submit_result),
        )
        .route(&format!("{jobs}/{{id}}/download"), get(worker::download))
        .route_layer(middleware::from_fn_with_state(
            context.clone(),
            auth::require_worker,
        ));
    let admin = Router::new()
        .route(jobs, post(admin::create_job).get(admin::list_jobs))
        .route(
            &format!("{jobs}/"),
            post(admin::create_job).get(admin::list_jobs),
        )
        .route(&format!("{jobs}/statistics"), get(admin::statistics))
        .route(&format!("{jobs}/cleanup"), post(admin::cleanup))
        .route(&format!("{jobs}/{{id}}"), get(admin::job_detail))
        .route(&format!("{jobs}/{{id}}/status"), get(admin::job_status))
        .route(&format!("{jobs}/{{id}}/cancel"), post(admin::cancel_job))
        .route(&format!("{jobs}/{{id}}/retry"), post(admin::retry_job))
        .route("/api/v1/workers", get(workers::list))
        .route("/api/v1/workers/", get(workers::list))
        .route("/api/v1/deliveries", get(deliveries::list))
        .route("/api/v1/deliveries/", get(deliveries::list))
        .route("/api/v1/deliveries/{id}", get(deliveries::detail))
        .route("/api/v1/deliveries/{id}/redrive", post(deliveries::redrive))
        .route_layer(middleware::from_fn_with_state(
            context.clone(),
            auth::require_admin,
        ));
    Router::new()
        .route("/health", get(admin::health))
        .merge(worker)
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("Not Found".into()) })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(middleware::map_response(error::json_error_bodies))
        .with_state(context)
}

fn method_not_allowed() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({"detail": "Method Not Allowed"})),
    )
        .into_response()
}
