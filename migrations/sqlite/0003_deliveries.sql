-- Deliveries: each hand-off fanned out to the sinks configured when it was fanned out, one
-- row per (hand-off, sink), and every attempt made. See src/store/sqlite_deliveries.rs.

-- Set (with the event id) in the transaction that creates the hand-off's deliveries, so a
-- hand-off is fanned out exactly once even across crashes.
ALTER TABLE handoffs ADD COLUMN fanned_out_at INTEGER;
ALTER TABLE handoffs ADD COLUMN event_id TEXT;
CREATE INDEX handoffs_not_fanned_out ON handoffs (id) WHERE fanned_out_at IS NULL;
CREATE INDEX handoffs_by_job ON handoffs (job_id);

CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY,
    handoff_id       INTEGER NOT NULL,
    -- The stable id receivers deduplicate by (webhook-id, Celery task id).
    event_id         TEXT    NOT NULL,
    sink             TEXT    NOT NULL,
    job_id           TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    -- Attempts since creation or the last redrive; the dead-letter limit counts these.
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- When a pending delivery is due; while an attempt runs, when its claim expires.
    next_attempt_at  INTEGER NOT NULL,
    -- The fencing token of the running attempt: its outcome is recorded only with it.
    claim_token      TEXT,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    delivered_at     INTEGER,
    UNIQUE (handoff_id, sink)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_by_job ON deliveries (job_id, id);
CREATE INDEX deliveries_by_state ON deliveries (state, sink, id);
CREATE INDEX deliveries_by_sink ON deliveries (sink, id);

CREATE TABLE delivery_attempts (
    id            INTEGER PRIMARY KEY,
    delivery_id   INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    outcome       TEXT    NOT NULL,
    http_status   INTEGER,
    error         TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

-- A deleted job takes its hand-offs, deliveries and attempts with it (cleanup only
-- deletes jobs whose deliveries are settled, see the cleanup scan).
CREATE TRIGGER jobs_deleted_take_deliveries AFTER DELETE ON jobs BEGIN
    DELETE FROM delivery_attempts
        WHERE delivery_id IN (SELECT id FROM deliveries WHERE job_id = old.id);
    DELETE FROM deliveries WHERE job_id = old.id;
    DELETE FROM handoffs WHERE job_id = old.id;
END;
