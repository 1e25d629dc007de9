-- Field encryption, second step (issue 4): coarser audit records, sixteen
-- audit chains instead of one, and one-statement writes for the hot paths.
--
-- * An audit record covers one call's work on one subject under one key:
--   event_ids and fields list the events and fields (they replace the
--   single event_id and field columns; existing rows are carried over, and
--   their hashes still verify, see AuditEntry::canonical_bytes).
-- * The log is sixteen independent hash chains (stripes). A writer links
--   its batch into whichever chain it can lock without waiting, so
--   concurrent appends, each writing its audit record in its own
--   transaction, do not queue for one head row (which would serialize every
--   commit, fsync included). Each row has a global id (order of the whole
--   log, for listing and paging) and a gapless seq within its chain (for
--   verification); chronicle_audit_head has one row per chain. Existing rows
--   become chain 0.
-- * chronicle_audit_append links and stores a batch in one statement;
--   chronicle_append_audited appends events, the first keys of their
--   subjects and their audit records in one statement;
--   chronicle_insert_first_key makes a subject's first key in one round
--   trip (for writers that store keys apart from events).
-- * A trigger on chronicle_key_subjects sends NOTIFY chronicle_keys when a
--   subject is rotated or shredded, so other processes drop cached keys at
--   once (PgKeyListener); without LISTEN their cache TTL still applies.

-- 1. The log's new columns, and existing rows carried over. The
--    append-only trigger is set aside for this one rewrite: the contents
--    that are hashed do not change.
ALTER TABLE chronicle_audit_log
    ADD COLUMN id BIGINT,
    ADD COLUMN chain SMALLINT NOT NULL DEFAULT 0 CHECK (chain >= 0 AND chain < 16),
    ADD COLUMN event_ids UUID[],
    ADD COLUMN fields TEXT[];

ALTER TABLE chronicle_audit_log DISABLE TRIGGER chronicle_audit_log_append_only;
UPDATE chronicle_audit_log
   SET id = seq,
       event_ids = CASE WHEN event_id IS NULL THEN NULL ELSE ARRAY[event_id] END,
       fields = CASE WHEN field IS NULL THEN NULL ELSE ARRAY[field] END;
ALTER TABLE chronicle_audit_log ENABLE TRIGGER chronicle_audit_log_append_only;

DROP INDEX idx_chronicle_audit_event;
DROP INDEX idx_chronicle_audit_subject;
ALTER TABLE chronicle_audit_log DROP COLUMN event_id, DROP COLUMN field;
ALTER TABLE chronicle_audit_log DROP CONSTRAINT chronicle_audit_log_pkey;

CREATE SEQUENCE chronicle_audit_log_id_seq AS BIGINT OWNED BY chronicle_audit_log.id;
SELECT setval('chronicle_audit_log_id_seq', coalesce(max(id), 0) + 1, false) FROM chronicle_audit_log;
ALTER TABLE chronicle_audit_log
    ALTER COLUMN id SET NOT NULL,
    ALTER COLUMN id SET DEFAULT nextval('chronicle_audit_log_id_seq'),
    ALTER COLUMN chain DROP DEFAULT,
    ADD PRIMARY KEY (id),
    ADD CONSTRAINT chronicle_audit_log_chain_seq UNIQUE (chain, seq);

-- Few indexes: a read's audit record is written on every decrypting read.
-- By subject (who saw whose data), and by time as a BRIN index (the log is
-- appended in time order). There is no index on event_ids: finding the
-- records of one event scans, so narrow it by subject or time.
DROP INDEX idx_chronicle_audit_at;
CREATE INDEX idx_chronicle_audit_subject ON chronicle_audit_log (subject, id);
CREATE INDEX idx_chronicle_audit_at ON chronicle_audit_log USING brin (at);

-- 2. One head per chain. The old single row becomes chain 0's.
ALTER TABLE chronicle_audit_head ADD COLUMN chain SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE chronicle_audit_head DROP CONSTRAINT chronicle_audit_head_pkey;
ALTER TABLE chronicle_audit_head DROP COLUMN id;
ALTER TABLE chronicle_audit_head
    ALTER COLUMN chain DROP DEFAULT,
    ADD PRIMARY KEY (chain),
    ADD CHECK (chain >= 0 AND chain < 16);
