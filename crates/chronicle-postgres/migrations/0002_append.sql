-- One round trip per append: lock the aggregate, check idempotency and the
-- expected version, insert the batch. Returns (status, version):
--   status 0  appended; version is the aggregate's new version
--   status 1  every event id was already stored in this aggregate by an
--             earlier identical append; version is the last of them
--   status 2  version conflict; version is the actual current version
--   status 3  the first event id is stored in another aggregate, or only
--             some of the batch's ids are stored; version is 0
-- p_expected NULL means "any", 0 means "no stream".
-- The advisory transaction lock is taken before the first write, so the
-- transaction's xid8 is assigned after the previous writer of this aggregate
-- committed: per-aggregate version order and feed order agree.
CREATE FUNCTION chronicle_append(
    p_aggregate_id UUID,
    p_aggregate_type TEXT,
    p_expected INTEGER,
    p_event_ids UUID[],
    p_event_types TEXT[],
    p_data JSONB[],
    p_metadata JSONB[],
    p_encrypted JSONB[]
) RETURNS TABLE (status INTEGER, version INTEGER)
LANGUAGE plpgsql
AS $$
DECLARE
    v_actual INTEGER;
    v_found_aggregate UUID;
    v_stored INTEGER;
BEGIN
    PERFORM pg_advisory_xact_lock(uuid_hash_extended(p_aggregate_id, 7305));

    SELECT e.aggregate_id INTO v_found_aggregate
      FROM events e WHERE e.event_id = p_event_ids[1];
    IF FOUND THEN
        SELECT count(*), max(e.version) INTO v_stored, v_actual
          FROM events e
         WHERE e.event_id = ANY (p_event_ids) AND e.aggregate_id = p_aggregate_id;
        IF v_found_aggregate = p_aggregate_id AND v_stored = cardinality(p_event_ids) THEN
            RETURN QUERY SELECT 1, v_actual;
        ELSE
            RETURN QUERY SELECT 3, 0;
        END IF;
        RETURN;
    END IF;

    SELECT coalesce(max(e.version), 0) INTO v_actual
      FROM events e WHERE e.aggregate_id = p_aggregate_id;
    IF p_expected IS NOT NULL AND p_expected <> v_actual THEN
        RETURN QUERY SELECT 2, v_actual;
        RETURN;
    END IF;

    INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type,
                        event_data, metadata, version, encrypted_fields)
    SELECT t.id, p_aggregate_id, p_aggregate_type, t.ty, t.d, t.m,
           v_actual + t.n::INTEGER,
           CASE WHEN t.enc IS NULL THEN NULL
                ELSE ARRAY(SELECT jsonb_array_elements_text(t.enc)) END
      FROM unnest(p_event_ids, p_event_types, p_data, p_metadata, p_encrypted)
           WITH ORDINALITY AS t(id, ty, d, m, enc, n);

    RETURN QUERY SELECT 0, v_actual + cardinality(p_event_ids);
END;
$$;
