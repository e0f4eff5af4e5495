-- Jobs, their history, hand-offs to the ingestion pipeline, and the counters that keep
-- statistics O(number of content types) instead of O(number of jobs).
-- Times are INTEGER microseconds since the Unix epoch, UTC.

CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY,
    id                  TEXT    NOT NULL UNIQUE,
    content_type        TEXT    NOT NULL,
    source_file_path    TEXT    NOT NULL,
    task_options        TEXT    NOT NULL,
    ingestion_task_id   TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    worker_id           TEXT,
    lease_id            TEXT,
    attempt             INTEGER NOT NULL DEFAULT 0,
    retry_count         INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    completed_at        INTEGER,
    updated_at          INTEGER NOT NULL,
    -- When a pending or retrying job may be claimed.
    available_at        INTEGER NOT NULL,
    execution_deadline  INTEGER,
    heartbeat_deadline  INTEGER,
    last_heartbeat_at   INTEGER,
    -- When the monitor must look at the job next (pending timeout, the nearer attempt
    -- deadline, or a retry becoming due); NULL when it need not.
    deadline_at         INTEGER,
    -- Set when the current attempt's worker reported; reset by each claim.
    result_received_at  INTEGER,
    progress            REAL,
    progress_message    TEXT,
    error_message       TEXT,
    result_content      TEXT,
    result_metadata     TEXT,
    processing_time     REAL
);

-- Claims: the oldest due job of one content type is the first entry of a range.
CREATE INDEX jobs_queue ON jobs (content_type, available_at, seq) WHERE status IN ('pending', 'retrying');
-- The monitor's scan: only jobs with a deadline are in this index.
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
-- Retention cleanup.
CREATE INDEX jobs_finished ON jobs (status, completed_at) WHERE status IN ('completed', 'failed', 'timeout', 'cancelled');
-- Listing with filters, newest first.
-- (A filter on both status and type walks jobs_by_status and checks the type.)
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_type ON jobs (content_type, seq);
-- Whether a source file is still referenced when a job is cleaned up.
CREATE INDEX jobs_by_source ON jobs (source_file_path);

CREATE TABLE job_history (
    id           INTEGER PRIMARY KEY,
    job_seq      INTEGER NOT NULL,
    from_status  TEXT,
    to_status    TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    actor        TEXT    NOT NULL,
    reason       TEXT    NOT NULL
);
CREATE INDEX job_history_by_job ON job_history (job_seq, id);

-- Hand-offs to the ingestion pipeline, written in the same transaction as the transition
-- that causes them (a transactional outbox).
CREATE TABLE handoffs (
    id            INTEGER PRIMARY KEY,
    job_id        TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    delivered_at  INTEGER
);
CREATE INDEX handoffs_undelivered ON handoffs (id) WHERE delivered_at IS NULL;

CREATE TABLE job_counts (
    status        TEXT    NOT NULL,
    content_type  TEXT    NOT NULL,
    n             INTEGER NOT NULL,
    PRIMARY KEY (status, content_type)
) WITHOUT ROWID;

CREATE TABLE processing_totals (
    content_type  TEXT    PRIMARY KEY,
    n             INTEGER NOT NULL,
    total_micros  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE created_per_minute (
    minute  INTEGER PRIMARY KEY,
    n       INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER jobs_counted_on_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (status, content_type, n) VALUES (new.status, new.content_type, 1)
        ON CONFLICT (status, content_type) DO UPDATE SET n = n + 1;
    INSERT INTO created_per_minute (minute, n) VALUES (new.created_at / 60000000, 1)
        ON CONFLICT (minute) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER jobs_counted_on_status_change AFTER UPDATE OF status ON jobs
WHEN old.status <> new.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = old.status AND content_type = old.content_type;
    INSERT INTO job_counts (status, content_type, n) VALUES (new.status, new.content_type, 1)
        ON CONFLICT (status, content_type) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER jobs_processing_time_on_completion AFTER UPDATE OF status ON jobs
WHEN new.status = 'completed' AND old.status <> 'completed' AND new.started_at IS NOT NULL BEGIN
    INSERT INTO processing_totals (content_type, n, total_micros)
        VALUES (new.content_type, 1, new.completed_at - new.started_at)
        ON CONFLICT (content_type) DO UPDATE SET n = n + 1, total_micros = total_micros + excluded.total_micros;
END;

CREATE TRIGGER jobs_uncounted_on_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = old.status AND content_type = old.content_type;
END;
