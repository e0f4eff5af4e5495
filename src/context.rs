//! The state every request handler shares: the configuration, the store, the clock, the
//! long-poll wake-ups and the shutdown signal. It lives in its own module so that `app`
//! (the wiring) imports `api` and `monitor`, and neither of them imports `app`.

use std::sync::Arc;

use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::registry::WorkerRegistry;
use crate::store::Store;
use crate::wakeups::Wakeups;

/// What every request handler shares. Background services get only the parts they use.
pub struct AppContext {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// Wakes long-polling workers when a job may have become claimable.
    pub wakeups: Arc<Wakeups>,
    /// Becomes true when the server is shutting down; long polls return early.
    pub shutting_down: watch::Receiver<bool>,
    /// One permit per long poll allowed to wait at once (`MORAG_REMOTE_MAX_LONG_POLLS`).
    pub long_poll_slots: tokio::sync::Semaphore,
    /// The last write probe's outcome, so `/health` probes at most every few seconds.
    pub write_probe: std::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
    /// Delivers job outcomes to the configured sinks (runs in the background; cleanup, a
    /// redrive and tests also call it).
    pub dispatcher: Arc<crate::delivery::dispatcher::Dispatcher>,
    /// Worker activity gathered in memory until the next flush to the store.
    pub worker_registry: Arc<WorkerRegistry>,
    /// What the monitor's last retention cleanup did (for the statistics), and whether
    /// it keeps up with job creation.
    pub cleanup_progress: Arc<crate::monitor::CleanupProgress>,
}
