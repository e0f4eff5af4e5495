//! The writer thread: the only writing connection, committing every queued write in
//! one transaction (group commit), and the checkpointer thread beside it. Requests'
//! writes go first; background writes (cleanup) run in their own transactions when no
//! request's write waits, or after `BACKGROUND_MAX_WAIT`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, OpenFlags};

use super::{configure, sql_error, Durability, StoreError};

/// Writes committed together at most.
pub(super) const MAX_WRITES_PER_COMMIT: usize = 512;

/// The least time between two background checkpoints: each costs two fsyncs.
pub(super) const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest a background write (a cleanup batch, a release of free pages) waits
/// behind requests' writes: it runs when no request's write is queued, or after this.
pub(super) const BACKGROUND_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

pub(super) type Finisher = Box<dyn FnOnce(Option<StoreError>) + Send>;
pub(super) type WriteJob = Box<dyn FnOnce(&Connection) -> (Finisher, bool) + Send>;

/// A write waiting for the writer.
pub(super) struct QueuedWrite {
    pub(super) job: WriteJob,
    /// Maintenance (cleanup batches) and the dispatcher's bookkeeping: runs after the
    /// requests' writes waiting with it, in a transaction of its own, so a request never
    /// waits for a whole cleanup batch that was queued after it, and the batch never
    /// delays the commit of requests' writes. Deliveries are asynchronous anyway; run
    /// before or with requests' writes, their bookkeeping made every request wait longer
    /// (the lifecycle with two sinks in BENCHMARKS.md).
    pub(super) background: bool,
}

pub(super) fn writer_loop(
    conn: Connection,
    receiver: mpsc::Receiver<QueuedWrite>,
    checkpointer: Checkpointer,
) {
    let mut requests: VecDeque<WriteJob> = VecDeque::new();
    let mut background: VecDeque<(WriteJob, Instant)> = VecDeque::new();
    let sorted = |queued: QueuedWrite,
                  requests: &mut VecDeque<WriteJob>,
                  background: &mut VecDeque<(WriteJob, Instant)>| {
        if queued.background {
            background.push_back((queued.job, Instant::now()));
        } else {
            requests.push_back(queued.job);
        }
    };
    let mut open = true;
    loop {
        if requests.is_empty() && background.is_empty() {
            match receiver.recv() {
                Ok(queued) => sorted(queued, &mut requests, &mut background),
                Err(_) => break,
            }
        }
        while open {
            match receiver.try_recv() {
                Ok(queued) => sorted(queued, &mut requests, &mut background),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        let background_due = background.front().is_some_and(|(_, since)| {
            requests.is_empty() || since.elapsed() >= BACKGROUND_MAX_WAIT
        });
        let batch: Vec<WriteJob> = if background_due {
            background
                .pop_front()
                .map(|(job, _)| job)
                .into_iter()
                .collect()
        } else {
            let n = requests.len().min(MAX_WRITES_PER_COMMIT);
            requests.drain(..n).collect()
        };
        commit_batch(&conn, batch);
        checkpointer.nudge();
    }
    // The sender is gone: the store is closing. Fold the WAL back into the main file.
    checkpointer.stop();
    if let Err(error) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(%error, "sqlite checkpoint at close failed");
    }
    drop(conn);
}

/// Runs `batch` in one transaction, each write in its own savepoint, commits once, and
/// then answers every write's caller.
fn commit_batch(conn: &Connection, batch: Vec<WriteJob>) {
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        let error = sql_error(error);
        for job in batch {
            // The job still has to answer its caller: run nothing, report the error.
            let (finish, _) = job_that_fails(job, conn);
            finish(Some(error.clone()));
        }
        return;
    }
    let mut finishers = Vec::with_capacity(batch.len());
    for job in batch {
        let savepoint = conn.execute_batch("SAVEPOINT op");
        let (finish, ok) = job(conn);
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
}

/// Checkpoints the WAL on its own thread and connection, so the fsyncs of a checkpoint
/// do not hold up the writer and the callers waiting for its next commit. SQLite lets a
/// passive checkpoint run beside the writer. Commits are durable before the checkpoint
/// either way (it only moves committed pages from the log into the database file).
pub(super) struct Checkpointer {
    /// One buffered slot: commits during a checkpoint or the pause after it coalesce.
    commits: mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, durability: Durability) -> Result<Checkpointer, StoreError> {
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

pub(super) fn checkpointer_loop(conn: Connection, committed: mpsc::Receiver<()>) {
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
pub(super) fn job_that_fails(job: WriteJob, conn: &Connection) -> (Finisher, bool) {
    let _ = conn.execute_batch("SAVEPOINT failed_batch");
    let outcome = job(conn);
    let _ = conn.execute_batch("ROLLBACK TO failed_batch; RELEASE failed_batch");
    outcome
}
