//! Retention cleanup: deletes finished jobs past retention in small batches, then the
//! source files they leave unreferenced, but only files inside the server's own
//! `files/` directory. Files in other allowed roots belong to the operator.
//!
//! The monitor's passes yield to requests, and spread their work evenly instead of
//! bursting. A pass fixes its cutoff when it starts: it deletes only the jobs that were
//! past retention then (jobs that finish during the pass wait for the next one), and it
//! counts them. Batches are sized to keep the store busy for about `TARGET_BATCH_BUSY`
//! each; after each batch, `PassPlan` works out the share of wall time the remaining
//! jobs need to be deleted within `SPREAD_OVER` of the pass's time budget (the cleanup
//! interval), from the store time recent batches took per job, and the cleaner pauses
//! so that its batches take that share: at least `MIN_STORE_SHARE`, at most
//! `MAX_STORE_SHARE`. Under a steady load each pass thus takes about the same small
//! share through most of its interval. In the soak at full load (BENCHMARKS.md)
//! cleanup needs 10 to 30% of SQLite's writer to keep up: a fixed 10% would let storage
//! grow without bound under the load the server is meant to carry.
//!
//! A pass that runs out of its budget with jobs of its counted set still to delete
//! cannot keep up with job creation even at the most it may take: it says so in a
//! warning and in the statistics (`CleanupProgress`); the next pass counts what is left
//! with the new jobs. After a pass, a small part of SQLite's free pages that stayed free
//! through the last ten passes is returned to the file system (`FreeSpaceMemory`), so
//! the file shrinks gradually after the load drops, and never below what recent passes
//! needed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::{SharedClock, Timestamp};
use crate::delivery::dispatcher::Dispatcher;
use crate::domain::RetentionPolicy;
use crate::files::{self, Removal};
use crate::store::{CleanupParams, CountCleanableParams, Store, StoreError};

/// The least share of wall time a monitor pass's batches take (SQLite: of its one
/// writer), however little work there is: below it a pass's load is lost in the
/// variation of the requests' own, and spreading only makes passes last longer.
pub const MIN_STORE_SHARE: f64 = 0.01;
/// The most a monitor pass's batches may take, when its work does not fit in less:
/// requests keep at least 70% of the store.
pub const MAX_STORE_SHARE: f64 = 0.30;
/// The part of its time budget a pass spreads its deletions over; the rest is slack for
/// batches that turn out slower than the estimate.
const SPREAD_OVER: f64 = 0.9;
/// How much the batches before the latest count in the estimate of the store time per
/// job, against 1 for the latest: the estimate follows a change in a few dozen batches
/// (a growing table, a busier disk) while one slow batch moves it by a tenth.
const COST_MEMORY: f64 = 0.9;
/// How long one batch should keep the store busy: short enough that a request queued
/// behind it barely notices, long enough that a batch's fixed costs stay small.
pub const TARGET_BATCH_BUSY: Duration = Duration::from_millis(10);
/// Jobs in a pass's first batch; later batches are sized from the time batches took.
const FIRST_BATCH: usize = 50;
const MIN_BATCH: usize = 10;
const MAX_BATCH: usize = 2_000;
/// Free space returned to the file system per store call (SQLite: 1,024 pages of 4 KiB).
const RELEASE_STEP_BYTES: u64 = 4 * 1024 * 1024;
/// The share of wall time the release steps after a pass may keep the store busy; each is
/// one short write, and a pass releases only a few.
const RELEASE_STORE_SHARE: f64 = 0.10;
/// Passes whose free space is remembered: space free at the start of each of them was
/// not needed even at the fullest point of ten cycles, so it may go. Fewer made a steady
/// but uneven load shrink and regrow the file (the soak in BENCHMARKS.md).
const FREE_SPACE_MEMORY: usize = 10;
/// The part of the space that may go which one pass returns: the file shrinks over many
/// passes instead of in one step (returning it all at once halved the file between two
/// samples of the soak).
const RELEASE_FRACTION: f64 = 0.10;
/// Free space is returned only while the space free through all of the last
/// `FREE_SPACE_MEMORY` passes is at least this share of the file: after the load has
/// dropped, not under it. Returning space moves pages from the end of the file into its
/// holes (`incremental_vacuum`); under a steady load that scattered the tables and the
/// soak's throughput drifted down by a quarter, while without any release the free pages
/// were reused and the file stayed within 1 % (BENCHMARKS.md, Soak). So up to about this
/// share of the file stays free once the load stops; `VACUUM` offline returns the rest.
const RELEASE_WHEN_FREE_SHARE: f64 = 0.25;
/// Passes whose freed space is kept in reserve: the jobs of the next interval reuse about
/// as much as a pass frees, so the most one of these passes freed is never returned.
const RESERVE_PASSES: usize = 3;

