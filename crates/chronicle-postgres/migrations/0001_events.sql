-- The spec's events table (ADR-006, Implementation Details), exactly, plus the
-- two columns that make a gap-safe global feed possible:
--   global_position  assigned from a sequence at insert
--   transaction_id   the writing transaction's xid8; the feed is read in
--                    (transaction_id, global_position) order, only below the
--                    snapshot's xmin, so late commits are never skipped.
-- {{PARTITION_CLAUSE}} is empty, or `PARTITION BY HASH (aggregate_id)` when
-- `chronicle migrate --partitions N` asks for it (then the primary key must
-- include the partition key: see docs/architecture.md).
CREATE SEQUENCE events_global_position_seq AS BIGINT;

CREATE TABLE events (
    event_id UUID NOT NULL,
    aggregate_id UUID NOT NULL,
    aggregate_type VARCHAR(50) NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    event_data JSONB NOT NULL,
    metadata JSONB,
    version INTEGER NOT NULL,
    timestamp TIMESTAMPTZ DEFAULT NOW(),
    encrypted_fields TEXT[], -- Track which fields are encrypted
    global_position BIGINT NOT NULL DEFAULT nextval('events_global_position_seq'),
    transaction_id XID8 NOT NULL DEFAULT pg_current_xact_id(),
    {{PRIMARY_KEY}},
    UNIQUE(aggregate_id, version)
) {{PARTITION_CLAUSE}};

ALTER SEQUENCE events_global_position_seq OWNED BY events.global_position;

{{PARTITIONS}}

-- Index for efficient event replay
CREATE INDEX idx_events_aggregate_version ON events(aggregate_id, version);
-- Index for cross-aggregate temporal queries
CREATE INDEX idx_events_timestamp ON events(timestamp);
-- Index for event type filtering during projections
CREATE INDEX idx_events_type_timestamp ON events(event_type, timestamp);
-- Index for the global feed: (transaction_id, global_position) order.
CREATE INDEX idx_events_feed ON events(transaction_id, global_position);
