"""Queries on the ``bars_1m`` hypertable (bind parameters only)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from core.models import BAR_ALIASES, BAR_FIELDS, BAR_VALUES

__all__ = ["BAR_JSON_SQL", "CONSOLIDATE_SQL", "fetch_bars", "fetch_rollup", "fetch_rollup_json",
           "fetch_rollup_live", "newest_bar_before", "oldest_bar_in", "pairs", "price_stats",
           "recent_prices", "symbol_known", "upsert_bars", "upsert_fetched_bars"]

_UPSERT = """
INSERT INTO bars_1m (exchange, symbol, bucket_start, open, high, low, close, volume,
                     trade_count, avg_price, vwap, open_ts_ms, close_ts_ms, quote_volume,
                     source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'ticks')
ON CONFLICT (exchange, symbol, bucket_start) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
    close = EXCLUDED.close, volume = EXCLUDED.volume, trade_count = EXCLUDED.trade_count,
    quote_volume = EXCLUDED.quote_volume,
    avg_price = EXCLUDED.avg_price, vwap = EXCLUDED.vwap,
    open_ts_ms = EXCLUDED.open_ts_ms, close_ts_ms = EXCLUDED.close_ts_ms,
    source = 'ticks', updated_at = now()
"""

#: Fetched (REST) bars: $15 is the source name; $16 true lets them replace bars built
#: from our own ticks (source 'ticks'), false keeps those.
_UPSERT_FETCHED = """
INSERT INTO bars_1m AS cur (exchange, symbol, bucket_start, open, high, low, close, volume,
                     trade_count, avg_price, vwap, open_ts_ms, close_ts_ms, quote_volume,
                     source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (exchange, symbol, bucket_start) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
    close = EXCLUDED.close, volume = EXCLUDED.volume, trade_count = EXCLUDED.trade_count,
    quote_volume = EXCLUDED.quote_volume,
    avg_price = EXCLUDED.avg_price, vwap = EXCLUDED.vwap,
    open_ts_ms = EXCLUDED.open_ts_ms, close_ts_ms = EXCLUDED.close_ts_ms,
    source = EXCLUDED.source, updated_at = now()
WHERE $16::boolean OR cur.source <> 'ticks'
"""

_SELECT = """
SELECT exchange, symbol, bucket_start, open, high, low, close, volume, quote_volume,
       trade_count, avg_price, vwap
FROM bars_1m
WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2)
  AND bucket_start >= $3 AND bucket_start < $4
ORDER BY bucket_start, exchange
LIMIT $5
"""

#: The consolidation rule: how the 1-minute bars of one bucket (several minutes, several
#: exchanges) make one bar. Open of the earliest trade (by ``open_ts_ms``), close of the
#: latest (by ``close_ts_ms``), high max, low min, volume and trade count summed, average
#: price count-weighted; quote volume summed (null when a bar of the bucket has none);
#: VWAP = quote volume / volume over the bars that have a quote volume, rounded half-up to
#: 16 places as :func:`core.decimals.vwap_string` rounds a 1-minute bar's
#: (``div(2q * 10^16 + v, 2v) / 10^16``, exact in NUMERIC). Volume, quote volume and VWAP
#: are NUMERIC sums, exact, served as text (:data:`core.models.DECIMAL_FIELDS`,
#: ``trim_scale``). It is the only copy of the rule: every rollup (stored bars, stored plus
#: live bars) uses it, and ``tests/unit/test_series.py`` tests it. The float sum of
#: ``avg_price`` is ordered (bucket_start, exchange) so a bucket's value does not depend on
#: the query plan or on which other rows the range holds (summation is not associative).
CONSOLIDATE_SQL = """
       first(open, open_ts_ms)  AS open,
       max(high)                AS high,
       min(low)                 AS low,
       last(close, close_ts_ms) AS close,
       trim_scale(sum(volume))::text AS volume,
       CASE WHEN count(quote_volume) = count(*)
            THEN trim_scale(sum(quote_volume))::text END AS quote_volume,
       sum(trade_count)::bigint AS trade_count,
       sum(avg_price * trade_count ORDER BY bucket_start, exchange)
         / nullif(sum(trade_count), 0) AS avg_price,
       trim_scale(div(2 * sum(quote_volume) * 1e16
                        + sum(volume) FILTER (WHERE quote_volume IS NOT NULL),
                      2 * nullif(sum(volume) FILTER (WHERE quote_volume IS NOT NULL), 0))
                  * 1e-16)::text AS vwap,
       min(open_ts_ms)          AS open_ts_ms,
       max(close_ts_ms)         AS close_ts_ms"""

#: The stored 1-minute bars of $1 (on exchange $2, NULL = any) starting in [$3, $4).
_IN_RANGE = """symbol = $1 AND ($2::text IS NULL OR exchange = $2)
  AND bucket_start >= $3 AND bucket_start < $4"""

_ROLLUP = """
SELECT time_bucket($5::interval, bucket_start) AS b,""" + CONSOLIDATE_SQL + """
FROM bars_1m
WHERE """ + _IN_RANGE + """
GROUP BY b
ORDER BY b
LIMIT $6
"""

#: Columns of a live 1-minute bar passed as JSON ($7, an array of live-bar objects: the
#: closed-bar schema plus ``closed``).
_LIVE_COLUMNS = """exchange text, bucket_start_ms bigint, open float8, high float8,
       low float8, close float8, volume numeric, quote_volume numeric, trade_count integer,
       avg_price float8, vwap numeric, open_ts_ms bigint, close_ts_ms bigint,
       closed boolean"""
_LIVE_START = "(timestamptz 'epoch' + l.bucket_start_ms * interval '1 millisecond')"

#: :data:`_ROLLUP` over the stored bars plus the live bars ($7) whose minute is not stored
#: (a stored row wins; with $8 true a live bar wins over the stored row), with ``closed``
#: (no minute of the bucket still open) and ``live_minutes`` (live bars merged) per bucket.
_ROLLUP_LIVE = """
SELECT time_bucket($5::interval, bucket_start) AS b,""" + CONSOLIDATE_SQL + """,
       bool_and(closed)         AS closed,
       count(*) FILTER (WHERE live) AS live_minutes
