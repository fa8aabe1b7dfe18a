-- A TV leaves the embedding of its title text out of an uploaded pattern when the content's
-- collaborative vector is public; the federation groups such a pattern by its content id.
-- Patterns without an embedding are stored and exported, never indexed for similarity.
ALTER TABLE patterns ALTER COLUMN embedding DROP NOT NULL;
