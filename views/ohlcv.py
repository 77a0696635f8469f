"""``GET /ohlcv?symbol=&exchange=&start=&end=&interval=&fill=``: OHLCV history.

* ``interval``: ``1m`` (default), ``5m``, ``15m``, ``30m``, ``1h``, ``4h``, ``1d``. Larger
  intervals are rolled up from the stored 1-minute bars (TimescaleDB ``time_bucket`` with
  ``first``/``last``), buckets aligned to UTC midnight.
* ``exchange``: optional; absent = one consolidated bar per bucket across exchanges (open
  of the earliest trade, close of the latest, high max, low min, volume and count summed).
* ``start``/``end``: epoch milliseconds or ISO-8601 (naive = UTC). Buckets whose start lies
  in ``[start aligned down to the interval, end)`` are returned, each with all its data.
  Defaults: ``end`` = now, ``start`` = ``end`` - 100 intervals. More than
  :data:`MAX_BARS` buckets in the range -> 400.
* ``fill``: ``none`` (default) omits buckets without trades; ``previous`` fills gaps after
  the first returned bar with a flat bar at the previous close, volume 0 and
  ``trade_count`` 0 (as Kraken reports empty minutes).

Response 200::

    {"symbol": "BTCUSDT", "exchange": "binance-usdm", "interval": "1m", "fill": "none",
     "start": 1723161300000, "end": 1723161600000,
     "bars": [{"exchange": "binance-usdm", "symbol": "BTCUSDT",
               "bucket_start_ms": 1723161300000, "time": "2024-08-08T23:55:00.000Z",
               "open": 61807.7, "high": 61839.9, "low": 61760.3, "close": 61760.3,
               "volume": 136.45, "trade_count": 2005, "avg_price": 61801.3,
               "vwap": 61802.1, "min_price": 61760.3, "max_price": 61839.9,
               "closed": true}, ...]}

The still-open bucket is included from live state (the bar agent mirrors its open and
just-closed 1-minute bars into Redis) and marked ``"closed": false``; minutes not yet in
TimescaleDB (within the live window, :func:`stores.ohlcv_cache.live_window_ms`: 5 minutes at
the default grace) come from there, the rest from the database, so there is no gap and no
overlap at the boundary.

Buckets that end before the live window are *sealed*; their JSON is cached in Redis
(read-through, ``web.ohlcv_cache_ttl_s``, invalidated when an old bar is rewritten, see
:mod:`stores.ohlcv_cache`), and the newer buckets are computed on every request.

404 when the symbol (on that exchange) has no bars at all; 503 when the database or Redis
is down.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from faust.web import Request, Response
from redis.exceptions import RedisError

from app import settings
from app.faust_app import app
from app.services import database, latest_prices, ohlcv_cache
from core.errors import QueryError
from core.timeutil import live_window_ms, sealed_end_ms
from sql.bars_1m import (
    fetch_rollup,
    fetch_rollup_json,
    oldest_bar_in,
    stored_minutes,
    symbol_known,
)
from stores.ohlcv_cache import entry_key
from views.base import ApiView
from views.params import iso_ms, parse_name, parse_time_ms

__all__ = ["INTERVALS_MS", "MAX_BARS", "Ohlcv", "SeriesError", "fill_previous", "merge_live",
           "parse_ohlcv_query", "recent_buckets", "rows_to_bars", "splice_json_arrays"]

INTERVALS_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}
MAX_BARS = 5_000
_DEFAULT_BARS = 100
_ALLOWED = {"symbol", "exchange", "start", "end", "interval", "fill"}


def parse_ohlcv_query(q: dict[str, str], now_ms: int
                      ) -> tuple[str, str | None, int, int, str, str]:
    """Validate ``/ohlcv`` parameters.

    Returns:
        ``(symbol, exchange, start_ms, end_ms, interval, fill)`` with ``start_ms`` aligned
        down to the interval.

    Raises:
        QueryError: unknown parameter, bad name/time/interval/fill, ``start >= end`` or
            more than :data:`MAX_BARS` buckets.
    """
    unknown = set(q) - _ALLOWED
    if unknown:
        raise QueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}",
                         sorted(unknown)[0])
    symbol = parse_name(q.get("symbol"), "symbol")
    assert symbol is not None
    exchange = parse_name(q.get("exchange"), "exchange", required=False)
    interval = q.get("interval") or "1m"
    if interval not in INTERVALS_MS:
        raise QueryError(f"interval {interval[:10]!r}: use one of {', '.join(INTERVALS_MS)}",
                         "interval")
    fill = q.get("fill") or "none"
    if fill not in ("none", "previous"):
        raise QueryError("fill: use none or previous", "fill")
    iv = INTERVALS_MS[interval]
    end_ms = parse_time_ms(q["end"], "end") if q.get("end") else now_ms
    start_ms = (parse_time_ms(q["start"], "start") if q.get("start")
                else end_ms - _DEFAULT_BARS * iv)
    start_ms -= start_ms % iv
    if start_ms >= end_ms:
        raise QueryError("start must be before end", "start")
    if -(-(end_ms - start_ms) // iv) > MAX_BARS:
        raise QueryError(f"range too large: more than {MAX_BARS} {interval} bars; "
                         "narrow start/end or use a larger interval", "start")
    return symbol, exchange, start_ms, end_ms, interval, fill


def merge_live(bars: list[dict[str, Any]], live: list[dict[str, Any]], interval_ms: int,
               now_ms: int) -> list[dict[str, Any]]:
    """Fold live 1-minute bars (not yet in the database) into stored interval buckets.

    Consolidation rules as in the SQL rollup: open of the earliest trade (``open_ts_ms``),
    close of the latest (``close_ts_ms``), high max, low min, volume and trade count summed,
    average price count-weighted, VWAP volume-weighted. A bucket is ``closed`` when its end
    has passed and none of its minutes is still open. Pure; returns bars oldest first.

    Args:
        bars: stored buckets (response shape plus ``open_ts_ms``/``close_ts_ms``).
        live: live 1-minute bars (closed-bar schema plus ``closed``) whose minutes are not
            in the database.
        interval_ms: bucket length.
        now_ms: wall clock, UTC epoch ms.
    """
    by_start = {b["bucket_start_ms"]: dict(b) for b in bars}
    for m in live:
        start = m["bucket_start_ms"] - m["bucket_start_ms"] % interval_ms
        cur = by_start.get(start)
        if cur is None:
            by_start[start] = {
                "exchange": None, "symbol": m["symbol"], "bucket_start_ms": start,
                "time": iso_ms(start), "open": m["open"], "high": m["high"], "low": m["low"],
                "close": m["close"], "volume": m["volume"], "trade_count": m["trade_count"],
                "avg_price": m["avg_price"], "vwap": m["vwap"], "min_price": m["low"],
                "max_price": m["high"], "closed": bool(m["closed"]),
                "open_ts_ms": m["open_ts_ms"], "close_ts_ms": m["close_ts_ms"]}
            continue
        n_old, n_new = cur["trade_count"], m["trade_count"]
        v_old = cur["volume"] if cur["vwap"] is not None else 0.0
        v_new = m["volume"] if m["vwap"] is not None else 0.0
        if m["open_ts_ms"] < cur["open_ts_ms"]:
            cur["open"], cur["open_ts_ms"] = m["open"], m["open_ts_ms"]
        if m["close_ts_ms"] >= cur["close_ts_ms"]:
            cur["close"], cur["close_ts_ms"] = m["close"], m["close_ts_ms"]
        cur["high"] = cur["max_price"] = max(cur["high"], m["high"])
        cur["low"] = cur["min_price"] = min(cur["low"], m["low"])
        cur["volume"] += m["volume"]
        cur["trade_count"] = n_old + n_new
        cur["avg_price"] = ((cur["avg_price"] or 0.0) * n_old + m["avg_price"] * n_new) / (
            n_old + n_new)
        if v_old + v_new > 0:
            cur["vwap"] = ((cur["vwap"] or 0.0) * v_old + (m["vwap"] or 0.0) * v_new) / (
                v_old + v_new)
        cur["closed"] = cur["closed"] and bool(m["closed"])
    out = sorted(by_start.values(), key=lambda b: b["bucket_start_ms"])
    for b in out:
        b["closed"] = b["closed"] and b["bucket_start_ms"] + interval_ms <= now_ms
    return out


def fill_previous(bars: list[dict[str, Any]], interval_ms: int, end_ms: int
                  ) -> list[dict[str, Any]]:
    """Insert flat bars (previous close, volume 0, trade_count 0) for empty buckets between
    the first bar and ``end_ms`` (exclusive). Pure; ``bars`` are oldest first."""
    if not bars:
        return bars
    out: list[dict[str, Any]] = []
    for bar in bars:
        while out and out[-1]["bucket_start_ms"] + interval_ms < bar["bucket_start_ms"]:
            out.append(_flat(out[-1], out[-1]["bucket_start_ms"] + interval_ms))
        out.append(bar)
    while out[-1]["bucket_start_ms"] + interval_ms < end_ms:
        out.append(_flat(out[-1], out[-1]["bucket_start_ms"] + interval_ms))
    return out


def _flat(prev: dict[str, Any], start_ms: int) -> dict[str, Any]:
    c = prev["close"]
    return {**prev, "bucket_start_ms": start_ms, "time": iso_ms(start_ms), "open": c,
            "high": c, "low": c, "close": c, "volume": 0.0, "trade_count": 0,
            "avg_price": None, "vwap": None, "min_price": c, "max_price": c}


def rows_to_bars(rows: Sequence[asyncpg.Record], symbol: str, exchange: str | None,
                 interval_ms: int, now_ms: int, *, keep_ts: bool) -> list[dict[str, Any]]:
    """Response-shape bars from :func:`sql.bars_1m.fetch_rollup` records (oldest first).

    ``closed`` is ``bucket end <= now_ms``; with ``keep_ts`` the bars also carry
    ``open_ts_ms``/``close_ts_ms`` (needed by :func:`merge_live`, removed before
    answering).
    """
    out = []
    for r in rows:
        ms = int(r["b"].timestamp() * 1000)
        high, low = r["high"], r["low"]
        bar = {"exchange": exchange, "symbol": symbol, "bucket_start_ms": ms,
               "time": iso_ms(ms), "open": r["open"], "high": high, "low": low,
               "close": r["close"], "volume": r["volume"], "trade_count": r["trade_count"],
               "avg_price": r["avg_price"], "vwap": r["vwap"], "min_price": low,
               "max_price": high, "closed": ms + interval_ms <= now_ms}
        if keep_ts:
            bar["open_ts_ms"] = r["open_ts_ms"]
            bar["close_ts_ms"] = r["close_ts_ms"]
        out.append(bar)
    return out


def splice_json_arrays(a: bytes, b: bytes) -> bytes:
    """Concatenate two serialised JSON arrays (``b"[1,2]"``, ``b"[3]"`` -> ``b"[1,2,3]"``)."""
    if a == b"[]":
        return b
    if b == b"[]":
        return a
    return a[:-1] + b"," + b[1:]


class SeriesError(Exception):
    """A storage failure while building a series (the view answers 503)."""


async def recent_buckets(conn: asyncpg.Connection, symbol: str, exchange: str | None,
                         lo_ms: int, end_ms: int, interval_ms: int, now_ms: int
                         ) -> tuple[list[dict[str, Any]], bool]:
    """Buckets starting in ``[lo_ms, end_ms)`` from TimescaleDB merged with the live
    1-minute bars in Redis for the minutes of the live window not stored yet.

    Returns:
        ``(bars, live_seen)``: response-shape bars oldest first, each with
        ``open_ts_ms``/``close_ts_ms``; ``live_seen`` when any live bar was merged.

    Raises:
        SeriesError: Redis is unreachable.
        asyncpg.PostgresError, OSError: the database failed.
    """
    live_from = now_ms - now_ms % 60_000 - live_window_ms(settings.window.grace_ms)
    rows = await fetch_rollup(conn, symbol, exchange, lo_ms, end_ms, interval_ms, MAX_BARS)
    bars = rows_to_bars(rows, symbol, exchange, interval_ms, now_ms, keep_ts=True)
    if end_ms <= live_from:
        return bars, False
    live_lo = max(lo_ms, live_from)
    # no live bar starts after the newest minute a tick may be stamped with
    live_hi = min(end_ms, now_ms - now_ms % 60_000 + 60_000 + settings.window.max_future_ms)
    if live_hi <= live_lo:
        return bars, False
    try:
        live = await latest_prices.live_bars(symbol, exchange, live_lo, live_hi)
    except (RedisError, OSError) as exc:
        raise SeriesError(f"redis unavailable: {type(exc).__name__}") from exc
    if not live:
        return bars, False
    stored = await stored_minutes(conn, symbol, exchange, live_lo, live_hi)
    live = [m for m in live if (m["exchange"], m["bucket_start_ms"]) not in stored]
    if not live:
        return bars, False
    bars = merge_live(bars, live, interval_ms, now_ms)
    for b in bars:
        b["exchange"] = exchange
    return bars, True


async def _sealed(symbol: str, exchange: str | None, interval: str, fill: str, start_ms: int,
                  seal_ms: int, now_ms: int) -> tuple[dict[str, Any] | None, bytes]:
    """``(last bar or None, JSON array)`` of the sealed buckets ``[start_ms, seal_ms)``,
    from the cache or computed (and then cached)."""
    gen = await ohlcv_cache.generation(symbol)
    key = ""
    if gen is not None:
        key = entry_key(ohlcv_cache.prefix, symbol, gen, exchange, interval, fill, start_ms,
                        seal_ms)
        hit = await ohlcv_cache.get(key)
        if hit is not None:
            return hit
    iv = INTERVALS_MS[interval]
    try:
        pool = await database.pool()
        async with pool.acquire() as conn:
            if fill == "none":  # serialised by PostgreSQL, passed through as is
                last = None
                blob = await fetch_rollup_json(conn, symbol, exchange, start_ms, seal_ms, iv,
                                               MAX_BARS)
            else:
                rows = await fetch_rollup(conn, symbol, exchange, start_ms, seal_ms, iv,
                                          MAX_BARS)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SeriesError(f"database unavailable: {type(exc).__name__}") from exc
    if fill != "none":
        bars = fill_previous(rows_to_bars(rows, symbol, exchange, iv, now_ms, keep_ts=False),
                             iv, seal_ms)
        last = bars[-1] if bars else None
        blob = orjson.dumps(bars)
    if gen is not None:
        await ohlcv_cache.put(key, last, blob)
    return last, blob


async def _on_demand(symbol: str, exchange: str, start_ms: int, seal_ms: int, iv: int
                     ) -> dict[str, Any] | None:
    """When stored bars do not reach back to ``start_ms`` (none in ``[start_ms, seal_ms)``,
    or the oldest one at least an interval after ``start_ms``), ask for the missing part
    (:func:`agents.history.ask`) and wait up to ``history.on_demand_wait_s`` for it.

    Returns:
        The request's state, None when nothing is missing.
    """
    from agents.history import ask, wait_for_request

    pool = await database.pool()
    async with pool.acquire() as conn:
        oldest = await oldest_bar_in(conn, symbol, exchange, start_ms, seal_ms)
    if oldest is not None and oldest - start_ms < iv:
        return None
    req_id, state = await ask(exchange, symbol, start_ms, oldest or seal_ms)
    if state["state"] in ("done", "empty", "error"):
        return state
    return await wait_for_request(req_id, settings.history.on_demand_wait_s) or state


@app.page("/ohlcv")
class Ohlcv(ApiView):
    """1-minute OHLCV history of a symbol, optionally on one exchange."""

    async def get(self, request: Request) -> Response:
        now_ms = time.time_ns() // 1_000_000
        try:
            symbol, exchange, start_ms, end_ms, interval, fill = parse_ohlcv_query(
                dict(request.query), now_ms)
        except QueryError as exc:
            return self.fail(400, str(exc), param=exc.param)
        iv = INTERVALS_MS[interval]
        seal_ms = min(end_ms, sealed_end_ms(now_ms, settings.window.grace_ms, iv))
        history: dict[str, Any] | None = None
        h = settings.history
        if h.on_demand and h.source != "none" and exchange is not None and seal_ms > start_ms:
            try:
                history = await _on_demand(symbol, exchange, start_ms, seal_ms, iv)
            except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                return self.fail(503, f"storage unavailable: {type(exc).__name__}")
        last: dict[str, Any] | None = None
        sealed = b"[]"
        rest: list[dict[str, Any]] = []
        live_seen = False
        try:
            if seal_ms > start_ms:
                last, sealed = await _sealed(symbol, exchange, interval, fill, start_ms,
                                             seal_ms, now_ms)
            lo_ms = max(seal_ms, start_ms)
            pool = await database.pool()
            async with pool.acquire() as conn:
                if end_ms > lo_ms:
                    rest, live_seen = await recent_buckets(conn, symbol, exchange, lo_ms,
                                                           end_ms, iv, now_ms)
                known = (sealed != b"[]" or bool(rest) or live_seen
                         or await symbol_known(conn, symbol, exchange))
                if history is not None and not known and history["state"] == "error":
                    return self.fail(502, f"history fetch failed: {history.get('error')}")
                if not known and (history is None or history["state"] == "empty"):
                    where = f" on exchange {exchange!r}" if exchange else ""
                    return self.fail(404, f"unknown symbol {symbol!r}{where}",
                                     param="symbol")
        except SeriesError as exc:
            return self.fail(503, str(exc))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return self.fail(503, f"database unavailable: {type(exc).__name__}")
        for b in rest:
            b.pop("open_ts_ms", None)
            b.pop("close_ts_ms", None)
        if fill == "previous":
            fill_end = min(end_ms, now_ms - now_ms % iv + iv)
            rest = (fill_previous([last, *rest], iv, fill_end)[1:] if last is not None
                    else fill_previous(rest, iv, fill_end))
        head: dict[str, Any] = {"symbol": symbol, "exchange": exchange, "interval": interval,
                                "fill": fill, "start": start_ms, "end": end_ms}
        if history is not None:
            head["history"] = {k: history.get(k) for k in ("request_id", "state", "bars",
                                                            "error")}
        meta = orjson.dumps(head)
        body = (meta[:-1] + b',"bars":' + splice_json_arrays(sealed, orjson.dumps(rest))
                + b"}")
        return self.bytes(body, content_type="application/json")
