-- Where each 1-minute bar came from: 'ticks' (built by our agent from our own ticks) or
-- the REST source that was backfilled ('cryptocompare', 'coindesk'). Backfills never
-- overwrite 'ticks' bars unless asked to (history.overwrite_own).
ALTER TABLE bars_1m ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'ticks';

-- Resumable backfill jobs: one row per (source, exchange, symbol, range); next_to_ms is
-- the exclusive upper end still to fetch (paging runs backwards), NULL when done.
CREATE TABLE IF NOT EXISTS backfill_jobs (
    job_id       text        PRIMARY KEY,
    source       text        NOT NULL,
    exchange     text        NOT NULL,
    symbol       text        NOT NULL,
    start_ms     bigint      NOT NULL,
    end_ms       bigint      NOT NULL,
    next_to_ms   bigint,
    state        text        NOT NULL,   -- pending | fetching | done | error
    bars_written bigint      NOT NULL DEFAULT 0,
    requests     bigint      NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Known gaps of a pair: minutes [start_ms, end_ms) without bars while the pair was
-- active, from feed outages or from scanning the stored bars.
CREATE TABLE IF NOT EXISTS gaps (
    exchange     text        NOT NULL,
    symbol       text        NOT NULL,
    start_ms     bigint      NOT NULL,
    end_ms       bigint      NOT NULL,
    cause        text        NOT NULL,   -- feed_outage | scan
    state        text        NOT NULL,   -- open | repairing | repaired | unrepairable
    detail       text,
    detected_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, symbol, start_ms)
);
