"""Bad input at scale: 10,000 malformed ticks mixed into a real replay.

Real Binance USD-M trades (``data/sample/trades``) are produced in batches (JSON arrays,
key ``exchange:symbol``, the ``ticks`` format of README "Topics") with 10,000 malformed
ticks interleaved, generated deterministically: whole bad messages (broken JSON, NaN /
Infinity / 1e999 literals, empty, top-level scalars, one > 4 MiB message) and bad elements
inside the good arrays (wrong types, missing fields, negative / zero prices, negative qty,
bad names, bad source, timestamps in seconds, far future, far past = late, non-objects).

Checks: the worker stays up; the dead-letter topic holds exactly one record per bad tick,
with the expected reason (count per reason, and every tagged bad tick exactly once); every
bar equals the pure aggregation of the good trades (and Binance's klines where complete).

Unknown symbols are rejected by the feeds (reason ``unknown_symbol``), not by the worker:
it accepts any well-formed ``exchange``/``symbol`` (``core.models.parse_tick``) and builds
that key's bars. Here a few well-formed ticks of an unlisted symbol get their own bar and
touch neither the dead-letter topic nor the BTCUSDT bars.
"""

from __future__ import annotations

import asyncio
import csv
import random
import re
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.models import MAX_MESSAGE_BYTES, parse_tick
from tables.aggregator import WindowAggregator
from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)

pytestmark = pytest.mark.integration

TRADES = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
KLINES = "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"
KEY = b"binance-usdm:BTCUSDT"
N_BAD = 10_000
BATCH = 200
UNKNOWN = "ZZZNOSUCH"
_TAG = re.compile(r"bad#(\d+)")


def _good_ticks() -> list[dict[str, Any]]:
    with (SAMPLE / "trades" / TRADES).open() as fh:
        return [{"exchange": r["exchange"], "symbol": r["symbol"], "price": float(r["price"]),
                 "qty": float(r["qty"]), "ts_ms": int(r["ts_ms"]), "trade_id": r["trade_id"],
                 "source": "replay"} for r in csv.DictReader(fh)]


def _bad_element(i: int, rng: random.Random, base: dict[str, Any]) -> tuple[Any, str]:
    """One malformed tick (an element of a ``ticks`` array) tagged ``bad#i``, and the
    dead-letter reason the worker must give it."""
    t = {**base, "tag": f"bad#{i}"}
    kind = i % 17
    if kind == 0:
        t["price"] = "61800.3"
        return t, "bad_type"
    if kind == 1:
        t["ts_ms"] = str(t["ts_ms"])
        return t, "bad_type"
    if kind == 2:
        t["qty"] = [1]
        return t, "bad_type"
    if kind == 3:
        t["exchange"] = 7
        return t, "bad_type"
    if kind == 4:
        del t[rng.choice(["price", "ts_ms", "exchange", "symbol"])]
        return t, "missing_field"
    if kind == 5:
        t["price"] = -rng.uniform(1, 1e5)
        return t, "bad_price"
    if kind == 6:
        t["price"] = 0
        return t, "bad_price"
    if kind == 7:
        t["qty"] = -1.5
        return t, "bad_qty"
    if kind == 8:
        t["ts_ms"] //= 1000  # seconds instead of milliseconds
        return t, "ts_too_old"
    if kind == 9:
        t["ts_ms"] = 4_102_444_800_000 + rng.randrange(10**9)  # 2100
        return t, "ts_in_future"
    if kind == 10:
        t["symbol"] = "BTC USDT" if rng.random() < 0.5 else "X" * 41
        return t, "bad_name"
    if kind == 11:
        t["source"] = "prod"
        return t, "bad_source"
    if kind == 12:
        t["trade_id"] = {"id": 1}
        return t, "bad_type"
    if kind == 13:
        return f"bad#{i}", "not_object"
    if kind == 14:
        return [f"bad#{i}"], "not_object"
    # 15, 16: far in the past but after 2009: well-formed, its window long closed -> late
    # (the tag rides in trade_id, the only free-form field the late record keeps)
    t = {**base, "ts_ms": 1_420_070_400_000 + rng.randrange(10**9), "trade_id": f"bad#{i}"}
    return t, "late"


