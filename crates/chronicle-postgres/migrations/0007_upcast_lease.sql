-- Eager upcasting: one runner per migration key at a time.
--
-- A runner holds a lease row for the key (event type + schema version it
-- reads) while it runs: taken when free or expired, renewed inside every
-- batch transaction (which commits only while the runner still owns it),
-- and deleted when the run ends or stops. A row, not a session advisory
-- lock, so it works behind a transaction-pooling PgBouncer; a runner that
-- died leaves a lease that expires after its time-to-live.
CREATE TABLE chronicle_upcast_leases (
    event_type VARCHAR(100) NOT NULL,
    from_version INTEGER NOT NULL,
    owner_id UUID NOT NULL,
    owner TEXT NOT NULL,
    run_id UUID,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (event_type, from_version)
);
