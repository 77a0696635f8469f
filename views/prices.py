"""Price endpoints.

``GET /prices/latest/{symbol}`` and ``GET /prices/latest/{exchange}/{symbol}`` — 200::

    {"symbol": "BTCUSDT", "exchange": "binance", "price": 61837.63,
     "timestamp": 1723161255342, "time": "2024-08-08T23:54:15.342Z", "source": "redis"}

While Redis is unreachable the answer falls back to TimescaleDB: the close of the newest
stored 1-minute bar, ``timestamp`` its last trade, with ``"source": "database"`` and
``"degraded": true``. It is stale by up to about a minute plus ``window.grace_ms`` plus the
sink's flush interval (the still-open minute is not stored yet); 404 when no bar is stored,
503 only when the database is unreachable too.

``GET /prices/{highest|lowest|average}/{symbol}`` and ``.../{exchange}/{symbol}``,
``?period=<n>s|m|h|d`` (e.g. 1s, 3s, 5s, 10s, 30s, 1m, 3m, 5m, 15m, 1h, 24h, 7d; at most
31d; **default 24h**) — over the ticks with event time in the period (see
:mod:`query.price_stats` for the exact bounds): exact to the second for periods up to
15 minutes, exact to the minute at the start of longer ones. Average is the mean of the
tick prices. 200::

    {"symbol": "BTCUSDT", "exchange": null, "stat": "highest", "price": 61860.8,
     "period": "5m", "period_s": 300, "from": 1723161300000, "to": 1723161600999,
     "count": 4321, "granularity": "second"}

``price`` is null (count 0) when the symbol traded, but not in the period. 404 when the
symbol (on that exchange) never traded, 400 on a malformed name or period, 503 when the
database is unreachable (or Redis, for periods up to 15 minutes, and the database too).

While Redis is unreachable, every period is computed from the stored 1-minute bars alone
(``"granularity": "minute"``, ``"source": "database"``, ``"degraded": true``): the bars
starting in ``[period start aligned down to the minute, now]``, on the wall clock (a
replay's simulated clock lives in Redis). The newest minute or so (open bar, grace, sink
flush) is not stored yet and therefore missing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
from faust.web import Request, Response
from redis.exceptions import RedisError

from app import settings
from app.faust_app import app
from app.services import database, latest_prices
from core.errors import QueryError
from core.metrics import REDIS_FALLBACKS
from query.price_stats import RECENT_S, parse_period_s, seconds_in_period, stats
from sql.bars_1m import latest_close, price_stats, symbol_known
from stores.replay_control import active_clock_ms
from tables.aggregator import clock_of
from views.base import ApiView
from views.params import iso_ms, parse_name

__all__ = ["LatestPrice", "LatestPriceOnExchange", "PriceStat", "PriceStatOnExchange"]

log = logging.getLogger(__name__)

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


async def _latest(view: ApiView, symbol: str, exchange: str | None) -> Response:
    try:
        parse_name(symbol, "symbol")
        parse_name(exchange, "exchange", required=False)
    except QueryError as exc:
        return view.fail(400, str(exc), param=exc.param)
    extra: dict[str, Any] = {"source": "redis"}
    try:
        found = await latest_prices.get(symbol, exchange)
    except (RedisError, OSError) as exc:
        _redis_fallback("latest", exc)
        extra = {"source": "database", "degraded": True}
        try:
            pool = await database.pool()
            async with pool.acquire() as conn:
                found = await latest_close(conn, symbol, exchange)
        except _DB_ERRORS as db_exc:
            return view.fail(503, f"redis and database unavailable: {type(exc).__name__}, "
                                  f"{type(db_exc).__name__}")
    if found is None:
        where = f" on exchange {exchange!r}" if exchange else ""
        return view.fail(404, f"unknown symbol {symbol!r}{where}: no price seen", param="symbol")
    return view.ok({
        "symbol": symbol,
        "exchange": found["exchange"],
        "price": found["price"],
        "timestamp": found["ts_ms"],
        "time": iso_ms(found["ts_ms"]),
        **extra,
    })


def _redis_fallback(view: str, exc: BaseException) -> None:
    """Count and log (debug: one per request) a Redis read failure answered from
    TimescaleDB."""
    REDIS_FALLBACKS.labels(view).inc()
    log.debug("redis unavailable for /prices/%s (%s: %s); answering from TimescaleDB",
              view, type(exc).__name__, exc)


_STATS = ("highest", "lowest", "average")
_DEFAULT_PERIOD = "24h"


async def _stat(view: ApiView, request: Request, stat: str, symbol: str,
                exchange: str | None) -> Response:
    try:
        if stat not in _STATS:
            raise QueryError(f"unknown statistic {stat[:20]!r}: use highest, lowest or average",
                             "stat")
        parse_name(symbol, "symbol")
        parse_name(exchange, "exchange", required=False)
        unknown = set(request.query) - {"period"}
        if unknown:
            raise QueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}",
                             sorted(unknown)[0])
        period = request.query.get("period") or _DEFAULT_PERIOD
        period_s = parse_period_s(period)
    except QueryError as exc:
        return view.fail(400, str(exc), param=exc.param)
    now_ms = time.time_ns() // 1_000_000
    granularity = "second"
    try:
        if exchange is not None and clock_of(exchange):
            # replayed data (a namespaced exchange) follows the replay's simulated clock
            replay_ms = await active_clock_ms(latest_prices.client, settings.redis.key_prefix,
                                              exchange)
            now_ms = now_ms if replay_ms is None else replay_ms
        first_s, last_s = seconds_in_period(now_ms, period_s)
        if period_s <= RECENT_S:
            aggs = await latest_prices.seconds(symbol, exchange, first_s, last_s)
        else:
            granularity = "minute"
            cut_s = last_s - RECENT_S
            cut_s -= cut_s % 60
            first_s -= first_s % 60
            aggs = await latest_prices.seconds(symbol, exchange, cut_s, last_s)
            pool = await database.pool()
            async with pool.acquire() as conn:
                stored = await price_stats(conn, symbol, exchange, first_s * 1000,
                                           cut_s * 1000)
                if aggs is None and stored is None and not await symbol_known(
                        conn, symbol, exchange):
                    aggs = None
                else:
                    aggs = (aggs or []) + ([stored] if stored else [])
    except RedisError as exc:
        _redis_fallback("stats", exc)
        return await _stat_from_database(view, stat, symbol, exchange, period, period_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return view.fail(503, f"storage unavailable: {type(exc).__name__}")
    return _stat_answer(view, stat, symbol, exchange, period, period_s, first_s, last_s, aggs,
                        {"granularity": granularity})


async def _stat_from_database(view: ApiView, stat: str, symbol: str, exchange: str | None,
                              period: str, period_s: int) -> Response:
    """The statistic from stored 1-minute bars only (Redis down): see the module docstring."""
    first_s, last_s = seconds_in_period(time.time_ns() // 1_000_000, period_s)
    first_s -= first_s % 60
    try:
        pool = await database.pool()
        async with pool.acquire() as conn:
            stored = await price_stats(conn, symbol, exchange, first_s * 1000,
                                       (last_s + 1) * 1000)
            known = stored is not None or await symbol_known(conn, symbol, exchange)
    except _DB_ERRORS as exc:
        return view.fail(503, f"redis and database unavailable: {type(exc).__name__}")
    return _stat_answer(view, stat, symbol, exchange, period, period_s, first_s, last_s,
                        ([stored] if stored else []) if known else None,
                        {"granularity": "minute", "source": "database", "degraded": True})


def _stat_answer(view: ApiView, stat: str, symbol: str, exchange: str | None, period: str,
                 period_s: int, first_s: int, last_s: int, aggs: list[list[float]] | None,
                 extra: dict[str, Any]) -> Response:
    if aggs is None:
        where = f" on exchange {exchange!r}" if exchange else ""
        return view.fail(404, f"unknown symbol {symbol!r}{where}: no trades seen",
                         param="symbol")
    result = stats(aggs)
    price = None
    count = 0
    if result is not None:
        high, low, avg, count = result
        price = {"highest": high, "lowest": low, "average": avg}[stat]
    return view.ok({"symbol": symbol, "exchange": exchange, "stat": stat, "price": price,
                    "period": period, "period_s": period_s, "from": first_s * 1000,
                    "to": last_s * 1000 + 999, "count": count, **extra})


@app.page("/prices/latest/{symbol}")
class LatestPrice(ApiView):
    """Newest trade price of ``symbol`` on any exchange."""

    async def get(self, request: Request, symbol: str) -> Response:
        return await _latest(self, symbol, None)


@app.page("/prices/latest/{exchange}/{symbol}")
class LatestPriceOnExchange(ApiView):
    """Newest trade price of ``symbol`` on ``exchange``."""

    async def get(
        self, request: Request, exchange: str, symbol: str
    ) -> Response:
        return await _latest(self, symbol, exchange)


# registered after the /prices/latest/... pages, which therefore match first
@app.page("/prices/{stat}/{exchange}/{symbol}")
class PriceStatOnExchange(ApiView):
    """Highest / lowest / average price of ``symbol`` on ``exchange`` over a period."""

    async def get(self, request: Request, stat: str, exchange: str, symbol: str) -> Response:
        return await _stat(self, request, stat, symbol, exchange)


@app.page("/prices/{stat}/{symbol}")
class PriceStat(ApiView):
    """Highest / lowest / average price of ``symbol`` on all exchanges over a period."""

    async def get(self, request: Request, stat: str, symbol: str) -> Response:
        return await _stat(self, request, stat, symbol, None)
