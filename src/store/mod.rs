//! The storage interface. One method per operation, each taking a params struct that
//! carries `now`. Every state change is a single conditional write: when the job is not in
//! the state the operation expects (or the lease does not match) nothing is written and
//! the method says why. Only the backend files in this folder contain SQL.

pub mod deliveries;
pub mod plan;
pub mod postgres;
pub mod sqlite;
pub mod workers;

pub use deliveries::DeliveryStore;
pub use workers::WorkerRegistryStore;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::domain::{
    ContentType, HandoffKind, Job, JobDetail, JobId, JobResult, JobStatus, LeaseId,
    LifecyclePolicy, RetentionPolicy, TimeoutPolicy, WorkerId,
};

/// Which backend stores the jobs, and where; shared by `serve`, `migrate` and
/// `import-morag-dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseTarget {
    Sqlite(PathBuf),
    Postgres(DatabaseUrl),
}

/// A PostgreSQL URL. Its `Debug` output hides the password, so a logged config never
/// shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // postgres://user:secret@host/db -> postgres://user:***@host/db
        let text = &self.0;
        match (text.find("://"), text.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let credentials = &text[scheme + 3..at];
                let user = credentials.split(':').next().unwrap_or("");
                write!(
                    f,
                    "DatabaseUrl({}{user}:***{})",
                    &text[..scheme + 3],
                    &text[at..]
                )
            }
            _ => write!(f, "DatabaseUrl({text})"),
        }
    }
}

/// How hard a SQLite commit is pushed to disk (PostgreSQL uses its own settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL`: a commit survives the server process being killed (the WAL
    /// is in the OS page cache); after a power loss the last commits may be lost, but the
    /// database stays consistent.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is fsynced before it is acknowledged, so it
    /// survives power loss too, at a large cost in write throughput.
    Full,
}

/// Backend settings that are not part of the target.
#[derive(Clone, Copy, Debug)]
pub struct StoreSettings {
    /// SQLite only.
    pub durability: Durability,
    /// PostgreSQL connections per replica at most.
    pub max_connections: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            durability: Durability::Normal,
            max_connections: 16,
        }
    }
}

/// What `migrate` found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    pub from_version: i64,
    pub to_version: i64,
}

fn postgres_options(url: &DatabaseUrl, settings: &StoreSettings) -> postgres::PostgresOptions {
    let mut options = postgres::PostgresOptions::new(url.expose());
    options.max_connections = settings.max_connections.max(1);
    options
}

/// Opens the store at `target`, running its migrations first. A database whose schema is
/// newer than this program is refused (`StoreError::SchemaTooNew`). The one way `serve`,
/// `migrate` and `import-morag-dir` open a store.
pub async fn open(
    target: &DatabaseTarget,
    settings: &StoreSettings,
) -> Result<Arc<dyn Store>, StoreError> {
    match target {
        DatabaseTarget::Sqlite(path) => {
            let options = sqlite::SqliteOptions {
                path: path.clone(),
                durability: settings.durability,
            };
            // Opening creates the file and runs migrations: blocking IO.
            let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(options))
                .await
                .map_err(|error| StoreError::Internal(error.to_string()))??;
            Ok(Arc::new(store))
        }
        DatabaseTarget::Postgres(url) => Ok(Arc::new(
            postgres::PostgresStore::open(postgres_options(url, settings)).await?,
        )),
    }
}

