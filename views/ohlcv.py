"""``GET /ohlcv?symbol=&exchange=&start=&end=&interval=1m``: 1-minute bars from TimescaleDB.

``start``/``end``: epoch milliseconds or ISO-8601 (naive = UTC); the range is half-open
``[start, end)`` on bar start. Defaults: ``end`` = now, ``start`` = ``end`` - 1 hour.
Ranges longer than 31 days are refused (400). Response 200::

    {"symbol": "BTCUSDT", "exchange": "binance-usdm", "interval": "1m",
     "start": 1723161300000, "end": 1723161600000,
     "bars": [{"exchange": "binance-usdm", "symbol": "BTCUSDT",
               "bucket_start_ms": 1723161300000, "time": "2024-08-08T23:55:00.000Z",
               "open": 61807.8, "high": 61839.8, "low": 61755.7, "close": 61807.8,
               "volume": 196.112, "trade_count": 2950, "avg_price": 61800.1,
               "vwap": 61801.2, "min_price": 61755.7, "max_price": 61839.8}, ...]}

404 when the symbol (on that exchange) has no bars at all; 503 when the database is down.
"""

from __future__ import annotations

import time

import asyncpg
from faust.web import Request, Response, View

from app.errors import QueryError
from app.faust_app import app
from app.services import database
from sql.bars_1m import fetch_bars, symbol_known
from views.params import iso_ms, parse_name, parse_time_ms

__all__ = ["MAX_RANGE_MS", "Ohlcv"]

MAX_RANGE_MS = 31 * 86_400_000
_DEFAULT_RANGE_MS = 3_600_000
_ROW_LIMIT = 200_000
_ALLOWED = {"symbol", "exchange", "start", "end", "interval"}


def parse_ohlcv_query(q: dict[str, str], now_ms: int) -> tuple[str, str | None, int, int]:
    """Validate ``/ohlcv`` parameters -> ``(symbol, exchange, start_ms, end_ms)``.

    Raises:
        QueryError: unknown parameter, bad name/time, unsupported interval,
            ``start >= end`` or a range over 31 days.
    """
    unknown = set(q) - _ALLOWED
    if unknown:
        raise QueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    symbol = parse_name(q.get("symbol"), "symbol")
    assert symbol is not None
    exchange = parse_name(q.get("exchange"), "exchange", required=False)
    if q.get("interval", "1m") != "1m":
        raise QueryError("interval: only '1m' is supported")
    end_ms = parse_time_ms(q["end"], "end") if q.get("end") else now_ms
    start_ms = (parse_time_ms(q["start"], "start") if q.get("start")
                else end_ms - _DEFAULT_RANGE_MS)
    if start_ms >= end_ms:
        raise QueryError("start must be before end")
    if end_ms - start_ms > MAX_RANGE_MS:
        raise QueryError("range too large: at most 31 days of 1-minute bars per request")
    return symbol, exchange, start_ms, end_ms


@app.page("/ohlcv")
class Ohlcv(View):
    """1-minute OHLCV history of a symbol, optionally on one exchange."""

    async def get(self, request: Request) -> Response:
        try:
            symbol, exchange, start_ms, end_ms = parse_ohlcv_query(
                dict(request.query), time.time_ns() // 1_000_000
            )
        except QueryError as exc:
            return self.json({"error": str(exc)}, status=400)
        try:
            pool = await database.pool()
            async with pool.acquire() as conn:
                rows = await fetch_bars(conn, symbol, exchange, start_ms, end_ms, _ROW_LIMIT)
                if not rows and not await symbol_known(conn, symbol, exchange):
                    where = f" on exchange {exchange!r}" if exchange else ""
                    return self.json({"error": f"unknown symbol {symbol!r}{where}"}, status=404)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return self.json({"error": f"database unavailable: {type(exc).__name__}"},
                             status=503)
        bars = []
        for r in rows:
            ms = int(r["bucket_start"].timestamp() * 1000)
            bars.append({
                "exchange": r["exchange"], "symbol": r["symbol"], "bucket_start_ms": ms,
                "time": iso_ms(ms), "open": r["open"], "high": r["high"], "low": r["low"],
                "close": r["close"], "volume": r["volume"], "trade_count": r["trade_count"],
                "avg_price": r["avg_price"], "vwap": r["vwap"],
                "min_price": r["low"], "max_price": r["high"],
            })
        return self.json({"symbol": symbol, "exchange": exchange, "interval": "1m",
                          "start": start_ms, "end": end_ms, "bars": bars})
