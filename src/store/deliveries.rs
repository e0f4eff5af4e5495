//! The deliveries part of the storage interface: fanning hand-offs out to sinks, claiming
//! due deliveries, recording attempts, and the admin views. Backend-neutral decisions
//! (which sinks a hand-off goes to, how a stored hand-off becomes an `OutboundEvent`) live
//! here, so both backends only apply them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{StoreError, StoreFuture};
use crate::clock::Timestamp;
use crate::domain::outcome::{EventKind, OutboundEvent, SinkKind};
use crate::domain::JobId;

/// Where a delivery is in its life.
///
/// `Pending` is left by the dispatcher (delivered, or dead after a permanent error or the
/// last attempt); `Dead` only by an admin's redrive (back to pending); `Delivered` never.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryState> {
        [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Dead,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// One hand-off on its way to one sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub event_id: String,
    pub sink: SinkKind,
    pub job_id: JobId,
    pub state: DeliveryState,
    /// Attempts since creation or the last redrive.
    pub attempts: u32,
    /// When a pending delivery is next tried (or its running attempt's claim expires).
    pub next_attempt_at: Timestamp,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

/// How one attempt ended, as the attempts log records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcomeKind {
    Delivered,
    /// Failed; another attempt is scheduled.
    Failed,
    /// Failed; the delivery is dead-lettered.
    Dead,
}

impl AttemptOutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcomeKind::Delivered => "delivered",
            AttemptOutcomeKind::Failed => "failed",
            AttemptOutcomeKind::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<AttemptOutcomeKind> {
        [
            AttemptOutcomeKind::Delivered,
            AttemptOutcomeKind::Failed,
            AttemptOutcomeKind::Dead,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// One recorded attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryAttempt {
    /// 1 for the first attempt (counting restarts again from 1 after a redrive).
    pub attempt: u32,
    pub at: Timestamp,
    pub outcome: AttemptOutcomeKind,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryDetail {
    pub delivery: Delivery,
    /// Oldest first.
    pub attempts: Vec<DeliveryAttempt>,
}

/// Fans recorded hand-offs out into deliveries, oldest first.
#[derive(Clone, Debug)]
pub struct FanOutParams {
    /// Sinks every hand-off goes to (the ingestion callback, Celery), when configured.
    pub sinks: Vec<SinkKind>,
    /// Whether a job's `task_options.webhook_url` gets a webhook delivery.
    pub webhooks: bool,
    /// Hand-offs to fan out at most; 0 fans out none (a dispatch step that only claims).
    pub limit: usize,
    pub now: Timestamp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanOutReport {
    pub n_handoffs: usize,
    pub n_deliveries: usize,
}

/// Claims due pending deliveries for one attempt each.
#[derive(Clone, Debug)]
pub struct ClaimDeliveriesParams {
    pub limit: usize,
    /// How long the claim holds: past it, the delivery is due again (the attempt is
    /// presumed lost with its process). Longer than the per-attempt timeout.
    pub claim_for: Duration,
    pub now: Timestamp,
}

/// A delivery claimed for one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    /// Presented with the attempt's outcome; a later claim replaces it.
    pub claim_token: String,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    pub sink: SinkKind,
    /// The event, or why it cannot be built (its job was deleted): the delivery is then
    /// dead-lettered. Shared by the deliveries of one hand-off claimed together.
    pub event: SharedEvent,
}

/// A claimed delivery's event, read once for all the hand-off's deliveries in a claim.
pub type SharedEvent = Result<Arc<OutboundEvent>, String>;

/// The events one claim has built, by hand-off: the deliveries of a hand-off share its
/// event (a result can be tens of megabytes), so it is read and built once.
#[derive(Default)]
pub(crate) struct EventsByHandoff(std::collections::HashMap<i64, SharedEvent>);

impl EventsByHandoff {
    /// The hand-off's event, built from what `read` returns the first time it is asked for.
    pub(crate) fn get_or_build(
        &mut self,
        handoff_id: i64,
        read: impl FnOnce() -> Result<StoredEvent, StoreError>,
    ) -> Result<SharedEvent, StoreError> {
        if let Some(event) = self.0.get(&handoff_id) {
            return Ok(event.clone());
        }
        let event = build_event(read()?).map(Arc::new);
        self.0.insert(handoff_id, event.clone());
        Ok(event)
    }
}

/// One write of the dispatcher: record finished attempts, then claim more.
#[derive(Clone, Debug, Default)]
pub struct DispatchStepParams {
    /// Applied first, each only with its claim (as `record_delivery_attempts`).
    pub records: Vec<RecordAttemptParams>,
    /// Then claim due deliveries and fan out waiting hand-offs (`fan_out_and_claim`).
    pub claim: Option<(FanOutParams, ClaimDeliveriesParams)>,
}

/// What `dispatch_step` (or `fan_out_and_claim`) did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DispatchStep {
    /// One per record, in order.
    pub recorded: Vec<RecordOutcome>,
    pub fanned_out: FanOutReport,
    pub claimed: Vec<ClaimedDelivery>,
}

/// What an attempt came to.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptResult {
    Delivered,
    RetryAt { at: Timestamp, error: String },
    Dead { error: String },
}

