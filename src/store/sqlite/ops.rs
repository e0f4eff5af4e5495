//! The operations: each reads what its plan needs, asks the planning layer
//! (`store::plan`) and applies the plan in the writer's transaction; and the reads.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::plan::{self, HistoryStep};
use super::super::*;
use crate::domain::{Actor, HistoryEntry, JobResult};

/// The oldest due job of one content type: the first entry of a `jobs_queue` range.
pub(super) const CLAIM_PROBE_SQL: &str = "SELECT available_at, seq, status FROM jobs \
     WHERE status IN ('pending', 'retrying') AND content_type = ?1 AND available_at <= ?2 \
     ORDER BY available_at, seq LIMIT 1";
/// Expired deadlines, nearest first, from the `jobs_deadline` index.
pub(super) const RESCUE_SCAN_SQL: &str = "SELECT seq, status, lease_id, retry_count, result_received_at, \
     execution_deadline, heartbeat_deadline FROM jobs WHERE deadline_at IS NOT NULL AND deadline_at <= ?1 \
     ORDER BY deadline_at LIMIT ?2";
pub(super) const NEXT_DEADLINE_SQL: &str =
    "SELECT deadline_at FROM jobs WHERE deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1";
/// The condition a finished job must meet to be deleted by cleanup, beyond its status and
/// age: its outcome is settled. A hand-off not yet fanned out, or a delivery still pending
/// (or dead, unless the job was cancelled), keeps the job, and with it its hand-offs and
/// deliveries. Written once, for the scan and its dry-run count.
macro_rules! cleanable_jobs_sql {
    ($select:literal, $tail:literal) => {
        concat!(
            $select,
            " FROM jobs INDEXED BY jobs_finished \
             WHERE status = ?1 AND status IN ('completed', 'failed', 'timeout', 'cancelled') \
             AND completed_at < ?2 \
             AND NOT EXISTS (SELECT 1 FROM handoffs h WHERE h.job_id = jobs.id AND h.fanned_out_at IS NULL) \
             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id \
                             AND (d.state = 'pending' OR (d.state = 'dead' AND jobs.status <> 'cancelled')))",
            $tail
        )
    };
}

/// Finished jobs of one status past a cutoff, from the `jobs_finished` index.
/// The repeated status list lets SQLite prove the partial index applies; `INDEXED BY`
/// keeps the planner from preferring `jobs_by_status` and sorting every finished job.
pub(super) const CLEANUP_SCAN_SQL: &str = cleanable_jobs_sql!(
    "SELECT seq, source_file_path",
    " ORDER BY completed_at LIMIT ?3"
);

/// `CLEANUP_SCAN_SQL`'s rows, counted: jobs whose outcome is still to be delivered stay.
pub(super) const COUNT_CLEANABLE_SQL: &str = cleanable_jobs_sql!("SELECT count(*)", "");

pub(super) const JOB_COLUMNS: &str = "seq, id, content_type, source_file_path, task_options, ingestion_task_id, status, \
     worker_id, lease_id, attempt, retry_count, created_at, started_at, completed_at, updated_at, available_at, \
     execution_deadline, heartbeat_deadline, last_heartbeat_at, progress, progress_message, error_message";

/// A result's columns, read only by the detail read (after `JOB_COLUMNS`).
pub(super) const RESULT_COLUMNS: &str = "result_content, result_metadata, processing_time";

pub(super) fn ts(column: Option<i64>) -> Option<Timestamp> {
    column.map(Timestamp::from_micros)
}

pub(super) fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("stored {what} {value:?} is invalid").into(),
    )
}

pub(super) fn parse_status(text: &str) -> rusqlite::Result<JobStatus> {
    JobStatus::parse(text).ok_or_else(|| corrupt("status", text))
}

pub(super) fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
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
pub(super) fn result_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<JobResult>> {
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

pub(super) fn select_job_by_seq(conn: &Connection, seq: i64) -> Result<Job, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([seq], job_from_row)?)
}

pub(super) fn select_job_by_id(
    conn: &Connection,
    id: JobId,
) -> Result<Option<(i64, Job)>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.to_string()], |row| {
            Ok((row.get::<_, i64>(0)?, job_from_row(row)?))
        })
        .optional()?)
}

