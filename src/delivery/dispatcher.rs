//! The dispatcher: a background service (like the monitor) that fans recorded hand-offs
//! out into deliveries and attempts every due delivery, several at once.
//!
//! `run_once` does everything due now and reports it; tests call it directly with a
//! manual clock. `run` loops around it: it wakes when a hand-off commits (the store's
//! `handoff_events`: SQLite signals after its commit, PostgreSQL by NOTIFY from every
//! replica), when the next retry comes due, or at the fallback interval. Every replica
//! may run one: claims never hand a delivery to two dispatchers, and an attempt's outcome
//! is recorded only with its claim.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::config::DeliveryConfig;
use super::policy::RetrySchedule;
use super::{AttemptDetail, DeliveryError, Sink, SinkKind};
use crate::clock::{SharedClock, Timestamp};
use crate::store::deliveries::{
    AttemptResult, ClaimDeliveriesParams, ClaimedDelivery, DispatchStepParams, FanOutParams,
    RecordAttemptParams, RecordOutcome,
};
use crate::store::{Store, StoreError};

/// Hand-offs fanned out per store call.
const FAN_OUT_BATCH: usize = 500;
/// Added to the attempt timeout for a claim's lifetime: an attempt's outcome must be
/// recorded before another dispatcher may take the delivery over (if it is not, the
/// delivery is repeated, under the same id). It is also how long a delivery whose attempt
/// died with its process waits beyond the attempt timeout before it is tried again.
const CLAIM_MARGIN: Duration = Duration::from_secs(10);
/// The shortest sleep between passes when a pass seemed to leave work behind (hand-offs
/// another replica is fanning out), so the loop never spins.
const MIN_PAUSE: Duration = Duration::from_millis(20);

/// The longest an ended attempt waits to be recorded with others (its claim holds for the
/// attempt timeout plus `CLAIM_MARGIN`, far longer).
const RECORD_DELAY: Duration = Duration::from_millis(5);

/// The least time between the starts of two passes.
const PASS_SPACING: Duration = Duration::from_millis(5);

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DispatchReport {
    pub n_handoffs_fanned_out: usize,
    pub n_deliveries_created: usize,
    pub n_delivered: usize,
    pub n_retries_scheduled: usize,
    pub n_dead: usize,
    /// Attempts whose claim was taken over before their outcome could be recorded.
    pub n_claims_lost: usize,
}

impl DispatchReport {
    pub fn changed_anything(&self) -> bool {
        *self != DispatchReport::default()
    }
}

struct Shared {
    store: Arc<dyn Store>,
    clock: SharedClock,
    sinks: BTreeMap<SinkKind, Arc<dyn Sink>>,
    schedule: RetrySchedule,
    attempt_timeout: Duration,
}

