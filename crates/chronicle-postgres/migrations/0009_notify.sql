-- Live tailing: after each statement that appends to `events`, notify the
-- `chronicle_events` channel so that projection runners waiting for new
-- events wake at once instead of at their next poll.
--
-- A hint, never the truth: runners still poll, and read the feed from their
-- checkpoint whatever woke them. Notifications are sent at commit and
-- collapse within a transaction (one per appending transaction). Committing
-- a transaction that notified takes a database-wide lock for a moment, which
-- serializes the commits of many concurrent appenders: a store with heavy
-- concurrent appends and no one tailing can turn it off with
-- `ALTER DATABASE ... SET chronicle.notify = off` (or per role or session).
CREATE FUNCTION chronicle_notify_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('chronicle.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('chronicle_events', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER chronicle_events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_notify_events();