INSERT INTO chronicle_audit_head (chain, seq, hash)
SELECT c, 0, decode(repeat('00', 32), 'hex') FROM generate_series(1, 15) AS c;

-- 3. Links a batch of audit entries into a chain and stores it: one
--    statement. The chain is the first of the sixteen whose advisory lock
--    (class "aud1", key = chain) is free, starting from one picked by the
--    backend's pid; only if all are taken does it wait. The client sends
--    each entry's canonical bytes (AuditEntry::canonical_bytes);
--    hash = sha256(prev_hash || canonical). Per entry, p_event_counts and
--    p_field_counts say how many of the flat p_event_ids and p_fields are
--    its own. The hashes are chained in a loop, the rows inserted with one
--    INSERT. Returns the chain and its new head's seq.
CREATE FUNCTION chronicle_audit_append(
    p_at TIMESTAMPTZ[],
    p_operation TEXT[],
    p_outcome TEXT[],
    p_subject TEXT[],
    p_key_id UUID[],
    p_kek_id TEXT[],
    p_event_counts INTEGER[],
    p_event_ids UUID[],
    p_field_counts INTEGER[],
    p_fields TEXT[],
    p_actor TEXT[],
    p_purpose TEXT[],
    p_canonical BYTEA[]
) RETURNS TABLE (audit_chain SMALLINT, audit_seq BIGINT)
LANGUAGE plpgsql
AS $$
DECLARE
    v_n INTEGER := coalesce(cardinality(p_canonical), 0);
    v_start INTEGER := pg_backend_pid() % 16;
    v_chain SMALLINT;
    v_seq BIGINT;
    v_hash BYTEA;
    v_canonical BYTEA;
    v_prev BYTEA[] := '{}';
    v_hashes BYTEA[] := '{}';
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    FOR i IN 0..15 LOOP
        IF pg_try_advisory_xact_lock(1635083313, (v_start + i) % 16) THEN
            v_chain := (v_start + i) % 16;
            EXIT;
        END IF;
    END LOOP;
    IF v_chain IS NULL THEN
        v_chain := v_start;
        PERFORM pg_advisory_xact_lock(1635083313, v_chain);
    END IF;
    IF v_n = 1 THEN
        -- One entry (an append's, a stream read's): link, store and move
        -- the head in one statement. The chain's advisory lock keeps every
        -- other writer off the head row, so reading it unlocked is safe.
        WITH o AS (SELECT h.hash AS prev FROM chronicle_audit_head h WHERE h.chain = v_chain),
             n AS (UPDATE chronicle_audit_head h
                      SET seq = h.seq + 1, hash = sha256(h.hash || p_canonical[1])
                    WHERE h.chain = v_chain
                RETURNING h.seq, h.hash)
        INSERT INTO chronicle_audit_log (chain, seq, at, operation, outcome, subject, key_id,
                                         kek_id, event_ids, fields, actor, purpose,
                                         prev_hash, hash)
        SELECT v_chain, n.seq, p_at[1], p_operation[1], p_outcome[1], p_subject[1], p_key_id[1],
               p_kek_id[1],
               CASE WHEN p_event_counts[1] > 0 THEN p_event_ids[1 : p_event_counts[1]] END,
               CASE WHEN p_field_counts[1] > 0 THEN p_fields[1 : p_field_counts[1]] END,
               p_actor[1], p_purpose[1], o.prev, n.hash
          FROM o, n
        RETURNING chronicle_audit_log.seq INTO v_seq;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'chronicle_audit_head has no row for chain %: the audit log was tampered with', v_chain
                USING ERRCODE = 'data_corrupted';
        END IF;
        RETURN QUERY SELECT v_chain, v_seq;
        RETURN;
    END IF;
    SELECT h.seq, h.hash INTO v_seq, v_hash
      FROM chronicle_audit_head h WHERE h.chain = v_chain FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chronicle_audit_head has no row for chain %: the audit log was tampered with', v_chain
            USING ERRCODE = 'data_corrupted';
    END IF;
    FOREACH v_canonical IN ARRAY p_canonical LOOP
        v_prev := v_prev || v_hash;
        v_hash := sha256(v_hash || v_canonical);
        v_hashes := v_hashes || v_hash;
    END LOOP;
    INSERT INTO chronicle_audit_log (chain, seq, at, operation, outcome, subject, key_id,
                                     kek_id, event_ids, fields, actor, purpose,
                                     prev_hash, hash)
    SELECT v_chain, v_seq + t.n, t.at, t.op, t.oc, t.su, t.k, t.kek,
           CASE WHEN t.ec > 0 THEN p_event_ids[t.eo + 1 : t.eo + t.ec] END,
           CASE WHEN t.fc > 0 THEN p_fields[t.fo + 1 : t.fo + t.fc] END,
           t.ac, t.pu, t.pr, t.h
      FROM (SELECT u.*, (sum(u.ec) OVER w - u.ec)::INTEGER AS eo,
                   (sum(u.fc) OVER w - u.fc)::INTEGER AS fo
              FROM unnest(p_at, p_operation, p_outcome, p_subject, p_key_id, p_kek_id,
                          p_event_counts, p_field_counts, p_actor, p_purpose, v_prev, v_hashes)
                   WITH ORDINALITY AS u(at, op, oc, su, k, kek, ec, fc, ac, pu, pr, h, n)
            WINDOW w AS (ORDER BY u.n)) AS t
     ORDER BY t.n;
    v_seq := v_seq + v_n;
    UPDATE chronicle_audit_head h SET seq = v_seq, hash = v_hash WHERE h.chain = v_chain;
    RETURN QUERY SELECT v_chain, v_seq;