def _bad_message(i: int, rng: random.Random) -> tuple[bytes, str]:
    """One whole malformed message value tagged ``bad#i`` (except ``empty``)."""
    kind = i % 7
    if kind == 0:
        return f'{{"tag": "bad#{i}", "price": 1.0, "ts_ms": '.encode(), "invalid_json"
    if kind == 1:
        lit = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
        return (f'{{"exchange": "binance-usdm", "symbol": "BTCUSDT", "price": {lit}, '
                f'"ts_ms": 1723161300000, "tag": "bad#{i}"}}').encode(), "invalid_json"
    if kind == 2:
        return f"bad#{i} \xff\xfe not json".encode("latin-1"), "invalid_json"
    if kind == 3:
        return b"", "empty"
    if kind == 4:
        return orjson.dumps(f"bad#{i}"), "not_object"
    if kind == 5:
        return b"bad#%d" % i, "invalid_json"
    return f'[{{"tag": "bad#{i}"}}, '.encode(), "invalid_json"


Built = tuple[list[tuple[bytes, bytes]], list[list[dict[str, Any]]], Counter[str], set[int],
              int, int]


def build(seed: int = 20240808) -> Built:
    """The messages to produce, the good batches (for the pure aggregation), expected
    dead-letter reasons, the expected tags, the number of empty messages and the number of
    unlisted-symbol ticks."""
    rng = random.Random(seed)
    good = _good_ticks()
    batches = [good[i:i + BATCH] for i in range(0, len(good), BATCH)]
    want: Counter[str] = Counter()
    tags: set[int] = set()
    msgs: list[tuple[bytes, bytes]] = []
    empties = 0
    n_unknown = 0
    n_el = 0
    n_whole = 450  # whole bad messages; the rest are bad elements inside arrays
    i = 0
    per_batch = (N_BAD - n_whole - 1) // (len(batches) - 1) + 1
    good_batches: list[list[dict[str, Any]]] = []
    for bi, batch in enumerate(batches):
        arr: list[Any] = list(batch)
        good_objs = list(batch)
        if bi > 0:  # the first batch is clean: "late" ticks need a watermark to be late
            for _ in range(per_batch):
                if n_el >= N_BAD - n_whole - 1:
                    break
                n_el += 1
                obj, reason = _bad_element(i, rng, rng.choice(batch))
                arr.insert(rng.randrange(len(arr) + 1), obj)
                want[reason] += 1
                tags.add(i)
                i += 1
            if bi % 10 == 5:  # a well-formed tick of an unlisted symbol, right after a
                pos = rng.randrange(len(arr))  # good tick with the same event time
                while not (isinstance(arr[pos], dict) and arr[pos] in batch):
                    pos = rng.randrange(len(arr))
                arr.insert(pos + 1, {**arr[pos], "symbol": UNKNOWN, "trade_id": None})
                n_unknown += 1
        good_batches.append(good_objs)
        msgs.append((KEY, orjson.dumps(arr)))
        for _ in range(n_whole // len(batches) + (1 if bi < n_whole % len(batches) else 0)):
            value, reason = _bad_message(i, rng)
            msgs.append((KEY, value))
            want[reason] += 1
            if reason == "empty":
                empties += 1
            else:
                tags.add(i)
            i += 1
    oversized = (f'{{"tag": "bad#{i}", "pad": "'.encode() + b"x" * MAX_MESSAGE_BYTES + b'"}')
    msgs.insert(len(msgs) // 2, (KEY, oversized))
    want["oversized"] += 1
    tags.add(i)
    i += 1
    assert i == N_BAD and sum(want.values()) == N_BAD, (i, sum(want.values()))
    return msgs, good_batches, want, tags, empties, n_unknown


def pure_bars(batches: list[list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """The bars of the good trades alone, by the pure aggregator (idle-closed at the end)."""
    agg = WindowAggregator({}, grace_ms=5_000, idle_timeout_ms=1)
    wall = int(time.time() * 1000)
    out: list[dict[str, Any]] = []
    for off, batch in enumerate(batches):
        res = agg.process_ticks(0, off, [parse_tick(o, wall, 300_000) for o in batch], wall)
        assert not res.late
        out += res.closed
    out += agg.process_idle(0, wall + 10**9).closed
    return {b["bucket_start_ms"]: b for b in out}


async def _produce(stack: Stack, msgs: list[tuple[bytes, bytes]]) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=stack.settings.broker.bootstrap_servers,
                            linger_ms=5, max_batch_size=1 << 20, max_request_size=8 << 20,
                            acks="all")
    await prod.start()
    try:
        futs = [await prod.send(stack.settings.topics.ticks, value=v, key=k) for k, v in msgs]
        await asyncio.gather(*futs)
    finally:
        await prod.stop()


async def test_ten_thousand_bad_ticks_in_a_real_replay(stack: Stack) -> None:
    msgs, good_batches, want, tags, empties, n_unknown = build()
    assert build()[0] == msgs  # deterministic
    expected = pure_bars(good_batches)
    worker = stack.worker().start()
    await worker.wait_ready()
    t0 = time.monotonic()
    await _produce(stack, msgs)

    bars = await stack.wait_for_bars("binance-usdm", "BTCUSDT", set(expected), timeout=60)
    worker.assert_alive()

    # exactly one dead-letter record per bad tick, with its reason
    deadline = time.monotonic() + 40
    while True:
        dead = [orjson.loads(v) for _, v in
                await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.5)]
        if len(dead) >= N_BAD or time.monotonic() > deadline:
            break
        worker.assert_alive()
        await asyncio.sleep(1)
    got = Counter(d["reason"] for d in dead)
    assert got == want, f"got {dict(got)}, want {dict(want)}"
    found: list[int] = []
    for d in dead:
        m = _TAG.search(d["payload"] if isinstance(d["payload"], str)
                        else orjson.dumps(d["payload"]).decode())
        if m:
            found.append(int(m.group(1)))
    assert len(found) == len(set(found)) == len(tags) and set(found) == tags
    assert len(dead) - len(found) == empties
    assert all(d["detail"] is not None and d["source_offset"] is not None for d in dead)

    # every bar equals the pure aggregation of the good trades, and the klines
    assert set(bars) == set(expected)
    for start, want_bar in expected.items():
        row = bars[start]
        assert (row["open"], row["high"], row["low"], row["close"], row["trade_count"],
                row["open_ts_ms"], row["close_ts_ms"]) == (
            want_bar["open"], want_bar["high"], want_bar["low"], want_bar["close"],
            want_bar["trade_count"], want_bar["open_ts_ms"], want_bar["close_ts_ms"]), start
        assert row["volume"] == Decimal(want_bar["volume"])  # exactly
    klines = load_klines(KLINES)
    minutes, rows = complete_minutes(TRADES, klines)
    assert_bars_equal_klines(bars, klines, minutes)
    assert sum(b["trade_count"] for b in bars.values()) == len(rows)

    # the unlisted symbol is accepted by the worker as its own key
    assert n_unknown > 0
    deadline = time.monotonic() + 20
    while True:
        unknown = await stack.bars("binance-usdm", UNKNOWN)
        if sum(b["trade_count"] for b in unknown.values()) >= n_unknown:
            break
        assert time.monotonic() < deadline, f"unlisted symbol bars: {unknown}"
        await asyncio.sleep(0.5)
    assert sum(b["trade_count"] for b in unknown.values()) == n_unknown

    worker.assert_alive()
    status, metrics = await stack.http("/metrics")
    assert status == 200
    assert f'marketflow_dead_lettered_ticks_total{{reason="late"}} {float(want["late"])}' in (
        metrics)
    assert time.monotonic() - t0 < 90
