//! Retention cleanup: deletes finished jobs past retention in bounded batches, then the
//! source files they leave unreferenced, but only files inside the server's own
//! `files/` directory. Files in other allowed roots belong to the operator.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::delivery::dispatcher::Dispatcher;
use crate::domain::RetentionPolicy;
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
            for path in &report.orphaned_source_files {
                if remove_owned_file(&self.files_dir, Path::new(path)).await {
                    summary.n_files_deleted += 1;
                }
            }
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

/// Removes `path` only if it is a regular file that, with every link resolved, still lies
/// inside `files_dir`. A path that now leads elsewhere (a swapped-in symlink) is left alone.
async fn remove_owned_file(files_dir: &Path, path: &Path) -> bool {
    let Ok(resolved) = tokio::fs::canonicalize(path).await else {
        return false;
    };
    if resolved != path || !resolved.starts_with(files_dir) {
        return false;
    }
    match tokio::fs::symlink_metadata(&resolved).await {
        Ok(meta) if meta.is_file() => match tokio::fs::remove_file(&resolved).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, path = %resolved.display(), "cannot delete a cleaned-up job's file");
                false
            }
        },
        _ => false,
    }
}
