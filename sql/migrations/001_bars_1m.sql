-- 1-minute OHLCV bars, one row per (exchange, symbol, bucket_start); a TimescaleDB
-- hypertable (Apache-2 edition features only). Prices in quote currency per base unit,
-- volume in base units, bucket_start = window start (UTC), window = [start, start+1m).
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS bars_1m (
    exchange      text             NOT NULL,
    symbol        text             NOT NULL,
    bucket_start  timestamptz      NOT NULL,
    open          double precision NOT NULL,
    high          double precision NOT NULL,
    low           double precision NOT NULL,
    close         double precision NOT NULL,
    volume        double precision NOT NULL,
    trade_count   integer          NOT NULL,
    avg_price     double precision NOT NULL,
    vwap          double precision,
    open_ts_ms    bigint           NOT NULL,
    close_ts_ms   bigint           NOT NULL,
    inserted_at   timestamptz      NOT NULL DEFAULT now(),
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, symbol, bucket_start)
);

SELECT create_hypertable('bars_1m', by_range('bucket_start', INTERVAL '1 day'),
                         if_not_exists => TRUE);

CREATE INDEX IF NOT EXISTS bars_1m_symbol_bucket ON bars_1m (symbol, bucket_start DESC);