FROM (
    SELECT exchange, bucket_start, open, high, low, close, volume, quote_volume,
           trade_count, avg_price, vwap, open_ts_ms, close_ts_ms, true AS closed,
           false AS live
    FROM bars_1m
    WHERE """ + _IN_RANGE + """
      AND NOT ($8::boolean AND EXISTS (
          SELECT 1 FROM jsonb_to_recordset($7::jsonb) AS l(exchange text, bucket_start_ms bigint)
          WHERE l.exchange = bars_1m.exchange AND """ + _LIVE_START + """ = bars_1m.bucket_start))
    UNION ALL
    SELECT l.exchange, """ + _LIVE_START + """, l.open, l.high, l.low, l.close,
           l.volume, l.quote_volume, l.trade_count, l.avg_price, l.vwap, l.open_ts_ms,
           l.close_ts_ms, l.closed, true
    FROM jsonb_to_recordset($7::jsonb) AS l(""" + _LIVE_COLUMNS + """)
    WHERE ($2::text IS NULL OR l.exchange = $2)
      AND """ + _LIVE_START + """ >= $3 AND """ + _LIVE_START + """ < $4
      AND ($8::boolean OR NOT EXISTS (SELECT 1 FROM bars_1m AS s
                      WHERE s.exchange = l.exchange AND s.symbol = $1
                        AND s.bucket_start = """ + _LIVE_START + """))
) AS m
GROUP BY b
ORDER BY b
LIMIT $6
"""

#: SQL of each ``/ohlcv`` bar field (:data:`core.models.BAR_FIELDS`) that is not a rollup
#: value (:data:`core.models.BAR_VALUES`) or an alias of one (:data:`core.models.BAR_ALIASES`),
#: over a rollup record (``b`` = bucket start); the bars serialised by PostgreSQL are
#: sealed, hence closed.
_BAR_KEY_SQL = {
    "exchange": "$2::text",
    "symbol": "$1::text",
    "bucket_start_ms": "(extract(epoch FROM b) * 1000)::bigint",
    "time": """to_char(b AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')""",
    "closed": "true",
}


def _bar_field_sql(field: str) -> str:
    if field in BAR_VALUES:
        return field
    if field in BAR_ALIASES:
        return BAR_ALIASES[field]
    return _BAR_KEY_SQL[field]  # a new bar field needs its SQL here (KeyError at import)


#: ``json_build_object`` of one ``/ohlcv`` bar over a rollup record, generated from
#: :data:`core.models.BAR_FIELDS` (same fields, same order as :func:`core.models.ohlcv_bar`).
BAR_JSON_SQL = "json_build_object(" + ", ".join(
    f"'{field}', {_bar_field_sql(field)}" for field in BAR_FIELDS) + ")"