/// The job with its result, by id.
pub(super) fn select_job_and_result(
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

pub(super) fn record_history(
    conn: &Connection,
    seq: i64,
    at: Timestamp,
    step: &HistoryStep,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO job_history (job_seq, from_status, to_status, at, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        seq,
        step.from.map(JobStatus::as_str),
        step.to.as_str(),
        at.as_micros(),
        step.actor.as_str(),
        step.reason
    ])?;
    Ok(())
}

/// Records a planned hand-off, in the caller's transaction.
pub(super) fn record_handoff(
    conn: &Connection,
    job: &Job,
    kind: Option<HandoffKind>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let Some(kind) = kind else {
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

/// The columns a plan is made from (`plan::Row`), in `row_from_columns`' order.
pub(super) const ROW_COLUMNS: &str =
    "seq, status, lease_id, retry_count, result_received_at, execution_deadline, heartbeat_deadline";

pub(super) fn row_from_columns(row: &Row<'_>) -> rusqlite::Result<(i64, plan::Row)> {
    Ok((
        row.get(0)?,
        plan::Row {
            status: parse_status(&row.get::<_, String>(1)?)?,
            lease_id: row.get(2)?,
            retry_count: row.get(3)?,
            result_received: row.get::<_, Option<i64>>(4)?.is_some(),
            execution_deadline: ts(row.get(5)?),
            heartbeat_deadline: ts(row.get(6)?),
        },
    ))
}

/// The job's row as a plan needs it, with its `seq`.
pub(super) fn current_row(conn: &Connection, id: JobId) -> Result<(i64, plan::Row), StoreError> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM jobs WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row([id.to_string()], row_from_columns)
        .optional()?
        .ok_or(StoreError::NotFound)
}

/// Zero rows changed by a conditional update means someone else moved the job first.
/// (The writer runs one operation at a time, so this is a guard, not a race.)
pub(super) fn expect_one_row(changed: usize, current: JobStatus) -> Result<(), StoreError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::InvalidTransition { current })
    }
}

pub(super) fn create(conn: &Connection, p: CreateJobParams) -> Result<Job, StoreError> {
    let now = p.now.as_micros();
    let step = plan::created_step();
    let seq: i64 = conn
        .prepare_cached(
            "INSERT INTO jobs (id, content_type, source_file_path, task_options, ingestion_task_id, status, \
             created_at, updated_at, available_at, deadline_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?8, ?6, ?6, ?6, ?7) RETURNING seq",
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
                step.to.as_str(),
            ],
            |row| row.get(0),
        )?;
    record_history(conn, seq, p.now, &step)?;
    select_job_by_seq(conn, seq)
}

pub(super) fn claim(conn: &Connection, p: ClaimParams) -> Result<Option<Job>, StoreError> {
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
    let deadlines = plan::claim_deadlines(&p.timeouts, &content_type, p.now);
    let lease = LeaseId::new_random();
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = ?8, worker_id = ?2, lease_id = ?3, attempt = attempt + 1, \
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
            plan::CLAIMED_STATUS.as_str(),
        ])?;
    expect_one_row(changed, previous)?;
    let job = select_job_by_seq(conn, seq)?;
    let step = plan::claim_step(previous, p.worker_id.as_str(), job.attempt);
    record_history(conn, seq, p.now, &step)?;
    Ok(Some(job))
}

pub(super) fn heartbeat(
    conn: &Connection,
    p: HeartbeatParams,
) -> Result<HeartbeatOutcome, StoreError> {
    let (seq, row) = current_row(conn, p.job_id)?;
    let planned = plan::plan_heartbeat(&row, &p)?;
    let plan::HeartbeatPlan::Extend {
        expected_status,
        expected_lease,
        expected_execution_deadline,
        deadlines,
        deadline_at,
    } = &planned
    else {
        return Ok(planned.outcome());
    };
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET heartbeat_deadline = ?2, deadline_at = ?3, last_heartbeat_at = ?4, updated_at = ?4, \
             progress = COALESCE(?5, progress), progress_message = COALESCE(?6, progress_message) \
             WHERE seq = ?1 AND status = ?7 AND lease_id = ?8 AND deadline_at > ?4 AND execution_deadline = ?9",
        )?
        .execute(params![
            seq,
            deadlines.heartbeat.map(Timestamp::as_micros),
            deadline_at.as_micros(),
            p.now.as_micros(),
            p.progress,
            p.message,
            expected_status.as_str(),
            expected_lease,
            expected_execution_deadline.as_micros(),
        ])?;
    if changed != 1 {
        return Err(plan::heartbeat_not_applied(Some(row.status)));
    }
    Ok(planned.outcome())
}

