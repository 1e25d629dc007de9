-- Field encryption, fourth step (issue 4): an encrypted append writes no
-- audit row; its `encrypt` record is derived from the stored event by the
-- sealer.
--
-- Everything an `encrypt` record says is already in the event it covers:
-- the event id, the fields (encrypted_fields), the key (each envelope's
-- "kid"), the subject (the key's row in chronicle_data_keys), the time (the
-- event's timestamp) and the writer's transaction. Only the actor and the
-- purpose were not, and the writer now stores them in the event's metadata
-- as "$encrypted_by": {"actor": ..., "purpose": ...}. The sealer reads
-- events carrying that mark in feed order, below the same horizon it seals
-- below, and stores one record per transaction, key and context (what the
-- writer stored before: one per append, subject and key), with the
-- transaction id of the events, so it is sealed in their transaction's
-- place. The record therefore exists exactly when the event does, as
-- before, and an append stores one row instead of two.
--
-- * derived_tid, derived_pos: the last event the sealer has read, in feed
--   order (transaction_id, global_position). It starts at the beginning:
--   the sealer reads at most 20,000 events a round, so an existing store
--   is read once, in the background, and an event marked by a writer that
--   ran before this migration still gets its record.
-- * chronicle_pointer_path: a JSON pointer (RFC 6901) as the text[] path
--   jsonb's #> takes.

ALTER TABLE chronicle_audit_head
    ADD COLUMN derived_tid XID8 NOT NULL DEFAULT '0',
    ADD COLUMN derived_pos BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION chronicle_pointer_path(p_pointer TEXT) RETURNS TEXT[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce(array_agg(replace(replace(s, '~1', '/'), '~0', '~') ORDER BY n), '{}')
      FROM unnest(string_to_array(substr(p_pointer, 2), '/')) WITH ORDINALITY AS u(s, n)
     WHERE p_pointer <> ''
$$;
