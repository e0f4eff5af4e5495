//! The writer thread: the only writing connection, committing every queued write in
//! one transaction (group commit), and the checkpointer thread beside it.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use super::{configure, sql_error, Durability, StoreError};

/// Writes committed together at most.
pub(super) const MAX_WRITES_PER_COMMIT: usize = 512;

/// The least time between two background checkpoints: each costs two fsyncs.
pub(super) const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

pub(super) type Finisher = Box<dyn FnOnce(Option<StoreError>) + Send>;
pub(super) type WriteJob = Box<dyn FnOnce(&Connection) -> (Finisher, bool) + Send>;

pub(super) fn writer_loop(
    conn: Connection,
    receiver: mpsc::Receiver<WriteJob>,
    checkpointer: Checkpointer,
) {
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