/// Brings the schema at `target` up to date without serving.
pub async fn migrate(
    target: &DatabaseTarget,
    settings: &StoreSettings,
) -> Result<MigrationReport, StoreError> {
    match target {
        DatabaseTarget::Postgres(url) => {
            postgres::PostgresStore::migrate(&postgres_options(url, settings)).await
        }
        DatabaseTarget::Sqlite(path) => {
            let options = sqlite::SqliteOptions {
                path: path.clone(),
                durability: settings.durability,
            };
            tokio::task::spawn_blocking(move || sqlite::migrate_file(&options))
                .await
                .map_err(|error| StoreError::Internal(error.to_string()))?
        }
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("job not found")]
    NotFound,
    /// The job is not in a state the operation may move it from.
    #[error("job is {current}; that transition is not allowed")]
    InvalidTransition { current: JobStatus },
    /// The caller's lease is not the job's current one: its attempt was taken away.
    #[error("lease does not match the job's current attempt (job is {current})")]
    LeaseMismatch { current: JobStatus },
    /// The attempt's deadline passed: the monitor is about to time it out, and a heartbeat
    /// cannot revive it.
    #[error("the attempt's deadline has passed")]
    DeadlinePassed,
    /// The job was released as often as a job may be (`plan::MAX_RELEASES_PER_JOB`).
    #[error("the job was released {limit} times already, the most a job may be")]
    ReleaseLimitReached { limit: u32 },
    /// The database cannot be reached or is shutting down; the caller may try again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The stored schema is newer than this program knows.
    #[error("schema version {found} is newer than this program's {known}; upgrade morag-jobs")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("store error: {0}")]
    Internal(String),
}

/// A new job, already validated.
#[derive(Clone, Debug)]
pub struct CreateJobParams {
    pub id: JobId,
    pub content_type: ContentType,
    pub source_file_path: String,
    pub task_options: serde_json::Value,
    pub ingestion_task_id: String,
    pub pending_deadline: Option<Timestamp>,
    pub now: Timestamp,
}

/// A create that may repeat an earlier one whose answer the client lost; see
/// `Store::create_job_once`.
#[derive(Clone, Debug)]
pub struct CreateOnceParams {
    pub create: CreateJobParams,
    /// The request's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<IdempotencyKeyParams>,
    /// Whether an unfinished job (pending, processing or retrying) of the same ingestion
    /// task, source file and content type counts as this create.
    pub match_unfinished_job: bool,
}

#[derive(Clone, Debug)]
pub struct IdempotencyKeyParams {
    pub key: String,
    /// A digest of the request, to tell a repeat from a different request with the same key.
    pub request_digest: String,
    /// Until when the key answers with the job it created.
    pub expires_at: Timestamp,
}

/// What `create_job_once` did.
#[derive(Clone, Debug, PartialEq)]
pub enum CreateOnceOutcome {
    /// Nothing matched: a new job.
    Created(Job),
    /// The key was used before with the same request: its original answer.
    KeyReplayed {
        job_id: JobId,
        created_at: Timestamp,
    },
    /// An unfinished job of the same ingestion task, source and type.
    MatchedUnfinished(Job),
    /// The key was used before with a different request; nothing was written.
    KeyReusedForOtherRequest,
}

/// A worker asking for the oldest due job of some content types.
#[derive(Clone, Debug)]
pub struct ClaimParams {
    pub worker_id: WorkerId,
    /// Empty means any type.
    pub content_types: Vec<ContentType>,
    pub timeouts: TimeoutPolicy,
    pub now: Timestamp,
}

#[derive(Clone, Debug)]
pub struct HeartbeatParams {
    pub job_id: JobId,
    pub lease_id: LeaseId,
    pub progress: Option<f64>,
    pub message: Option<String>,
    pub timeouts: TimeoutPolicy,
    pub now: Timestamp,
}

/// What a heartbeat found.
#[derive(Clone, Debug, PartialEq)]
pub struct HeartbeatOutcome {
    pub status: JobStatus,
    /// True when an admin cancelled the job: the worker should stop.
    pub cancelled: bool,
    pub execution_deadline: Option<Timestamp>,
    pub heartbeat_deadline: Option<Timestamp>,
}

/// What a worker reports for its attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    Success {
        content: String,
        metadata: serde_json::Value,
        processing_time: Option<f64>,
    },
    Failure {
        error_message: String,
        /// False when retrying cannot help (a corrupt file): the failure is final at once.
        retryable: bool,
    },
}

#[derive(Clone, Debug)]
pub struct SubmitResultParams {
    pub job_id: JobId,
    /// MoRAG's client sends none; then the result is accepted while the job is processing.
    pub lease_id: Option<LeaseId>,
    pub outcome: AttemptOutcome,
    pub policy: LifecyclePolicy,
    /// A number in [0, 1) for the retry backoff's jitter.
    pub jitter: f64,
    pub now: Timestamp,
}

