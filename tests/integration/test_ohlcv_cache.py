"""The read-through cache of sealed ``/ohlcv`` ranges: hits answer exactly what the
database holds, and a rewritten old bar (a correction) is never served stale."""

from __future__ import annotations

import asyncio
import csv
import time
from decimal import Decimal

import orjson
import pytest

from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration

FILE = "binance_spot_btcusdt_2024-08-08T2354_trades.csv"


async def _cache_count(stack: Stack, result: str) -> float:
    status, text = await stack.http("/metrics")
    assert status == 200
    want = f'marketflow_ohlcv_cache_requests_total{{result="{result}"}} '
    for line in str(text).splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


async def test_sealed_range_cached_then_invalidated_by_correction(stack: Stack) -> None:
    with (SAMPLE / "trades" / FILE).open() as fh:
        minutes = sorted({int(r["ts_ms"]) - int(r["ts_ms"]) % 60_000
                          for r in csv.DictReader(fh)})
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", str(SAMPLE / "trades" / FILE))
    stored = await stack.wait_for_bars("binance", "BTCUSDT", set(minutes))
    lo, hi = minutes[0], minutes[-1] + 60_000
    per_ex = f"/ohlcv?symbol=BTCUSDT&exchange=binance&start={lo}&end={hi}"
    hourly = f"/ohlcv?symbol=BTCUSDT&interval=1h&start={lo}&end={hi}"

    status, first = await stack.http(per_ex)
    assert status == 200
    assert [b["bucket_start_ms"] for b in first["bars"]] == minutes
    assert [b["high"] for b in first["bars"]] == [stored[m]["high"] for m in minutes]
    _, hourly_first = await stack.http(hourly)
    # fill=none is serialised by PostgreSQL, fill=previous in Python: with every minute
    # traded both must give the same bars, field by field
    for path in (per_ex, hourly):
        _, by_pg = await stack.http(path)
        _, by_py = await stack.http(path + "&fill=previous")
        assert by_pg["bars"] and by_py["bars"] == by_pg["bars"]

    hits = await _cache_count(stack, "hit")
    status, second = await stack.http(per_ex)
    assert status == 200 and second == first
    assert await _cache_count(stack, "hit") == hits + 1
    r = stack.redis()
    try:
        cached = [k async for k in r.scan_iter(f"{stack.name}:ohlcv:BTCUSDT:*")]
    finally:
        await r.aclose()
    assert len(cached) == 4  # per-exchange 1m and consolidated 1h, each fill none/previous

    # A correction of the first minute arrives on the closed-bars topic (as a re-emitted
    # bar would): the sink rewrites the old row and must invalidate the cached ranges.
    m0 = minutes[0]
    row = stored[m0]
    corrected = {
        "exchange": "binance", "symbol": "BTCUSDT", "bucket_start_ms": m0,
        "bucket_end_ms": m0 + 60_000, "open": row["open"], "high": row["high"] + 1000.0,
        "low": row["low"], "close": row["close"], "volume": str(row["volume"] + Decimal("1.5")),
        "trade_count": row["trade_count"] + 1, "avg_price": row["avg_price"],
        "min_price": row["low"], "max_price": row["high"] + 1000.0, "vwap": str(row["vwap"]),
        "open_ts_ms": row["open_ts_ms"], "close_ts_ms": row["close_ts_ms"]}
    await stack.produce_raw([(b"binance:BTCUSDT", orjson.dumps(corrected))],
                            topic=stack.settings.topics.bars)
    deadline = time.monotonic() + 30
    while (await stack.bars("binance", "BTCUSDT"))[m0]["trade_count"] != corrected[
            "trade_count"]:
        assert time.monotonic() < deadline, "correction not written"
        await asyncio.sleep(0.2)

    deadline = time.monotonic() + 10
    while True:  # the invalidation follows the commit within the same flush
        status, third = await stack.http(per_ex)
        assert status == 200
        if third["bars"][0]["high"] == corrected["high"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert third["bars"][0]["high"] == corrected["high"]
    assert third["bars"][0]["trade_count"] == corrected["trade_count"]
    assert third["bars"][1:] == first["bars"][1:]
    _, hourly_third = await stack.http(hourly)
    assert (hourly_third["bars"][0]["trade_count"]
            == hourly_first["bars"][0]["trade_count"] + 1)
    assert hourly_third["bars"][0]["high"] == max(
        hourly_first["bars"][0]["high"], corrected["high"])
