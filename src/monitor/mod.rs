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

use crate::app::AppContext;
use crate::clock::Timestamp;
use crate::domain::RetentionPolicy;
use crate::store::{RescueParams, RescueReport, StoreError};

pub use cleaner::CleanupSummary;

/// Jobs handled per store call; a pass repeats batches until one comes back short.
const RESCUE_BATCH: usize = 500;
/// The longest the rescuer sleeps before it looks at the nearest deadline again; jobs
/// created on another replica (or in the meantime) may bring a nearer one.
const DEADLINE_RECHECK: Duration = Duration::from_secs(1);

pub struct Monitor {
    context: Arc<AppContext>,
}

impl Monitor {
    pub fn new(context: Arc<AppContext>) -> Self {
        Monitor { context }
    }

    /// Times out every expired job and makes every due retry claimable.
    pub async fn rescue_once(&self) -> Result<RescueReport, StoreError> {
        let mut total = RescueReport::default();
        loop {
            let report = self
                .context
                .store
                .rescue_expired(RescueParams {
                    policy: self.context.config.policy.clone(),
                    limit: RESCUE_BATCH,
                    jitter_seed: fastrand::u64(..),
                    now: self.context.clock.now(),
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
            self.context.wakeups.wake_everyone();
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

    /// Deletes finished jobs past the configured retention, and their files.
    pub async fn cleanup_once(&self) -> Result<CleanupSummary, StoreError> {
        self.cleanup_with(self.context.config.policy.retention)
            .await
    }

    /// Deletes finished jobs older than `retention`, and their files (the admin endpoint).
    pub async fn cleanup_with(
        &self,
        retention: RetentionPolicy,
    ) -> Result<CleanupSummary, StoreError> {
        // A hand-off not yet fanned out keeps its job; fan out first so that cleanup
        // does not wait for the dispatcher's next pass.
        self.context.dispatcher.fan_out_once().await?;
        let summary = cleaner::cleanup(&self.context, retention).await?;
        if summary.n_jobs_deleted > 0 {
            tracing::info!(
                jobs = summary.n_jobs_deleted,
                files = summary.n_files_deleted,
                "cleanup deleted finished jobs"
            );
        }
        Ok(summary)
    }

    /// Logs the statistics line operators see every ten minutes.
    pub async fn log_statistics(&self) -> Result<(), StoreError> {
        let stats = self
            .context
            .store
            .statistics(self.context.clock.now())
            .await?;
        let counts: Vec<String> = stats
            .status_counts
            .iter()
            .map(|(status, n)| format!("{status}={n}"))
            .collect();
        tracing::info!(total = stats.total_jobs, counts = %counts.join(" "), created_24h = stats.created_last_24h, "job statistics");
        Ok(())
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(&self, shutdown: &mut watch::Receiver<bool>) {
        let config = &self.context.config;
        let started = tokio::time::Instant::now();
        let mut next_full_pass = started;
        let mut next_cleanup = started + config.cleanup_interval.min(Duration::from_secs(60));
        let mut next_stats = started + config.stats_log_interval;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now_instant = tokio::time::Instant::now();
            let deadline_due = match self.context.store.next_deadline().await {
                Ok(Some(deadline)) => deadline <= self.context.clock.now(),
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
            if now_instant >= next_cleanup {
                if let Err(error) = self.cleanup_once().await {
                    tracing::warn!(%error, "cleanup failed; retrying on the next interval");
                }
                next_cleanup = now_instant + config.cleanup_interval;
            }
            if now_instant >= next_stats {
                if let Err(error) = self.log_statistics().await {
                    tracing::warn!(%error, "cannot read statistics");
                }
                next_stats = now_instant + config.stats_log_interval;
            }
            let sleep = self
                .sleep_before_next_check(next_full_pass, next_cleanup, next_stats)
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
        next_cleanup: tokio::time::Instant,
        next_stats: tokio::time::Instant,
    ) -> Duration {
        let now_instant = tokio::time::Instant::now();
        let mut sleep = DEADLINE_RECHECK;
        for instant in [next_full_pass, next_cleanup, next_stats] {
            sleep = sleep.min(instant.saturating_duration_since(now_instant));
        }
        if let Ok(Some(deadline)) = self.context.store.next_deadline().await {
            let now: Timestamp = self.context.clock.now();
            sleep = sleep.min(deadline.since(now));
        }
        sleep.max(Duration::from_millis(5))
    }
}
