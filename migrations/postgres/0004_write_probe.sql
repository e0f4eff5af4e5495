-- One row that `/health` rewrites (at most every few seconds per replica) to prove the
-- store can still write: a read answers from a database whose disk is full or read-only.
-- `writes` changes on every probe: SQLite skips writing a row rewritten with equal values.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_at BIGINT NOT NULL,
    writes BIGINT NOT NULL
);
