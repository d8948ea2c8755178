-- A device's X25519 public encryption key (standard base64 of 32 bytes), sent
-- in its registration: each release's data key is wrapped to it (HPKE) before
-- the device is told about the release. NULL until an agent that wraps
-- registers; such a device is sent no release.
ALTER TABLE devices ADD COLUMN encryption_key TEXT;
