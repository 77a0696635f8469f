"""A Redis that hangs (SIGSTOP: connections stay open, nothing answers, as in a network
partition) and a Redis that is killed, while the worker ingests: every view answers fast
(p99 < 300 ms) — 200 from TimescaleDB and the worker's own state with ``"degraded":
true`` where Redis held the data, never a 5xx from ``/ohlcv``, ``/udf/history`` or the
statistics views — the Redis circuit breaker opens and shows in ``/health`` and
``/metrics``, ingest never stops, and everything closes again once Redis answers
(``stores/connection.py``, ``core/breaker.py``, ``query/series.py``).

The shared Redis is never touched: the stack uses a private ``redis-server``.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from typing import Any

import aiohttp
import orjson
import pytest

from sql.bars_1m import upsert_bars
from tests.integration.conftest import Stack, _settings_with, until
from tests.integration.test_redis_outage import PrivateRedis, private_redis  # noqa: F401
from tests.unit.bars_db import minute_bar

pytestmark = pytest.mark.integration

#: path -> statuses allowed while Redis is down. 503 only where Redis is the data
#: itself (the replay state, the ingest mode) or the answer is about health.
VIEWS: dict[str, set[int]] = {
    "/prices/latest/BTCUSDT": {200},
    "/prices/latest/exchange1/BTCUSDT": {200},
    "/prices/highest/BTCUSDT?period=1m": {200},
    "/prices/lowest/exchange1/BTCUSDT?period=5m": {200},
    "/prices/average/BTCUSDT?period=30m": {200},
    "/ohlcv?symbol=BTCUSDT": {200},
    "/ohlcv?symbol=BTCUSDT&exchange=exchange1&interval=5m": {200},
    "/udf/history?symbol=BTCUSDT&resolution=1&countback=50&from=0&to={now_s}": {200},
    "/udf/time": {200},
    "/udf/symbols?symbol=BTCUSDT": {200},
    "/udf/search?query=BTC": {200},
    "/health": {503},
    "/metrics": {200},
    "/replay/status": {200, 503},
    "/mode": {200, 503},
}
#: views whose body must say it was built without Redis
DEGRADED = ("/prices/latest/BTCUSDT", "/prices/latest/exchange1/BTCUSDT",
            "/prices/highest/BTCUSDT?period=1m", "/prices/lowest/exchange1/BTCUSDT?period=5m",
            "/prices/average/BTCUSDT?period=30m", "/ohlcv?symbol=BTCUSDT",
            "/ohlcv?symbol=BTCUSDT&exchange=exchange1&interval=5m",
            "/udf/history?symbol=BTCUSDT&resolution=1&countback=50&from=0&to={now_s}")


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


async def metric(stack: Stack, name: str, labels: str = "") -> float:
    status, body = await stack.http("/metrics")
    assert status == 200
    for line in str(body).splitlines():
        if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def sweep(stack: Stack, seconds: float) -> dict[str, list[tuple[int, float, Any]]]:
    """Call every view in turn for ``seconds``: path -> [(status, latency s, body)]."""
    out: dict[str, list[tuple[int, float, Any]]] = defaultdict(list)
    base = stack.base_url
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for path in VIEWS:
                url = base + path.format(now_s=int(time.time()))
                t0 = time.monotonic()
                async with s.get(url) as r:
                    raw = await r.read()
                    dt = time.monotonic() - t0
                try:
                    body: Any = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    body = raw.decode(errors="replace")
                out[path].append((r.status, dt, body))
    return out


def check_outage(got: dict[str, list[tuple[int, float, Any]]], what: str) -> None:
    lat = [dt for samples in got.values() for _, dt, _ in samples]
    for path, samples in got.items():
        for status, _, body in samples:
            assert status in VIEWS[path], (what, path, status, body)
            if status >= 500:
                assert "redis" in str(body).lower(), (what, path, body)
    for path in DEGRADED:
        bodies = [b for _, _, b in got[path]]
        assert all(b.get("degraded") is True for b in bodies), (what, path, bodies[-1])
    assert len(lat) >= 3 * len(VIEWS), (what, len(lat))
    assert p99(lat) < 0.3, (what, f"p99 {p99(lat) * 1000:.0f} ms over {len(lat)} requests",
                            {p: max(dt for _, dt, _ in s) for p, s in got.items()})


async def test_hung_then_killed_redis(private_redis: PrivateRedis,  # noqa: F811
                                      stack: Stack) -> None:
    stack.env.update({"MARKETFLOW_REDIS__URL": private_redis.url,
                      "MARKETFLOW_FEEDS__MODE": "test"})
    stack.settings = _settings_with(stack.env)
    worker = stack.worker().start()
    await worker.wait_ready()  # (the database is migrated now)
    # stored minutes for the database fallbacks (the generator's own need a minute to close)
    now_ms = time.time_ns() // 1_000_000
    minute = now_ms - now_ms % 60_000
    conn = await stack.db()
    try:
        await upsert_bars(conn, [minute_bar("exchange1", "BTCUSDT", minute - k * 60_000,
                                            close=60_000.0 + k) for k in range(2, 40)])
    finally:
        await conn.close()

    async def fresh_from_redis() -> bool:
        status, body = await stack.http("/prices/latest/exchange1/BTCUSDT")
        return status == 200 and body.get("source") == "redis"

    await until(fresh_from_redis, 60, "generated ticks in Redis")
    assert private_redis.proc is not None
    trips0 = await metric(stack, "marketflow_breaker_trips_total", 'dependency="redis"')
    for what in ("hung (SIGSTOP)", "killed"):
        applied0 = await metric(stack, "marketflow_ticks_applied_total")
        if what.startswith("hung"):
            private_redis.proc.send_signal(signal.SIGSTOP)
        else:
            private_redis.kill()
        try:
            got = await sweep(stack, 6.0)
            status, health = await stack.http("/health")
            assert status == 503 and health["breakers"]["redis"]["state"] == "open", health
            assert await metric(stack, "marketflow_breaker_open", 'dependency="redis"') == 1
            applied1 = await metric(stack, "marketflow_ticks_applied_total")
        finally:
            if what.startswith("hung"):
                private_redis.proc.send_signal(signal.SIGCONT)
            else:
                await private_redis.start()
        check_outage(got, what)
        assert applied1 > applied0, (what, "ingest stopped", applied0, applied1)

        async def recovered() -> bool:
            status, body = await stack.http("/health")
            return status == 200 and body["breakers"]["redis"]["state"] == "closed"

        await until(recovered, 30, f"Redis back after {what}")
        await until(fresh_from_redis, 30, f"prices from Redis again after {what}")
        status, body = await stack.http("/ohlcv?symbol=BTCUSDT")
        assert status == 200 and "degraded" not in body, body
    assert await metric(stack, "marketflow_breaker_trips_total",
                        'dependency="redis"') >= trips0 + 2
    worker.assert_alive()
