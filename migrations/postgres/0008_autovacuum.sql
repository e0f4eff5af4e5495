-- Sustained operation: the tables every job passes through get vacuumed while they are
-- still small, so the space of deleted and updated rows is reused instead of growing the
-- files, and no vacuum has to wade through millions of dead rows at once.
--
-- PostgreSQL's defaults vacuum a table once 20% of it is dead (50 rows + 0.2 x rows), with
-- a cost limit that made the jobs table of a soak at thousands of jobs per second fall
-- behind: every job leaves three to five dead versions of its row, its history rows, its
-- hand-off and its deliveries once cleanup deletes it. Here the hot tables are vacuumed
-- after 2% of them (plus 1,000 rows) are dead or newly inserted, and vacuum works on them
-- without the default cost sleep, so it keeps up with the rate they are written at.
--
-- Fill factor leaves room in each page for an updated row's new version. It helps where
-- an update changes no indexed column (a HOT update: no index entries, and the old
-- version is pruned from the page without a vacuum): the statistics totals (`counters`,
-- only `n` and `total_micros` change) and the health check's `write_probe` row. The
-- jobs table is left at the default: its updates change indexed columns (status,
-- deadlines), so they are never HOT and free room per page would only make it larger.

ALTER TABLE jobs SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE job_history SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE handoffs SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE delivery_attempts SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE idempotency_keys SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);

-- A queue: rows are appended by every transition and deleted by compaction within
-- seconds, so the table is nearly all dead rows between vacuums. Vacuum it by count.
ALTER TABLE counter_deltas SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

-- Small tables whose rows are rewritten in place: HOT updates need free room per page.
ALTER TABLE counters SET (fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE write_probe SET (fillfactor = 50);

-- A deleted job's hand-offs, deliveries and attempts go per statement, not per row. The
-- row trigger of 0005 ran three deletions (each a nested statement of its own) for every
-- job cleanup deleted, about three quarters of the time a cleanup batch kept PostgreSQL
-- busy; now a batch of jobs takes its rows along in three statements. Each joins the
-- batch's deleted jobs to an index on the job (`handoffs_by_job`, `deliveries_by_job`,
-- and the attempts' `delivery_attempts_by_delivery`); the function allows only nested
-- loops, so a plan made while a table was small cannot turn into a scan of all of it.
CREATE OR REPLACE FUNCTION jobs_deleted_take_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM delivery_attempts a USING deliveries d, deleted_jobs j
        WHERE d.job_id = j.id AND a.delivery_id = d.id;
    DELETE FROM deliveries d USING deleted_jobs j WHERE d.job_id = j.id;
    DELETE FROM handoffs h USING deleted_jobs j WHERE h.job_id = j.id;
    RETURN NULL;
END
$$;
ALTER FUNCTION jobs_deleted_take_deliveries() SET enable_hashjoin = off;
ALTER FUNCTION jobs_deleted_take_deliveries() SET enable_mergejoin = off;
DROP TRIGGER jobs_deleted_take_deliveries ON jobs;
CREATE TRIGGER jobs_deleted_take_deliveries AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS deleted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_deleted_take_deliveries();
