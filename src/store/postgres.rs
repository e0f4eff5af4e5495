//! The PostgreSQL store, for running several replicas against one database.
//!
//! Where SQLite serializes every write through one thread, PostgreSQL lets replicas write
//! at once, so each operation is written to be correct under concurrency by itself:
//! - Every transition is one conditional statement (`UPDATE ... WHERE seq = $1 AND
//!   status = $2 AND lease_id IS NOT DISTINCT FROM $3 ...`) whose data-modifying CTEs also
//!   insert the history rows and the hand-off (outbox) row, so the three are written
//!   atomically without a multi-statement transaction. When the decision depends on the
//!   job's current state (retry count, deadlines), that state is read first, the domain
//!   policy decides, and the update is conditional on exactly what was read; zero rows
//!   means someone else moved the job first, and the caller is told so.
//! - Claims pick their row with `FOR UPDATE SKIP LOCKED`: concurrent claimers never wait
//!   for each other and never get the same attempt.
//! - The monitor's batches (timeouts, due retries, cleanup) lock their rows with `SKIP
//!   LOCKED`, so replicas running their monitors at once split the work, and each job's
//!   change is conditional, so no change is ever applied twice.
//! - Long-poll wake-ups cross replicas through LISTEN/NOTIFY on a dedicated connection,
//!   with a periodic fallback tick, so a lost notification only delays a poll.
//! - Outages answer quickly: connects, statements and whole operations have timeouts;
//!   connection errors become `StoreError::Unavailable` (HTTP 503), and the pool never
//!   hands out a broken connection again, so the server recovers by itself.

mod batcher;
mod deliveries;
mod hot_ops;
mod idempotent_create;
mod pool;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use self::batcher::Batcher;
use self::hot_ops::{Claims, Creates, Results};
use self::pool::{Conn, Pool};
use super::*;
use crate::domain::{Actor, AfterFailure, AttemptDeadlines, Expiry, HistoryEntry, JobResult};

/// Schema migrations, applied in order; the schema's version is how many were applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_jobs.sql"),
    include_str!("../../migrations/postgres/0002_batch_friendly.sql"),
    include_str!("../../migrations/postgres/0003_listing_by_type_then_status.sql"),
    include_str!("../../migrations/postgres/0004_write_probe.sql"),
    include_str!("../../migrations/postgres/0005_deliveries.sql"),
    include_str!("../../migrations/postgres/0006_idempotent_creates.sql"),
];

/// The schema version this program creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The channel long-polling replicas listen on (see the migration's `jobs_available` trigger).
const JOBS_AVAILABLE_CHANNEL: &str = "morag_jobs_available";
/// Serializes migrations of replicas starting at once.
const MIGRATION_LOCK: i64 = 0x6d6f_7261_676a_0001;
/// One replica at a time folds counter deltas into the totals.
const COMPACTION_LOCK: i64 = 0x6d6f_7261_676a_0002;

/// How the store reaches PostgreSQL.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database?...` (or the key=value form).
    pub url: String,
    /// Connections per replica at most.
    pub max_connections: usize,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long one statement may run on the server (`statement_timeout`); a whole store
    /// operation gets a little more, after which the caller gets `Unavailable`.
    pub statement_timeout: Duration,
    /// How often long-pollers are woken even without a notification.
    pub wakeup_fallback: Duration,
}

impl PostgresOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            max_connections: 16,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            wakeup_fallback: Duration::from_secs(5),
        }
    }

    /// The driver's configuration: the URL plus our timeouts and session settings.
    /// `statement_timeout` zero means none.
    fn driver_config(
        &self,
        statement_timeout: Duration,
        session: Session,
    ) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|error| StoreError::Internal(format!("invalid PostgreSQL URL: {error}")))?;
        config.connect_timeout(self.connect_timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("morag-jobs");
        }
        // Sent in the startup packet, so they cost no round trip. A transaction left
        // open by a vanished client must not hold row locks for long either.
        let ours = format!(
            "{} -c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            session.settings(),
            statement_timeout.as_millis(),
            self.statement_timeout.as_millis(),
            (self.statement_timeout * 4).as_millis()
        );
        let options = match config.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        config.options(options);
        Ok(config)
    }
}

/// What a connection is for: how its prepared statements are planned and, on the batch
/// connections, who appends the statistics deltas.
///
/// Left to itself, PostgreSQL switches a prepared statement to a generic plan once that
/// looks no worse than the custom ones and keeps it until the table's statistics change.
/// A generic plan made while `jobs` was nearly empty (every fresh database) scans the
/// whole table, and it stayed cached while a benchmark run grew the table (result batches
/// took 40-60 ms instead of 4).
#[derive(Clone, Copy, Debug)]
enum Session {
    /// Planned at every execution, with its parameters: everything but the batched
    /// creates, claims and results, which run often enough for planning to matter.
    General,
    /// The batch connections (`batcher.rs`), which run only the statements of `hot_ops.rs`.
    ///
    /// Planned once per connection, with only the plan shapes the batched statements are
    /// meant to have: index scans joined by nested loops (sequential and bitmap scans,
    /// hash and merge joins disabled). Creates and results touch jobs only by key; claims
    /// read the head of a queue index and then touch the picked jobs by key, with no
    /// join whose order a plan could get backwards. So the one plan is right however
    /// small `jobs` was when it was made (`hot_queries_read_a_bounded_number_of_rows`
    /// checks it), and their planning is paid once: an idle create took 0.94 ms instead
    /// of 1.35, a result 1.12 instead of 2.02, and a claim batch's planning was 0.6 ms.
    /// (An earlier claim that joined its candidates back to `jobs` got, from a plan made
    /// on an empty table, a loop over the whole queue: 2.6 million rows compared.)
    ///
    /// A generic plan's estimates assume unknown parameters (a third of the queue due, a
    /// tenth of it claimed), so on a large table its cost passes `jit_above_cost`, and
    /// PostgreSQL JIT-compiled the claim at every execution: 77 ms of a claim at 1,000,000
    /// pending jobs, for a plan that runs in 0.3 ms. JIT is off on every connection: no
    /// statement here reads enough rows for it to pay.
    ///
    /// Those statements also append their own statistics deltas (`morag.writes_own_deltas`,
    /// which the statistics triggers' `WHEN` clause reads, migration 0003): the triggers
    /// cost a PL/pgSQL call and a nested statement per batch, 14 % of PostgreSQL's CPU.
    Batch,
}

impl Session {
    fn settings(self) -> &'static str {
        match self {
            Session::General => "-c plan_cache_mode=force_custom_plan -c jit=off",
            Session::Batch => {
                "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_bitmapscan=off \
                 -c enable_hashjoin=off -c enable_mergejoin=off -c jit=off -c morag.writes_own_deltas=on"
            }
        }
    }
}

pub use super::MigrationReport;

pub struct PostgresStore {
    pool: Arc<Pool>,
    /// Bumped when any replica committed a hand-off (see `deliveries::listen_for_handoffs`).
    handoff_events: watch::Receiver<u64>,
    /// The longest one store operation may take, connection checkout included.
    operation_timeout: Duration,
    events: watch::Receiver<u64>,
    stop_listener: watch::Sender<bool>,
    /// Asks the announcer task to tell the other replicas that jobs may be claimable.
    announce: Arc<tokio::sync::Notify>,
    /// The hot operations run in batches (group commit, see `batcher.rs`), each kind on
    /// a connection of its own.
    creates: Batcher<Creates>,
    claims: Batcher<Claims>,
    results: Batcher<Results>,
}