END;
$$;

-- 4. chronicle_append, the data keys the events were encrypted under
--    (a subject's first key, made by the writer) and the audit records of
--    what it stores, in one statement: one transaction, one commit. Keys
--    and records are stored only when the events are (status 0): a
--    conflict or an idempotent repeat stores none. Each key is stored under
--    its subject's lock (as chronicle_insert_first_key) and becomes current
--    unless the subject has a key by then (a concurrent first writer's: it
--    stays one more key of the subject, and the events under it readable);
--    a shredded subject aborts everything with SQLSTATE CH410 (DETAIL: the
--    subject). Returns what chronicle_append returns; a CH409 from it aborts
--    everything, as before.
CREATE FUNCTION chronicle_append_audited(
    p_aggregate_id UUID,
    p_aggregate_type TEXT,
    p_expected INTEGER,
    p_event_ids UUID[],
    p_event_types TEXT[],
    p_data JSONB[],
    p_metadata JSONB[],
    p_encrypted JSONB[],
    k_subject TEXT[],
    k_key_id UUID[],
    k_wrapped BYTEA[],
    k_kek_id TEXT[],
    k_created_at TIMESTAMPTZ[],
    a_at TIMESTAMPTZ[],
    a_operation TEXT[],
    a_outcome TEXT[],
    a_subject TEXT[],
    a_key_id UUID[],
    a_kek_id TEXT[],
    a_event_counts INTEGER[],
    a_event_ids UUID[],
    a_field_counts INTEGER[],
    a_fields TEXT[],
    a_actor TEXT[],
    a_purpose TEXT[],
    a_canonical BYTEA[]
) RETURNS TABLE (status INTEGER, version INTEGER)
LANGUAGE plpgsql
AS $$
DECLARE
    v_status INTEGER;
    v_version INTEGER;
    v_shredded BOOLEAN;
BEGIN
    SELECT a.status, a.version INTO v_status, v_version
      FROM chronicle_append(p_aggregate_id, p_aggregate_type, p_expected, p_event_ids,
                            p_event_types, p_data, p_metadata, p_encrypted) AS a;
    IF v_status = 0 THEN
        FOR i IN 1..coalesce(cardinality(k_subject), 0) LOOP
            PERFORM pg_advisory_xact_lock(1668446576, hashtext(k_subject[i]));
            INSERT INTO chronicle_key_subjects (subject) VALUES (k_subject[i])
                ON CONFLICT (subject) DO NOTHING;
            SELECT s.shredded_at IS NOT NULL INTO v_shredded
              FROM chronicle_key_subjects s WHERE s.subject = k_subject[i] FOR UPDATE;
            IF v_shredded THEN
                RAISE EXCEPTION 'subject % has been shredded', k_subject[i]
                    USING ERRCODE = 'CH410', DETAIL = k_subject[i];
            END IF;
            INSERT INTO chronicle_data_keys (key_id, subject, wrapped_key, kek_id, created_at)
            VALUES (k_key_id[i], k_subject[i], k_wrapped[i], k_kek_id[i], k_created_at[i]);
            UPDATE chronicle_key_subjects s SET current_key_id = k_key_id[i]
             WHERE s.subject = k_subject[i] AND s.current_key_id IS NULL;
        END LOOP;
        PERFORM chronicle_audit_append(a_at, a_operation, a_outcome, a_subject, a_key_id,
                                       a_kek_id, a_event_counts, a_event_ids, a_field_counts,
                                       a_fields, a_actor, a_purpose, a_canonical);
    END IF;
    RETURN QUERY SELECT v_status, v_version;
END;
$$;

-- 5. A subject's first data key in one round trip (PgDataKeyStore's
--    insert_first): lock the subject (advisory, then its row), and store
--    the key unless the subject has one or is shredded. state: 0 stored,
--    1 the subject's existing current key is returned, 2 shredded.
CREATE FUNCTION chronicle_insert_first_key(
    p_subject TEXT,
    p_key_id UUID,
    p_wrapped BYTEA,
    p_kek_id TEXT,
    p_created_at TIMESTAMPTZ
) RETURNS TABLE (state INTEGER, key_id UUID, wrapped_key BYTEA, kek_id TEXT, created_at TIMESTAMPTZ)
LANGUAGE plpgsql
AS $$
DECLARE
    v_current UUID;
    v_shredded BOOLEAN;
