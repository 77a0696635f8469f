"""Per-second statistics are applied once per source offset (``stores/stats.py``), as the
window state is: a crash that falls between the Redis write and the window state's
changelog write makes the worker apply the same ``ticks`` messages again, and the
statistics must not count them twice.

The crash is injected for every message at once: after a first worker has applied a
replay (Redis written), a second worker starts with a new app id, that is with a new
consumer group and an empty changelog, so it re-applies every message from offset 0 with
none of the first worker's window state — what a restart sees after a crash in that
window, for each message.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from core.models import decode_ticks_payload, tick_objects
from stores.stats import SecondStatsStore
from tests.integration.conftest import SAMPLE, Stack, until

pytestmark = pytest.mark.integration

FILES = [SAMPLE / "trades" / "binance_spot_btcusdt_2024-08-08T2354_trades.csv",
         SAMPLE / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"]


async def _applied(stack: Stack) -> float:
    status, body = await stack.http("/metrics")
    if status != 200:
        return 0.0
    for line in str(body).splitlines():
        if line.startswith("marketflow_ticks_applied_total "):
            return float(line.split()[1])
    return 0.0


async def test_statistics_count_a_redelivered_message_once(stack: Stack) -> None:
    first = stack.worker().start()
    await first.wait_ready()
    await stack.replay_cli("--speed", "120", "--rebase-now", *map(str, FILES))
    ticks = [t for _, v in await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
             for t in tick_objects(decode_ticks_payload(v))
             if "control" not in t]
    assert len(ticks) > 40_000
    want: dict[tuple[str, int], list[float]] = defaultdict(list)
    for t in ticks:
        want[(t["exchange"], t["ts_ms"] // 1000)].append(t["price"])
    first_s = min(s for _, s in want)
    last_s = max(s for _, s in want)
    redis = stack.redis()
    store = SecondStatsStore(redis, stack.settings.redis.key_prefix)

    async def counted() -> int:
        total = 0
        for ex in {e for e, _ in want}:
            aggs = await store.seconds("BTCUSDT", ex, first_s, last_s) or []
            total += int(sum(a[3] for a in aggs))
        return total

    async def all_counted() -> bool:
        return await counted() >= len(ticks)

    try:
        await until(all_counted, 90, "the first worker's statistics")
        assert await counted() == len(ticks)
        first.stop()
        again = stack.worker(MARKETFLOW_APP__ID=f"{stack.name}-again").start()
        await again.wait_ready()

        async def reapplied() -> bool:
            return await _applied(stack) >= len(ticks)

        await until(reapplied, 120, "the second worker re-applying every message")
        # what the first worker wrote is not counted again, once the writes are flushed
        await until(lambda: _no_pending(stack), 30, "the Redis writer's backlog empty")
        assert await counted() == len(ticks)
        for ex in {e for e, _ in want}:
            for s in range(first_s, last_s + 1):
                got = await store.seconds("BTCUSDT", ex, s, s) or []
                prices = want.get((ex, s), [])
                assert int(sum(a[3] for a in got)) == len(prices), (ex, s)
                if prices:
                    assert min(a[0] for a in got) == min(prices)
                    assert max(a[1] for a in got) == max(prices)
                    assert sum(a[2] for a in got) == pytest.approx(sum(prices), rel=1e-12)
    finally:
        await redis.aclose()


async def _no_pending(stack: Stack) -> bool:
    status, body = await stack.http("/health")
    return bool(status == 200 and not any(body["redis_writer"]["backlog"].values()))
