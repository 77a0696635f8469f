"""On-demand history: /ohlcv for a range missing from the database triggers exactly one
fetch (coordinator -> dynamic topic -> pattern-subscribed writer), answers with the merged
series, and the dynamic topic is deleted afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

MIN = 60_000
#: three hours of minutes a week ago (CryptoCompare keeps minute history for 7 days)
BASE_MS = (int(time.time() * 1000) // 3_600_000 - 72) * 3_600_000
N_MIN = 180


def _point(i: int) -> dict[str, Any]:
    t_s = (BASE_MS + i * MIN) // 1000
    o = 100.0 + i
    return {"time": t_s, "open": o, "high": o + 2, "low": o - 1, "close": o + 1,
            "volumefrom": 10.0 + i, "volumeto": (10.0 + i) * (o + 0.5),
            "conversionType": "direct", "conversionSymbol": ""}


class HistoMinute:
    """Minimal legacy CryptoCompare ``data/v2/histominute``
    (docs/formats.md#cryptocompare-histominute):
    limit+1 points ending at toTs, zero-filled minutes outside the data."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.points = {_point(i)["time"]: _point(i) for i in range(N_MIN)}

    async def handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.requests.append(q)
        await asyncio.sleep(0.3)  # a slow source: concurrent requests overlap the fetch
        limit = int(q.get("limit", "1440"))
        to_s = int(q.get("toTs", str(int(time.time()))))
        to_s -= to_s % 60
        data = []
        for t in range(to_s - limit * 60, to_s + 60, 60):
            data.append(self.points.get(t) or {
                "time": t, "open": 0, "high": 0, "low": 0, "close": 0, "volumefrom": 0,
                "volumeto": 0, "conversionType": "direct", "conversionSymbol": ""})
        return web.json_response({"Response": "Success", "Message": "", "HasWarning": False,
                                  "Type": 100, "RateLimit": {},
                                  "Data": {"Aggregated": False, "TimeFrom": data[0]["time"],
                                           "TimeTo": data[-1]["time"], "Data": data}})


@pytest.fixture
async def histo() -> AsyncIterator[tuple[HistoMinute, str]]:
    server = HistoMinute()
    app = web.Application()
    app.router.add_get("/data/v2/histominute", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _topics(stack: Stack) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.broker.bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_missing_range_is_fetched_once_and_merged(
        stack: Stack, histo: tuple[HistoMinute, str]) -> None:
    server, url = histo
    w = stack.worker(MARKETFLOW_HISTORY__SOURCE="cryptocompare",
                     MARKETFLOW_HISTORY__CRYPTOCOMPARE_URL=url,
                     MARKETFLOW_HISTORY__ON_DEMAND_WAIT_S="25",
                     MARKETFLOW_HISTORY__REQUESTS_PER_S="50").start()
    await w.wait_ready()
    # one hour of the three is already stored, built from our own ticks: kept as is
    conn = await stack.db()
    try:
        for i in range(120, 180):
            p = _point(i)
            await conn.execute(
                "INSERT INTO bars_1m (exchange, symbol, bucket_start, open, high, low, close,"
                " volume, trade_count, avg_price, vwap, open_ts_ms, close_ts_ms, source)"
                " VALUES ('binance', 'BTCUSDT', to_timestamp($1), $2, $3, $4, $5, $6, 7, $2,"
                " NULL, $7, $8, 'ticks')", p["time"], p["open"] + 0.25, p["high"], p["low"],
                p["close"], 1.0, p["time"] * 1000, p["time"] * 1000 + 59_999)
    finally:
        await conn.close()

    path = (f"/ohlcv?symbol=BTCUSDT&exchange=binance&interval=1m&start={BASE_MS}"
            f"&end={BASE_MS + N_MIN * MIN}")
    answers = await asyncio.gather(*(stack.http(path) for _ in range(5)))
    for status, body in answers:
        assert status == 200, body
        assert body["history"]["state"] == "done", body["history"]
    bars = answers[0][1]["bars"]
    assert [b["bucket_start_ms"] for b in bars] == [BASE_MS + i * MIN for i in range(N_MIN)]
    for i, b in enumerate(bars):
        p = _point(i)
        if i < 120:  # fetched
            assert (b["open"], b["high"], b["low"], b["close"]) == (
                p["open"], p["high"], p["low"], p["close"])
            assert b["volume"] == repr(p["volumefrom"]).removesuffix(".0")  # exact decimal
            assert float(b["vwap"]) == pytest.approx(p["volumeto"] / p["volumefrom"])
        else:  # ours, untouched
            assert (b["open"], b["trade_count"]) == (p["open"] + 0.25, 7)
    # exactly one fetch: the missing two hours need one page (limit <= 2000)
    assert len(server.requests) == 1, server.requests
    q = server.requests[0]
    assert (q["fsym"], q["tsym"], q["e"]) == ("BTC", "USDT", "binance")
    conn = await stack.db()
    try:
        sources = dict(await conn.fetch(
            "SELECT source, count(*) FROM bars_1m WHERE exchange = 'binance' GROUP BY 1"))
    finally:
        await conn.close()
    assert sources == {"cryptocompare": 120, "ticks": 60}
    # a repeated request is served from the database without another fetch
    status, again = await stack.http(path)
    assert status == 200 and again["bars"] == bars and len(server.requests) == 1
    # the dynamic topic is gone
    prefix = stack.env["MARKETFLOW_HISTORY__TOPIC_PREFIX"]
    deadline = time.monotonic() + 20
    while any(t.startswith(prefix + ".") for t in await _topics(stack)):
        assert time.monotonic() < deadline, await _topics(stack)
        await asyncio.sleep(0.5)
    status, health = await stack.http("/health")
    assert health["history"]["coordinator"]["handled"] == 1
