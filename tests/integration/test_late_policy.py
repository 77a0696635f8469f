"""Late ticks through a real worker: ``window.late_policy = correct`` re-emits and upserts
the corrected bar; the default ``dead_letter`` sends the same tick to the dead-letter topic.
Duplicate trade ids are counted once."""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

T0 = 1_723_161_300_000  # 2024-08-08T23:55:00Z
MIN = 60_000
KEY = b"binance:BTCUSDT"


def _tick(ts_ms: int, price: float, trade_id: int, qty: float = 1.0) -> dict[str, Any]:
    return {"exchange": "binance", "symbol": "BTCUSDT", "price": price, "qty": qty,
            "ts_ms": ts_ms, "trade_id": str(trade_id), "source": "test"}


#: minute T0: 3 trades (one repeated trade id), minute T0+1: 1 trade; both close by idleness
FIRST = [_tick(T0 + 1_000, 100.0, 1), _tick(T0 + 2_000, 110.0, 2),
         _tick(T0 + 2_000, 110.0, 2),  # the feed re-sent trade 2: counted once
         _tick(T0 + 30_000, 105.0, 3), _tick(T0 + MIN + 1_000, 106.0, 4)]
#: arrives after T0 closed: a new high and a new close for T0
LATE = _tick(T0 + 50_000, 120.0, 5, qty=2.0)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _wait_row(stack: Stack, pred: Any, timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        for w in stack.workers:
            w.assert_alive()
        row = (await stack.bars("binance", "BTCUSDT")).get(T0)
        if row is not None and pred(row):
            return row
        await asyncio.sleep(0.3)
    raise AssertionError(f"bar {T0} not as expected after {timeout}s: {row and dict(row)}")


async def _ohlcv_t0(stack: Stack) -> dict[str, Any]:
    status, body = await stack.http(
        f"/ohlcv?symbol=BTCUSDT&exchange=binance&start={T0}&end={T0 + 2 * MIN}")
    assert status == 200, body
    return next(b for b in body["bars"] if b["bucket_start_ms"] == T0)


async def test_correct_policy_upserts_and_re_emits_the_corrected_bar(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_WINDOW__LATE_POLICY="correct").start()
    await w.wait_ready()
    await stack.produce_raw([(KEY, orjson.dumps(FIRST))])
    row = await _wait_row(stack, lambda r: True)
    assert (row["open"], row["high"], row["close"], row["trade_count"]) == (100.0, 110.0,
                                                                          105.0, 3)
    await stack.wait_for_bars("binance", "BTCUSDT", {T0 + MIN})
    before = await _ohlcv_t0(stack)  # also fills the sealed-range cache
    assert (before["high"], before["trade_count"]) == (110.0, 3)

    await stack.produce_raw([(KEY, orjson.dumps(LATE))])
    row = await _wait_row(stack, lambda r: r["trade_count"] == 4)
    assert (row["open"], row["high"], row["low"], row["close"]) == (100.0, 120.0, 100.0,
                                                                   120.0)
    assert row["volume"] == Decimal("5")

    bars = [orjson.loads(v) for _, v in await stack.read_topic(stack.settings.topics.bars)]
    t0 = [b for b in bars if b["bucket_start_ms"] == T0]
    assert [(b["trade_count"], b.get("correction", False)) for b in t0] == [(3, False),
                                                                           (4, True)]
    assert t0[1]["high"] == 120.0 and t0[1]["close"] == 120.0

    deadline = time.monotonic() + 15
    while (after := await _ohlcv_t0(stack))["trade_count"] != 4:
        assert time.monotonic() < deadline, after  # the cached range was invalidated
        await asyncio.sleep(0.3)
    assert (after["high"], after["close"]) == (120.0, 120.0)

    status, metrics = await stack.http("/metrics")
    assert status == 200
    assert _metric(metrics, "marketflow_corrections_total") == 1.0
    assert _metric(metrics, "marketflow_duplicate_trades_total") == 1.0
    assert 'marketflow_bars_closed_total{trigger="correction"} 1.0' in metrics
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w.assert_alive()


async def test_default_policy_dead_letters_the_same_late_tick(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    await stack.produce_raw([(KEY, orjson.dumps(FIRST))])
    await _wait_row(stack, lambda r: True)
    await stack.wait_for_bars("binance", "BTCUSDT", {T0 + MIN})
    await stack.produce_raw([(KEY, orjson.dumps(LATE))])

    deadline = time.monotonic() + 30
    while not (dead := [orjson.loads(v) for _, v in await stack.read_topic(
            stack.settings.topics.dead_letter, idle_s=1.0)]):
        assert time.monotonic() < deadline, "late tick not dead-lettered"
        w.assert_alive()
    assert [(d["reason"], d["payload"]["ts_ms"], d["payload"]["price"]) for d in dead] == [
        ("late", LATE["ts_ms"], 120.0)]
    assert dead[0]["detail"] == f"window {T0} already closed"
    row = (await stack.bars("binance", "BTCUSDT"))[T0]
    assert (row["high"], row["close"], row["trade_count"]) == (110.0, 105.0, 3)
    bars = [orjson.loads(v) for _, v in await stack.read_topic(stack.settings.topics.bars)]
    assert [b["trade_count"] for b in bars if b["bucket_start_ms"] == T0] == [3]
    status, metrics = await stack.http("/metrics")
    assert status == 200
    assert _metric(metrics, "marketflow_corrections_total") == 0.0
    assert _metric(metrics, "marketflow_late_ticks_total") == 1.0
    assert 'marketflow_dead_lettered_ticks_total{reason="late"} 1.0' in metrics
    w.assert_alive()
