"""TradingView UDF (Universal Data Feed) endpoints under ``/udf``, served from the 1-minute
bars in TimescaleDB.

Protocol source: the TradingView Charting Library UDF specification,
https://www.tradingview.com/charting-library-docs/latest/connecting_data/UDF/ (mirrored
at github.com/m-ahmadi/cw/wiki/UDF), summarised in ``docs/formats.md`` ("TradingView
UDF"). Point the library's ``UDFCompatibleDatafeed`` at ``http://<host>:6066/udf``.

Endpoints (all ``GET``):

* ``/udf/config``: datafeed configuration (resolutions, search on, group requests off,
  ``exchanges`` from the stored bars; ``value ""`` = all exchanges).
* ``/udf/symbols?symbol=BTCUSDT`` or ``?symbol=binance-usdm:BTCUSDT``: LibrarySymbolInfo.
  Without an exchange prefix the symbol is consolidated across exchanges (``exchange``
  ``""``), exactly like ``/ohlcv`` without ``exchange``. ``pricescale`` is 10 to the
  number of decimals of the newest 100 bars' prices (100 when unknown).
* ``/udf/search?query=&type=&exchange=&limit=``: the stored (exchange, symbol) pairs
  whose ``exchange:SYMBOL`` contains ``query`` (case-insensitive); ``limit`` default 30,
  capped at 100; ``type`` other than ``crypto`` matches nothing.
* ``/udf/history?symbol=&resolution=&from=&to=&countback=``: bars whose start lies in
  ``[from, to]`` (Unix **seconds**, UTC; both included), each bar with all its data (a
  bucket starting before ``from`` is not returned). Resolutions: ``1`` ``5`` ``15`` ``30``
  ``60`` ``240`` minutes and ``1D`` (alias ``D``), rolled up like ``/ohlcv`` (buckets
  aligned to UTC midnight). With ``countback=N`` ``from`` is ignored and the newest ``N``
  bars starting at or before ``to`` are returned, searched further back past gaps (up to
  :data:`query.series.COUNTBACK_STEPS` jumps; fewer bars come back when the history is
  shorter or more fragmented). **As charts page:** a ``countback`` above
  :data:`query.series.MAX_BARS`, or a ``from``/``to`` range of more buckets than that, is
  not refused: the newest ``MAX_BARS`` buckets come back, and the chart's next request
  (ending before the oldest bar it got) continues from there; it ends with ``no_data`` (no
  ``nextTime``) once nothing older is stored, so paging back terminates. Buckets in the
  live window (the last minutes, not all in TimescaleDB yet) merge the live 1-minute bars
  from Redis exactly like ``/ohlcv``, so the newest bar is the still-open bucket.
  Response::

      {"s": "ok", "t": [1723161300, ...], "o": [...], "h": [...], "l": [...],
       "c": [...], "v": [...]}

  ``t`` is the bucket start in seconds, ``v`` the volume in base units as exact
  decimal strings (as in ``/ohlcv``, :data:`core.models.DECIMAL_FIELDS`). Nothing in range:
  ``{"s": "no_data", "nextTime": <start second of the newest bar before from>}`` when
  older data exists, else ``{"s": "no_data"}`` (so the chart stops paging back).
* ``/udf/time``: server time, Unix seconds, ``text/plain``.

Errors use the UDF shape ``{"s": "error", "errmsg": "..."}``: 400 for a bad parameter
(missing or non-integer ``from``/``to``, ``from > to``, unknown resolution, ``countback``
below 1), 404 for an unknown symbol, 503 when the database is
unreachable. Unknown query parameters are ignored (UDF clients add their own). Access
control, 405, 429 and 500 come from :class:`views.base.ApiView` in its error shape.

Symbol and exchange names are matched exactly first; when nothing is stored under them, a
case-insensitive match is tried (the chart may upper-case a typed ``exchange:SYMBOL``,
:func:`query.series.canonical_pair`). The series are built by
:meth:`query.series.SeriesBuilder.history`; these views parse, call and serialise.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
from faust.web import Request, Response
from redis.exceptions import RedisError

import sql.bars_1m as bars_sql
from core.errors import QueryError, StorageUnavailable
from core.timeutil import now_ms
from query.series import (
    INTERVALS_MS,
    MAX_BARS,
    HistoryBars,
    bucket_range_ms,
    canonical_pair,
)
from stores.replay_control import active_clock_ms
from views.base import ApiView, Routes
from views.ohlcv import series_builder
from views.params import parse_name

__all__ = [
    "RESOLUTIONS",
    "ROUTES",
    "SEARCH_LIMIT_DEFAULT",
    "SEARCH_LIMIT_MAX",
    "SUPPORTED_RESOLUTIONS",
    "HistoryQuery",
    "UdfConfig",
    "UdfHistory",
    "UdfSearch",
    "UdfSymbols",
    "UdfTime",
    "history_body",
    "parse_history_query",
    "parse_ticker",
    "price_scale",
]

log = logging.getLogger(__name__)

#: UDF resolution -> ``/ohlcv`` interval (:data:`query.series.INTERVALS_MS` key)
RESOLUTIONS: dict[str, str] = {"1": "1m", "5": "5m", "15": "15m", "30": "30m", "60": "1h",
                               "240": "4h", "1D": "1d", "D": "1d"}
#: resolutions advertised by ``/udf/config`` and ``/udf/symbols``
SUPPORTED_RESOLUTIONS: list[str] = ["1", "5", "15", "30", "60", "240", "1D"]
SEARCH_LIMIT_DEFAULT = 30
SEARCH_LIMIT_MAX = 100
#: ``pricescale`` when the decimals cannot be derived from the data
DEFAULT_PRICESCALE = 100
_MAX_DECIMALS = 10
_PRICESCALE_SAMPLE = 100
#: accepted Unix seconds: 1970-01-01 .. 2100-01-01 (as views.params)
_MAX_S = 4_102_444_800
_INT_RE = re.compile(r"^[+-]?\d{1,15}$")
_MAX_QUERY_LEN = 64
_TYPE = "crypto"
_CONFIG_PAIRS_LIMIT = 10_000

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


# ---- pure helpers -----------------------------------------------------------------------


def parse_ticker(value: str | None) -> tuple[str | None, str]:
    """Split a UDF ticker into exchange and symbol.

    Args:
        value: ``SYMBOL`` (consolidated across exchanges) or ``EXCHANGE:SYMBOL``.

    Returns:
        ``(exchange or None, symbol)``.

    Raises:
        QueryError: missing, or a part is not a valid name (see :func:`parse_name`).
    """
    if not value:
        raise QueryError("missing required parameter 'symbol'")
    exchange: str | None = None
    symbol = value
    if ":" in value:
        exchange, _, symbol = value.partition(":")
        exchange = parse_name(exchange, "exchange")
    parsed = parse_name(symbol, "symbol")
    assert parsed is not None
    return exchange, parsed


def price_scale(prices: Iterable[float | None]) -> int:
    """TradingView ``pricescale``: 10 to the largest number of decimals in ``prices``.

    Args:
        prices: traded prices (quote currency per base unit); ``None``/non-finite skipped.

    Returns:
        ``10 ** decimals`` (at most ``10 ** 10``; 1 for whole prices), or
        :data:`DEFAULT_PRICESCALE` when there is no usable price.
    """
    decimals = -1
    for p in prices:
        if p is None or not math.isfinite(p):
            continue
        exponent = Decimal(repr(float(p))).normalize().as_tuple().exponent
        places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        decimals = max(decimals, places)
    if decimals < 0:
        return DEFAULT_PRICESCALE
    return int(10 ** min(decimals, _MAX_DECIMALS))


def _int_param(q: dict[str, str], name: str, required: bool = True) -> int | None:
    raw = q.get(name, "").strip()
    if not raw:
        if required:
            raise QueryError(f"missing required parameter {name!r}")
        return None
    if not _INT_RE.match(raw):
        raise QueryError(f"{name} {raw[:20]!r} is not an integer")
    return int(raw)


@dataclass(frozen=True)
class HistoryQuery:
    """A validated ``/udf/history`` request.

    Attributes:
        exchange: one exchange, or None for the consolidated series.
        symbol: symbol name as requested.
        resolution: UDF resolution (``"1"`` ... ``"1D"``).
        interval_ms: bar length, milliseconds.
        from_s: first bar time, Unix seconds (ignored when ``countback`` is set).
        to_s: last bar time, Unix seconds (included).
        countback: number of bars wanted ending at ``to_s``, or None.
    """

    exchange: str | None
    symbol: str
    resolution: str
    interval_ms: int
    from_s: int
    to_s: int
    countback: int | None


def parse_history_query(q: dict[str, str]) -> HistoryQuery:
    """Validate ``/udf/history`` parameters (unknown parameters are ignored).

    Raises:
        QueryError: missing/invalid ``symbol``; unknown ``resolution``; missing or
            non-integer ``from``/``to``, outside 1970..2100 or ``from > to``; ``countback``
            not an integer >= 1.

    Returns:
        HistoryQuery: ``countback`` capped at :data:`~query.series.MAX_BARS`; without
        ``countback``, a ``from``/``to`` range of more than ``MAX_BARS`` buckets narrowed
        to its newest ``MAX_BARS`` (``from_s`` moved forward).
    """
    exchange, symbol = parse_ticker(q.get("symbol"))
    resolution = q.get("resolution", "")
    if resolution not in RESOLUTIONS:
        raise QueryError(f"unknown resolution {resolution[:10]!r}: use one of "
                         f"{', '.join(SUPPORTED_RESOLUTIONS)}")
    iv = INTERVALS_MS[RESOLUTIONS[resolution]]
    from_s = _int_param(q, "from")
    to_s = _int_param(q, "to")
    assert from_s is not None and to_s is not None
    for name, v in (("from", from_s), ("to", to_s)):
        if not 0 <= v <= _MAX_S:
            raise QueryError(f"{name} out of range: Unix seconds in 0..{_MAX_S}")
    if from_s > to_s:
        raise QueryError("from must not be after to")
    countback = _int_param(q, "countback", required=False)
    if countback is not None:
        if countback < 1:
            raise QueryError("countback must be at least 1")
        countback = min(countback, MAX_BARS)  # as many as the cap allows, newest first
    else:
        start_ms, end_ms = bucket_range_ms(from_s, to_s, iv)
        if (end_ms - start_ms) // iv > MAX_BARS:
            # a chart asking for a wide range gets its newest MAX_BARS buckets and pages
            # back from the oldest one it got (the next page ends before it)
            from_s = (end_ms - MAX_BARS * iv) // 1000
    return HistoryQuery(exchange, symbol, resolution, iv, from_s, to_s, countback)


def _full_name(exchange: str | None, symbol: str) -> str:
    return f"{exchange}:{symbol}" if exchange else symbol


def _description(exchange: str | None, symbol: str) -> str:
    return f"{symbol} on {exchange}" if exchange else f"{symbol}, consolidated across exchanges"


def history_body(hb: HistoryBars, interval_ms: int) -> dict[str, Any] | None:
    """The UDF ``/history`` body of a series.

    Args:
        hb: the series (:meth:`query.series.SeriesBuilder.history`).
        interval_ms: bar length, ms.

    Returns:
        ``{"s": "ok", "t", "o", "h", "l", "c", "v"}`` (``t`` bucket starts in Unix
        seconds), ``{"s": "no_data", "nextTime": <start second of the newest bucket with
        data before the range>}``, ``{"s": "no_data"}`` when no older data exists, or None
        when the symbol has no bar at all.
    """
    bars = hb.bars
    if bars:
        return {"s": "ok",
                "t": [b["bucket_start_ms"] // 1000 for b in bars],
                "o": [b["open"] for b in bars], "h": [b["high"] for b in bars],
                "l": [b["low"] for b in bars], "c": [b["close"] for b in bars],
                "v": [b["volume"] for b in bars]}
    prev = hb.newest_before_ms
    if prev is not None:
        return {"s": "no_data", "nextTime": (prev - prev % interval_ms) // 1000}
    if hb.known:
        return {"s": "no_data"}
    return None


# ---- database helpers -------------------------------------------------------------------


async def _symbol_info(conn: asyncpg.Connection, ticker: str, symbol: str,
                       exchange: str | None) -> dict[str, Any] | None:
    rows = await bars_sql.recent_prices(conn, symbol, exchange, _PRICESCALE_SAMPLE)
    if not rows:
        return None
    return {
        "name": symbol,
        "ticker": ticker,
        "full_name": _full_name(exchange, symbol),
        "description": _description(exchange, symbol),
        "type": _TYPE,
        "session": "24x7",
        "timezone": "Etc/UTC",
        "exchange": exchange or "",
        "listed_exchange": exchange or "",
        "format": "price",
        "minmov": 1,
        "pricescale": price_scale(p for r in rows for p in r.values()),
        "has_intraday": True,
        "intraday_multipliers": [r for r in SUPPORTED_RESOLUTIONS if r != "1D"],
        "has_daily": True,
        "daily_multipliers": ["1"],
        "has_weekly_and_monthly": False,
        "supported_resolutions": SUPPORTED_RESOLUTIONS,
        "volume_precision": 8,
        "data_status": "streaming",
    }


def _unknown(exchange: str | None, symbol: str) -> str:
    where = f" on exchange {exchange!r}" if exchange else ""
    return f"unknown symbol {symbol!r}{where}"


# ---- views ------------------------------------------------------------------------------


class _UdfView(ApiView):
    def udf_error(self, status: int, message: str) -> Response:
        """A UDF error response ``{"s": "error", "errmsg": message}``."""
        return self.json({"s": "error", "errmsg": message}, status=status)

    def db_down(self, exc: BaseException) -> Response:
        """The UDF 503 for a database failure."""
        return self.udf_error(503, f"database unavailable: {type(exc).__name__}")


class UdfConfig(_UdfView):
    """``GET /udf/config``: the datafeed configuration (UDF ``/config``)."""

    async def get(self, request: Request) -> Response:
        try:
            async with self.ctx.database.request() as conn:
                pairs = await bars_sql.pairs(conn, None, "", _CONFIG_PAIRS_LIMIT)
        except _DB_ERRORS as exc:
            return self.db_down(exc)
        exchanges = sorted({r["exchange"] for r in pairs})
        return self.json({
            "supported_resolutions": SUPPORTED_RESOLUTIONS,
            "supports_search": True,
            "supports_group_request": False,
            "supports_marks": False,
            "supports_timescale_marks": False,
            "supports_time": True,
            "exchanges": [{"value": "", "name": "All Exchanges", "desc": ""}]
            + [{"value": ex, "name": ex, "desc": ex} for ex in exchanges],
            "symbols_types": [{"name": _TYPE, "value": _TYPE}],
        })


class UdfSymbols(_UdfView):
    """``GET /udf/symbols?symbol=[EXCHANGE:]SYMBOL``: LibrarySymbolInfo (UDF ``/symbols``)."""

    async def get(self, request: Request) -> Response:
        ticker = request.query.get("symbol", "")
        try:
            exchange, symbol = parse_ticker(ticker)
        except QueryError as exc:
            return self.udf_error(400, str(exc))
        self.check_market(request, symbol, exchange)
        try:
            async with self.ctx.database.request() as conn:
                info = await _symbol_info(conn, ticker, symbol, exchange)
                if info is None:
                    found = await canonical_pair(conn, exchange, symbol)
                    if found is not None and found != (exchange, symbol):
                        self.check_market(request, found[1], found[0])
                        info = await _symbol_info(conn, ticker, found[1], found[0])
        except _DB_ERRORS as exc:
            return self.db_down(exc)
        if info is None:
            return self.udf_error(404, _unknown(exchange, symbol))
        return self.json(info)


class UdfSearch(_UdfView):
    """``GET /udf/search?query=&type=&exchange=&limit=``: symbol search (UDF ``/search``)."""

    async def get(self, request: Request) -> Response:
        q = request.query
        query = q.get("query", "").strip()
        kind = q.get("type", "")
        exchange = q.get("exchange", "") or None
        try:
            if len(query) > _MAX_QUERY_LEN:
                raise QueryError(f"query longer than {_MAX_QUERY_LEN} characters")
            parse_name(exchange, "exchange", required=False)
            limit = _int_param(dict(q), "limit", required=False)
            if limit is None:
                limit = SEARCH_LIMIT_DEFAULT
            elif limit < 1:
                raise QueryError("limit must be positive")
        except QueryError as exc:
            return self.udf_error(400, str(exc))
        if kind not in ("", _TYPE):
            return self.json([])
        try:
            async with self.ctx.database.request() as conn:
                rows = await bars_sql.pairs(conn, exchange, query, min(limit, SEARCH_LIMIT_MAX))
        except _DB_ERRORS as exc:
            return self.db_down(exc)
        principal = self.principal(request)
        return self.json([
            {"symbol": r["symbol"], "full_name": _full_name(r["exchange"], r["symbol"]),
             "description": _description(r["exchange"], r["symbol"]),
             "exchange": r["exchange"], "ticker": _full_name(r["exchange"], r["symbol"]),
             "type": _TYPE}
            for r in rows if principal.allows(r["symbol"], r["exchange"])])


class UdfHistory(_UdfView):
    """``GET /udf/history?symbol=&resolution=&from=&to=&countback=``: bars (UDF
    ``/history``), times in Unix seconds."""

    async def get(self, request: Request) -> Response:
        try:
            h = parse_history_query(dict(request.query))
        except QueryError as exc:
            return self.udf_error(400, str(exc))
        self.check_market(request, h.symbol, h.exchange)
        now = await self.clock_ms(h.symbol, h.exchange, now_ms())
        iv = h.interval_ms
        # per request: it records a Redis fallback; on-demand history needs ``admin``
        series = series_builder(self.ctx, self.principal(request).may("admin"))
        try:
            async with self.ctx.database.request() as conn:
                body = history_body(await series.history(
                    conn, h.symbol, h.exchange, iv, h.from_s, h.to_s, h.countback, now), iv)
                if body is None:
                    found = await canonical_pair(conn, h.exchange, h.symbol)
                    if found is not None and found != (h.exchange, h.symbol):
                        self.check_market(request, found[1], found[0])
                        body = history_body(await series.history(
                            conn, found[1], found[0], iv, h.from_s, h.to_s, h.countback,
                            now), iv)
        except _DB_ERRORS as exc:
            return self.db_down(exc)
        except StorageUnavailable as exc:
            return self.udf_error(503, str(exc))
        if body is None:
            return self.udf_error(404, _unknown(h.exchange, h.symbol))
        if series.degraded:  # Redis down: stored bars and this worker's own open minutes
            body["degraded"] = True
        return self.json(body)


class UdfTime(_UdfView):
    """``GET /udf/time``: server time, Unix seconds (UTC), ``text/plain``; while a market
    replay runs (or is paused), its simulated clock (:mod:`views.replay`)."""

    async def get(self, request: Request) -> Response:
        now_s = now_ms() // 1000
        try:
            replay_ms = await active_clock_ms(self.ctx.redis, self.ctx.settings.redis.key_prefix)
        except (RedisError, OSError) as exc:  # the wall clock is still a valid answer
            log.warning("udf/time: replay clock unavailable (%s); wall clock used",
                        type(exc).__name__)
            replay_ms = None
        if replay_ms is not None:
            now_s = replay_ms // 1000
        return self.text(str(now_s), content_type="text/plain")


ROUTES: Routes = [
    ("/udf/config", UdfConfig),
    ("/udf/symbols", UdfSymbols),
    ("/udf/search", UdfSearch),
    ("/udf/history", UdfHistory),
    ("/udf/time", UdfTime),
]
