-- Jobs, their history, hand-offs to the ingestion pipeline, and the counters that keep
-- statistics cheap. The same shape as the SQLite schema, so both backends answer the
-- conformance suite alike. Times are BIGINT microseconds since the Unix epoch, UTC.

CREATE TABLE jobs (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  TEXT    NOT NULL UNIQUE,
    content_type        TEXT    NOT NULL,
    source_file_path    TEXT    NOT NULL,
    -- JSON text, passed through byte for byte (jsonb would reorder keys).
    task_options        TEXT    NOT NULL,
    ingestion_task_id   TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN
        ('pending', 'processing', 'completed', 'failed', 'timeout', 'cancelled', 'retrying')),
    worker_id           TEXT,
    lease_id            TEXT,
    attempt             INTEGER NOT NULL DEFAULT 0,
    retry_count         INTEGER NOT NULL DEFAULT 0,
    created_at          BIGINT  NOT NULL,
    started_at          BIGINT,
    completed_at        BIGINT,
    updated_at          BIGINT  NOT NULL,
    -- When a pending or retrying job may be claimed.
    available_at        BIGINT  NOT NULL,
    execution_deadline  BIGINT,
    heartbeat_deadline  BIGINT,
    last_heartbeat_at   BIGINT,
    -- When the monitor must look at the job next; NULL when it need not.
    deadline_at         BIGINT,
    -- Set when the current attempt's worker reported; reset by each claim.
    result_received_at  BIGINT,
    progress            DOUBLE PRECISION,
    progress_message    TEXT,
    error_message       TEXT,
    result_content      TEXT,
    result_metadata     TEXT,
    processing_time     DOUBLE PRECISION
);

-- Claims: the oldest due job overall, or of one content type.
CREATE INDEX jobs_queue ON jobs (available_at, seq) WHERE status IN ('pending', 'retrying');
CREATE INDEX jobs_queue_by_type ON jobs (content_type, available_at, seq) WHERE status IN ('pending', 'retrying');
-- The monitor's scan: only jobs with a deadline are in this index.
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE deadline_at IS NOT NULL;
-- Retention cleanup.
CREATE INDEX jobs_finished ON jobs (status, completed_at) WHERE status IN ('completed', 'failed', 'timeout', 'cancelled');
-- Listing with filters, newest first.
CREATE INDEX jobs_by_status ON jobs (status, content_type, seq);
CREATE INDEX jobs_by_type ON jobs (content_type, seq);
-- Whether a source file is still referenced when a job is cleaned up.
CREATE INDEX jobs_by_source ON jobs (source_file_path);

CREATE TABLE job_history (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_seq      BIGINT NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    from_status  TEXT,
    to_status    TEXT   NOT NULL,
    at           BIGINT NOT NULL,
    actor        TEXT   NOT NULL,
    reason       TEXT   NOT NULL
);
CREATE INDEX job_history_by_job ON job_history (job_seq, id);

-- Hand-offs to the ingestion pipeline, written by the same statement as the transition
-- that causes them (a transactional outbox).
CREATE TABLE handoffs (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    payload       TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    delivered_at  BIGINT
);
CREATE INDEX handoffs_undelivered ON handoffs (id) WHERE delivered_at IS NULL;

-- Statistics without hot rows.
--
-- SQLite keeps one counter row per (status, content type) and bumps it from triggers;
-- that is fine with a single writer. On PostgreSQL every transition of every replica
-- would update the same few rows, so all writers would queue on their row locks (and
-- multi-row batches could deadlock on them). Instead each change appends a delta row to
-- `counter_deltas`: inserts never wait for each other. Readers sum `counters` (the
-- compacted totals) and the deltas not yet compacted; compaction (under an advisory
-- lock, one replica at a time) moves the deltas into `counters` in one statement. A read
-- thus costs O(counter keys + changes since the last compaction), never O(jobs).
--
-- counter = 'status':     n = jobs per (status, content_type)
-- counter = 'processing': n = completed attempts, total_micros = claim-to-completion time, per content_type
-- counter = 'created':    n = jobs created in `minute` (minutes since the epoch)
CREATE TABLE counters (
    counter       TEXT   NOT NULL,
    status        TEXT   NOT NULL DEFAULT '',
    content_type  TEXT   NOT NULL DEFAULT '',
    minute        BIGINT NOT NULL DEFAULT 0,
    n             BIGINT NOT NULL,
    total_micros  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, status, content_type, minute)
);

CREATE TABLE counter_deltas (
    counter       TEXT   NOT NULL,
    status        TEXT   NOT NULL DEFAULT '',
    content_type  TEXT   NOT NULL DEFAULT '',
    minute        BIGINT NOT NULL DEFAULT 0,
    n             BIGINT NOT NULL,
    total_micros  BIGINT NOT NULL DEFAULT 0
);

CREATE FUNCTION jobs_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO counter_deltas (counter, status, content_type, minute, n) VALUES
            ('status', NEW.status, NEW.content_type, 0, 1),
            ('created', '', '', NEW.created_at / 60000000, 1);
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.status <> OLD.status THEN
            INSERT INTO counter_deltas (counter, status, content_type, n) VALUES
                ('status', OLD.status, OLD.content_type, -1),
                ('status', NEW.status, NEW.content_type, 1);
            IF NEW.status = 'completed' AND NEW.started_at IS NOT NULL THEN
                INSERT INTO counter_deltas (counter, content_type, n, total_micros)
                    VALUES ('processing', NEW.content_type, 1, NEW.completed_at - NEW.started_at);
            END IF;
        END IF;
    ELSE
        INSERT INTO counter_deltas (counter, status, content_type, n)
            VALUES ('status', OLD.status, OLD.content_type, -1);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_counted AFTER INSERT OR UPDATE OF status OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_changes();

-- Wake-ups for long-polling workers on other replicas are not sent from here: a NOTIFY
-- inside the job's transaction takes a database-wide lock until commit, which would
-- serialize every create's commit (and its WAL flush). The store sends them after
-- commit instead, coalesced (see `store/postgres.rs`).
