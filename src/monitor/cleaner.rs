//! Retention cleanup: deletes finished jobs past retention in small batches, then the
//! source files they leave unreferenced, but only files inside the server's own
//! `files/` directory. Files in other allowed roots belong to the operator.
//!
//! The monitor's passes yield to requests: batches are sized to keep the store busy for
//! about `TARGET_BATCH_BUSY` each, and after each batch the cleaner pauses so that its
//! batches take at most `YIELDING_STORE_SHARE` of the pass's wall time. A pass that runs
//! out of its time budget (the cleanup interval) with jobs still to delete cannot keep
//! up with job creation: it says so in a warning and in the statistics
//! (`CleanupProgress`), and the next pass may take a larger share, up to
//! `CATCH_UP_STORE_SHARE`. Once passes catch up, each takes the share that spreads the
//! last pass's work over most of the interval, and at least 10%. In the soak at full load
//! (BENCHMARKS.md) cleanup needed 10 to 30% of SQLite's writer to keep up: a fixed 10%
//! would let storage grow without bound under the load the server is meant to carry.
//! After a pass, SQLite's free pages that stayed free through the last ten passes are
//! returned to the file system, paced the same way.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::{SharedClock, Timestamp};
use crate::delivery::dispatcher::Dispatcher;
use crate::domain::RetentionPolicy;
use crate::files::{self, Removal};
use crate::store::{CleanupParams, Store, StoreError};

/// The share of wall time a yielding pass may keep the store busy (SQLite: hold its one
/// writer): 10%, so requests keep at least 90% of the store while a pass runs.
pub const YIELDING_STORE_SHARE: f64 = 0.10;
/// The most a yielding pass may take while cleanup is behind: requests keep 70%.
pub const CATCH_UP_STORE_SHARE: f64 = 0.30;
/// The part of its time budget a pass should take (`Pacing::next_share`), leaving room
/// for a larger backlog than the last pass found.
const SPREAD_OVER: f64 = 0.8;
/// How long one batch should keep the store busy: short enough that a request queued
/// behind it barely notices, long enough that a batch's fixed costs stay small.
pub const TARGET_BATCH_BUSY: Duration = Duration::from_millis(10);
/// Jobs in a pass's first batch; later batches are sized from the time batches took.
const FIRST_BATCH: usize = 50;
const MIN_BATCH: usize = 10;
const MAX_BATCH: usize = 2_000;
/// Free space returned to the file system per store call (SQLite: 1,024 pages of 4 KiB).
const RELEASE_STEP_BYTES: u64 = 4 * 1024 * 1024;
/// Passes whose starting free space is remembered: space free at the start of each of
/// them was not needed even at the fullest point of ten cycles, so it may go. Fewer made
/// a steady but uneven load shrink and regrow the file (the soak in BENCHMARKS.md).
const FREE_SPACE_MEMORY: usize = 10;

/// How a cleanup pass shares the store with requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// The largest share of wall time the pass's batches may keep the store busy; after
    /// each batch the cleaner pauses for the rest. 1.0 never pauses.
    pub max_store_share: f64,
    /// The share passes may rise to while they fall behind (`next_share`).
    pub catch_up_store_share: f64,
    /// The longest a pass may run. A pass that ends here with jobs left to delete fell
    /// behind; the rest waits for the next pass.
    pub time_budget: Option<Duration>,
}

impl Pacing {
    /// As fast as the store allows, in small batches (the admin cleanup endpoint: an
    /// operator waits for its answer).
    pub const UNPACED: Pacing = Pacing {
        max_store_share: 1.0,
        catch_up_store_share: 1.0,
        time_budget: None,
    };

    /// The monitor's passes: at most `YIELDING_STORE_SHARE` of the store, done within
    /// `time_budget`.
    pub fn yielding(time_budget: Duration) -> Pacing {
        Pacing {
            max_store_share: YIELDING_STORE_SHARE,
            catch_up_store_share: CATCH_UP_STORE_SHARE,
            time_budget: Some(time_budget),
        }
    }