BEGIN
    PERFORM pg_advisory_xact_lock(1668446576, hashtext(p_subject));
    INSERT INTO chronicle_key_subjects (subject) VALUES (p_subject)
        ON CONFLICT (subject) DO NOTHING;
    SELECT s.current_key_id, s.shredded_at IS NOT NULL INTO v_current, v_shredded
      FROM chronicle_key_subjects s WHERE s.subject = p_subject FOR UPDATE;
    IF v_shredded THEN
        RETURN QUERY SELECT 2, NULL::UUID, NULL::BYTEA, NULL::TEXT, NULL::TIMESTAMPTZ;
        RETURN;
    END IF;
    IF v_current IS NOT NULL THEN
        RETURN QUERY SELECT 1, k.key_id, k.wrapped_key, k.kek_id, k.created_at
                       FROM chronicle_data_keys k WHERE k.key_id = v_current;
        RETURN;
    END IF;
    INSERT INTO chronicle_data_keys (key_id, subject, wrapped_key, kek_id, created_at)
    VALUES (p_key_id, p_subject, p_wrapped, p_kek_id, p_created_at);
    UPDATE chronicle_key_subjects s SET current_key_id = p_key_id WHERE s.subject = p_subject;
    RETURN QUERY SELECT 0, p_key_id, p_wrapped, p_kek_id, p_created_at;
END;
$$;

-- 6. NOTIFY chronicle_keys on rotation and shredding, delivered at commit:
--    {"op": "rotate" | "shred", "subject": "..."}. A subject's first key
--    is not announced (nobody can have cached another).
CREATE FUNCTION chronicle_key_subjects_notify() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.shredded_at IS NOT NULL AND OLD.shredded_at IS NULL THEN
        PERFORM pg_notify('chronicle_keys',
                          json_build_object('op', 'shred', 'subject', NEW.subject)::text);
    ELSIF OLD.current_key_id IS NOT NULL
          AND NEW.current_key_id IS DISTINCT FROM OLD.current_key_id THEN
        PERFORM pg_notify('chronicle_keys',
                          json_build_object('op', 'rotate', 'subject', NEW.subject)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER chronicle_key_subjects_notify
    AFTER UPDATE ON chronicle_key_subjects
    FOR EACH ROW EXECUTE FUNCTION chronicle_key_subjects_notify();
