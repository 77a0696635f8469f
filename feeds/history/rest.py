"""Historical 1-minute bars from REST sources (CryptoCompare legacy min-api, CoinDesk Data API).

Each adapter turns the source's minute points into closed-bar dicts of the
:func:`sql.bars_1m.upsert_bars` schema::

    {"exchange": "binance", "symbol": "BTCUSDT", "bucket_start_ms": 1723075200000,
     "open": 61000.0, "high": 61010.0, "low": 60990.0, "close": 61005.0,
     "volume": "12.5",          # base units, exact decimal string of the source's number
     "quote_volume": "762526.25",  # None when the source does not give it
     "trade_count": 0,          # 0 when the source does not say
     "avg_price": 61001.25,     # (open + high + low + close) / 4 (no better figure given)
     "vwap": "61002.1",         # quote volume / base volume, None unless both > 0
     "open_ts_ms": 1723075200000, "close_ts_ms": 1723075259999}

``exchange`` and ``symbol`` are *our* names; the source's exchange/market name comes from
``history.exchange_map`` (default: the same name) and the pair from :func:`split_symbol`.

Formats (``docs/formats.md``):

* **CryptoCompare legacy REST** (``docs/formats.md#cryptocompare-histominute``;
  ExodusOSS/cryptocompare PR #31, the min-api.cryptocompare.com ``data/v2/histominute``
  documentation): ``GET
  /data/v2/histominute?fsym=BTC&tsym=USDT&e=binance&limit=2000&toTs=<s>`` returns
  ``limit + 1`` points ending at ``toTs``, oldest first, empty minutes filled with zeros;
  page backwards with ``toTs = earliest time - 60``. Minute history is kept for 7 days.
* **CoinDesk Data API** (``docs/formats.md#coindesk-historical-minutes``;
  loeken/cryptocompare-sdks SpotApi.md, the data-api.coindesk.com
  ``spot/v1/historical/minutes`` documentation): ``GET
  /spot/v1/historical/minutes?market=binance&instrument=BTC-USDT&limit=2000&to_ts=<s>
  &fill=false``, records with upper-case keys, ``fill=false`` omits empty minutes.

Both take the API key as ``Authorization: Apikey <key>`` (never logged). Requests are
paced client-side (``history.requests_per_s``); 429 (honouring ``Retry-After``), 5xx,
timeouts, connection errors and CryptoCompare's "rate limit" error envelope are retried
with exponential backoff and jitter up to ``history.max_retries`` times; other 4xx and
error envelopes raise :class:`~core.errors.HistoryError` at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from core.config import HistorySection
from core.decimals import exact_places, format_scaled, ratio_string
from core.errors import HistoryError, InvalidTick
from core.metrics import HISTORY_BARS, HISTORY_ERRORS, HISTORY_REQUESTS, HISTORY_RETRIES
from core.timeutil import MINUTE_MS

__all__ = [
    "MAX_LIMIT",
    "QUOTE_ASSETS",
    "BarPage",
    "CoinDeskHistory",
    "CryptoCompareHistory",
    "HistoryClient",
    "RateLimiter",
    "make_bar",
    "make_history_client",
    "parse_coindesk",
    "parse_cryptocompare",
    "split_symbol",
]

log = logging.getLogger(__name__)

#: most points one request may ask for (both sources document 2000)
MAX_LIMIT = 2000
#: known quote assets, matched as symbol suffixes, longest first (FDUSD before USD)
QUOTE_ASSETS: tuple[str, ...] = tuple(sorted(
    ("USDT", "USDC", "BUSD", "FDUSD", "TUSD", "USDP", "DAI", "USD", "EUR", "GBP", "TRY",
     "BRL", "JPY", "AUD", "BTC", "ETH", "BNB"),
    key=lambda q: (-len(q), q)))
_JITTER = 0.2


def split_symbol(symbol: str) -> tuple[str, str]:
    """Split our symbol into (base, quote) by a known quote suffix.

    Args:
        symbol: e.g. ``BTCUSDT`` (case-insensitive).

    Returns:
        ``("BTC", "USDT")``; the longest matching quote of :data:`QUOTE_ASSETS` wins
        (``BTCFDUSD`` -> ``("BTC", "FDUSD")``).

    Raises:
        HistoryError: no known quote suffix, or nothing left for the base.
    """
    s = symbol.upper()
    for quote in QUOTE_ASSETS:
        if s.endswith(quote) and len(s) > len(quote):
            return s[: -len(quote)], quote
    raise HistoryError(f"cannot split symbol {symbol!r}: no known quote asset "
                       f"({', '.join(QUOTE_ASSETS)})")


def make_bar(exchange: str, symbol: str, bucket_start_ms: int, o: float, h: float, lo: float,
             c: float, volume: float, quote_volume: float | None,
             trade_count: int = 0) -> dict[str, Any]:
    """A closed-bar dict (module docstring schema) from one source point.

    Args:
        exchange, symbol: our names.
        bucket_start_ms: minute start, UTC epoch ms.
        o, h, lo, c: prices (quote per base).
        volume: base volume; quote_volume: quote volume (None when unknown).
        trade_count: trades in the minute (0 when unknown).

    Returns:
        dict: the bar; ``volume``, ``quote_volume`` and ``vwap`` are exact decimal
        strings of the source's numbers (:data:`core.models.DECIMAL_FIELDS`; ``vwap`` =
        quote volume / volume rounded half-up to 16 places, None unless both > 0).

    Raises:
        HistoryError: a negative volume, or one with more than 18 decimal places.
    """
    if volume < 0 or (quote_volume is not None and quote_volume < 0):
        raise HistoryError(f"negative volume at {bucket_start_ms}: {volume!r}, "
                           f"{quote_volume!r}")
    try:
        vn, ve = exact_places(volume)
        qv = None if quote_volume is None else exact_places(quote_volume)
    except InvalidTick as exc:
        raise HistoryError(f"volume at {bucket_start_ms}: {exc.detail}") from exc
    vwap = ratio_string(qv[0], qv[1], vn, ve) if qv is not None and qv[0] > 0 else None
    return {
        "exchange": exchange, "symbol": symbol, "bucket_start_ms": bucket_start_ms,
        "open": o, "high": h, "low": lo, "close": c, "volume": format_scaled(vn, ve),
        "quote_volume": None if qv is None else format_scaled(*qv),
        "trade_count": trade_count, "avg_price": (o + h + lo + c) / 4, "vwap": vwap,
        "open_ts_ms": bucket_start_ms, "close_ts_ms": bucket_start_ms + MINUTE_MS - 1,
    }


def _num(point: dict[str, Any], key: str) -> float:
    v = point.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise HistoryError(f"malformed point: {key}={v!r}")
    return float(v)


def _opt_num(point: dict[str, Any], key: str) -> float | None:
    return None if point.get(key) is None else _num(point, key)


def parse_cryptocompare(body: Any, exchange: str, symbol: str
                        ) -> tuple[list[dict[str, Any]], int | None]:
    """Parse a CryptoCompare ``data/v2/histominute`` response body.

    Source: ``docs/formats.md#cryptocompare-histominute`` (v2 envelope; ``time`` = bucket
    start in epoch seconds, ``volumefrom`` base volume, ``volumeto`` quote volume). Sample::

        {"Response": "Success", "Message": "", "HasWarning": false, "Type": 100,
         "RateLimit": {}, "Data": {"Aggregated": false, "TimeFrom": 1723075140,
         "TimeTo": 1723075200, "Data": [
           {"time": 1723075140, "high": 0, "low": 0, "open": 0, "volumefrom": 0,
            "volumeto": 0, "close": 0, "conversionType": "direct", "conversionSymbol": ""},
           {"time": 1723075200, "high": 61010.0, "low": 60990.0, "open": 61000.0,
            "volumefrom": 12.5, "volumeto": 762526.25, "close": 61005.0,
            "conversionType": "direct", "conversionSymbol": ""}]}}

    All-zero points (CryptoCompare fills minutes without trades with zeros) are skipped.

    Args:
        body: decoded JSON.
        exchange, symbol: our names, put into the bars.

    Returns:
        ``(bars oldest first, earliest point time in ms or None when there were no
        points)``; the earliest time counts zero-filled points too (it drives paging).

    Raises:
        HistoryError: ``"Response": "Error"`` (the message is kept; ``status`` 429 when it
            is a rate limit, so callers can retry) or a malformed body.
    """
    if not isinstance(body, dict):
        raise HistoryError("cryptocompare: response is not a JSON object")
    if body.get("Response") == "Error":
        msg = str(body.get("Message") or "unknown error")
        status = 429 if "rate limit" in msg.lower() else None
        raise HistoryError(f"cryptocompare: {msg}", status)
    data = body.get("Data")
    points = data.get("Data") if isinstance(data, dict) else None
    if body.get("Response") != "Success" or not isinstance(points, list):
        raise HistoryError("cryptocompare: unexpected response shape "
                           f"(Response={body.get('Response')!r})")
    bars: list[dict[str, Any]] = []
    earliest: int | None = None
    for p in points:
        if not isinstance(p, dict) or isinstance(p.get("time"), bool) \
                or not isinstance(p.get("time"), int):
            raise HistoryError(f"cryptocompare: malformed point {str(p)[:200]}")
        start_ms = p["time"] * 1000
        earliest = start_ms if earliest is None else min(earliest, start_ms)
        o, h, lo, c = (_num(p, k) for k in ("open", "high", "low", "close"))
        vol, qvol = _num(p, "volumefrom"), _num(p, "volumeto")
        if o == h == lo == c == vol == qvol == 0:
            continue
        if min(o, h, lo, c) <= 0:
            raise HistoryError(f"cryptocompare: non-positive price in {str(p)[:200]}")
        bars.append(make_bar(exchange, symbol, start_ms, o, h, lo, c, vol, qvol))
    bars.sort(key=lambda b: b["bucket_start_ms"])
    return bars, earliest


def parse_coindesk(body: Any, exchange: str, symbol: str
                   ) -> tuple[list[dict[str, Any]], int | None]:
    """Parse a CoinDesk Data API ``spot/v1/historical/minutes`` response body.

    Source: ``docs/formats.md#coindesk-historical-minutes`` (records with upper-case keys;
    ``TIMESTAMP`` period start in epoch seconds, ``VOLUME`` base, ``QUOTE_VOLUME`` quote,
    ``TOTAL_TRADES`` when present; envelope ``{"Data": [...], "Err": {}}``). Sample::

        {"Data": [{"UNIT": "MINUTE", "TIMESTAMP": 1723075200, "TYPE": "267",
                   "MARKET": "binance", "INSTRUMENT": "BTC-USDT", "OPEN": 61000.0,
                   "HIGH": 61010.0, "LOW": 60990.0, "CLOSE": 61005.0, "VOLUME": 12.5,
                   "QUOTE_VOLUME": 762526.25, "TOTAL_TRADES": 321}],
         "Err": {}}

    Args:
        body: decoded JSON.
        exchange, symbol: our names.

    Returns:
        ``(bars oldest first, earliest TIMESTAMP in ms or None when empty)``.

    Raises:
        HistoryError: a non-empty ``Err`` (its ``message``) or a malformed body.
    """
    if not isinstance(body, dict):
        raise HistoryError("coindesk: response is not a JSON object")
    err = body.get("Err")
    if err:
        msg = err.get("message") if isinstance(err, dict) else None
        raise HistoryError(f"coindesk: {msg or str(err)[:300]}")
    records = body.get("Data")
    if not isinstance(records, list):
        raise HistoryError("coindesk: unexpected response shape (no Data list)")
    bars: list[dict[str, Any]] = []
    earliest: int | None = None
    for r in records:
        ts = r.get("TIMESTAMP") if isinstance(r, dict) else None
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise HistoryError(f"coindesk: malformed record {str(r)[:200]}")
        start_ms = ts * 1000
        earliest = start_ms if earliest is None else min(earliest, start_ms)
        o, h, lo, c = (_num(r, k) for k in ("OPEN", "HIGH", "LOW", "CLOSE"))
        if min(o, h, lo, c) <= 0:
            raise HistoryError(f"coindesk: non-positive price in {str(r)[:200]}")
        trades = _opt_num(r, "TOTAL_TRADES")
        bars.append(make_bar(exchange, symbol, start_ms, o, h, lo, c,
                             _opt_num(r, "VOLUME") or 0.0, _opt_num(r, "QUOTE_VOLUME"),
                             int(trades) if trades is not None else 0))
    bars.sort(key=lambda b: b["bucket_start_ms"])
    return bars, earliest


class RateLimiter:
    """Client-side request pacing: at most ``rate_per_s`` acquisitions per second, evenly
    spaced (``1 / rate_per_s`` seconds apart); :meth:`defer` pauses everyone (a 429's
    ``Retry-After``).

    Args:
        rate_per_s: requests per second (> 0).
        clock, sleep: injectable for tests (``time.monotonic``, ``asyncio.sleep``).
    """

    def __init__(self, rate_per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.interval_s = 1.0 / rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._next_s = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for the next free slot."""
        async with self._lock:
            now = self._clock()
            if self._next_s > now:
                await self._sleep(self._next_s - now)
                now = self._clock()
            self._next_s = max(now, self._next_s) + self.interval_s

    def defer(self, delay_s: float) -> None:
        """No slot before ``delay_s`` seconds from now."""
        self._next_s = max(self._next_s, self._clock() + delay_s)


