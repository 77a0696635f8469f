"""Idempotency: replaying a file twice, or killing the worker mid-replay, leaves exactly
one row per bar with the exchange's values."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
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


async def test_replaying_twice_leaves_one_row_per_bar(stack: Stack) -> None:
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
        dead = await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0)
        if len(dead) >= len(rows) or asyncio.get_running_loop().time() > deadline:
            break
    assert len(dead) == len(rows)
    assert {orjson.loads(v)["reason"] for _, v in dead} == {"late"}
    counts = await _row_counts(stack)
    assert {n for *_, n in counts} == {1}
    assert {m for _, _, m, _ in counts} == all_minutes
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
