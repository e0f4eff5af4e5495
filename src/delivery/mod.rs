//! Delivery of job outcomes to MoRAG's ingestion pipeline (the outbox's consumer).
//!
//! Every final outcome is recorded as a hand-off row in the same transaction as the
//! transition that causes it. The store fans each hand-off out into one delivery per
//! configured sink (idempotently, keyed by hand-off and sink), and the dispatcher delivers
//! each one at least once, with retries, backoff and a dead-letter state. A sink is told
//! about one `OutboundEvent` at a time and answers `Ok(())` or a `DeliveryError`; it never
//! sees the store.
//!
//! Sinks: the per-job webhook and the ingestion callback (HTTP, signed with Standard
//! Webhooks), and Celery (a Redis broker), each behind the `Sink` trait. A sink module
//! (for example `celery`, with `CelerySink`) only implements `Sink` for its type; the
//! dispatcher owns retries, timeouts and bookkeeping.

pub mod batch;
pub mod celery;
pub mod config;
pub mod dispatcher;
pub mod http;
pub mod policy;
pub mod resp;
pub mod signing;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

// The event types live in `domain` so the store can build events without importing
// `delivery`; they are part of this interface.
pub use crate::domain::outcome::{EventKind, OutboundEvent, SinkKind};

/// Why an attempt to deliver failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth trying again later (connection refused, timeout, 5xx, broker down).
    #[error("{0}")]
    Retryable(String),
    /// Trying again cannot help (HTTP 410 Gone, a target that is not allowed): the
    /// delivery is dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}

/// What an attempt's outcome says beyond success or failure, for the attempts log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptDetail {
    /// The HTTP status the receiver answered, if it answered.
    pub http_status: Option<u16>,
}

pub type SinkFuture<'a> =
    Pin<Box<dyn Future<Output = (Result<(), DeliveryError>, AttemptDetail)> + Send + 'a>>;

/// A destination for outbound events. The dispatcher calls `deliver` once per attempt,
/// under its own per-attempt timeout, and records the answer.
pub trait Sink: Send + Sync + 'static {
    fn kind(&self) -> SinkKind;
    /// Delivers one event. Must be safe to call again for the same event: the dispatcher
    /// delivers at least once, and the event id is the receiver's deduplication key.
    fn deliver<'a>(&'a self, event: &'a OutboundEvent) -> SinkFuture<'a>;
}

/// The sinks `config` enables: the per-job webhook always (it acts only for jobs that
/// name a `webhook_url`), the ingestion callback when its URL is set, Celery when its
/// broker is set.
pub fn configured_sinks(
    config: &Arc<config::DeliveryConfig>,
    clock: crate::clock::SharedClock,
) -> Vec<Arc<dyn Sink>> {
    let client = http::http_client(config);
    let mut sinks: Vec<Arc<dyn Sink>> = vec![Arc::new(http::WebhookSink::new(
        client.clone(),
        clock.clone(),
        config.clone(),
    ))];
    if let Some(url) = &config.ingestion_callback_url {
        sinks.push(Arc::new(http::IngestionCallbackSink::new(
            client,
            clock,
            url.clone(),
            config.webhook_secret.clone(),
        )));
    }
    if let Some(celery) = &config.celery {
        sinks.push(Arc::new(celery::CelerySink::new(celery.clone())));
    }
    sinks
}
