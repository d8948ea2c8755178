-- Tamper-evident audit: every row carries the HMAC-SHA256 chain value of
-- the row before it (`prev_hash`) and its own (`hash`), lowercase hex of 32
-- bytes; see `audit.rs` for the encoding. Rows written before this migration
-- have NULL in both until the server chains them at its first start with
-- the audit key (in Rust: the key is not in the database).
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;

-- Still append-only, with one exception: chaining a row written before this
-- migration sets its NULL `prev_hash` and `hash` and changes nothing else.
-- (Triggers stop mistakes, not an attacker, who can drop them: the chain is
-- what shows tampering.)
DROP TRIGGER audit_no_update;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
WHEN OLD.hash IS NOT NULL
    OR OLD.prev_hash IS NOT NULL
    OR NEW.seq IS NOT OLD.seq
    OR NEW.at IS NOT OLD.at
    OR NEW.actor_kind IS NOT OLD.actor_kind
    OR NEW.actor IS NOT OLD.actor
    OR NEW.device_id IS NOT OLD.device_id
    OR NEW.deployment_id IS NOT OLD.deployment_id
    OR NEW.event IS NOT OLD.event
    OR NEW.details IS NOT OLD.details
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

-- Every new row is chained.
CREATE TRIGGER audit_chained BEFORE INSERT ON audit
WHEN NEW.hash IS NULL OR NEW.prev_hash IS NULL
BEGIN
    SELECT RAISE(ABORT, 'an audit row needs prev_hash and hash');
END;
