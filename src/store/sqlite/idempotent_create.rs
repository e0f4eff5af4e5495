//! `Store::create_job_once` for SQLite: the key lookup, the match against unfinished jobs,
//! the insert and the key's record run in one savepoint of the writer thread, so nothing
//! can come between the lookups and the insert.

use rusqlite::{params, Connection, OptionalExtension};

use super::{create, job_from_row, JOB_COLUMNS};
use crate::clock::Timestamp;
use crate::domain::JobId;
use crate::store::{CreateOnceOutcome, CreateOnceParams, StoreError};

/// Expired keys deleted per keyed create at most, so the table stays bounded without a
/// separate sweep.
const EXPIRED_KEYS_PER_CREATE: i64 = 16;

pub(super) fn create_once(
    conn: &Connection,
    p: CreateOnceParams,
) -> Result<CreateOnceOutcome, StoreError> {
    let now = p.create.now.as_micros();
    if let Some(key) = &p.idempotency_key {
        let earlier = conn
            .prepare_cached(
                "SELECT request_digest, job_id, job_created_at FROM idempotency_keys \
                 WHERE key = ?1 AND expires_at > ?2",
            )?
            .query_row(params![key.key, now], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        if let Some((digest, job_id, created_at)) = earlier {
            if digest != key.request_digest {
                return Ok(CreateOnceOutcome::KeyReusedForOtherRequest);
            }
            let job_id = JobId::parse(&job_id).map_err(|_| {
                StoreError::Internal(format!("stored job id {job_id:?} is invalid"))
            })?;
            return Ok(CreateOnceOutcome::KeyReplayed {
                job_id,
                created_at: Timestamp::from_micros(created_at),
            });
        }
    }

    let matched = if p.match_unfinished_job {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_unfinished_by_ingestion_task \
             WHERE ingestion_task_id = ?1 AND status IN ('pending', 'processing', 'retrying') \
             AND source_file_path = ?2 AND content_type = ?3 ORDER BY seq LIMIT 1"
        );
        conn.prepare_cached(&sql)?
            .query_row(
                params![
                    p.create.ingestion_task_id,
                    p.create.source_file_path,
                    p.create.content_type.as_str()
                ],
                job_from_row,
            )
            .optional()?
    } else {
        None
    };
    let (job, outcome) = match matched {
        Some(job) => (job.clone(), CreateOnceOutcome::MatchedUnfinished(job)),
        None => {
            let job = create(conn, p.create)?;
            (job.clone(), CreateOnceOutcome::Created(job))
        }
    };

    if let Some(key) = p.idempotency_key {
        conn.prepare_cached(
            "DELETE FROM idempotency_keys WHERE key IN \
             (SELECT key FROM idempotency_keys WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )?
        .execute(params![now, EXPIRED_KEYS_PER_CREATE])?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO idempotency_keys (key, request_digest, job_id, job_created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            key.key,
            key.request_digest,
            job.id.to_string(),
            job.created_at.as_micros(),
            key.expires_at.as_micros()
        ])?;
    }
    Ok(outcome)
}