#: The rollup of :data:`_ROLLUP` as one JSON array of ``/ohlcv`` bars, built by PostgreSQL
#: (the worker only passes the text on). Every bucket is closed: callers use it for
#: buckets that ended before the live window only.
_ROLLUP_JSON = ("SELECT coalesce(json_agg(" + BAR_JSON_SQL + " ORDER BY b), '[]')::text\n"
                "FROM (" + _ROLLUP + ") AS r\n")

_STATS = """
SELECT max(high) AS high, min(low) AS low, sum(avg_price * trade_count) AS price_sum,
       sum(trade_count)::bigint AS n
FROM bars_1m
WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2)
  AND bucket_start >= $3 AND bucket_start < $4
"""

#: Distinct (exchange, symbol) pairs as a loose index scan over the primary key (one index
#: probe per pair and chunk instead of reading every bar), filtered by exchange
#: (case-insensitive equality, NULL = any; $1), a case-insensitive substring of
#: ``exchange:symbol`` ($2, '' = any), at most $3 rows ordered by symbol, exchange.
_PAIRS = """
WITH RECURSIVE pairs (exchange, symbol) AS (
    (SELECT exchange, symbol FROM bars_1m ORDER BY exchange, symbol LIMIT 1)
    UNION ALL
    SELECT nxt.exchange, nxt.symbol
    FROM pairs AS p
    CROSS JOIN LATERAL (
        SELECT b.exchange, b.symbol FROM bars_1m AS b
        WHERE (b.exchange, b.symbol) > (p.exchange, p.symbol)
        ORDER BY b.exchange, b.symbol
        LIMIT 1
    ) AS nxt
)
SELECT exchange, symbol FROM pairs
WHERE ($1::text IS NULL OR lower(exchange) = lower($1::text))
  AND strpos(lower(exchange || ':' || symbol), lower($2::text)) > 0
ORDER BY symbol, exchange
LIMIT $3
"""

#: Start of the newest 1-minute bar of $1 (on exchange $2, NULL = any) before $3.
_NEWEST_BEFORE = """
SELECT bucket_start FROM bars_1m
WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2) AND bucket_start < $3
ORDER BY bucket_start DESC
LIMIT 1
"""

#: Prices of the newest $3 1-minute bars of $1 (on exchange $2, NULL = any).
_RECENT_PRICES = """
SELECT open, high, low, close FROM bars_1m
WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2)
ORDER BY bucket_start DESC
LIMIT $3
"""

_KNOWN = """
SELECT EXISTS (SELECT 1 FROM bars_1m WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2))
"""


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _dec(x: str | int | float | None) -> Decimal | None:
    """A decimal field of a bar (:data:`core.models.DECIMAL_FIELDS`) as a bind value:
    the decimal string exactly; a float (a bar from before the exact sums) as the
    shortest decimal that reads back as it."""
    if x is None:
        return None
    return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)


def _row(bar: dict[str, Any]) -> tuple[Any, ...]:
    return (
        bar["exchange"], bar["symbol"], _ts(bar["bucket_start_ms"]), bar["open"], bar["high"],
        bar["low"], bar["close"], _dec(bar["volume"]), bar["trade_count"], bar["avg_price"],
        _dec(bar["vwap"]), bar["open_ts_ms"], bar["close_ts_ms"],
        _dec(bar.get("quote_volume")),
    )


async def upsert_bars(conn: asyncpg.Connection, bars: Iterable[dict[str, Any]]) -> int:
    """Insert or replace closed bars (idempotent on (exchange, symbol, bucket_start)).

    Args:
        conn: connection (the call runs in one transaction).
        bars: closed-bar dicts (:func:`tables.window.finalize_bar` schema; decimal fields
            as strings, floats accepted from older producers, ``quote_volume`` may be
            missing). When one batch holds the same bar twice, the last one wins.

    Returns:
        int: rows written.

    Raises:
        asyncpg.PostgresError / OSError: the write failed; nothing was committed.
    """
    rows: dict[tuple[str, str, int], tuple[Any, ...]] = {}
    for b in bars:
        rows[(b["exchange"], b["symbol"], b["bucket_start_ms"])] = _row(b)
    if not rows:
        return 0
    async with conn.transaction():
        await conn.executemany(_UPSERT, list(rows.values()))
    return len(rows)


