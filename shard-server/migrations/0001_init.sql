-- omega-shard schema. The HNSW index on patterns.embedding is created by the server after the
-- migrations (its m / ef_construction come from HNSW_M / HNSW_EF_CONSTRUCTION).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE devices (
    device_id     text PRIMARY KEY,
    region        text NOT NULL,
    local_version bigint NOT NULL DEFAULT 0,
    -- success-weighted sum of the embeddings the device added; cosine ignores its length
    interest      vector(384),
    syncs         bigint NOT NULL DEFAULT 0,
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_sync_at  timestamptz
);

-- Append-only, unindexed: the sync transaction writes here (cheap), a background merge moves
-- rows into `patterns` (which carries the expensive HNSW index).
CREATE TABLE pattern_intake (
    seq           bigserial PRIMARY KEY,
    device_id     text NOT NULL,
    op            smallint NOT NULL,      -- 1 put, 2 update, 3 remove
    pattern_id    uuid NOT NULL,
    content_id    text,
    embedding     vector(384),
    success_rate  real,
    sample_count  bigint,
    time_slot     smallint,
    day_type      smallint,
    content_type  smallint,
    genres        text[],
    created_at_ms bigint,
    updated_at_ms bigint
);

CREATE TABLE patterns (
    id            uuid PRIMARY KEY,
    device_id     text NOT NULL,
    content_id    text NOT NULL,
    embedding     vector(384) NOT NULL,
    success_rate  real NOT NULL,
    sample_count  bigint NOT NULL,
    time_slot     smallint NOT NULL,
    day_type      smallint NOT NULL,
    content_type  smallint NOT NULL,
    genres        text[] NOT NULL,
    created_at_ms bigint NOT NULL,
    updated_at_ms bigint NOT NULL
);
CREATE INDEX patterns_device_id ON patterns (device_id);

CREATE TABLE global_state (
    id             smallint PRIMARY KEY CHECK (id = 1),
    global_version bigint NOT NULL,
    round_id       text NOT NULL,
    published_at   timestamptz,
    -- registered devices, kept here so the MAX_DEVICES check is O(1)
    devices        bigint NOT NULL DEFAULT 0
);
INSERT INTO global_state (id, global_version, round_id) VALUES (1, 0, '');

CREATE TABLE published_rounds (
    round_id       text PRIMARY KEY,
    global_version bigint NOT NULL,
    published_at   timestamptz NOT NULL DEFAULT now()
);

-- Aggregates of the latest round (replaced at each publish); few, so scanned without an index.
CREATE TABLE global_patterns (
    id             uuid PRIMARY KEY,
    content_id     text NOT NULL,
    embedding      vector(384) NOT NULL,
    quality        real NOT NULL,
    source_devices bigint NOT NULL,
    total_samples  bigint NOT NULL,
    time_slot      smallint NOT NULL,
    day_type       smallint NOT NULL,
    content_type   smallint NOT NULL,
    genres         text[] NOT NULL,
    region         text NOT NULL
);

CREATE TABLE trends (
    position   integer PRIMARY KEY,
    content_id text,
    centroid   vector(384),
    score      real NOT NULL,
    region     text NOT NULL
);
