//! The worker registry on PostgreSQL (`migrations/postgres/0007_workers.sql`). A flushed
//! batch is one statement over arrays. Several replicas may flush for the same worker at
//! once: the upsert merges (the rule of `WorkerActivity::merge`) instead of overwriting,
//! and each batch is sorted by key so that two overlapping batches lock their rows in the
//! same order and never deadlock.

use tokio_postgres::Row;

use super::pool::Conn;
use super::{get, pg_error, PostgresStore};
use crate::clock::Timestamp;
use crate::store::workers::*;
use crate::store::{StoreError, StoreFuture};

const UPSERT_SQL: &str = "INSERT INTO workers AS w (worker_id, instance, content_types, poll_wait_ms, \
     last_poll_at, version, version_at, address, address_at, first_seen_at, last_seen_at, \
     sends_heartbeats, jobs_in_flight, n_completed, n_failed) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[], \
         $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::bool[], $13::int8[], \
         $14::int8[], $15::int8[]) \
     ON CONFLICT (worker_id, instance) DO UPDATE SET \
     content_types = CASE WHEN excluded.last_poll_at >= coalesce(w.last_poll_at, excluded.last_poll_at) \
         THEN excluded.content_types ELSE w.content_types END, \
     poll_wait_ms = CASE WHEN excluded.last_poll_at >= coalesce(w.last_poll_at, excluded.last_poll_at) \
         THEN excluded.poll_wait_ms ELSE w.poll_wait_ms END, \
     last_poll_at = greatest(w.last_poll_at, excluded.last_poll_at), \
     version = CASE WHEN excluded.version_at >= coalesce(w.version_at, excluded.version_at) \
         THEN excluded.version ELSE w.version END, \
     version_at = greatest(w.version_at, excluded.version_at), \
     address = CASE WHEN excluded.address_at >= coalesce(w.address_at, excluded.address_at) \
         THEN excluded.address ELSE w.address END, \
     address_at = greatest(w.address_at, excluded.address_at), \
     first_seen_at = least(w.first_seen_at, excluded.first_seen_at), \
     last_seen_at = greatest(w.last_seen_at, excluded.last_seen_at), \
     sends_heartbeats = w.sends_heartbeats OR excluded.sends_heartbeats, \
     jobs_in_flight = w.jobs_in_flight + excluded.jobs_in_flight, \
     n_completed = w.n_completed + excluded.n_completed, \
     n_failed = w.n_failed + excluded.n_failed";

const WORKER_COLUMNS: &str = "worker_id, instance, content_types, poll_wait_ms, version, address, \
     first_seen_at, last_seen_at, sends_heartbeats, jobs_in_flight, n_completed, n_failed";

fn worker_record(row: &Row) -> Result<WorkerRecord, StoreError> {
    Ok(WorkerRecord {
        worker_id: get(row, 0)?,
        instance: get(row, 1)?,
        content_types: content_types_from_text(get(row, 2)?),
        poll_wait: std::time::Duration::from_millis(get::<i64>(row, 3)?.max(0) as u64),
        version: get(row, 4)?,
        address: get(row, 5)?,
        first_seen_at: Timestamp::from_micros(get(row, 6)?),
        last_seen_at: Timestamp::from_micros(get(row, 7)?),
        sends_heartbeats: get(row, 8)?,
        jobs_in_flight: get(row, 9)?,
        n_completed: get::<i64>(row, 10)?.max(0) as u64,
        n_failed: get::<i64>(row, 11)?.max(0) as u64,
    })
}