    /// The share the pass after this one may take. After a pass that fell behind: half as
    /// much again, up to the catch-up share. After one that caught up: the share that
    /// would have spread its store time over `SPREAD_OVER` of its budget, but never less
    /// than the normal share (a pass that only finished off a backlog says little about
    /// the next interval's work; going lower made the next passes fall behind again).
    pub fn next_share(&self, share: f64, caught_up: bool, busy: Duration) -> f64 {
        let ceiling = self.catch_up_store_share.max(self.max_store_share);
        if !caught_up {
            return (share * 1.5).min(ceiling);
        }
        let Some(budget) = self.time_budget else {
            return self.max_store_share;
        };
        let spread = busy.as_secs_f64() / (budget.as_secs_f64() * SPREAD_OVER);
        spread.clamp(self.max_store_share, ceiling)
    }

    /// These settings with the share a pass may take now.
    fn with_share(self, share: f64) -> Pacing {
        Pacing {
            max_store_share: share,
            ..self
        }
    }

    /// How long to wait after a batch that kept the store busy for `busy` and took
    /// `elapsed` from sending it to its answer (its wait in a queue counts as a pause
    /// already), so that the batches' share of wall time stays at most the maximum.
    pub fn pause_after(&self, busy: Duration, elapsed: Duration) -> Duration {
        if self.max_store_share >= 1.0 || self.max_store_share <= 0.0 {
            return Duration::ZERO;
        }
        busy.div_f64(self.max_store_share).saturating_sub(elapsed)
    }
}

/// Sizes batches so each keeps the store busy for about `TARGET_BATCH_BUSY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSizer {
    size: usize,
}

impl Default for BatchSizer {
    fn default() -> Self {
        BatchSizer { size: FIRST_BATCH }
    }
}

impl BatchSizer {
    pub fn size(&self) -> usize {
        self.size
    }

    /// Learns from a batch of `deleted` jobs (of the `size` asked for) that kept the store
    /// busy for `busy`. Only full batches say how long a batch of that size takes; a
    /// batch may at most double or halve the next one, so one slow batch (a checkpoint,
    /// a cold cache) cannot swing the size.
    pub fn observe(&mut self, deleted: usize, busy: Duration) {
        if deleted < self.size || deleted == 0 {
            return;
        }
        let per_job = busy.as_secs_f64() / deleted as f64;
        let fitting = if per_job > 0.0 {
            (TARGET_BATCH_BUSY.as_secs_f64() / per_job).round() as usize
        } else {
            self.size * 2
        };
        self.size = fitting
            .clamp(self.size / 2, self.size * 2)
            .clamp(MIN_BATCH, MAX_BATCH);
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CleanupSummary {
    pub n_jobs_deleted: usize,
    pub n_files_deleted: usize,
    pub n_batches: usize,
    /// How long the batches kept the store busy, together.
    pub busy: Duration,
    /// From the pass's start to its end, pauses included.
    pub elapsed: Duration,
    /// False when the pass ran out of its time budget with jobs still to delete.
    pub caught_up: bool,
    /// The share of wall time the pass's batches were allowed to keep the store busy.
    pub store_share_allowed: f64,
    /// Free space returned to the file system after the pass (SQLite), in bytes.
    pub released_bytes: u64,
}

/// The last monitor pass, for the statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct CleanupPass {
    pub finished_at: Timestamp,
    pub summary: CleanupSummary,
    /// Passes in a row, this one included, that ran out of time with jobs left; 0 when
    /// this one caught up.
    pub passes_behind: u32,
}

/// What the monitor's cleanup did last; the statistics endpoint reads it.
#[derive(Debug, Default)]
pub struct CleanupProgress {
    last: Mutex<Option<CleanupPass>>,
}

impl CleanupProgress {
    pub fn last_pass(&self) -> Option<CleanupPass> {
        self.lock().clone()
    }