pub struct Dispatcher {
    shared: Arc<Shared>,
    /// Wakes the loop for work made due outside a hand-off commit (a redrive).
    woken: tokio::sync::Notify,
    concurrency: usize,
    poll_interval: Duration,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        clock: SharedClock,
        config: &DeliveryConfig,
        sinks: Vec<Arc<dyn Sink>>,
    ) -> Dispatcher {
        Dispatcher {
            shared: Arc::new(Shared {
                store,
                clock,
                sinks: sinks.into_iter().map(|sink| (sink.kind(), sink)).collect(),
                schedule: RetrySchedule {
                    max_attempts: config.max_attempts,
                    backoff_base: config.backoff_base,
                    backoff_max: config.backoff_max,
                },
                attempt_timeout: config.attempt_timeout,
            }),
            woken: tokio::sync::Notify::new(),
            concurrency: config.concurrency,
            poll_interval: config.poll_interval,
        }
    }

    /// Makes the loop run a pass now (or right after the current one).
    pub fn wake(&self) {
        self.woken.notify_one();
    }

    /// The sinks this dispatcher delivers to.
    pub fn sink_kinds(&self) -> Vec<SinkKind> {
        self.shared.sinks.keys().copied().collect()
    }

    /// How hand-offs are fanned out: to every configured sink but the webhook, and to the
    /// webhook when a job names one.
    pub fn fan_out_params(&self, now: Timestamp) -> FanOutParams {
        FanOutParams {
            sinks: self
                .shared
                .sinks
                .keys()
                .copied()
                .filter(|kind| *kind != SinkKind::Webhook)
                .collect(),
            webhooks: self.shared.sinks.contains_key(&SinkKind::Webhook),
            limit: FAN_OUT_BATCH,
            now,
        }
    }

    /// Fans out every waiting hand-off. Cleanup calls this first, so a job is never
    /// deleted before its outcome has deliveries.
    pub async fn fan_out_once(&self) -> Result<(usize, usize), StoreError> {
        let (mut handoffs, mut deliveries) = (0, 0);
        loop {
            let report = self
                .shared
                .store
                .fan_out_handoffs(self.fan_out_params(self.shared.clock.now()))
                .await?;
            handoffs += report.n_handoffs;
            deliveries += report.n_deliveries;
            if report.n_handoffs < FAN_OUT_BATCH {
                return Ok((handoffs, deliveries));
            }
        }
    }

    /// Fans out waiting hand-offs and attempts every delivery due now, at most
    /// `concurrency` at once, records every attempt, and returns when nothing is due or
    /// waiting and none is running.
    pub async fn run_once(&self) -> Result<DispatchReport, StoreError> {
        let mut report = DispatchReport::default();
        let mut running: JoinSet<FinishedAttempt> = JoinSet::new();
        // Attempts that ended and are not recorded yet, and when the first of them ended.
        let mut finished: Vec<FinishedAttempt> = Vec::new();
        let mut first_finished = tokio::time::Instant::now();
        let mut exhausted = false;
        // The first claim of a pass fans out whatever waits; later ones only after another
        // hand-off committed. Looking for waiting hand-offs when none had committed was the
        // largest single cost on PostgreSQL with two sinks (1.3 ms a call: the partial
        // index of hand-offs not fanned out is mostly dead entries until vacuumed).
        let mut committed = self.shared.store.handoff_events();
        let mut fan_out_due = true;
        // Every store write here is a dispatch step: it records the attempts that ended
        // and claims more in one transaction. Claims are made in chunks, once a quarter of
        // the places are free (or when nothing runs): claiming one delivery per finished
        // attempt cost more than the attempts themselves under load. Each claim also fans
        // out the hand-offs committed meanwhile, their new deliveries created claimed, so a
        // delivery is written twice (created, recorded) instead of three or four times.
        // Finished attempts wait for the next claim, or for a quarter of the places'
        // worth, or `RECORD_DELAY`, whichever comes first; with nothing running they are
        // recorded at once.
        let refill_at = (self.concurrency / 4).max(1);
        loop {
            let free = self.concurrency.saturating_sub(running.len());
            let refill = !exhausted && free > 0 && (free >= refill_at || running.is_empty());
            let record_now = !finished.is_empty()
                && (refill
                    || running.is_empty()
                    || finished.len() >= refill_at
                    || first_finished.elapsed() >= RECORD_DELAY);
            if refill || record_now {
                let now = self.shared.clock.now();
                let fan_out = refill
                    && (std::mem::take(&mut fan_out_due)
                        || committed.has_changed().unwrap_or(true));
                if fan_out {
                    committed.mark_unchanged();
                }
                let claim = refill.then(|| {
                    let fan_out_params = self.fan_out_params(now);
                    // As many hand-offs as the free places can take claimed (a hand-off
                    // has a delivery per global sink): a backlog waits as hand-offs, so
                    // every delivery is created claimed rather than created, claimed, then
                    // recorded. None when no hand-off can be waiting: the claim only.
                    let limit = if fan_out {
                        (free / fan_out_params.sinks.len().max(1)).clamp(1, FAN_OUT_BATCH)
                    } else {
                        0
                    };
                    (
                        FanOutParams {
                            limit,
                            ..fan_out_params
                        },
                        ClaimDeliveriesParams {
                            limit: free,
                            claim_for: self.shared.attempt_timeout + CLAIM_MARGIN,
                            now,
                        },
                    )
                });
                let fan_out_limit = claim.as_ref().map_or(0, |(f, _)| f.limit);
                let (results, records): (Vec<AttemptResult>, Vec<RecordAttemptParams>) =
                    finished.drain(..).map(|f| (f.result, f.record)).unzip();
                let step = self
                    .shared
                    .store
                    .dispatch_step(DispatchStepParams { records, claim })
                    .await?;
                tally_all(&mut report, results, step.recorded)?;
                if refill {
                    report.n_handoffs_fanned_out += step.fanned_out.n_handoffs;
                    report.n_deliveries_created += step.fanned_out.n_deliveries;
                    // A full fan-out may have left more hand-offs waiting.
                    fan_out_due = fan_out && step.fanned_out.n_handoffs >= fan_out_limit;
                    exhausted = step.claimed.len() < free && !fan_out_due;
                    for delivery in step.claimed {
                        running.spawn(attempt(self.shared.clone(), delivery));
                    }
                }
            }
            let joined = if finished.is_empty() {
                running.join_next().await
            } else {
                let deadline = first_finished + RECORD_DELAY;
                match tokio::time::timeout_at(deadline, running.join_next()).await {
                    Ok(joined) => joined,
                    // Time to record what ended.
                    Err(_) => continue,
                }
            };
            match joined {
                None if exhausted && finished.is_empty() => return Ok(report),
                None => continue,
                Some(joined) => {
                    if finished.is_empty() {
                        first_finished = tokio::time::Instant::now();
                    }
                    finished.push(finished_attempt(joined)?);
                }
            }
            // Every other attempt that ended meanwhile is recorded with it.
            while let Some(joined) = running.try_join_next() {
                finished.push(finished_attempt(joined)?);
            }
        }
    }

    /// Runs passes until `shutdown` turns true: after a hand-off commits, when the next
    /// delivery comes due, or every poll interval. Attempts in flight at shutdown are
    /// dropped; their claims expire and another pass (or replica) repeats them.
    pub async fn run(&self, shutdown: &mut watch::Receiver<bool>) {
        let mut committed = self.shared.store.handoff_events();
        let mut last_pass: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Under load commits come faster than passes are worth: passes start at most
            // every PASS_SPACING, so hand-offs committed meanwhile are taken together. An
            // idle dispatcher starts at once.
            if let Some(last) = last_pass {
                tokio::time::sleep_until(last + PASS_SPACING).await;
            }
            last_pass = Some(tokio::time::Instant::now());
            committed.mark_unchanged();
            let pass = tokio::select! {
                pass = self.run_once() => pass,
                _ = shutdown.changed() => continue,
            };
            let mut pause = self.poll_interval;
            match pass {
                Ok(report) => {
                    if report.n_dead > 0 || report.n_claims_lost > 0 {
                        tracing::warn!(?report, "deliveries dead-lettered or taken over");
                    } else if report.changed_anything() {
                        tracing::debug!(?report, "dispatcher pass");
                    }
                    match self.shared.store.next_delivery_due().await {
                        Ok(Some(due)) => {
                            let wait = due
                                .to_system_time()
                                .duration_since(self.shared.clock.now().to_system_time())
                                .unwrap_or_default();
                            pause = wait.clamp(MIN_PAUSE, self.poll_interval);
                        }
                        Ok(None) => {}
                        Err(error) => tracing::warn!(%error, "cannot read the next delivery time"),
                    }
                }
                Err(error) => tracing::warn!(%error, "dispatcher pass failed; trying again"),
            }
            let signal_closed = tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                changed = committed.changed() => changed.is_err(),
                _ = self.woken.notified() => false,
                _ = shutdown.changed() => false,
            };
            if signal_closed {
                // The store closed its signal: fall back to the interval.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

/// How much lower the dispatcher thread's CPU priority is than the request handlers'
/// (`nice` +5: about a third of their weight when both want the CPU, all of any idle CPU).
pub const DISPATCHER_NICENESS: i32 = 5;

/// Runs `dispatcher` until `shutdown` on a thread of its own with a single-threaded
/// runtime, at a lower CPU priority (`DISPATCHER_NICENESS`). Requests are answered by the
/// main runtime's workers, which no longer queue behind delivery work (signing and
/// sending HTTP, building Celery messages): on 2 cores, sharing those workers cost the
/// lifecycle about a fifth of its throughput beyond the CPU the deliveries themselves
/// took. The returned receiver resolves when the thread ends (an error: it panicked).
pub fn run_on_own_thread(
    dispatcher: Arc<Dispatcher>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("morag-dispatch".into())
        .spawn(move || {
            lower_this_threads_priority(DISPATCHER_NICENESS);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "cannot start the dispatcher's runtime");
                    return;
                }
            };
            runtime.block_on(dispatcher.run(&mut shutdown));
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Raises this thread's nice value by `by` (Linux sets it per thread). Best effort: a
/// failure only means deliveries compete with requests on equal terms.
fn lower_this_threads_priority(by: i32) {
    let thread = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    if let Err(error) = rustix::process::setpriority_process(Some(thread), current + by) {
        tracing::debug!(%error, "cannot lower the dispatcher thread's priority");
    }
}

/// An attempt that ended, with the record it asks for.
struct FinishedAttempt {
    result: AttemptResult,
    record: RecordAttemptParams,
}

fn finished_attempt(
    joined: Result<FinishedAttempt, tokio::task::JoinError>,
) -> Result<FinishedAttempt, StoreError> {
    joined.map_err(|error| StoreError::Internal(format!("a delivery attempt panicked: {error}")))
}

/// Counts recorded attempts in the pass's report: `recorded` answers `results` in order.
fn tally_all(
    report: &mut DispatchReport,
    results: Vec<AttemptResult>,
    recorded: Vec<RecordOutcome>,
) -> Result<(), StoreError> {
    if recorded.len() != results.len() {
        return Err(StoreError::Internal(format!(
            "{} attempts recorded, {} outcomes returned",
            results.len(),
            recorded.len()
        )));
    }
    for (result, recorded) in results.into_iter().zip(recorded) {
        tally(report, result, recorded);
    }
    Ok(())
}

/// Counts one recorded (or fenced-off) attempt in the pass's report.
fn tally(report: &mut DispatchReport, result: AttemptResult, recorded: RecordOutcome) {
    match (recorded, result) {
        (RecordOutcome::ClaimLost, _) => report.n_claims_lost += 1,
        (_, AttemptResult::Delivered) => report.n_delivered += 1,
        (_, AttemptResult::RetryAt { .. }) => report.n_retries_scheduled += 1,
        (_, AttemptResult::Dead { .. }) => report.n_dead += 1,
    }
}

/// One attempt: deliver under the timeout and decide; the caller records it.
async fn attempt(shared: Arc<Shared>, claimed: ClaimedDelivery) -> FinishedAttempt {
    let (outcome, detail) = match &claimed.event {
        Err(why) => (
            Err(DeliveryError::Permanent(why.clone())),
            AttemptDetail::default(),
        ),
        Ok(event) => match shared.sinks.get(&claimed.sink) {
            // Another replica, or this one before a configuration change, fanned it out.
            None => (
                Err(DeliveryError::Retryable(format!(
                    "the {} sink is not configured on this server",
                    claimed.sink
                ))),
                AttemptDetail::default(),
            ),
            Some(sink) => {
                match tokio::time::timeout(shared.attempt_timeout, sink.deliver(event)).await {
                    Ok(answer) => answer,
                    Err(_) => (
                        Err(DeliveryError::Retryable(format!(
                            "no answer within {:?}",
                            shared.attempt_timeout
                        ))),
                        AttemptDetail::default(),
                    ),
                }
            }
        },
    };
    let now = shared.clock.now();
    let result = shared
        .schedule
        .decide(claimed.attempt, outcome, fastrand::f64(), now);
    if let AttemptResult::Dead { error } = &result {
        tracing::warn!(
            delivery_id = claimed.delivery_id,
            sink = %claimed.sink,
            attempt = claimed.attempt,
            %error,
            "delivery dead-lettered"
        );
    }
    FinishedAttempt {
        record: RecordAttemptParams {
            delivery_id: claimed.delivery_id,
            claim_token: claimed.claim_token,
            result: result.clone(),
            http_status: detail.http_status,
            now,
        },
        result,
    }
}
