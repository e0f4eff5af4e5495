//! The operations outside the hot path (heartbeats, admin transitions, imports) and the
//! reads. Each transition is planned by `store::plan` and written by one conditional
//! statement that also writes its history and hand-off rows.

use std::collections::BTreeMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::pool::Conn;
use super::*;
use crate::domain::{Actor, HistoryEntry, JobResult};

pub(super) const NEXT_DEADLINE_SQL: &str =
    "SELECT deadline_at FROM jobs WHERE deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1";

/// The hand-off row's payload, built from the changed job `u`.
pub(super) const HANDOFF_PAYLOAD: &str =
    "json_build_object('job_id', u.id, 'ingestion_task_id', u.ingestion_task_id, \
     'content_type', u.content_type, 'status', u.status, 'error_message', u.error_message, \
     'attempt', u.attempt, 'retry_count', u.retry_count)::text";

pub(super) const JOB_COLUMNS: &str = "seq, id, content_type, source_file_path, task_options, ingestion_task_id, status, \
     worker_id, lease_id, attempt, retry_count, created_at, started_at, completed_at, updated_at, available_at, \
     execution_deadline, heartbeat_deadline, last_heartbeat_at, progress, progress_message, error_message";

pub(super) fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("stored {what} {value:?} is invalid"))
}

pub(super) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index).map_err(pg_error)
}

pub(super) fn ts(micros: Option<i64>) -> Option<Timestamp> {
    micros.map(Timestamp::from_micros)
}

pub(super) fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    JobStatus::parse(text).ok_or_else(|| corrupt("status", text))
}

pub(super) fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

