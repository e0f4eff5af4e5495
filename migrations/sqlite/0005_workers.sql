-- The worker registry: one row per worker process (worker id and instance id), merged from
-- the batches each server flushes (src/store/workers.rs has the merge rule). Times are
-- microseconds since the Unix epoch, UTC.

CREATE TABLE workers (
    worker_id           TEXT    NOT NULL,
    -- The instance id the worker sends (new at each process start); '' when it sends none.
    instance            TEXT    NOT NULL,
    -- From the latest poll: comma-separated, '' for any type; NULL until it polls.
    content_types       TEXT,
    -- The wait of the latest poll, in milliseconds.
    poll_wait_ms        INTEGER NOT NULL DEFAULT 0,
    last_poll_at        INTEGER,
    version             TEXT,
    version_at          INTEGER,
    address             TEXT,
    address_at          INTEGER,
    first_seen_at       INTEGER NOT NULL,
    last_seen_at        INTEGER NOT NULL,
    sends_heartbeats    INTEGER NOT NULL DEFAULT 0,
    jobs_in_flight      INTEGER NOT NULL DEFAULT 0,
    n_completed         INTEGER NOT NULL DEFAULT 0,
    n_failed            INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (worker_id, instance)
) WITHOUT ROWID;

-- The listing (most recently seen first) and the cleanup of workers gone past retention.
CREATE INDEX workers_by_last_seen ON workers (last_seen_at);
