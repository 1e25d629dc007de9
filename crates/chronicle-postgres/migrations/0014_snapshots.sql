-- Aggregate snapshots (chronicle-core's Snapshotting, chronicle_postgres's
-- snapshots module): an aggregate's folded state at a version, so a load
-- reads it and only the events after it.
--
-- One row per aggregate: a newer snapshot replaces the older one. A row is
-- used only by code asking for its schema_version (the aggregate's
-- SNAPSHOT_VERSION) and upcaster_version (the upcaster chain's); other code
-- ignores it and replaces it. Both are u32 in Rust, hence BIGINT.
--
-- The state is the aggregate's state as the application folded it: if the
-- application read decrypted events, fields that are encrypted in `events`
-- are in clear here. Shredding a subject (PgDataKeyStore::shred) deletes
-- the snapshots of every aggregate holding the subject's encrypted fields,
-- in the shredding's transaction, and a snapshot is never stored for an
-- aggregate whose own subject is shredded. An eager upcast run deletes the
-- snapshots of the aggregates whose events it rewrites, batch by batch.
CREATE TABLE snapshots (
    aggregate_id UUID PRIMARY KEY,
    aggregate_type TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version > 0),
    schema_version BIGINT NOT NULL CHECK (schema_version >= 0),
    upcaster_version BIGINT NOT NULL CHECK (upcaster_version >= 0),
    state JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- `chronicle snapshots list|drop --aggregate-type T`.
CREATE INDEX idx_snapshots_type ON snapshots (aggregate_type, aggregate_id);