/// Reads a job from `JOB_COLUMNS` starting at column 0.
pub(super) fn job_from_row(row: &Row) -> Result<Job, StoreError> {
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
pub(super) fn result_from_row(row: &Row, first: usize) -> Result<Option<JobResult>, StoreError> {
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

/// Runs `core` (an `UPDATE jobs ... RETURNING *` or `INSERT INTO jobs ... RETURNING *`
/// using `$1..$n`) as one statement that also records `steps` in the job's history and,
/// when `handoff` is set, the hand-off row, all only if `core` changed a row. Returns the
/// job as `core` left it, or `None` when its condition matched no row.
pub(super) async fn transition(
    conn: &mut Conn,
    core: &str,
    params: &[&(dyn ToSql + Sync)],
    steps: &[&HistoryStep],
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

/// The columns a plan is made from (`plan::Row`), after the job's `seq`, in
/// `current_from_row`'s order.
pub(super) const CURRENT_COLUMNS: &str =
    "seq, status, lease_id, retry_count, result_received_at IS NOT NULL, \
     execution_deadline, heartbeat_deadline";

/// Reads `seq` and a `plan::Row` from `CURRENT_COLUMNS` starting at column `first`.
pub(super) fn current_from_row(row: &Row, first: usize) -> Result<(i64, plan::Row), StoreError> {
    Ok((
        get(row, first)?,
        plan::Row {
            status: parse_status(get(row, first + 1)?)?,
            lease_id: get(row, first + 2)?,
            retry_count: get::<i32>(row, first + 3)?.max(0) as u32,
            result_received: get(row, first + 4)?,
            execution_deadline: ts(get(row, first + 5)?),
            heartbeat_deadline: ts(get(row, first + 6)?),
        },
    ))
}

pub(super) async fn current_state(
    conn: &mut Conn,
    id: JobId,
) -> Result<(i64, plan::Row), StoreError> {
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

/// The job's status now, `None` when it is gone.
pub(super) async fn status_now(conn: &mut Conn, seq: i64) -> Result<Option<JobStatus>, StoreError> {
    let statement = conn
        .statement("SELECT status FROM jobs WHERE seq = $1")
        .await?;
    let row = conn
        .client
        .query_opt(&statement, &[&seq])
        .await
        .map_err(pg_error)?;
    row.map(|row| parse_status(get(&row, 0)?)).transpose()
}

/// A conditional update matched nothing: someone moved the job after we read it. The
/// caller learns the state it is in now.
pub(super) async fn conflict(conn: &mut Conn, seq: i64, fallback: JobStatus) -> StoreError {
    match status_now(conn, seq).await {
        Ok(Some(status)) => StoreError::InvalidTransition { current: status },
        Ok(None) => StoreError::NotFound,
        Err(_) => StoreError::InvalidTransition { current: fallback },
    }
}

pub(super) async fn heartbeat(
    conn: &mut Conn,
    p: HeartbeatParams,
) -> Result<HeartbeatOutcome, StoreError> {
    let (seq, row) = current_state(conn, p.job_id).await?;
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
    let statement = conn
        .statement(
            "UPDATE jobs SET heartbeat_deadline = $2, deadline_at = $3, last_heartbeat_at = $4, updated_at = $4, \
             progress = COALESCE($5, progress), progress_message = COALESCE($6, progress_message) \
             WHERE seq = $1 AND status = $9 AND lease_id = $7 AND deadline_at > $4 \
               AND execution_deadline = $8",
        )
        .await?;
    let changed = conn
        .client
        .execute(
            &statement,
            &[
                &seq,
                &deadlines.heartbeat.map(Timestamp::as_micros),
                &deadline_at.as_micros(),
                &p.now.as_micros(),
                &p.progress,
                &p.message,
                expected_lease,
                &expected_execution_deadline.as_micros(),
                &expected_status.as_str(),
            ],
        )
        .await
        .map_err(pg_error)?;
    if changed != 1 {
        return Err(match status_now(conn, seq).await {
            Ok(now) => plan::heartbeat_not_applied(now),
            Err(_) => plan::heartbeat_not_applied(Some(row.status)),
        });
    }
    Ok(planned.outcome())
}

pub(super) async fn release(conn: &mut Conn, p: ReleaseParams) -> Result<Job, StoreError> {
    let (seq, row) = current_state(conn, p.job_id).await?;
    let (from, to) = plan::RELEASE_STEP;
    let n_released: i64 = conn
        .query_value(
            "SELECT count(*) FROM job_history WHERE job_seq = $1 AND from_status = $2 AND to_status = $3",
            &[&seq, &from.as_str(), &to.as_str()],
        )
        .await?;
    let planned = plan::plan_release(&row, &p, n_released.max(0) as u32)?;
    let job = transition(
        conn,
        "UPDATE jobs SET status = $4, lease_id = NULL, execution_deadline = NULL, \
         heartbeat_deadline = NULL, deadline_at = NULL, progress = NULL, progress_message = NULL, \
         updated_at = $5 WHERE seq = $1 AND status = $2 AND lease_id = $3 RETURNING *",
        &[
            &seq,
            &planned.expected_status.as_str(),
            &planned.expected_lease,
            &planned.status.as_str(),
            &p.now.as_micros(),
        ],
        &[&planned.history],
        None,
        p.now,
    )
    .await?;
    match job {
        Some(job) => Ok(job),
        None => Err(match status_now(conn, seq).await {
            Ok(now) => plan::release_not_applied(now),
            Err(_) => plan::release_not_applied(Some(row.status)),
        }),
    }
}

pub(super) async fn cancel(conn: &mut Conn, p: CancelParams) -> Result<Job, StoreError> {
    let (seq, row) = current_state(conn, p.job_id).await?;
    let planned = plan::plan_cancel(&row, &p)?;
    let job = transition(
        conn,
        "UPDATE jobs SET status = $4, completed_at = COALESCE($2, completed_at), updated_at = $5, \
         deadline_at = NULL WHERE seq = $1 AND status = $3 RETURNING *",
        &[
            &seq,
            &planned.completed_at.map(Timestamp::as_micros),
            &planned.expected_status.as_str(),
            &planned.status.as_str(),
            &p.now.as_micros(),
        ],
        &[&planned.history],
        planned.handoff,
        p.now,
    )
    .await?;
    match job {
        Some(job) => Ok(job),
        None => Err(conflict(conn, seq, row.status).await),
    }
}

pub(super) async fn manual_retry(conn: &mut Conn, p: ManualRetryParams) -> Result<Job, StoreError> {
    let (seq, row) = current_state(conn, p.job_id).await?;
    let planned = plan::plan_manual_retry(&row, &p)?;
    let job = transition(
        conn,
        "UPDATE jobs SET status = $4, retry_count = $5, available_at = $2, deadline_at = NULL, \
         completed_at = NULL, updated_at = $6 WHERE seq = $1 AND status = $3 RETURNING *",
        &[
            &seq,
            &planned.available_at.as_micros(),
            &planned.expected_status.as_str(),
            &planned.status.as_str(),
            &(planned.retry_count as i32),
            &p.now.as_micros(),
        ],
        &[&planned.history],
        None,
        p.now,
    )
    .await?;
    match job {
        Some(job) => Ok(job),
        None => Err(conflict(conn, seq, row.status).await),
    }
}

pub(super) async fn import(
    conn: &mut Conn,
    p: ImportJobParams,
) -> Result<ImportOutcome, StoreError> {
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
        &[&plan::imported_step(job.status, &p.reason)],
        None,
        p.now,
    )
    .await?;
    Ok(match imported {
        Some(_) => ImportOutcome::Imported,
        None => ImportOutcome::AlreadyExists,
    })
}

pub(super) async fn get_job(conn: &mut Conn, id: JobId) -> Result<Option<Job>, StoreError> {
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
pub(super) fn qualified_job_columns(alias: &str) -> String {
    JOB_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) async fn get_job_detail(
    conn: &mut Conn,
    id: JobId,
) -> Result<Option<JobDetail>, StoreError> {
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
pub(super) const ALL_STATUSES: &str =
    "'{pending,processing,completed,failed,timeout,cancelled,retrying}'::text[]";

/// The listing statement for the filters given: `$1` how many to fetch, `$2` the cursor
/// (NULL for the first page), then the content type and the status, whichever are given.
/// Newest first within each range of `jobs_by_type_status (content_type, status, seq)`;
/// several ranges are merged by `seq` (each gives at most one page).
pub(super) fn list_sql(by_status: bool, by_type: bool) -> String {
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

pub(super) async fn list(conn: &mut Conn, p: ListParams) -> Result<JobPage, StoreError> {
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

pub(super) async fn statistics(conn: &mut Conn, now: Timestamp) -> Result<Statistics, StoreError> {
    compact_counters(conn).await?;
    let since_minute = plan::created_recently_since(now);
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

pub(super) async fn pending_handoffs(
    conn: &mut Conn,
    limit: usize,
) -> Result<Vec<Handoff>, StoreError> {
    let statement = conn
        .statement(
            "SELECT id, job_id, kind, payload, created_at FROM handoffs h WHERE fanned_out_at IS NULL \
             OR EXISTS (SELECT 1 FROM deliveries d WHERE d.handoff_id = h.id AND d.state <> 'delivered') \
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

pub(super) async fn next_deadline(conn: &mut Conn) -> Result<Option<Timestamp>, StoreError> {
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

pub(super) async fn ping(conn: &mut Conn) -> Result<(), StoreError> {
    conn.client
        .simple_query("SELECT 1")
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Rewrites the one row of `write_probe`.
pub(super) async fn probe_write(conn: &mut Conn, now: Timestamp) -> Result<(), StoreError> {
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
