//! The PostgreSQL store, for running several replicas against one database.
//!
//! Where SQLite serializes every write through one thread, PostgreSQL lets replicas write
//! at once, so each operation is written to be correct under concurrency by itself:
//! - Every transition is one conditional statement (`UPDATE ... WHERE seq = $1 AND
//!   status = $2 AND lease_id IS NOT DISTINCT FROM $3 ...`) whose data-modifying CTEs also
//!   insert the history rows and the hand-off (outbox) row, so the three are written
//!   atomically without a multi-statement transaction. When the decision depends on the
//!   job's current state (retry count, deadlines), that state is read first, the planning
//!   layer (`store::plan`) decides, and the update is conditional on exactly what was read; zero rows
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

/// Runs `body` inside `begin` (BEGIN, or BEGIN with options) and COMMIT on `conn`, rolling
/// back when it fails; `pg_error` must be in scope where it is used. (When the future is
/// dropped half-way, the pool discards the connection, which rolls back too.) Defined
/// before the submodules so that every one of them can use it.
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

mod batcher;
mod deliveries;
mod hot_ops;
mod idempotent_create;
mod listen;
mod maintenance;
mod ops;
mod pool;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use self::batcher::Batcher;
use self::hot_ops::{Claims, CreateRequest, Creates, Results};
use self::listen::{announce_wakeups, listen_for_wakeups, JOBS_AVAILABLE_CHANNEL};
use self::maintenance::*;
use self::ops::*;
use self::pool::{Conn, Pool};
use super::plan::{self, HistoryStep};
use super::*;

/// Schema migrations, applied in order; the schema's version is how many were applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_jobs.sql"),
    include_str!("../../migrations/postgres/0002_batch_friendly.sql"),
    include_str!("../../migrations/postgres/0003_listing_by_type_then_status.sql"),
    include_str!("../../migrations/postgres/0004_write_probe.sql"),
    include_str!("../../migrations/postgres/0005_deliveries.sql"),
    include_str!("../../migrations/postgres/0006_idempotent_creates.sql"),
    include_str!("../../migrations/postgres/0007_workers.sql"),
    include_str!("../../migrations/postgres/0008_autovacuum.sql"),
    include_str!("../../migrations/postgres/0009_lean_deliveries.sql"),
];

