//! The worker registry part of the storage interface: one record per worker process
//! (worker id and instance), merged from batches of activity that each replica collects in
//! memory (`registry`) and flushes as one write.
//!
//! Merging, not replacing, is what lets several replicas flush for the same worker: the
//! first and last contact are the least and the greatest seen, counts add, and the
//! descriptive fields (content types, poll wait, version, address) come from the latest
//! contact that carried them. `WorkerActivity::merge` is that rule in memory; each
//! backend's upsert is the same rule in SQL, and the conformance cases check the two agree.

use std::time::Duration;

use super::StoreFuture;
use crate::clock::Timestamp;
use crate::domain::{ContentType, WorkerContact, WorkerId};

/// The most content types kept per worker record.
pub const MAX_RECORDED_CONTENT_TYPES: usize = 64;

/// What a worker's poll said about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollSeen {
    pub at: Timestamp,
    /// Empty: any type.
    pub content_types: Vec<ContentType>,
    /// How long the poll was willing to wait for a job.
    pub wait: Duration,
}

/// What one replica saw of one worker process since its last flush.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerActivity {
    pub worker_id: WorkerId,
    /// The process's instance id (new at each start), or empty when it sends none, as
    /// MoRAG's remote-converter does.
    pub instance: String,
    pub first_seen_at: Timestamp,
    pub last_seen_at: Timestamp,
    /// The latest poll, if any came.
    pub last_poll: Option<PollSeen>,
    /// The latest version it announced, and when.
    pub version: Option<(Timestamp, String)>,
    /// The latest address it called from, and when.
    pub address: Option<(Timestamp, String)>,
    pub sent_heartbeat: bool,
    /// Claims minus jobs it finished, released or was told it no longer holds.
    pub jobs_in_flight_delta: i64,
    pub n_completed: u64,
    pub n_failed: u64,
}

impl WorkerActivity {
    /// Nothing seen yet of this worker process, at `now`.
    pub fn new(worker_id: WorkerId, instance: String, now: Timestamp) -> Self {
        WorkerActivity {
            worker_id,
            instance,
            first_seen_at: now,
            last_seen_at: now,
            last_poll: None,
            version: None,
            address: None,
            sent_heartbeat: false,
            jobs_in_flight_delta: 0,
            n_completed: 0,
            n_failed: 0,
        }
    }

    /// Folds `other` (activity of the same worker process) into this one, by the same rule
    /// the stores apply when they merge a flushed batch into a record.
    pub fn merge(&mut self, other: WorkerActivity) {
        debug_assert!(self.worker_id == other.worker_id && self.instance == other.instance);
        self.first_seen_at = self.first_seen_at.min(other.first_seen_at);
        self.last_seen_at = self.last_seen_at.max(other.last_seen_at);
        self.last_poll = latest(self.last_poll.take(), other.last_poll, |poll| poll.at);
        self.version = latest(self.version.take(), other.version, |(at, _)| *at);
        self.address = latest(self.address.take(), other.address, |(at, _)| *at);
        self.sent_heartbeat |= other.sent_heartbeat;
        self.jobs_in_flight_delta += other.jobs_in_flight_delta;
        self.n_completed += other.n_completed;
        self.n_failed += other.n_failed;
    }
}

/// The later of two optional observations (the second on a tie: it arrived later).
fn latest<T>(current: Option<T>, other: Option<T>, at: impl Fn(&T) -> Timestamp) -> Option<T> {
    match (current, other) {
        (Some(current), Some(other)) => Some(if at(&other) >= at(&current) {
            other
        } else {
            current
        }),
        (current, other) => other.or(current),
    }
}

/// A worker process as the registry stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRecord {
    pub worker_id: String,
    /// Empty when the worker sends no instance id.
    pub instance: String,
    /// From its latest poll: empty means any type; `None` when it never polled.
    pub content_types: Option<Vec<String>>,
    pub poll_wait: Duration,
    pub version: Option<String>,
    pub address: Option<String>,
    pub first_seen_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub sends_heartbeats: bool,
    pub jobs_in_flight: i64,
    pub n_completed: u64,
    pub n_failed: u64,
}

