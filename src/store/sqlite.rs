//! The embedded store: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that owns the only writing connection. It
//! takes every write waiting in its queue, runs each inside its own savepoint of one
//! transaction, commits once, and only then answers the callers (group commit). SQLite
//! allows one writer at a time anyway; batching turns that limit into throughput. Reads
//! run on a small pool of read-only connections, which WAL lets proceed beside the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use tokio::sync::oneshot;

use super::*;
use crate::domain::{
    Actor, AfterFailure, AttemptDeadlines, Expiry, HistoryEntry, JobResult, ResultTiming,
};

mod idempotent_create;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_jobs.sql"),
    include_str!("../../migrations/sqlite/0002_write_probe.sql"),
    include_str!("../../migrations/sqlite/0003_deliveries.sql"),
    include_str!("../../migrations/sqlite/0004_idempotent_creates.sql"),
];

#[path = "sqlite_deliveries.rs"]
mod deliveries;

/// Writes committed together at most.
const MAX_WRITES_PER_COMMIT: usize = 512;

/// WAL pages after which the writer checkpoints inside its own commit, as SQLite's
/// automatic checkpoint does (its default is 1,000). The checkpointer thread normally keeps
/// the log much shorter; this bounds it (to about 40 MB) when writes never pause long enough
/// for the log to restart, which needs a checkpoint with no write in between.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// The least time between two background checkpoints: each costs two fsyncs.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

pub use super::Durability;

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub path: PathBuf,
    pub durability: Durability,
}

type Finisher = Box<dyn FnOnce(Option<StoreError>) + Send>;
type WriteJob = Box<dyn FnOnce(&Connection) -> (Finisher, bool) + Send>;

pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<WriteJob>>>,
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
        migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(sql_error)?;
        let checkpointer = Checkpointer::start(&options.path, options.durability)?;

        let (sender, receiver) = mpsc::channel::<WriteJob>();
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
            Some(sender) => sender.send(job).is_ok(),
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

fn writer_loop(conn: Connection, receiver: mpsc::Receiver<WriteJob>, checkpointer: Checkpointer) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_WRITES_PER_COMMIT {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
            let error = sql_error(error);
            for job in batch {
                // The job still has to answer its caller: run nothing, report the error.
                let (finish, _) = job_that_fails(job, &conn);
                finish(Some(error.clone()));
            }
            continue;
        }
        let mut finishers = Vec::with_capacity(batch.len());
        for job in batch {
            let savepoint = conn.execute_batch("SAVEPOINT op");
            let (finish, ok) = job(&conn);
            if savepoint.is_ok() {
                let end = if ok {
                    "RELEASE op"
                } else {
                    "ROLLBACK TO op; RELEASE op"
                };
                if let Err(error) = conn.execute_batch(end) {
                    tracing::error!(%error, "sqlite savepoint failed");
                }
            }
            finishers.push(finish);
        }
        let commit_error = conn.execute_batch("COMMIT").err().map(|error| {
            let _ = conn.execute_batch("ROLLBACK");
            sql_error(error)
        });
        for finish in finishers {
            finish(commit_error.clone());
        }
        checkpointer.nudge();
    }
    // The sender is gone: the store is closing. Fold the WAL back into the main file.
    checkpointer.stop();
    if let Err(error) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(%error, "sqlite checkpoint at close failed");
    }
    drop(conn);
}

/// Checkpoints the WAL on its own thread and connection, so the fsyncs of a checkpoint
/// do not hold up the writer and the callers waiting for its next commit. SQLite lets a
/// passive checkpoint run beside the writer. Commits are durable before the checkpoint
/// either way (it only moves committed pages from the log into the database file).
struct Checkpointer {
    /// One buffered slot: commits during a checkpoint or the pause after it coalesce.
    commits: mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, durability: Durability) -> Result<Checkpointer, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(sql_error)?;
        // A checkpoint syncs the log and the database file as its connection's setting says.
        configure(&conn, durability).map_err(sql_error)?;
        let (commits, committed) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpointer_loop(conn, committed))
            .map_err(|e| StoreError::Internal(format!("spawn checkpoint thread: {e}")))?;
        Ok(Checkpointer { commits, thread })
    }

    /// Tells the checkpointer the log grew; never blocks.
    fn nudge(&self) {
        let _ = self.commits.try_send(());
    }

    /// Waits for a running checkpoint to end, so the final one at close finds the log free.
    fn stop(self) {
        drop(self.commits);
        if self.thread.join().is_err() {
            tracing::error!("the sqlite checkpoint thread panicked");
        }
    }
}

