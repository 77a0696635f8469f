-- Exact volumes: volume (sum of qty), quote_volume (sum of price * qty) and vwap as
-- NUMERIC, written from the agent's exact integer sums (core/decimals.py) instead of float
-- sums. A stored double becomes the numeric of its 15 significant digits (PostgreSQL's
-- float8 -> numeric cast), which is the exchange's decimal for the usual sizes; the quote
-- volume of an older bar is its vwap * volume (NULL without a vwap).
ALTER TABLE bars_1m ALTER COLUMN volume TYPE numeric USING volume::numeric;
ALTER TABLE bars_1m ALTER COLUMN vwap TYPE numeric USING vwap::numeric;
ALTER TABLE bars_1m ADD COLUMN IF NOT EXISTS quote_volume numeric;

UPDATE bars_1m SET quote_volume = vwap * volume WHERE vwap IS NOT NULL AND quote_volume IS NULL;
