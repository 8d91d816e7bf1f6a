-- Durable reminders; grain_hash places each row on the consistent-hash ring for range reads.
CREATE TABLE grains_reminders (
    grain_type  TEXT        NOT NULL,
    grain_key   TEXT        NOT NULL,
    name        TEXT        NOT NULL,
    grain_hash  BIGINT      NOT NULL CHECK (grain_hash BETWEEN 0 AND 4294967295),
    start_at    TIMESTAMPTZ NOT NULL,
    period_ms   BIGINT      NOT NULL CHECK (period_ms > 0),
    etag        BIGINT      NOT NULL,
    PRIMARY KEY (grain_type, grain_key, name)
);

CREATE INDEX grains_reminders_by_hash ON grains_reminders (grain_hash);