/// How a cleanup pass shares the store with requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// The least share of wall time the pass's batches take while they spread their work:
    /// a pause lasts at most a batch's store time over this, so a pass with little to do
    /// ends early rather than trickle through its whole budget.
    pub min_store_share: f64,
    /// The largest share of wall time the pass's batches may keep the store busy; after
    /// each batch the cleaner pauses for the rest. 1.0 never pauses.
    pub max_store_share: f64,
    /// The longest a pass may run; it spreads its work over `SPREAD_OVER` of this. A pass
    /// that ends here with jobs left to delete fell behind; the rest waits for the next
    /// pass. `None`: no spreading, every batch at the maximum share.
    pub time_budget: Option<Duration>,
}

impl Pacing {
    /// As fast as the store allows, in small batches (the admin cleanup endpoint: an
    /// operator waits for its answer).
    pub const UNPACED: Pacing = Pacing {
        min_store_share: 1.0,
        max_store_share: 1.0,
        time_budget: None,
    };

    /// The monitor's passes: spread over most of `time_budget`, taking between
    /// `MIN_STORE_SHARE` and `MAX_STORE_SHARE` of the store.
    pub fn yielding(time_budget: Duration) -> Pacing {
        Pacing {
            min_store_share: MIN_STORE_SHARE,
            max_store_share: MAX_STORE_SHARE,
            time_budget: Some(time_budget),
        }
    }

    /// Whether passes count their work and spread it over their budget.
    fn spreads(&self) -> bool {
        self.time_budget.is_some()
    }
}

/// How long to wait after a batch that kept the store busy for `busy` and took `elapsed`
/// from sending it to its answer (its wait in a queue counts as a pause already), so
/// that the batches' share of wall time stays at most `share`. A share of 1.0 (or an
/// invalid one) never pauses.
pub fn pause_after(share: f64, busy: Duration, elapsed: Duration) -> Duration {
    if !(share > 0.0 && share < 1.0) {
        return Duration::ZERO;
    }
    busy.div_f64(share).saturating_sub(elapsed)
}

/// The store time per deleted job, from recent batches: each earlier batch weighted by
/// `COST_MEMORY` once more. The monitor's passes carry it from one to the next, so a
/// pass's first batch (a cold cache, statements still to prepare) moves it by a little.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CostEstimate {
    busy_secs: f64,
    jobs: f64,
}

impl CostEstimate {
    /// Learns from a batch that deleted `n_deleted` jobs and kept the store busy for `busy`.
    pub fn observe(&mut self, n_deleted: usize, busy: Duration) {
        if n_deleted > 0 {
            self.busy_secs = self.busy_secs * COST_MEMORY + busy.as_secs_f64();
            self.jobs = self.jobs * COST_MEMORY + n_deleted as f64;
        }
    }

    /// `None` before a batch deleted any job.
    pub fn per_job(&self) -> Option<Duration> {
        (self.jobs > 0.0).then(|| Duration::from_secs_f64(self.busy_secs / self.jobs))
    }
}

/// One pass's schedule: the jobs it counted at its start, how many it deleted, and the
/// store time per job of recent batches; from those, the share of wall time its batches
/// need so that the rest is done evenly by the end of its spread.
#[derive(Clone, Debug, PartialEq)]
pub struct PassPlan {
    pacing: Pacing,
    /// Jobs past the pass's cutoff when it started (corrected by a recount).
    n_eligible: u64,
    n_deleted: u64,
    /// Jobs in the last batch: the next one is about as large.
    last_batch: u64,
    cost: CostEstimate,
    /// The paced batches' store time (seconds), and their shares weighted by it.
    paced_busy_secs: f64,
    weighted_shares: f64,
}