fn checkpointer_loop(conn: Connection, committed: mpsc::Receiver<()>) {
    let mut failing = false;
    while committed.recv().is_ok() {
        // PASSIVE never waits for readers or the writer; it copies what it can now.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => failing = false,
            // The writer's own checkpoint is running: the next nudge tries again.
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if matches!(
                    failure.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) => {}
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "background sqlite checkpoint failed");
                }
                failing = true;
            }
        }
        std::thread::sleep(CHECKPOINT_INTERVAL);
    }
}

/// When a batch cannot even begin, each job's reply must still be sent; running the job
/// outside a transaction would be wrong, so it runs against a rolled-back savepoint.
fn job_that_fails(job: WriteJob, conn: &Connection) -> (Finisher, bool) {
    let _ = conn.execute_batch("SAVEPOINT failed_batch");
    let outcome = job(conn);
    let _ = conn.execute_batch("ROLLBACK TO failed_batch; RELEASE failed_batch");
    outcome
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().expect("reader pool lock").pop() {
            return Ok(conn);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(sql_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_error)?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("reader pool lock");
        if idle.len() < 16 {
            idle.push(conn);
        }
    }
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

/// The oldest due job of one content type: the first entry of a `jobs_queue` range.
const CLAIM_PROBE_SQL: &str = "SELECT available_at, seq, status FROM jobs \
     WHERE status IN ('pending', 'retrying') AND content_type = ?1 AND available_at <= ?2 \
     ORDER BY available_at, seq LIMIT 1";
/// Expired deadlines, nearest first, from the `jobs_deadline` index.
const RESCUE_SCAN_SQL: &str =
    "SELECT seq, status, execution_deadline, heartbeat_deadline, retry_count, \
     content_type, lease_id FROM jobs WHERE deadline_at IS NOT NULL AND deadline_at <= ?1 \
     ORDER BY deadline_at LIMIT ?2";
const NEXT_DEADLINE_SQL: &str =
    "SELECT deadline_at FROM jobs WHERE deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1";
/// Finished jobs of one status past a cutoff, from the `jobs_finished` index.
/// The repeated status list lets SQLite prove the partial index applies; `INDEXED BY`
/// keeps the planner from preferring `jobs_by_status` and sorting every finished job.
const CLEANUP_SCAN_SQL: &str = "SELECT seq, source_file_path FROM jobs INDEXED BY jobs_finished \
     WHERE status = ?1 AND status IN ('completed', 'failed', 'timeout', 'cancelled') \
     AND completed_at < ?2 \
     AND NOT EXISTS (SELECT 1 FROM handoffs h WHERE h.job_id = jobs.id AND h.fanned_out_at IS NULL) \
     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id \
                     AND (d.state = 'pending' OR (d.state = 'dead' AND jobs.status <> 'cancelled'))) \
     ORDER BY completed_at LIMIT ?3";

const JOB_COLUMNS: &str = "seq, id, content_type, source_file_path, task_options, ingestion_task_id, status, \
     worker_id, lease_id, attempt, retry_count, created_at, started_at, completed_at, updated_at, available_at, \
     execution_deadline, heartbeat_deadline, last_heartbeat_at, progress, progress_message, error_message";

/// A result's columns, read only by the detail read (after `JOB_COLUMNS`).
const RESULT_COLUMNS: &str = "result_content, result_metadata, processing_time";

fn ts(column: Option<i64>) -> Option<Timestamp> {
    column.map(Timestamp::from_micros)
}

fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("stored {what} {value:?} is invalid").into(),
    )
}

fn parse_status(text: &str) -> rusqlite::Result<JobStatus> {
    JobStatus::parse(text).ok_or_else(|| corrupt("status", text))
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let id: String = row.get(1)?;
    let content_type: String = row.get(2)?;
    let task_options: String = row.get(4)?;
    let status: String = row.get(6)?;
    let worker_id: Option<String> = row.get(7)?;
    let lease_id: Option<String> = row.get(8)?;
    Ok(Job {
        id: JobId::parse(&id).map_err(|_| corrupt("job id", &id))?,
        content_type: ContentType::parse(&content_type)
            .map_err(|_| corrupt("content type", &content_type))?,
        source_file_path: row.get(3)?,
        task_options: serde_json::from_str(&task_options)
            .map_err(|_| corrupt("task options", &task_options))?,
        ingestion_task_id: row.get(5)?,
        status: parse_status(&status)?,
        worker_id: worker_id
            .map(|w| WorkerId::parse(&w).map_err(|_| corrupt("worker id", &w)))
            .transpose()?,
        lease_id: lease_id
            .map(|l| LeaseId::parse(&l).map_err(|_| corrupt("lease id", &l)))
            .transpose()?,
        attempt: row.get(9)?,
        retry_count: row.get(10)?,
        created_at: Timestamp::from_micros(row.get(11)?),
        started_at: ts(row.get(12)?),
        completed_at: ts(row.get(13)?),
        updated_at: Timestamp::from_micros(row.get(14)?),
        available_at: Timestamp::from_micros(row.get(15)?),
        execution_deadline: ts(row.get(16)?),
        heartbeat_deadline: ts(row.get(17)?),
        last_heartbeat_at: ts(row.get(18)?),
        progress: row.get(19)?,
        progress_message: row.get(20)?,
        error_message: row.get(21)?,
    })
}

