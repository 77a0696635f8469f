"""Highest / lowest / average over periods through the real worker, against brute force
over the ingested ticks at the documented bounds."""

from __future__ import annotations

import pytest

from core.models import decode_ticks_payload, tick_objects
from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration


async def test_period_statistics_match_brute_force(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    files = [SAMPLE / "trades" / "binance_spot_btcusdt_2024-08-08T2354_trades.csv",
             SAMPLE / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"]
    # re-stamped so the trades end about now: 60x -> the 11 minutes fit in ~11 s of event time
    await stack.replay_cli("--speed", "60", "--rebase-now", "--batch-span-ms", "200",
                           *map(str, files))
    ticks = [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
             for t in tick_objects(decode_ticks_payload(v))
             if "control" not in t]
    assert len(ticks) > 40_000
    for path, exchange in [("/prices/{stat}/BTCUSDT", None),
                           ("/prices/{stat}/binance/BTCUSDT", "binance")]:
        for period in ("1s", "3s", "5s", "10s", "30s", "1m", "5m", "15m"):
            for stat in ("highest", "lowest", "average"):
                status, body = await stack.http(path.format(stat=stat) + f"?period={period}")
                assert status == 200, body
                prices = [t["price"] for t in ticks
                          if body["from"] <= t["ts_ms"] <= body["to"]
                          and exchange in (None, t["exchange"])]
                assert body["count"] == len(prices), (period, stat, exchange)
                assert body["granularity"] == "second"
                if not prices:
                    assert body["price"] is None
                    continue
                want = {"highest": max(prices), "lowest": min(prices),
                        "average": sum(prices) / len(prices)}[stat]
                assert body["price"] == pytest.approx(want, rel=1e-12), (period, stat)
    # a long period combines stored minutes with the recent seconds (minute granularity)
    status, body = await stack.http("/prices/highest/BTCUSDT?period=1h")
    assert status == 200 and body["granularity"] == "minute"
    assert body["price"] == max(t["price"] for t in ticks if t["ts_ms"] >= body["from"])
    for path, want in [("/prices/highest/NOSUCH", 404), ("/prices/average/kraken/BTCUSDT", 404),
                       ("/prices/highest/BTCUSDT?period=5x", 400),
                       ("/prices/highest/BTCUSDT?period=40d", 400),
                       ("/prices/median/BTCUSDT", 400),
                       ("/prices/highest/BTCUSDT?foo=1", 400)]:
        status, body = await stack.http(path)
        assert status == want, (path, body)
    status, body = await stack.http("/prices/latest/BTCUSDT")
    assert (status == 200 and body["price"] == ticks[-1]["price"]) or status == 200
