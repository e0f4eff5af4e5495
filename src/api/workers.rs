//! The worker registry over HTTP: who is calling (`WorkerHeaders`, read from the headers
//! `morag-jobs worker` sends and MoRAG's client does not), the admin listing
//! `GET /api/v1/workers`, and the healthy-worker counts in the statistics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use crate::clock::Timestamp;
use crate::context::AppContext;
use crate::domain::{judge_worker_health, WorkerHealth, WorkerHealthPolicy, WorkerId};
use crate::registry::WorkerCaller;
use crate::store::workers::{ListWorkersParams, WorkerRecord};
use morag_jobs_client::wire::{WORKER_ID_HEADER, WORKER_INSTANCE_HEADER, WORKER_VERSION_HEADER};

/// The most worker records one listing returns (most recently seen first).
const MAX_LISTED_WORKERS: usize = 1000;
/// The longest instance id and version kept.
const MAX_HEADER_CHARS: usize = 100;

/// What a worker's request says about who sent it, besides the `worker_id` a poll carries.
pub struct WorkerHeaders {
    /// `X-Morag-Worker-Id`, which lets heartbeats and results (they carry no worker id)
    /// be counted for their worker.
    pub worker_id: Option<WorkerId>,
    /// `X-Morag-Worker-Instance`, new at each process start; empty when absent.
    pub instance: String,
    /// `X-Morag-Worker-Version`, else the User-Agent (MoRAG's client is told apart by it).
    pub version: Option<String>,
    /// The peer's IP address.
    pub address: Option<String>,
}

impl WorkerHeaders {
    /// The caller with `worker_id` (the poll's own, or the header's), if there is one.
    pub fn caller(&self, worker_id: Option<&WorkerId>) -> Option<WorkerCaller> {
        let worker_id = worker_id.or(self.worker_id.as_ref())?;
        Some(WorkerCaller {
            worker_id: worker_id.clone(),
            instance: self.instance.clone(),
            version: self.version.clone(),
            address: self.address.clone(),
        })
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    // UTF-8 rather than ASCII only: a worker id may be any printable text.
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ApiError::validation(&["header", name], "must be UTF-8 text"))?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(text.to_owned()))
}

impl FromRequestParts<Arc<AppContext>> for WorkerHeaders {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _context: &Arc<AppContext>,
    ) -> Result<Self, ApiError> {
        let headers = &parts.headers;
        let worker_id = header_text(headers, WORKER_ID_HEADER)?
            .map(|text| {
                WorkerId::parse(&text).map_err(|error| {
                    ApiError::validation(&["header", WORKER_ID_HEADER], error.message)
                })
            })
            .transpose()?;
        let instance = header_text(headers, WORKER_INSTANCE_HEADER)?.unwrap_or_default();
        if instance.chars().count() > MAX_HEADER_CHARS {
            return Err(ApiError::validation(
                &["header", WORKER_INSTANCE_HEADER],
                format!("must be at most {MAX_HEADER_CHARS} characters"),
            ));
        }
        let version = match header_text(headers, WORKER_VERSION_HEADER)? {
            Some(version) if version.chars().count() > MAX_HEADER_CHARS => {
                return Err(ApiError::validation(
                    &["header", WORKER_VERSION_HEADER],
                    format!("must be at most {MAX_HEADER_CHARS} characters"),
                ))
            }
            Some(version) => Some(version),
            // A User-Agent is informative only: a strange one is shortened, never refused.
            None => headers
                .get(axum::http::header::USER_AGENT)
                .and_then(|value| value.to_str().ok())
                .map(|agent| {
                    agent
                        .trim()
                        .chars()
                        .take(MAX_HEADER_CHARS)
                        .collect::<String>()
                })
                .filter(|agent| !agent.is_empty()),
        };
        let address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip().to_string());
        Ok(WorkerHeaders {
            worker_id,
            instance,
            version,
            address,
        })
    }
}

