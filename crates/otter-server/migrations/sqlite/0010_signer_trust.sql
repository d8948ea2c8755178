-- Signer certificates and revocation (offline root keys).
--
-- A release signed by a signer certified by an offline root keeps the
-- root-signed certificate next to the signature, as its JSON envelope, so
-- devices that pin only the root can verify the manifest they are sent.
-- NULL for releases signed by a directly trusted key (and every older one).
ALTER TABLE releases ADD COLUMN manifest_signer_certificate TEXT;

-- Every revocation list published (`PUT /api/v1/signer-revocations`); the
-- one with the highest sequence is in force. `list_json` holds the exact
-- signed bytes, `signature` the root's signature over them.
CREATE TABLE signer_revocations (
    sequence INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    list_json TEXT NOT NULL,
    signature TEXT NOT NULL,
    published_at TEXT NOT NULL,
    published_by TEXT NOT NULL
);