impl PassPlan {
    /// A pass paced by `pacing` that found `n_eligible` jobs to delete, starting from the
    /// cost per job the last pass arrived at.
    pub fn new(pacing: Pacing, n_eligible: u64, cost: CostEstimate) -> Self {
        PassPlan {
            pacing,
            n_eligible,
            n_deleted: 0,
            last_batch: 0,
            cost,
            paced_busy_secs: 0.0,
            weighted_shares: 0.0,
        }
    }

    /// Records a batch that deleted `n_deleted` jobs and kept the store busy for `busy`.
    pub fn deleted(&mut self, n_deleted: usize, busy: Duration) {
        self.n_deleted += n_deleted as u64;
        self.last_batch = n_deleted as u64;
        self.cost.observe(n_deleted, busy);
    }

    /// Records that a batch which kept the store busy for `busy` was paced at `share`.
    pub fn paced(&mut self, share: f64, busy: Duration) {
        self.paced_busy_secs += busy.as_secs_f64();
        self.weighted_shares += share * busy.as_secs_f64();
    }

    /// The share the pass's pacing allowed, averaged over its paced batches by their
    /// store time (the least share before any). The share they took (`busy` over
    /// `elapsed`) comes out about the same, or lower while batches wait in the queue.
    pub fn share_allowed(&self) -> f64 {
        if self.paced_busy_secs > 0.0 {
            self.weighted_shares / self.paced_busy_secs
        } else {
            self.pacing.min_store_share
        }
    }

    /// The cost estimate, for the next pass.
    pub fn cost(&self) -> CostEstimate {
        self.cost
    }

    /// Jobs of the counted set not deleted yet (0 when the count was short: then the
    /// cleaner counts again).
    pub fn remaining(&self) -> u64 {
        self.n_eligible.saturating_sub(self.n_deleted)
    }

    /// A new count, with the pass's cutoff, of the jobs still to delete.
    pub fn recounted(&mut self, n_left: u64) {
        self.n_eligible = self.n_deleted + n_left;
    }

    /// The share of wall time the batches should take from `elapsed` into the pass on:
    /// the remaining jobs' estimated store time over the time left until the end of the
    /// spread, within the pacing's bounds. The remaining jobs count as at least a batch
    /// like the last: the pause after a batch is its store time over the share, and a
    /// rest smaller than a batch must not stretch it past the end of the spread. The
    /// maximum past the end of the spread, and without a time budget or a cost estimate.
    pub fn share(&self, elapsed: Duration) -> f64 {
        let (min, max) = (self.pacing.min_store_share, self.pacing.max_store_share);
        let (Some(budget), Some(cost)) = (self.pacing.time_budget, self.cost.per_job()) else {
            return max;
        };
        let left = budget.mul_f64(SPREAD_OVER).saturating_sub(elapsed);
        if left.is_zero() {
            return max;
        }
        let work = self.remaining().max(self.last_batch);
        let needed = work as f64 * cost.as_secs_f64() / left.as_secs_f64();
        needed.max(min).min(max)
    }