#[derive(Clone, Debug)]
pub struct RecordAttemptParams {
    pub delivery_id: i64,
    pub claim_token: String,
    pub result: AttemptResult,
    pub http_status: Option<u16>,
    pub now: Timestamp,
}

/// Whether the outcome was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    Recorded,
    /// The claim expired and the delivery was claimed again (or redriven, or is no longer
    /// pending): nothing was written.
    ClaimLost,
}

#[derive(Clone, Debug, Default)]
pub struct DeliveryListParams {
    pub state: Option<DeliveryState>,
    pub sink: Option<SinkKind>,
    pub job_id: Option<JobId>,
    pub limit: usize,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<i64>,
}

/// Newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryPage {
    pub deliveries: Vec<Delivery>,
    pub next_cursor: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct RedriveParams {
    pub delivery_id: i64,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RedriveOutcome {
    /// Pending again, due now, with a fresh attempt budget.
    Redriven(Delivery),
    /// Only a dead delivery can be redriven; this one is in that state.
    NotDead(DeliveryState),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkCounts {
    pub pending: u64,
    pub dead: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryStatistics {
    /// Pending and dead deliveries by sink name.
    pub per_sink: BTreeMap<String, SinkCounts>,
    /// When the oldest pending delivery was created.
    pub oldest_pending_created_at: Option<Timestamp>,
}

/// The deliveries half of the storage interface (`Store` requires it).
pub trait DeliveryStore: Send + Sync + 'static {
    /// Creates the deliveries of hand-offs not yet fanned out, at most `limit` hand-offs,
    /// each in the same transaction that marks it fanned out (once, whatever crashes).
    fn fan_out_handoffs(&self, params: FanOutParams) -> StoreFuture<'_, FanOutReport>;
    /// Claims due pending deliveries, oldest due first. On PostgreSQL rows another replica
    /// is claiming are skipped (`SKIP LOCKED`).
    fn claim_deliveries(
        &self,
        params: ClaimDeliveriesParams,
    ) -> StoreFuture<'_, Vec<ClaimedDelivery>>;
    /// `claim_deliveries`, then `fan_out_handoffs`, in one store write (one transaction),
    /// with the new deliveries created already claimed while the claim's `limit` has room,
    /// so a new delivery needs no second write to be claimed. Deliveries that were due
    /// before come first, so retries never wait behind a stream of new hand-offs.
    fn fan_out_and_claim(
        &self,
        fan_out: FanOutParams,
        claim: ClaimDeliveriesParams,
    ) -> StoreFuture<'_, DispatchStep> {
        self.dispatch_step(DispatchStepParams {
            records: Vec::new(),
            claim: Some((fan_out, claim)),
        })
    }
    /// The dispatcher's write: `record_delivery_attempts` of `records`, then (when asked)
    /// `fan_out_and_claim`, in one transaction. A chunk of finished attempts and the claim
    /// that refills their places cost one commit instead of two.
    fn dispatch_step(&self, params: DispatchStepParams) -> StoreFuture<'_, DispatchStep>;
    /// Records an attempt's outcome, only if the claim is still the delivery's current one.
    fn record_delivery_attempt(
        &self,
        params: RecordAttemptParams,
    ) -> StoreFuture<'_, RecordOutcome> {
        let recording = self.record_delivery_attempts(vec![params]);
        Box::pin(async move {
            recording.await?.pop().ok_or_else(|| {
                StoreError::Internal("an attempt was recorded without an outcome".into())
            })
        })
    }
    /// Records several attempts' outcomes in one store call (the records of a
    /// `dispatch_step` that claims nothing), each only if its claim is still the
    /// delivery's current one: an item whose claim was lost changes nothing while the
    /// others are recorded. Returns one outcome per item, in order.
    fn record_delivery_attempts(
        &self,
        params: Vec<RecordAttemptParams>,
    ) -> StoreFuture<'_, Vec<RecordOutcome>> {
        let step = self.dispatch_step(DispatchStepParams {
            records: params,
            claim: None,
        });
        Box::pin(async move { Ok(step.await?.recorded) })
    }
    fn list_deliveries(&self, params: DeliveryListParams) -> StoreFuture<'_, DeliveryPage>;
    fn get_delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>>;
    fn redrive_delivery(&self, params: RedriveParams) -> StoreFuture<'_, RedriveOutcome>;
    fn delivery_statistics(&self) -> StoreFuture<'_, DeliveryStatistics>;
    /// When the dispatcher next has something to do: the earliest pending delivery's due
    /// time, or `now`-ish when a hand-off waits to be fanned out.
    fn next_delivery_due(&self) -> StoreFuture<'_, Option<Timestamp>>;
    /// Changes after a hand-off was committed (on PostgreSQL by any replica), so the
    /// dispatcher wakes at once instead of polling.
    fn handoff_events(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Which sinks a hand-off goes to: every configured global sink, and the webhook when the
/// job names one. Decided once, at fan-out.
pub(crate) fn sinks_for(task_options_text: &str, params: &FanOutParams) -> Vec<SinkKind> {
    let mut sinks = params.sinks.clone();
    if params.webhooks && webhook_url(task_options_text).is_some() {
        sinks.push(SinkKind::Webhook);
    }
    sinks.sort();
    sinks.dedup();
    sinks
}

/// The job's `task_options.webhook_url` (stored JSON text), when it is a non-empty string.
pub fn webhook_url(task_options_text: &str) -> Option<String> {
    let options: serde_json::Value = serde_json::from_str(task_options_text).ok()?;
    webhook_url_of(&options).map(str::to_owned)
}

/// `task_options.webhook_url`, when it is a non-empty string.
pub fn webhook_url_of(task_options: &serde_json::Value) -> Option<&str> {
    match task_options.get("webhook_url") {
        Some(serde_json::Value::String(url)) if !url.trim().is_empty() => Some(url),
        _ => None,
    }
}

/// A new event id: `evt_` and a random UUID.
pub(crate) fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::new_v4().simple())
}