impl PostgresStore {
    /// Connects, runs pending migrations, and starts listening for wake-ups.
    pub async fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        Self::migrate(&options).await?;
        let config = options.driver_config(options.statement_timeout, Session::General)?;
        let batch = options.driver_config(options.statement_timeout, Session::Batch)?;
        let pool = Arc::new(Pool::new(
            config.clone(),
            options.max_connections,
            options.statement_timeout,
        ));
        let (events_sender, events) = watch::channel(0u64);
        let (stop_listener, stop) = watch::channel(false);
        // Tells this replica's own announcements apart from the others'.
        let replica_id = uuid::Uuid::new_v4().to_string();
        let announce = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(listen_for_wakeups(
            config.clone(),
            options.wakeup_fallback,
            replica_id.clone(),
            events_sender,
            stop.clone(),
        ));
        let (handoff_sender, handoff_events) = watch::channel(0u64);
        tokio::spawn(deliveries::listen_for_handoffs(
            config.clone(),
            handoff_sender,
            stop.clone(),
        ));
        tokio::spawn(announce_wakeups(
            pool.clone(),
            replica_id,
            announce.clone(),
            stop,
        ));
        let operation_timeout = options.statement_timeout + Duration::from_secs(1);
        Ok(PostgresStore {
            creates: Batcher::start(batch.clone(), operation_timeout),
            claims: Batcher::start(batch.clone(), operation_timeout),
            results: Batcher::start(batch, operation_timeout),
            pool,
            handoff_events,
            operation_timeout,
            events,
            stop_listener,
            announce,
        })
    }

    /// Applies pending migrations (and only that). Refuses a schema newer than this program.
    pub async fn migrate(options: &PostgresOptions) -> Result<MigrationReport, StoreError> {
        // Migrations may take longer than a request should.
        let config = options.driver_config(Duration::ZERO, Session::General)?;
        let mut conn = pool::connect(&config).await?;
        let client = &mut conn.client;
        client
            .query_one("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_error)?;
        let result = migrate_locked(client).await;
        // The lock is released with the session anyway; unlock early when we can.
        let _ = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        result
    }

    /// Like `run`, and when `operation` succeeds and `may_wake(&result)`, tells the other
    /// replicas' long-polling workers that a job may be claimable.
    fn run_and_announce<'s, T, F>(
        &'s self,
        operation: F,
        may_wake: fn(&T) -> bool,
    ) -> StoreFuture<'s, T>
    where
        T: Send + 's,
        F: for<'c> FnOnce(&'c mut Conn) -> StoreFuture<'c, T> + Send + 's,
    {
        let work = self.run(operation);
        Box::pin(async move {
            let result = work.await?;
            if may_wake(&result) {
                self.announce.notify_one();
            }
            Ok(result)
        })
    }

    /// Runs `operation` on a pooled connection within the operation timeout.
    fn run<'s, T, F>(&'s self, operation: F) -> StoreFuture<'s, T>
    where
        T: Send + 's,
        F: for<'c> FnOnce(&'c mut Conn) -> StoreFuture<'c, T> + Send + 's,
    {
        Box::pin(run_pooled(&self.pool, self.operation_timeout, operation))
    }
}

/// Runs `operation` on a connection from `pool`, giving up after `timeout` (connection
/// checkout included) with `Unavailable`.
async fn run_pooled<T, F>(pool: &Pool, timeout: Duration, operation: F) -> Result<T, StoreError>
where
    F: for<'c> FnOnce(&'c mut Conn) -> StoreFuture<'c, T>,
{
    let work = async {
        let mut pooled = pool.get().await?;
        let result = operation(pooled.conn()).await;
        // After a connection or unexpected error the connection's state is unknown:
        // drop it rather than hand it to the next request.
        let reusable = !matches!(
            result,
            Err(StoreError::Unavailable(_)) | Err(StoreError::Internal(_))
        );
        pooled.finish(reusable);
        result
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "PostgreSQL did not answer within {timeout:?}"
        ))),
    }
}

async fn migrate_locked(
    client: &mut tokio_postgres::Client,
) -> Result<MigrationReport, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS morag_jobs_schema_migrations (\
                 version INTEGER PRIMARY KEY, \
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg_error)?;
    let found: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::int8 FROM morag_jobs_schema_migrations",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    let known = SCHEMA_VERSION;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i32 + 1;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.batch_execute(migration).await.map_err(pg_error)?;
        tx.execute(
            "INSERT INTO morag_jobs_schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(MigrationReport {
        from_version: found,
        to_version: known,
    })
}

/// Connection problems (the server is down, restarting, out of connections, or a
/// statement ran out of time) are `Unavailable`: the caller may try again. Everything
/// else is a bug or a corrupt row.
pub(crate) fn pg_error(error: tokio_postgres::Error) -> StoreError {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let transient = code.starts_with("08") // connection exception
            || code.starts_with("53") // insufficient resources (too many connections)
            || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
            || code == "57014" // query canceled: statement timeout
            || code == "55P03" // lock not available: lock timeout
            || code == "40001" // serialization failure
            || code == "40P01" // deadlock detected
            || code == "25006"; // read-only transaction: a failover in progress
        return if transient {
            StoreError::Unavailable(format!("PostgreSQL {code}: {}", db.message()))
        } else {
            StoreError::Internal(format!("PostgreSQL {code}: {}", db.message()))
        };
    }
    let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
    if error.is_closed() || io {
        StoreError::Unavailable(format!("PostgreSQL connection: {error}"))
    } else {
        StoreError::Internal(format!("PostgreSQL: {error}"))
    }
}

/// Keeps one connection LISTENing and turns notifications (and a periodic tick) into
/// changes of `events`. Reconnects after a second when the connection is lost.
async fn listen_for_wakeups(
    config: tokio_postgres::Config,
    fallback: Duration,
    replica_id: String,
    events: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        match listen_once(&config, fallback, &replica_id, &events, &mut stop).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "lost the PostgreSQL wake-up listener; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Returns `Ok` when told to stop, `Err` when the connection failed.
async fn listen_once(
    config: &tokio_postgres::Config,
    fallback: Duration,
    replica_id: &str,
    events: &watch::Sender<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The connection must be polled by hand to see its notifications.
    let own_id = replica_id.to_owned();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                // This replica already woke its own pollers.
                Ok(AsyncMessage::Notification(note)) if note.payload() == own_id => {}
                Ok(AsyncMessage::Notification(_)) => {
                    if notified.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "wake-up listener connection failed");
                    break;
                }
            }
        }
    });
    let outcome = async {
        client
            .batch_execute(&format!("LISTEN {JOBS_AVAILABLE_CHANNEL}"))
            .await
            .map_err(|e| e.to_string())?;
        // Notifications sent while we were not listening are lost: look once now.
        events.send_modify(|n| *n += 1);
        let mut tick = tokio::time::interval(fallback);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = notifications.recv() => match received {
                    Some(()) => {
                        while notifications.try_recv().is_ok() {}
                        events.send_modify(|n| *n += 1);
                    }
                    None => return Err("the listener connection closed".to_owned()),
                },
                _ = tick.tick() => {
                    if client.is_closed() {
                        return Err("the listener connection closed".to_owned());
                    }
                    events.send_modify(|n| *n += 1);
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    outcome
}

/// Sends one NOTIFY per burst of announcements, after the announcing writes committed.
/// A NOTIFY inside the job's own transaction would hold PostgreSQL's database-wide notify
/// lock until that transaction's commit was flushed, serializing all creates; a NOTIFY
/// alone writes no WAL, so the lock is held only briefly. Announcements made while one
/// is being sent are folded into the next one.
async fn announce_wakeups(
    pool: Arc<Pool>,
    replica_id: String,
    announce: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = announce.notified() => {}
            _ = stop.changed() => return,
        }
        let sent = async {
            let mut pooled = pool.get().await?;
            let conn = pooled.conn();
            let statement = conn.statement("SELECT pg_notify($1, $2)").await?;
            let result = conn
                .client
                .execute(&statement, &[&JOBS_AVAILABLE_CHANNEL, &replica_id])
                .await
                .map_err(pg_error);
            pooled.finish(result.is_ok());
            result
        };
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok(_)) => {}
            // The other replicas' fallback tick covers a lost announcement.
            Ok(Err(error)) => tracing::debug!(%error, "cannot announce claimable jobs"),
            Err(_) => tracing::debug!("announcing claimable jobs timed out"),
        }
    }
}

