//! The monitor's batches (expired deadlines, retention cleanup) and the folding of
//! statistics counter deltas. Each job's change is planned by `store::plan` and applied
//! conditionally; rows another replica's monitor holds are skipped.

use std::time::Duration;

use super::pool::Conn;
use super::*;

/// One replica at a time folds counter deltas into the totals.
pub(super) const COMPACTION_LOCK: i64 = 0x6d6f_7261_676a_0002;

/// Expired deadlines, nearest first, from the `jobs_deadline` index; rows another
/// replica's monitor holds are skipped.
pub(super) const RESCUE_SCAN_SQL: &str =
    "SELECT seq, status, lease_id, retry_count, result_received_at IS NOT NULL, \
     execution_deadline, heartbeat_deadline \
     FROM jobs WHERE deadline_at IS NOT NULL AND deadline_at <= $1 \
     ORDER BY deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED";
/// The finished jobs of one status past a cutoff that cleanup may delete: their outcome is
/// settled. A hand-off not yet fanned out, or a delivery still pending (or dead, unless
/// the job was cancelled), keeps the job, and with it its hand-offs and deliveries.
/// Written once, for the deleting statement and its dry-run count.
macro_rules! cleanable_jobs_sql {
    ($select:literal, $tail:literal) => {
        concat!(
            $select,
            " FROM jobs WHERE status = $1 AND completed_at < $2 \
             AND status IN ('completed', 'failed', 'timeout', 'cancelled') \
             AND NOT EXISTS (SELECT 1 FROM handoffs h WHERE h.job_id = jobs.id AND h.fanned_out_at IS NULL) \
             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id \
                 AND (d.state = 'pending' OR (d.state = 'dead' AND jobs.status <> 'cancelled')))",
            $tail
        )
    };
}

/// Finished jobs of one status past a cutoff, oldest first from the `jobs_finished` index,
/// deleted with their history (by its primary key, which starts with the job).
pub(super) const CLEANUP_SQL: &str = concat!(
    "WITH victims AS (",
    cleanable_jobs_sql!(
        "SELECT seq",
        " ORDER BY completed_at LIMIT $3 FOR UPDATE SKIP LOCKED"
    ),
    "), \
     gone AS (DELETE FROM jobs USING victims WHERE jobs.seq = victims.seq AND jobs.status = $1 \
         RETURNING jobs.completed_at, jobs.seq, jobs.source_file_path), \
     history AS (DELETE FROM job_history USING gone WHERE job_history.job_seq = gone.seq) \
     SELECT completed_at, seq, source_file_path FROM gone"
);

pub(super) async fn rescue(conn: &mut Conn, p: RescueParams) -> Result<RescueReport, StoreError> {
    let report: RescueReport = in_transaction!(conn, "BEGIN", rescue_batch(conn, &p))?;
    // Folding counter deltas rides along the monitor's passes. The batch above is
    // committed either way, so a failure here must not hide its report.
    if let Err(error) = compact_counters(conn).await {
        tracing::warn!(%error, "cannot fold counter deltas; trying again on the next pass");
    }
    Ok(report)
}

pub(super) async fn rescue_batch(
    conn: &mut Conn,
    p: &RescueParams,
) -> Result<RescueReport, StoreError> {
    let now = p.now.as_micros();
    let mut planner = plan::RescuePlanner::new(p);
    let mut report = RescueReport::default();
    // Rows another replica's monitor is handling right now are skipped, not waited for.
    let statement = conn.statement(RESCUE_SCAN_SQL).await?;
    let expired = conn
        .client
        .query(&statement, &[&now, &(p.limit as i64)])
        .await
        .map_err(pg_error)?;
    for row in expired {
        let (seq, current) = current_from_row(&row, 0)?;
        let planned = planner.plan(&current);
        let expected = planned.expected_status().map(JobStatus::as_str);
        let applied = match &planned {
            plan::RescuePlan::PendingTimeout(end) => transition(
                conn,
                "UPDATE jobs SET status = $2, completed_at = $3, updated_at = $4, deadline_at = NULL, \
                 error_message = $5 WHERE seq = $1 AND status = $6 AND deadline_at <= $4 RETURNING *",
                &[
                    &seq,
                    &end.status.as_str(),
                    &end.completed_at.map(Timestamp::as_micros),
                    &now,
                    &end.error_message,
                    &expected,
                ],
                &end.history.iter().collect::<Vec<_>>(),
                end.handoff,
                p.now,
            )
            .await?
            .is_some(),
            plan::RescuePlan::AttemptTimeout {
                expected_lease,
                expected_retry_count,
                end,
            } => transition(
                conn,
                "UPDATE jobs SET status = $2, retry_count = COALESCE($3, retry_count), \
                 available_at = COALESCE($4, available_at), deadline_at = $5, \
                 completed_at = $6, updated_at = $7, error_message = $8 \
                 WHERE seq = $1 AND status = $11 AND lease_id IS NOT DISTINCT FROM $9 \
                   AND deadline_at <= $7 AND retry_count = $10 RETURNING *",
                &[
                    &seq,
                    &end.status.as_str(),
                    &end.retry_count.map(|n| n as i32),
                    &end.available_at.map(Timestamp::as_micros),
                    &end.deadline_at.map(Timestamp::as_micros),
                    &end.completed_at.map(Timestamp::as_micros),
                    &now,
                    &end.error_message,
                    expected_lease,
                    &(*expected_retry_count as i32),
                    &expected,
                ],
                &end.history.iter().collect::<Vec<_>>(),
                end.handoff,
                p.now,
            )
            .await?
            .is_some(),
            plan::RescuePlan::RetryDue => {
                // Pollers on every replica are woken by the caller.
                let statement = conn
                    .statement("UPDATE jobs SET deadline_at = NULL WHERE seq = $1 AND status = $2")
                    .await?;
                conn.client
                    .execute(&statement, &[&seq, &expected])
                    .await
                    .map_err(pg_error)?
                    == 1
            }
            plan::RescuePlan::ClearDeadline => {
                let statement = conn
                    .statement("UPDATE jobs SET deadline_at = NULL WHERE seq = $1")
                    .await?;
                conn.client
                    .execute(&statement, &[&seq])
                    .await
                    .map_err(pg_error)?;
                false
            }
            plan::RescuePlan::Skip => false,
        };
        if applied {
            planned.count(&mut report);
        }
    }
    Ok(report)
}