impl WorkerRecord {
    /// What the health judgement (`domain::worker_health`) needs.
    pub fn contact(&self) -> WorkerContact {
        WorkerContact {
            last_seen_at: self.last_seen_at,
            poll_wait: self.poll_wait,
            jobs_in_flight: self.jobs_in_flight,
            sends_heartbeats: self.sends_heartbeats,
        }
    }
}

/// A batch of activity to merge into the records, at most one entry per worker process.
#[derive(Clone, Debug)]
pub struct RecordWorkerActivityParams {
    pub activities: Vec<WorkerActivity>,
}

/// Worker records, most recently seen first.
#[derive(Clone, Debug)]
pub struct ListWorkersParams {
    pub limit: usize,
}

/// Deletes the records of workers not seen since `last_seen_before`.
#[derive(Clone, Debug)]
pub struct DeleteGoneWorkersParams {
    pub last_seen_before: Timestamp,
    pub limit: usize,
}

/// The worker registry half of the `Store` trait; cases in
/// `tests/it/worker_registry_conformance.rs`.
pub trait WorkerRegistryStore {
    /// Merges the batch into the worker records (creating those not seen before) in one
    /// write: least first contact, greatest last contact, counts added, descriptive
    /// fields from the latest contact that carried them.
    fn record_worker_activity(&self, params: RecordWorkerActivityParams) -> StoreFuture<'_, ()>;
    fn list_workers(&self, params: ListWorkersParams) -> StoreFuture<'_, Vec<WorkerRecord>>;
    /// Deletes at most `limit` records of workers gone since before the cutoff; returns
    /// how many.
    fn delete_gone_workers(&self, params: DeleteGoneWorkersParams) -> StoreFuture<'_, u64>;
}

/// The stored form of a content type list: comma-separated (content types contain no
/// commas), empty for any type.
pub fn content_types_text(content_types: &[ContentType]) -> String {
    content_types
        .iter()
        .take(MAX_RECORDED_CONTENT_TYPES)
        .map(ContentType::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// The list `content_types_text` stored.
pub fn content_types_from_text(text: Option<String>) -> Option<Vec<String>> {
    text.map(|text| {
        text.split(',')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_micros(1_800_000_000_000_000 + secs * 1_000_000)
    }

    #[test]
    fn merging_keeps_the_extremes_adds_counts_and_takes_the_latest_descriptions() {
        let worker = WorkerId::parse("gpu").unwrap();
        let mut earlier = WorkerActivity::new(worker.clone(), "i".into(), at(10));
        earlier.last_seen_at = at(20);
        earlier.last_poll = Some(PollSeen {
            at: at(20),
            content_types: vec![ContentType::parse("audio").unwrap()],
            wait: Duration::from_secs(30),
        });
        earlier.version = Some((at(10), "1.0".into()));
        earlier.jobs_in_flight_delta = 2;
        earlier.n_completed = 1;
        let mut later = WorkerActivity::new(worker, "i".into(), at(5));
        later.last_seen_at = at(15);
        later.version = Some((at(15), "1.1".into()));
        later.sent_heartbeat = true;
        later.jobs_in_flight_delta = -1;
        later.n_failed = 3;
        earlier.merge(later);
        assert_eq!(
            (earlier.first_seen_at, earlier.last_seen_at),
            (at(5), at(20))
        );
        assert_eq!(earlier.last_poll.as_ref().unwrap().at, at(20));
        assert_eq!(earlier.version, Some((at(15), "1.1".into())));
        assert!(earlier.sent_heartbeat);
        assert_eq!(
            (
                earlier.jobs_in_flight_delta,
                earlier.n_completed,
                earlier.n_failed
            ),
            (1, 1, 3)
        );
    }

    #[test]
    fn content_type_lists_round_trip_and_tell_any_from_never_polled() {
        let types = [
            ContentType::parse("audio").unwrap(),
            ContentType::parse("video").unwrap(),
        ];
        let text = content_types_text(&types);
        assert_eq!(
            content_types_from_text(Some(text)),
            Some(vec!["audio".to_owned(), "video".to_owned()])
        );
        assert_eq!(content_types_from_text(Some(String::new())), Some(vec![]));
        assert_eq!(content_types_from_text(None), None);
    }
}
