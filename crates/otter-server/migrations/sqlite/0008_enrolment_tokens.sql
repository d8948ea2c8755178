-- One-time enrolment tokens: a device enrols itself with a CSR and one of
-- these (`POST /v1/enrol`). Only the token's SHA-256 is stored. A token is
-- bound to one device id, used at most once (`used_at`), and never deleted,
-- so an id always names one token in the audit.
CREATE TABLE enrolment_tokens (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    hardware TEXT NOT NULL,
    -- JSON array of tag names.
    tags TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT,
    revoked_at TEXT
);
CREATE INDEX enrolment_tokens_by_device ON enrolment_tokens (device_id);
