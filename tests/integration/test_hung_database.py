"""TimescaleDB outages during ingest, the PostgreSQL half of the issue "Tests use a Redis
stopped with SIGSTOP and a killed Redis, and then the same for PostgreSQL. During each
outage every view answers (200 with degraded data, or a clear 503 for the database), p99
latency stays under 300 ms, and the worker's ingest never stops."

The worker runs test-mode ingest (synthetic ticks) against a private PostgreSQL cluster
(:class:`tests.support.private_pg.PrivatePostgres`; the shared one is never touched), with
stored bars of the last hour written straight into it. Two outages, each while every view
is called in a loop, one request at a time, with status and client-side latency recorded:

* **killed** (SIGKILL of the postmaster and all backends: connections reset, the port
  refuses), then restarted on the same port (crash recovery);
* **hung** (SIGSTOP of the postmaster and all backends: connections are accepted by the
  kernel but nothing answers, queries in flight hang), then resumed. It is timed to span a
  minute boundary, so the minute's bars close (and reach the sink) while the database hangs.

During each outage: the views served without the database (latest price and short-period
statistics from Redis, ``/udf/time``, ``/metrics``, ``/mode``) answer 200; every view that
needs the database answers 503 with a JSON error naming the database (never 500, never a
client timeout or reset), ``/health`` 503 with ``breakers.database.state == "open"``; the
p99 of all requests' latencies is under 300 ms; ticks keep being consumed and applied
(``marketflow_ticks_in_total`` / ``marketflow_ticks_applied_total`` grow) and the latest
price in Redis keeps advancing. After each outage the breaker closes, ``/health`` and the
database views answer 200 again, and the bars of the minutes inside the outages reach the
database (the sink retries).

Without the request timeout or the breaker the hung outage fails: a request-path query on
a stopped server waits for asyncpg's 30 s ``command_timeout`` (the client gives up after 5
s), and with the timeout but no breaker every database view would take the full 1 s
``database.request_timeout_s`` (p99 far above 300 ms).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from sql.bars_1m import upsert_bars
from tests.integration.conftest import Stack, Worker, _settings_with, until
from tests.support.private_pg import PrivatePostgres

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
P99_BOUND_S = 0.300  # the bound
CLIENT_TIMEOUT_S = 5.0  # a hang shows up as a failed request, not as a hung test
GRACE_MS = 1000
EXCHANGES = ("exchange1", "exchange2")
PAIRS = ("BTCUSDT", "ETHUSDT")
KILL_LEAD_MS = 20_000  # the kill starts this long before a minute boundary ...
PAUSE_LEAD_MS = 3_000  # ... the pause this long before it (and lasts past it)
OUTAGE_MIN_S = 5.0


def wall_ms() -> int:
    """Wall clock, UTC epoch ms (the generator stamps ticks with it)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ViewCall:
    """One GET of the loop: ``needs_db`` views answer 503 during an outage, the others
    200 (they are served without the database)."""

    name: str
    needs_db: bool
    path: Callable[[], str]


def _history_path() -> str:
    now_s = wall_ms() // 1000
    return f"/udf/history?symbol=BTCUSDT&resolution=1&from={now_s - 3600}&to={now_s}"


# Every GET view (views/__init__.py ROUTES, /openapi.json paths) that reads TimescaleDB,
# plus the Redis-served and dependency-free ones of the issue. Left out: /, /static/*,
# /docs, /openapi.json, /asyncapi.json (static documents), /replay/status (Redis only, 404
# without a replay) and /stream (a WebSocket, not a request/response view).
VIEWS: tuple[ViewCall, ...] = (
    ViewCall("latest", False, lambda: "/prices/latest/BTCUSDT"),
    ViewCall("highest 1m", False, lambda: "/prices/highest/BTCUSDT?period=1m"),
    ViewCall("average 15m", False, lambda: "/prices/average/BTCUSDT?period=15m"),
    ViewCall("ohlcv", True, lambda: "/ohlcv?symbol=BTCUSDT"),
    ViewCall("udf history", True, _history_path),
    ViewCall("udf symbols", True, lambda: "/udf/symbols?symbol=BTCUSDT"),
    ViewCall("udf time", False, lambda: "/udf/time"),
    ViewCall("health", True, lambda: "/health"),
    ViewCall("metrics", False, lambda: "/metrics"),
    ViewCall("gaps", True, lambda: "/gaps"),
    ViewCall("latest on exchange", False, lambda: "/prices/latest/exchange1/BTCUSDT"),
    ViewCall("highest 1h", True, lambda: "/prices/highest/BTCUSDT?period=1h"),
    ViewCall("lowest 24h on exchange", True,
             lambda: "/prices/lowest/exchange1/BTCUSDT?period=24h"),
    ViewCall("ohlcv 5m on exchange", True,
             lambda: "/ohlcv?symbol=BTCUSDT&exchange=exchange1&interval=5m"),
    ViewCall("udf config", True, lambda: "/udf/config"),
    ViewCall("udf search", True, lambda: "/udf/search?query=BTC"),
    ViewCall("mode", False, lambda: "/mode"),
)
HEALTH = next(v for v in VIEWS if v.name == "health")
METRICS = next(v for v in VIEWS if v.name == "metrics")


