"""The replay command against the real broker: ordering, batching, re-basing, repeat."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time

import pytest

from core.models import decode_ticks_payload, tick_objects
from feeds.replay.simulator import replay
from tests.integration.conftest import REPO, SAMPLE, Stack

pytestmark = pytest.mark.integration

SPOT = SAMPLE / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"


async def test_repeat_rebases_each_pass_onto_now(stack: Stack) -> None:
    t0 = time.time() * 1000
    stats = await replay(stack.settings, [SPOT], speed=0, rebase_now=True, loop=True,
                         max_loops=2)
    assert (stats.ticks, stats.loops) == (2000, 2)
    msgs = await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
    ticks = [t for _, v in msgs for t in tick_objects(decode_ticks_payload(v))]
    assert len(ticks) == 2000
    assert {k for k, _ in msgs} == {b"binance:BTCUSDT"}
    first, second = ticks[:1000], ticks[1000:]
    assert t0 - 1000 <= first[0]["ts_ms"] <= time.time() * 1000  # first trade lands at now
    assert second[0]["ts_ms"] >= first[-1]["ts_ms"]  # the second pass continues forward
    gaps = [b["ts_ms"] - a["ts_ms"] for a, b in itertools.pairwise(first)]
    assert min(gaps) >= 0  # event-time order kept
    assert [t["price"] for t in first] == [t["price"] for t in second]


async def test_repeat_without_rebase_is_refused(stack: Stack) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faust", "-A", "app", "replay", "--repeat", str(SPOT), cwd=REPO,
        env={**os.environ, **stack.env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"--repeat needs --rebase-now" in out


async def test_paced_replay_takes_event_time_over_speed(stack: Stack) -> None:
    # 2020 file: 211 s of trades; at speed 100 that is ~2.1 s of publishing
    t = time.monotonic()
    await stack.replay_cli("--speed", "100", str(SPOT))
    took = time.monotonic() - t
    assert took >= 2.0
