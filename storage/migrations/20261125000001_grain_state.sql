-- Grain state: one row per (grain type, grain key, state name), the state as JSONB for operators.
-- Every write takes a fresh etag from one sequence, so an etag is never reused (no ABA after a clear).
CREATE SEQUENCE grains_etag_seq;

CREATE TABLE grains_state (
    grain_type  TEXT        NOT NULL,
    grain_key   TEXT        NOT NULL,
    state_name  TEXT        NOT NULL,
    document    JSONB       NOT NULL,
    etag        BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (grain_type, grain_key, state_name)
);
