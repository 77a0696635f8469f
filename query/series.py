"""OHLCV series for ``/ohlcv`` and ``/udf/history``: sealed ranges, the live minutes, fill
and rollups.

A series is the buckets of one interval (:data:`INTERVALS_MS`) of a symbol, on one exchange
or consolidated across exchanges, starting in a range. It is built in two parts, split at
the **seal boundary** (:func:`core.timeutil.sealed_end_ms`):

* **sealed** buckets end before the live window (:func:`core.timeutil.live_window_ms`):
  every minute of them is in TimescaleDB, so they are rolled up there
  (:func:`sql.bars_1m.fetch_rollup`, serialised by PostgreSQL with ``fill=none``) and the
  JSON is cached in Redis (:class:`stores.ohlcv_cache.OhlcvCache`);
* **recent** buckets (:meth:`SeriesBuilder.recent_buckets`) are computed on every request
  from the stored bars plus the live 1-minute bars in Redis for the minutes not stored yet
  (:meth:`stores.live_bars.LiveBarStore.live_bars`), the still-open bucket included and
  marked ``"closed": false``; there is no gap and no overlap at the boundary.

The bars of a bucket make one bar by the consolidation rule
(:data:`sql.bars_1m.CONSOLIDATE_SQL`, its only copy: live minutes are rolled up by the same
SQL as stored ones), and every bar has the shape of :func:`core.models.ohlcv_bar`.
``fill=previous`` adds flat bars for buckets without trades (:func:`fill_previous`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from core.errors import StorageUnavailable
from core.metrics import REDIS_FALLBACKS
from core.models import ohlcv_bar
from core.timeutil import MINUTE_MS, floor_minute, live_window_ms, sealed_end_ms
from feeds.history.on_demand import OnDemandHistory
from sql.bars_1m import (
    fetch_rollup,
    fetch_rollup_json,
    fetch_rollup_live,
    newest_bar_before,
    oldest_bar_in,
    pairs,
    symbol_known,
)
from sql.pool import Database
from stores.keys import ohlcv_entry_key
from stores.live_bars import LiveBarStore
from stores.ohlcv_cache import OhlcvCache

__all__ = ["COUNTBACK_STEPS", "FILLS", "INTERVALS_MS", "MAX_BARS", "PAIRS_LIMIT", "Bar",
           "HistoryBars", "LocalLive", "OhlcvSeries", "SeriesBuilder", "bucket_range_ms",
           "canonical_pair", "fill_previous", "rows_to_bars", "splice_json_arrays"]

#: ``/ohlcv`` interval name -> bucket length (ms); buckets are aligned to UTC midnight
INTERVALS_MS: dict[str, int] = {"1m": MINUTE_MS, "5m": 5 * MINUTE_MS, "15m": 15 * MINUTE_MS,
                                "30m": 30 * MINUTE_MS, "1h": 60 * MINUTE_MS,
                                "4h": 240 * MINUTE_MS, "1d": 1440 * MINUTE_MS}
#: most buckets one series request may span
MAX_BARS = 5_000
#: ``fill`` modes: ``none`` omits buckets without trades, ``previous`` fills them flat
FILLS = ("none", "previous")
#: how many times a ``countback`` series jumps back over a gap in the data
COUNTBACK_STEPS = 16
#: most stored (exchange, symbol) pairs one name lookup reads (:func:`canonical_pair`)
PAIRS_LIMIT = 100

#: one ``/ohlcv`` bar (:func:`core.models.ohlcv_bar`)
Bar = dict[str, Any]

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

log = logging.getLogger(__name__)

#: ``(symbol, exchange | None, start_ms, end_ms) -> live 1-minute bars`` (closed-bar
#: schema plus ``closed``) from the worker's own window state
LocalLive = Callable[[str, str | None, int, int], list[dict[str, Any]]]
_FINAL = ("done", "empty", "error")


# ---- pure helpers -----------------------------------------------------------------------


def rows_to_bars(rows: Iterable[asyncpg.Record], symbol: str, exchange: str | None,
                 interval_ms: int, now_ms: int) -> list[Bar]:
    """``/ohlcv`` bars from rollup records (:func:`sql.bars_1m.fetch_rollup` or
    :func:`sql.bars_1m.fetch_rollup_live`), oldest first.

    Args:
        rows: the records.
        symbol: the symbol.
        exchange: the requested exchange, None for the consolidated series.
        interval_ms: bucket length, ms.
        now_ms: wall clock, UTC epoch ms.

    Returns:
        list: the bars; ``closed`` when the bucket ended at or before ``now_ms`` and (for
        records with a ``closed`` column) none of its live minutes is still open.
    """
    out = []
    for r in rows:
        ms = int(r["b"].timestamp() * 1000)
        closed = ms + interval_ms <= now_ms and r.get("closed", True)
        out.append(ohlcv_bar(exchange, symbol, ms, r, bool(closed)))
    return out


def fill_previous(bars: list[Bar], interval_ms: int, end_ms: int) -> list[Bar]:
    """Insert flat bars (previous close, volume 0, trade_count 0) for the empty buckets
    between the first bar and ``end_ms``.

    Args:
        bars: bars oldest first (not changed).
        interval_ms: bucket length, ms.
        end_ms: no flat bar starts at or after this, UTC epoch ms.

    Returns:
        list: the bars with the flat ones; ``[]`` for no bars.
    """
    if not bars:
        return bars
    out: list[Bar] = []
    for bar in bars:
        while out and out[-1]["bucket_start_ms"] + interval_ms < bar["bucket_start_ms"]:
            out.append(_flat(out[-1], out[-1]["bucket_start_ms"] + interval_ms))
        out.append(bar)
    while out[-1]["bucket_start_ms"] + interval_ms < end_ms:
        out.append(_flat(out[-1], out[-1]["bucket_start_ms"] + interval_ms))
    return out


def _flat(prev: Bar, start_ms: int) -> Bar:
    c = prev["close"]
    return ohlcv_bar(prev["exchange"], prev["symbol"], start_ms,
                     {"open": c, "high": c, "low": c, "close": c, "volume": "0",
                      "quote_volume": "0", "trade_count": 0, "avg_price": None,
                      "vwap": None},
                     prev["closed"])


def splice_json_arrays(a: bytes, b: bytes) -> bytes:
    """Concatenate two serialised JSON arrays (``b"[1,2]"``, ``b"[3]"`` -> ``b"[1,2,3]"``)."""
    if a == b"[]":
        return b
    if b == b"[]":
        return a
    return a[:-1] + b"," + b[1:]


def bucket_range_ms(from_s: int, to_s: int, interval_ms: int) -> tuple[int, int]:
    """The ``[start_ms, end_ms)`` range of 1-minute bars making up the whole buckets whose
    start lies in ``[from_s, to_s]``.

    Args:
        from_s: first bucket start, Unix seconds (included).
        to_s: last bucket start, Unix seconds (included).
        interval_ms: bucket length in milliseconds (divides a day: buckets are aligned to
            UTC midnight, as ``time_bucket`` aligns them).

    Returns:
        ``(start_ms, end_ms)``: ``from`` aligned up and ``to`` aligned down to the
        interval, plus one interval; ``start_ms == end_ms`` when no bucket starts in range.
    """
    start_ms = -(-from_s * 1000 // interval_ms) * interval_ms
    end_ms = to_s * 1000 - (to_s * 1000) % interval_ms + interval_ms
    return start_ms, max(start_ms, end_ms)


async def canonical_pair(conn: asyncpg.Connection, exchange: str | None, symbol: str
                         ) -> tuple[str | None, str] | None:
    """The stored spelling of ``exchange``/``symbol`` matched case-insensitively.

    Args:
        conn: connection.
        exchange: exchange as requested, None for any.
        symbol: symbol as requested.

    Returns:
        ``(exchange or None, symbol)`` as stored, None when no bar exists under any
        spelling.

    Raises:
        asyncpg.PostgresError, OSError: the database failed.
    """
    for r in await pairs(conn, exchange, symbol, PAIRS_LIMIT):
        if r["symbol"].lower() == symbol.lower():
            return (r["exchange"] if exchange else None), r["symbol"]
    return None


# ---- series -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OhlcvSeries:
    """A built ``/ohlcv`` series.

    Attributes:
        bars_json: the bars as one JSON array, oldest first.
        known: whether the symbol (on that exchange) has any bar at all.
        history: the on-demand history request's state (``request_id``, ``state``,
            ``bars``, ``error``, ...) when part of the range was missing and a fetch was
            asked for, else None.
    """

    bars_json: bytes
    known: bool
    history: dict[str, Any] | None


@dataclass(frozen=True)
class HistoryBars:
    """A built ``/udf/history`` series.

    Attributes:
        bars: the bars, oldest first.
        newest_before_ms: when ``bars`` is empty, the start (UTC epoch ms) of the newest
            1-minute bar before the range, else None.
        known: whether the symbol (on that exchange) has any bar at all.
    """

    bars: list[Bar]
    newest_before_ms: int | None
    known: bool


class SeriesBuilder:
    """Builds series from TimescaleDB, the live bars and the sealed-range cache.

    Args:
        database: the TimescaleDB pool service.
        live_bars: the Redis store of the live 1-minute bars.
        ohlcv_cache: the sealed-range cache.
        grace_ms: ``window.grace_ms`` (where the live window starts).
        max_future_ms: ``window.max_future_ms`` (the newest minute a tick may be
            stamped with).
        on_demand: on-demand history requests, None when off (``history.on_demand`` false
            or ``history.source`` none).
        on_demand_wait_s: how long a request waits for an on-demand fetch
            (``history.on_demand_wait_s``).
        local_live: ``(symbol, exchange | None, start_ms, end_ms) -> live bars`` from this
            worker's window state (:func:`tables.bars.open_bars`), used while Redis is
            down; None: no live minutes then.

    Attributes:
        degraded: set when a series was built without Redis's live bars (only the open
            minutes of this worker's own partitions, or none); the views say so.
    """

    def __init__(self, database: Database, live_bars: LiveBarStore,
                 ohlcv_cache: OhlcvCache, *, grace_ms: int, max_future_ms: int,
                 on_demand: OnDemandHistory | None = None,
                 on_demand_wait_s: float = 0.0,
                 local_live: LocalLive | None = None) -> None:
        self.database = database
        self.live_bars = live_bars
        self.ohlcv_cache = ohlcv_cache
        self.grace_ms = grace_ms
        self.max_future_ms = max_future_ms
        self.on_demand = on_demand
        self.on_demand_wait_s = on_demand_wait_s
        self.local_live = local_live
        self.degraded = False

    async def ohlcv(self, symbol: str, exchange: str | None, start_ms: int, end_ms: int,
                    interval: str, fill: str, now_ms: int) -> OhlcvSeries:
        """The ``/ohlcv`` series: buckets starting in ``[start_ms, end_ms)``.

        The sealed part comes from the cache or the database (then cached), the rest from
        :meth:`recent_buckets`. With on-demand history on and one exchange asked for, a
        missing start of the sealed part is asked for first (:meth:`ask_history`).

        Args:
            symbol: the symbol.
            exchange: one exchange, None for the consolidated series.
            start_ms: range start aligned down to the interval, UTC epoch ms.
            end_ms: range end (exclusive), UTC epoch ms.
            interval: an :data:`INTERVALS_MS` name.
            fill: a :data:`FILLS` mode.
            now_ms: wall clock, UTC epoch ms.

        Returns:
            OhlcvSeries: the bars, whether the symbol is known, the history request.

        Raises:
            StorageUnavailable: the database failed (a Redis failure only sets
                :attr:`degraded`).
        """
        iv = INTERVALS_MS[interval]
        seal_ms = min(end_ms, sealed_end_ms(now_ms, self.grace_ms, iv))
        history: dict[str, Any] | None = None
        if self.on_demand is not None and exchange is not None and seal_ms > start_ms:
            try:
                history = await self.ask_history(self.on_demand, symbol, exchange, start_ms,
                                                 seal_ms, iv)
            except RedisError as exc:  # no on-demand fetch without Redis: stored bars only
                REDIS_FALLBACKS.labels("series").inc()
                log.debug("series: on-demand history unavailable (%s)", type(exc).__name__)
                self.degraded = True
            except _DB_ERRORS as exc:
                raise StorageUnavailable(f"database unavailable: {type(exc).__name__}"
                                         ) from exc
        last: Bar | None = None
        sealed = b"[]"
        rest: list[Bar] = []
        live_seen = False
        try:
            if seal_ms > start_ms:
                last, sealed = await self.sealed(symbol, exchange, interval, fill, start_ms,
                                                 seal_ms, now_ms)
            lo_ms = max(seal_ms, start_ms)
            async with self.database.request() as conn:
                if end_ms > lo_ms:
                    rest, live_seen = await self.recent_buckets(conn, symbol, exchange, lo_ms,
                                                                end_ms, iv, now_ms)
                known = (sealed != b"[]" or bool(rest) or live_seen
                         or await symbol_known(conn, symbol, exchange))
        except _DB_ERRORS as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        if fill == "previous":
            fill_end = min(end_ms, now_ms - now_ms % iv + iv)
            rest = (fill_previous([last, *rest], iv, fill_end)[1:] if last is not None
                    else fill_previous(rest, iv, fill_end))
        return OhlcvSeries(splice_json_arrays(sealed, orjson.dumps(rest)), known, history)

    async def sealed(self, symbol: str, exchange: str | None, interval: str, fill: str,
                     start_ms: int, seal_ms: int, now_ms: int) -> tuple[Bar | None, bytes]:
        """The sealed buckets ``[start_ms, seal_ms)``, from the cache or computed (and
        then cached under the generation read before the database).

        Args:
            symbol: the symbol.
            exchange: one exchange, None for the consolidated series.
            interval: an :data:`INTERVALS_MS` name.
            fill: a :data:`FILLS` mode.
            start_ms: range start aligned to the interval, UTC epoch ms.
            seal_ms: the seal boundary (:func:`core.timeutil.sealed_end_ms`), UTC epoch ms.
            now_ms: wall clock, UTC epoch ms.

        Returns:
            ``(last bar or None, JSON array)``; the last bar only with ``fill=previous``
            (the flat bars after it continue from it).

        Raises:
            StorageUnavailable: the database failed.
        """
        cache = self.ohlcv_cache
        gen = await cache.generation(symbol)
        key = ""
        if gen is not None:
            key = ohlcv_entry_key(cache.prefix, symbol, gen, exchange, interval, fill,
                                  start_ms, seal_ms)
            hit = await cache.get(key)
            if hit is not None:
                return hit
        iv = INTERVALS_MS[interval]
        last: Bar | None = None
        try:
            async with self.database.request() as conn:
                if fill == "none":  # serialised by PostgreSQL, passed through as is
                    blob = await fetch_rollup_json(conn, symbol, exchange, start_ms, seal_ms,
                                                   iv, MAX_BARS)
                else:
                    rows = await fetch_rollup(conn, symbol, exchange, start_ms, seal_ms, iv,
                                              MAX_BARS)
        except _DB_ERRORS as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        if fill != "none":
            bars = fill_previous(rows_to_bars(rows, symbol, exchange, iv, now_ms), iv,
                                 seal_ms)
            last = bars[-1] if bars else None
            blob = orjson.dumps(bars)
        if gen is not None:
            await cache.put(key, last, blob)
        return last, blob

    async def recent_buckets(self, conn: asyncpg.Connection, symbol: str,
                             exchange: str | None, lo_ms: int, end_ms: int, interval_ms: int,
                             now_ms: int) -> tuple[list[Bar], bool]:
        """Buckets starting in ``[lo_ms, end_ms)`` from TimescaleDB, with the live
        1-minute bars in Redis counted for the minutes of the live window not stored yet.

        Args:
            conn: connection.
            symbol: the symbol.
            exchange: one exchange, None for the consolidated series.
            lo_ms: range start aligned to the interval, UTC epoch ms.
            end_ms: range end (exclusive), UTC epoch ms.
            interval_ms: bucket length, ms.
            now_ms: wall clock, UTC epoch ms.

        Returns:
            ``(bars, live_seen)``: bars oldest first; ``live_seen`` when a live bar was
            counted. With Redis unreachable, the live bars are the ones of ``local_live``
            (or none) and :attr:`degraded` is set.

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        minute = floor_minute(now_ms)
        live_from = minute - live_window_ms(self.grace_ms)
        live: list[dict[str, Any]] = []
        if end_ms > live_from:
            live_lo = max(lo_ms, live_from)
            # no live bar starts after the newest minute a tick may be stamped with
            live_hi = min(end_ms, minute + MINUTE_MS + self.max_future_ms)
            if live_hi > live_lo:
                try:
                    live = await self.live_bars.live_bars(symbol, exchange, live_lo,
                                                              live_hi)
                except (RedisError, OSError) as exc:
                    # stored bars, plus the open minutes this worker itself holds
                    REDIS_FALLBACKS.labels("series").inc()
                    log.debug("series: live bars unavailable (%s); window state used",
                              type(exc).__name__)
                    self.degraded = True
                    live = (self.local_live(symbol, exchange, live_lo, live_hi)
                            if self.local_live is not None else [])
        if not live:
            rows = await fetch_rollup(conn, symbol, exchange, lo_ms, end_ms, interval_ms,
                                      MAX_BARS)
            return rows_to_bars(rows, symbol, exchange, interval_ms, now_ms), False
        rows = await fetch_rollup_live(conn, symbol, exchange, lo_ms, end_ms, interval_ms,
                                       MAX_BARS, live)
        live_seen = any(r["live_minutes"] for r in rows)
        return rows_to_bars(rows, symbol, exchange, interval_ms, now_ms), live_seen

    async def ask_history(self, on_demand: OnDemandHistory, symbol: str, exchange: str,
                          start_ms: int, seal_ms: int, interval_ms: int
                          ) -> dict[str, Any] | None:
        """When the stored bars do not reach back to ``start_ms`` (none in
        ``[start_ms, seal_ms)``, or the oldest one at least an interval after
        ``start_ms``), ask for the missing part (:meth:`OnDemandHistory.ask`) and wait up
        to ``on_demand_wait_s`` for it.

        Args:
            on_demand: the request service.
            symbol: the symbol.
            exchange: the exchange.
            start_ms: range start, UTC epoch ms.
            seal_ms: the seal boundary, UTC epoch ms.
            interval_ms: bucket length, ms.

        Returns:
            The request's state, None when nothing is missing.

        Raises:
            redis.exceptions.RedisError, asyncpg.PostgresError, OSError: storage failed.
        """
        async with self.database.request() as conn:
            oldest = await oldest_bar_in(conn, symbol, exchange, start_ms, seal_ms)
        if oldest is not None and oldest - start_ms < interval_ms:
            return None
        req_id, state = await on_demand.ask(exchange, symbol, start_ms, oldest or seal_ms)
        if state["state"] in _FINAL:
            return state
        return await on_demand.wait_for_request(req_id, self.on_demand_wait_s) or state

    async def history(self, conn: asyncpg.Connection, symbol: str, exchange: str | None,
                      interval_ms: int, from_s: int, to_s: int, countback: int | None,
                      now_ms: int) -> HistoryBars:
        """The ``/udf/history`` series: the buckets starting in ``[from_s, to_s]``, or with
        ``countback`` the newest ``countback`` buckets starting at or before ``to_s``
        (searched back past gaps, up to :data:`COUNTBACK_STEPS` jumps). Buckets in or
        after the live window come from :meth:`recent_buckets`, like ``/ohlcv``.

        Args:
            conn: connection.
            symbol: the symbol as stored.
            exchange: the exchange as stored, None for the consolidated series.
            interval_ms: bucket length, ms.
            from_s: first bucket start, Unix seconds (ignored with ``countback``).
            to_s: last bucket start, Unix seconds (included).
            countback: number of buckets wanted, or None.
            now_ms: wall clock, UTC epoch ms.

        Returns:
            HistoryBars: the bars, or where older data starts, or whether any exists
            (:attr:`degraded` set when Redis's live bars were unavailable).

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        iv = interval_ms
        if countback is not None:
            rows = await self._countback_rows(conn, symbol, exchange, iv, to_s, countback)
            start_ms = end_ms = bucket_range_ms(to_s, to_s, iv)[1]
            lo = 0
        else:
            start_ms, end_ms = bucket_range_ms(from_s, to_s, iv)
            rows = (list(await fetch_rollup(conn, symbol, exchange, start_ms, end_ms, iv,
                                            MAX_BARS))
                    if end_ms > start_ms else [])
            lo = start_ms
        bars = rows_to_bars(rows, symbol, exchange, iv, now_ms)
        lo = max(lo, sealed_end_ms(now_ms, self.grace_ms, iv))
        if end_ms > lo:
            recent, _ = await self.recent_buckets(conn, symbol, exchange, lo, end_ms, iv,
                                                  now_ms)
            bars = [b for b in bars if b["bucket_start_ms"] < lo] + recent
            if countback is not None:
                bars = bars[-countback:]
        if bars:
            return HistoryBars(bars, None, True)
        prev = await newest_bar_before(conn, symbol, exchange, start_ms)
        if prev is not None:
            return HistoryBars([], prev, True)
        return HistoryBars([], None, await symbol_known(conn, symbol, exchange))

    @staticmethod
    async def _countback_rows(conn: asyncpg.Connection, symbol: str, exchange: str | None,
                              interval_ms: int, to_s: int, countback: int
                              ) -> Sequence[asyncpg.Record]:
        """The newest ``countback`` buckets starting at or before ``to_s``: query the
        ``n`` buckets before the end, and while some are missing jump to the newest older
        bar (skipping the gap) for the remaining ones."""
        iv = interval_ms
        _, hi = bucket_range_ms(to_s, to_s, iv)
        lo = max(0, hi - countback * iv)
        rows: list[asyncpg.Record] = []
        for _ in range(COUNTBACK_STEPS):
            got = await fetch_rollup(conn, symbol, exchange, lo, hi, iv, countback - len(rows))
            rows = list(got) + rows
            if len(rows) >= countback or lo <= 0:
                break
            prev = await newest_bar_before(conn, symbol, exchange, lo)
            if prev is None:
                break
            hi = prev - prev % iv + iv
            lo = max(0, hi - (countback - len(rows)) * iv)
        return rows[-countback:]
