//! The embedded store: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that owns the only writing connection. It
//! takes every write waiting in its queue, runs each inside its own savepoint of one
//! transaction, commits once, and only then answers the callers (group commit). SQLite
//! allows one writer at a time anyway; batching turns that limit into throughput. Reads
//! run on a small pool of read-only connections, which WAL lets proceed beside the writer.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

mod ops;
mod readers;
mod workers;
mod writer;

use self::ops::*;
use self::readers::ReaderPool;
use self::writer::{writer_loop, Checkpointer, Finisher, QueuedWrite, WriteJob};
use super::*;

mod idempotent_create;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_jobs.sql"),
    include_str!("../../migrations/sqlite/0002_write_probe.sql"),
    include_str!("../../migrations/sqlite/0003_deliveries.sql"),
    include_str!("../../migrations/sqlite/0004_idempotent_creates.sql"),
    include_str!("../../migrations/sqlite/0005_workers.sql"),
    include_str!("../../migrations/sqlite/0006_lean_deliveries.sql"),
];

#[path = "sqlite_deliveries.rs"]
mod deliveries;

/// WAL pages after which the writer checkpoints inside its own commit, as SQLite's
/// automatic checkpoint does (its default is 1,000). The checkpointer thread normally keeps
/// the log much shorter; this bounds it (to about 40 MB) when writes never pause long enough
/// for the log to restart, which needs a checkpoint with no write in between.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// The WAL file is truncated back to this size whenever a checkpoint lets the log start
/// over (`journal_size_limit`): without it the file keeps the size of its longest burst.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

pub use super::Durability;

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub path: PathBuf,
    pub durability: Durability,
}

pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<QueuedWrite>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReaderPool>,
    path: PathBuf,
    /// Bumped after a commit that may have recorded a hand-off: wakes the dispatcher.
    handoffs_committed: tokio::sync::watch::Sender<u64>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and runs pending migrations.
    pub fn open(options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = options.path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Internal(format!("create {parent:?}: {e}")))?;
        }
        let mut conn = Connection::open(&options.path).map_err(sql_error)?;
        configure(&conn, options.durability).map_err(sql_error)?;
        use_incremental_auto_vacuum(&conn)?;
        migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(sql_error)?;
        let checkpointer = Checkpointer::start(&options.path, options.durability)?;

        let (sender, receiver) = mpsc::channel::<QueuedWrite>();
        let writer_thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, receiver, checkpointer))
            .map_err(|e| StoreError::Internal(format!("spawn writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(sender)),
            writer_thread: Mutex::new(Some(writer_thread)),
            readers: Arc::new(ReaderPool {
                path: options.path.clone(),
                idle: Mutex::new(Vec::new()),
            }),
            path: options.path,
            handoffs_committed: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `operation` on the writer thread inside the next group commit, and answers
    /// once that commit is durable (per the configured durability).
    fn write<T, F>(&self, operation: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue_write(operation, false)
    }

    /// Runs maintenance `operation` on the writer thread in a transaction of its own,
    /// after the requests' writes queued with it (see `writer::QueuedWrite`).
    fn write_in_background<T, F>(&self, operation: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue_write(operation, true)
    }

    fn queue_write<T, F>(&self, operation: F, background: bool) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
        let job: WriteJob = Box::new(move |conn| {
            let result = operation(conn);
            let ok = result.is_ok();
            let finish: Finisher = Box::new(move |commit_error| {
                let _ = reply.send(match commit_error {
                    Some(error) => Err(error),
                    None => result,
                });
            });
            (finish, ok)
        });
        let sent = match self.writer.lock().expect("writer lock").as_ref() {
            Some(sender) => sender.send(QueuedWrite { job, background }).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            answer
                .await
                .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
        })
    }

    /// Wakes the dispatcher once `work` committed, when `recorded_handoff` says it may have
    /// written a hand-off.
    fn signal_handoffs_after<'s, T: Send + 's>(
        &'s self,
        work: StoreFuture<'s, T>,
        recorded_handoff: fn(&T) -> bool,
    ) -> StoreFuture<'s, T> {
        Box::pin(async move {
            let result = work.await?;
            if recorded_handoff(&result) {
                self.handoffs_committed.send_modify(|n| *n += 1);
            }
            Ok(result)
        })
    }

    fn read<T, F>(&self, operation: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = pool.take()?;
                let result = operation(&conn);
                pool.give_back(conn);
                result
            })
            .await
            .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
        })
    }
}

fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "cache_size", -65536)?; // 64 MiB
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
    Ok(())
}

/// Makes the database reuse and return freed pages (`auto_vacuum = INCREMENTAL`): the
/// cleaner then hands pages that stayed free back to the file system with `PRAGMA
/// incremental_vacuum` (`release_free_space`). A new database gets the setting before
/// its first table, while rewriting it costs nothing. A database created before this
/// version is rewritten once by `VACUUM` (logged; it takes about as long as copying the
/// file and needs that much free disk space).
fn use_incremental_auto_vacuum(conn: &Connection) -> Result<(), StoreError> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |row| row.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
    conn.pragma_update(None, "auto_vacuum", INCREMENTAL)?;
    if tables == 0 {
        // Switching to WAL already wrote the file's first page, so even an empty
        // database takes the setting only through a VACUUM (instant while empty).
        conn.execute_batch("VACUUM")?;
    } else {
        let started = std::time::Instant::now();
        tracing::info!(
            "converting the database to incremental auto-vacuum (a one-time VACUUM that rewrites the file)"
        );
        conn.execute_batch("VACUUM")?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "the database now returns free pages to the file system"
        );
    }
    Ok(())
}

/// Brings the schema of the file at `options.path` up to date without starting a store.
pub fn migrate_file(options: &SqliteOptions) -> Result<super::MigrationReport, StoreError> {
    if let Some(parent) = options.path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::Internal(format!("create {parent:?}: {e}")))?;
    }
    let mut conn = Connection::open(&options.path).map_err(sql_error)?;
    configure(&conn, options.durability).map_err(sql_error)?;
    use_incremental_auto_vacuum(&conn)?;
    migrate(&mut conn)
}

fn migrate(conn: &mut Connection) -> Result<super::MigrationReport, StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sql_error)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(sql_error)?;
        tx.execute_batch(migration).map_err(sql_error)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(sql_error)?;
        tx.commit().map_err(sql_error)?;
    }
    Ok(super::MigrationReport {
        from_version: found,
        to_version: known,
    })
}

fn sql_error(error: rusqlite::Error) -> StoreError {
    match &error {
        // Busy, and what the disk or the file system refuses (I/O error, disk full,
        // read-only, cannot open): not the caller's fault, and may pass.
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::PermissionDenied
            ) =>
        {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        sql_error(error)
    }
}