async def oldest_bar_in(conn: asyncpg.Connection, symbol: str, exchange: str, start_ms: int,
                        end_ms: int) -> int | None:
    """Start (UTC epoch ms) of the oldest stored 1-minute bar of the pair in
    ``[start_ms, end_ms)``, None when there is none."""
    found = await conn.fetchval(
        "SELECT min(bucket_start) FROM bars_1m WHERE symbol = $1 AND exchange = $2 "
        "AND bucket_start >= $3 AND bucket_start < $4",
        symbol, exchange, _ts(start_ms), _ts(end_ms))
    return None if found is None else int(found.timestamp() * 1000)


async def upsert_fetched_bars(conn: asyncpg.Connection, bars: Iterable[dict[str, Any]],
                              source: str, overwrite_own: bool) -> int:
    """Upsert 1-minute bars fetched from a REST source, tagged ``source``.

    Args:
        conn: connection (one transaction).
        bars: closed-bar dicts (the :func:`upsert_bars` schema; ``trade_count`` 0 and
            ``quote_volume``/``vwap`` None when the source does not give them, ``open_ts_ms`` =
            ``bucket_start_ms``, ``close_ts_ms`` = ``bucket_start_ms + 59999``).
        source: e.g. ``cryptocompare``, ``coindesk``.
        overwrite_own: replace bars built from our own ticks too (default policy: no).

    Returns:
        int: bars submitted (rows kept because of the policy included).

    Raises:
        asyncpg.PostgresError / OSError: the write failed; nothing was committed.
    """
    rows: dict[tuple[str, str, int], tuple[Any, ...]] = {}
    for b in bars:
        rows[(b["exchange"], b["symbol"], b["bucket_start_ms"])] = (
            *_row(b), source, overwrite_own)
    if not rows:
        return 0
    async with conn.transaction():
        await conn.executemany(_UPSERT_FETCHED, list(rows.values()))
    return len(rows)


async def fetch_bars(
    conn: asyncpg.Connection, symbol: str, exchange: str | None, start_ms: int, end_ms: int,
    limit: int,
) -> Sequence[asyncpg.Record]:
    """1-minute bars of ``symbol`` (optionally one exchange) with start in
    ``[start_ms, end_ms)``, oldest first, at most ``limit`` rows."""
    return await conn.fetch(_SELECT, symbol, exchange, _ts(start_ms), _ts(end_ms), limit)


async def fetch_rollup(
    conn: asyncpg.Connection, symbol: str, exchange: str | None, start_ms: int, end_ms: int,
    interval_ms: int, limit: int,
) -> Sequence[asyncpg.Record]:
    """OHLCV of ``symbol`` rolled up from the 1-minute bars into ``interval_ms`` buckets.

    Buckets are ``time_bucket`` aligned (UTC midnight origin for sub-day intervals); a
    bucket holds its 1-minute bars starting in ``[start_ms, end_ms)`` (callers align
    ``start_ms`` down to the interval for whole buckets). The bars of a bucket (its minutes
    and, with ``exchange=None``, every exchange) make one bar by :data:`CONSOLIDATE_SQL`.

    Args:
        conn: connection.
        symbol: the symbol.
        exchange: one exchange, None for all (consolidated).
        start_ms: range start, UTC epoch ms (inclusive).
        end_ms: range end, UTC epoch ms (exclusive).
        interval_ms: bucket length, ms.
        limit: at most this many buckets (the oldest).

    Returns:
        Records ``b`` (bucket start, timestamptz), ``open``, ``high``, ``low``, ``close``
        (float), ``volume``, ``quote_volume``, ``vwap`` (exact decimal text,
        :data:`core.models.DECIMAL_FIELDS`), ``trade_count``, ``avg_price``,
        ``open_ts_ms``, ``close_ts_ms``, oldest first.
    """
    return await conn.fetch(_ROLLUP, symbol, exchange, _ts(start_ms), _ts(end_ms),
                            timedelta(milliseconds=interval_ms), limit)


