-- A deployment may allow devices to install its release over a newer
-- version of the same package (`otter deploy create --allow-downgrade`).
-- The server accepts the flag only for a release whose signed manifest
-- allows a downgrade too; devices check both again before installing.
-- Deployments from before are 0: no downgrade.
ALTER TABLE deployments ADD COLUMN allow_downgrade INTEGER NOT NULL DEFAULT 0;
