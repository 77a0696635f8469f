"""CryptoCompare trades through the real worker, against a local server speaking the
documented streamer protocol (the machine has no internet)."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.models import decode_ticks_payload, tick_objects
from tests.integration.conftest import Stack
from tests.support.cc_server import CryptoCompareServer, make_trade

pytestmark = pytest.mark.integration


async def test_cryptocompare_trades_become_ticks_and_survive_a_drop(stack: Stack) -> None:
    async with CryptoCompareServer(api_key="k-123") as server:
        w = stack.worker(
            MARKETFLOW_FEEDS__EXCHANGES="[]",
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__ENABLED="true",
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__URL=server.url,
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__API_KEY="k-123",
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__SUBS='["0~Coinbase~BTC~USD","0~Kraken~ETH~USD"]',
        ).start()
        await w.wait_ready()
        assert (await stack.post("/mode/live"))[0] == 200
        await server.wait_loaded(1, timeout_s=20)
        assert server.subscription_messages[0][0]["subs"] == [
            "0~Coinbase~BTC~USD", "0~Kraken~ETH~USD"]
        now_s = int(time.time())
        await server.send_trades([
            make_trade("Coinbase", "BTC", "USD", price=97001.5, qty=0.25, ts_s=now_s,
                       trade_id="a1"),
            make_trade("Kraken", "ETH", "USD", price=3301.25, qty=1.5, ts_s=now_s,
                       trade_id="b1"),
        ])
        r = stack.redis()
        try:
            async def price(key: str) -> str | None:
                return await r.hget(f"{stack.name}:latest:{key}", "price")

            for _ in range(80):
                if await price("coinbase:BTCUSD") and await price("kraken:ETHUSD"):
                    break
                await asyncio.sleep(0.25)
            assert float(await price("coinbase:BTCUSD") or 0) == 97001.5
            assert float(await price("kraken:ETHUSD") or 0) == 3301.25

            # the server drops the connection: the feed reconnects and resubscribes
            await server.drop_all()
            await server.wait_loaded(2, timeout_s=30)
            assert len(server.subscription_messages) >= 2
            await server.send_trades([make_trade("Coinbase", "BTC", "USD", price=97100.0,
                                                 qty=0.1, ts_s=now_s + 1, trade_id="a2")])
            for _ in range(80):
                if float(await price("coinbase:BTCUSD") or 0) == 97100.0:
                    break
                await asyncio.sleep(0.25)
            assert float(await price("coinbase:BTCUSD") or 0) == 97100.0
        finally:
            await r.aclose()

        ticks = [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
                 for t in tick_objects(decode_ticks_payload(v))]
        btc = [t for t in ticks if t["symbol"] == "BTCUSD"]
        assert [(t["exchange"], t["price"], t["qty"], t["trade_id"], t["source"])
                for t in btc] == [("coinbase", 97001.5, 0.25, "a1", "live"),
                                  ("coinbase", 97100.0, 0.1, "a2", "live")]
        assert btc[0]["ts_ms"] == now_s * 1000 and btc[0]["recv_ms"] >= now_s * 1000 - 1000
        status, health = await stack.http("/health")
        assert status == 200
        cc = health["ingest"]["feeds"]["cryptocompare"]
        assert cc["state"] == "connected" and cc["reconnects"] >= 1
        assert w.stop() == 0, w.tail()
