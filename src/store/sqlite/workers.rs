//! The worker registry on SQLite (`migrations/sqlite/0005_workers.sql`): a flushed batch is
//! one write of the single writer (one upsert per worker process inside it).

use rusqlite::{params, Connection, Row};

use super::SqliteStore;
use crate::clock::Timestamp;
use crate::store::workers::*;
use crate::store::{StoreError, StoreFuture};

/// The merge rule of `WorkerActivity::merge`, in SQL.
const UPSERT_SQL: &str = "INSERT INTO workers (worker_id, instance, content_types, poll_wait_ms, \
     last_poll_at, version, version_at, address, address_at, first_seen_at, last_seen_at, \
     sends_heartbeats, jobs_in_flight, n_completed, n_failed) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
     ON CONFLICT (worker_id, instance) DO UPDATE SET \
     content_types = CASE WHEN excluded.last_poll_at >= coalesce(workers.last_poll_at, excluded.last_poll_at) \
         THEN excluded.content_types ELSE workers.content_types END, \
     poll_wait_ms = CASE WHEN excluded.last_poll_at >= coalesce(workers.last_poll_at, excluded.last_poll_at) \
         THEN excluded.poll_wait_ms ELSE workers.poll_wait_ms END, \
     last_poll_at = max(coalesce(workers.last_poll_at, excluded.last_poll_at), coalesce(excluded.last_poll_at, workers.last_poll_at)), \
     version = CASE WHEN excluded.version_at >= coalesce(workers.version_at, excluded.version_at) \
         THEN excluded.version ELSE workers.version END, \
     version_at = max(coalesce(workers.version_at, excluded.version_at), coalesce(excluded.version_at, workers.version_at)), \
     address = CASE WHEN excluded.address_at >= coalesce(workers.address_at, excluded.address_at) \
         THEN excluded.address ELSE workers.address END, \
     address_at = max(coalesce(workers.address_at, excluded.address_at), coalesce(excluded.address_at, workers.address_at)), \
     first_seen_at = min(workers.first_seen_at, excluded.first_seen_at), \
     last_seen_at = max(workers.last_seen_at, excluded.last_seen_at), \
     sends_heartbeats = workers.sends_heartbeats OR excluded.sends_heartbeats, \
     jobs_in_flight = workers.jobs_in_flight + excluded.jobs_in_flight, \
     n_completed = workers.n_completed + excluded.n_completed, \
     n_failed = workers.n_failed + excluded.n_failed";

const WORKER_COLUMNS: &str = "worker_id, instance, content_types, poll_wait_ms, version, address, \
     first_seen_at, last_seen_at, sends_heartbeats, jobs_in_flight, n_completed, n_failed";

fn worker_record(row: &Row<'_>) -> rusqlite::Result<WorkerRecord> {
    Ok(WorkerRecord {
        worker_id: row.get(0)?,
        instance: row.get(1)?,
        content_types: content_types_from_text(row.get(2)?),
        poll_wait: std::time::Duration::from_millis(row.get::<_, i64>(3)?.max(0) as u64),
        version: row.get(4)?,
        address: row.get(5)?,
        first_seen_at: Timestamp::from_micros(row.get(6)?),
        last_seen_at: Timestamp::from_micros(row.get(7)?),
        sends_heartbeats: row.get(8)?,
        jobs_in_flight: row.get(9)?,
        n_completed: row.get::<_, i64>(10)?.max(0) as u64,
        n_failed: row.get::<_, i64>(11)?.max(0) as u64,
    })
}

fn record(conn: &Connection, params: RecordWorkerActivityParams) -> Result<(), StoreError> {
    let mut upsert = conn.prepare_cached(UPSERT_SQL)?;
    for activity in params.activities {
        let poll = activity.last_poll.as_ref();
        upsert.execute(params![
            activity.worker_id.as_str(),
            activity.instance,
            poll.map(|p| content_types_text(&p.content_types)),
            poll.map_or(0, |p| p.wait.as_millis() as i64),
            poll.map(|p| p.at.as_micros()),
            activity.version.as_ref().map(|(_, v)| v.as_str()),
            activity.version.as_ref().map(|(at, _)| at.as_micros()),
            activity.address.as_ref().map(|(_, a)| a.as_str()),
            activity.address.as_ref().map(|(at, _)| at.as_micros()),
            activity.first_seen_at.as_micros(),
            activity.last_seen_at.as_micros(),
            activity.sent_heartbeat,
            activity.jobs_in_flight_delta,
            activity.n_completed as i64,
            activity.n_failed as i64,
        ])?;
    }
    Ok(())
}

fn list(conn: &Connection, params: ListWorkersParams) -> Result<Vec<WorkerRecord>, StoreError> {
    let rows = conn
        .prepare_cached(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY last_seen_at DESC LIMIT ?1"
        ))?
        .query_map([params.limit as i64], worker_record)?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

fn delete_gone(conn: &Connection, params: DeleteGoneWorkersParams) -> Result<u64, StoreError> {
    let deleted = conn
        .prepare_cached(
            "DELETE FROM workers WHERE (worker_id, instance) IN \
             (SELECT worker_id, instance FROM workers WHERE last_seen_at < ?1 \
              ORDER BY last_seen_at LIMIT ?2)",
        )?
        .execute(params![
            params.last_seen_before.as_micros(),
            params.limit as i64
        ])?;
    Ok(deleted as u64)
}

impl WorkerRegistryStore for SqliteStore {
    fn record_worker_activity(&self, params: RecordWorkerActivityParams) -> StoreFuture<'_, ()> {
        self.write(move |conn| record(conn, params))
    }

    fn list_workers(&self, params: ListWorkersParams) -> StoreFuture<'_, Vec<WorkerRecord>> {
        self.read(move |conn| list(conn, params))
    }

    fn delete_gone_workers(&self, params: DeleteGoneWorkersParams) -> StoreFuture<'_, u64> {
        self.write(move |conn| delete_gone(conn, params))
    }
}
