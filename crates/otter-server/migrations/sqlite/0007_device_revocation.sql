-- Revoked device certificates, by serial (lower-case hex without leading
-- zeros, as `devices.cert_serial`). Keyed by serial rather than flagged on the
-- device, so a device re-enrolled with a new certificate is not refused
-- because its old certificate was revoked.
CREATE TABLE revoked_certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX revoked_certificates_by_device ON revoked_certificates (device_id);