/// Expired deadlines, nearest first, from the `jobs_deadline` index; rows another
/// replica's monitor holds are skipped.
const RESCUE_SCAN_SQL: &str =
    "SELECT seq, status, execution_deadline, heartbeat_deadline, retry_count, lease_id \
     FROM jobs WHERE deadline_at IS NOT NULL AND deadline_at <= $1 \
     ORDER BY deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED";
/// Finished jobs of one status past a cutoff, oldest first from the `jobs_finished` index,
/// deleted with their history (by its primary key, which starts with the job).
const CLEANUP_SQL: &str = "WITH victims AS ( \
         SELECT seq FROM jobs WHERE status = $1 AND completed_at < $2 \
         AND status IN ('completed', 'failed', 'timeout', 'cancelled') \
         AND NOT EXISTS (SELECT 1 FROM handoffs h WHERE h.job_id = jobs.id AND h.fanned_out_at IS NULL) \
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id \
             AND (d.state = 'pending' OR (d.state = 'dead' AND jobs.status <> 'cancelled'))) \
         ORDER BY completed_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
     gone AS (DELETE FROM jobs USING victims WHERE jobs.seq = victims.seq AND jobs.status = $1 \
         RETURNING jobs.completed_at, jobs.seq, jobs.source_file_path), \
     history AS (DELETE FROM job_history USING gone WHERE job_history.job_seq = gone.seq) \
     SELECT completed_at, seq, source_file_path FROM gone";
const NEXT_DEADLINE_SQL: &str =
    "SELECT deadline_at FROM jobs WHERE deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1";

/// The hand-off row's payload, built from the changed job `u`.
const HANDOFF_PAYLOAD: &str =
    "json_build_object('job_id', u.id, 'ingestion_task_id', u.ingestion_task_id, \
     'content_type', u.content_type, 'status', u.status, 'error_message', u.error_message, \
     'attempt', u.attempt, 'retry_count', u.retry_count)::text";

const JOB_COLUMNS: &str = "seq, id, content_type, source_file_path, task_options, ingestion_task_id, status, \
     worker_id, lease_id, attempt, retry_count, created_at, started_at, completed_at, updated_at, available_at, \
     execution_deadline, heartbeat_deadline, last_heartbeat_at, progress, progress_message, error_message";

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("stored {what} {value:?} is invalid"))
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index).map_err(pg_error)
}

fn ts(micros: Option<i64>) -> Option<Timestamp> {
    micros.map(Timestamp::from_micros)
}

fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    JobStatus::parse(text).ok_or_else(|| corrupt("status", text))
}

fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

/// Reads a job from `JOB_COLUMNS` starting at column 0.
fn job_from_row(row: &Row) -> Result<Job, StoreError> {
    let id: &str = get(row, 1)?;
    let content_type: &str = get(row, 2)?;
    let status: &str = get(row, 6)?;
    let worker_id: Option<&str> = get(row, 7)?;
    let lease_id: Option<&str> = get(row, 8)?;
    Ok(Job {
        id: JobId::parse(id).map_err(|_| corrupt("job id", id))?,
        content_type: ContentType::parse(content_type)
            .map_err(|_| corrupt("content type", content_type))?,
        source_file_path: get(row, 3)?,
        task_options: parse_json("task options", get(row, 4)?)?,
        ingestion_task_id: get(row, 5)?,
        status: parse_status(status)?,
        worker_id: worker_id
            .map(|w| WorkerId::parse(w).map_err(|_| corrupt("worker id", w)))
            .transpose()?,
        lease_id: lease_id
            .map(|l| LeaseId::parse(l).map_err(|_| corrupt("lease id", l)))
            .transpose()?,
        attempt: get::<i32>(row, 9)?.max(0) as u32,
        retry_count: get::<i32>(row, 10)?.max(0) as u32,
        created_at: Timestamp::from_micros(get(row, 11)?),
        started_at: ts(get(row, 12)?),
        completed_at: ts(get(row, 13)?),
        updated_at: Timestamp::from_micros(get(row, 14)?),
        available_at: Timestamp::from_micros(get(row, 15)?),
        execution_deadline: ts(get(row, 16)?),
        heartbeat_deadline: ts(get(row, 17)?),
        last_heartbeat_at: ts(get(row, 18)?),
        progress: get(row, 19)?,
        progress_message: get(row, 20)?,
        error_message: get(row, 21)?,
    })
}

/// Reads a result from `result_content, result_metadata, processing_time` starting at
/// column `first` (only the detail read selects them). The metadata is
/// checked to be JSON but not parsed into a tree.
fn result_from_row(row: &Row, first: usize) -> Result<Option<JobResult>, StoreError> {
    let Some(content) = get::<Option<String>>(row, first)? else {
        return Ok(None);
    };
    let metadata = match get::<Option<String>>(row, first + 1)? {
        Some(text) => serde_json::value::RawValue::from_string(text)
            .map_err(|_| corrupt("result metadata", "(not JSON)"))?,
        None => serde_json::value::to_raw_value(&serde_json::Value::Null).expect("null serializes"),
    };
    Ok(Some(JobResult {
        content,
        metadata,
        processing_time: get(row, first + 2)?,
    }))
}

/// One history row a transition writes.
struct Step {
    from: Option<JobStatus>,
    to: JobStatus,
    actor: Actor,
    reason: String,
}

impl Step {
    fn new(
        from: Option<JobStatus>,
        to: JobStatus,
        actor: Actor,
        reason: impl Into<String>,
    ) -> Step {
        Step {
            from,
            to,
            actor,
            reason: reason.into(),
        }
    }
}

/// Runs `core` (an `UPDATE jobs ... RETURNING *` or `INSERT INTO jobs ... RETURNING *`
/// using `$1..$n`) as one statement that also records `steps` in the job's history and,
/// when `handoff` is set, the hand-off row, all only if `core` changed a row. Returns the
/// job as `core` left it, or `None` when its condition matched no row.
async fn transition(
    conn: &mut Conn,
    core: &str,
    params: &[&(dyn ToSql + Sync)],
    steps: &[Step],
    handoff: Option<HandoffKind>,
    now: Timestamp,
) -> Result<Option<Job>, StoreError> {
    let n = params.len();
    let (from, to, actor, reason, at, kind) = (n + 1, n + 2, n + 3, n + 4, n + 5, n + 6);
    let sql = format!(
        "WITH u AS ({core}), \
         h AS (INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) \
               SELECT u.seq, s.from_status, s.to_status, ${at}::int8, s.actor, s.reason \
               FROM u, unnest(${from}::text[], ${to}::text[], ${actor}::text[], ${reason}::text[]) \
                    WITH ORDINALITY AS s(from_status, to_status, actor, reason, ord) \
               ORDER BY s.ord), \
         o AS (INSERT INTO handoffs (job_id, kind, payload, created_at) \
               SELECT u.id, ${kind}::text, {HANDOFF_PAYLOAD}, ${at}::int8 \
               FROM u WHERE ${kind}::text IS NOT NULL) \
         SELECT {JOB_COLUMNS} FROM u"
    );
    let froms: Vec<Option<&str>> = steps
        .iter()
        .map(|s| s.from.map(JobStatus::as_str))
        .collect();
    let tos: Vec<&str> = steps.iter().map(|s| s.to.as_str()).collect();
    let actors: Vec<&str> = steps.iter().map(|s| s.actor.as_str()).collect();
    let reasons: Vec<&str> = steps.iter().map(|s| s.reason.as_str()).collect();
    let at_micros = now.as_micros();
    let kind_name = handoff.map(HandoffKind::as_str);
    let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
    all.extend_from_slice(&[&froms, &tos, &actors, &reasons, &at_micros, &kind_name]);
    let statement = conn.statement(&sql).await?;
    let row = conn
        .client
        .query_opt(&statement, &all)
        .await
        .map_err(pg_error)?;
    row.as_ref().map(job_from_row).transpose()
}

/// The job's state as a conditional update needs it.
struct Current {
    seq: i64,
    status: JobStatus,
    lease_id: Option<String>,
    retry_count: i32,
    result_received: bool,
    execution_deadline: Option<i64>,
}