@dataclass
class Sample:
    """One request: status (None on a client error), latency (client side, s), body."""

    view: ViewCall
    path: str
    at_ms: int
    status: int | None
    latency_s: float
    body: Any
    error: str | None


async def call(http: aiohttp.ClientSession, base: str, view: ViewCall) -> Sample:
    """GET one view and time it (connect, answer and the whole body)."""
    path = view.path()
    at = wall_ms()
    t0 = time.perf_counter()
    try:
        async with http.get(base + path) as r:
            raw = await r.read()
            status: int | None = r.status
        error = None
    except (TimeoutError, aiohttp.ClientError) as exc:
        raw, status, error = b"", None, f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - t0
    body: Any
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = raw.decode(errors="replace")
    return Sample(view, path, at, status, latency, body, error)


def metric(text: str, name: str, absent: float | None = None) -> float:
    """Sum of the samples of metric ``name`` (all label sets) in a /metrics text;
    ``absent`` when it has none yet (a labelled counter before its first increment),
    ``None``: then it must be there."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        assert absent is not None, f"{name} not in /metrics"
        return absent
    return total


def p99(latencies: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def db_error_message(view: ViewCall, body: Any) -> str | None:
    """The error message of a 503 body (the API's, the UDF's or /health's shape)."""
    if not isinstance(body, dict):
        return None
    if view.name == "health":  # {"database": "down", "details": {"database": <error>}}
        if body.get("database") != "down":
            return None
        return f"database down: {body.get('details', {}).get('database')}"
    if "errmsg" in body:
        return str(body["errmsg"])
    err = body.get("error")
    return str(err.get("message")) if isinstance(err, dict) else None


def outage_violations(samples: list[Sample]) -> list[str]:
    """Every sample that breaks the outage contract (status, body, breaker state)."""
    bad = []
    for s in samples:
        want = 503 if s.view.needs_db else 200
        if s.status != want:
            bad.append(f"{s.path}: {s.status or s.error} (want {want}) "
                       f"after {s.latency_s * 1000:.0f} ms: {str(s.body)[:200]}")
            continue
        if want == 503:
            msg = db_error_message(s.view, s.body)
            if msg is None or "database" not in msg.lower():
                bad.append(f"{s.path}: 503 without a message naming the database: "
                           f"{str(s.body)[:300]}")
        if s.view.name == "health":
            state = s.body.get("breakers", {}).get("database", {}).get("state")
            if state != "open":
                bad.append(f"/health: breakers.database.state {state!r}, want 'open'")
        if s.view.name == "latest" and s.body.get("source") != "redis":
            bad.append(f"{s.path}: not from Redis: {s.body}")
    return bad


def latency_report(kind: str, samples: list[Sample]) -> str:
    """One line: count, p50, p99, max and the slowest requests."""
    lat = [s.latency_s for s in samples]
    slow = sorted(samples, key=lambda s: -s.latency_s)[:3]
    return (f"{kind}: {len(samples)} requests, p50 {sorted(lat)[len(lat) // 2] * 1000:.1f} ms"
            f", p99 {p99(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms; slowest: "
            + ", ".join(f"{s.path.split('?')[0]} {s.latency_s * 1000:.0f} ms" for s in slow))


async def run_outage(http: aiohttp.ClientSession, base: str, worker: Worker, *,
                     min_s: float, max_s: float,
                     done: Callable[[list[Sample]], bool] = lambda _: True) -> list[Sample]:
    """Call every view in turn, sequentially, for at least ``min_s`` seconds and until
    ``done(samples)`` (at most ``max_s``); the worker must stay alive."""
    start = time.monotonic()
    samples: list[Sample] = []
    while True:
        for view in VIEWS:
            samples.append(await call(http, base, view))
        worker.assert_alive()
        elapsed = time.monotonic() - start
        if elapsed >= max_s or (elapsed >= min_s and done(samples)):
            return samples


def assert_outage(kind: str, samples: list[Sample], start_ms: int,
                  before_metrics: str) -> dict[str, float]:
    """The outage contract over ``samples``; returns the figures of the report."""
    bad = outage_violations(samples)
    assert not bad, f"{kind}: {len(bad)} of {len(samples)} answers wrong:\n" + "\n".join(
        bad[:20])
    for view in VIEWS:
        n = sum(1 for s in samples if s.view is view)
        assert n >= 3, f"{kind}: {view.name} called only {n} times"
    lat = [s.latency_s for s in samples]
    assert p99(lat) < P99_BOUND_S, latency_report(kind, samples)
    # ingest never stopped: counters grow over the outage, Redis's latest price advances
    texts = [s.body for s in samples if s.view.name == "metrics"]
    for name in ("marketflow_ticks_in_total", "marketflow_ticks_applied_total"):
        series = [metric(before_metrics, name), *(metric(t, name) for t in texts)]
        assert series[-1] > series[len(series) // 2] > series[0], (kind, name, series)
    stamps = [s.body["timestamp"] for s in samples if s.view.name == "latest"]
    assert stamps[-1] > stamps[0] and stamps[-1] > start_ms, (kind, start_ms, stamps)
    return {"requests": len(samples), "p99_ms": p99(lat) * 1000,
            "max_ms": max(lat) * 1000}


async def wait_recovered(http: aiohttp.ClientSession, base: str, kind: str,
                         timeout: float = 30) -> float:
    """Poll until /health is 200 with the database breaker closed and every database
    view answers 200 again; the seconds it took."""
    t0 = time.monotonic()

    async def recovered() -> bool:
        health = await call(http, base, HEALTH)
        if health.status != 200 or health.body["breakers"]["database"]["state"] != "closed":
            return False
        for view in VIEWS:
            if view.needs_db and (await call(http, base, view)).status != 200:
                return False
        return True

    await until(recovered, timeout, f"recovery after the {kind} outage")
    return time.monotonic() - t0


async def sleep_until(at_ms: int) -> None:
    """Sleep until the wall clock reaches ``at_ms``."""
    while (left := at_ms - wall_ms()) > 0:
        await asyncio.sleep(min(left / 1000, 1.0))


async def stored_bars(pg: PrivatePostgres, bucket_ms: int) -> dict[tuple[str, str], Any]:
    """The rows of minute ``bucket_ms`` by (exchange, symbol)."""
    conn = await asyncpg.connect(pg.dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT exchange, symbol, open_ts_ms, close_ts_ms, trade_count FROM bars_1m "
            "WHERE bucket_start = to_timestamp($1::bigint / 1000.0)", bucket_ms)
    finally:
        await conn.close()
    return {(r["exchange"], r["symbol"]): r for r in rows}


@pytest.fixture
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    """A PostgreSQL + TimescaleDB cluster of the test's own, removed afterwards."""
    pg = PrivatePostgres()
    await pg.start()
    try:
        yield pg
    finally:
        pg.stop()


async def test_database_killed_and_hung_during_ingest(private_pg: PrivatePostgres,
                                                      stack: Stack) -> None:
    pg = private_pg
    stack.env["MARKETFLOW_DATABASE__DSN"] = pg.dsn
    stack.settings = _settings_with(stack.env)
    stack.dsn = pg.dsn
    assert stack.settings.database.dsn.get_secret_value() == pg.dsn
    try:
        await _scenario(stack, pg)
    finally:
        if pg.paused:  # let the worker shut down normally
            pg.resume()


async def _scenario(stack: Stack, pg: PrivatePostgres) -> None:
    worker = stack.worker(
        MARKETFLOW_FEEDS__MODE="test", MARKETFLOW_FEEDS__EXCHANGES="[]",
        MARKETFLOW_FEEDS__PAIRS=orjson.dumps(PAIRS).decode(),
        MARKETFLOW_FEEDS__GENERATOR__EXCHANGES=orjson.dumps(EXCHANGES).decode(),
        MARKETFLOW_WINDOW__GRACE_MS=str(GRACE_MS),
        MARKETFLOW_SINK__RETRY_MAX_S="1")
    worker.start()
    await worker.wait_ready()
    base = stack.base_url

    # stored history: 1-minute bars of the last hour (ending well before the live minutes)
    async def migrated() -> bool:
        conn = await asyncpg.connect(pg.dsn, timeout=5)
        try:
            return bool(await conn.fetchval("SELECT to_regclass('bars_1m') IS NOT NULL"))
        finally:
            await conn.close()

    await until(migrated, 30, "the worker's migrations in the private database")
    now = wall_ms()
    first = now - now % MINUTE_MS - 60 * MINUTE_MS
    conn = await asyncpg.connect(pg.dsn)
    try:
        await upsert_bars(conn, [{
            "exchange": "exchange1", "symbol": "BTCUSDT", "bucket_start_ms": m,
            "open": 60_000.0 + i, "high": 60_010.5 + i, "low": 59_990.25 + i,
            "close": 60_001.0 + i, "volume": 2.5, "trade_count": 10,
            "avg_price": 60_000.5 + i, "vwap": 60_000.75 + i, "open_ts_ms": m + 100,
            "close_ts_ms": m + 59_900}
            for i, m in enumerate(range(first, first + 50 * MINUTE_MS, MINUTE_MS))])
    finally:
        await conn.close()

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # every view answers 200 with the database up (ticks flowing, bars stored)
        async def all_ok() -> bool:
            return all([(await call(http, base, v)).status == 200 for v in VIEWS])

        await until(all_ok, 60, "every view 200 before the outages", step=0.5)
        baseline = [await call(http, base, v) for v in VIEWS for _ in range(3)]
        assert all(s.status == 200 for s in baseline)

        # schedule: the kill 20 s before a minute boundary, the pause 3 s before it
        boundary = wall_ms() // MINUTE_MS * MINUTE_MS + MINUTE_MS
        if boundary - KILL_LEAD_MS < wall_ms() + 500:
            boundary += MINUTE_MS
        await sleep_until(boundary - KILL_LEAD_MS)

        # ---- killed: connections reset, port closed
        before = (await call(http, base, METRICS)).body
        kill_ms = wall_ms()
        pg.kill()
        killed = await run_outage(http, base, worker, min_s=OUTAGE_MIN_S, max_s=30)
        kill_end_ms = wall_ms()
        kill_figures = assert_outage("killed", killed, kill_ms, before)
        await pg.restart()
        kill_recovery_s = await wait_recovered(http, base, "killed")

        # ---- hung: SIGSTOP across a minute boundary (its bars close while it hangs)
        if wall_ms() > boundary - PAUSE_LEAD_MS - 500:  # the kill phase ran long
            boundary = (wall_ms() + PAUSE_LEAD_MS + 500) // MINUTE_MS * MINUTE_MS + MINUTE_MS
        await sleep_until(boundary - PAUSE_LEAD_MS)
        before = (await call(http, base, METRICS)).body
        closed_before = metric(before, "marketflow_bars_closed_total", absent=0.0)

        def sink_holds_new_bars(samples: list[Sample]) -> bool:
            texts = [s.body for s in samples if s.view.name == "metrics"]
            return (metric(texts[-1], "marketflow_bars_closed_total", 0.0) > closed_before
                    and metric(texts[-1], "marketflow_sink_pending_bars") > 0)

        pause_ms = wall_ms()
        pg.pause()
        try:
            hung = await run_outage(http, base, worker, min_s=OUTAGE_MIN_S, max_s=20,
                                    done=sink_holds_new_bars)
            hung_end_ms = wall_ms()
            # the minute closed while the database hung: the sink holds its bars
            assert sink_holds_new_bars(hung), "no bar closed / pending during the pause"
        finally:
            pg.resume()
        hung_figures = assert_outage("hung", hung, pause_ms, before)
        hung_recovery_s = await wait_recovered(http, base, "hung")

    # the bars of the minutes inside the outages reach the database (the sink retried)
    kill_minute = kill_ms - kill_ms % MINUTE_MS
    pause_minute = boundary - MINUTE_MS  # closed at boundary + grace, inside the pause
    assert pause_ms < boundary + GRACE_MS < hung_end_ms
    keys = {(e, p) for e in EXCHANGES for p in PAIRS}

    async def kill_bar() -> Any:
        return (await stored_bars(pg, kill_minute)).get(("exchange1", "BTCUSDT"))

    bar = await until(kill_bar, 30, f"the bar of minute {kill_minute} (killed outage)")
    # built from ticks received before, during and after the outage
    assert bar["open_ts_ms"] <= kill_ms and bar["close_ts_ms"] >= kill_end_ms, dict(bar)

    async def pause_bars() -> bool:
        return set(await stored_bars(pg, pause_minute)) >= keys

    await until(pause_bars, 30, f"the bars of minute {pause_minute}, closed while hung")
    worker.assert_alive()
    print(f"\nkilled: {kill_figures}, recovered in {kill_recovery_s:.1f} s\n"
          f"hung:   {hung_figures}, recovered in {hung_recovery_s:.1f} s\n"
          + latency_report("killed", killed) + "\n" + latency_report("hung", hung))
