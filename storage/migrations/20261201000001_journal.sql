-- Event journal: one row per event of an event-sourced grain. A stream is (grain_type, grain_key, stream):
-- the journal called `stream` of one grain; `seq` numbers its events from 1 without gaps, and the primary key
-- makes a second event at one seq impossible. `position` orders the whole journal: appends are serialized by
-- an advisory lock and take positions after the highest one, so positions grow in commit order, gap-free.
CREATE TABLE grains_journal (
    grain_type  TEXT        NOT NULL,
    grain_key   TEXT        NOT NULL,
    stream      TEXT        NOT NULL,
    seq         BIGINT      NOT NULL CHECK (seq > 0),
    position    BIGINT      NOT NULL UNIQUE CHECK (position > 0),
    event_type  TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    tags        TEXT[]      NOT NULL DEFAULT '{}',
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (grain_type, grain_key, stream, seq)
);

-- Projections by grain type read in position order.
CREATE INDEX grains_journal_by_type ON grains_journal (grain_type, position);

-- Projections by tag read in position order.
CREATE TABLE grains_journal_tags (
    tag      TEXT   NOT NULL,
    position BIGINT NOT NULL,
    PRIMARY KEY (tag, position)
);

-- The latest snapshot of each stream: its state folded up to and including event `seq`.
CREATE TABLE grains_journal_snapshots (
    grain_type TEXT        NOT NULL,
    grain_key  TEXT        NOT NULL,
    stream     TEXT        NOT NULL,
    seq        BIGINT      NOT NULL CHECK (seq > 0),
    document   JSONB       NOT NULL,
    taken_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (grain_type, grain_key, stream)
);

-- Each projection's offset: the position of the last event whose effect on its read model is committed
-- (updated in the same transaction as the read model).
CREATE TABLE grains_projection_offsets (
    name       TEXT        PRIMARY KEY,
    position   BIGINT      NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
