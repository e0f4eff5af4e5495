-- Fewer index entries per delivery: each delivery is inserted, claimed and recorded once,
-- and every index on it costs a b-tree write at each step (on PostgreSQL, where state and
-- due time change, a new entry in every index at every update). See
-- src/store/postgres/deliveries.rs.
--
-- Listing and statistics only ever look for pending or dead deliveries by state; delivered
-- ones (nearly all of them) are listed newest first through the primary key. So the index
-- by (state, sink, id) keeps only the unsettled rows, and the index by (sink, id) goes.
DROP INDEX deliveries_by_state;
DROP INDEX deliveries_by_sink;
CREATE INDEX deliveries_unsettled ON deliveries (state, sink, id) WHERE state IN ('pending', 'dead');

-- A hand-off is delivered when all its deliveries are: that is read from the deliveries
-- (cleanup, `pending_handoffs`), so the hand-off row's own copy of it, one more update
-- and index change per job, goes.
DROP INDEX handoffs_undelivered;
ALTER TABLE handoffs DROP COLUMN delivered_at;
