"""A private ``bars_1m`` on the local TimescaleDB for the query tests.

:func:`temp_bars_1m` opens one connection and creates a *temporary* ``bars_1m`` (same
columns and keys as the migrated table, ``sql/migrations/001_bars_1m.sql``); PostgreSQL
searches the session's temporary schema first, so every query of :mod:`sql.bars_1m` on
that connection reads it and no other data. The database (``MF_TEST_PG_DSN``, default the
``scripts/services.sh`` one) must be running; its migrations are applied first when
missing (as a worker does at start), so a fresh database works.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal, localcontext
from typing import Any

import asyncpg

from sql.bars_1m import upsert_fetched_bars
from sql.migrate import apply_migrations

DSN = os.environ.get("MF_TEST_PG_DSN",
                     "postgresql://marketflow:marketflow@127.0.0.1:15432/marketflow")


@contextlib.asynccontextmanager
async def temp_bars_1m() -> AsyncIterator[asyncpg.Connection]:
    """A connection whose ``bars_1m`` is an empty temporary table.

    Raises:
        OSError, asyncpg.PostgresError: TimescaleDB is not running (start it with
            ``scripts/services.sh up``).
    """
    conn = await asyncpg.connect(DSN, timeout=10)
    try:
        await apply_migrations(conn)
        await conn.execute("CREATE TEMP TABLE bars_1m (LIKE public.bars_1m INCLUDING ALL)")
        yield conn
    finally:
        await conn.close()


def minute_bar(exchange: str, symbol: str, bucket_start_ms: int, **values: Any
               ) -> dict[str, Any]:
    """A 1-minute bar in the closed-bar schema; unspecified values are a flat 100.0 bar
    with one trade of quantity 1. ``volume``, ``quote_volume`` and ``vwap`` may be given
    as numbers (taken as their shortest decimal) or decimal strings; without a
    ``quote_volume`` it is ``vwap * volume`` (None when ``vwap`` is None), so the bar's
    VWAP is its quote volume / volume, as for a bar built from trades."""
    bar: dict[str, Any] = {
        "exchange": exchange, "symbol": symbol, "bucket_start_ms": bucket_start_ms,
        "bucket_end_ms": bucket_start_ms + 60_000, "open": 100.0, "high": 100.0,
        "low": 100.0, "close": 100.0, "volume": "1", "quote_volume": None,
        "trade_count": 1, "avg_price": 100.0, "min_price": 100.0, "max_price": 100.0,
        "vwap": "100", "open_ts_ms": bucket_start_ms, "close_ts_ms": bucket_start_ms + 59_999}
    bar.update(values)
    for f in ("volume", "quote_volume", "vwap"):
        if isinstance(bar[f], int | float):
            bar[f] = dec_text(Decimal(repr(bar[f])))
    if "quote_volume" not in values:
        bar["quote_volume"] = (None if bar["vwap"] is None
                               else dec_text(Decimal(bar["vwap"]) * Decimal(bar["volume"])))
    bar["min_price"], bar["max_price"] = bar["low"], bar["high"]
    return bar


def dec_text(d: Decimal) -> str:
    """``d`` as served (plain, no trailing zeros: PostgreSQL's ``trim_scale(d)::text``)."""
    with localcontext() as ctx:
        ctx.prec = 100  # normalize rounds to the context precision
        return format(d.normalize(), "f") if d else "0"


async def store(conn: asyncpg.Connection, bars: Iterable[dict[str, Any]]) -> None:
    """Write ``bars`` to the connection's ``bars_1m``."""
    await upsert_fetched_bars(conn, bars, "test", overwrite_own=True)