    /// The pause after a batch that kept the store busy for `busy` and took
    /// `batch_elapsed`, `elapsed` into the pass, paced at `share` (`pause_after`), but
    /// never past the end of the spread (a batch slower than the estimate, or the least
    /// share, would take it there) unless the most the pass may take demands it.
    pub fn pause(
        &self,
        elapsed: Duration,
        share: f64,
        busy: Duration,
        batch_elapsed: Duration,
    ) -> Duration {
        let by_share = pause_after(share, busy, batch_elapsed);
        let Some(budget) = self.pacing.time_budget else {
            return by_share;
        };
        let left = budget.mul_f64(SPREAD_OVER).saturating_sub(elapsed);
        let at_most_share = pause_after(self.pacing.max_store_share, busy, batch_elapsed);
        by_share.min(left).max(at_most_share)
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

/// The free space recent passes saw, to decide how much of it to return to the file
/// system (SQLite): only space that was free at the start of each of the last
/// `FREE_SPACE_MEMORY` passes (so not needed even when the most jobs were waiting for
/// cleanup), and only while that is at least `RELEASE_WHEN_FREE_SHARE` of the file,
/// less a reserve of what recent passes freed, and of that only `RELEASE_FRACTION` per
/// pass, so the file shrinks gradually and a steady load does not shrink and regrow it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreeSpaceMemory {
    passes: VecDeque<PassFreeSpace>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PassFreeSpace {
    /// Free bytes when the pass started, before its deletions.
    free_at_start: u64,
    /// Free bytes its deletions added (net of what requests took meanwhile).
    freed: u64,
}

impl FreeSpaceMemory {
    /// Records a pass that started with `free_at_start` bytes free and left
    /// `free_after` after its deletions, in a file of `file_bytes`; answers how many bytes
    /// to return now.
    pub fn to_release(&mut self, free_at_start: u64, free_after: u64, file_bytes: u64) -> u64 {
        self.passes.push_back(PassFreeSpace {
            free_at_start,
            freed: free_after.saturating_sub(free_at_start),
        });
        while self.passes.len() > FREE_SPACE_MEMORY {
            self.passes.pop_front();
        }
        if self.passes.len() < FREE_SPACE_MEMORY {
            return 0;
        }
        let unneeded = self
            .passes
            .iter()
            .map(|pass| pass.free_at_start)
            .min()
            .unwrap_or(0);
        if (unneeded as f64) < file_bytes as f64 * RELEASE_WHEN_FREE_SHARE {
            return 0;
        }
        let reserve = self
            .passes
            .iter()
            .rev()
            .take(RESERVE_PASSES)
            .map(|pass| pass.freed)
            .max()
            .unwrap_or(0);
        let releasable = unneeded.saturating_sub(reserve).min(free_after);
        // At least a step's worth, so that the last few megabytes do not take forever.
        let gradual = ((releasable as f64 * RELEASE_FRACTION) as u64).max(RELEASE_STEP_BYTES);
        releasable.min(gradual)
    }

    /// `bytes` were returned: later passes measure free space in the smaller file.
    pub fn released(&mut self, bytes: u64) {
        for pass in self.passes.iter_mut() {
            pass.free_at_start = pass.free_at_start.saturating_sub(bytes);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CleanupSummary {
    /// Finished jobs past retention when the pass started (paced passes count them; 0
    /// for an unpaced cleanup, which does not).
    pub n_jobs_eligible: u64,
    pub n_jobs_deleted: usize,
    pub n_files_deleted: usize,
    pub n_batches: usize,
    /// How long the batches kept the store busy, together.
    pub busy: Duration,
    /// From the pass's start to its end, pauses included.
    pub elapsed: Duration,
    /// False when the pass ran out of its time budget with jobs that were past retention
    /// at its start still to delete.
    pub caught_up: bool,
    /// The share of wall time the pass allowed its batches (`PassPlan::share_allowed`):
    /// what spreading its work needed, the maximum when it did not fit in less.
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
    /// The free space of recent passes, to decide what to return to the file system.
    free_space: Arc<Mutex<FreeSpaceMemory>>,
    /// Where the last pass's cost per job estimate left off.
    cost: Arc<Mutex<CostEstimate>>,
}

impl Cleaner {
    pub fn new(store: Arc<dyn Store>, clock: SharedClock, files_dir: PathBuf) -> Self {
        Cleaner {
            store,
            clock,
            files_dir,
            dispatcher: None,
            progress: None,
            free_space: Arc::default(),
            cost: Arc::default(),
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

    /// Deletes the finished jobs that were older than `retention` when the pass started,
    /// in batches paced by `pacing` (see `PassPlan`), and their files; stops early
    /// (between batches) when `stop` turns true. Then returns part of the free space that
    /// stayed free through recent passes to the file system.
    pub async fn cleanup_paced(
        &self,
        retention: RetentionPolicy,
        pacing: Pacing,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<CleanupSummary, StoreError> {
        let started = Instant::now();
        // One cutoff for the whole pass: with a short retention, jobs keep finishing
        // while it runs, and chasing them would leave a pass no end but its budget.
        let now = self.clock.now();
        let mut summary = CleanupSummary {
            caught_up: true,
            ..CleanupSummary::default()
        };
        let free_at_start = self.store.storage_space().await?.free_bytes;
        if let Some(dispatcher) = &self.dispatcher {
            dispatcher.fan_out_once().await?;
        }
        let count = || {
            self.store
                .count_cleanable(CountCleanableParams { retention, now })
        };
        if pacing.spreads() {
            summary.n_jobs_eligible = count().await?;
        }
        let mut plan = PassPlan::new(pacing, summary.n_jobs_eligible, *lock(&self.cost));
        let mut sizer = BatchSizer::default();
        loop {
            let limit = sizer.size();
            let sent = Instant::now();
            let report = self
                .store
                .cleanup_finished(CleanupParams {
                    retention,
                    limit,
                    now,
                })
                .await?;
            let elapsed = sent.elapsed();
            summary.n_batches += 1;
            summary.busy += report.busy;
            summary.n_jobs_deleted += report.n_deleted;
            summary.n_files_deleted +=
                remove_owned_files(&self.files_dir, report.orphaned_source_files).await;
            plan.deleted(report.n_deleted, report.busy);
            if report.n_deleted < limit {
                break;
            }
            sizer.observe(report.n_deleted, report.busy);
            if pacing.spreads() && plan.remaining() == 0 {
                // The count fell short (a delivery settled since): count again rather
                // than pause as if nothing were left.
                let left = count().await?;
                if left == 0 {
                    break;
                }
                plan.recounted(left);
            }
            let share = plan.share(started.elapsed());
            plan.paced(share, report.busy);
            let pause = plan.pause(started.elapsed(), share, report.busy, elapsed);
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
        *lock(&self.cost) = plan.cost();
        summary.store_share_allowed = plan.share_allowed();
        summary.released_bytes = self
            .release_unneeded_space(free_at_start, stop.as_mut())
            .await?;
        summary.elapsed = started.elapsed();
        self.report(&summary);
        Ok(summary)
    }

    /// Returns the part of the free space `FreeSpaceMemory` decides on, in steps that
    /// keep the store busy for at most `RELEASE_STORE_SHARE` of the time.
    async fn release_unneeded_space(
        &self,
        free_at_start: u64,
        mut stop: Option<&mut watch::Receiver<bool>>,
    ) -> Result<u64, StoreError> {
        let space = self.store.storage_space().await?;
        let to_release = lock(&self.free_space).to_release(
            free_at_start,
            space.free_bytes,
            space.database_bytes,
        );
        let mut released = 0;
        while released < to_release {
            let sent = Instant::now();
            let step = RELEASE_STEP_BYTES.min(to_release - released);
            let freed = self.store.release_free_space(step).await?;
            released += freed;
            if freed < step {
                break;
            }
            // The store's busy time is the whole call here: it is one short write.
            let elapsed = sent.elapsed();
            let pause = pause_after(RELEASE_STORE_SHARE, elapsed, elapsed);
            if !pause_unless_stopped(pause, stop.as_deref_mut()).await {
                break;
            }
        }
        if released > 0 {
            lock(&self.free_space).released(released);
        }
        Ok(released)
    }

    fn report(&self, summary: &CleanupSummary) {
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
                jobs_past_retention = summary.n_jobs_eligible,
                jobs = summary.n_jobs_deleted,
                seconds = summary.elapsed.as_secs_f64(),
                store_busy_seconds = summary.busy.as_secs_f64(),
                store_share_allowed = summary.store_share_allowed,
                passes_behind,
                "cleanup cannot keep up with job creation: the pass used its time budget \
                 before it deleted the finished jobs past retention at its start; storage \
                 grows until passes catch up"
            );
        } else if summary.n_jobs_deleted > 0 || summary.released_bytes > 0 {
            tracing::info!(
                jobs = summary.n_jobs_deleted,
                files = summary.n_files_deleted,
                released_bytes = summary.released_bytes,
                seconds = summary.elapsed.as_secs_f64(),
                store_busy_seconds = summary.busy.as_secs_f64(),
                store_share_allowed = summary.store_share_allowed,
                "cleanup deleted finished jobs"
            );
        }
    }
}

/// The cleaner's state between passes, even after a panic while it was held (it is
/// plain numbers, whole after every write).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    const MB: u64 = 1024 * 1024;

    #[test]
    fn a_batch_is_followed_by_the_pause_that_keeps_its_share() {
        let busy = Duration::from_millis(10);
        // Answered at once: pause for the other 90 ms of the cycle.
        assert_eq!(pause_after(0.1, busy, busy), Duration::from_millis(90));
        // A batch that waited 40 ms in the writer's queue already paused that long.
        assert_eq!(
            pause_after(0.1, busy, Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(
            pause_after(0.1, busy, Duration::from_millis(500)),
            Duration::ZERO
        );
        assert_eq!(pause_after(1.0, busy, busy), Duration::ZERO);
        assert_eq!(pause_after(0.0, busy, busy), Duration::ZERO);
    }

    /// How a simulated pass went: the share after each batch, when it ended, and whether
    /// it deleted everything it counted within its budget.
    struct Simulated {
        shares: Vec<f64>,
        ended: Duration,
        caught_up: bool,
    }

    /// Runs a pass over `n_eligible` jobs in batches of `batch`, each job costing
    /// `cost(jobs deleted before it)` of store time, with batches answered at once,
    /// as the cleaner does (`Cleaner::cleanup_paced`; its recount finds nothing more).
    fn simulate(
        budget: Duration,
        n_eligible: u64,
        batch: u64,
        cost: impl Fn(u64) -> Duration,
    ) -> Simulated {
        let mut plan = PassPlan::new(
            Pacing::yielding(budget),
            n_eligible,
            CostEstimate::default(),
        );
        let (mut elapsed, mut deleted, mut shares) = (Duration::ZERO, 0, Vec::new());
        loop {
            let n = batch.min(plan.remaining());
            let busy = cost(deleted) * n as u32;
            elapsed += busy;
            deleted += n;
            plan.deleted(n as usize, busy);
            // A short batch ends the pass, and so does a recount that finds none left.
            if n < batch || plan.remaining() == 0 {
                return Simulated {
                    shares,
                    ended: elapsed,
                    caught_up: true,
                };
            }
            let share = plan.share(elapsed);
            shares.push(share);
            let pause = plan.pause(elapsed, share, busy, busy);
            if elapsed + pause >= budget {
                return Simulated {
                    shares,
                    ended: elapsed,
                    caught_up: false,
                };
            }
            elapsed += pause;
        }
    }

    fn micros(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_pass_spreads_its_work_evenly_over_most_of_its_budget() {
        // 27,000 jobs of 100 us: 2.7 s of store time over 27 s (90% of 30 s) is 10%.
        let pass = simulate(Duration::from_secs(30), 27_000, 100, |_| micros(100));
        assert!(pass.caught_up);
        assert!(
            pass.shares.iter().all(|share| (share - 0.1).abs() < 0.002),
            "{:?}",
            pass.shares
        );
        let ended = pass.ended.as_secs_f64();
        assert!((26.5..=27.5).contains(&ended), "ended after {ended} s");
    }

    #[test]
    fn a_pass_follows_a_change_in_the_cost_per_job() {
        // Halfway through, jobs take twice as long: the rest needs 20% to end in time.
        let pass = simulate(Duration::from_secs(30), 27_000, 100, |deleted| {
            micros(if deleted < 13_500 { 100 } else { 200 })
        });
        assert!(pass.caught_up);
        let ended = pass.ended.as_secs_f64();
        assert!((26.5..=27.5).contains(&ended), "ended after {ended} s");
        let before: Vec<f64> = pass.shares[..130].to_vec();
        assert!(
            before.iter().all(|share| (share - 0.1).abs() < 0.002),
            "{before:?}"
        );
        // The estimate follows within a few dozen batches; the rest runs evenly again.
        let late = &pass.shares[180..];
        let (low, high) = late.iter().fold((f64::MAX, 0f64), |(low, high), s| {
            (low.min(*s), high.max(*s))
        });
        assert!(low > 0.2 && high < 0.23, "{late:?}");
    }

    #[test]
    fn a_pass_with_too_much_to_do_takes_the_most_it_may_and_falls_behind() {
        // 100 s of store time cannot fit in 30% of 30 s.
        let pass = simulate(Duration::from_secs(30), 1_000_000, 100, |_| micros(100));
        assert!(!pass.caught_up);
        assert!(
            pass.shares.iter().all(|share| *share == MAX_STORE_SHARE),
            "{:?}",
            pass.shares
        );
        // It stops at the first pause that would cross its budget (a batch may end past it).
        let ended = pass.ended.as_secs_f64();
        assert!((29.5..=30.02).contains(&ended), "ended after {ended} s");
    }

    #[test]
    fn a_pass_with_little_to_do_takes_the_least_share() {
        // 300 jobs of 100 us: 30 ms over 27 s would be 0.1%.
        let pass = simulate(Duration::from_secs(30), 300, 100, |_| micros(100));
        assert!(pass.caught_up);
        assert_eq!(pass.shares, vec![MIN_STORE_SHARE; 2]);
        // Each 10 ms batch is followed by 990 ms; the last ends the pass.
        assert_eq!(pass.ended, Duration::from_millis(2_010));
    }

    #[test]
    fn a_pass_with_nothing_to_do_ends_after_one_empty_batch() {
        let pass = simulate(Duration::from_secs(30), 0, 100, |_| micros(100));
        assert!(pass.caught_up);
        assert!(pass.shares.is_empty());
        assert_eq!(pass.ended, Duration::ZERO);
        let mut plan = PassPlan::new(
            Pacing::yielding(Duration::from_secs(30)),
            0,
            CostEstimate::default(),
        );
        plan.deleted(0, Duration::from_millis(1));
        assert_eq!((plan.remaining(), plan.cost().per_job()), (0, None));
    }

    #[test]
    fn a_pass_starts_from_the_last_passes_cost_per_job() {
        // Earlier passes found 100 us per job; this pass's first batch is five times as
        // slow (a cold cache): the share moves by a fraction, not fivefold.
        let mut cost = CostEstimate::default();
        for _ in 0..100 {
            cost.observe(100, Duration::from_millis(10));
        }
        assert_eq!(cost.per_job(), Some(micros(100)));
        let pacing = Pacing::yielding(Duration::from_secs(30));
        let mut plan = PassPlan::new(pacing, 27_100, cost);
        plan.deleted(100, Duration::from_millis(50));
        let share = plan.share(Duration::from_millis(50));
        assert!((0.13..0.15).contains(&share), "{share}");
        let mut fresh = PassPlan::new(pacing, 27_100, CostEstimate::default());
        fresh.deleted(100, Duration::from_millis(50));
        assert_eq!(fresh.share(Duration::from_millis(50)), MAX_STORE_SHARE);
    }

    #[test]
    fn the_share_allowed_is_averaged_over_the_store_time_it_paced() {
        let pacing = Pacing::yielding(Duration::from_secs(30));
        let mut plan = PassPlan::new(pacing, 1_000, CostEstimate::default());
        assert_eq!(plan.share_allowed(), MIN_STORE_SHARE, "no paced batch yet");
        // One slow first batch at the most, then three at a tenth.
        plan.paced(MAX_STORE_SHARE, Duration::from_millis(10));
        for _ in 0..3 {
            plan.paced(0.1, Duration::from_millis(10));
        }
        assert!((plan.share_allowed() - 0.15).abs() < 1e-9);
    }

    #[test]
    fn the_rest_of_a_pass_smaller_than_a_batch_ends_within_the_spread() {
        // 1,000 jobs of 1 ms; the first batch took 900 of them, 1 s into the pass. The
        // 100 left count as a batch like it: 0.9 s over the 26 s left of the spread, so
        // the last batch starts by its end (counted as 100 jobs, the least share would
        // have paused 89 s).
        let pacing = Pacing::yielding(Duration::from_secs(30));
        let mut plan = PassPlan::new(pacing, 1_000, CostEstimate::default());
        let busy = Duration::from_millis(900);
        plan.deleted(900, busy);
        let elapsed = Duration::from_secs(1);
        let share = plan.share(elapsed);
        assert!((share - 0.9 / 26.0).abs() < 1e-9, "{share}");
        let pause = plan.pause(elapsed, share, busy, busy);
        assert_eq!(pause.as_millis(), 25_100);
        // A batch slower than the estimate is not followed by a pause past the spread.
        let (late, slow) = (Duration::from_secs(20), Duration::from_millis(1_500));
        let pause = plan.pause(late, plan.share(late), slow, slow);
        assert_eq!(pause, Duration::from_secs(7));
        // Past the spread, the pause still holds the batches to the most they may take.
        let past = Duration::from_secs(28);
        let pause = plan.pause(past, plan.share(past), busy, busy);
        assert_eq!(pause.as_millis(), 2_100);
    }

    #[test]
    fn a_recount_replaces_what_is_left() {
        let mut plan = PassPlan::new(
            Pacing::yielding(Duration::from_secs(30)),
            100,
            CostEstimate::default(),
        );
        plan.deleted(100, Duration::from_millis(10));
        assert_eq!(plan.remaining(), 0);
        plan.recounted(26_000);
        assert_eq!(plan.remaining(), 26_000);
        // 26,000 jobs of 100 us over the 26.99 s left of the spread: just under 10%.
        let share = plan.share(Duration::from_millis(10));
        assert!((share - 0.0963).abs() < 0.001, "{share}");
    }

    #[test]
    fn a_pass_past_its_spread_or_without_a_budget_takes_the_most_it_may() {
        let mut plan = PassPlan::new(
            Pacing::yielding(Duration::from_secs(30)),
            1_000,
            CostEstimate::default(),
        );
        assert_eq!(
            plan.share(Duration::ZERO),
            MAX_STORE_SHARE,
            "no estimate yet"
        );
        plan.deleted(100, Duration::from_millis(10));
        assert_eq!(plan.share(Duration::from_secs(27)), MAX_STORE_SHARE);
        let mut unpaced = PassPlan::new(Pacing::UNPACED, 0, CostEstimate::default());
        unpaced.deleted(100, Duration::from_millis(10));
        assert_eq!(unpaced.share(Duration::ZERO), 1.0);
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
    fn free_space_is_returned_only_after_ten_passes_and_a_tenth_at_a_time() {
        // The load stopped: 200 MB free at every pass in a file of 200 MB of rows plus the
        // free space, and no pass frees more.
        const ROWS: u64 = 200 * MB;
        let mut memory = FreeSpaceMemory::default();
        for _ in 0..FREE_SPACE_MEMORY - 1 {
            assert_eq!(memory.to_release(200 * MB, 200 * MB, ROWS + 200 * MB), 0);
        }
        let mut free = 200 * MB;
        let mut releases = Vec::new();
        for _ in 0..40 {
            let release = memory.to_release(free, free, ROWS + free);
            assert!(
                release <= (free / 10).max(RELEASE_STEP_BYTES),
                "{release} of {free}"
            );
            memory.released(release);
            free -= release;
            releases.push(release / MB);
        }
        assert_eq!(&releases[..4], &[20, 18, 16, 14]);
        // It stops once less than a quarter of the file is free: 200 MB of rows keep
        // about 67 MB free beside them.
        let file = ROWS + free;
        assert!(
            free < file / 4 && free + 2 * RELEASE_STEP_BYTES >= file / 4,
            "{free} free of {file}: {releases:?}"
        );
    }

    #[test]
    fn free_space_a_steady_load_reuses_stays() {
        // Each pass starts with 2 MB free and frees 40 MB, which the next interval's
        // jobs take again: nothing goes (the old rule returned the 2 MB every pass).
        let mut memory = FreeSpaceMemory::default();
        for _ in 0..30 {
            assert_eq!(memory.to_release(2 * MB, 42 * MB, 300 * MB), 0);
        }
        // Nor when more stays free at every pass than the reserve, as long as it is less
        // than a quarter of the file (the soak: releasing it under load cost throughput).
        let mut memory = FreeSpaceMemory::default();
        for _ in 0..30 {
            assert_eq!(memory.to_release(60 * MB, 65 * MB, 300 * MB), 0);
        }
    }

    #[test]
    fn free_space_keeps_a_reserve_of_what_recent_passes_freed() {
        let file = 400 * MB;
        let mut memory = FreeSpaceMemory::default();
        for _ in 0..FREE_SPACE_MEMORY - RESERVE_PASSES {
            memory.to_release(200 * MB, 200 * MB, file);
        }
        memory.to_release(200 * MB, 250 * MB, file);
        memory.to_release(200 * MB, 210 * MB, file);
        // 200 MB was never needed, but the last passes freed up to 50 MB: a tenth of 150.
        assert_eq!(memory.to_release(200 * MB, 200 * MB, file), 15 * MB);
        // Less than a step's worth goes at once.
        let mut small = FreeSpaceMemory::default();
        for _ in 0..FREE_SPACE_MEMORY {
            small.to_release(3 * MB, 3 * MB, 10 * MB);
        }
        let mut small_then = small.clone();
        assert_eq!(small_then.to_release(3 * MB, 3 * MB, 10 * MB), 3 * MB);
        // Never more than is free now.
        assert_eq!(small.to_release(3 * MB, MB, 10 * MB), MB);
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
