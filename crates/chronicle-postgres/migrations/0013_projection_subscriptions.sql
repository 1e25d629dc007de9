-- Projection subscriptions (chronicle-projections).
--
-- The feed of one event type, and of one aggregate type, in feed order: a
-- projection subscribed to some types reads their events through these, one
-- ordered scan per type merged in feed order, instead of the whole feed.
CREATE INDEX idx_events_type_feed
    ON events (event_type, transaction_id, global_position);
CREATE INDEX idx_events_aggregate_type_feed
    ON events (aggregate_type, transaction_id, global_position);

-- The events a projection's read model is built from:
-- {"event_types": [...], "aggregate_types": [...]}, each list sorted, an
-- absent list placing no condition; NULL for every event, which is what
-- every projection registered before this migration consumed. Stored on
-- each partition row so that a step's claim checks it with the lease: a
-- worker whose handler subscribes otherwise stops instead of building the
-- read model from other events. Changed only by a rebuild.
ALTER TABLE projection_state ADD COLUMN subscription JSONB;