    fn record(&self, finished_at: Timestamp, summary: CleanupSummary) -> u32 {
        let mut last = self.lock();
        let passes_behind = if summary.caught_up {
            0
        } else {
            last.as_ref().map_or(0, |pass| pass.passes_behind) + 1
        };
        *last = Some(CleanupPass {
            finished_at,
            summary,
            passes_behind,
        });
        passes_behind
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CleanupPass>> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Deletes finished jobs past a retention, and the files only they referred to. Used by
/// the monitor on its interval and by the admin cleanup endpoint with the caller's retention.
#[derive(Clone)]
pub struct Cleaner {
    store: Arc<dyn Store>,
    clock: SharedClock,
    /// The server's own files directory (canonical): the only place files are deleted from.
    files_dir: PathBuf,
    /// Fans out waiting hand-offs before each cleanup: a hand-off not yet fanned out keeps
    /// its job, and cleanup should not wait for the dispatcher's next pass.
    dispatcher: Option<Arc<Dispatcher>>,
    /// Where the monitor's passes are reported (`None` for the admin endpoint's cleaner).
    progress: Option<Arc<CleanupProgress>>,
    /// The free space found at the start of recent passes (see `FREE_SPACE_MEMORY`).
    free_at_start: Arc<Mutex<VecDeque<u64>>>,
    /// The share the next paced pass may take (`Pacing::next_share`); `None` before the
    /// first pass.
    next_share: Arc<Mutex<Option<f64>>>,
}

impl Cleaner {
    pub fn new(store: Arc<dyn Store>, clock: SharedClock, files_dir: PathBuf) -> Self {
        Cleaner {
            store,
            clock,
            files_dir,
            dispatcher: None,
            progress: None,
            free_at_start: Arc::default(),
            next_share: Arc::default(),
        }
    }

    /// Fans out hand-offs through `dispatcher` before each cleanup.
    pub fn fanning_out_first(mut self, dispatcher: Arc<Dispatcher>) -> Self {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// Records each paced pass in `progress` (and warns when one falls behind).
    pub fn reporting_to(mut self, progress: Arc<CleanupProgress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Deletes finished jobs older than `retention` as fast as the store allows, in small
    /// batches, and their files.
    pub async fn cleanup(&self, retention: RetentionPolicy) -> Result<CleanupSummary, StoreError> {
        self.cleanup_paced(retention, Pacing::UNPACED, None).await
    }

    /// Deletes finished jobs older than `retention` in batches paced by `pacing`, and
    /// their files; stops early (between batches) when `stop` turns true. Then returns
    /// free space that stayed free since recent passes to the file system.
    pub async fn cleanup_paced(
        &self,
        retention: RetentionPolicy,
        pacing: Pacing,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<CleanupSummary, StoreError> {
        let started = Instant::now();
        let base = pacing;
        let share = self
            .lock_next_share()
            .unwrap_or(base.max_store_share)
            .clamp(
                base.max_store_share,
                base.catch_up_store_share.max(base.max_store_share),
            );
        let pacing = base.with_share(share);
        let mut summary = CleanupSummary {
            caught_up: true,
            store_share_allowed: share,
            ..CleanupSummary::default()
        };
        let free_at_start = self.store.storage_space().await?.free_bytes;
        if let Some(dispatcher) = &self.dispatcher {
            dispatcher.fan_out_once().await?;
        }
        let mut sizer = BatchSizer::default();
        loop {
            let limit = sizer.size();
            let sent = Instant::now();
            let report = self
                .store
                .cleanup_finished(CleanupParams {
                    retention,
                    limit,
                    now: self.clock.now(),
                })
                .await?;
            let elapsed = sent.elapsed();
            summary.n_batches += 1;
            summary.busy += report.busy;
            summary.n_jobs_deleted += report.n_deleted;
            summary.n_files_deleted +=
                remove_owned_files(&self.files_dir, report.orphaned_source_files).await;
            if report.n_deleted < limit {
                break;
            }
            sizer.observe(report.n_deleted, report.busy);
            let pause = pacing.pause_after(report.busy, elapsed);
            let over_budget = pacing
                .time_budget
                .is_some_and(|budget| started.elapsed() + pause >= budget);
            if over_budget {
                summary.caught_up = false;
                break;
            }
            if !pause_unless_stopped(pause, stop.as_mut()).await {
                break;
            }
        }
        summary.released_bytes = self
            .release_unneeded_space(free_at_start, pacing, stop.as_mut())
            .await?;
        summary.elapsed = started.elapsed();
        *self
            .next_share
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(base.next_share(share, summary.caught_up, summary.busy));
        self.report(&summary, pacing);
        Ok(summary)
    }

    fn lock_next_share(&self) -> Option<f64> {
        *self
            .next_share
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the free space that was free at the start of each recent pass: it was not
    /// needed even when the most jobs were waiting for cleanup, so keeping it only makes
    /// the file larger. Space freed by this pass stays for the jobs created before the
    /// next one, so a steady load does not shrink and regrow the file on every pass.
    async fn release_unneeded_space(
        &self,
        free_at_start: u64,
        pacing: Pacing,
        mut stop: Option<&mut watch::Receiver<bool>>,
    ) -> Result<u64, StoreError> {
        let unneeded = {
            let mut recent = self
                .free_at_start
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            recent.push_back(free_at_start);
            while recent.len() > FREE_SPACE_MEMORY {
                recent.pop_front();
            }
            if recent.len() < FREE_SPACE_MEMORY {
                0
            } else {
                recent.iter().copied().min().unwrap_or(0)
            }
        };
        let mut released = 0;
        while released < unneeded {
            let sent = Instant::now();
            let step = RELEASE_STEP_BYTES.min(unneeded - released);
            let freed = self.store.release_free_space(step).await?;
            released += freed;
            if freed < step {
                break;
            }
            // The store's busy time is the whole call here: it is one short write.
            let elapsed = sent.elapsed();
            if !pause_unless_stopped(pacing.pause_after(elapsed, elapsed), stop.as_deref_mut())
                .await
            {
                break;
            }
        }
        if released > 0 {
            // Later passes measure free space from the smaller file.
            let mut recent = self
                .free_at_start
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for free in recent.iter_mut() {
                *free = free.saturating_sub(released);
            }
        }
        Ok(released)
    }

    fn report(&self, summary: &CleanupSummary, pacing: Pacing) {
        let Some(progress) = &self.progress else {
            if summary.n_jobs_deleted > 0 {
                tracing::info!(
                    jobs = summary.n_jobs_deleted,
                    files = summary.n_files_deleted,
                    "cleanup deleted finished jobs"
                );
            }
            return;
        };
        let passes_behind = progress.record(self.clock.now(), summary.clone());
        if !summary.caught_up {
            tracing::warn!(
                jobs = summary.n_jobs_deleted,
                seconds = summary.elapsed.as_secs_f64(),
                store_busy_seconds = summary.busy.as_secs_f64(),
                store_share_allowed = pacing.max_store_share,
                passes_behind,
                "cleanup cannot keep up with job creation: the pass used its time budget and \
                 finished jobs past retention remain; storage grows until passes catch up"
            );
        } else if summary.n_jobs_deleted > 0 || summary.released_bytes > 0 {
            tracing::info!(
                jobs = summary.n_jobs_deleted,
                files = summary.n_files_deleted,
                released_bytes = summary.released_bytes,
                seconds = summary.elapsed.as_secs_f64(),
                store_busy_seconds = summary.busy.as_secs_f64(),
                "cleanup deleted finished jobs"
            );
        }
    }
}

/// Sleeps for `pause`, unless `stop` turns true first; answers whether to go on.
async fn pause_unless_stopped(pause: Duration, stop: Option<&mut watch::Receiver<bool>>) -> bool {
    match stop {
        None => {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            true
        }
        Some(stop) => {
            if *stop.borrow() {
                return false;
            }
            if pause.is_zero() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => true,
                _ = stop.wait_for(|stopped| *stopped) => false,
            }
        }
    }
}

/// Removes each of `paths` only if it is a regular file beneath `files_dir`, reached
/// without symlinks; a path that now leads elsewhere (a swapped-in symlink) is left alone.
/// Returns how many were removed.
async fn remove_owned_files(files_dir: &Path, paths: Vec<String>) -> usize {
    if paths.is_empty() {
        return 0;
    }
    let files_dir = files_dir.to_owned();
    // One blocking task per batch: the unlinks are blocking system calls.
    let removing = tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        for path in &paths {
            match files::remove_beneath(&files_dir, Path::new(path)) {
                Ok(Removal::Removed) => removed += 1,
                Ok(Removal::Missing | Removal::Refused) => {}
                Err(error) => {
                    tracing::warn!(%error, path = %path, "cannot delete a cleaned-up job's file");
                }
            }
        }
        removed
    });
    match removing.await {
        Ok(removed) => removed,
        Err(error) => {
            tracing::warn!(%error, "the file cleanup task failed");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yielding_pass_keeps_the_store_busy_at_most_its_share() {
        let pacing = Pacing::yielding(Duration::from_secs(30));
        let busy = Duration::from_millis(10);
        // Answered at once: pause for the other 90 ms of the cycle.
        assert_eq!(pacing.pause_after(busy, busy), Duration::from_millis(90));
        // A batch that waited 40 ms in the writer's queue already paused that long.
        assert_eq!(
            pacing.pause_after(busy, Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(
            pacing.pause_after(busy, Duration::from_millis(500)),
            Duration::ZERO
        );
        assert_eq!(Pacing::UNPACED.pause_after(busy, busy), Duration::ZERO);
    }

    #[test]
    fn passes_take_the_share_that_spreads_their_work_over_the_interval() {
        let pacing = Pacing::yielding(Duration::from_secs(30));
        let busy = |secs: f64| Duration::from_secs_f64(secs);
        // Falling behind: half as much again each time, up to the catch-up share.
        let mut share = YIELDING_STORE_SHARE;
        let mut shares = Vec::new();
        for _ in 0..4 {
            share = pacing.next_share(share, false, busy(9.0));
            shares.push((share * 1000.0).round() / 1000.0);
        }
        assert_eq!(shares, vec![0.15, 0.225, 0.3, 0.3]);
        // Caught up with 6 s of store time: 6 s over 24 s (80% of 30 s) is a quarter.
        let rounded = |share: f64| (share * 1000.0).round() / 1000.0;
        assert_eq!(rounded(pacing.next_share(0.3, true, busy(6.0))), 0.25);
        // Little work: the normal share.
        assert_eq!(
            pacing.next_share(0.3, true, busy(1.2)),
            YIELDING_STORE_SHARE
        );
        assert_eq!(
            pacing.next_share(0.1, true, busy(0.0)),
            YIELDING_STORE_SHARE
        );
    }

    #[test]
    fn batches_are_sized_to_the_target_time_changing_at_most_twofold() {
        let mut sizer = BatchSizer::default();
        assert_eq!(sizer.size(), FIRST_BATCH);
        // 50 jobs in 1 ms: 20 us each; 10 ms would fit 500, but one step only doubles.
        sizer.observe(50, Duration::from_millis(1));
        assert_eq!(sizer.size(), 100);
        sizer.observe(100, Duration::from_millis(2));
        sizer.observe(200, Duration::from_millis(4));
        assert_eq!(sizer.size(), 400);
        sizer.observe(400, Duration::from_millis(8));
        assert_eq!(sizer.size(), 500);
        // A short batch (the end of the backlog) says nothing about the size.
        sizer.observe(3, Duration::from_millis(9));
        assert_eq!(sizer.size(), 500);
        // Slow batches halve it, down to the minimum.
        for _ in 0..20 {
            let size = sizer.size();
            sizer.observe(size, Duration::from_secs(1));
        }
        assert_eq!(sizer.size(), MIN_BATCH);
    }

    #[test]
    fn passes_behind_count_in_a_row_until_one_catches_up() {
        let progress = CleanupProgress::default();
        let behind = CleanupSummary {
            caught_up: false,
            ..CleanupSummary::default()
        };
        let now = Timestamp::from_micros(0);
        assert_eq!(progress.record(now, behind.clone()), 1);
        assert_eq!(progress.record(now, behind), 2);
        let caught_up = CleanupSummary {
            caught_up: true,
            ..CleanupSummary::default()
        };
        assert_eq!(progress.record(now, caught_up), 0);
        assert_eq!(progress.last_pass().unwrap().passes_behind, 0);
    }
}