/// Reads a result from `RESULT_COLUMNS` starting at column `first`. The metadata is
/// checked to be JSON but not parsed into a tree.
fn result_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<JobResult>> {
    let Some(content) = row.get::<_, Option<String>>(first)? else {
        return Ok(None);
    };
    let metadata = match row.get::<_, Option<String>>(first + 1)? {
        Some(text) => serde_json::value::RawValue::from_string(text)
            .map_err(|_| corrupt("result metadata", "(not JSON)"))?,
        None => serde_json::value::to_raw_value(&serde_json::Value::Null).expect("null serializes"),
    };
    Ok(Some(JobResult {
        content,
        metadata,
        processing_time: row.get(first + 2)?,
    }))
}

fn select_job_by_seq(conn: &Connection, seq: i64) -> Result<Job, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([seq], job_from_row)?)
}

fn select_job_by_id(conn: &Connection, id: JobId) -> Result<Option<(i64, Job)>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.to_string()], |row| {
            Ok((row.get::<_, i64>(0)?, job_from_row(row)?))
        })
        .optional()?)
}

/// The job with its result, by id.
fn select_job_and_result(
    conn: &Connection,
    id: JobId,
) -> Result<Option<(i64, Job, Option<JobResult>)>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS}, {RESULT_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.to_string()], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                job_from_row(row)?,
                result_from_row(row, 22)?,
            ))
        })
        .optional()?)
}

fn record_history(
    conn: &Connection,
    seq: i64,
    from: Option<JobStatus>,
    to: JobStatus,
    at: Timestamp,
    actor: Actor,
    reason: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![seq, from.map(JobStatus::as_str), to.as_str(), at.as_micros(), actor.as_str(), reason])?;
    Ok(())
}

/// Records the hand-off a final state needs, in the caller's transaction.
fn record_handoff(conn: &Connection, job: &Job, now: Timestamp) -> Result<(), StoreError> {
    let Some(kind) = HandoffKind::for_final_status(job.status) else {
        return Ok(());
    };
    let payload = serde_json::json!({
        "job_id": job.id.to_string(),
        "ingestion_task_id": job.ingestion_task_id,
        "content_type": job.content_type.as_str(),
        "status": job.status.as_str(),
        "error_message": job.error_message,
        "attempt": job.attempt,
        "retry_count": job.retry_count,
    });
    conn.prepare_cached(
        "INSERT INTO handoffs (job_id, kind, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        job.id.to_string(),
        kind.as_str(),
        payload.to_string(),
        now.as_micros()
    ])?;
    Ok(())
}

/// The job's state as a conditional update needs it.
struct Current {
    seq: i64,
    status: JobStatus,
    lease_id: Option<String>,
    retry_count: u32,
    result_received: bool,
}

fn current_state(conn: &Connection, id: JobId) -> Result<Current, StoreError> {
    conn.prepare_cached(
        "SELECT seq, status, lease_id, retry_count, result_received_at FROM jobs WHERE id = ?1",
    )?
    .query_row([id.to_string()], |row| {
        Ok(Current {
            seq: row.get(0)?,
            status: parse_status(&row.get::<_, String>(1)?)?,
            lease_id: row.get(2)?,
            retry_count: row.get(3)?,
            result_received: row.get::<_, Option<i64>>(4)?.is_some(),
        })
    })
    .optional()?
    .ok_or(StoreError::NotFound)
}

/// The job's state, when the transition table allows moving it to `to`.
fn current_state_allowing(
    conn: &Connection,
    id: JobId,
    to: JobStatus,
) -> Result<Current, StoreError> {
    let current = current_state(conn, id)?;
    if current.status.can_move_to(to) {
        Ok(current)
    } else {
        Err(StoreError::InvalidTransition {
            current: current.status,
        })
    }
}

