-- Push mode: progress of each pushed artifact, per (deployment, device).
-- `acked_offset` is what the device last acknowledged as durably written;
-- `bytes_sent` counts every byte the server published for the transfer,
-- resends included, so a resume that repeats nothing is visible.
CREATE TABLE push_transfers (
    deployment_id  TEXT NOT NULL REFERENCES deployments (id),
    device_id      TEXT NOT NULL REFERENCES devices (id),
    acked_offset   INTEGER NOT NULL,
    bytes_sent     INTEGER NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
);