/// Writes a planned failed or timed-out attempt's columns, on the plan's conditions
/// (`condition`, with its parameters from `?10` on), and its history and hand-off. Returns
/// whether the conditions matched.
pub(super) fn write_attempt_end(
    conn: &Connection,
    seq: i64,
    end: &plan::AttemptEnd,
    condition: &str,
    condition_params: &[&dyn rusqlite::ToSql],
    result_received: bool,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let sql = format!(
        "UPDATE jobs SET status = ?2, retry_count = COALESCE(?3, retry_count), \
         available_at = COALESCE(?4, available_at), deadline_at = ?5, completed_at = ?6, updated_at = ?7, \
         error_message = ?8, result_received_at = CASE WHEN ?9 THEN ?7 ELSE result_received_at END \
         WHERE seq = ?1 AND {condition}"
    );
    let micros = |t: Option<Timestamp>| t.map(Timestamp::as_micros);
    let status = end.status.as_str();
    let available_at = micros(end.available_at);
    let deadline_at = micros(end.deadline_at);
    let completed_at = micros(end.completed_at);
    let at = now.as_micros();
    let mut all: Vec<&dyn rusqlite::ToSql> = vec![
        &seq,
        &status,
        &end.retry_count,
        &available_at,
        &deadline_at,
        &completed_at,
        &at,
        &end.error_message,
        &result_received,
    ];
    all.extend_from_slice(condition_params);
    let changed = conn.prepare_cached(&sql)?.execute(all.as_slice())?;
    if changed != 1 {
        return Ok(false);
    }
    for step in &end.history {
        record_history(conn, seq, now, step)?;
    }
    if end.handoff.is_some() {
        record_handoff(conn, &select_job_by_seq(conn, seq)?, end.handoff, now)?;
    }
    Ok(true)
}

pub(super) fn submit_result(conn: &Connection, p: SubmitResultParams) -> Result<Job, StoreError> {
    let (seq, row) = current_row(conn, p.job_id)?;
    let planned = plan::plan_result(&row, &p)?;
    let lease = planned.expected_lease.expected();
    match (&planned.change, &p.outcome) {
        (
            plan::ResultChange::Success {
                status,
                completed_at,
                history,
                handoff,
            },
            AttemptOutcome::Success {
                content,
                metadata,
                processing_time,
            },
        ) => {
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET status = ?8, completed_at = ?2, updated_at = ?2, deadline_at = NULL, \
                     result_received_at = ?2, result_content = ?3, result_metadata = ?4, processing_time = ?5, \
                     error_message = NULL, progress = 100 \
                     WHERE seq = ?1 AND status = ?6 AND lease_id IS ?7 AND result_received_at IS NULL",
                )?
                .execute(params![
                    seq,
                    completed_at.as_micros(),
                    content,
                    metadata.to_string(),
                    processing_time,
                    planned.expected_status.as_str(),
                    lease,
                    status.as_str(),
                ])?;
            expect_one_row(changed, row.status)?;
            record_history(conn, seq, p.now, history)?;
            let job = select_job_by_seq(conn, seq)?;
            record_handoff(conn, &job, Some(*handoff), p.now)?;
            Ok(job)
        }
        (plan::ResultChange::Failure(end), _) => {
            let applied = write_attempt_end(
                conn,
                seq,
                end,
                "status = ?10 AND lease_id IS ?11 AND result_received_at IS NULL",
                &[&planned.expected_status.as_str(), &lease],
                true,
                p.now,
            )?;
            if !applied {
                return Err(StoreError::InvalidTransition {
                    current: row.status,
                });
            }
            select_job_by_seq(conn, seq)
        }
        (plan::ResultChange::Success { .. }, AttemptOutcome::Failure { .. }) => Err(
            StoreError::Internal("a failure was planned as a success".into()),
        ),
    }
}
pub(super) fn import(conn: &Connection, p: ImportJobParams) -> Result<ImportOutcome, StoreError> {
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
    record_history(
        conn,
        seq,
        p.now,
        &plan::imported_step(job.status, &p.reason),
    )?;
    Ok(ImportOutcome::Imported)
}

