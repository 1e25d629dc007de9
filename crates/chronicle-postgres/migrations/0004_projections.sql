-- The projection runtime's tables (chronicle-projections).
--
-- chronicle_partition(aggregate_id, n): the partition of an aggregate among
-- n, stable across processes, versions and machines (PostgreSQL's own
-- uuid_hash_extended with a fixed seed, sign bit cleared).
CREATE FUNCTION chronicle_partition(p_aggregate_id UUID, p_partitions INTEGER)
RETURNS INTEGER
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ((uuid_hash_extended(p_aggregate_id, 0) & 9223372036854775807) % p_partitions)::INTEGER $$;

-- One row per projection and partition: checkpoint, status, lag, failures and
-- the partition's lease. A lease is a row (owner + expiry), never a session
-- lock, so workers behind a transaction-mode pooler or on serverless
-- providers can hold one; a step also holds the row lock for the length of
-- its transaction, so two workers never process a partition at once.
CREATE TABLE projection_state (
    projection TEXT NOT NULL,
    partition INTEGER NOT NULL,
    partitions INTEGER NOT NULL,
    -- Every event of the partition at or before this feed position is handled.
    checkpoint_xid XID8 NOT NULL DEFAULT '0',
    checkpoint_position BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'paused', 'rebuilding', 'failed', 'stopped')),
    lag_events BIGINT NOT NULL DEFAULT 0,
    lag_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    -- When lag_events was last counted (counting a long backlog is costly,
    -- so it is done every few seconds while behind).
    lag_counted_at TIMESTAMPTZ,
    events_processed BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    failure_count BIGINT NOT NULL DEFAULT 0,
    owner TEXT,
    heartbeat TIMESTAMPTZ,
    lease_expires_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition),
    CHECK (partitions > 0 AND partition >= 0 AND partition < partitions)
);

-- The sequenced dead-letter queue. Per projection and aggregate: the event
-- that failed (state 'failed') and the aggregate's later events parked
-- behind it (state 'parked'), in version order. Nothing is queued twice.
CREATE TABLE projection_dead_letters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection TEXT NOT NULL,
    aggregate_id UUID NOT NULL,
    event_id UUID NOT NULL,
    event_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    transaction_id XID8 NOT NULL,
    global_position BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('failed', 'parked')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (projection, event_id)
);

CREATE INDEX idx_projection_dead_letters_aggregate
    ON projection_dead_letters (projection, aggregate_id, version);
