//! The background monitor inside `serve`: the rescuer (timeouts and due retries), the
//! cleaner (retention), and a periodic statistics log line.
//!
//! Each service has a `*_once` method that does one bounded pass and reports what it did;
//! tests call those directly with a manual clock. `run` is the loop around them: it
//! sleeps until the nearest deadline, the next interval or one second, whichever is
//! first, so a deadline is acted on within about a second whatever the interval.

mod cleaner;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{SharedClock, Timestamp};
use crate::domain::LifecyclePolicy;
use crate::store::workers::DeleteGoneWorkersParams;
use crate::store::{RescueParams, RescueReport, Store, StoreError};
use crate::wakeups::Wakeups;

pub use cleaner::{
    pause_after, BatchSizer, Cleaner, CleanupPass, CleanupProgress, CleanupSummary, CostEstimate,
    FreeSpaceMemory, Pacing, PassPlan, MAX_STORE_SHARE, MIN_STORE_SHARE, TARGET_BATCH_BUSY,
};

/// Jobs handled per store call; a pass repeats batches until one comes back short.
const RESCUE_BATCH: usize = 500;
/// The longest the rescuer sleeps before it looks at the nearest deadline again; jobs
/// created on another replica (or in the meantime) may bring a nearer one.
const DEADLINE_RECHECK: Duration = Duration::from_secs(1);
/// Worker records deleted per store call.
const WORKER_CLEANUP_BATCH: usize = 500;
/// The least time a cleanup pass may take, however short the cleanup interval.
const MIN_CLEANUP_BUDGET: Duration = Duration::from_secs(1);

/// The monitor's settings, from the server's configuration.
#[derive(Clone, Debug)]
pub struct MonitorSettings {
    pub policy: LifecyclePolicy,
    /// Between full rescue passes (deadlines are also handled as they come due).
    pub monitor_interval: Duration,
    /// Between retention cleanups.
    pub cleanup_interval: Duration,
    /// Between statistics log lines.
    pub stats_log_interval: Duration,
    /// How long the record of a worker no longer heard from is kept.
    pub worker_retention: Duration,
}

pub struct Monitor {
    store: Arc<dyn Store>,
    clock: SharedClock,
    /// Long-pollers are woken when due retries become claimable.
    wakeups: Arc<Wakeups>,
    cleaner: Cleaner,
    settings: MonitorSettings,
}

impl Monitor {
    pub fn new(
        store: Arc<dyn Store>,
        clock: SharedClock,
        wakeups: Arc<Wakeups>,
        cleaner: Cleaner,
        settings: MonitorSettings,
    ) -> Self {
        Monitor {
            store,
            clock,
            wakeups,
            cleaner,
            settings,
        }
    }

    /// Times out every expired job and makes every due retry claimable.
    pub async fn rescue_once(&self) -> Result<RescueReport, StoreError> {
        let mut total = RescueReport::default();
        loop {
            let report = self
                .store
                .rescue_expired(RescueParams {
                    policy: self.settings.policy.clone(),
                    limit: RESCUE_BATCH,
                    jitter_seed: fastrand::u64(..),
                    now: self.clock.now(),
                })
                .await?;
            let handled =
                report.n_pending_timed_out + report.n_attempts_timed_out + report.n_retries_due;
            total.n_pending_timed_out += report.n_pending_timed_out;
            total.n_attempts_timed_out += report.n_attempts_timed_out;
            total.n_retries_scheduled += report.n_retries_scheduled;
            total.n_retries_due += report.n_retries_due;
            if handled < RESCUE_BATCH {
                break;
            }
        }
        if total.n_retries_due > 0 {
            self.wakeups.wake_everyone();
        }
        if total.changed_anything() {
            tracing::info!(
                pending_timed_out = total.n_pending_timed_out,
                attempts_timed_out = total.n_attempts_timed_out,
                retries_scheduled = total.n_retries_scheduled,
                retries_due = total.n_retries_due,
                "monitor handled expired jobs"
            );
        }
        Ok(total)
    }

    /// Deletes the finished jobs past the configured retention at the pass's start, and
    /// their files, spread over most of the cleanup interval and yielding to requests
    /// (see `Pacing::yielding` and `PassPlan`; a pass takes at most the interval); then
    /// the records of workers gone for longer than the worker retention.
    pub async fn cleanup_once(&self) -> Result<CleanupSummary, StoreError> {
        self.cleanup_pass(None).await
    }

