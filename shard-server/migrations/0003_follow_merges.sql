-- Lets every server process follow the merge into its in-process similarity index
-- (SIMILAR_INDEX=memory): the merge already stamps the rows it writes with its generation
-- (`patterns.index_seq`); now it also records the generation it committed and the ids it
-- deleted, so a process that did not run the merge can apply removals too.

-- The last merge generation committed (merges are serialised, so generations commit in
-- order), and the highest generation whose tombstones have been pruned: a process whose
-- cursor is below it has missed removals and reloads.
ALTER TABLE merge_state
    ADD COLUMN generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN removals_pruned_to bigint NOT NULL DEFAULT 0;
UPDATE merge_state SET generation = (SELECT COALESCE(max(index_seq), 0) FROM patterns);

-- One row per pattern the merge deleted (a removal, or an update below the stored quality),
-- kept for an hour (pruned by the merge task).
CREATE TABLE pattern_removals (
    index_seq  bigint NOT NULL,
    id         uuid NOT NULL,
    removed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pattern_removals_index_seq ON pattern_removals (index_seq);
