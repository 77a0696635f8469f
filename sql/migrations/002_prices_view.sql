-- The marketflow field names: one row per exchange, pair and minute.
CREATE OR REPLACE VIEW prices AS
SELECT symbol       AS pair_name,
       exchange,
       bucket_start AS "timestamp",
       avg_price    AS average_price,
       low          AS min_price,
       high         AS max_price
FROM bars_1m;
