"""Idempotency: replaying a file twice, or killing the worker mid-replay, leaves exactly
one row per bar with the exchange's values."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from core.config import DEFAULT_PAIRS
from core.models import decode_ticks_payload, tick_objects
from tables.window import apply_tick
from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
    until,
)

pytestmark = pytest.mark.integration

USDM = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
KLINES = "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"


async def _row_counts(stack: Stack) -> list[tuple[str, str, int, int]]:
    conn = await stack.db()
    try:
        rows = await conn.fetch(
            "SELECT exchange, symbol, (extract(epoch from bucket_start)*1000)::bigint AS m, "
            "count(*) AS n FROM bars_1m GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    finally:
        await conn.close()
    return [(r["exchange"], r["symbol"], r["m"], r["n"]) for r in rows]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_replaying_twice_leaves_one_row_per_bar(stack: Stack, guarantee: str) -> None:
    """The second replay of a file is late: every tick is dead-lettered (under
    ``exactly_once`` inside the transaction of the tick's message, read back with
    ``read_committed``), and every bar stays one row with the exchange's values."""
    stack.env["MARKETFLOW_APP__PROCESSING_GUARANTEE"] = guarantee
    klines = load_klines(KLINES)
    minutes, rows = complete_minutes(USDM, klines)
    all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", str(SAMPLE / "trades" / USDM))
    await stack.wait_for_bars("binance-usdm", "BTCUSDT", all_minutes)
    await stack.replay_cli("--namespace", "", str(SAMPLE / "trades" / USDM))
    # the second pass is entirely late: every tick is dead-lettered with reason "late"
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        dead = await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0,
                                      committed=True)
        if len(dead) >= len(rows) or asyncio.get_running_loop().time() > deadline:
            break
    assert len(dead) == len(rows)
    assert {orjson.loads(v)["reason"] for _, v in dead} == {"late"}
    counts = await _row_counts(stack)
    assert {n for *_, n in counts} == {1}
    assert {m for _, _, m, _ in counts} == all_minutes
    w.assert_alive()
    bars = await stack.bars("binance-usdm", "BTCUSDT")
    assert_bars_equal_klines(bars, klines, minutes)
    assert sum(b["trade_count"] for b in bars.values()) == len(rows)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_sigkill_mid_replay_gives_identical_bars(stack: Stack, guarantee: str) -> None:
    """SIGKILL the worker while it consumes; the restarted worker recovers the windows from
    the changelog, re-reads uncommitted messages without double counting, and every bar is
    written once with the exchange's values; with Faust's default at-least-once processing
    and with ``exactly_once`` (Kafka transactions)."""
    stack.env["MARKETFLOW_APP__PROCESSING_GUARANTEE"] = guarantee
    klines = load_klines(KLINES)
    minutes, rows = complete_minutes(USDM, klines)
    all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
    w = stack.worker().start()
    await w.wait_ready()
    # 6 minutes of trades at 30x: ~12 s of replay, small batches -> many messages
    replay = asyncio.create_task(stack.replay_cli(
        "--namespace", "", "--speed", "30", "--batch-span-ms", "200",
        str(SAMPLE / "trades" / USDM)))
    await asyncio.sleep(6)
    assert not replay.done()
    w.kill()
    got_before_kill = await stack.bars("binance-usdm", "BTCUSDT")
    w2 = stack.worker().start()
    await w2.wait_ready()
    await replay
    bars = await stack.wait_for_bars("binance-usdm", "BTCUSDT", all_minutes)
    assert len(got_before_kill) < len(all_minutes)  # the kill really was mid-replay
    assert set(bars) == all_minutes
    assert {n for *_, n in await _row_counts(stack)} == {1}
    assert_bars_equal_klines(bars, klines, minutes)
    assert sum(b["trade_count"] for b in bars.values()) == len(rows)
    dead = await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0)
    assert dead == []  # nothing was late or lost


async def test_live_ingest_and_idle_close_with_exactly_once(stack: Stack) -> None:
    """With ``exactly_once``, ticks the worker's own ingest publishes and its idle checks
    are written outside transactions (docs/broker.md#processing-guarantees): a
    ``read_committed`` agent sees them at once, so live prices reach Redis, and once the
    feed goes quiet every open minute closes by idleness and is stored, equal to the bar
    recomputed from the ticks on the topic."""
    stack.env["MARKETFLOW_APP__PROCESSING_GUARANTEE"] = "exactly_once"
    emus = await stack.emulators(1, "--rate", "10")
    w = stack.worker().start()
    await w.wait_ready()
    assert (await stack.post("/mode/live"))[0] == 200
    r = stack.redis()
    keys = [f"{stack.name}:latest:exchange1:{p}" for p in DEFAULT_PAIRS]

    async def all_prices() -> bool:
        return all(await asyncio.gather(*(r.exists(k) for k in keys)))

    await until(all_prices, 30, "5 latest prices in Redis")
    await r.aclose()
    await emus[0].stop()  # the feed goes quiet: only the idle close can end its minutes

    async def expected_bars() -> dict[str, dict[str, Any]]:
        ticks = [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
                 for t in tick_objects(decode_ticks_payload(v))
                 if "control" not in t]
        per_key: dict[str, dict[str, Any]] = {}
        for t in ticks:
            apply_tick(per_key.setdefault(t["symbol"], {}), t["price"], t["qty"], t["ts_ms"], 0)
        return per_key

    # twice: the second read, taken once the bars are stored, also has any tick that was
    # still in the publisher's buffer during the first. The last minute closes once it is
    # over (up to 60 s after the feed stopped), plus the grace and the idle timeout.
    for _ in range(2):
        per_key = await expected_bars()
        assert set(per_key) == set(DEFAULT_PAIRS)
        stored = {symbol: await stack.wait_for_bars(
                      "exchange1", symbol, {bar["b"] for bar in expected.values()},
                      timeout=120)
                  for symbol, expected in per_key.items()}
    for symbol, expected in per_key.items():
        assert set(stored[symbol]) == {bar["b"] for bar in expected.values()}
        for bar in expected.values():
            row = stored[symbol][bar["b"]]
            assert (row["open"], row["high"], row["low"], row["close"], row["trade_count"]) \
                == (bar["o"], bar["h"], bar["l"], bar["c"], bar["n"]), (symbol, row)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    assert w.stop() == 0, w.tail()
