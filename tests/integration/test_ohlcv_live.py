"""The still-open bucket joins the stored bars without gap or overlap."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from core.models import decode_ticks_payload, tick_objects
from tests.integration.conftest import Stack, until

pytestmark = pytest.mark.integration


async def test_live_bucket_joins_stored_bars(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_FEEDS__EXCHANGES="[]", MARKETFLOW_WINDOW__GRACE_MS="1000",
                     MARKETFLOW_FEEDS__GENERATOR__RATE_PER_S="300").start()
    await w.wait_ready()
    t0 = int(time.time() * 1000)
    assert (await stack.post("/mode/test"))[0] == 200
    q = (f"/ohlcv?symbol=BTCUSDT&exchange=exchange1&interval=1m&start={t0}"
         f"&end={t0 + 10 * 60_000}")
    # while ticks keep arriving: wait until at least one minute is stored and one is live
    deadline = time.monotonic() + 100
    while True:
        status, body = await stack.http(q)
        if status == 404:  # no tick of the pair seen yet
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.5)
            continue
        assert status == 200, body
        bars = body["bars"]
        starts = [b["bucket_start_ms"] for b in bars]
        assert starts == sorted(set(starts))  # each minute once
        assert all(b - a == 60_000 for a, b in itertools.pairwise(starts))  # no gap
        if len(bars) >= 2 and bars[0]["closed"] and not bars[-1]["closed"]:
            stored = await stack.bars("exchange1", "BTCUSDT")
            if bars[0]["bucket_start_ms"] in stored:
                break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(1.0)
    assert [b["closed"] for b in bars[:-1]] == [True] * (len(bars) - 1)

    # freeze ingest (live mode with no exchange configured) and compare views with the ticks
    assert (await stack.post("/mode/live"))[0] == 200

    async def generator_stopped() -> bool:
        _status, body = await stack.http("/mode")
        return body["mode"] == "live" and (body.get("ingest") or {}).get("mode") == "live"

    await until(generator_stopped, 15, "ingest switched to live (the generator stopped)")

    async def views_caught_up() -> tuple[list[dict[str, Any]], Any, Any] | None:
        """The ticks topic and both views once the views count every tick of the topic
        (the worker may still be applying the generator's last ticks)."""
        ticks = [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
                 for t in tick_objects(decode_ticks_payload(v))
                 if "control" not in t
                 and t["exchange"] == "exchange1" and t["symbol"] == "BTCUSDT"]
        _, one_min = await stack.http(q)
        _, hour = await stack.http(q.replace("interval=1m", "interval=1h"))
        counts = {sum(b["trade_count"] for b in one_min["bars"]),
                  sum(b["trade_count"] for b in hour["bars"])}
        return (ticks, one_min, hour) if counts == {len(ticks)} else None

    ticks, one_min, hour = await until(views_caught_up, 30,
                                       "the views counting every tick of the topic")
    assert sum(b["trade_count"] for b in one_min["bars"]) == len(ticks)
    assert sum(b["trade_count"] for b in hour["bars"]) == len(ticks)
    assert max(b["high"] for b in hour["bars"]) == max(t["price"] for t in ticks)
    assert min(b["low"] for b in hour["bars"]) == min(t["price"] for t in ticks)
    newest = max(t["ts_ms"] for t in ticks)
    last = [t for t in ticks if t["ts_ms"] == newest][-1]  # ties: the later arrival closes
    assert hour["bars"][-1]["close"] == last["price"]

    # /udf/history serves the same series, the still-open bucket included
    m0 = t0 - t0 % 60_000
    status, udf = await stack.http(f"/udf/history?symbol=exchange1:BTCUSDT&resolution=1"
                                   f"&from={m0 // 1000}&to={(t0 + 10 * 60_000) // 1000}")
    assert status == 200 and udf["s"] == "ok", udf
    assert udf["t"] == [b["bucket_start_ms"] // 1000 for b in one_min["bars"]]
    for field, col in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c"),
                       ("volume", "v")):
        assert udf[col] == [b[field] for b in one_min["bars"]], field
    assert udf["t"][-1] * 1000 == newest - newest % 60_000
    status, udf_cb = await stack.http(f"/udf/history?symbol=exchange1:BTCUSDT&resolution=1"
                                      f"&from=0&to={(t0 + 10 * 60_000) // 1000}&countback=2")
    assert status == 200 and udf_cb["t"] == udf["t"][-2:], udf_cb
    assert udf_cb["c"] == udf["c"][-2:]
