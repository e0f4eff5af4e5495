-- One row that `/health` rewrites (at most every few seconds) to prove the store can
-- still write: a read answers from a database whose disk is full or read-only.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    written_at INTEGER NOT NULL,
    writes INTEGER NOT NULL
);
