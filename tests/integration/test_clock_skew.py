"""Watermark per event-time source (issue 13, item 3) through a real worker: two live
marketflow exchange feeds on the same partition whose clocks differ by 30 s.

Two tiny exchange programs (:class:`SkewedExchanges`, the marketflow exchange protocol:
newline-delimited JSON ``{"symbol","price","timestamp"}`` over TCP, one connection per
exchange) serve a known, seeded tick sequence: at every instant the ``behind`` exchange
stamps its trades 30 s earlier than the ``ahead`` one, both over the same minutes, in
event-time order per exchange. Event time lies 10 minutes in the past and runs 20x faster
than the wall clock, so four minutes of trades take ~12 s; the last windows close by
idleness. The ticks topic has a single partition, so both exchanges' keys share it.

With the default 5 s grace and a watermark per partition *and exchange*
(:mod:`tables.aggregator`) nothing is late and every bar of both exchanges equals the bar
computed here from the served ticks. With one watermark per partition the ``behind``
exchange's ticks would trail the partition's highest timestamp by ~30 s > grace: those in
the last ~25 s of each of its minutes would be dead-lettered as ``late`` and its bars would
miss them, which this test reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import orjson
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

MIN = 60_000
SKEW_MS = 30_000  # the "behind" exchange's clock lags the "ahead" one by this much
STEP_MS = 250  # event time between two trades of one symbol
SPAN_MS = 4 * MIN  # event time each exchange covers
SPEEDUP = 20  # event time runs this many times faster than the wall clock
SYMBOLS = ("BTCUSDT", "ETHUSDT")
AHEAD, BEHIND = "skew-ahead", "skew-behind"


@dataclass
class ServedTick:
    """One trade line as an exchange served it."""

    symbol: str
    price: float
    ts_ms: int


def tick_plan(m0: int, seed: int = 13) -> list[dict[str, list[ServedTick]]]:
    """The trades to serve, one entry per emission step.

    Args:
        m0: the ``behind`` exchange's first timestamp (a minute start, UTC epoch ms).
        seed: seed of the prices' random walk.

    Returns:
        Per step, ``exchange -> trades sent at that instant``: for each symbol one trade at
        ``m0 + k * STEP_MS`` on ``behind`` and at that time ``+ SKEW_MS`` on ``ahead``, each
        with its own seeded random-walk price (2 decimals).
    """
    rng = random.Random(seed)
    price = {(ex, s): p for ex in (AHEAD, BEHIND)
             for s, p in zip(SYMBOLS, (60_000.0, 3_000.0), strict=True)}
    steps = []
    for k in range(SPAN_MS // STEP_MS):
        step: dict[str, list[ServedTick]] = {}
        for ex, ts in ((AHEAD, m0 + SKEW_MS + k * STEP_MS), (BEHIND, m0 + k * STEP_MS)):
            for s in SYMBOLS:
                p = price[(ex, s)] = round(price[(ex, s)] * (1 + rng.gauss(0, 5e-4)), 2)
                step.setdefault(ex, []).append(ServedTick(s, p, ts))
        steps.append(step)
    return steps


@dataclass
class _Exchange:
    name: str
    server: asyncio.Server | None = None
    writer: asyncio.StreamWriter | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0
    served: list[ServedTick] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


class SkewedExchanges:
    """Marketflow exchange programs on free local ports that serve :func:`tick_plan` once.

    Use as ``async with``; :meth:`serve` waits until every exchange has a client, then
    writes the steps paced at ``SPEEDUP`` x real time (late steps go out at once) to the
    current client of each exchange and records what it wrote in ``served``. Clients are
    never read from (the protocol is one-way); a new connection replaces the previous one.

    Args:
        plan: the steps to serve (:func:`tick_plan`).
    """

    def __init__(self, plan: list[dict[str, list[ServedTick]]]) -> None:
        self.plan = plan
        self.exchanges = {name: _Exchange(name) for name in (AHEAD, BEHIND)}

    async def __aenter__(self) -> SkewedExchanges:
        for ex in self.exchanges.values():
            ex.server = await asyncio.start_server(partial(self._client, ex), "127.0.0.1", 0)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for ex in self.exchanges.values():
            if ex.writer is not None:
                ex.writer.close()
            if ex.server is not None:
                ex.server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ex.server.wait_closed(), 5)

    async def _client(self, ex: _Exchange, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        ex.connections += 1
        ex.writer = writer
        ex.connected.set()
        with contextlib.suppress(OSError):
            while await reader.read(4096):  # discard; returns b"" at EOF
                pass

    def feeds_env(self) -> str:
        """``MARKETFLOW_FEEDS__EXCHANGES`` pointing the worker at these exchanges."""
        return orjson.dumps([{"name": ex.name, "host": "127.0.0.1", "port": ex.port}
                             for ex in self.exchanges.values()]).decode()

    async def serve(self, connect_timeout_s: float = 60) -> None:
        """Serve every step of the plan (see the class docstring)."""
        await asyncio.wait_for(
            asyncio.gather(*(ex.connected.wait() for ex in self.exchanges.values())),
            connect_timeout_s)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for k, step in enumerate(self.plan):
            delay = start + k * STEP_MS / 1000 / SPEEDUP - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for name, ticks in step.items():
                ex = self.exchanges[name]
                assert ex.writer is not None
                ex.writer.write(b"".join(
                    orjson.dumps({"symbol": t.symbol, "price": t.price,
                                  "timestamp": t.ts_ms}) + b"\n" for t in ticks))
                ex.served += ticks
            for ex in self.exchanges.values():
                assert ex.writer is not None
                await ex.writer.drain()


def expected_bars(ticks: list[ServedTick]) -> dict[tuple[str, int], dict[str, Any]]:
    """1-minute bars of one exchange's served ticks: tumbling windows ``[start, start +
    60 s)`` keyed ``(symbol, bucket start)`` in UTC epoch ms; open/close are the prices of
    the earliest/latest trade, volume 0 (the protocol carries no quantity)."""
    groups: dict[tuple[str, int], list[ServedTick]] = {}
    for t in ticks:
        groups.setdefault((t.symbol, t.ts_ms // MIN * MIN), []).append(t)
    out = {}
    for key, group in groups.items():
        first = min(group, key=lambda t: t.ts_ms)
        last = max(group, key=lambda t: t.ts_ms)
        prices = [t.price for t in group]
        out[key] = {"open": first.price, "high": max(prices), "low": min(prices),
                    "close": last.price, "volume": 0.0, "trade_count": len(group),
                    "avg_price": sum(prices) / len(prices), "open_ts_ms": first.ts_ms,
                    "close_ts_ms": last.ts_ms}
    return out


def _metric(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _late_metrics(stack: Stack) -> tuple[float, float]:
    status, text = await stack.http("/metrics")
    assert status == 200
    return (_metric(text, "marketflow_late_ticks_total"),
            _metric(text, 'marketflow_dead_lettered_ticks_total{reason="late"}'))


async def _feeds(stack: Stack) -> dict[str, Any]:
    status, body = await stack.http("/health")
    assert status in (200, 503), body
    return dict((body.get("ingest") or {}).get("feeds", {}))


async def test_two_feeds_30s_apart_on_one_partition_no_late_ticks(stack: Stack) -> None:
    m0 = int(time.time() * 1000) // MIN * MIN - 10 * MIN
    plan = tick_plan(m0)
    async with SkewedExchanges(plan) as exchanges:
        stack.env["MARKETFLOW_TOPICS__PARTITIONS"] = "1"
        w = stack.worker(MARKETFLOW_FEEDS__EXCHANGES=exchanges.feeds_env(),
                         MARKETFLOW_WINDOW__GRACE_MS="5000",
                         # no reconnect while one feed waits for the other, or at the end
                         MARKETFLOW_FEEDS__IDLE_TIMEOUT_S="120",
                         # only a stall this long between two lines could close a window
                         MARKETFLOW_WINDOW__IDLE_TIMEOUT_S="6").start()
        await w.wait_ready()
        ticks_topic = stack.settings.topics.ticks
        assert len(await stack.partitions(ticks_topic)) == 1  # both exchanges share it
        late0 = await _late_metrics(stack)
        assert (await stack.post("/mode/live"))[0] == 200
        await asyncio.wait_for(exchanges.serve(), 90)
        served = {name: ex.served for name, ex in exchanges.exchanges.items()}

        # the premise: same minutes, clocks SKEW_MS apart at every instant
        minutes = {name: {t.ts_ms // MIN * MIN for t in ts} for name, ts in served.items()}
        assert minutes[BEHIND] <= minutes[AHEAD]
        for step in plan:
            assert step[AHEAD][0].ts_ms - step[BEHIND][0].ts_ms == SKEW_MS

        want = {name: expected_bars(ts) for name, ts in served.items()}
        for name, bars in want.items():
            for sym in SYMBOLS:
                await stack.wait_for_bars(name, sym, {b for s, b in bars if s == sym}, 60)

        # every served line was received on the first connection and none was rejected
        feeds = await _feeds(stack)
        for name, ex in exchanges.exchanges.items():
            f = feeds[name]
            assert ex.connections == 1 and f["reconnects"] == 0, (name, f)
            assert f["messages"] == len(ex.served) and f["dead_lettered"] == 0, (name, f)

    # no late tick: neither counted nor dead-lettered
    assert await _late_metrics(stack) == late0 == (0.0, 0.0)
    dead = [orjson.loads(v) for _, v in
            await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0)]
    assert [d for d in dead if d["reason"] == "late"] == [], dead[:3]
    assert dead == [], dead[:3]

    # every bar of both exchanges equals the bar of the served ticks, none missing or extra
    for name, bars in want.items():
        for sym in SYMBOLS:
            rows = await stack.bars(name, sym)
            mine = {b: bar for (s, b), bar in bars.items() if s == sym}
            assert set(rows) == set(mine), (name, sym, sorted(set(rows) ^ set(mine)))
            for b, bar in mine.items():
                row = rows[b]
                got = {f: row[f] for f in bar if f != "avg_price"}
                assert got == {f: v for f, v in bar.items() if f != "avg_price"}, (
                    name, sym, b, got, bar)
                assert row["avg_price"] == pytest.approx(bar["avg_price"], rel=1e-12)
                assert row["vwap"] is None  # no quantity, no VWAP
            # the API serves the same bars
            status, body = await stack.http(
                f"/ohlcv?exchange={name}&symbol={sym}&start={m0 - MIN}&end={m0 + 10 * MIN}")
            assert status == 200, body
            api = {x["bucket_start_ms"]: x for x in body["bars"]}
            assert set(api) == set(mine), (name, sym)
            for b, bar in mine.items():
                assert (api[b]["open"], api[b]["high"], api[b]["low"], api[b]["close"],
                        api[b]["trade_count"], api[b]["closed"]) == (
                    bar["open"], bar["high"], bar["low"], bar["close"],
                    bar["trade_count"], True), (name, sym, b)
    w.assert_alive()
