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

The queries (Redis first, the database as the fallback) are :class:`query.prices.PriceQueries`;
these views parse, call and serialise.
"""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response

from core.errors import QueryError, StorageUnavailable
from core.models import iso_ms
from core.timeutil import now_ms
from query.price_stats import parse_period_s
from query.prices import PeriodStats, PriceQueries
from tables.aggregator import clock_of
from views.base import ApiView, Routes
from views.context import ViewContext
from views.params import parse_name

__all__ = ["ROUTES", "LatestPrice", "LatestPriceOnExchange", "PriceStat", "PriceStatOnExchange",
           "price_queries"]

_STATS = ("highest", "lowest", "average")
_DEFAULT_PERIOD = "24h"


def price_queries(ctx: ViewContext) -> PriceQueries:
    """The price queries over the views' dependencies."""
    return PriceQueries(ctx.database, ctx.latest, ctx.stats, ctx.redis,
                        ctx.settings.redis.key_prefix)


async def _latest(view: ApiView, request: Request, symbol: str,
                  exchange: str | None) -> Response:
    try:
        parse_name(symbol, "symbol")
        parse_name(exchange, "exchange", required=False)
    except QueryError as exc:
        return view.fail(400, str(exc), param=exc.param)
    view.check_market(request, symbol, exchange)
    try:
        found = await price_queries(view.ctx).latest(symbol, exchange)
    except StorageUnavailable as exc:
        return view.fail(503, str(exc))
    if found is None:
        where = f" on exchange {exchange!r}" if exchange else ""
        return view.fail(404, f"unknown symbol {symbol!r}{where}: no price seen", param="symbol")
    body: dict[str, Any] = {"symbol": symbol, "exchange": found.exchange, "price": found.price,
                            "timestamp": found.ts_ms, "time": iso_ms(found.ts_ms),
                            "source": found.source}
    if found.degraded:
        body["degraded"] = True
    return view.ok(body)


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
    view.check_market(request, symbol, exchange)
    # replayed data (a namespaced exchange) follows the replay's simulated clock
    replayed = exchange is not None and bool(clock_of(exchange))
    try:
        r = await price_queries(view.ctx).period_stats(symbol, exchange, period_s, now_ms(),
                                                        replayed=replayed)
    except StorageUnavailable as exc:
        return view.fail(503, str(exc))
    return _stat_answer(view, stat, symbol, exchange, period, period_s, r)


def _stat_answer(view: ApiView, stat: str, symbol: str, exchange: str | None, period: str,
                 period_s: int, r: PeriodStats) -> Response:
    if not r.known:
        where = f" on exchange {exchange!r}" if exchange else ""
        return view.fail(404, f"unknown symbol {symbol!r}{where}: no trades seen",
                         param="symbol")
    price = {"highest": r.highest, "lowest": r.lowest, "average": r.average}[stat]
    body: dict[str, Any] = {"symbol": symbol, "exchange": exchange, "stat": stat,
                            "price": price, "period": period, "period_s": period_s,
                            "from": r.first_s * 1000, "to": r.last_s * 1000 + 999,
                            "count": r.count, "granularity": r.granularity}
    if r.degraded:
        body.update(source="database", degraded=True)
    return view.ok(body)


class LatestPrice(ApiView):
    """Newest trade price of ``symbol`` on any exchange."""

    async def get(self, request: Request, symbol: str) -> Response:
        return await _latest(self, request, symbol, None)


class LatestPriceOnExchange(ApiView):
    """Newest trade price of ``symbol`` on ``exchange``."""

    async def get(
        self, request: Request, exchange: str, symbol: str
    ) -> Response:
        return await _latest(self, request, symbol, exchange)


class PriceStatOnExchange(ApiView):
    """Highest / lowest / average price of ``symbol`` on ``exchange`` over a period."""

    async def get(self, request: Request, stat: str, exchange: str, symbol: str) -> Response:
        return await _stat(self, request, stat, symbol, exchange)


class PriceStat(ApiView):
    """Highest / lowest / average price of ``symbol`` on all exchanges over a period."""

    async def get(self, request: Request, stat: str, symbol: str) -> Response:
        return await _stat(self, request, stat, symbol, None)


# the /prices/latest/... pages first: they match before /prices/{stat}/...
ROUTES: Routes = [
    ("/prices/latest/{symbol}", LatestPrice),
    ("/prices/latest/{exchange}/{symbol}", LatestPriceOnExchange),
    ("/prices/{stat}/{exchange}/{symbol}", PriceStatOnExchange),
    ("/prices/{stat}/{symbol}", PriceStat),
]