pub(super) fn release(conn: &Connection, p: ReleaseParams) -> Result<Job, StoreError> {
    let (seq, row) = current_row(conn, p.job_id)?;
    let (from, to) = plan::RELEASE_STEP;
    let n_released: u32 = conn
        .prepare_cached(
            "SELECT count(*) FROM job_history WHERE job_seq = ?1 AND from_status = ?2 AND to_status = ?3",
        )?
        .query_row(params![seq, from.as_str(), to.as_str()], |r| r.get(0))?;
    let planned = plan::plan_release(&row, &p, n_released)?;
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = ?4, lease_id = NULL, execution_deadline = NULL, \
             heartbeat_deadline = NULL, deadline_at = NULL, progress = NULL, progress_message = NULL, \
             updated_at = ?5 WHERE seq = ?1 AND status = ?2 AND lease_id = ?3",
        )?
        .execute(params![
            seq,
            planned.expected_status.as_str(),
            planned.expected_lease,
            planned.status.as_str(),
            p.now.as_micros(),
        ])?;
    if changed != 1 {
        return Err(plan::release_not_applied(Some(row.status)));
    }
    record_history(conn, seq, p.now, &planned.history)?;
    select_job_by_seq(conn, seq)
}

pub(super) fn cancel(conn: &Connection, p: CancelParams) -> Result<Job, StoreError> {
    let (seq, row) = current_row(conn, p.job_id)?;
    let planned = plan::plan_cancel(&row, &p)?;
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = ?4, completed_at = COALESCE(?2, completed_at), updated_at = ?5, \
             deadline_at = NULL WHERE seq = ?1 AND status = ?3",
        )?
        .execute(params![
            seq,
            planned.completed_at.map(Timestamp::as_micros),
            planned.expected_status.as_str(),
            planned.status.as_str(),
            p.now.as_micros(),
        ])?;
    expect_one_row(changed, row.status)?;
    record_history(conn, seq, p.now, &planned.history)?;
    let job = select_job_by_seq(conn, seq)?;
    record_handoff(conn, &job, planned.handoff, p.now)?;
    Ok(job)
}

pub(super) fn manual_retry(conn: &Connection, p: ManualRetryParams) -> Result<Job, StoreError> {
    let (seq, row) = current_row(conn, p.job_id)?;
    let planned = plan::plan_manual_retry(&row, &p)?;
    let changed = conn
        .prepare_cached(
            "UPDATE jobs SET status = ?4, retry_count = ?5, available_at = ?2, deadline_at = NULL, \
             completed_at = NULL, updated_at = ?6 WHERE seq = ?1 AND status = ?3",
        )?
        .execute(params![
            seq,
            planned.available_at.as_micros(),
            planned.expected_status.as_str(),
            planned.status.as_str(),
            planned.retry_count,
            p.now.as_micros(),
        ])?;
    expect_one_row(changed, row.status)?;
    record_history(conn, seq, p.now, &planned.history)?;
    select_job_by_seq(conn, seq)
}