/// One worker process as the listing shows it.
#[derive(Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    /// `null` when the worker sends no instance id (MoRAG's client).
    pub instance: Option<String>,
    pub status: &'static str,
    /// From its latest poll; empty means any type; `null` when it never polled.
    pub content_types: Option<Vec<String>>,
    pub version: Option<String>,
    pub address: Option<String>,
    pub first_seen_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub seconds_since_last_seen: f64,
    /// How long it may stay silent before it counts as stale, as things stand.
    pub stale_after_seconds: f64,
    pub poll_wait_seconds: f64,
    pub sends_heartbeats: bool,
    pub jobs_in_flight: u64,
    pub completed: u64,
    pub failed: u64,
}

impl WorkerView {
    fn new(record: WorkerRecord, policy: &WorkerHealthPolicy, now: Timestamp) -> Self {
        let contact = record.contact();
        let health = judge_worker_health(&contact, policy, now);
        WorkerView {
            status: health.as_str(),
            seconds_since_last_seen: now.since(record.last_seen_at).as_secs_f64(),
            stale_after_seconds: crate::domain::worker_health::silence_allowed(&contact, policy)
                .as_secs_f64(),
            poll_wait_seconds: record.poll_wait.as_secs_f64(),
            worker_id: record.worker_id,
            instance: Some(record.instance).filter(|i| !i.is_empty()),
            content_types: record.content_types,
            version: record.version,
            address: record.address,
            first_seen_at: record.first_seen_at,
            last_seen_at: record.last_seen_at,
            sends_heartbeats: record.sends_heartbeats,
            // Counts merged from several replicas can dip below zero for a moment.
            jobs_in_flight: record.jobs_in_flight.max(0) as u64,
            completed: record.n_completed,
            failed: record.n_failed,
        }
    }
}

#[derive(Serialize)]
pub struct WorkerListView {
    pub workers: Vec<WorkerView>,
    pub healthy: u64,
    pub stale: u64,
    pub timestamp: Timestamp,
}

/// Healthy and stale workers, and the healthy ones per content type (`*`: any type).
#[derive(Serialize, Default)]
pub struct WorkerStatisticsView {
    pub healthy: u64,
    pub stale: u64,
    pub healthy_by_content_type: BTreeMap<String, u64>,
}

/// Every worker record, judged at `now` (this replica's gathered activity flushed first,
/// so the answer includes the requests it has just served).
async fn judged_workers(context: &AppContext) -> Result<Vec<WorkerView>, ApiError> {
    if let Err(error) = context.worker_registry.flush(context.store.as_ref()).await {
        tracing::warn!(%error, "cannot write the worker registry before listing it");
    }
    let records = context
        .store
        .list_workers(ListWorkersParams {
            limit: MAX_LISTED_WORKERS,
        })
        .await?;
    let policy = WorkerHealthPolicy::from_timeouts(&context.config.policy.timeouts);
    let now = context.clock.now();
    Ok(records
        .into_iter()
        .map(|record| WorkerView::new(record, &policy, now))
        .collect())
}

pub async fn list(
    State(context): State<Arc<AppContext>>,
) -> Result<Json<WorkerListView>, ApiError> {
    let workers = judged_workers(&context).await?;
    let healthy = workers
        .iter()
        .filter(|w| w.status == WorkerHealth::Healthy.as_str())
        .count() as u64;
    Ok(Json(WorkerListView {
        stale: workers.len() as u64 - healthy,
        healthy,
        workers,
        timestamp: context.clock.now(),
    }))
}

/// The statistics' worker section.
pub async fn statistics(context: &AppContext) -> Result<WorkerStatisticsView, ApiError> {
    let mut view = WorkerStatisticsView::default();
    for worker in judged_workers(context).await? {
        if worker.status != WorkerHealth::Healthy.as_str() {
            view.stale += 1;
            continue;
        }
        view.healthy += 1;
        match worker.content_types {
            // A worker that never polled has taken no type yet.
            None => {}
            Some(types) if types.is_empty() => {
                *view.healthy_by_content_type.entry("*".into()).or_default() += 1;
            }
            Some(types) => {
                for content_type in types {
                    *view
                        .healthy_by_content_type
                        .entry(content_type)
                        .or_default() += 1;
                }
            }
        }
    }
    Ok(view)
}
