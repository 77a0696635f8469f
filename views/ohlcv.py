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

404 when the symbol (on that exchange) has no bars at all; 503 when the database is down.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from faust.web import Request, Response, View

from app.errors import QueryError
from app.faust_app import app
from app.services import database
from sql.bars_1m import fetch_rollup, symbol_known
from views.params import iso_ms, parse_name, parse_time_ms

__all__ = ["INTERVALS_MS", "MAX_BARS", "Ohlcv", "fill_previous", "parse_ohlcv_query"]

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
        raise QueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    symbol = parse_name(q.get("symbol"), "symbol")
    assert symbol is not None
    exchange = parse_name(q.get("exchange"), "exchange", required=False)
    interval = q.get("interval") or "1m"
    if interval not in INTERVALS_MS:
        raise QueryError(f"interval {interval[:10]!r}: use one of {', '.join(INTERVALS_MS)}")
    fill = q.get("fill") or "none"
    if fill not in ("none", "previous"):
        raise QueryError("fill: use none or previous")
    iv = INTERVALS_MS[interval]
    end_ms = parse_time_ms(q["end"], "end") if q.get("end") else now_ms
    start_ms = (parse_time_ms(q["start"], "start") if q.get("start")
                else end_ms - _DEFAULT_BARS * iv)
    start_ms -= start_ms % iv
    if start_ms >= end_ms:
        raise QueryError("start must be before end")
    if -(-(end_ms - start_ms) // iv) > MAX_BARS:
        raise QueryError(f"range too large: more than {MAX_BARS} {interval} bars; "
                         "narrow start/end or use a larger interval")
    return symbol, exchange, start_ms, end_ms, interval, fill


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


@app.page("/ohlcv")
class Ohlcv(View):
    """1-minute OHLCV history of a symbol, optionally on one exchange."""

    async def get(self, request: Request) -> Response:
        now_ms = time.time_ns() // 1_000_000
        try:
            symbol, exchange, start_ms, end_ms, interval, fill = parse_ohlcv_query(
                dict(request.query), now_ms)
        except QueryError as exc:
            return self.json({"error": str(exc)}, status=400)
        iv = INTERVALS_MS[interval]
        try:
            pool = await database.pool()
            async with pool.acquire() as conn:
                rows = await fetch_rollup(conn, symbol, exchange, start_ms, end_ms, iv,
                                          MAX_BARS)
                if not rows and not await symbol_known(conn, symbol, exchange):
                    where = f" on exchange {exchange!r}" if exchange else ""
                    return self.json({"error": f"unknown symbol {symbol!r}{where}"}, status=404)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return self.json({"error": f"database unavailable: {type(exc).__name__}"},
                             status=503)
        bars = []
        for r in rows:
            ms = int(r["b"].timestamp() * 1000)
            bars.append({
                "exchange": exchange, "symbol": symbol, "bucket_start_ms": ms,
                "time": iso_ms(ms), "open": r["open"], "high": r["high"], "low": r["low"],
                "close": r["close"], "volume": r["volume"], "trade_count": r["trade_count"],
                "avg_price": r["avg_price"], "vwap": r["vwap"],
                "min_price": r["low"], "max_price": r["high"],
                "closed": ms + iv <= now_ms,
            })
        if fill == "previous":
            bars = fill_previous(bars, iv, min(end_ms, now_ms - now_ms % iv + iv))
        return self.json({"symbol": symbol, "exchange": exchange, "interval": interval,
                          "fill": fill, "start": start_ms, "end": end_ms, "bars": bars})