/// A worker handing its attempt back (it is shutting down): the job becomes claimable at
/// once without spending a retry.
#[derive(Clone, Debug)]
pub struct ReleaseParams {
    pub job_id: JobId,
    pub lease_id: LeaseId,
    /// The worker's own words, recorded in the history.
    pub reason: Option<String>,
    pub now: Timestamp,
}

#[derive(Clone, Debug)]
pub struct CancelParams {
    pub job_id: JobId,
    pub reason: String,
    pub now: Timestamp,
}

/// An admin retry of a failed or timed-out job: claimable at once, retry budget reset.
#[derive(Clone, Debug)]
pub struct ManualRetryParams {
    pub job_id: JobId,
    pub now: Timestamp,
}

#[derive(Clone, Debug)]
pub struct RescueParams {
    pub policy: LifecyclePolicy,
    /// Jobs handled per call at most.
    pub limit: usize,
    /// Seeds the backoff jitter of this batch.
    pub jitter_seed: u64,
    pub now: Timestamp,
}

/// What one pass over expired deadlines did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// Pending jobs that no worker claimed in time (final).
    pub n_pending_timed_out: usize,
    /// Attempts past their execution or heartbeat deadline.
    pub n_attempts_timed_out: usize,
    /// Of those, how many were scheduled for a retry.
    pub n_retries_scheduled: usize,
    /// Retrying jobs whose backoff delay passed: they became claimable.
    pub n_retries_due: usize,
}

impl RescueReport {
    pub fn changed_anything(&self) -> bool {
        *self != RescueReport::default()
    }
}

#[derive(Clone, Debug)]
pub struct CleanupParams {
    pub retention: RetentionPolicy,
    pub limit: usize,
    pub now: Timestamp,
}

/// Which finished jobs a cleanup at `now` would delete (for a dry run).
#[derive(Clone, Debug)]
pub struct CountCleanableParams {
    pub retention: RetentionPolicy,
    pub now: Timestamp,
}

/// Jobs deleted by one cleanup batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub n_deleted: usize,
    /// Source files no remaining job refers to: the caller deletes those inside the
    /// server's own files directory.
    pub orphaned_source_files: Vec<String>,
    /// How long the batch kept the store busy: on SQLite the time it held the writer
    /// (not its wait in the writer's queue), on PostgreSQL its statements' round trips.
    /// The cleaner paces itself by it.
    pub busy: std::time::Duration,
}

/// The size of the database and the free space inside it (pages a deletion freed that
/// new rows have not taken again), in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageSpace {
    /// The database's size on disk (SQLite: the main file, without the WAL; PostgreSQL:
    /// `pg_database_size`).
    pub database_bytes: u64,
    /// Free space inside it that `release_free_space` could return to the file system
    /// (SQLite's free pages; always 0 on PostgreSQL, where autovacuum manages free space).
    pub free_bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub status: Option<JobStatus>,
    pub content_type: Option<ContentType>,
    pub limit: usize,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<i64>,
}

/// Newest first.
#[derive(Clone, Debug)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Statistics {
    pub status_counts: BTreeMap<JobStatus, u64>,
    pub content_type_counts: BTreeMap<String, u64>,
    pub total_jobs: u64,
    pub storage_bytes: u64,
    /// Mean seconds from claim to completion of completed jobs, per content type.
    pub avg_processing_secs: BTreeMap<String, f64>,
    pub created_last_24h: u64,
}

/// A recorded hand-off to the ingestion pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Handoff {
    pub id: i64,
    pub job_id: JobId,
    pub kind: HandoffKind,
    pub payload: serde_json::Value,
    pub created_at: Timestamp,
}

/// A job brought over from elsewhere (MoRAG's `remote_jobs` directory), stored as it is.
#[derive(Clone, Debug)]
pub struct ImportJobParams {
    /// Every field is stored as given; the store decides nothing.
    pub job: Job,
    /// A completed job's result.
    pub result: Option<JobResult>,
    /// When the monitor must look at the job (its pending or attempt deadline), if ever.
    pub deadline_at: Option<Timestamp>,
    /// Recorded as the job's first history entry (from nothing to its status).
    pub reason: String,
    pub now: Timestamp,
}

/// What an import did with one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    /// A job with that id exists already; it was left unchanged.
    AlreadyExists,
}

