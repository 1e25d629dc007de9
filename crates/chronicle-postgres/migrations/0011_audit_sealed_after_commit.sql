-- Field encryption, third step (issue 4): audit records are written plain
-- in the writer's transaction and linked into the hash chain after commit.
--
-- Linking a record into a chain inside the writer's transaction (migration
-- 9: an advisory lock on one of sixteen chains, the chain's head row read
-- and updated, the hash computed) cost more than storing the record: an
-- encrypted append ran at a third of a plain one. Now a writer inserts its
-- records with the chain columns NULL, in the same transaction as what they
-- record (the events of an append; a decrypting read commits them before it
-- returns plaintext), and a sealer (PgAuditSink::seal, run in the
-- background, by `chronicle audit seal` and before every verification)
-- links committed records into chain 0 in (transaction_id, id) order, only
-- below the snapshot's xmin: every transaction below it has ended, so no
-- record can still appear there, exactly as the event feed is read.
--
-- What this changes in the guarantee: a record is tamper-evident once
-- sealed, normally within a second, instead of at commit. A chain is only
-- as trustworthy as its anchors anyway (someone able to rewrite rows can
-- recompute every later hash), and anchors are taken far less often than
-- every second.
--
-- * transaction_id: the writer's transaction, the sealing order. Rows
--   written before this migration are sealed already; they get 0.
-- * chain, seq, prev_hash, hash: NULL until sealed, then set once. The
--   append-only trigger lets exactly that update through.
-- * chronicle_audit_head.sealed_below: the sealer's horizon for chain 0.
--   An unsealed row below it cannot come from a writer (every transaction
--   below it had ended when the sealer passed): it was inserted outside the
--   audit sink, and verification reports it instead of sealing it.
-- * chronicle_audit_append and chronicle_append_audited store records
--   unsealed and no longer take the records' canonical bytes;
--   chronicle_append_audited also returns which of its new keys became
--   their subjects' current key, so the writer caches them as current.

ALTER TABLE chronicle_audit_log ADD COLUMN transaction_id XID8 NOT NULL DEFAULT '0';
ALTER TABLE chronicle_audit_log ALTER COLUMN transaction_id SET DEFAULT pg_current_xact_id();
ALTER TABLE chronicle_audit_log
    ALTER COLUMN chain DROP NOT NULL,
    ALTER COLUMN seq DROP NOT NULL,
    ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL,
    ADD CONSTRAINT chronicle_audit_log_sealed CHECK (num_nulls(chain, seq, prev_hash, hash) IN (0, 4));
CREATE INDEX idx_chronicle_audit_unsealed ON chronicle_audit_log (transaction_id, id)
    WHERE hash IS NULL;

ALTER TABLE chronicle_audit_head ADD COLUMN sealed_below XID8 NOT NULL DEFAULT '0';

-- Sealing is the one update the log allows: the four chain columns set on
-- a row that had none, nothing else changed.
CREATE OR REPLACE FUNCTION chronicle_audit_refuse() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'chronicle_audit_log' THEN
        IF OLD.hash IS NULL AND NEW.hash IS NOT NULL
           AND (NEW.id, NEW.transaction_id, NEW.at, NEW.operation, NEW.outcome, NEW.subject,
                NEW.key_id, NEW.kek_id, NEW.event_ids, NEW.fields, NEW.actor, NEW.purpose)
               IS NOT DISTINCT FROM
               (OLD.id, OLD.transaction_id, OLD.at, OLD.operation, OLD.outcome, OLD.subject,
                OLD.key_id, OLD.kek_id, OLD.event_ids, OLD.fields, OLD.actor, OLD.purpose) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit records are never changed or deleted; chronicle audit verify checks the chain';
END;
$$;

DROP FUNCTION chronicle_append_audited(UUID, TEXT, INTEGER, UUID[], TEXT[], JSONB[], JSONB[], JSONB[],
    TEXT[], UUID[], BYTEA[], TEXT[], TIMESTAMPTZ[], TIMESTAMPTZ[], TEXT[], TEXT[], TEXT[], UUID[],
    TEXT[], INTEGER[], UUID[], INTEGER[], TEXT[], TEXT[], TEXT[], BYTEA[]);
DROP FUNCTION chronicle_audit_append(TIMESTAMPTZ[], TEXT[], TEXT[], TEXT[], UUID[], TEXT[],
    INTEGER[], UUID[], INTEGER[], TEXT[], TEXT[], TEXT[], BYTEA[]);

-- Stores a batch of audit records, unsealed. Per record, p_event_counts and
-- p_field_counts say how many of the flat p_event_ids and p_fields are its
-- own. Returns how many were stored. (PL/pgSQL, so that its plan is cached
-- per session; a SQL function's would be made on every call.)
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
    p_purpose TEXT[]
) RETURNS INTEGER
LANGUAGE plpgsql
AS $$
DECLARE
    v_rows INTEGER;
BEGIN
    IF cardinality(p_at) = 1 THEN
        INSERT INTO chronicle_audit_log (at, operation, outcome, subject, key_id, kek_id,
                                         event_ids, fields, actor, purpose)
        VALUES (p_at[1], p_operation[1], p_outcome[1], p_subject[1], p_key_id[1], p_kek_id[1],
                CASE WHEN p_event_counts[1] > 0 THEN p_event_ids END,
                CASE WHEN p_field_counts[1] > 0 THEN p_fields END,
                p_actor[1], p_purpose[1]);
        RETURN 1;
    END IF;
    INSERT INTO chronicle_audit_log (at, operation, outcome, subject, key_id, kek_id,
                                     event_ids, fields, actor, purpose)
    SELECT t.at, t.op, t.oc, t.su, t.k, t.kek,
           CASE WHEN t.ec > 0 THEN p_event_ids[t.eo + 1 : t.eo + t.ec] END,
           CASE WHEN t.fc > 0 THEN p_fields[t.fo + 1 : t.fo + t.fc] END,
           t.ac, t.pu
      FROM (SELECT u.*, (sum(u.ec) OVER w - u.ec)::INTEGER AS eo,
                   (sum(u.fc) OVER w - u.fc)::INTEGER AS fo
              FROM unnest(p_at, p_operation, p_outcome, p_subject, p_key_id, p_kek_id,
                          p_event_counts, p_field_counts, p_actor, p_purpose)
                   WITH ORDINALITY AS u(at, op, oc, su, k, kek, ec, fc, ac, pu, n)
            WINDOW w AS (ORDER BY u.n)) AS t
     ORDER BY t.n;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_rows;
END;
$$;

-- As migration 9's, with the records stored unsealed, and the new keys
-- that became current returned.
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
    a_purpose TEXT[]
) RETURNS TABLE (status INTEGER, version INTEGER, current_keys UUID[])
LANGUAGE plpgsql
AS $$
DECLARE
    v_status INTEGER;
    v_version INTEGER;
    v_shredded BOOLEAN;
    v_current UUID[] := '{}';
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
            IF FOUND THEN
                v_current := v_current || k_key_id[i];
            END IF;
        END LOOP;
        PERFORM chronicle_audit_append(a_at, a_operation, a_outcome, a_subject, a_key_id,
                                       a_kek_id, a_event_counts, a_event_ids, a_field_counts,
                                       a_fields, a_actor, a_purpose);
    END IF;
    RETURN QUERY SELECT v_status, v_version, v_current;
END;
$$;
