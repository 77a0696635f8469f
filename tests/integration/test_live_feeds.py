"""Live and test ingest through the real worker: exchange emulators over TCP, the runtime
mode switch (two workers, no duplicate ticks), feed outages, graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from core.config import DEFAULT_PAIRS
from core.models import decode_ticks_payload, tick_objects
from tables.window import apply_tick
from tests.integration.conftest import SAMPLE, Stack, until

pytestmark = pytest.mark.integration

MIN = 60_000


async def _feeds(stack: Stack) -> dict[str, Any]:
    status, body = await stack.http("/health")
    assert status == 200, body
    return (body.get("ingest") or {}).get("feeds", {})


async def _ticks(stack: Stack) -> list[dict[str, Any]]:
    return [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
            for t in tick_objects(decode_ticks_payload(v))
            if "control" not in t]


async def test_live_three_exchanges_with_outage_and_bad_lines(stack: Stack) -> None:
    emus = await stack.emulators(3, "--rate", "4")
    # exchange1 also sends malformed lines and an unknown symbol every 10th line
    await emus[0].stop()
    emus[0].args = ("--rate", "4", "--bad-every", "10")
    await emus[0].start()
    w = stack.worker(MARKETFLOW_WINDOW__GRACE_MS="2000").start()
    await w.wait_ready()
    assert await stack.post("/mode/live") == (200, {"mode": "live", "previous": "off"})

    # prices of 3 exchanges x 5 pairs reach Redis
    r = stack.redis()
    keys = [f"{stack.name}:latest:exchange{i}:{p}" for i in (1, 2, 3) for p in DEFAULT_PAIRS]

    async def all_prices() -> bool:
        return all(await asyncio.gather(*(r.exists(k) for k in keys)))

    await until(all_prices, 30, "15 latest prices in Redis")

    async def all_connected() -> bool:
        return {n: f["state"] for n, f in (await _feeds(stack)).items()} == {
            "exchange1": "connected", "exchange2": "connected", "exchange3": "connected"}

    await until(all_connected, 10, "three feeds connected in /health")

    # outage: kill exchange2; health shows it reconnecting, the worker keeps running
    await emus[1].stop()

    async def ex2_down() -> bool:
        return (await _feeds(stack))["exchange2"]["state"] == "reconnecting"

    await until(ex2_down, 15, "exchange2 reconnecting in /health")
    outage = await _feeds(stack)
    assert outage["exchange2"]["last_error"] and outage["exchange1"]["state"] == "connected"
    await asyncio.sleep(2)
    w.assert_alive()
    await emus[1].start()  # same port: the feed finds it again

    async def ex2_up() -> bool:
        f = (await _feeds(stack))["exchange2"]
        return f["state"] == "connected" and f["reconnects"] >= 1

    await until(ex2_up, 20, "exchange2 reconnected")

    # bars for every exchange and pair once a minute has closed
    async def bars_for_all() -> set[tuple[str, str]] | None:
        conn = await stack.db()
        try:
            rows = await conn.fetch("SELECT DISTINCT exchange, symbol FROM bars_1m")
        finally:
            await conn.close()
        got = {(x["exchange"], x["symbol"]) for x in rows}
        return got if len(got) == 15 else None

    got = await until(bars_for_all, 100, "bars for 3 exchanges x 5 pairs", step=1.0)
    assert got == {(f"exchange{i}", p) for i in (1, 2, 3) for p in DEFAULT_PAIRS}

    # every bar in the DB equals the bar recomputed from the ingested ticks (bars first:
    # each of them closed before the ticks are read, so all its ticks are in the read)
    conn = await stack.db()
    try:
        rows = await conn.fetch(
            "SELECT exchange, symbol, (extract(epoch from bucket_start)*1000)::bigint AS b, "
            "open, high, low, close, trade_count FROM bars_1m")
    finally:
        await conn.close()
    ticks = await _ticks(stack)
    assert {t["source"] for t in ticks} == {"live"}
    assert all(t["recv_ms"] >= t["ts_ms"] - 1000 for t in ticks)
    per_key: dict[tuple[str, str], dict[str, Any]] = {}
    for t in ticks:
        apply_tick(per_key.setdefault((t["exchange"], t["symbol"]), {}), t["price"],
                   t["qty"], t["ts_ms"], 0)
    expected = {(ex, sym, bar["b"]): bar for (ex, sym), bars in per_key.items()
                for bar in bars.values()}
    assert rows
    for row in rows:
        bar = expected[(row["exchange"], row["symbol"], row["b"])]
        assert (row["open"], row["high"], row["low"], row["close"], row["trade_count"]) == (
            bar["o"], bar["h"], bar["l"], bar["c"], bar["n"]), row

    # malformed lines and unknown symbols: dead-lettered, feed continued
    dead = [orjson.loads(v) for _, v in
            await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0)]
    reasons = Counter(d["reason"] for d in dead)
    assert {"invalid_json", "bad_price", "unknown_symbol", "missing_field"} <= set(reasons)
    feeds = await _feeds(stack)
    assert feeds["exchange1"]["dead_lettered"] >= 4 and feeds["exchange1"]["ignored"] >= 1
    assert feeds["exchange1"]["state"] == "connected"
    await r.aclose()
    assert w.stop() == 0, w.tail()


async def test_mode_switch_both_ways_with_two_workers(stack: Stack) -> None:
    await stack.emulators(3, "--rate", "5")
    w1 = stack.worker().start()
    port2 = str(_other_port(stack))
    w2 = stack.worker(MARKETFLOW_WEB__PORT=port2).start()
    await asyncio.gather(w1.wait_ready(), w2.wait_ready())
    await asyncio.sleep(8)  # let the group settle with both members

    # switch to test through worker 2, to live through worker 1
    assert await stack.post("/mode/test", port=int(port2)) == (
        200, {"mode": "test", "previous": "off"})
    assert (await stack.post("/mode/test"))[0] == 409

    async def ingesting(mode: str) -> Any:
        _status, body = await stack.http("/mode")
        ing = body.get("ingest") or {}
        return ing if body["mode"] == mode and ing.get("mode") == mode else None

    async def generating() -> bool:
        ing = await ingesting("test")
        return bool(ing) and ing["feeds"]["generator"]["state"] == "connected"

    await until(generating, 15, "test ingest running")
    await asyncio.sleep(3)
    status, body = await stack.post("/mode/live")
    assert (status, body) == (200, {"mode": "live", "previous": "test"})
    ing = await until(lambda: ingesting("live"), 15, "live ingest running")
    assert set(ing["feeds"]) == {"exchange1", "exchange2", "exchange3"}
    await asyncio.sleep(4)
    assert (await stack.post("/mode/live", port=int(port2)))[0] == 409
    switched_ms = int(time.time() * 1000)
    assert (await stack.post("/mode/test"))[0] == 200
    await until(lambda: ingesting("test"), 15, "test ingest again")
    test_again_ms = int(time.time() * 1000)
    await asyncio.sleep(2)

    ticks = await _ticks(stack)
    sources = Counter(t["source"] for t in ticks)
    assert sources["test"] > 0 and sources["live"] > 0
    # exactly one ingest at a time: no tick was published twice
    live = Counter((t["exchange"], t["symbol"], t["ts_ms"], t["price"]) for t in ticks
                   if t["source"] == "live")
    assert max(live.values()) == 1, [k for k, n in live.items() if n > 1][:5]
    test_ids = Counter(t["trade_id"] for t in ticks if t["source"] == "test")
    assert max(test_ids.values()) == 1
    runs: dict[str, list[int]] = {}
    for t in ticks:
        if t["source"] == "test":
            runs.setdefault(t["trade_id"].split("-")[0], []).append(t["ts_ms"])
    spans = sorted((min(v), max(v)) for v in runs.values())
    assert len(spans) == 2  # one generator per test period, never two at once
    assert spans[0][1] < spans[1][0]
    # after the switch back to test, live ticks stop before the generator starts (the
    # worker stamps both recv_ms and the generator's ts_ms): no live tick was received
    # after the switch was seen done nor after the second test period's first tick
    live_after = [t for t in ticks if t["source"] == "live"
                  and (t["recv_ms"] > spans[1][0] or t["recv_ms"] > test_again_ms)]
    assert live_after == [], (switched_ms, test_again_ms, spans[1][0], live_after[:3])
    w1.assert_alive()
    w2.assert_alive()


def _other_port(stack: Stack) -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    assert port != stack.settings.web.port
    return port


async def test_sigterm_flushes_pending_bars(stack: Stack) -> None:
    """Closed bars waiting in the sink's batch are written before the worker exits. The
    sink writes a bar at once when idle, then waits ``sink.min_flush_gap_s`` (here 600 s,
    and the 600 s backstop) before the next batch: the minute closed by idleness after
    the replay arrives later than the first flush and waits, until SIGTERM."""
    w = stack.worker(MARKETFLOW_SINK__FLUSH_INTERVAL_S="600",
                     MARKETFLOW_SINK__MIN_FLUSH_GAP_S="600",
                     MARKETFLOW_SINK__BATCH_SIZE="100000").start()
    await w.wait_ready()
    await stack.replay_cli(
        "--namespace", "",
        str(SAMPLE / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"))

    async def all_closed() -> bool:
        _status, text = await stack.http("/metrics")
        closed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("marketflow_bars_closed_total{"))
        return closed >= 6  # 23:54 .. 23:59

    await until(all_closed, 60, "6 bars closed")

    async def all_at_the_sink() -> tuple[float, int] | None:
        _status, text = await stack.http("/metrics")
        held = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("marketflow_sink_pending_bars "))
        written = len(await stack.bars("binance-usdm", "BTCUSDT"))
        # the first bar found the sink idle (written at once); the later ones wait
        return (held, written) if held >= 1 and written >= 1 and held + written >= 6 else None

    await until(all_at_the_sink, 30, "6 bars at the sink: some written, some held")
    t0 = time.monotonic()
    assert w.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    bars = await stack.bars("binance-usdm", "BTCUSDT")
    assert len(bars) == 6 and sum(b["trade_count"] for b in bars.values()) == 21_313