    async fn cleanup_pass(
        &self,
        stop: Option<watch::Receiver<bool>>,
    ) -> Result<CleanupSummary, StoreError> {
        let summary = self
            .cleaner
            .cleanup_paced(
                self.settings.policy.retention,
                Pacing::yielding(self.settings.cleanup_interval.max(MIN_CLEANUP_BUDGET)),
                stop,
            )
            .await?;
        self.cleanup_worker_records().await?;
        Ok(summary)
    }

    /// Deletes the records of workers not heard from for longer than the worker
    /// retention, in bounded batches; returns how many.
    pub async fn cleanup_worker_records(&self) -> Result<u64, StoreError> {
        let last_seen_before = self.clock.now().minus(self.settings.worker_retention);
        let mut n_deleted = 0;
        loop {
            let deleted = self
                .store
                .delete_gone_workers(DeleteGoneWorkersParams {
                    last_seen_before,
                    limit: WORKER_CLEANUP_BATCH,
                })
                .await?;
            n_deleted += deleted;
            if deleted < WORKER_CLEANUP_BATCH as u64 {
                break;
            }
        }
        if n_deleted > 0 {
            tracing::info!(
                workers = n_deleted,
                "cleanup deleted the records of workers gone past retention"
            );
        }
        Ok(n_deleted)
    }

    /// Logs the statistics line operators see every ten minutes.
    pub async fn log_statistics(&self) -> Result<(), StoreError> {
        let stats = self.store.statistics(self.clock.now()).await?;
        let counts: Vec<String> = stats
            .status_counts
            .iter()
            .map(|(status, n)| format!("{status}={n}"))
            .collect();
        tracing::info!(total = stats.total_jobs, counts = %counts.join(" "), created_24h = stats.created_last_24h, "job statistics");
        Ok(())
    }

    /// Runs until `shutdown` turns true. Retention cleanup runs beside the rescuer, not
    /// in its loop: a yielding pass may take up to the cleanup interval, and deadlines
    /// must still be acted on within about a second.
    pub async fn run(&self, shutdown: &mut watch::Receiver<bool>) {
        let cleanup_shutdown = shutdown.clone();
        tokio::join!(
            self.run_rescuer(shutdown),
            self.run_cleaner(cleanup_shutdown)
        );
    }

    /// Retention cleanup every cleanup interval (the first within a minute of starting);
    /// a pass that takes longer than the interval is followed by the next at once.
    async fn run_cleaner(&self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.settings.cleanup_interval;
        let mut next_cleanup = tokio::time::Instant::now() + interval.min(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_cleanup) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            if let Err(error) = self.cleanup_pass(Some(shutdown.clone())).await {
                tracing::warn!(%error, "cleanup failed; retrying on the next interval");
            }
            next_cleanup = started + interval;
        }
    }

    async fn run_rescuer(&self, shutdown: &mut watch::Receiver<bool>) {
        let config = &self.settings;
        let started = tokio::time::Instant::now();
        let mut next_full_pass = started;
        let mut next_stats = started + config.stats_log_interval;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now_instant = tokio::time::Instant::now();
            let deadline_due = match self.store.next_deadline().await {
                Ok(Some(deadline)) => deadline <= self.clock.now(),
                Ok(None) => false,
                Err(error) => {
                    tracing::warn!(%error, "monitor cannot read the next deadline");
                    false
                }
            };
            if deadline_due || now_instant >= next_full_pass {
                if let Err(error) = self.rescue_once().await {
                    tracing::warn!(%error, "monitor pass failed; retrying on the next tick");
                }
                next_full_pass = now_instant + config.monitor_interval;
            }
            if now_instant >= next_stats {
                if let Err(error) = self.log_statistics().await {
                    tracing::warn!(%error, "cannot read statistics");
                }
                next_stats = now_instant + config.stats_log_interval;
            }
            let sleep = self
                .sleep_before_next_check(next_full_pass, next_stats)
                .await;
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Until the nearest deadline, the next scheduled pass, or one second.
    async fn sleep_before_next_check(
        &self,
        next_full_pass: tokio::time::Instant,
        next_stats: tokio::time::Instant,
    ) -> Duration {
        let now_instant = tokio::time::Instant::now();
        let mut sleep = DEADLINE_RECHECK;
        for instant in [next_full_pass, next_stats] {
            sleep = sleep.min(instant.saturating_duration_since(now_instant));
        }
        if let Ok(Some(deadline)) = self.store.next_deadline().await {
            let now: Timestamp = self.clock.now();
            sleep = sleep.min(deadline.since(now));
        }
        sleep.max(Duration::from_millis(5))
    }
}
