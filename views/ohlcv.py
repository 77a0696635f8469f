"""``GET /ohlcv?symbol=&exchange=&start=&end=&interval=&fill=``: OHLCV history.

* ``interval``: ``1m`` (default), ``5m``, ``15m``, ``30m``, ``1h``, ``4h``, ``1d``. Larger
  intervals are rolled up from the stored 1-minute bars (TimescaleDB ``time_bucket`` with
  ``first``/``last``), buckets aligned to UTC midnight.
* ``exchange``: optional; absent = one consolidated bar per bucket across exchanges (open
  of the earliest trade, close of the latest, high max, low min, volume and count summed;
  the rule is :data:`sql.bars_1m.CONSOLIDATE_SQL`).
* ``start``/``end``: epoch milliseconds or ISO-8601 (naive = UTC). Buckets whose start lies
  in ``[start aligned down to the interval, end)`` are returned, each with all its data.
  Defaults: ``end`` = now, ``start`` = ``end`` - 100 intervals. More than
  :data:`~query.series.MAX_BARS` buckets in the range -> 400.
* ``fill``: ``none`` (default) omits buckets without trades; ``previous`` fills gaps after
  the first returned bar with a flat bar at the previous close, volume 0 and
  ``trade_count`` 0 (as Kraken reports empty minutes).

Response 200::

    {"symbol": "BTCUSDT", "exchange": "binance-usdm", "interval": "1m", "fill": "none",
     "start": 1723161300000, "end": 1723161600000,
     "bars": [{"exchange": "binance-usdm", "symbol": "BTCUSDT",
               "bucket_start_ms": 1723161300000, "time": "2024-08-08T23:55:00.000Z",
               "open": 61807.7, "high": 61839.9, "low": 61760.3, "close": 61760.3,
               "volume": "136.45", "quote_volume": "8433295.6621",
               "trade_count": 2005, "avg_price": 61801.3, "vwap": "61802.0977",
               "min_price": 61760.3, "max_price": 61839.9,
               "closed": true}, ...]}

The still-open bucket is included from live state (the bar agent mirrors its open and
just-closed 1-minute bars into Redis) and marked ``"closed": false``; minutes not yet in
TimescaleDB (within the live window, :func:`core.timeutil.live_window_ms`: 5 minutes at
the default grace) come from there, the rest from the database, so there is no gap and no
overlap at the boundary.

Buckets that end before the live window are *sealed*; their JSON is cached in Redis
(read-through, ``web.ohlcv_cache_ttl_s``, invalidated when an old bar is rewritten, see
:mod:`stores.ohlcv_cache`), and the newer buckets are computed on every request.

404 when the symbol (on that exchange) has no bars at all; 503 when the database or Redis
is down.

The series is built by :class:`query.series.SeriesBuilder`; this view parses, calls and
serialises.
"""

from __future__ import annotations

from typing import Any

import orjson
from faust.web import Request, Response

from core.errors import QueryError, StorageUnavailable
from core.timeutil import now_ms
from query.series import FILLS, INTERVALS_MS, MAX_BARS, SeriesBuilder
from views.base import ApiView, Routes
from views.context import ViewContext
from views.params import parse_name, parse_time_ms

__all__ = ["ROUTES", "Ohlcv", "parse_ohlcv_query", "series_builder"]

_DEFAULT_BARS = 100
_ALLOWED = {"symbol", "exchange", "start", "end", "interval", "fill"}


def parse_ohlcv_query(q: dict[str, str], now_ms: int
                      ) -> tuple[str, str | None, int, int, str, str]:
    """Validate ``/ohlcv`` parameters.

    Args:
        q: the query parameters.
        now_ms: wall clock, UTC epoch ms (the default ``end``).

    Returns:
        ``(symbol, exchange, start_ms, end_ms, interval, fill)`` with ``start_ms`` aligned
        down to the interval.

    Raises:
        QueryError: unknown parameter, bad name/time/interval/fill, ``start >= end`` or
            more than :data:`~query.series.MAX_BARS` buckets.
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
    if fill not in FILLS:
        raise QueryError(f"fill: use {' or '.join(FILLS)}", "fill")
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


def series_builder(ctx: ViewContext, on_demand: bool = True) -> SeriesBuilder:
    """The series builder over the views' dependencies (on-demand history only with
    ``history.on_demand`` on, a ``history.source``, and ``on_demand``: the request's
    credential has the ``admin`` scope)."""
    settings = ctx.settings
    h = settings.history
    on_demand = on_demand and h.on_demand and h.source != "none"
    return SeriesBuilder(ctx.database, ctx.live_bars, ctx.ohlcv_cache,
                         grace_ms=settings.window.grace_ms,
                         max_future_ms=settings.window.max_future_ms,
                         on_demand=ctx.on_demand if on_demand else None,
                         on_demand_wait_s=h.on_demand_wait_s, local_live=ctx.local_live)


class Ohlcv(ApiView):
    """1-minute OHLCV history of a symbol, optionally on one exchange."""

    async def get(self, request: Request) -> Response:
        wall = now_ms()
        try:
            symbol, exchange, start_ms, end_ms, interval, fill = parse_ohlcv_query(
                dict(request.query), wall)
            now = await self.clock_ms(symbol, exchange, wall)
            if now != wall:  # a replayed series: the default end follows the replay clock
                symbol, exchange, start_ms, end_ms, interval, fill = parse_ohlcv_query(
                    dict(request.query), now)
        except QueryError as exc:
            return self.fail(400, str(exc), param=exc.param)
        self.check_market(request, symbol, exchange)
        builder = series_builder(self.ctx, self.principal(request).may("admin"))
        try:
            series = await builder.ohlcv(symbol, exchange, start_ms, end_ms, interval, fill,
                                         now)
        except StorageUnavailable as exc:
            return self.fail(503, str(exc))
        history = series.history
        if not series.known:
            if history is not None and history["state"] == "error":
                return self.fail(502, f"history fetch failed: {history.get('error')}")
            if history is None or history["state"] == "empty":
                where = f" on exchange {exchange!r}" if exchange else ""
                return self.fail(404, f"unknown symbol {symbol!r}{where}", param="symbol")
        head: dict[str, Any] = {"symbol": symbol, "exchange": exchange, "interval": interval,
                                "fill": fill, "start": start_ms, "end": end_ms}
        if builder.degraded:  # Redis down: stored bars and this worker's own open minutes
            head["degraded"] = True
        if history is not None:
            head["history"] = {k: history.get(k) for k in ("request_id", "state", "bars",
                                                            "error")}
        meta = orjson.dumps(head)
        body = meta[:-1] + b',"bars":' + series.bars_json + b"}"
        return self.bytes(body, content_type="application/json")


ROUTES: Routes = [("/ohlcv", Ohlcv)]