/// The storage interface every backend implements; see the conformance suite in
/// `tests/it/store_conformance.rs`.
pub trait Store: DeliveryStore + WorkerRegistryStore + Send + Sync + 'static {
    fn create_job(&self, params: CreateJobParams) -> StoreFuture<'_, Job>;
    /// Creates a job unless the request repeats an earlier create (by its idempotency key,
    /// or as a job of the same ingestion task that is not finished yet). The lookups, the
    /// insert and the key's record are one transaction, so two identical requests racing
    /// make one job.
    fn create_job_once(&self, params: CreateOnceParams) -> StoreFuture<'_, CreateOnceOutcome>;
    /// Claims the oldest due job (by the time it became claimable) of the given types.
    fn claim_job(&self, params: ClaimParams) -> StoreFuture<'_, Option<Job>>;
    fn heartbeat(&self, params: HeartbeatParams) -> StoreFuture<'_, HeartbeatOutcome>;
    fn submit_result(&self, params: SubmitResultParams) -> StoreFuture<'_, Job>;
    /// Hands a processing attempt back: pending again at once, retry count unchanged.
    fn release_job(&self, params: ReleaseParams) -> StoreFuture<'_, Job>;
    fn cancel_job(&self, params: CancelParams) -> StoreFuture<'_, Job>;
    fn retry_job(&self, params: ManualRetryParams) -> StoreFuture<'_, Job>;
    /// Times out expired jobs and makes due retries claimable, at most `limit` jobs.
    fn rescue_expired(&self, params: RescueParams) -> StoreFuture<'_, RescueReport>;
    /// The earliest deadline the monitor must act on, if any.
    fn next_deadline(&self) -> StoreFuture<'_, Option<Timestamp>>;
    /// Deletes at most `limit` finished jobs past retention, with their history.
    fn cleanup_finished(&self, params: CleanupParams) -> StoreFuture<'_, CleanupReport>;
    /// How many finished jobs `cleanup_finished` with the same retention would delete;
    /// deletes nothing.
    fn count_cleanable(&self, params: CountCleanableParams) -> StoreFuture<'_, u64>;
    /// The database's size and its free space.
    fn storage_space(&self) -> StoreFuture<'_, StorageSpace>;
    /// Returns at most `max_bytes` of the free space inside the database to the file
    /// system, as a background write (SQLite: `PRAGMA incremental_vacuum`); answers how
    /// many bytes it returned. PostgreSQL returns nothing here: its autovacuum makes
    /// dead rows' space reusable, and the hot tables' settings keep it ahead (see the
    /// migration `0008_autovacuum.sql`).
    fn release_free_space(&self, max_bytes: u64) -> StoreFuture<'_, u64>;
    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>>;
    fn get_job_detail(&self, id: JobId) -> StoreFuture<'_, Option<JobDetail>>;
    fn list_jobs(&self, params: ListParams) -> StoreFuture<'_, JobPage>;
    fn statistics(&self, now: Timestamp) -> StoreFuture<'_, Statistics>;
    /// Recorded hand-offs not yet delivered to every sink (not fanned out, or with a
    /// delivery still pending or dead), oldest first. For tests and diagnosis: it reads
    /// every hand-off.
    fn pending_handoffs(&self, limit: usize) -> StoreFuture<'_, Vec<Handoff>>;
    /// Inserts a job as it is, unless one with its id exists (then nothing changes).
    fn import_job(&self, params: ImportJobParams) -> StoreFuture<'_, ImportOutcome>;
    /// Checks the database answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
    /// Writes and commits one tiny row, to prove writes still succeed (a database on a
    /// full or read-only disk still answers reads). Touches no job.
    fn probe_write(&self, now: Timestamp) -> StoreFuture<'_, ()>;
    /// Wake-ups for long-polling workers from outside this process: the value changes
    /// whenever a job may have become claimable through another replica (or at a periodic
    /// fallback tick). `None` when every write goes through this process, as with SQLite,
    /// where the API and the monitor wake pollers themselves.
    fn jobs_available_events(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Flushes and closes; later calls answer `Unavailable`.
    fn close(&self) -> StoreFuture<'_, ()>;
}
