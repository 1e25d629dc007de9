-- Field-level encryption: wrapped data keys per data subject, and the
-- append-only, hash-chained audit log of every key and field operation.
-- See chronicle-crypto's crate docs for the scheme; chronicle_postgres::keys
-- and chronicle_postgres::audit for the queries.

-- One row per data subject that ever had a key: the row every key operation
-- of the subject locks (FOR UPDATE), so "first key", rotation and shredding
-- of one subject serialize. current_key_id is the key new fields are
-- encrypted under; shredded_at is the tombstone that refuses new keys.
CREATE TABLE chronicle_key_subjects (
    subject TEXT PRIMARY KEY,
    current_key_id UUID,
    shredded_at TIMESTAMPTZ,
    CHECK (shredded_at IS NULL OR current_key_id IS NULL)
);

-- Data keys, only ever wrapped under a key-encryption key (kek_id). Key ids
-- are UUIDv7, so key_id order is creation order. Shredding sets
-- wrapped_key and kek_id to NULL and stamps shredded_at: the row stays as a
-- tombstone (key id -> subject, no key material) so readers can tell
-- "shredded" from "unknown key".
CREATE TABLE chronicle_data_keys (
    key_id UUID PRIMARY KEY,
    subject TEXT NOT NULL REFERENCES chronicle_key_subjects (subject),
    wrapped_key BYTEA,
    kek_id TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    rewrapped_at TIMESTAMPTZ,
    shredded_at TIMESTAMPTZ,
    CHECK ((shredded_at IS NULL) = (wrapped_key IS NOT NULL AND kek_id IS NOT NULL))
);

CREATE INDEX idx_chronicle_data_keys_subject ON chronicle_data_keys (subject, key_id);
-- KEK rotation progress: how many live keys are still under a given KEK.
CREATE INDEX idx_chronicle_data_keys_kek ON chronicle_data_keys (kek_id) WHERE kek_id IS NOT NULL;

-- The audit log. hash = SHA-256(prev_hash || canonical(entry)); the first
-- row follows 32 zero bytes. seq numbers rows from 1 without gaps.
CREATE TABLE chronicle_audit_log (
    seq BIGINT PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL,
    operation TEXT NOT NULL,
    outcome TEXT NOT NULL,
    subject TEXT,
    key_id UUID,
    kek_id TEXT,
    event_id UUID,
    field TEXT,
    actor TEXT NOT NULL,
    purpose TEXT NOT NULL,
    prev_hash BYTEA NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash BYTEA NOT NULL CHECK (octet_length(hash) = 32)
);

CREATE INDEX idx_chronicle_audit_subject ON chronicle_audit_log (subject, seq);
CREATE INDEX idx_chronicle_audit_at ON chronicle_audit_log (at);
CREATE INDEX idx_chronicle_audit_event ON chronicle_audit_log (event_id) WHERE event_id IS NOT NULL;

-- The chain's head: one row, locked FOR UPDATE by every append, so batches
-- link one after another. It is also the anchor that reveals rows cut from
-- the end of the log.
CREATE TABLE chronicle_audit_head (
    id BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL CHECK (octet_length(hash) = 32)
);

INSERT INTO chronicle_audit_head (id, seq, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- Append-only: rows of the log can be neither changed nor removed, and the
-- head only moves forward. (A superuser can still disable the triggers;
-- the hash chain is what reveals that.)
CREATE FUNCTION chronicle_audit_refuse() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit records are never changed or deleted; chronicle audit verify checks the chain';
END;
$$;

CREATE TRIGGER chronicle_audit_log_append_only
    BEFORE UPDATE OR DELETE ON chronicle_audit_log
    FOR EACH ROW EXECUTE FUNCTION chronicle_audit_refuse();

CREATE TRIGGER chronicle_audit_log_no_truncate
    BEFORE TRUNCATE ON chronicle_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_audit_refuse();

CREATE FUNCTION chronicle_audit_head_forward() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR NEW.seq < OLD.seq THEN
        RAISE EXCEPTION 'chronicle_audit_head only moves forward: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER chronicle_audit_head_forward_only
    BEFORE UPDATE OR DELETE ON chronicle_audit_head
    FOR EACH ROW EXECUTE FUNCTION chronicle_audit_head_forward();

CREATE TRIGGER chronicle_audit_head_no_truncate
    BEFORE TRUNCATE ON chronicle_audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_audit_refuse();
