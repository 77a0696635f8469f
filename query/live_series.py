"""Bars of the stream (:mod:`views.stream_hub`): the buckets of a series computed from the
stored 1-minute bars plus the live 1-minute bars a worker holds in memory, by the one
rollup and consolidation rule (:data:`sql.bars_1m.CONSOLIDATE_SQL`, through
:func:`sql.bars_1m.fetch_rollup_live`).

Unlike ``/ohlcv`` (:mod:`query.series`), nothing here depends on the wall clock: a replay
of 2024 has open bars today, so whether a bucket is over is decided by the caller from
event time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from core.errors import StorageUnavailable
from core.models import ohlcv_bar
from query.series import MAX_BARS, Bar, rows_to_bars
from sql.bars_1m import fetch_rollup_live
from sql.pool import Database

__all__ = ["bucket_bars", "minute_bar"]

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
#: a "now" after every bucket: ``closed`` then only says no minute is still open
_NEVER_MS = 2**62


def minute_bar(live: dict[str, Any]) -> Bar:
    """The ``/ohlcv`` bar of one exchange's live 1-minute bar (``closed`` as the live bar
    says; ``correction`` kept when set)."""
    bar = ohlcv_bar(live["exchange"], live["symbol"], live["bucket_start_ms"], live,
                    bool(live["closed"]))
    if live.get("correction"):
        bar["correction"] = True
    return bar


async def bucket_bars(database: Database, symbol: str, exchange: str | None, lo_ms: int,
                      hi_ms: int, interval_ms: int, live: Sequence[dict[str, Any]]
                      ) -> list[Bar]:
    """The buckets starting in ``[lo_ms, hi_ms)`` that have a bar, oldest first.

    Args:
        database: the TimescaleDB pool service.
        symbol: the symbol.
        exchange: one exchange, None for the consolidated series.
        lo_ms: first bucket start, aligned to ``interval_ms``, UTC epoch ms.
        hi_ms: range end (exclusive), UTC epoch ms.
        interval_ms: bucket length, ms.
        live: live 1-minute bars of ``symbol`` (closed-bar schema plus ``closed``); a live
            bar replaces the stored row of its minute (it may be a correction not written
            yet).

    Returns:
        list: ``/ohlcv`` bars (:func:`core.models.ohlcv_bar`); ``closed`` is true when
        none of the bucket's live minutes is open (the caller adds whether the bucket is
        over).

    Raises:
        StorageUnavailable: the database failed.
    """
    try:
        async with database.request() as conn:
            rows = await fetch_rollup_live(conn, symbol, exchange, lo_ms, hi_ms, interval_ms,
                                           MAX_BARS, live, live_wins=True)
    except _DB_ERRORS as exc:
        raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    return rows_to_bars(rows, symbol, exchange, interval_ms, _NEVER_MS)
