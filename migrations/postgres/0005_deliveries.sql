-- Deliveries: each hand-off fanned out to the sinks configured when it was fanned out, one
-- row per (hand-off, sink), and every attempt made. See src/store/postgres/deliveries.rs.

-- Set (with the event id) in the transaction that creates the hand-off's deliveries, so a
-- hand-off is fanned out exactly once even across crashes and replicas.
ALTER TABLE handoffs ADD COLUMN fanned_out_at BIGINT;
ALTER TABLE handoffs ADD COLUMN event_id TEXT;
CREATE INDEX handoffs_not_fanned_out ON handoffs (id) WHERE fanned_out_at IS NULL;
CREATE INDEX handoffs_by_job ON handoffs (job_id);

CREATE TABLE deliveries (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    handoff_id       BIGINT  NOT NULL,
    -- The stable id receivers deduplicate by (webhook-id, Celery task id).
    event_id         TEXT    NOT NULL,
    sink             TEXT    NOT NULL,
    job_id           TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    -- Attempts since creation or the last redrive; the dead-letter limit counts these.
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- When a pending delivery is due; while an attempt runs, when its claim expires.
    next_attempt_at  BIGINT  NOT NULL,
    -- The fencing token of the running attempt: its outcome is recorded only with it.
    claim_token      TEXT,
    last_error       TEXT,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    delivered_at     BIGINT,
    UNIQUE (handoff_id, sink)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_by_job ON deliveries (job_id, id);
CREATE INDEX deliveries_by_state ON deliveries (state, sink, id);
CREATE INDEX deliveries_by_sink ON deliveries (sink, id);

CREATE TABLE delivery_attempts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   BIGINT  NOT NULL,
    attempt       INTEGER NOT NULL,
    at            BIGINT  NOT NULL,
    outcome       TEXT    NOT NULL,
    http_status   INTEGER,
    error         TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

-- A deleted job takes its hand-offs, deliveries and attempts with it (cleanup only
-- deletes jobs whose deliveries are settled, see CLEANUP_SQL).
CREATE FUNCTION jobs_deleted_take_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM delivery_attempts a USING deliveries d
        WHERE d.job_id = old.id AND a.delivery_id = d.id;
    DELETE FROM deliveries WHERE job_id = old.id;
    DELETE FROM handoffs WHERE job_id = old.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_deleted_take_deliveries AFTER DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_deleted_take_deliveries();

-- Dispatchers are woken after a hand-off commits by the store itself (a NOTIFY sent after
-- the commit, like the jobs wake-up, see 0001): a NOTIFY from a trigger would hold
-- PostgreSQL's notify lock until each result batch's commit was flushed.