/// The columns `Current` is read from, in `current_from_row`'s order.
const CURRENT_COLUMNS: &str =
    "seq, status, lease_id, retry_count, result_received_at IS NOT NULL, execution_deadline";

/// Reads a `Current` from `CURRENT_COLUMNS` starting at column `first`.
fn current_from_row(row: &Row, first: usize) -> Result<Current, StoreError> {
    Ok(Current {
        seq: get(row, first)?,
        status: parse_status(get(row, first + 1)?)?,
        lease_id: get(row, first + 2)?,
        retry_count: get(row, first + 3)?,
        result_received: get(row, first + 4)?,
        execution_deadline: get(row, first + 5)?,
    })
}

async fn current_state(conn: &mut Conn, id: JobId) -> Result<Current, StoreError> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM jobs WHERE id = $1");
    let statement = conn.statement(&sql).await?;
    let row = conn
        .client
        .query_opt(&statement, &[&id.to_string()])
        .await
        .map_err(pg_error)?
        .ok_or(StoreError::NotFound)?;
    current_from_row(&row, 0)
}

/// A conditional update matched nothing: someone moved the job after we read it. The
/// caller learns the state it is in now.
async fn conflict(conn: &mut Conn, seq: i64, fallback: JobStatus) -> StoreError {
    let current = async {
        let statement = conn
            .statement("SELECT status FROM jobs WHERE seq = $1")
            .await?;
        let row = conn
            .client
            .query_opt(&statement, &[&seq])
            .await
            .map_err(pg_error)?;
        match row {
            Some(row) => parse_status(get(&row, 0)?),
            None => Err(StoreError::NotFound),
        }
    }
    .await;
    match current {
        Ok(status) => StoreError::InvalidTransition { current: status },
        Err(StoreError::NotFound) => StoreError::NotFound,
        Err(_) => StoreError::InvalidTransition { current: fallback },
    }
}

/// The history of an attempt that ended in `ended` (failed or timed out): that step, and
/// the automatic retry's step when `after` is one.
fn attempt_end_steps(
    from: JobStatus,
    ended: JobStatus,
    actor: Actor,
    reason: impl Into<String>,
    after: AfterFailure,
    max_retries: u32,
) -> Vec<Step> {
    let mut steps = vec![Step::new(Some(from), ended, actor, reason)];
    if let AfterFailure::Retry { at, retry_count } = after {
        steps.push(Step::new(
            Some(ended),
            JobStatus::Retrying,
            actor,
            retry_reason(retry_count, max_retries, at),
        ));
    }
    steps
}

