-- The statement of a write-combined batch of single-event appends
-- (chronicle_postgres's combine module), as a function so that its plan
-- is made once per session and kept: `plan_cache_mode` is set for the
-- function alone. As a bare prepared statement, PostgreSQL's plan cache
-- keeps choosing custom plans for it (the unnest of array parameters looks
-- cheaper re-planned), and planning cost about as much as executing an
-- eight-row batch.
--
-- A plan kept for the session must stay good as the table grows: one made
-- while `events` is empty or small would otherwise look up versions with a
-- hashed subplan over a scan of the whole table (an EXISTS turned into a
-- hash of every row), slower with every event until an ANALYZE. Hence the
-- version check as a scalar subquery (never hashed) and `enable_seqscan`
-- off for the function: every lookup here is by the (aggregate_id, version)
-- key, always an index scan.
--
-- It inserts exactly the rows whose expected version holds in the
-- statement's snapshot (exp NULL: any version, at the aggregate's last
-- version + 1), in aggregate_id order, skipping rows whose event id or
-- (aggregate_id, version) exists, and returns the rows it inserted.
-- Version n + 1 is inserted only when version n is visible (committed):
-- the feed-order rule of migration 6. The caller holds at most one row
-- per aggregate in a batch.
CREATE FUNCTION chronicle_append_combined(
    p_ids UUID[], p_aggregates UUID[], p_aggregate_types TEXT[], p_event_types TEXT[],
    p_data JSONB[], p_metadata JSONB[], p_expected INT4[], p_encrypted JSONB[])
RETURNS TABLE (aggregate_id UUID, version INT4)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
BEGIN
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO events AS ev (event_id, aggregate_id, aggregate_type, event_type,
                                  event_data, metadata, version, encrypted_fields)
        SELECT r.id, r.agg, r.aty, r.ety, r.d, r.m, r.base + 1,
               CASE WHEN r.enc IS NULL THEN NULL
                    ELSE ARRAY(SELECT jsonb_array_elements_text(r.enc)) END
          FROM (SELECT t.*,
                       coalesce(t.exp, (SELECT coalesce(max(e.version), 0) FROM events e
                                         WHERE e.aggregate_id = t.agg)) AS base
                  FROM unnest(p_ids, p_aggregates, p_aggregate_types, p_event_types,
                              p_data, p_metadata, p_expected, p_encrypted)
                       AS t(id, agg, aty, ety, d, m, exp, enc)
                OFFSET 0) r
         WHERE r.base < 2147483647
           AND (r.base = 0 OR (SELECT true FROM events e
                                WHERE e.aggregate_id = r.agg AND e.version = r.base))
         ORDER BY r.agg
        ON CONFLICT DO NOTHING
        RETURNING ev.aggregate_id, ev.version)
    SELECT i.aggregate_id, i.version FROM inserted i;
END
$$;