/// Zero rows changed by a conditional update means someone else moved the job first.
fn expect_one_row(changed: usize, current: JobStatus) -> Result<(), StoreError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::InvalidTransition { current })
    }
}

fn create(conn: &Connection, p: CreateJobParams) -> Result<Job, StoreError> {
    let now = p.now.as_micros();
    let seq: i64 = conn
        .prepare_cached(
            "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
             created_at, updated_at, available_at, deadline_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6, ?7) RETURNING seq",
        )?
        .query_row(
            params![
                p.id.to_string(),
                p.content_type.as_str(),
                p.source_file_path,
                p.task_options.to_string(),
                p.ingestion_task_id,
                now,
                p.pending_deadline.map(Timestamp::as_micros),
            ],
            |row| row.get(0),
        )?;
    record_history(
        conn,
        seq,
        None,
        JobStatus::Pending,
        p.now,
        Actor::Client,
        "created",
    )?;
    select_job_by_seq(conn, seq)
}

fn claim(conn: &Connection, p: ClaimParams) -> Result<Option<Job>, StoreError> {
    let now = p.now.as_micros();
    let content_types: Vec<String> = if p.content_types.is_empty() {
        // Any type: the counters say which types have claimable jobs at all.
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT content_type FROM job_counts WHERE status IN ('pending', 'retrying') AND n > 0",
        )?;
        let types = stmt
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        types
    } else {
        p.content_types
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect()
    };
    // One index probe per type; the oldest due job across them wins.
    let mut oldest: Option<(i64, i64, String)> = None;
    let mut probe = conn.prepare_cached(CLAIM_PROBE_SQL)?;
    for content_type in &content_types {
        let found = probe
            .query_row(params![content_type, now], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        if let Some(candidate) = found {
            if oldest
                .as_ref()
                .is_none_or(|best| (candidate.0, candidate.1) < (best.0, best.1))
            {
                oldest = Some(candidate);
            }
        }
    }
    let Some((_, seq, previous)) = oldest else {
        return Ok(None);
    };
    let previous = parse_status(&previous)?;
    let content_type: String = conn
        .prepare_cached("SELECT content_type FROM jobs WHERE seq = ?1")?
        .query_row([seq], |row| row.get(0))?;
    let content_type =
        ContentType::parse(&content_type).map_err(|e| StoreError::Internal(e.to_string()))?;
    let deadlines = p.timeouts.claim_deadlines(&content_type, p.now);
    let lease = LeaseId::new_random();
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'processing', worker_id = ?2, lease_id = ?3, attempt = attempt + 1, \
             started_at = ?4, updated_at = ?4, execution_deadline = ?5, heartbeat_deadline = NULL, \
             last_heartbeat_at = NULL, deadline_at = ?6, result_received_at = NULL, progress = NULL, \
             progress_message = NULL \
             WHERE seq = ?1 AND status = ?7",
        )?
        .execute(params![
            seq,
            p.worker_id.as_str(),
            lease.to_string(),
            now,
            deadlines.execution.as_micros(),
            deadlines.next().as_micros(),
            previous.as_str(),
        ])?;
    expect_one_row(changed, previous)?;
    let job = select_job_by_seq(conn, seq)?;
    let reason = format!(
        "claimed by worker {} (attempt {})",
        p.worker_id, job.attempt
    );
    record_history(
        conn,
        seq,
        Some(previous),
        JobStatus::Processing,
        p.now,
        Actor::Worker,
        &reason,
    )?;
    Ok(Some(job))
}

fn heartbeat(conn: &Connection, p: HeartbeatParams) -> Result<HeartbeatOutcome, StoreError> {
    let current = current_state(conn, p.job_id)?;
    if current.lease_id.as_deref() != Some(p.lease_id.to_string().as_str()) {
        return Err(StoreError::LeaseMismatch {
            current: current.status,
        });
    }
    if current.status == JobStatus::Cancelled {
        return Ok(HeartbeatOutcome {
            status: current.status,
            cancelled: true,
            execution_deadline: None,
            heartbeat_deadline: None,
        });
    }
    let execution: Option<i64> = conn
        .prepare_cached("SELECT execution_deadline FROM jobs WHERE seq = ?1")?
        .query_row([current.seq], |row| row.get(0))?;
    let execution = match (current.status, execution) {
        (JobStatus::Processing, Some(execution)) => Timestamp::from_micros(execution),
        _ => {
            return Err(StoreError::InvalidTransition {
                current: current.status,
            })
        }
    };
    let deadlines = p.timeouts.heartbeat_deadlines(execution, p.now);
    // A heartbeat after a deadline passed does not revive the attempt: the monitor is
    // about to time it out, and the worker learns so now.
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET heartbeat_deadline = ?2, deadline_at = ?3, last_heartbeat_at = ?4, updated_at = ?4, \
             progress = COALESCE(?5, progress), progress_message = COALESCE(?6, progress_message) \
             WHERE seq = ?1 AND status = 'processing' AND lease_id = ?7 AND deadline_at > ?4",
        )?
        .execute(params![
            current.seq,
            deadlines.heartbeat.map(Timestamp::as_micros),
            deadlines.next().as_micros(),
            p.now.as_micros(),
            p.progress,
            p.message,
            p.lease_id.to_string(),
        ])?;
    if changed != 1 {
        return Err(StoreError::DeadlinePassed);
    }
    Ok(HeartbeatOutcome {
        status: JobStatus::Processing,
        cancelled: false,
        execution_deadline: Some(deadlines.execution),
        heartbeat_deadline: deadlines.heartbeat,
    })
}