/// A new claim token.
pub(crate) fn new_claim_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What a claim reads about a delivery's hand-off and job, in the stores' encoding.
pub(crate) struct StoredEvent {
    pub event_id: String,
    pub job_id: String,
    pub handoff_kind: String,
    pub handoff_payload: String,
    pub handoff_created_at: i64,
    /// `None` when the job no longer exists.
    pub job: Option<StoredEventJob>,
}

pub(crate) struct StoredEventJob {
    pub ingestion_task_id: String,
    pub task_options: String,
    pub retry_count: i64,
    pub result_content: Option<String>,
    pub result_metadata: Option<String>,
    pub processing_time: Option<f64>,
}

/// Builds the event a sink receives from what the store holds. The hand-off's payload is
/// the snapshot taken at the transition (a later manual retry changes the job's error and
/// retry count); a completed job's result never changes, so it is read from the job.
pub(crate) fn build_event(stored: StoredEvent) -> Result<OutboundEvent, String> {
    let job_id = JobId::parse(&stored.job_id).map_err(|e| e.to_string())?;
    let Some(job) = stored.job else {
        return Err(format!("job {job_id} no longer exists"));
    };
    let snapshot: serde_json::Value = serde_json::from_str(&stored.handoff_payload)
        .map_err(|_| "the hand-off's payload is not JSON".to_owned())?;
    let kind = match stored.handoff_kind.as_str() {
        "job.completed" => EventKind::Completed,
        "job.cancelled" => EventKind::Cancelled,
        "job.failed" if snapshot.get("status").and_then(|s| s.as_str()) == Some("timeout") => {
            EventKind::TimedOut
        }
        "job.failed" => EventKind::Failed,
        other => return Err(format!("unknown hand-off kind {other:?}")),
    };
    let task_options: serde_json::Value =
        serde_json::from_str(&job.task_options).unwrap_or(serde_json::Value::Null);
    let payload = match kind {
        EventKind::Completed => serde_json::json!({
            "success": true,
            "content": job.result_content.unwrap_or_default(),
            "metadata": job
                .result_metadata
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .unwrap_or_else(|| serde_json::json!({})),
            "processing_time": job.processing_time,
        }),
        _ => {
            let error_message = snapshot
                .get("error_message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| default_error_message(kind).to_owned());
            // Hand-offs recorded before the snapshot carried the retry count fall back to
            // the job's (the same unless an admin retried it since).
            let retry_count = snapshot
                .get("retry_count")
                .and_then(|r| r.as_i64())
                .unwrap_or(job.retry_count);
            serde_json::json!({
                "error_message": error_message,
                "retry_count": retry_count,
                "job_id": job_id.to_string(),
                "reason": kind.failure_reason(),
            })
        }
    };
    Ok(OutboundEvent {
        event_id: stored.event_id,
        kind,
        job_id,
        ingestion_task_id: job.ingestion_task_id,
        payload,
        task_options,
        completed_at: Timestamp::from_micros(stored.handoff_created_at),
    })
}

fn default_error_message(kind: EventKind) -> &'static str {
    match kind {
        EventKind::TimedOut => "the job timed out",
        EventKind::Cancelled => "the job was cancelled",
        _ => "the job failed",
    }
}