async fn record(conn: &mut Conn, params: RecordWorkerActivityParams) -> Result<(), StoreError> {
    let mut activities = params.activities;
    if activities.is_empty() {
        return Ok(());
    }
    activities.sort_by(|a, b| {
        (a.worker_id.as_str(), a.instance.as_str())
            .cmp(&(b.worker_id.as_str(), b.instance.as_str()))
    });
    let column = |f: &dyn Fn(&WorkerActivity) -> Option<i64>| -> Vec<Option<i64>> {
        activities.iter().map(f).collect()
    };
    let worker_ids: Vec<&str> = activities.iter().map(|a| a.worker_id.as_str()).collect();
    let instances: Vec<&str> = activities.iter().map(|a| a.instance.as_str()).collect();
    let content_types: Vec<Option<String>> = activities
        .iter()
        .map(|a| {
            a.last_poll
                .as_ref()
                .map(|p| content_types_text(&p.content_types))
        })
        .collect();
    let poll_waits = column(&|a| {
        Some(
            a.last_poll
                .as_ref()
                .map_or(0, |p| p.wait.as_millis() as i64),
        )
    });
    let poll_ats = column(&|a| a.last_poll.as_ref().map(|p| p.at.as_micros()));
    let versions: Vec<Option<&str>> = activities
        .iter()
        .map(|a| a.version.as_ref().map(|(_, v)| v.as_str()))
        .collect();
    let version_ats = column(&|a| a.version.as_ref().map(|(at, _)| at.as_micros()));
    let addresses: Vec<Option<&str>> = activities
        .iter()
        .map(|a| a.address.as_ref().map(|(_, v)| v.as_str()))
        .collect();
    let address_ats = column(&|a| a.address.as_ref().map(|(at, _)| at.as_micros()));
    let first_seen = column(&|a| Some(a.first_seen_at.as_micros()));
    let last_seen = column(&|a| Some(a.last_seen_at.as_micros()));
    let heartbeats: Vec<bool> = activities.iter().map(|a| a.sent_heartbeat).collect();
    let in_flight = column(&|a| Some(a.jobs_in_flight_delta));
    let completed = column(&|a| Some(a.n_completed as i64));
    let failed = column(&|a| Some(a.n_failed as i64));
    let statement = conn.statement(UPSERT_SQL).await?;
    conn.client
        .execute(
            &statement,
            &[
                &worker_ids,
                &instances,
                &content_types,
                &poll_waits,
                &poll_ats,
                &versions,
                &version_ats,
                &addresses,
                &address_ats,
                &first_seen,
                &last_seen,
                &heartbeats,
                &in_flight,
                &completed,
                &failed,
            ],
        )
        .await
        .map_err(pg_error)?;
    Ok(())
}

async fn list(conn: &mut Conn, params: ListWorkersParams) -> Result<Vec<WorkerRecord>, StoreError> {
    let statement = conn
        .statement(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY last_seen_at DESC LIMIT $1"
        ))
        .await?;
    let rows = conn
        .client
        .query(&statement, &[&(params.limit as i64)])
        .await
        .map_err(pg_error)?;
    rows.iter().map(worker_record).collect()
}

async fn delete_gone(conn: &mut Conn, params: DeleteGoneWorkersParams) -> Result<u64, StoreError> {
    // SKIP LOCKED: a record a replica is flushing into right now was just seen anyway.
    let statement = conn
        .statement(
            "DELETE FROM workers WHERE (worker_id, instance) IN \
             (SELECT worker_id, instance FROM workers WHERE last_seen_at < $1 \
              ORDER BY last_seen_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             AND last_seen_at < $1",
        )
        .await?;
    conn.client
        .execute(
            &statement,
            &[&params.last_seen_before.as_micros(), &(params.limit as i64)],
        )
        .await
        .map_err(pg_error)
}

impl WorkerRegistryStore for PostgresStore {
    fn record_worker_activity(&self, params: RecordWorkerActivityParams) -> StoreFuture<'_, ()> {
        self.run(move |c| Box::pin(record(c, params)))
    }

    fn list_workers(&self, params: ListWorkersParams) -> StoreFuture<'_, Vec<WorkerRecord>> {
        self.run(move |c| Box::pin(list(c, params)))
    }

    fn delete_gone_workers(&self, params: DeleteGoneWorkersParams) -> StoreFuture<'_, u64> {
        self.run(move |c| Box::pin(delete_gone(c, params)))
    }
}
