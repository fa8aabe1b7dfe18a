-- The number of rows in `patterns`, kept by the merge (the only writer of that table, one at a
-- time under its advisory lock) in the same transaction as its changes, so that stats and
-- gauges never count(*) a table of millions of rows. Not in `global_state`: that row is locked
-- by every registration, and a merge transaction must not hold registrations up.
CREATE TABLE merge_state (
    id       smallint PRIMARY KEY CHECK (id = 1),
    patterns bigint NOT NULL
);
INSERT INTO merge_state SELECT 1, count(*) FROM patterns;