pub(crate) fn parse_sink(text: &str) -> Result<SinkKind, StoreError> {
    SinkKind::parse(text)
        .ok_or_else(|| StoreError::Internal(format!("stored sink {text:?} is invalid")))
}

pub(crate) fn parse_state(text: &str) -> Result<DeliveryState, StoreError> {
    DeliveryState::parse(text)
        .ok_or_else(|| StoreError::Internal(format!("stored delivery state {text:?} is invalid")))
}

pub(crate) fn parse_job_id(text: &str) -> Result<JobId, StoreError> {
    JobId::parse(text)
        .map_err(|_| StoreError::Internal(format!("stored job id {text:?} is invalid")))
}

/// The attempts-log outcome and the delivery's columns after an attempt:
/// `(outcome, state, next_attempt_at, last_error, delivered_at)`.
pub(crate) fn after_attempt(
    result: &AttemptResult,
    current_next_attempt_at: i64,
    now: Timestamp,
) -> (
    AttemptOutcomeKind,
    DeliveryState,
    i64,
    Option<String>,
    Option<i64>,
) {
    match result {
        AttemptResult::Delivered => (
            AttemptOutcomeKind::Delivered,
            DeliveryState::Delivered,
            current_next_attempt_at,
            None,
            Some(now.as_micros()),
        ),
        AttemptResult::RetryAt { at, error } => (
            AttemptOutcomeKind::Failed,
            DeliveryState::Pending,
            at.as_micros(),
            Some(error.clone()),
            None,
        ),
        AttemptResult::Dead { error } => (
            AttemptOutcomeKind::Dead,
            DeliveryState::Dead,
            current_next_attempt_at,
            Some(error.clone()),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(kind: &str, payload: serde_json::Value) -> StoredEvent {
        StoredEvent {
            event_id: "evt_1".into(),
            job_id: "5f0c7a3e-8a7e-4c43-9a57-1b7a0f5f8e21".into(),
            handoff_kind: kind.into(),
            handoff_payload: payload.to_string(),
            handoff_created_at: 1_000_000,
            job: Some(StoredEventJob {
                ingestion_task_id: "ingest-1".into(),
                task_options: r#"{"webhook_url":"http://x/y"}"#.into(),
                retry_count: 0,
                result_content: Some("text".into()),
                result_metadata: Some(r#"{"pages":2}"#.into()),
                processing_time: Some(1.5),
            }),
        }
    }

    #[test]
    fn a_timeout_hand_off_becomes_a_timed_out_event_with_its_snapshot() {
        let event = build_event(stored(
            "job.failed",
            serde_json::json!({"status": "timeout", "error_message": "no worker", "retry_count": 3}),
        ))
        .unwrap();
        assert_eq!(event.kind, EventKind::TimedOut);
        assert_eq!(event.payload["retry_count"], 3);
        assert_eq!(event.payload["reason"], "timed_out");
        assert_eq!(event.payload["error_message"], "no worker");
    }

    #[test]
    fn a_completion_carries_the_result() {
        let event = build_event(stored("job.completed", serde_json::json!({}))).unwrap();
        assert_eq!(event.kind, EventKind::Completed);
        assert_eq!(event.payload["content"], "text");
        assert_eq!(event.payload["metadata"]["pages"], 2);
        assert_eq!(event.completed_at, Timestamp::from_micros(1_000_000));
    }

    #[test]
    fn a_deleted_job_cannot_be_delivered() {
        let mut s = stored("job.completed", serde_json::json!({}));
        s.job = None;
        assert!(build_event(s).is_err());
    }

    #[test]
    fn webhooks_go_only_where_a_job_names_one() {
        let params = FanOutParams {
            sinks: vec![SinkKind::IngestionCallback],
            webhooks: true,
            limit: 1,
            now: Timestamp::from_micros(0),
        };
        assert_eq!(
            sinks_for(r#"{"webhook_url":"http://a"}"#, &params),
            vec![SinkKind::Webhook, SinkKind::IngestionCallback]
        );
        assert_eq!(sinks_for("{}", &params), vec![SinkKind::IngestionCallback]);
        assert_eq!(
            sinks_for(r#"{"webhook_url":""}"#, &params),
            vec![SinkKind::IngestionCallback]
        );
    }
}
