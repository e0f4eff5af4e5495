//! Retention cleanup: deletes finished jobs past retention in bounded batches, then the
//! source files they leave unreferenced, but only files inside the server's own
//! `files/` directory. Files in other allowed roots belong to the operator.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::delivery::dispatcher::Dispatcher;
use crate::domain::RetentionPolicy;
use crate::files::{self, Removal};
use crate::store::{CleanupParams, Store, StoreError};

const CLEANUP_BATCH: usize = 500;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupSummary {
    pub n_jobs_deleted: usize,
    pub n_files_deleted: usize,
}

/// Deletes finished jobs past a retention, and the files only they referred to. Used by
/// the monitor on its interval and by the admin cleanup endpoint with the caller's retention.
#[derive(Clone)]
pub struct Cleaner {
    store: Arc<dyn Store>,
    clock: SharedClock,
    /// The server's own files directory (canonical): the only place files are deleted from.
    files_dir: PathBuf,
    /// Fans out waiting hand-offs before each cleanup: a hand-off not yet fanned out keeps
    /// its job, and cleanup should not wait for the dispatcher's next pass.
    dispatcher: Option<Arc<Dispatcher>>,
}

impl Cleaner {
    pub fn new(store: Arc<dyn Store>, clock: SharedClock, files_dir: PathBuf) -> Self {
        Cleaner {
            store,
            clock,
            files_dir,
            dispatcher: None,
        }
    }

    /// Fans out hand-offs through `dispatcher` before each cleanup.
    pub fn fanning_out_first(mut self, dispatcher: Arc<Dispatcher>) -> Self {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// Deletes finished jobs older than `retention`, in bounded batches, and their files.
    pub async fn cleanup(&self, retention: RetentionPolicy) -> Result<CleanupSummary, StoreError> {
        let mut summary = CleanupSummary::default();
        if let Some(dispatcher) = &self.dispatcher {
            dispatcher.fan_out_once().await?;
        }
        loop {
            let report = self
                .store
                .cleanup_finished(CleanupParams {
                    retention,
                    limit: CLEANUP_BATCH,
                    now: self.clock.now(),
                })
                .await?;
            summary.n_jobs_deleted += report.n_deleted;
            summary.n_files_deleted +=
                remove_owned_files(&self.files_dir, report.orphaned_source_files).await;
            if report.n_deleted < CLEANUP_BATCH {
                break;
            }
        }
        if summary.n_jobs_deleted > 0 {
            tracing::info!(
                jobs = summary.n_jobs_deleted,
                files = summary.n_files_deleted,
                "cleanup deleted finished jobs"
            );
        }
        Ok(summary)
    }
}

/// Removes each of `paths` only if it is a regular file beneath `files_dir`, reached
/// without symlinks; a path that now leads elsewhere (a swapped-in symlink) is left alone.
/// Returns how many were removed.
async fn remove_owned_files(files_dir: &Path, paths: Vec<String>) -> usize {
    if paths.is_empty() {
        return 0;
    }
    let files_dir = files_dir.to_owned();
    // One blocking task per batch: the unlinks are blocking system calls.
    let removing = tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        for path in &paths {
            match files::remove_beneath(&files_dir, Path::new(path)) {
                Ok(Removal::Removed) => removed += 1,
                Ok(Removal::Missing | Removal::Refused) => {}
                Err(error) => {
                    tracing::warn!(%error, path = %path, "cannot delete a cleaned-up job's file");
                }
            }
        }
        removed
    });
    match removing.await {
        Ok(removed) => removed,
        Err(error) => {
            tracing::warn!(%error, "the file cleanup task failed");
            0
        }
    }
}