async def fetch_rollup_live(
    conn: asyncpg.Connection, symbol: str, exchange: str | None, start_ms: int, end_ms: int,
    interval_ms: int, limit: int, live: Sequence[dict[str, Any]], *, live_wins: bool = False,
) -> Sequence[asyncpg.Record]:
    """:func:`fetch_rollup` over the stored 1-minute bars plus live ones: each live bar
    whose minute is not stored counts like a stored bar (one query, so a minute stored
    meanwhile is counted once, from the database).

    Args:
        conn, symbol, exchange, start_ms, end_ms, interval_ms, limit: as for
            :func:`fetch_rollup`.
        live: live 1-minute bars of ``symbol`` (the closed-bar schema,
            :data:`core.models.CLOSED_BAR_FIELDS`, plus ``closed``); those outside the
            range or on another exchange are ignored.
        live_wins: a live bar replaces the stored row of its minute (the stream, whose
            live bars may be corrections not written yet); by default the stored row wins.

    Returns:
        The records of :func:`fetch_rollup` plus ``closed`` (false when a live minute of
        the bucket is still open) and ``live_minutes`` (live bars counted in the bucket).
    """
    return await conn.fetch(_ROLLUP_LIVE, symbol, exchange, _ts(start_ms), _ts(end_ms),
                            timedelta(milliseconds=interval_ms), limit,
                            orjson.dumps(live).decode(), live_wins)


async def fetch_rollup_json(
    conn: asyncpg.Connection, symbol: str, exchange: str | None, start_ms: int, end_ms: int,
    interval_ms: int, limit: int,
) -> bytes:
    """:func:`fetch_rollup` serialised by PostgreSQL as a JSON array of ``/ohlcv`` bars
    (:data:`core.models.BAR_FIELDS` by :data:`BAR_JSON_SQL`; ``exchange`` as given,
    ``closed`` always true), oldest first; ``b"[]"`` when there are none. Only for buckets
    that are closed and stored completely.
    """
    text = await conn.fetchval(_ROLLUP_JSON, symbol, exchange, _ts(start_ms), _ts(end_ms),
                               timedelta(milliseconds=interval_ms), limit)
    return str(text).encode()


async def price_stats(conn: asyncpg.Connection, symbol: str, exchange: str | None,
                      start_ms: int, end_ms: int) -> list[float] | None:
    """``[low, high, price_sum, count]`` over the 1-minute bars starting in
    ``[start_ms, end_ms)`` (the per-second aggregate shape of :mod:`query.price_stats`),
    None when there are none."""
    r = await conn.fetchrow(_STATS, symbol, exchange, _ts(start_ms), _ts(end_ms))
    if r is None or not r["n"]:
        return None
    return [r["low"], r["high"], r["price_sum"], float(r["n"])]


async def pairs(conn: asyncpg.Connection, exchange: str | None, query: str, limit: int
                ) -> Sequence[asyncpg.Record]:
    """Distinct ``(exchange, symbol)`` pairs matching ``query`` (case-insensitive substring
    of ``exchange:symbol``; '' = any) on ``exchange`` (None = any), at most ``limit``."""
    return await conn.fetch(_PAIRS, exchange, query, limit)


async def newest_bar_before(conn: asyncpg.Connection, symbol: str, exchange: str | None,
                            before_ms: int) -> int | None:
    """Start (UTC epoch ms) of the newest 1-minute bar before ``before_ms``, or None."""
    found = await conn.fetchval(_NEWEST_BEFORE, symbol, exchange, _ts(before_ms))
    return None if found is None else int(found.timestamp() * 1000)


async def recent_prices(conn: asyncpg.Connection, symbol: str, exchange: str | None,
                        n: int) -> Sequence[asyncpg.Record]:
    """``open, high, low, close`` of the newest ``n`` 1-minute bars."""
    return await conn.fetch(_RECENT_PRICES, symbol, exchange, n)


async def symbol_known(conn: asyncpg.Connection, symbol: str, exchange: str | None) -> bool:
    """Whether any bar exists for ``symbol`` (and ``exchange`` when given)."""
    return bool(await conn.fetchval(_KNOWN, symbol, exchange))


# ---- newest stored close (fallback of /prices/latest while Redis is down; appended)

__all__ += ["latest_close"]

#: The newest stored 1-minute bar of $1 (on exchange $2, NULL = any): its close is the
#: price of the last trade of that minute (ties across exchanges: the later close_ts_ms).
_LATEST_CLOSE = """
SELECT exchange, close, close_ts_ms, (extract(epoch FROM bucket_start) * 1000)::bigint AS b
FROM bars_1m
WHERE symbol = $1 AND ($2::text IS NULL OR exchange = $2)
ORDER BY bucket_start DESC, close_ts_ms DESC NULLS LAST
LIMIT 1
"""