fn submit_result(conn: &Connection, p: SubmitResultParams) -> Result<Job, StoreError> {
    let current = current_state(conn, p.job_id)?;
    let success = matches!(p.outcome, AttemptOutcome::Success { .. });
    let late_success = judge_stored_result(
        current.status,
        current.lease_id.as_deref(),
        current.result_received,
        p.lease_id,
        success,
    )? == ResultTiming::LateSuccess;
    let now = p.now.as_micros();
    let previous = current.status;
    match p.outcome {
        AttemptOutcome::Success {
            content,
            metadata,
            processing_time,
        } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET status = 'completed', completed_at = ?2, updated_at = ?2, deadline_at = NULL, \
                     result_received_at = ?2, result_content = ?3, result_metadata = ?4, processing_time = ?5, \
                     error_message = NULL, progress = 100 \
                     WHERE seq = ?1 AND status = ?6 AND lease_id IS ?7 AND result_received_at IS NULL",
                )?
                .execute(params![
                    current.seq,
                    now,
                    content,
                    metadata.to_string(),
                    processing_time,
                    previous.as_str(),
                    current.lease_id,
                ])?;
            expect_one_row(changed, previous)?;
            let reason = if late_success {
                "late result of a timed-out attempt"
            } else {
                "worker reported success"
            };
            record_history(
                conn,
                current.seq,
                Some(previous),
                JobStatus::Completed,
                p.now,
                Actor::Worker,
                reason,
            )?;
        }
        AttemptOutcome::Failure {
            error_message,
            retryable,
        } => {
            let after =
                p.policy
                    .retry
                    .after_failure(current.retry_count, retryable, p.now, p.jitter);
            let (status, retry_count, available_at, deadline_at, completed_at) =
                after_failure_columns(after, JobStatus::Failed, current.retry_count, p.now);
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET status = ?2, retry_count = ?3, available_at = ?4, deadline_at = ?5, \
                     completed_at = ?6, updated_at = ?7, result_received_at = ?7, error_message = ?8 \
                     WHERE seq = ?1 AND status = 'processing' AND lease_id IS ?9 AND result_received_at IS NULL",
                )?
                .execute(params![
                    current.seq,
                    status.as_str(),
                    retry_count,
                    available_at,
                    deadline_at,
                    completed_at,
                    now,
                    error_message,
                    current.lease_id,
                ])?;
            expect_one_row(changed, previous)?;
            let reason = if retryable {
                error_message.clone()
            } else {
                format!("{error_message} (not retryable)")
            };
            record_history(
                conn,
                current.seq,
                Some(previous),
                JobStatus::Failed,
                p.now,
                Actor::Worker,
                &reason,
            )?;
            if let AfterFailure::Retry { at, retry_count } = after {
                let reason = retry_reason(retry_count, p.policy.retry.max_retries, at);
                record_history(
                    conn,
                    current.seq,
                    Some(JobStatus::Failed),
                    JobStatus::Retrying,
                    p.now,
                    Actor::Worker,
                    &reason,
                )?;
            }
        }
    }
    let job = select_job_by_seq(conn, current.seq)?;
    record_handoff(conn, &job, p.now)?;
    Ok(job)
}