impl Store for SqliteStore {
    fn create_job(&self, params: CreateJobParams) -> StoreFuture<'_, Job> {
        self.write(move |conn| create(conn, params))
    }

    fn create_job_once(&self, params: CreateOnceParams) -> StoreFuture<'_, CreateOnceOutcome> {
        self.write(move |conn| idempotent_create::create_once(conn, params))
    }

    fn claim_job(&self, params: ClaimParams) -> StoreFuture<'_, Option<Job>> {
        self.write(move |conn| claim(conn, params))
    }

    fn heartbeat(&self, params: HeartbeatParams) -> StoreFuture<'_, HeartbeatOutcome> {
        self.write(move |conn| heartbeat(conn, params))
    }

    fn submit_result(&self, params: SubmitResultParams) -> StoreFuture<'_, Job> {
        let work = self.write(move |conn| submit_result(conn, params));
        self.signal_handoffs_after(work, |job| plan::result_hands_off(job.status))
    }

    fn release_job(&self, params: ReleaseParams) -> StoreFuture<'_, Job> {
        self.write(move |conn| release(conn, params))
    }

    fn cancel_job(&self, params: CancelParams) -> StoreFuture<'_, Job> {
        let work = self.write(move |conn| cancel(conn, params));
        self.signal_handoffs_after(work, |_| true)
    }

    fn retry_job(&self, params: ManualRetryParams) -> StoreFuture<'_, Job> {
        self.write(move |conn| manual_retry(conn, params))
    }

    fn rescue_expired(&self, params: RescueParams) -> StoreFuture<'_, RescueReport> {
        let work = self.write(move |conn| rescue(conn, params));
        self.signal_handoffs_after(work, plan::rescue_hands_off)
    }

    fn next_deadline(&self) -> StoreFuture<'_, Option<Timestamp>> {
        self.read(|conn| {
            let next: Option<i64> = conn
                .prepare_cached(NEXT_DEADLINE_SQL)?
                .query_row([], |row| row.get(0))
                .optional()?;
            Ok(next.map(Timestamp::from_micros))
        })
    }

    fn cleanup_finished(&self, params: CleanupParams) -> StoreFuture<'_, CleanupReport> {
        self.write_in_background(move |conn| {
            let started = std::time::Instant::now();
            let mut report = cleanup(conn, params)?;
            report.busy = started.elapsed();
            Ok(report)
        })
    }

    fn count_cleanable(&self, params: CountCleanableParams) -> StoreFuture<'_, u64> {
        self.read(move |conn| count_cleanable(conn, params))
    }

    fn storage_space(&self) -> StoreFuture<'_, StorageSpace> {
        self.read(storage_space)
    }

    fn release_free_space(&self, max_bytes: u64) -> StoreFuture<'_, u64> {
        self.write_in_background(move |conn| release_free_space(conn, max_bytes))
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        self.read(move |conn| Ok(select_job_by_id(conn, id)?.map(|(_, job)| job)))
    }

    fn get_job_detail(&self, id: JobId) -> StoreFuture<'_, Option<JobDetail>> {
        self.read(move |conn| {
            // One read transaction, so the job and its history agree.
            conn.execute_batch("BEGIN")?;
            let result = (|| {
                let Some((seq, job, result)) = select_job_and_result(conn, id)? else {
                    return Ok(None);
                };
                Ok(Some(JobDetail {
                    job,
                    result,
                    history: history_of(conn, seq)?,
                }))
            })();
            conn.execute_batch("COMMIT")?;
            result
        })
    }

    fn list_jobs(&self, params: ListParams) -> StoreFuture<'_, JobPage> {
        self.read(move |conn| list(conn, params))
    }

    fn statistics(&self, now: Timestamp) -> StoreFuture<'_, Statistics> {
        let path = self.path.clone();
        self.read(move |conn| statistics(conn, &path, now))
    }

    fn pending_handoffs(&self, limit: usize) -> StoreFuture<'_, Vec<Handoff>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, job_id, kind, payload, created_at FROM handoffs h WHERE fanned_out_at IS NULL \
                 OR EXISTS (SELECT 1 FROM deliveries d WHERE d.handoff_id = h.id AND d.state <> 'delivered') \
                 ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |row| {
                let job_id: String = row.get(1)?;
                let kind: String = row.get(2)?;
                let payload: String = row.get(3)?;
                Ok(Handoff {
                    id: row.get(0)?,
                    job_id: JobId::parse(&job_id).map_err(|_| corrupt("job id", &job_id))?,
                    kind: [HandoffKind::Completed, HandoffKind::Failed, HandoffKind::Cancelled]
                        .into_iter()
                        .find(|k| k.as_str() == kind)
                        .ok_or_else(|| corrupt("hand-off kind", &kind))?,
                    payload: serde_json::from_str(&payload).map_err(|_| corrupt("hand-off payload", &payload))?,
                    created_at: Timestamp::from_micros(row.get(4)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn import_job(&self, params: ImportJobParams) -> StoreFuture<'_, ImportOutcome> {
        self.write(move |conn| import(conn, params))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    fn probe_write(&self, now: Timestamp) -> StoreFuture<'_, ()> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO write_probe (id, written_at, writes) VALUES (1, ?1, 1) \
                 ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at, \
                 writes = write_probe.writes + 1",
            )?
            .execute([now.as_micros()])?;
            Ok(())
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        let sender = self.writer.lock().expect("writer lock").take();
        let thread = self
            .writer_thread
            .lock()
            .expect("writer thread lock")
            .take();
        Box::pin(async move {
            drop(sender);
            if let Some(thread) = thread {
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .map_err(|e| StoreError::Internal(e.to_string()))?
                    .map_err(|_| {
                        StoreError::Internal("the sqlite writer thread panicked".into())
                    })?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str, params: &[&dyn rusqlite::ToSql]) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params, |row| row.get::<_, String>(3))
            .unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    }

    /// The hot queries must be index range scans, never a scan of the jobs table or a
    /// sort: that is what keeps their cost flat as the table grows.
    #[test]
    fn hot_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("plan.sqlite3")).unwrap();
        migrate(&mut conn).unwrap();
        let cases: [(&str, &[&dyn rusqlite::ToSql], &str); 7] = [
            (CLAIM_PROBE_SQL, &[&"audio", &0i64], "jobs_queue"),
            (
                super::deliveries::CLAIM_DELIVERIES_SQL,
                &[&"token", &0i64, &0i64, &10i64],
                "deliveries_due",
            ),
            (
                super::deliveries::NEXT_DELIVERY_DUE_SQL,
                &[],
                "deliveries_due",
            ),
            (RESCUE_SCAN_SQL, &[&0i64, &10i64], "jobs_deadline"),
            (NEXT_DEADLINE_SQL, &[], "jobs_deadline"),
            (
                CLEANUP_SCAN_SQL,
                &[&"completed", &0i64, &10i64],
                "jobs_finished",
            ),
            // A cleanup pass counts its work first: it reads only the jobs it will delete.
            (COUNT_CLEANABLE_SQL, &[&"completed", &0i64], "jobs_finished"),
        ];
        for (sql, params, index) in cases {
            let plan = plan(&conn, sql, params);
            assert!(
                format!("{plan} ").contains(&format!("INDEX {index} ")),
                "{sql}\n{plan}"
            );
            assert!(
                !plan.contains("SCAN jobs")
                    && !plan
                        .replace("SCAN deliveries USING", "")
                        .contains("SCAN deliveries")
                    && !plan.contains("TEMP B-TREE"),
                "{sql}\n{plan}"
            );
        }
    }

    fn auto_vacuum_mode(path: &Path) -> i64 {
        let conn = Connection::open(path).unwrap();
        conn.pragma_query_value(None, "auto_vacuum", |row| row.get(0))
            .unwrap()
    }

    /// New databases reuse and return freed pages from the start; a database made by an
    /// earlier version is converted once when opened; freed pages are then released.
    #[test]
    fn databases_use_incremental_auto_vacuum_and_release_free_pages() {
        let dir = tempfile::tempdir().unwrap();
        let options = |name: &str| SqliteOptions {
            path: dir.path().join(name),
            durability: Durability::Normal,
        };
        let fresh = options("fresh.sqlite3");
        drop(SqliteStore::open(fresh.clone()).unwrap());
        assert_eq!(auto_vacuum_mode(&fresh.path), 2, "INCREMENTAL");

        // An earlier version's database: tables made without auto-vacuum, and rows.
        let old = options("old.sqlite3");
        let mut conn = Connection::open(&old.path).unwrap();
        configure(&conn, Durability::Normal).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "CREATE TABLE filler (x TEXT); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
             INSERT INTO filler SELECT hex(randomblob(500)) FROM n;",
        )
        .unwrap();
        drop(conn);
        assert_eq!(auto_vacuum_mode(&old.path), 0, "NONE");
        migrate_file(&old).unwrap();
        assert_eq!(auto_vacuum_mode(&old.path), 2, "converted");

        let conn = Connection::open(&old.path).unwrap();
        conn.execute_batch("DELETE FROM filler").unwrap();
        let space = storage_space(&conn).unwrap();
        assert!(space.free_bytes > 1_000_000, "{space:?}");
        let released = release_free_space(&conn, 400 * 1024).unwrap();
        assert_eq!(released, 400 * 1024, "at most what was asked");
        let released_rest = release_free_space(&conn, u64::MAX).unwrap();
        let after = storage_space(&conn).unwrap();
        assert_eq!(released + released_rest, space.free_bytes);
        assert_eq!(after.free_bytes, 0);
        assert_eq!(
            after.database_bytes,
            space.database_bytes - space.free_bytes
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let error = SqliteStore::open(SqliteOptions {
            path,
            durability: Durability::Normal,
        })
        .err()
        .unwrap();
        assert_eq!(
            error,
            StoreError::SchemaTooNew {
                found: 99,
                known: MIGRATIONS.len() as i64
            }
        );
    }
}
