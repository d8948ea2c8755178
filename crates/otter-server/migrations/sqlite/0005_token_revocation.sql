-- Operator tokens can be revoked: a revoked token keeps its row (its name
-- stays taken, so audit rows keep naming one token) and is refused from the
-- next request on. NULL while the token is active.
ALTER TABLE operator_tokens ADD COLUMN revoked_at TEXT;
