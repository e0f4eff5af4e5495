-- Idempotent creates: the answers of creates sent with an Idempotency-Key, and the lookup
-- of a job that is not finished yet by its ingestion task.

CREATE TABLE idempotency_keys (
    key             TEXT    PRIMARY KEY,
    -- SHA-256 of the request as parsed, so the same key with another request is refused.
    request_digest  TEXT    NOT NULL,
    job_id          TEXT    NOT NULL,
    -- The original answer is replayed even after the job itself was cleaned up.
    job_created_at  BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Only unfinished jobs are in this index, so it stays as small as the queue.
CREATE INDEX jobs_unfinished_by_ingestion_task ON jobs (ingestion_task_id)
    WHERE status IN ('pending', 'processing', 'retrying');