/// Deltas folded per statement, so that one statement stays far inside the statement
/// timeout however far compaction fell behind.
pub(super) const COMPACTION_BATCH: i64 = 20_000;
/// How long one call keeps folding batches at most.
pub(super) const COMPACTION_BUDGET: Duration = Duration::from_secs(1);

/// Folds counter deltas into the totals, unless another replica is doing it now.
pub(super) async fn compact_counters(conn: &mut Conn) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    loop {
        let moved = compact_counters_batch(conn).await?;
        if moved < COMPACTION_BATCH as u64 || started.elapsed() > COMPACTION_BUDGET {
            return Ok(());
        }
    }
}

/// Folds one batch; returns how many deltas it moved (0 when another replica holds the lock).
pub(super) async fn compact_counters_batch(conn: &mut Conn) -> Result<u64, StoreError> {
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

/// The rows `CLEANUP_SQL` would delete, counted (without locking them).
pub(super) const COUNT_CLEANABLE_SQL: &str = cleanable_jobs_sql!("SELECT count(*)", "");

pub(super) async fn count_cleanable(
    conn: &mut Conn,
    p: CountCleanableParams,
) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for (status, cutoff) in plan::cleanup_targets(p.retention, p.now) {
        let count: i64 = conn
            .query_value(
                COUNT_CLEANABLE_SQL,
                &[&status.as_str(), &cutoff.as_micros()],
            )
            .await?;
        total += count as u64;
    }
    Ok(total)
}

pub(super) async fn cleanup(
    conn: &mut Conn,
    p: CleanupParams,
) -> Result<CleanupReport, StoreError> {
    let started = std::time::Instant::now();
    let planner = plan::CleanupPlanner::new(&p);
    let stale_counters = planner.stale_creation_counters_before();
    let mut report: CleanupReport = in_transaction!(conn, "BEGIN", cleanup_batch(conn, planner))?;
    let statement = conn
        .statement("DELETE FROM counters WHERE counter = 'created' AND minute < $1")
        .await?;
    conn.client
        .execute(&statement, &[&stale_counters])
        .await
        .map_err(pg_error)?;
    report.busy = started.elapsed();
    Ok(report)
}

/// The database's size; PostgreSQL reports no free space to release (see
/// `Store::release_free_space`).
pub(super) async fn storage_space(conn: &mut Conn) -> Result<StorageSpace, StoreError> {
    let bytes: i64 = conn
        .query_value("SELECT pg_database_size(current_database())", &[])
        .await?;
    Ok(StorageSpace {
        database_bytes: bytes.max(0) as u64,
        free_bytes: 0,
    })
}

pub(super) async fn cleanup_batch(
    conn: &mut Conn,
    mut planner: plan::CleanupPlanner,
) -> Result<CleanupReport, StoreError> {
    while let Some(batch) = planner.next_batch() {
        // Locked rows belong to another replica's cleaner (or a cancel in flight): skip them.
        // History rows are deleted by the same statement.
        let statement = conn.statement(CLEANUP_SQL).await?;
        let mut deleted = conn
            .client
            .query(
                &statement,
                &[
                    &batch.status.as_str(),
                    &batch.cutoff.as_micros(),
                    &(batch.limit as i64),
                ],
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
            planner.deleted(source_file_path);
        }
    }
    for source_file_path in planner.source_files_to_check() {
        let still_used: bool = conn
            .query_value(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE source_file_path = $1)",
                &[&source_file_path],
            )
            .await?;
        if !still_used {
            planner.orphaned(source_file_path);
        }
    }
    Ok(planner.finish())
}
