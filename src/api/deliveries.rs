//! The deliveries admin API: list (filtered, paginated like the jobs list), detail with
//! the attempts log, and redrive of a dead delivery.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::QueryParams;
use crate::clock::Timestamp;
use crate::context::AppContext;
use crate::delivery::SinkKind;
use crate::domain::JobId;
use crate::store::deliveries::{
    Delivery, DeliveryAttempt, DeliveryDetail, DeliveryListParams, DeliveryState,
    DeliveryStatistics, RedriveOutcome, RedriveParams,
};

const MAX_LIST_LIMIT: usize = 500;

#[derive(Serialize)]
pub struct DeliveryView {
    pub id: i64,
    /// The id receivers deduplicate by (the `webhook-id` header, the Celery task id).
    pub event_id: String,
    pub sink: &'static str,
    pub job_id: String,
    pub state: &'static str,
    /// Attempts since creation or the last redrive.
    pub attempt_count: u32,
    /// When a pending delivery is tried next.
    pub next_attempt_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        DeliveryView {
            id: d.id,
            event_id: d.event_id.clone(),
            sink: d.sink.as_str(),
            job_id: d.job_id.to_string(),
            state: d.state.as_str(),
            attempt_count: d.attempts,
            next_attempt_at: (d.state == DeliveryState::Pending).then_some(d.next_attempt_at),
            last_error: d.last_error.clone(),
            created_at: d.created_at,
            updated_at: d.updated_at,
            delivered_at: d.delivered_at,
        }
    }
}

#[derive(Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub at: Timestamp,
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

impl From<&DeliveryAttempt> for AttemptView {
    fn from(a: &DeliveryAttempt) -> Self {
        AttemptView {
            attempt: a.attempt,
            at: a.at,
            outcome: a.outcome.as_str(),
            http_status: a.http_status,
            error: a.error.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct DeliveryDetailView {
    #[serde(flatten)]
    pub delivery: DeliveryView,
    /// Oldest first.
    pub attempts: Vec<AttemptView>,
}

impl From<&DeliveryDetail> for DeliveryDetailView {
    fn from(d: &DeliveryDetail) -> Self {
        DeliveryDetailView {
            delivery: (&d.delivery).into(),
            attempts: d.attempts.iter().map(AttemptView::from).collect(),
        }
    }
}

#[derive(Serialize)]
pub struct DeliveryListView {
    pub deliveries: Vec<DeliveryView>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, Default)]
pub struct SinkCountsView {
    pub pending: u64,
    pub dead: u64,
}

/// The deliveries part of the statistics answer.
#[derive(Serialize, Default)]
pub struct DeliveryStatisticsView {
    pub per_sink: BTreeMap<String, SinkCountsView>,
    /// Seconds since the oldest pending delivery was created.
    pub oldest_pending_age_seconds: Option<f64>,
}

impl DeliveryStatisticsView {
    pub fn new(stats: DeliveryStatistics, now: Timestamp) -> Self {
        DeliveryStatisticsView {
            per_sink: stats
                .per_sink
                .into_iter()
                .map(|(sink, c)| {
                    (
                        sink,
                        SinkCountsView {
                            pending: c.pending,
                            dead: c.dead,
                        },
                    )
                })
                .collect(),
            oldest_pending_age_seconds: stats.oldest_pending_created_at.map(|created| {
                now.as_micros().saturating_sub(created.as_micros()).max(0) as f64 / 1e6
            }),
        }
    }
}

#[derive(Deserialize)]
pub struct DeliveryListQuery {
    pub state: Option<String>,
    pub sink: Option<String>,
    pub job_id: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

pub async fn list(
    State(context): State<Arc<AppContext>>,
    QueryParams(query): QueryParams<DeliveryListQuery>,
) -> Result<Json<DeliveryListView>, ApiError> {
    let state = match non_empty(&query.state) {
        None => None,
        Some(text) => Some(DeliveryState::parse(text).ok_or_else(|| {
            ApiError::validation(
                &["query", "state"],
                format!("unknown state {text:?} (pending, delivered or dead)"),
            )
        })?),
    };
    let sink = match non_empty(&query.sink) {
        None => None,
        Some(text) => Some(SinkKind::parse(text).ok_or_else(|| {
            ApiError::validation(
                &["query", "sink"],
                format!("unknown sink {text:?} (webhook, ingestion_callback or celery)"),
            )
        })?),
    };
    let job_id = match non_empty(&query.job_id) {
        None => None,
        Some(text) => Some(JobId::parse(text).map_err(|error| ApiError::invalid("query", error))?),
    };
    let limit = match non_empty(&query.limit) {
        None => 50,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::validation(
                    &["query", "limit"],
                    format!("must be from 1 to {MAX_LIST_LIMIT}"),
                )
            })?,
    };
    let cursor = match non_empty(&query.cursor) {
        None => None,
        Some(text) => Some(text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::validation(&["query", "cursor"], "not a cursor from a previous page")
        })?),
    };
    let page = context
        .store
        .list_deliveries(DeliveryListParams {
            state,
            sink,
            job_id,
            limit,
            cursor,
        })
        .await?;
    Ok(Json(DeliveryListView {
        deliveries: page.deliveries.iter().map(DeliveryView::from).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

/// The `{id}` path segment of a delivery: a positive integer.
pub struct DeliveryIdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for DeliveryIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = super::extract::path_segment(parts, state, "delivery_id").await?;
        raw.trim()
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .map(DeliveryIdPath)
            .ok_or_else(|| ApiError::validation(&["path", "delivery_id"], "not a delivery id"))
    }
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("Delivery {id} not found"))
}

pub async fn detail(
    State(context): State<Arc<AppContext>>,
    DeliveryIdPath(id): DeliveryIdPath,
) -> Result<Json<DeliveryDetailView>, ApiError> {
    let detail = context
        .store
        .get_delivery(id)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(Json((&detail).into()))
}

pub async fn redrive(
    State(context): State<Arc<AppContext>>,
    DeliveryIdPath(id): DeliveryIdPath,
) -> Result<Json<DeliveryView>, ApiError> {
    let outcome = context
        .store
        .redrive_delivery(RedriveParams {
            delivery_id: id,
            now: context.clock.now(),
        })
        .await
        .map_err(|error| match error {
            crate::store::StoreError::NotFound => not_found(id),
            other => other.into(),
        })?;
    match outcome {
        RedriveOutcome::Redriven(delivery) => {
            tracing::info!(delivery_id = id, sink = %delivery.sink, "delivery redriven by an admin");
            context.dispatcher.wake();
            Ok(Json((&delivery).into()))
        }
        RedriveOutcome::NotDead(state) => Err(ApiError::Conflict {
            message: format!(
                "delivery {id} is {}; only a dead delivery can be redriven",
                state.as_str()
            ),
            current: None,
        }),
    }
}