/// The schema version this program creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Serializes migrations of replicas starting at once.
const MIGRATION_LOCK: i64 = 0x6d6f_7261_676a_0001;
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
    /// Wakes dispatchers after a hand-off committed (this replica's and the others').
    handoffs: deliveries::HandoffSignal,
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
            JOBS_AVAILABLE_CHANNEL,
            Some(options.wakeup_fallback),
            replica_id.clone(),
            events_sender,
            stop.clone(),
        ));
        let handoffs = deliveries::HandoffSignal::start(
            config.clone(),
            pool.clone(),
            replica_id.clone(),
            stop.clone(),
        );
        tokio::spawn(announce_wakeups(
            pool.clone(),
            JOBS_AVAILABLE_CHANNEL,
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
            handoffs,
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

impl Store for PostgresStore {
    fn create_job(&self, params: CreateJobParams) -> StoreFuture<'_, Job> {
        Box::pin(async move {
            let outcome = self
                .creates
                .submit(CreateRequest {
                    params,
                    match_unfinished_job: false,
                })
                .await?;
            self.announce.notify_one();
            match outcome {
                CreateOnceOutcome::Created(job) => Ok(job),
                other => Err(StoreError::Internal(format!(
                    "a plain create answered {other:?}"
                ))),
            }
        })
    }

    fn create_job_once(&self, params: CreateOnceParams) -> StoreFuture<'_, CreateOnceOutcome> {
        Box::pin(async move {
            // Without a key, the match against unfinished jobs runs in the batched create
            // (under the tasks' locks); a key needs its own transaction.
            let outcome = match params.idempotency_key {
                None => {
                    self.creates
                        .submit(CreateRequest {
                            params: params.create,
                            match_unfinished_job: params.match_unfinished_job,
                        })
                        .await?
                }
                Some(_) => {
                    self.run(move |c| Box::pin(idempotent_create::create_once(c, params)))
                        .await?
                }
            };
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
        Box::pin(async move {
            let job = self.results.submit(params).await?;
            if plan::result_hands_off(job.status) {
                self.handoffs.committed();
            }
            Ok(job)
        })
    }

    fn release_job(&self, params: ReleaseParams) -> StoreFuture<'_, Job> {
        // Other replicas' long-polling workers may take the released job at once.
        self.run_and_announce(move |c| Box::pin(release(c, params)), |_| true)
    }

    fn cancel_job(&self, params: CancelParams) -> StoreFuture<'_, Job> {
        let work = self.run(move |c| Box::pin(cancel(c, params)));
        Box::pin(async move {
            let job = work.await?;
            self.handoffs.committed();
            Ok(job)
        })
    }

    fn retry_job(&self, params: ManualRetryParams) -> StoreFuture<'_, Job> {
        self.run_and_announce(move |c| Box::pin(manual_retry(c, params)), |_| true)
    }

    fn rescue_expired(&self, params: RescueParams) -> StoreFuture<'_, RescueReport> {
        let work = self.run_and_announce(
            move |c| Box::pin(rescue(c, params)),
            |report| report.n_retries_due > 0,
        );
        Box::pin(async move {
            let report = work.await?;
            if plan::rescue_hands_off(&report) {
                self.handoffs.committed();
            }
            Ok(report)
        })
    }

    fn next_deadline(&self) -> StoreFuture<'_, Option<Timestamp>> {
        self.run(|c| Box::pin(next_deadline(c)))
    }

    fn cleanup_finished(&self, params: CleanupParams) -> StoreFuture<'_, CleanupReport> {
        self.run(move |c| Box::pin(cleanup(c, params)))
    }

    fn count_cleanable(&self, params: CountCleanableParams) -> StoreFuture<'_, u64> {
        self.run(move |c| Box::pin(count_cleanable(c, params)))
    }

    fn storage_space(&self) -> StoreFuture<'_, StorageSpace> {
        self.run(|c| Box::pin(storage_space(c)))
    }

    fn release_free_space(&self, _max_bytes: u64) -> StoreFuture<'_, u64> {
        // Autovacuum makes dead rows' space reusable inside each table; returning it to
        // the file system would take `VACUUM FULL`, which locks the table.
        Box::pin(async { Ok(0) })
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
    use tokio_postgres::types::ToSql;
    use tokio_postgres::NoTls;

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
        let claims = "(int8, text[], text[], text[], int8[], int8, int8, text[], text, text, text)";
        let claimers = |types: &str, deadlines: &str| {
            let leases: Vec<String> = (0..16).map(|i| format!("lease-{i}")).collect();
            format!(
                "(1000000, '{{{}}}', '{{{}}}', '{types}', '{deadlines}', 5, 16, '{{{}}}', 'N', 'processing', 'worker')",
                vec!["w"; 16].join(","),
                leases.join(","),
                vec!["r"; 16].join(",")
            )
        };
        // Two creates that match unfinished jobs of a task with no jobs yet: the first
        // execution inserts them, the second finds them.
        let creates =
            "(text[], text[], text[], text[], text[], int8[], int8[], text, text, text, bool[])";
        let two_creates = "('{c1,c2}', '{audio,audio}', '{/f/7,/f/8}', '{\"{}\",\"{}\"}', '{new-task,new-task}', \
            '{5,5}', '{NULL,NULL}', 'client', 'pending', 'created', '{t,t}')";
        vec![
            (
                format!("create_or_match{two_creates}"),
                hot_ops::create_sql(),
                creates,
                &["jobs_unfinished_by_ingestion_task"],
            ),
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
            let reasons: Vec<&str> = vec!["r"; 16];
            let (placeholder, claimed, actor) = ("N", "processing", "worker");
            let checks: Vec<(&str, String, Vec<&(dyn ToSql + Sync)>)> = vec![
                (
                    "claim of one type",
                    hot_ops::claim_sql(false),
                    vec![&now, &workers, &leases, &audio, &one_deadline, &5i64, &claimers, &reasons, &placeholder, &claimed, &actor],
                ),
                (
                    "claim of two types",
                    hot_ops::claim_sql(false),
                    vec![&now, &workers, &leases, &both, &deadlines, &5i64, &claimers, &reasons, &placeholder, &claimed, &actor],
                ),
                (
                    "claim of any type",
                    hot_ops::claim_sql(true),
                    vec![&now, &workers, &leases, &both, &deadlines, &5i64, &claimers, &reasons, &placeholder, &claimed, &actor],
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
                // A cleanup pass counts its work first: 50 of the 20,000 finished jobs
                // completed before 40,051, and the count reads only those.
                (
                    "cleanup count",
                    COUNT_CLEANABLE_SQL.into(),
                    vec![&"completed", &40_051i64],
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
