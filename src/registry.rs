//! The worker registry's in-memory side. Every poll, heartbeat, result and release notes
//! what it learned about its worker here, under one short lock and without any IO; a
//! background task flushes what gathered to the store once a second (and at shutdown) as
//! one write per batch (`WorkerRegistryStore::record_worker_activity`). So the hot path
//! pays a hash-map update per request, and the store one write per second however many
//! workers call.
//!
//! What a flush sends is the activity since the previous flush (counts as deltas), which
//! the store merges into each worker's record; several replicas can therefore flush for
//! the same worker without losing each other's counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::domain::{ContentType, WorkerId};
use crate::store::workers::{PollSeen, RecordWorkerActivityParams, WorkerActivity};
use crate::store::{Store, StoreError};

/// How often gathered activity is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Who made a request, as far as it says: the worker id, and what our worker (but not
/// MoRAG's client) sends in headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCaller {
    pub worker_id: WorkerId,
    /// Empty when the worker sends no instance id.
    pub instance: String,
    pub version: Option<String>,
    /// The address the request came from.
    pub address: Option<String>,
}

/// How a result request went, as far as the registry counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultSeen {
    /// A success was accepted.
    Completed,
    /// A failure was accepted.
    Failed,
    /// Refused because the worker no longer holds the job (stale lease, job moved on or
    /// gone): it is no longer in flight, and counts as neither.
    NotHeld,
}

type WorkerKey = (WorkerId, String);

/// Activity gathered since the last flush, per worker process.
pub struct WorkerRegistry {
    gathered: Mutex<HashMap<WorkerKey, WorkerActivity>>,
}

impl Default for WorkerRegistry {
    fn default() -> Self {
        WorkerRegistry {
            gathered: Mutex::new(HashMap::new()),
        }
    }
}

impl WorkerRegistry {
    /// Notes a contact from `caller` at `now` and lets `update` add what else it said.
    fn note(
        &self,
        caller: &WorkerCaller,
        now: Timestamp,
        update: impl FnOnce(&mut WorkerActivity),
    ) {
        let mut gathered = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
        let key = (caller.worker_id.clone(), caller.instance.clone());
        let activity = gathered.entry(key).or_insert_with(|| {
            WorkerActivity::new(caller.worker_id.clone(), caller.instance.clone(), now)
        });
        activity.first_seen_at = activity.first_seen_at.min(now);
        activity.last_seen_at = activity.last_seen_at.max(now);
        if let Some(version) = &caller.version {
            activity.version = Some((now, version.clone()));
        }
        if let Some(address) = &caller.address {
            activity.address = Some((now, address.clone()));
        }
        update(activity);
    }

    /// A poll for `content_types` (empty: any) that waited up to `wait`; `claimed` when it
    /// was answered with a job.
    pub fn polled(
        &self,
        caller: &WorkerCaller,
        content_types: &[ContentType],
        wait: Duration,
        claimed: bool,
        now: Timestamp,
    ) {
        self.note(caller, now, |activity| {
            activity.last_poll = Some(PollSeen {
                at: now,
                content_types: content_types.to_vec(),
                wait,
            });
            if claimed {
                activity.jobs_in_flight_delta += 1;
            }
        });
    }

    /// A heartbeat; `still_held` is false when the answer told the worker the job was
    /// cancelled.
    pub fn heartbeat(&self, caller: &WorkerCaller, still_held: bool, now: Timestamp) {
        self.note(caller, now, |activity| {
            activity.sent_heartbeat = true;
            if !still_held {
                activity.jobs_in_flight_delta -= 1;
            }
        });
    }

    pub fn result(&self, caller: &WorkerCaller, seen: ResultSeen, now: Timestamp) {
        self.note(caller, now, |activity| {
            activity.jobs_in_flight_delta -= 1;
            match seen {
                ResultSeen::Completed => activity.n_completed += 1,
                ResultSeen::Failed => activity.n_failed += 1,
                ResultSeen::NotHeld => {}
            }
        });
    }

    /// A release, accepted or refused: either way the worker no longer holds the job.
    pub fn released(&self, caller: &WorkerCaller, now: Timestamp) {
        self.note(caller, now, |activity| activity.jobs_in_flight_delta -= 1);
    }

    /// Writes what gathered since the last flush as one batch. When the write fails, the
    /// batch is merged back, to go with the next flush.
    pub async fn flush(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let batch: Vec<WorkerActivity> = {
            let mut gathered = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
            if gathered.is_empty() {
                return Ok(0);
            }
            std::mem::take(&mut *gathered).into_values().collect()
        };
        let n_workers = batch.len();
        let written = store
            .record_worker_activity(RecordWorkerActivityParams {
                activities: batch.clone(),
            })
            .await;
        if let Err(error) = written {
            let mut gathered = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
            for activity in batch {
                let key = (activity.worker_id.clone(), activity.instance.clone());
                match gathered.remove(&key) {
                    Some(newer) => {
                        let mut merged = activity;
                        merged.merge(newer);
                        gathered.insert(key, merged);
                    }
                    None => {
                        gathered.insert(key, activity);
                    }
                }
            }
            return Err(error);
        }
        Ok(n_workers)
    }

    /// Flushes every `FLUSH_INTERVAL` until `shutdown` turns true, then once more.
    pub async fn run(&self, store: Arc<dyn Store>, shutdown: &mut watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
                _ = shutdown.wait_for(|stop| *stop) => true,
            };
            match self.flush(store.as_ref()).await {
                Ok(_) => failing = false,
                Err(error) => {
                    // Once per outage: the batch is kept and retried every second.
                    if !failing {
                        tracing::warn!(%error, "cannot write the worker registry; keeping its updates for the next flush");
                    }
                    failing = true;
                }
            }
            if stopping {
                return;
            }
        }
    }
}
