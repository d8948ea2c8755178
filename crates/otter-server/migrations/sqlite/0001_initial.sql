-- Initial schema of the Otter server (SQLite).
--
-- Times are RFC 3339 UTC strings with milliseconds ("2026-11-25T10:00:00.000Z"):
-- fixed width, so they sort as text. Link expiry is Unix seconds because the
-- link token carries it as an integer. JSON columns hold text.

CREATE TABLE operator_tokens (
    name          TEXT PRIMARY KEY NOT NULL,
    token_sha256  TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

CREATE TABLE devices (
    id             TEXT PRIMARY KEY NOT NULL,
    hardware       TEXT NOT NULL,
    enrolled_at    TEXT NOT NULL,
    cert_serial    TEXT NOT NULL,
    mode           TEXT,
    agent_version  TEXT,
    installed      TEXT NOT NULL DEFAULT '{}',
    capabilities   TEXT NOT NULL DEFAULT '[]',
    registered_at  TEXT,
    last_seen      TEXT
);

CREATE TABLE device_tags (
    device_id  TEXT NOT NULL REFERENCES devices (id),
    tag        TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);

CREATE TABLE releases (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    version            TEXT NOT NULL,
    kind               TEXT NOT NULL,
    hardware           TEXT NOT NULL,
    manifest_json      TEXT NOT NULL,
    manifest_signer    TEXT NOT NULL,
    manifest_signature TEXT NOT NULL,
    data_key           TEXT NOT NULL,
    payload_size       INTEGER NOT NULL,
    payload_sha256     TEXT NOT NULL,
    artifact_size      INTEGER NOT NULL,
    artifact_sha256    TEXT NOT NULL,
    blob_key           TEXT NOT NULL,
    uploaded_at        TEXT NOT NULL,
    uploaded_by        TEXT NOT NULL
);

CREATE TABLE deployments (
    id          TEXT PRIMARY KEY NOT NULL,
    release_id  TEXT NOT NULL REFERENCES releases (id),
    target      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE deployment_targets (
    deployment_id  TEXT NOT NULL REFERENCES deployments (id),
    device_id      TEXT NOT NULL REFERENCES devices (id),
    phase          TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    detail         TEXT,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_targets_by_device ON deployment_targets (device_id);

CREATE TABLE links (
    id             TEXT PRIMARY KEY NOT NULL,
    deployment_id  TEXT NOT NULL REFERENCES deployments (id),
    device_id      TEXT NOT NULL REFERENCES devices (id),
    created_at     TEXT NOT NULL,
    expires_at     INTEGER NOT NULL,
    revoked_at     TEXT
);
CREATE INDEX links_by_target ON links (deployment_id, device_id);

-- Append-only: the server never updates or deletes a row.
CREATE TABLE audit (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    at             TEXT NOT NULL,
    actor_kind     TEXT NOT NULL,
    actor          TEXT NOT NULL,
    device_id      TEXT,
    deployment_id  TEXT,
    event          TEXT NOT NULL,
    details        TEXT NOT NULL
);
CREATE INDEX audit_by_device ON audit (device_id, seq);
CREATE INDEX audit_by_deployment ON audit (deployment_id, seq);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
