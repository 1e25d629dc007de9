-- Eager upcasting (chronicle-upcast's `PgUpcaster`): the runs and the backup
-- of every event they rewrote.
--
-- A run rewrites the events of one migration key (event type + schema
-- version it reads) to the newest version of that type, in batches, each in
-- one transaction that copies the originals here before replacing them and
-- moves the run's cursor (the last global_position done). Rollback restores
-- the copies; jsonb is copied as jsonb, so `event_data::text` and
-- `metadata::text` come back exactly as they were.
CREATE TABLE chronicle_upcast_runs (
    run_id UUID PRIMARY KEY,
    event_type VARCHAR(100) NOT NULL,
    from_version INTEGER NOT NULL,
    to_event_type VARCHAR(100) NOT NULL,
    to_version INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'completed', 'failed', 'rolled_back')),
    cursor_position BIGINT NOT NULL DEFAULT 0,
    events_upcast BIGINT NOT NULL DEFAULT 0,
    batches BIGINT NOT NULL DEFAULT 0,
    started_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    finished_at TIMESTAMPTZ,
    error TEXT,
    failed_event_id UUID
);

-- At most one unfinished run per migration key: a new `run` resumes it.
CREATE UNIQUE INDEX chronicle_upcast_runs_one_open
    ON chronicle_upcast_runs (event_type, from_version)
    WHERE status IN ('running', 'failed');

CREATE TABLE chronicle_upcast_backup (
    run_id UUID NOT NULL REFERENCES chronicle_upcast_runs (run_id),
    event_id UUID NOT NULL,
    aggregate_id UUID NOT NULL,
    version INTEGER NOT NULL,
    global_position BIGINT NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    event_data JSONB NOT NULL,
    metadata JSONB,
    encrypted_fields TEXT[],
    backed_up_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (run_id, event_id)
);

CREATE INDEX chronicle_upcast_backup_event ON chronicle_upcast_backup (event_id);

-- What a run selects: events of one type at one schema version, in
-- global_position order after the cursor. The expression must match the
-- runner's query exactly.
CREATE INDEX idx_events_upcast ON events (
    event_type,
    (coalesce((metadata ->> 'schema_version')::int, 1)),
    global_position
);
