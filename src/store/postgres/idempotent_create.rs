//! `Store::create_job_once` with an `Idempotency-Key` on PostgreSQL: one transaction that
//! takes transaction-scoped advisory locks on the key and on the ingestion task, then
//! looks up the key, matches or inserts the job (with the batch path's own statement) and
//! records the key. The locks make two identical creates racing on different replicas
//! wait for each other, so the second one finds the first one's job. Creates without a
//! key run batched (`hot_ops::Creates`), under the same task locks.

use super::hot_ops::{insert_or_match, CreateRequest, LOCK_INGESTION_TASKS_SQL};
use super::pg_error;
use super::pool::Conn;
use crate::clock::Timestamp;
use crate::domain::JobId;
use crate::store::{CreateOnceOutcome, CreateOnceParams, StoreError};

/// Expired keys deleted per keyed create at most, so the table stays bounded without a
/// separate sweep.
const EXPIRED_KEYS_PER_CREATE: i64 = 16;

pub(super) async fn create_once(
    conn: &mut Conn,
    p: CreateOnceParams,
) -> Result<CreateOnceOutcome, StoreError> {
    in_transaction!(conn, "BEGIN", create_once_in_transaction(conn, p))
}

async fn create_once_in_transaction(
    conn: &mut Conn,
    p: CreateOnceParams,
) -> Result<CreateOnceOutcome, StoreError> {
    let now = p.create.now.as_micros();
    // Always the key first, then the task: one order for every create, so no deadlock.
    if let Some(key) = &p.idempotency_key {
        let lock = conn
            .statement("SELECT pg_advisory_xact_lock(hashtextextended('morag-jobs:idempotency-key:' || $1::text, 0))")
            .await?;
        conn.client
            .execute(&lock, &[&key.key])
            .await
            .map_err(pg_error)?;
        let earlier = conn
            .statement(
                "SELECT request_digest, job_id, job_created_at FROM idempotency_keys \
                 WHERE key = $1 AND expires_at > $2",
            )
            .await?;
        let row = conn
            .client
            .query_opt(&earlier, &[&key.key, &now])
            .await
            .map_err(pg_error)?;
        if let Some(row) = row {
            let digest: &str = row.try_get(0).map_err(pg_error)?;
            if digest != key.request_digest {
                return Ok(CreateOnceOutcome::KeyReusedForOtherRequest);
            }
            let job_id: &str = row.try_get(1).map_err(pg_error)?;
            let job_id = JobId::parse(job_id).map_err(|_| {
                StoreError::Internal(format!("stored job id {job_id:?} is invalid"))
            })?;
            let created_at: i64 = row.try_get(2).map_err(pg_error)?;
            return Ok(CreateOnceOutcome::KeyReplayed {
                job_id,
                created_at: Timestamp::from_micros(created_at),
            });
        }
    }

    if p.match_unfinished_job {
        let lock = conn.statement(LOCK_INGESTION_TASKS_SQL).await?;
        conn.client
            .execute(&lock, &[&vec![p.create.ingestion_task_id.as_str()]])
            .await
            .map_err(pg_error)?;
    }
    // The batch statement appends its own statistics deltas: the counting triggers must
    // stand aside, as they do on the batch connections.
    conn.client
        .batch_execute("SET LOCAL morag.writes_own_deltas = on")
        .await
        .map_err(pg_error)?;
    let request = CreateRequest {
        params: p.create,
        match_unfinished_job: p.match_unfinished_job,
    };
    let outcome = insert_or_match(conn, std::slice::from_ref(&request))
        .await?
        .pop()
        .ok_or_else(|| StoreError::Internal("the insert answered nothing".into()))??;
    let job = match &outcome {
        CreateOnceOutcome::Created(job) | CreateOnceOutcome::MatchedUnfinished(job) => job.clone(),
        other => return Err(StoreError::Internal(format!("a create answered {other:?}"))),
    };

    if let Some(key) = p.idempotency_key {
        let sweep = conn
            .statement(
                "DELETE FROM idempotency_keys WHERE key IN \
                 (SELECT key FROM idempotency_keys WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 \
                  FOR UPDATE SKIP LOCKED)",
            )
            .await?;
        conn.client
            .execute(&sweep, &[&now, &EXPIRED_KEYS_PER_CREATE])
            .await
            .map_err(pg_error)?;
        let record = conn
            .statement(
                "INSERT INTO idempotency_keys (key, request_digest, job_id, job_created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (key) DO UPDATE SET request_digest = excluded.request_digest, \
                 job_id = excluded.job_id, job_created_at = excluded.job_created_at, \
                 expires_at = excluded.expires_at",
            )
            .await?;
        conn.client
            .execute(
                &record,
                &[
                    &key.key,
                    &key.request_digest,
                    &job.id.to_string(),
                    &job.created_at.as_micros(),
                    &key.expires_at.as_micros(),
                ],
            )
            .await
            .map_err(pg_error)?;
    }
    Ok(outcome)
}
