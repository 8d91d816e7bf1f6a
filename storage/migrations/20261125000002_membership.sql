-- Cluster membership, the Orleans way: rows per silo incarnation plus a table version per cluster.
-- Every insert or update checks and bumps the version (and the row's etag) in one transaction.
CREATE TABLE grains_membership_version (
    cluster_id TEXT   PRIMARY KEY,
    version    BIGINT NOT NULL
);

CREATE TABLE grains_membership (
    cluster_id   TEXT        NOT NULL REFERENCES grains_membership_version (cluster_id) ON DELETE CASCADE,
    endpoint     TEXT        NOT NULL,
    epoch        BIGINT      NOT NULL,
    name         TEXT        NOT NULL,
    status       TEXT        NOT NULL CHECK (status IN ('joining', 'active', 'shutting_down', 'dead')),
    gateway      TEXT,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    -- [{"by": {"endpoint": ..., "epoch": ...}, "at_ms": ...}, ...]
    suspicions   JSONB       NOT NULL DEFAULT '[]',
    etag         BIGINT      NOT NULL,
    PRIMARY KEY (cluster_id, endpoint, epoch)
);