fn import(conn: &Connection, p: ImportJobParams) -> Result<ImportOutcome, StoreError> {
    let job = &p.job;
    let micros = |t: Option<Timestamp>| t.map(Timestamp::as_micros);
    let result = p.result.as_ref();
    let seq: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
             worker_id, lease_id, attempt, retry_count, created_at, started_at, completed_at, updated_at, \
             available_at, execution_deadline, heartbeat_deadline, last_heartbeat_at, deadline_at, progress, \
             progress_message, error_message, result_content, result_metadata, processing_time, result_received_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, \
             ?21, ?22, ?23, ?24, ?25, CASE WHEN ?23 IS NULL THEN NULL ELSE ?13 END) \
             ON CONFLICT (id) DO NOTHING RETURNING seq",
        )?
        .query_row(
            params![
                job.id.to_string(),
                job.content_type.as_str(),
                job.source_file_path,
                job.task_options.to_string(),
                job.ingestion_task_id,
                job.status.as_str(),
                job.worker_id.as_ref().map(WorkerId::as_str),
                job.lease_id.map(|l| l.to_string()),
                job.attempt,
                job.retry_count,
                job.created_at.as_micros(),
                micros(job.started_at),
                micros(job.completed_at),
                job.updated_at.as_micros(),
                job.available_at.as_micros(),
                micros(job.execution_deadline),
                micros(job.heartbeat_deadline),
                micros(job.last_heartbeat_at),
                micros(p.deadline_at),
                job.progress,
                job.progress_message,
                job.error_message,
                result.map(|r| r.content.as_str()),
                result.map(|r| r.metadata.get()),
                result.and_then(|r| r.processing_time),
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(seq) = seq else {
        return Ok(ImportOutcome::AlreadyExists);
    };
    record_history(conn, seq, None, job.status, p.now, Actor::Admin, &p.reason)?;
    Ok(ImportOutcome::Imported)
}

fn cancel(conn: &Connection, p: CancelParams) -> Result<Job, StoreError> {
    let current = current_state_allowing(conn, p.job_id, JobStatus::Cancelled)?;
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'cancelled', completed_at = ?2, updated_at = ?2, deadline_at = NULL \
             WHERE seq = ?1 AND status = ?3",
        )?
        .execute(params![current.seq, p.now.as_micros(), current.status.as_str()])?;
    expect_one_row(changed, current.status)?;
    record_history(
        conn,
        current.seq,
        Some(current.status),
        JobStatus::Cancelled,
        p.now,
        Actor::Admin,
        &p.reason,
    )?;
    let job = select_job_by_seq(conn, current.seq)?;
    record_handoff(conn, &job, p.now)?;
    Ok(job)
}

fn manual_retry(conn: &Connection, p: ManualRetryParams) -> Result<Job, StoreError> {
    let current = current_state_allowing(conn, p.job_id, JobStatus::Retrying)?;
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'retrying', retry_count = 0, available_at = ?2, deadline_at = NULL, \
             completed_at = NULL, updated_at = ?2 WHERE seq = ?1 AND status = ?3",
        )?
        .execute(params![current.seq, p.now.as_micros(), current.status.as_str()])?;
    expect_one_row(changed, current.status)?;
    record_history(
        conn,
        current.seq,
        Some(current.status),
        JobStatus::Retrying,
        p.now,
        Actor::Admin,
        "manual retry: retry budget reset",
    )?;
    select_job_by_seq(conn, current.seq)
}