pub(super) fn rescue(conn: &Connection, p: RescueParams) -> Result<RescueReport, StoreError> {
    let now = p.now.as_micros();
    let mut planner = plan::RescuePlanner::new(&p);
    let mut report = RescueReport::default();
    let expired: Vec<(i64, plan::Row)> = conn
        .prepare_cached(RESCUE_SCAN_SQL)?
        .query_map(params![now, p.limit as i64], row_from_columns)?
        .collect::<Result<_, _>>()?;
    for (seq, row) in expired {
        let planned = planner.plan(&row);
        let expected = planned.expected_status().map(JobStatus::as_str);
        let applied = match &planned {
            plan::RescuePlan::PendingTimeout(end) => write_attempt_end(
                conn,
                seq,
                end,
                "status = ?10 AND deadline_at <= ?7",
                &[&expected],
                false,
                p.now,
            )?,
            plan::RescuePlan::AttemptTimeout {
                expected_lease,
                expected_retry_count,
                end,
            } => write_attempt_end(
                conn,
                seq,
                end,
                "status = ?10 AND lease_id IS ?11 AND retry_count = ?12 AND deadline_at <= ?7",
                &[&expected, expected_lease, expected_retry_count],
                false,
                p.now,
            )?,
            plan::RescuePlan::RetryDue => {
                conn.prepare_cached(
                    "UPDATE jobs SET deadline_at = NULL WHERE seq = ?1 AND status = ?2",
                )?
                .execute(params![seq, expected])?
                    == 1
            }
            plan::RescuePlan::ClearDeadline => {
                conn.prepare_cached("UPDATE jobs SET deadline_at = NULL WHERE seq = ?1")?
                    .execute([seq])?;
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

pub(super) fn count_cleanable(
    conn: &Connection,
    p: CountCleanableParams,
) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for (status, cutoff) in plan::cleanup_targets(p.retention, p.now) {
        let count: i64 = conn
            .prepare_cached(COUNT_CLEANABLE_SQL)?
            .query_row(params![status.as_str(), cutoff.as_micros()], |row| {
                row.get(0)
            })?;
        total += count as u64;
    }
    Ok(total)
}

pub(super) fn cleanup(conn: &Connection, p: CleanupParams) -> Result<CleanupReport, StoreError> {
    let mut planner = plan::CleanupPlanner::new(&p);
    while let Some(batch) = planner.next_batch() {
        let victims: Vec<(i64, String)> = conn
            .prepare_cached(CLEANUP_SCAN_SQL)?
            .query_map(
                params![
                    batch.status.as_str(),
                    batch.cutoff.as_micros(),
                    batch.limit as i64
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?
            .collect::<Result<_, _>>()?;
        for (seq, source_file_path) in victims {
            let changed = conn
                .prepare_cached("DELETE FROM jobs WHERE seq = ?1 AND status = ?2")?
                .execute(params![seq, batch.status.as_str()])?;
            if changed == 0 {
                continue;
            }
            conn.prepare_cached("DELETE FROM job_history WHERE job_seq = ?1")?
                .execute([seq])?;
            planner.deleted(source_file_path);
        }
    }
    for source_file_path in planner.source_files_to_check() {
        let still_used = conn
            .prepare_cached("SELECT 1 FROM jobs WHERE source_file_path = ?1 LIMIT 1")?
            .query_row([&source_file_path], |_| Ok(()))
            .optional()?
            .is_some();
        if !still_used {
            planner.orphaned(source_file_path);
        }
    }
    conn.prepare_cached("DELETE FROM created_per_minute WHERE minute < ?1")?
        .execute([planner.stale_creation_counters_before()])?;
    Ok(planner.finish())
}

pub(super) fn storage_space(conn: &Connection) -> Result<StorageSpace, StoreError> {
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |row| row.get(0))?;
    let free_pages: i64 = conn.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
    Ok(StorageSpace {
        database_bytes: (pages.max(0) * page_size.max(0)) as u64,
        free_bytes: (free_pages.max(0) * page_size.max(0)) as u64,
    })
}

/// Truncates at most `max_bytes` of free pages off the end of the file (the database uses
/// incremental auto-vacuum, see `use_incremental_auto_vacuum`).
pub(super) fn release_free_space(conn: &Connection, max_bytes: u64) -> Result<u64, StoreError> {
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
    let before: i64 = conn.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
    let pages = (max_bytes / page_size.max(1) as u64) as i64;
    if pages == 0 || before == 0 {
        return Ok(0);
    }
    // The pragma answers one row per step; stepping through them does the work.
    let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    drop(rows);
    let after: i64 = conn.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
    Ok(((before - after).max(0) * page_size) as u64)
}

pub(super) fn history_of(conn: &Connection, seq: i64) -> Result<Vec<HistoryEntry>, StoreError> {
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

pub(super) fn list(conn: &Connection, p: ListParams) -> Result<JobPage, StoreError> {
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

pub(super) fn statistics(
    conn: &Connection,
    path: &Path,
    now: Timestamp,
) -> Result<Statistics, StoreError> {
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
    let since_minute = plan::created_recently_since(now);
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