async fn heartbeat(conn: &mut Conn, p: HeartbeatParams) -> Result<HeartbeatOutcome, StoreError> {
    let current = current_state(conn, p.job_id).await?;
    let lease = p.lease_id.to_string();
    if current.lease_id.as_deref() != Some(lease.as_str()) {
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
    let execution = match (current.status, current.execution_deadline) {
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
    let statement = conn
        .statement(
            "UPDATE jobs SET heartbeat_deadline = $2, deadline_at = $3, last_heartbeat_at = $4, updated_at = $4, \
             progress = COALESCE($5, progress), progress_message = COALESCE($6, progress_message) \
             WHERE seq = $1 AND status = 'processing' AND lease_id = $7 AND deadline_at > $4 \
               AND execution_deadline = $8",
        )
        .await?;
    let changed = conn
        .client
        .execute(
            &statement,
            &[
                &current.seq,
                &deadlines.heartbeat.map(Timestamp::as_micros),
                &deadlines.next().as_micros(),
                &p.now.as_micros(),
                &p.progress,
                &p.message,
                &lease,
                &execution.as_micros(),
            ],
        )
        .await
        .map_err(pg_error)?;
    if changed != 1 {
        return Err(
            match conflict(conn, current.seq, JobStatus::Processing).await {
                // Still processing: its deadline passed and the monitor is about to act.
                StoreError::InvalidTransition {
                    current: JobStatus::Processing,
                } => StoreError::DeadlinePassed,
                other => other,
            },
        );
    }
    Ok(HeartbeatOutcome {
        status: JobStatus::Processing,
        cancelled: false,
        execution_deadline: Some(deadlines.execution),
        heartbeat_deadline: deadlines.heartbeat,
    })
}

async fn cancel(conn: &mut Conn, p: CancelParams) -> Result<Job, StoreError> {
    let current = current_state(conn, p.job_id).await?;
    if !current.status.can_move_to(JobStatus::Cancelled) {
        return Err(StoreError::InvalidTransition {
            current: current.status,
        });
    }
    let job = transition(
        conn,
        "UPDATE jobs SET status = 'cancelled', completed_at = $2, updated_at = $2, deadline_at = NULL \
         WHERE seq = $1 AND status = $3 RETURNING *",
        &[&current.seq, &p.now.as_micros(), &current.status.as_str()],
        &[Step::new(Some(current.status), JobStatus::Cancelled, Actor::Admin, p.reason.as_str())],
        Some(HandoffKind::Cancelled),
        p.now,
    )
    .await?;
    match job {
        Some(job) => Ok(job),
        None => Err(conflict(conn, current.seq, current.status).await),
    }
}

async fn manual_retry(conn: &mut Conn, p: ManualRetryParams) -> Result<Job, StoreError> {
    let current = current_state(conn, p.job_id).await?;
    if !current.status.can_move_to(JobStatus::Retrying) {
        return Err(StoreError::InvalidTransition {
            current: current.status,
        });
    }
    let job = transition(
        conn,
        "UPDATE jobs SET status = 'retrying', retry_count = 0, available_at = $2, deadline_at = NULL, \
         completed_at = NULL, updated_at = $2 WHERE seq = $1 AND status = $3 RETURNING *",
        &[&current.seq, &p.now.as_micros(), &current.status.as_str()],
        &[Step::new(
            Some(current.status),
            JobStatus::Retrying,
            Actor::Admin,
            "manual retry: retry budget reset",
        )],
        None,
        p.now,
    )
    .await?;
    match job {
        Some(job) => Ok(job),
        None => Err(conflict(conn, current.seq, current.status).await),
    }
}

async fn import(conn: &mut Conn, p: ImportJobParams) -> Result<ImportOutcome, StoreError> {
    let job = &p.job;
    let micros = |t: Option<Timestamp>| t.map(Timestamp::as_micros);
    let result = p.result.as_ref();
    let id = job.id.to_string();
    let options = job.task_options.to_string();
    let lease = job.lease_id.map(|l| l.to_string());
    let content = result.map(|r| r.content.as_str());
    let metadata = result.map(|r| r.metadata.get());
    let processing_time = result.and_then(|r| r.processing_time);
    let (attempt, retry_count) = (job.attempt as i32, job.retry_count as i32);
    let times = [
        job.created_at.as_micros(),
        job.updated_at.as_micros(),
        job.available_at.as_micros(),
    ];
    let optional_times = [
        micros(job.started_at),
        micros(job.completed_at),
        micros(job.execution_deadline),
        micros(job.heartbeat_deadline),
        micros(job.last_heartbeat_at),
        micros(p.deadline_at),
    ];
    let imported = transition(
        conn,
        "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
         worker_id, lease_id, attempt, retry_count, created_at, updated_at, available_at, started_at, \
         completed_at, execution_deadline, heartbeat_deadline, last_heartbeat_at, deadline_at, progress, \
         progress_message, error_message, result_content, result_metadata, processing_time, result_received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::int8, $16, $17, $18, $19, $20, \
         $21, $22, $23::text, $24, $25, CASE WHEN $23::text IS NULL THEN NULL ELSE $15::int8 END) \
         ON CONFLICT (id) DO NOTHING RETURNING *",
        &[
            &id,
            &job.content_type.as_str(),
            &job.source_file_path,
            &options,
            &job.ingestion_task_id,
            &job.status.as_str(),
            &job.worker_id.as_ref().map(WorkerId::as_str),
            &lease,
            &attempt,
            &retry_count,
            &times[0],
            &times[1],
            &times[2],
            &optional_times[0],
            &optional_times[1],
            &optional_times[2],
            &optional_times[3],
            &optional_times[4],
            &optional_times[5],
            &job.progress,
            &job.progress_message,
            &job.error_message,
            &content,
            &metadata,
            &processing_time,
        ],
        &[Step::new(None, job.status, Actor::Admin, p.reason.as_str())],
        None,
        p.now,
    )
    .await?;
    Ok(match imported {
        Some(_) => ImportOutcome::Imported,
        None => ImportOutcome::AlreadyExists,
    })
}

/// Runs `body` inside BEGIN/COMMIT on `conn`, rolling back when it fails. (When the
/// future is dropped half-way, the pool discards the connection, which rolls back too.)
macro_rules! in_transaction {
    ($conn:expr, $begin:expr, $body:expr) => {{
        $conn.client.batch_execute($begin).await.map_err(pg_error)?;
        match $body.await {
            Ok(value) => {
                $conn
                    .client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(pg_error)?;
                Ok(value)
            }
            Err(error) => {
                $conn
                    .client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(pg_error)?;
                Err(error)
            }
        }
    }};
}

async fn rescue(conn: &mut Conn, p: RescueParams) -> Result<RescueReport, StoreError> {
    let report: RescueReport = in_transaction!(conn, "BEGIN", rescue_batch(conn, &p))?;
    // Folding counter deltas rides along the monitor's passes. The batch above is
    // committed either way, so a failure here must not hide its report.
    if let Err(error) = compact_counters(conn).await {
        tracing::warn!(%error, "cannot fold counter deltas; trying again on the next pass");
    }
    Ok(report)
}

async fn rescue_batch(conn: &mut Conn, p: &RescueParams) -> Result<RescueReport, StoreError> {
    let now = p.now.as_micros();
    let mut rng = fastrand::Rng::with_seed(p.jitter_seed);
    let mut report = RescueReport::default();
    // Rows another replica's monitor is handling right now are skipped, not waited for.
    let statement = conn.statement(RESCUE_SCAN_SQL).await?;
    let expired = conn
        .client
        .query(&statement, &[&now, &(p.limit as i64)])
        .await
        .map_err(pg_error)?;
    for row in expired {
        let seq: i64 = get(&row, 0)?;
        let execution: Option<i64> = get(&row, 2)?;
        let heartbeat: Option<i64> = get(&row, 3)?;
        let retry_count: i32 = get(&row, 4)?;
        let lease: Option<String> = get(&row, 5)?;
        match parse_status(get(&row, 1)?)? {
            JobStatus::Pending => {
                let changed = transition(
                    conn,
                    "UPDATE jobs SET status = 'timeout', completed_at = $2, updated_at = $2, deadline_at = NULL, \
                     error_message = $3 WHERE seq = $1 AND status = 'pending' AND deadline_at <= $2 RETURNING *",
                    &[&seq, &now, &Expiry::Pending.reason()],
                    &[Step::new(
                        Some(JobStatus::Pending),
                        JobStatus::Timeout,
                        Actor::Monitor,
                        Expiry::Pending.reason(),
                    )],
                    Some(HandoffKind::Failed),
                    p.now,
                )
                .await?;
                if changed.is_some() {
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
                let retries_done = retry_count.max(0) as u32;
                let after = p.policy.retry.after_failure(
                    retries_done,
                    expiry.allows_retry(),
                    p.now,
                    rng.f64(),
                );
                let (status, new_retry_count, available_at, deadline_at, completed_at) =
                    after_failure_columns(after, JobStatus::Timeout, retries_done, p.now);
                let steps = attempt_end_steps(
                    JobStatus::Processing,
                    JobStatus::Timeout,
                    Actor::Monitor,
                    expiry.reason(),
                    after,
                    p.policy.retry.max_retries,
                );
                let changed = transition(
                    conn,
                    "UPDATE jobs SET status = $2, retry_count = $3, available_at = $4, deadline_at = $5, \
                     completed_at = $6, updated_at = $7, error_message = $8 \
                     WHERE seq = $1 AND status = 'processing' AND lease_id IS NOT DISTINCT FROM $9 \
                       AND deadline_at <= $7 AND retry_count = $10 RETURNING *",
                    &[
                        &seq,
                        &status.as_str(),
                        &(new_retry_count as i32),
                        &available_at,
                        &deadline_at,
                        &completed_at,
                        &now,
                        &expiry.reason(),
                        &lease,
                        &retry_count,
                    ],
                    &steps,
                    HandoffKind::for_final_status(status),
                    p.now,
                )
                .await?;
                if changed.is_some() {
                    report.n_attempts_timed_out += 1;
                    if matches!(after, AfterFailure::Retry { .. }) {
                        report.n_retries_scheduled += 1;
                    }
                }
            }
            JobStatus::Retrying => {
                // The backoff passed: nothing to change but the deadline; pollers on every
                // replica are woken below.
                let statement = conn
                    .statement(
                        "UPDATE jobs SET deadline_at = NULL WHERE seq = $1 AND status = 'retrying'",
                    )
                    .await?;
                let changed = conn
                    .client
                    .execute(&statement, &[&seq])
                    .await
                    .map_err(pg_error)?;
                report.n_retries_due += changed as usize;
            }
            _ => {
                // A finished job never keeps a deadline; clear a stray one so the scan moves on.
                let statement = conn
                    .statement("UPDATE jobs SET deadline_at = NULL WHERE seq = $1")
                    .await?;
                conn.client
                    .execute(&statement, &[&seq])
                    .await
                    .map_err(pg_error)?;
            }
        }
    }
    Ok(report)
}

/// Deltas folded per statement, so that one statement stays far inside the statement
/// timeout however far compaction fell behind.
const COMPACTION_BATCH: i64 = 20_000;
/// How long one call keeps folding batches at most.
const COMPACTION_BUDGET: Duration = Duration::from_secs(1);

/// Folds counter deltas into the totals, unless another replica is doing it now.
async fn compact_counters(conn: &mut Conn) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    loop {
        let moved = compact_counters_batch(conn).await?;
        if moved < COMPACTION_BATCH as u64 || started.elapsed() > COMPACTION_BUDGET {
            return Ok(());
        }
    }
}

/// Folds one batch; returns how many deltas it moved (0 when another replica holds the lock).
async fn compact_counters_batch(conn: &mut Conn) -> Result<u64, StoreError> {
    in_transaction!(conn, "BEGIN", async {
        let locked: bool = conn
            .query_value("SELECT pg_try_advisory_xact_lock($1)", &[&COMPACTION_LOCK])
            .await?;
        if !locked {
            return Ok(0);
        }
        let moved: i64 = conn.query_value("WITH moved AS ( \
                     DELETE FROM counter_deltas \
                     WHERE ctid = ANY (ARRAY(SELECT ctid FROM counter_deltas LIMIT $1)) \
                     RETURNING *), \
                 folded AS ( \
                     INSERT INTO counters (counter, status, content_type, minute, n, total_micros) \
                     SELECT counter, status, content_type, minute, SUM(n), SUM(total_micros) FROM moved \
                     GROUP BY counter, status, content_type, minute \
                     ORDER BY counter, status, content_type, minute \
                     ON CONFLICT (counter, status, content_type, minute) DO UPDATE \
                     SET n = counters.n + excluded.n, total_micros = counters.total_micros + excluded.total_micros) \
                 SELECT count(*) FROM moved", &[&COMPACTION_BATCH]).await?;
        Ok::<u64, StoreError>(moved.max(0) as u64)
    })
}

async fn cleanup(conn: &mut Conn, p: CleanupParams) -> Result<CleanupReport, StoreError> {
    let report: CleanupReport = in_transaction!(conn, "BEGIN", cleanup_batch(conn, &p))?;
    // Creation counters older than the statistics window are no longer needed.
    let two_days_ago = p.now.minus(Duration::from_secs(2 * 86_400)).as_micros() / 60_000_000;
    let statement = conn
        .statement("DELETE FROM counters WHERE counter = 'created' AND minute < $1")
        .await?;
    conn.client
        .execute(&statement, &[&two_days_ago])
        .await
        .map_err(pg_error)?;
    Ok(report)
}

async fn cleanup_batch(conn: &mut Conn, p: &CleanupParams) -> Result<CleanupReport, StoreError> {
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
        // Locked rows belong to another replica's cleaner (or a cancel in flight): skip them.
        // History rows are deleted by the same statement.
        let statement = conn.statement(CLEANUP_SQL).await?;
        let mut deleted = conn
            .client
            .query(
                &statement,
                &[&status.as_str(), &cutoff.as_micros(), &(budget as i64)],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|row| {
                Ok((
                    get::<i64>(row, 0)?,
                    get::<i64>(row, 1)?,
                    get::<String>(row, 2)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        deleted.sort();
        for (_, _, source_file_path) in deleted {
            report.n_deleted += 1;
            budget -= 1;
            if report.orphaned_source_files.contains(&source_file_path) {
                continue;
            }
            let still_used: bool = conn
                .query_value(
                    "SELECT EXISTS (SELECT 1 FROM jobs WHERE source_file_path = $1)",
                    &[&source_file_path],
                )
                .await?;
            if !still_used {
                report.orphaned_source_files.push(source_file_path);
            }
        }
    }
    Ok(report)
}

async fn get_job(conn: &mut Conn, id: JobId) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    let statement = conn.statement(&sql).await?;
    let row = conn
        .client
        .query_opt(&statement, &[&id.to_string()])
        .await
        .map_err(pg_error)?;
    row.as_ref().map(job_from_row).transpose()
}

/// `JOB_COLUMNS`, each prefixed with `alias.`.
fn qualified_job_columns(alias: &str) -> String {
    JOB_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn get_job_detail(conn: &mut Conn, id: JobId) -> Result<Option<JobDetail>, StoreError> {
    // One statement, so the job and its history come from the same snapshot.
    // The result is read once, not repeated on every history row.
    let columns = qualified_job_columns("j");
    let sql = format!(
        "SELECT {columns}, CASE WHEN h.id IS NOT DISTINCT FROM first.id THEN j.result_content END, \
             CASE WHEN h.id IS NOT DISTINCT FROM first.id THEN j.result_metadata END, j.processing_time, \
             h.from_status, h.to_status, h.at, h.actor, h.reason \
         FROM jobs j \
         LEFT JOIN LATERAL (SELECT min(id) AS id FROM job_history WHERE job_seq = j.seq) AS first ON true \
         LEFT JOIN job_history h ON h.job_seq = j.seq WHERE j.id = $1 ORDER BY h.id"
    );
    let statement = conn.statement(&sql).await?;
    let rows = conn
        .client
        .query(&statement, &[&id.to_string()])
        .await
        .map_err(pg_error)?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let job = job_from_row(first)?;
    let result = result_from_row(first, 22)?;
    let mut history = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(to) = get::<Option<&str>>(row, 26)? else {
            continue;
        };
        let from: Option<&str> = get(row, 25)?;
        let actor: &str = get(row, 28)?;
        history.push(HistoryEntry {
            from: from.map(parse_status).transpose()?,
            to: parse_status(to)?,
            at: Timestamp::from_micros(get(row, 27)?),
            actor: Actor::parse(actor).ok_or_else(|| corrupt("actor", actor))?,
            reason: get(row, 29)?,
        });
    }
    Ok(Some(JobDetail {
        job,
        result,
        history,
    }))
}

/// Every status a job can have, for listing by type as one index range per status.
const ALL_STATUSES: &str =
    "'{pending,processing,completed,failed,timeout,cancelled,retrying}'::text[]";

/// The listing statement for the filters given: `$1` how many to fetch, `$2` the cursor
/// (NULL for the first page), then the content type and the status, whichever are given.
/// Newest first within each range of `jobs_by_type_status (content_type, status, seq)`;
/// several ranges are merged by `seq` (each gives at most one page).
fn list_sql(by_status: bool, by_type: bool) -> String {
    let page = "($2::int8 IS NULL OR seq < $2::int8) ORDER BY seq DESC LIMIT $1";
    let merged_columns = qualified_job_columns("j");
    match (by_status, by_type) {
        (false, false) => format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {page}"),
        (true, true) => format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE content_type = $3 AND status = $4 AND {page}"
        ),
        (false, true) => format!(
            "SELECT {merged_columns} FROM unnest({ALL_STATUSES}) AS s(status) \
             CROSS JOIN LATERAL (SELECT * FROM jobs \
                 WHERE content_type = $3 AND jobs.status = s.status AND {page}) AS j \
             ORDER BY j.seq DESC LIMIT $1"
        ),
        // The types present, found by skipping from one to the next through the index.
        (true, false) => format!(
            "WITH RECURSIVE types(name) AS ( \
                 (SELECT content_type FROM jobs ORDER BY content_type LIMIT 1) \
                 UNION ALL \
                 SELECT (SELECT content_type FROM jobs WHERE content_type > t.name \
                         ORDER BY content_type LIMIT 1) \
                 FROM types t WHERE t.name IS NOT NULL) \
             SELECT {merged_columns} FROM types \
             CROSS JOIN LATERAL (SELECT * FROM jobs \
                 WHERE content_type = types.name AND status = $3 AND {page}) AS j \
             WHERE types.name IS NOT NULL \
             ORDER BY j.seq DESC LIMIT $1"
        ),
    }
}

async fn list(conn: &mut Conn, p: ListParams) -> Result<JobPage, StoreError> {
    let status = p.status.map(JobStatus::as_str);
    let content_type = p.content_type.as_ref().map(ContentType::as_str);
    let limit = p.limit.max(1);
    let fetch = limit as i64 + 1;
    let mut values: Vec<&(dyn ToSql + Sync)> = vec![&fetch, &p.cursor];
    if let Some(content_type) = &content_type {
        values.push(content_type);
    }
    if let Some(status) = &status {
        values.push(status);
    }
    let sql = list_sql(status.is_some(), content_type.is_some());
    let statement = conn.statement(&sql).await?;
    let rows = conn
        .client
        .query(&statement, &values)
        .await
        .map_err(pg_error)?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        jobs.push((get::<i64>(row, 0)?, job_from_row(row)?));
    }
    let next_cursor = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Ok(JobPage {
        jobs: jobs.into_iter().map(|(_, job)| job).collect(),
        next_cursor,
    })
}

async fn statistics(conn: &mut Conn, now: Timestamp) -> Result<Statistics, StoreError> {
    compact_counters(conn).await?;
    let since_minute = now.minus(Duration::from_secs(86_400)).as_micros() / 60_000_000;
    // Totals plus the deltas not folded in yet, read in one statement (one snapshot).
    let statement = conn
        .statement(
            "SELECT counter, status, content_type, SUM(n)::int8, SUM(total_micros)::int8 FROM ( \
                 SELECT counter, status, content_type, minute, n, total_micros FROM counters \
                 UNION ALL \
                 SELECT counter, status, content_type, minute, n, total_micros FROM counter_deltas) t \
             WHERE counter <> 'created' OR minute >= $1 \
             GROUP BY counter, status, content_type",
        )
        .await?;
    let rows = conn
        .client
        .query(&statement, &[&since_minute])
        .await
        .map_err(pg_error)?;
    let mut status_counts: BTreeMap<JobStatus, u64> =
        JobStatus::ALL.into_iter().map(|s| (s, 0)).collect();
    let mut content_type_counts = BTreeMap::new();
    let mut avg_processing_secs = BTreeMap::new();
    let mut total_jobs = 0;
    let mut created_last_24h = 0;
    for row in &rows {
        let counter: &str = get(row, 0)?;
        let status: &str = get(row, 1)?;
        let content_type: &str = get(row, 2)?;
        let n: i64 = get(row, 3)?;
        let total_micros: i64 = get(row, 4)?;
        match counter {
            "status" if n > 0 => {
                let n = n as u64;
                *status_counts.entry(parse_status(status)?).or_default() += n;
                *content_type_counts
                    .entry(content_type.to_owned())
                    .or_default() += n;
                total_jobs += n;
            }
            "processing" if n > 0 => {
                avg_processing_secs.insert(
                    content_type.to_owned(),
                    total_micros as f64 / n as f64 / 1e6,
                );
            }
            "created" => created_last_24h += n.max(0) as u64,
            _ => {}
        }
    }
    let storage_bytes: i64 = conn
        .query_value(
            "SELECT (pg_total_relation_size('jobs') + pg_total_relation_size('job_history') \
                   + pg_total_relation_size('handoffs'))::int8",
            &[],
        )
        .await?;
    Ok(Statistics {
        status_counts,
        content_type_counts,
        total_jobs,
        storage_bytes: storage_bytes.max(0) as u64,
        avg_processing_secs,
        created_last_24h,
    })
}

async fn pending_handoffs(conn: &mut Conn, limit: usize) -> Result<Vec<Handoff>, StoreError> {
    let statement = conn
        .statement(
            "SELECT id, job_id, kind, payload, created_at FROM handoffs WHERE delivered_at IS NULL \
             ORDER BY id LIMIT $1",
        )
        .await?;
    let rows = conn
        .client
        .query(&statement, &[&(limit as i64)])
        .await
        .map_err(pg_error)?;
    rows.iter()
        .map(|row| {
            let job_id: &str = get(row, 1)?;
            let kind: &str = get(row, 2)?;
            Ok(Handoff {
                id: get(row, 0)?,
                job_id: JobId::parse(job_id).map_err(|_| corrupt("job id", job_id))?,
                kind: [
                    HandoffKind::Completed,
                    HandoffKind::Failed,
                    HandoffKind::Cancelled,
                ]
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| corrupt("hand-off kind", kind))?,
                payload: parse_json("hand-off payload", get(row, 3)?)?,
                created_at: Timestamp::from_micros(get(row, 4)?),
            })
        })
        .collect()
}