fn rescue(conn: &Connection, p: RescueParams) -> Result<RescueReport, StoreError> {
    let now = p.now.as_micros();
    let mut rng = fastrand::Rng::with_seed(p.jitter_seed);
    let mut report = RescueReport::default();
    let expired: Vec<(
        i64,
        String,
        Option<i64>,
        Option<i64>,
        u32,
        String,
        Option<String>,
    )> = conn
        .prepare_cached(RESCUE_SCAN_SQL)?
        .query_map(params![now, p.limit as i64], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    for (seq, status, execution, heartbeat, retry_count, _content_type, lease) in expired {
        match parse_status(&status)? {
            JobStatus::Pending => {
                let changed = conn
                    .prepare_cached(
                        "UPDATE jobs SET status = 'timeout', completed_at = ?2, updated_at = ?2, deadline_at = NULL, \
                         error_message = ?3 WHERE seq = ?1 AND status = 'pending' AND deadline_at <= ?2",
                    )?
                    .execute(params![seq, now, Expiry::Pending.reason()])?;
                if changed == 1 {
                    record_history(
                        conn,
                        seq,
                        Some(JobStatus::Pending),
                        JobStatus::Timeout,
                        p.now,
                        Actor::Monitor,
                        Expiry::Pending.reason(),
                    )?;
                    record_handoff(conn, &select_job_by_seq(conn, seq)?, p.now)?;
                    report.n_pending_timed_out += 1;
                }
            }
            JobStatus::Processing => {
                let Some(execution) = execution else { continue };
                let deadlines = AttemptDeadlines {
                    execution: Timestamp::from_micros(execution),
                    heartbeat: ts(heartbeat),
                };
                let Some(expiry) = deadlines.expired(p.now) else {
                    continue;
                };
                let after = p.policy.retry.after_failure(
                    retry_count,
                    expiry.allows_retry(),
                    p.now,
                    rng.f64(),
                );
                let (status, new_retry_count, available_at, deadline_at, completed_at) =
                    after_failure_columns(after, JobStatus::Timeout, retry_count, p.now);
                let changed = conn
                    .prepare_cached(
                        "UPDATE jobs SET status = ?2, retry_count = ?3, available_at = ?4, deadline_at = ?5, \
                         completed_at = ?6, updated_at = ?7, error_message = ?8 \
                         WHERE seq = ?1 AND status = 'processing' AND lease_id IS ?9 AND deadline_at <= ?7",
                    )?
                    .execute(params![
                        seq,
                        status.as_str(),
                        new_retry_count,
                        available_at,
                        deadline_at,
                        completed_at,
                        now,
                        expiry.reason(),
                        lease,
                    ])?;
                if changed != 1 {
                    continue;
                }
                report.n_attempts_timed_out += 1;
                record_history(
                    conn,
                    seq,
                    Some(JobStatus::Processing),
                    JobStatus::Timeout,
                    p.now,
                    Actor::Monitor,
                    expiry.reason(),
                )?;
                match after {
                    AfterFailure::Retry { at, retry_count } => {
                        let reason = retry_reason(retry_count, p.policy.retry.max_retries, at);
                        record_history(
                            conn,
                            seq,
                            Some(JobStatus::Timeout),
                            JobStatus::Retrying,
                            p.now,
                            Actor::Monitor,
                            &reason,
                        )?;
                        report.n_retries_scheduled += 1;
                    }
                    AfterFailure::Final => {
                        record_handoff(conn, &select_job_by_seq(conn, seq)?, p.now)?
                    }
                }
            }
            JobStatus::Retrying => {
                // The backoff passed: nothing to change but the deadline; the caller wakes
                // long-polling workers.
                let changed = conn
                    .prepare_cached(
                        "UPDATE jobs SET deadline_at = NULL WHERE seq = ?1 AND status = 'retrying'",
                    )?
                    .execute([seq])?;
                report.n_retries_due += changed;
            }
            _ => {
                // A finished job never keeps a deadline; clear a stray one so the scan moves on.
                conn.prepare_cached("UPDATE jobs SET deadline_at = NULL WHERE seq = ?1")?
                    .execute([seq])?;
            }
        }
    }
    Ok(report)
}

fn cleanup(conn: &Connection, p: CleanupParams) -> Result<CleanupReport, StoreError> {
    let mut report = CleanupReport::default();
    let mut budget = p.limit;
    for status in [
        JobStatus::Completed,
        JobStatus::Cancelled,
        JobStatus::Failed,
        JobStatus::Timeout,
    ] {
        if budget == 0 {
            break;
        }
        let Some(cutoff) = p.retention.cutoff(status, p.now) else {
            continue;
        };
        let victims: Vec<(i64, String)> = conn
            .prepare_cached(CLEANUP_SCAN_SQL)?
            .query_map(
                params![status.as_str(), cutoff.as_micros(), budget as i64],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?
            .collect::<Result<_, _>>()?;
        for (seq, source_file_path) in victims {
            let changed = conn
                .prepare_cached("DELETE FROM jobs WHERE seq = ?1 AND status = ?2")?
                .execute(params![seq, status.as_str()])?;
            if changed == 0 {
                continue;
            }
            conn.prepare_cached("DELETE FROM job_history WHERE job_seq = ?1")?
                .execute([seq])?;
            report.n_deleted += 1;
            budget -= 1;
            let still_used = conn
                .prepare_cached("SELECT 1 FROM jobs WHERE source_file_path = ?1 LIMIT 1")?
                .query_row([&source_file_path], |_| Ok(()))
                .optional()?
                .is_some();
            if !still_used && !report.orphaned_source_files.contains(&source_file_path) {
                report.orphaned_source_files.push(source_file_path);
            }
        }
    }
    // Creation counters older than the statistics window are no longer needed.
    let two_days_ago = p
        .now
        .minus(std::time::Duration::from_secs(2 * 86_400))
        .as_micros()
        / 60_000_000;
    conn.prepare_cached("DELETE FROM created_per_minute WHERE minute < ?1")?
        .execute([two_days_ago])?;
    Ok(report)
}

fn history_of(conn: &Connection, seq: i64) -> Result<Vec<HistoryEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT from_status, to_status, at, actor, reason FROM job_history WHERE job_seq = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([seq], |row| {
        let from: Option<String> = row.get(0)?;
        let to: String = row.get(1)?;
        let actor: String = row.get(3)?;
        Ok(HistoryEntry {
            from: from.map(|f| parse_status(&f)).transpose()?,
            to: parse_status(&to)?,
            at: Timestamp::from_micros(row.get(2)?),
            actor: Actor::parse(&actor).ok_or_else(|| corrupt("actor", &actor))?,
            reason: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn list(conn: &Connection, p: ListParams) -> Result<JobPage, StoreError> {
    let mut conditions = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(status) = p.status {
        values.push(status.as_str().to_owned().into());
        conditions.push(format!("status = ?{}", values.len()));
    }
    if let Some(content_type) = &p.content_type {
        values.push(content_type.as_str().to_owned().into());
        conditions.push(format!("content_type = ?{}", values.len()));
    }
    if let Some(cursor) = p.cursor {
        values.push(cursor.into());
        conditions.push(format!("seq < ?{}", values.len()));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let limit = p.limit.max(1);
    values.push((limit as i64 + 1).into());
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY seq DESC LIMIT ?{}",
        values.len()
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows: Vec<(i64, Job)> = stmt
        .query_map(rusqlite::params_from_iter(values), |row| {
            Ok((row.get(0)?, job_from_row(row)?))
        })?
        .collect::<Result<_, _>>()?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Ok(JobPage {
        jobs: rows.into_iter().map(|(_, job)| job).collect(),
        next_cursor,
    })
}

fn statistics(conn: &Connection, path: &Path, now: Timestamp) -> Result<Statistics, StoreError> {
    let mut status_counts: BTreeMap<JobStatus, u64> =
        JobStatus::ALL.into_iter().map(|s| (s, 0)).collect();
    let mut content_type_counts = BTreeMap::new();
    let mut total_jobs = 0;
    let mut stmt =
        conn.prepare_cached("SELECT status, content_type, n FROM job_counts WHERE n > 0")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (status, content_type, n) = row?;
        let n = n.max(0) as u64;
        *status_counts.entry(parse_status(&status)?).or_default() += n;
        *content_type_counts.entry(content_type).or_default() += n;
        total_jobs += n;
    }
    let mut avg_processing_secs = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT content_type, n, total_micros FROM processing_totals WHERE n > 0",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (content_type, n, total_micros) = row?;
        avg_processing_secs.insert(content_type, total_micros as f64 / n as f64 / 1e6);
    }
    let since_minute = now
        .minus(std::time::Duration::from_secs(86_400))
        .as_micros()
        / 60_000_000;
    let created_last_24h: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(n), 0) FROM created_per_minute WHERE minute >= ?1")?
        .query_row([since_minute], |row| row.get(0))?;
    let storage_bytes = ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            std::fs::metadata(file).ok().map(|m| m.len())
        })
        .sum();
    Ok(Statistics {
        status_counts,
        content_type_counts,
        total_jobs,
        storage_bytes,
        avg_processing_secs,
        created_last_24h: created_last_24h.max(0) as u64,
    })
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
        self.signal_handoffs_after(work, |job| job.status.is_finished())
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
        self.signal_handoffs_after(work, |report| {
            report.n_pending_timed_out > 0
                || report.n_attempts_timed_out > report.n_retries_scheduled
        })
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
        self.write(move |conn| cleanup(conn, params))
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
                "SELECT id, job_id, kind, payload, created_at FROM handoffs WHERE delivered_at IS NULL ORDER BY id LIMIT ?1",
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
        let cases: [(&str, &[&dyn rusqlite::ToSql], &str); 4] = [
            (CLAIM_PROBE_SQL, &[&"audio", &0i64], "jobs_queue"),
            (RESCUE_SCAN_SQL, &[&0i64, &10i64], "jobs_deadline"),
            (NEXT_DEADLINE_SQL, &[], "jobs_deadline"),
            (
                CLEANUP_SCAN_SQL,
                &[&"completed", &0i64, &10i64],
                "jobs_finished",
            ),
        ];
        for (sql, params, index) in cases {
            let plan = plan(&conn, sql, params);
            assert!(plan.contains(&format!("INDEX {index} ")), "{sql}\n{plan}");
            assert!(
                !plan.contains("SCAN jobs") && !plan.contains("TEMP B-TREE"),
                "{sql}\n{plan}"
            );
        }
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