class BarPage(list[dict[str, Any]]):
    """One page of bars (oldest first), a ``list`` with two extra attributes.

    Attributes:
        from_ms: everything in ``[from_ms, previous page's from_ms or end_ms)`` has been
            fetched: the resume position (``backfill_jobs.next_to_ms``) after this page.
        requests: HTTP requests this page took (retries included).
    """

    def __init__(self, bars: list[dict[str, Any]], from_ms: int, requests: int) -> None:
        super().__init__(bars)
        self.from_ms = from_ms
        self.requests = requests


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), None when absent/bad."""
    if not value:
        return None
    v = value.strip()
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HistoryClient:
    """Base of the REST history adapters: pacing, retries, paging.

    Subclasses set :attr:`source` and implement :meth:`_request_params` and
    :meth:`_parse`.

    Args:
        h: the ``[history]`` settings (URLs, key, rate, retries, timeouts, exchange map).
        session: an aiohttp session to use (not closed by :meth:`close`); by default one is
            created on first use.
        rng: random source of the backoff jitter.
        sleep: awaited for every delay (tests inject a recorder).
    """

    source: str = ""
    path: str = ""

    def __init__(self, h: HistorySection, *, session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = h
        self._session = session
        self._own_session = session is None
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.limiter = RateLimiter(h.requests_per_s, sleep=sleep)
        #: totals over the client's life
        self.requests = 0
        self.retries = 0

    @property
    def base_url(self) -> str:
        """The source's base URL (from the settings)."""
        raise NotImplementedError

    def source_exchange(self, exchange: str) -> str:
        """The source's name of our ``exchange`` (``history.exchange_map``, default same)."""
        return self.settings.exchange_map.get(exchange, exchange)

    def _request_params(self, market: str, base: str, quote: str, to_s: int,
                        limit: int) -> dict[str, str]:
        raise NotImplementedError

    def _parse(self, body: Any, exchange: str, symbol: str
               ) -> tuple[list[dict[str, Any]], int | None]:
        raise NotImplementedError

    def _span_minutes(self, limit: int) -> int:
        """Minutes a request with ``limit`` covers, ending at ``to_ts`` inclusive."""
        return limit

    def _limit_for(self, minutes: int) -> int:
        """The ``limit`` asking for ``minutes`` minutes (at most the source maximum)."""
        return max(1, min(MAX_LIMIT, minutes))

    async def close(self) -> None:
        """Close the HTTP session when the client created it."""
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _backoff_s(self, attempt: int) -> float:
        base = min(self.settings.backoff_initial_s * 2 ** attempt, self.settings.backoff_max_s)
        return base * self._rng.uniform(1 - _JITTER, 1 + _JITTER)

    async def _get(self, params: dict[str, str]) -> tuple[Any, int]:
        """GET the source path with retries.

        Returns:
            ``(decoded JSON body, requests made)``.

        Raises:
            HistoryError: a 4xx other than 429 (at once), an error envelope (at once unless
                it is a rate limit), a malformed body, or retries exhausted.
        """
        url = self.base_url.rstrip("/") + self.path
        headers = {"Accept": "application/json"}
        key = self.settings.api_key.get_secret_value()
        if key:
            headers["Authorization"] = f"Apikey {key}"
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        made = 0
        for attempt in range(self.settings.max_retries + 1):
            await self.limiter.acquire()
            made += 1
            self.requests += 1
            delay: float | None = None
            status: int | None = None
            try:
                async with self._http().get(url, params=params, headers=headers,
                                            timeout=timeout) as resp:
                    status = resp.status
                    raw = await resp.read()
                    retry_after = resp.headers.get("Retry-After")
            except TimeoutError:
                reason, detail = "timeout", f"no answer within {self.settings.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                reason, detail = "connection", f"{type(exc).__name__}: {exc}"
            else:
                body: Any = None
                try:
                    body = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = None
                if status == 429:
                    reason, detail = "rate_limited", "HTTP 429"
                    delay = _retry_after_s(retry_after)
                elif status >= 500:
                    reason, detail = "server_error", f"HTTP {status}"
                elif status >= 400:
                    HISTORY_REQUESTS.labels(self.source, "client_error").inc()
                    HISTORY_ERRORS.labels(self.source, "client_error").inc()
                    raise HistoryError(f"{self.source}: HTTP {status}: "
                                       f"{_error_message(body, raw)}", status)
                elif body is None:
                    HISTORY_REQUESTS.labels(self.source, "bad_response").inc()
                    HISTORY_ERRORS.labels(self.source, "bad_response").inc()
                    raise HistoryError(f"{self.source}: HTTP {status}: body is not JSON "
                                       f"({raw[:120]!r})", status)
                elif _is_rate_limit_envelope(body):
                    reason, detail = "rate_limited", _error_message(body, raw)
                else:
                    HISTORY_REQUESTS.labels(self.source, "ok").inc()
                    return body, made
            HISTORY_REQUESTS.labels(self.source, reason).inc()
            if attempt >= self.settings.max_retries:
                HISTORY_ERRORS.labels(self.source, "retries_exhausted").inc()
                raise HistoryError(f"{self.source}: giving up after {made} attempt(s): "
                                   f"{reason}: {detail}", status)
            if delay is None:
                delay = self._backoff_s(attempt)
            if reason == "rate_limited":
                self.limiter.defer(delay)
            self.retries += 1
            HISTORY_RETRIES.labels(self.source, reason).inc()
            log.warning("history %s: %s (%s); retry %d/%d in %.2f s", self.source, reason,
                        detail, attempt + 1, self.settings.max_retries, delay)
            await self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch_minutes(self, exchange: str, symbol: str, start_ms: int, end_ms: int
                            ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of 1-minute bars with ``bucket_start_ms`` in ``[start_ms, end_ms)``.

        Paging runs backwards from ``end_ms``: the newest page comes first, each page is
        oldest-first. It stops once ``start_ms`` is reached, or when the source returns an
        empty page or nothing older. Pages are :class:`BarPage` (``from_ms``: resume
        position; ``requests``); pages whose minutes were all empty are not yielded.

        Args:
            exchange: our exchange name (mapped by ``history.exchange_map``).
            symbol: our symbol, e.g. ``BTCUSDT``.
            start_ms, end_ms: UTC epoch ms, half-open.

        Raises:
            HistoryError: unknown symbol split, a request failing for good, a malformed
                response.
        """
        base, quote = split_symbol(symbol)
        market = self.source_exchange(exchange)
        first_ms = -(-start_ms // MINUTE_MS) * MINUTE_MS  # first bucket start >= start_ms
        to_ms = (end_ms - 1) // MINUTE_MS * MINUTE_MS      # newest bucket start < end_ms
        pending_requests = 0
        while to_ms >= first_ms:
            minutes = (to_ms - first_ms) // MINUTE_MS + 1
            limit = self._limit_for(minutes)
            body, made = await self._get(
                self._request_params(market, base, quote, to_ms // 1000, limit))
            pending_requests += made
            try:
                bars, earliest_ms = self._parse(body, exchange, symbol)
            except HistoryError as exc:
                HISTORY_ERRORS.labels(self.source, "error_response").inc()
                log.warning("history %s: %s %s: %s", self.source, exchange, symbol, exc)
                raise
            if earliest_ms is None:
                log.info("history %s: %s %s: empty page at to_ts=%d: done", self.source,
                         exchange, symbol, to_ms // 1000)
                return
            covered_from = min(earliest_ms, to_ms - (self._span_minutes(limit) - 1) * MINUTE_MS)
            from_ms = max(covered_from, first_ms)
            page = [b for b in bars if first_ms <= b["bucket_start_ms"] <= to_ms]
            HISTORY_BARS.labels(self.source).inc(len(page))
            if page:
                yield BarPage(page, from_ms, pending_requests)
                pending_requests = 0
            to_ms = covered_from - MINUTE_MS


def _is_rate_limit_envelope(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("Response") == "Error":
        return "rate limit" in str(body.get("Message", "")).lower()
    err = body.get("Err")
    if isinstance(err, dict) and err:
        return "rate limit" in str(err.get("message", "")).lower()
    return False


def _error_message(body: Any, raw: bytes) -> str:
    if isinstance(body, dict):
        if body.get("Message"):
            return str(body["Message"])[:300]
        err = body.get("Err")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return raw[:200].decode(errors="replace")


class CryptoCompareHistory(HistoryClient):
    """CryptoCompare legacy min-api ``GET /data/v2/histominute``
    (``docs/formats.md#cryptocompare-histominute``).

    A request with ``limit`` returns ``limit + 1`` points ending at ``toTs``; the client
    asks for ``minutes - 1`` so the page is exactly the minutes wanted.
    """

    source = "cryptocompare"
    path = "/data/v2/histominute"

    @property
    def base_url(self) -> str:
        """``history.cryptocompare_url``."""
        return self.settings.cryptocompare_url

    def _limit_for(self, minutes: int) -> int:
        return max(1, min(MAX_LIMIT, minutes - 1))

    def _span_minutes(self, limit: int) -> int:
        return limit + 1

    def _request_params(self, market: str, base: str, quote: str, to_s: int,
                        limit: int) -> dict[str, str]:
        return {"fsym": base, "tsym": quote, "e": market, "limit": str(limit),
                "toTs": str(to_s)}

    def _parse(self, body: Any, exchange: str, symbol: str
               ) -> tuple[list[dict[str, Any]], int | None]:
        return parse_cryptocompare(body, exchange, symbol)


class CoinDeskHistory(HistoryClient):
    """CoinDesk Data API ``GET /spot/v1/historical/minutes``
    (``docs/formats.md#coindesk-historical-minutes``), with ``fill=false`` (empty minutes
    omitted)."""

    source = "coindesk"
    path = "/spot/v1/historical/minutes"

    @property
    def base_url(self) -> str:
        """``history.coindesk_url``."""
        return self.settings.coindesk_url

    def _request_params(self, market: str, base: str, quote: str, to_s: int,
                        limit: int) -> dict[str, str]:
        return {"market": market, "instrument": f"{base}-{quote}", "limit": str(limit),
                "to_ts": str(to_s), "fill": "false"}

    def _parse(self, body: Any, exchange: str, symbol: str
               ) -> tuple[list[dict[str, Any]], int | None]:
        return parse_coindesk(body, exchange, symbol)


def make_history_client(h: HistorySection, **kwargs: Any) -> HistoryClient | None:
    """The client for ``h.source`` (None when ``none``).

    Args:
        h: the ``[history]`` settings.
        kwargs: passed to the client (``session``, ``rng``, ``sleep``).
    """
    if h.source == "cryptocompare":
        return CryptoCompareHistory(h, **kwargs)
    if h.source == "coindesk":
        return CoinDeskHistory(h, **kwargs)
    return None