async fn next_deadline(conn: &mut Conn) -> Result<Option<Timestamp>, StoreError> {
    let statement = conn.statement(NEXT_DEADLINE_SQL).await?;
    let row = conn
        .client
        .query_opt(&statement, &[])
        .await
        .map_err(pg_error)?;
    Ok(match row {
        Some(row) => Some(Timestamp::from_micros(get(&row, 0)?)),
        None => None,
    })
}

async fn ping(conn: &mut Conn) -> Result<(), StoreError> {
    conn.client
        .simple_query("SELECT 1")
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Rewrites the one row of `write_probe`.
async fn probe_write(conn: &mut Conn, now: Timestamp) -> Result<(), StoreError> {
    conn.client
        .execute(
            "INSERT INTO write_probe (id, written_at, writes) VALUES (1, $1, 1) \
             ON CONFLICT (id) DO UPDATE SET written_at = EXCLUDED.written_at, \
             writes = write_probe.writes + 1",
            &[&now.as_micros()],
        )
        .await
        .map_err(pg_error)?;
    Ok(())
}

impl Store for PostgresStore {
    fn create_job(&self, params: CreateJobParams) -> StoreFuture<'_, Job> {
        Box::pin(async move {
            let job = self.creates.submit(params).await?;
            self.announce.notify_one();
            Ok(job)
        })
    }

    fn create_job_once(&self, params: CreateOnceParams) -> StoreFuture<'_, CreateOnceOutcome> {
        Box::pin(async move {
            let outcome = self
                .run(move |c| Box::pin(idempotent_create::create_once(c, params)))
                .await?;
            if matches!(outcome, CreateOnceOutcome::Created(_)) {
                self.announce.notify_one();
            }
            Ok(outcome)
        })
    }

    fn claim_job(&self, params: ClaimParams) -> StoreFuture<'_, Option<Job>> {
        Box::pin(self.claims.submit(params))
    }

    fn heartbeat(&self, params: HeartbeatParams) -> StoreFuture<'_, HeartbeatOutcome> {
        self.run(move |c| Box::pin(heartbeat(c, params)))
    }

    fn submit_result(&self, params: SubmitResultParams) -> StoreFuture<'_, Job> {
        Box::pin(self.results.submit(params))
    }

    fn cancel_job(&self, params: CancelParams) -> StoreFuture<'_, Job> {
        self.run(move |c| Box::pin(cancel(c, params)))
    }

    fn retry_job(&self, params: ManualRetryParams) -> StoreFuture<'_, Job> {
        self.run_and_announce(move |c| Box::pin(manual_retry(c, params)), |_| true)
    }

    fn rescue_expired(&self, params: RescueParams) -> StoreFuture<'_, RescueReport> {
        self.run_and_announce(
            move |c| Box::pin(rescue(c, params)),
            |report| report.n_retries_due > 0,
        )
    }

    fn next_deadline(&self) -> StoreFuture<'_, Option<Timestamp>> {
        self.run(|c| Box::pin(next_deadline(c)))
    }

    fn cleanup_finished(&self, params: CleanupParams) -> StoreFuture<'_, CleanupReport> {
        self.run(move |c| Box::pin(cleanup(c, params)))
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        self.run(move |c| Box::pin(get_job(c, id)))
    }

    fn get_job_detail(&self, id: JobId) -> StoreFuture<'_, Option<JobDetail>> {
        self.run(move |c| Box::pin(get_job_detail(c, id)))
    }

    fn list_jobs(&self, params: ListParams) -> StoreFuture<'_, JobPage> {
        self.run(move |c| Box::pin(list(c, params)))
    }

    fn statistics(&self, now: Timestamp) -> StoreFuture<'_, Statistics> {
        self.run(move |c| Box::pin(statistics(c, now)))
    }

    fn pending_handoffs(&self, limit: usize) -> StoreFuture<'_, Vec<Handoff>> {
        self.run(move |c| Box::pin(pending_handoffs(c, limit)))
    }

    fn import_job(&self, params: ImportJobParams) -> StoreFuture<'_, ImportOutcome> {
        let claimable = params.job.status.is_claimable();
        let work = self.run(move |c| Box::pin(import(c, params)));
        Box::pin(async move {
            let outcome = work.await?;
            if claimable && outcome == ImportOutcome::Imported {
                self.announce.notify_one();
            }
            Ok(outcome)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.run(|c| Box::pin(ping(c)))
    }

    fn probe_write(&self, now: Timestamp) -> StoreFuture<'_, ()> {
        self.run(move |c| Box::pin(probe_write(c, now)))
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        let _ = self.stop_listener.send(true);
        self.pool.close();
        self.creates.close();
        self.claims.close();
        self.results.close();
        Box::pin(async { Ok(()) })
    }

    fn jobs_available_events(&self) -> Option<watch::Receiver<u64>> {
        Some(self.events.clone())
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let _ = self.stop_listener.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PostgreSQL the tests use (as in `tests/it/support.rs`); unreachable = failure.
    fn admin_url() -> String {
        std::env::var("MORAG_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL at {url} is unreachable: {error}"));
        tokio::spawn(connection);
        client
    }

    /// The longest row count any node of the statement's plan produced (per loop times
    /// loops), and the plan, from `EXPLAIN ANALYZE`.
    async fn rows_read(
        client: &tokio_postgres::Client,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> (u64, String) {
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN (ANALYZE, FORMAT TEXT) {sql}"), params)
            .await
            .expect("explain runs")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut most = 0;
        for line in &plan {
            let Some(actual) = line.find("(actual") else {
                continue;
            };
            let numbers = &line[actual..];
            let field = |name: &str| -> u64 {
                numbers
                    .find(name)
                    .map(|at| {
                        numbers[at + name.len()..]
                            .chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                            .parse()
                            .unwrap_or(0)
                    })
                    .unwrap_or(0)
            };
            most = most.max(field("rows=") * field("loops=").max(1));
        }
        (most, plan.join("\n"))
    }

    /// The indexes on `jobs` that a plan reads.
    fn indexes_used(plan: &str) -> Vec<String> {
        let mut used: Vec<String> = plan
            .split(" using ")
            .skip(1)
            .filter_map(|rest| {
                let (index, table) = rest.split_once(" on ")?;
                let table = table.split_whitespace().next()?;
                (table == "jobs").then(|| index.trim().to_owned())
            })
            .collect();
        used.sort();
        used.dedup();
        used
    }

    /// The batched hot statements, prepared on a session with the batch connections'
    /// settings, as `(name with arguments, statement, parameter types, the only indexes
    /// on jobs it may read)`. A row count alone would miss a plan that finds each job by
    /// walking a long run of index entries (an index whose leading column is the status,
    /// say): such a node still returns one row per loop.
    fn generic_statements() -> Vec<(String, String, &'static str, &'static [&'static str])> {
        let results = "(int8[], text[], text[], bool[], text[], int4[], text[], int4[], int8[], int8[], int8[], \
            int8[], bool[], text[], text[], float8[], text[], text[], text[], text[], text[], text[], \
            text[], text[], text[], text[])";
        let two_results = "('{0,1}', '{x1,x2}', '{processing,processing}', '{t,t}', '{NULL,NULL}', '{NULL,NULL}', \
            '{completed,completed}', '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}', '{5,5}', '{5,5}', '{t,t}', \
            '{a,b}', '{x,y}', '{NULL,NULL}', '{NULL,NULL}', '{completed,completed}', \
            '{processing,processing}', '{completed,completed}', '{worker,worker}', '{ok,ok}', \
            '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}', '{NULL,NULL}')";
        // 16 claimers: of one type, of two, of any type (with two types' own timeouts).
        let claims = "(int8, text[], text[], text[], int8[], int8, int8)";
        let claimers = |types: &str, deadlines: &str| {
            let leases: Vec<String> = (0..16).map(|i| format!("lease-{i}")).collect();
            format!(
                "(1000000, '{{{}}}', '{{{}}}', '{types}', '{deadlines}', 5, 16)",
                vec!["w"; 16].join(","),
                leases.join(",")
            )
        };
        vec![
            (
                format!("results{two_results}"),
                hot_ops::results_sql(),
                results,
                &["jobs_id_key"],
            ),
            (
                format!("claim_one{}", claimers("{audio}", "{5}")),
                hot_ops::claim_sql(false),
                claims,
                &["jobs_pkey", "jobs_queue_by_type"],
            ),
            (
                format!("claim_two{}", claimers("{audio,video}", "{5,5}")),
                hot_ops::claim_sql(false),
                claims,
                &["jobs_pkey", "jobs_queue_by_type"],
            ),
            (
                format!("claim_any{}", claimers("{audio,video}", "{5,5}")),
                hot_ops::claim_sql(true),
                claims,
                &["jobs_pkey", "jobs_queue"],
            ),
        ]
    }

    async fn generic_session(url: &str) -> tokio_postgres::Client {
        let session = connect(url).await;
        let settings = Session::Batch
            .settings()
            .split("-c")
            .map(str::trim)
            .filter(|setting| !setting.is_empty())
            .map(|setting| format!("SET {setting};"))
            .collect::<String>();
        session.batch_execute(&settings).await.unwrap();
        for (call, sql, types, _) in generic_statements() {
            let name = call.split('(').next().unwrap();
            session
                .batch_execute(&format!("PREPARE {name}{types} AS {sql}"))
                .await
                .unwrap();
        }
        session
    }

    /// Claims, the monitor's scans and cleanup read a bounded number of rows however many
    /// jobs there are: the query plans use their indexes (and never sort all due jobs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_queries_read_a_bounded_number_of_rows() {
        let name = format!("morag_jobs_test_{:016x}", fastrand::u64(..));
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
        // On its own task, so that a failed check still drops the database below.
        let checked = tokio::spawn(async move {
            PostgresStore::migrate(&PostgresOptions::new(url.clone()))
                .await
                .unwrap();
            let client = connect(&url).await;
            // The batch connections plan each hot statement once (`Session::Batch`):
            // one session makes its plans now, on the empty table of a fresh database,
            // and keeps them while the table fills, as a new server's connections would.
            let stale = generic_session(&url).await;
            for (call, _, _, _) in generic_statements() {
                stale
                    .batch_execute(&format!("EXPLAIN EXECUTE {call}"))
                    .await
                    .unwrap();
            }
            // 20,000 due jobs of each of two types, 20,000 finished ones, 2,000 with deadlines.
            client
                .batch_execute(
                    "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, \
                         status, created_at, updated_at, available_at, completed_at, deadline_at) \
                     SELECT gen_random_uuid()::text, CASE WHEN n % 2 = 0 THEN 'audio' ELSE 'video' END, \
                         '/f/' || n, '{}', 'i', \
                         CASE WHEN n <= 40000 THEN 'pending' ELSE 'completed' END, n, n, n, \
                         CASE WHEN n > 40000 THEN n END, CASE WHEN n % 30 = 0 THEN n END \
                     FROM generate_series(1, 60000) AS n",
                )
                .await
                .unwrap();
            let fresh = generic_session(&url).await;
            // Whatever a plan's estimated cost, the batch connections never JIT-compile it.
            fresh
                .batch_execute("SET jit_above_cost = 0")
                .await
                .unwrap();
            for (session, made) in [(&stale, "on the empty table"), (&fresh, "on 60,000 jobs, not analyzed")] {
                for (call, _, _, allowed) in generic_statements() {
                    let name = call.split('(').next().unwrap();
                    let (rows, plan) = rows_read(session, &format!("EXECUTE {call}"), &[]).await;
                    assert!(rows <= 200, "generic {name} (planned {made}) read {rows} rows:\n{plan}");
                    assert!(!plan.contains("JIT:"), "generic {name} was JIT-compiled:\n{plan}");
                    let used = indexes_used(&plan);
                    assert!(
                        used.iter().all(|index| allowed.contains(&index.as_str())),
                        "generic {name} (planned {made}) reads {used:?}, not only {allowed:?}:\n{plan}"
                    );
                }
            }
            client.batch_execute("ANALYZE jobs").await.unwrap();
            let now = 1_000_000i64;
            // A batch of 16 claimers.
            let workers: Vec<&str> = vec!["w"; 16];
            let leases: Vec<String> = (0..16).map(|i| format!("lease-{i}")).collect();
            let claimers = 16i64;
            let audio: Vec<&str> = vec!["audio"];
            let both: Vec<&str> = vec!["audio", "video"];
            let deadlines: Vec<i64> = vec![5, 5];
            let one_deadline: Vec<i64> = vec![5];
            let checks: Vec<(&str, String, Vec<&(dyn ToSql + Sync)>)> = vec![
                (
                    "claim of one type",
                    hot_ops::claim_sql(false),
                    vec![&now, &workers, &leases, &audio, &one_deadline, &5i64, &claimers],
                ),
                (
                    "claim of two types",
                    hot_ops::claim_sql(false),
                    vec![&now, &workers, &leases, &both, &deadlines, &5i64, &claimers],
                ),
                (
                    "claim of any type",
                    hot_ops::claim_sql(true),
                    vec![&now, &workers, &leases, &both, &deadlines, &5i64, &claimers],
                ),
                ("rescue scan", RESCUE_SCAN_SQL.into(), vec![&now, &50i64]),
                (
                    "listing by status",
                    list_sql(true, false),
                    vec![&51i64, &None::<i64>, &"completed"],
                ),
                (
                    "listing by type",
                    list_sql(false, true),
                    vec![&51i64, &Some(30_000i64), &"video"],
                ),
                (
                    "listing by type and status",
                    list_sql(true, true),
                    vec![&51i64, &None::<i64>, &"audio", &"pending"],
                ),
                ("next deadline", NEXT_DEADLINE_SQL.into(), vec![]),
                (
                    "cleanup batch",
                    CLEANUP_SQL.into(),
                    vec![&"completed", &now, &50i64],
                ),
            ];
            for (what, sql, params) in checks {
                let (rows, plan) = rows_read(&client, &sql, &params).await;
                assert!(rows <= 200, "{what} read {rows} rows:\n{plan}");
            }
        })
        .await;
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .unwrap();
        if let Err(failed) = checked {
            std::panic::resume_unwind(failed.into_panic());
        }
    }
}
