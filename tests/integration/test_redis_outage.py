"""Redis down during ingest (issue 6, item 1): ticks keep flowing, every bar reaches
TimescaleDB and the closed-bars topic, the price views fall back to TimescaleDB and say so,
``/health`` is 503; when Redis returns (empty: no persistence) the worker re-publishes its
state without a restart.

The shared Redis is never touched: the stack is pointed at a private ``redis-server`` that
this test starts, kills (SIGKILL) in the middle of a replay and starts again on the same
port.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from feeds.replay.trade_files import read_trades
from sql.bars_1m import upsert_bars
from tables.aggregator import WindowAggregator
from tests.integration.conftest import SAMPLE, Stack, _settings_with

pytestmark = pytest.mark.integration

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SPOT_2020 = SAMPLE / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"
USDM_2024 = SAMPLE / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"


class PrivateRedis:
    """A ``redis-server`` subprocess without persistence on a fixed port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: the keyspace is gone
        self.proc.wait(10)


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    r = PrivateRedis()
    await r.start()
    try:
        yield r
    finally:
        if r.running:
            r.kill()


async def _eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns a truthy value (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except Exception as exc:  # noqa: BLE001 - polled again until the deadline
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


def _pure_bars(path: Any) -> dict[int, dict[str, Any]]:
    """Bars of a trades file from the pure aggregator (file order, all windows closed)."""
    ticks = list(read_trades(path))
    agg = WindowAggregator({}, grace_ms=5000, idle_timeout_ms=1)
    wall = time.time_ns() // 1_000_000
    closed = []
    for off in range(0, len(ticks), 500):
        res = agg.process_ticks(0, off, ticks[off:off + 500], wall)
        assert not res.late
        closed += res.closed
    closed += agg.process_idle(0, wall + 10**12).closed
    return {b["bucket_start_ms"]: b for b in closed}


def _assert_same_bar(got: Any, want: dict[str, Any], where: str) -> None:
    for f in ("open", "high", "low", "close", "trade_count", "open_ts_ms", "close_ts_ms"):
        assert got[f] == want[f], (where, f, got[f], want[f])
    for f in ("volume", "quote_volume", "vwap"):
        # The topic carries exact decimal strings; the database gives NUMERIC as Decimal.
        value = got[f] if isinstance(got[f], str) else Decimal(got[f])
        expected = want[f] if isinstance(got[f], str) else Decimal(want[f])
        assert value == expected, (where, f, got[f], want[f])
    assert got["avg_price"] == pytest.approx(want["avg_price"], rel=1e-12), where


async def test_redis_outage_during_ingest(private_redis: PrivateRedis, stack: Stack) -> None:
    stack.env["MARKETFLOW_REDIS__URL"] = private_redis.url
    stack.settings = _settings_with(stack.env)
    assert stack.settings.redis.url.get_secret_value() == private_redis.url
    try:
        await _scenario(stack, private_redis)
    finally:
        if not private_redis.running:  # the stack's teardown cleans its keys there
            await private_redis.start()


async def _scenario(stack: Stack, private_redis: PrivateRedis) -> None:
    p = stack.name
    spot_rows = list(read_trades(SPOT_2020))
    usdm_rows = list(read_trades(USDM_2024))
    worker = stack.worker().start()
    await worker.wait_ready()

    # 1) Redis up: history of one pair, served from Redis
    await stack.replay_cli("--namespace", "", str(SPOT_2020))
    r = stack.redis()
    try:
        async def spot_latest() -> bool:
            h = await r.hgetall(f"{p}:latest:binance:BTCUSDT")
            return bool(h) and float(h["price"]) == spot_rows[-1].price
        await _eventually(spot_latest, 20, "latest spot price in Redis")
        status, body = await stack.http("/prices/latest/binance/BTCUSDT")
        assert status == 200 and body["source"] == "redis" and "degraded" not in body, body

        # 2) a second replay; Redis is killed in its middle
        replay = asyncio.create_task(stack.replay_cli(
            "--namespace", "", "--speed", "60", str(USDM_2024)))
        await _eventually(lambda: r.exists(f"{p}:latest:binance-usdm:BTCUSDT"), 30,
                          "first usdm ticks in Redis")
        assert not replay.done(), "the replay ended before Redis went down"
        private_redis.kill()
    finally:
        with contextlib.suppress(Exception):
            await r.aclose()
    out = await replay  # the replay command tolerates Redis being down
    assert f"replayed {len(usdm_rows)} ticks" in out, out

    # 3) every bar reaches TimescaleDB and the closed-bars topic, equal to the pure aggregation
    for exchange, path in (("binance", SPOT_2020), ("binance-usdm", USDM_2024)):
        want = _pure_bars(path)
        got = await stack.wait_for_bars(exchange, "BTCUSDT", set(want), timeout=40)
        assert set(got) == set(want)
        for m, b in want.items():
            _assert_same_bar(got[m], b, f"db {exchange} {m}")
        published: dict[int, dict[str, Any]] = {}
        for _, v in await stack.read_topic(stack.settings.topics.bars, idle_s=1.0):
            bar = orjson.loads(v)
            if bar["exchange"] == exchange and bar["symbol"] == "BTCUSDT":
                if bar["bucket_start_ms"] in published:  # at-least-once: identical repeats
                    _assert_same_bar(bar, published[bar["bucket_start_ms"]], "repeat")
                published[bar["bucket_start_ms"]] = bar
        assert set(published) == set(want), exchange
        for m, b in want.items():
            _assert_same_bar(published[m], b, f"topic {exchange} {m}")
    worker.assert_alive()

    # 4) while Redis is down: views answer from TimescaleDB and say so; /health is 503
    status, body = await stack.http("/health")
    assert status == 503, body
    assert (body["status"], body["redis"], body["database"], body["broker"]) == (
        "degraded", "down", "up", "up"), body
    assert body["redis_fallback"]["prices_latest"] == "database"
    assert body["redis_writer"]["up"] is False
    for path, row in (("/prices/latest/binance/BTCUSDT", spot_rows[-1]),
                      ("/prices/latest/binance-usdm/BTCUSDT", usdm_rows[-1]),
                      ("/prices/latest/BTCUSDT", usdm_rows[-1])):
        status, body = await stack.http(path)
        assert status == 200, (path, body)
        assert (body["source"], body["degraded"]) == ("database", True), body
        assert (body["price"], body["timestamp"], body["exchange"]) == (
            row.price, row.ts_ms, row.exchange), (path, body)
    status, body = await stack.http("/prices/latest/kraken/BTCUSDT")
    assert status == 404, body
    # statistics from stored minutes: a recent bar written straight into the database
    now_ms = time.time_ns() // 1_000_000
    start = now_ms - now_ms % 60_000 - 180_000
    conn = await stack.db()
    try:
        await upsert_bars(conn, [{
            "exchange": "probe", "symbol": "XTSTUSDT", "bucket_start_ms": start,
            "open": 101.0, "high": 123.5, "low": 99.5, "close": 110.0, "volume": 4.0,
            "trade_count": 4, "avg_price": 108.25, "vwap": 108.0,
            "open_ts_ms": start + 1, "close_ts_ms": start + 59_000}])
    finally:
        await conn.close()
    for stat, want_price in (("highest", 123.5), ("lowest", 99.5), ("average", 108.25)):
        status, body = await stack.http(f"/prices/{stat}/probe/XTSTUSDT?period=1h")
        assert status == 200, body
        assert (body["price"], body["count"], body["granularity"], body["source"],
                body["degraded"]) == (want_price, 4, "minute", "database", True), body
    status, body = await stack.http("/prices/highest/XTSTUSDT?period=10s")  # 1 min ago+
    assert status == 200 and body["degraded"] is True and body["granularity"] == "minute"
    status, body = await stack.http("/prices/highest/NOSUCH?period=5m")
    assert status == 404, body
    worker.assert_alive()

    # 5) Redis back (empty): health recovers, the worker re-publishes, no restart
    t0 = time.monotonic()
    await private_redis.start()
    r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        async def healthy() -> bool:
            status, _ = await stack.http("/health")
            return status == 200
        await _eventually(healthy, 10, "/health 200")

        async def republished() -> bool:
            spot = await r.hgetall(f"{p}:latest:binance:BTCUSDT")
            usdm = await r.hgetall(f"{p}:latest:binance-usdm:BTCUSDT")
            return (bool(spot) and bool(usdm) and float(spot["price"]) == spot_rows[-1].price
                    and float(usdm["price"]) == usdm_rows[-1].price)
        await _eventually(republished, 10, "latest prices re-published")
        assert time.monotonic() - t0 < 12
        both = await r.hgetall(f"{p}:latest:BTCUSDT")
        assert (both["exchange"], int(both["ts_ms"])) == ("binance-usdm", usdm_rows[-1].ts_ms)
        assert await r.smembers(f"{p}:exchanges:BTCUSDT") == {"binance", "binance-usdm"}
    finally:
        await r.aclose()
    status, body = await stack.http("/prices/latest/binance/BTCUSDT")
    assert status == 200 and body["source"] == "redis" and "degraded" not in body, body
    assert body["price"] == spot_rows[-1].price
    status, body = await stack.http("/prices/highest/binance/BTCUSDT?period=5m")
    assert status == 200 and "degraded" not in body, body  # the exchange is known again
    status, body = await stack.http("/health")
    assert status == 200 and body["redis_writer"]["up"] is True, body
    assert body["redis_writer"]["republished_ms"] is not None

    # 6) metrics: consumer lag per assigned ticks partition (0 once caught up), re-publish
    ticks = stack.settings.topics.ticks

    async def lag_zero() -> bool:
        _, text = await stack.http("/metrics")
        lines = [ln for ln in text.splitlines()
                 if ln.startswith("marketflow_consumer_lag{") and f'topic="{ticks}"' in ln]
        return len(lines) == 2 and all(ln.endswith(" 0.0") for ln in lines)
    await _eventually(lag_zero, 15, "consumer lag 0 on both ticks partitions")
    _, text = await stack.http("/metrics")
    assert 'marketflow_redis_dropped_total{kind="seconds"}' in text
    republished_n = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                     if ln.startswith('marketflow_redis_republished_total{kind="latest"}')]
    assert republished_n and republished_n[0] >= 2
    assert worker.stop() == 0, worker.tail()