async def latest_close(conn: asyncpg.Connection, symbol: str, exchange: str | None
                       ) -> dict[str, Any] | None:
    """Close of the newest stored 1-minute bar of ``symbol`` (one exchange, or any).

    Returns:
        ``{"exchange": str, "price": float, "ts_ms": int, "bucket_start_ms": int}`` where
        ``ts_ms`` is the bar's last trade time (UTC epoch ms; the bucket's last millisecond
        when unknown), or None when no bar is stored.

    Raises:
        asyncpg.PostgresError / OSError: the query failed.
    """
    r = await conn.fetchrow(_LATEST_CLOSE, symbol, exchange)
    if r is None:
        return None
    start_ms = int(r["b"])
    ts_ms = r["close_ts_ms"]
    return {"exchange": r["exchange"], "price": float(r["close"]),
            "ts_ms": int(ts_ms) if ts_ms is not None else start_ms + 59_999,
            "bucket_start_ms": start_ms}


# ---- retention (agents/retention.py; appended)

__all__ += ["chunks_before", "drop_chunk"]

#: ``(range_start, range_end)`` of the ``bars_1m`` chunks whose whole range ends at or
#: before $1 (the chunks ``drop_chunks(older_than => $1)`` drops), oldest first.
_CHUNKS_BEFORE = """
SELECT (extract(epoch FROM c.range_start) * 1000)::bigint AS start_ms,
       (extract(epoch FROM c.range_end) * 1000)::bigint AS end_ms
FROM timescaledb_information.chunks AS c
JOIN show_chunks('bars_1m', older_than => $1::timestamptz) AS s(chunk)
  ON format('%I.%I', c.chunk_schema, c.chunk_name)::regclass = s.chunk
ORDER BY c.range_start
"""

#: Rows of the chunk [$1, $2) and its distinct symbols (a loose index scan over
#: ``bars_1m_symbol_bucket``: one probe per symbol).
_CHUNK_CONTENT = """
WITH RECURSIVE syms (symbol) AS (
    (SELECT symbol FROM bars_1m WHERE bucket_start >= $1 AND bucket_start < $2
     ORDER BY symbol LIMIT 1)
    UNION ALL
    SELECT (SELECT b.symbol FROM bars_1m AS b
            WHERE b.symbol > syms.symbol AND b.bucket_start >= $1 AND b.bucket_start < $2
            ORDER BY b.symbol LIMIT 1)
    FROM syms WHERE syms.symbol IS NOT NULL
)
SELECT (SELECT count(*) FROM bars_1m WHERE bucket_start >= $1 AND bucket_start < $2)
           AS n,
       coalesce((SELECT array_agg(symbol ORDER BY symbol) FROM syms
                 WHERE symbol IS NOT NULL), '{}') AS symbols
"""

_DROP_CHUNK = """
SELECT drop_chunks('bars_1m', older_than => $2::timestamptz, newer_than => $1::timestamptz)
"""


async def chunks_before(conn: asyncpg.Connection, cutoff_ms: int) -> list[tuple[int, int]]:
    """The ``bars_1m`` chunks that lie wholly before ``cutoff_ms``.

    Args:
        conn: connection.
        cutoff_ms: UTC epoch ms; a chunk qualifies when its range ends at or before it.

    Returns:
        ``(range_start_ms, range_end_ms)`` per chunk (UTC epoch ms, 1 day long with the
        migration's chunk interval), oldest first.

    Raises:
        asyncpg.PostgresError / OSError: the query failed (e.g. ``bars_1m`` is not a
            hypertable).
    """
    rows = await conn.fetch(_CHUNKS_BEFORE, _ts(cutoff_ms))
    return [(int(r["start_ms"]), int(r["end_ms"])) for r in rows]


async def drop_chunk(conn: asyncpg.Connection, start_ms: int, end_ms: int
                     ) -> tuple[int, int, list[str]]:
    """Drop the ``bars_1m`` chunk(s) lying within ``[start_ms, end_ms)``, in one
    transaction (``drop_chunks`` with both bounds: a chunk returned by
    :func:`chunks_before`, and nothing newer).

    Args:
        conn: connection.
        start_ms, end_ms: the chunk's range, UTC epoch ms.

    Returns:
        ``(chunks dropped, rows they held, their distinct symbols sorted)``; the rows and
        symbols are read in the same transaction just before the drop.

    Raises:
        asyncpg.PostgresError / OSError: the drop failed; nothing was dropped.
    """
    lo, hi = _ts(start_ms), _ts(end_ms)
    async with conn.transaction():
        content = await conn.fetchrow(_CHUNK_CONTENT, lo, hi)
        dropped = await conn.fetch(_DROP_CHUNK, lo, hi)
    assert content is not None
    return len(dropped), int(content["n"]), list(content["symbols"])
