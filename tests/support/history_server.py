"""A local stand-in for the CryptoCompare legacy REST and CoinDesk Data API minute history.

Both documented formats (``docs/formats.md``, sections ``#cryptocompare-histominute`` and
``#coindesk-historical-minutes``; see :mod:`feeds.history.rest`):

* ``GET /data/v2/histominute?fsym=&tsym=&e=&limit=&toTs=`` — ``limit + 1`` points ending at
  ``toTs`` (floored to the minute; default now), oldest first, minutes without a bar
  zero-filled; v2 envelope; an unknown pair gets ``"Response": "Error"`` (HTTP 200);
* ``GET /spot/v1/historical/minutes?market=&instrument=BASE-QUOTE&limit=&to_ts=&fill=`` —
  the ``limit`` minutes ending at ``to_ts``; ``fill=false`` omits empty minutes
  (``fill=true``, the default, repeats the previous close with zero volume); envelope
  ``{"Data": [...], "Err": {}}``; errors HTTP 4xx with ``Err.message``.

Parameters are validated (missing/invalid -> the source's error, ``limit`` 1..2000).
When ``api_key`` is set, requests without ``Authorization: Apikey <key>`` get 401.

Bars come from ``bars``: ``{(market, base, quote): {bucket_start_s: {"open", "high",
"low", "close", "volume", "quote_volume", "trades"}}}`` (market compared lower-case).

Faults (:meth:`HistoryServer.add_fault`), applied in order to the next requests: ``429``
(with ``Retry-After`` when given), ``500``, ``slow`` (answer after ``delay_s``), ``empty``
(an empty page), ``error`` (the source's error envelope, HTTP 200 for CryptoCompare /
400 for CoinDesk), ``rate_limit_envelope`` (CryptoCompare's "rate limit" error, HTTP 200),
``drop`` (close the connection without an answer). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

__all__ = ["CC_PATH", "CD_PATH", "Fault", "HistoryServer", "Recorded", "make_bars"]

CC_PATH = "/data/v2/histominute"
CD_PATH = "/spot/v1/historical/minutes"
MAX_LIMIT = 2000

Key = tuple[str, str, str]


def make_bars(start_s: int, n: int, *, price: float = 100.0, step_s: int = 60,
              skip: Iterable[int] = ()) -> dict[int, dict[str, Any]]:
    """``n`` consecutive minute bars from ``start_s`` (minus the minute indexes in
    ``skip``), prices rising by 1 per minute, volume 2 + i, quote volume = volume * close."""
    skipped = set(skip)
    out: dict[int, dict[str, Any]] = {}
    for i in range(n):
        if i in skipped:
            continue
        p = price + i
        vol = 2.0 + i
        out[start_s + i * step_s] = {"open": p, "high": p + 2, "low": p - 1, "close": p + 1,
                                     "volume": vol, "quote_volume": vol * (p + 0.5),
                                     "trades": 10 + i}
    return out


@dataclass
class Fault:
    """``kind`` applied to ``times`` requests (-1: forever) after ``skip`` good ones."""

    kind: str
    times: int = 1
    skip: int = 0
    retry_after: str | None = None
    delay_s: float = 0.0
    message: str = "simulated error"


@dataclass
class Recorded:
    """One request as the server saw it."""

    path: str
    params: dict[str, str]
    authorization: str | None
    t_s: float
    status: int = 0
    fault: str | None = None


@dataclass
class HistoryServer:
    """The fake REST server on ``127.0.0.1``, OS-assigned port (``async with``)."""

    bars: dict[Key, dict[int, dict[str, Any]]] = field(default_factory=dict)
    api_key: str | None = None
    now_s: int | None = None
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    port: int | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (both sources share it)."""
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}"

    def add_fault(self, kind: str, times: int = 1, *, skip: int = 0,
                  retry_after: str | None = None, delay_s: float = 0.0,
                  message: str = "simulated error") -> None:
        """Queue a fault (see the module docstring for ``kind``)."""
        assert kind in ("429", "500", "slow", "empty", "error", "rate_limit_envelope", "drop")
        self.faults.append(Fault(kind, times, skip, retry_after, delay_s, message))

    def data_requests(self, path: str | None = None) -> list[Recorded]:
        """Recorded requests (of one path)."""
        return [r for r in self.requests if path is None or r.path == path]

    async def start(self) -> None:
        """Listen."""
        app = web.Application()
        app.router.add_get(CC_PATH, self._cc)
        app.router.add_get(CD_PATH, self._cd)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HistoryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- internals

    def _next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        f = self.faults[0]
        if f.skip > 0:
            f.skip -= 1
            return None
        if f.times > 0:
            f.times -= 1
            if f.times == 0:
                self.faults.pop(0)
        return f

    def _begin(self, request: web.Request) -> Recorded:
        rec = Recorded(request.path, dict(request.query),
                       request.headers.get("Authorization"), time.monotonic())
        self.requests.append(rec)
        return rec

    def _json(self, rec: Recorded, body: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
        rec.status = status
        return web.Response(body=orjson.dumps(body), status=status,
                            content_type="application/json", headers=headers)

    async def _common(self, request: web.Request, rec: Recorded, error_body: Any,
                      error_status: int) -> web.StreamResponse | None:
        """Auth and faults; None to answer normally (``rec.fault`` may say ``empty``)."""
        if self.api_key is not None and rec.authorization != f"Apikey {self.api_key}":
            return self._json(rec, error_body("You need a valid auth key or api key"), 401)
        fault = self._next_fault()
        if fault is None:
            return None
        rec.fault = fault.kind
        if fault.kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return self._json(rec, error_body("rate limited"), 429, headers)
        if fault.kind == "500":
            return self._json(rec, error_body("internal error"), 500)
        if fault.kind == "error":
            return self._json(rec, error_body(fault.message), error_status)
        if fault.kind == "rate_limit_envelope":
            return self._json(rec, error_body(
                "You are over your rate limit please upgrade your account!"), 200)
        if fault.kind == "drop":
            rec.status = -1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
        return None  # "slow" (after the delay) and "empty" answer normally

    def _now(self) -> int:
        return self.now_s if self.now_s is not None else int(time.time())

    def _series(self, market: str, base: str, quote: str) -> dict[int, dict[str, Any]] | None:
        for (m, b, q), series in self.bars.items():
            if m.lower() == market.lower() and b == base and q == quote:
                return series
        return None

    async def _cc(self, request: web.Request) -> web.StreamResponse:
        rec = self._begin(request)

        def err(msg: str) -> dict[str, Any]:
            return {"Response": "Error", "Message": msg, "HasWarning": False, "Type": 2,
                    "RateLimit": {}, "Data": {}, "ParamWithError": ""}

        early = await self._common(request, rec, err, 200)
        if early is not None:
            return early
        q = request.query
        fsym, tsym, market = q.get("fsym"), q.get("tsym"), q.get("e", "CCCAGG")
        if not fsym or not tsym or len(fsym) > 10:
            return self._json(rec, err("fsym and tsym are required (fsym max length 10)"))
        try:
            limit = int(q.get("limit", "1440"))
            to_s = int(q.get("toTs", str(self._now())))
        except ValueError:
            return self._json(rec, err("limit and toTs must be integers"))
        if not 1 <= limit <= MAX_LIMIT:
            return self._json(rec, err(f"limit must be between 1 and {MAX_LIMIT}"))
        series = self._series(market, fsym, tsym)
        if series is None:
            return self._json(rec, err(
                f"{market} market does not exist for this coin pair ({fsym}-{tsym})"))
        to_s -= to_s % 60
        points = []
        if rec.fault != "empty":
            for t in range(to_s - limit * 60, to_s + 60, 60):
                b = series.get(t)
                if b is None:
                    points.append({"time": t, "high": 0, "low": 0, "open": 0,
                                   "volumefrom": 0, "volumeto": 0, "close": 0,
                                   "conversionType": "direct", "conversionSymbol": ""})
                else:
                    points.append({"time": t, "high": b["high"], "low": b["low"],
                                   "open": b["open"], "volumefrom": b["volume"],
                                   "volumeto": b["quote_volume"], "close": b["close"],
                                   "conversionType": "direct", "conversionSymbol": ""})
        return self._json(rec, {
            "Response": "Success", "Message": "", "HasWarning": False, "Type": 100,
            "RateLimit": {}, "Data": {"Aggregated": False,
                                      "TimeFrom": to_s - limit * 60, "TimeTo": to_s,
                                      "Data": points}})

    async def _cd(self, request: web.Request) -> web.StreamResponse:
        rec = self._begin(request)

        def err(msg: str) -> dict[str, Any]:
            return {"Data": [], "Err": {"type": 1, "message": msg, "other_info": {}}}

        early = await self._common(request, rec, err, 400)
        if early is not None:
            return early
        q = request.query
        market, instrument = q.get("market"), q.get("instrument", "")
        if not market or instrument.count("-") != 1:
            return self._json(rec, err("market and instrument (BASE-QUOTE) are required"), 400)
        fill = q.get("fill", "true")
        if fill not in ("true", "false"):
            return self._json(rec, err("fill must be true or false"), 400)
        try:
            limit = int(q.get("limit", "30"))
            to_s = int(q.get("to_ts", str(self._now())))
        except ValueError:
            return self._json(rec, err("limit and to_ts must be integers"), 400)
        if not 1 <= limit <= MAX_LIMIT:
            return self._json(rec, err(f"limit must be between 1 and {MAX_LIMIT}"), 400)
        base, quote = instrument.split("-")
        series = self._series(market, base, quote)
        if series is None:
            return self._json(rec, err(f"instrument {instrument} not found on {market}"), 404)
        to_s -= to_s % 60
        records = []
        last_close: float | None = None
        if rec.fault != "empty":
            for t in range(to_s - (limit - 1) * 60, to_s + 60, 60):
                b = series.get(t)
                if b is None:
                    if fill == "true" and last_close is not None:
                        records.append(self._cd_record(market, instrument, t, {
                            "open": last_close, "high": last_close, "low": last_close,
                            "close": last_close, "volume": 0, "quote_volume": 0,
                            "trades": 0}))
                    continue
                last_close = b["close"]
                records.append(self._cd_record(market, instrument, t, b))
        return self._json(rec, {"Data": records, "Err": {}})

    @staticmethod
    def _cd_record(market: str, instrument: str, t: int, b: dict[str, Any]) -> dict[str, Any]:
        return {"UNIT": "MINUTE", "TIMESTAMP": t, "TYPE": "267", "MARKET": market,
                "INSTRUMENT": instrument, "OPEN": b["open"], "HIGH": b["high"],
                "LOW": b["low"], "CLOSE": b["close"], "VOLUME": b["volume"],
                "QUOTE_VOLUME": b["quote_volume"], "TOTAL_TRADES": b["trades"]}
