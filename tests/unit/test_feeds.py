"""Feed parsing and plumbing (pure / in-process, no services)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

from core.errors import InvalidTick
from feeds.live.base import Backoff, normalise_ts_ms
from feeds.live.generator import SyntheticTicks
from feeds.live.marketflow_tcp import parse_line
from feeds.live.publisher import TickPublisher

PAIRS = {"BTCUSDT", "ETHUSDT"}
NOW = 1_744_631_432_487


def test_sample_line_from_the_exchange_programs() -> None:
    t = parse_line(b'{"symbol":"BTCUSDT","price":96391.79,"timestamp":1744631432487}',
                   "exchange1", PAIRS, NOW + 5)
    assert (t.exchange, t.symbol, t.price, t.ts_ms, t.recv_ms, t.qty, t.source) == (
        "exchange1", "BTCUSDT", 96391.79, 1744631432487, NOW + 5, 0.0, "live")


@pytest.mark.parametrize(("ts", "want"), [
    (1744631432, 1744631432000),            # seconds
    (1744631432.487, 1744631432487),        # fractional seconds
    (1744631432487, 1744631432487),         # milliseconds
    (1744631432487123, 1744631432487),      # microseconds
    (1744631432487123456, 1744631432487),   # nanoseconds
])
def test_timestamp_units_by_magnitude(ts: float, want: int) -> None:
    assert normalise_ts_ms(ts) == want
    line = orjson.dumps({"symbol": "ETHUSDT", "price": 1.5, "timestamp": ts})
    assert parse_line(line, "x", PAIRS, NOW).ts_ms == want


def test_tolerant_keys_symbol_case_and_rfc3339() -> None:
    t = parse_line(b'{"Symbol":"btcusdt","PRICE":1,"TimeStamp":"2025-04-14T11:50:32.487Z"}',
                   "x", PAIRS, NOW)
    assert (t.symbol, t.price, t.ts_ms) == ("BTCUSDT", 1.0, 1744631432487)


@pytest.mark.parametrize(("line", "why"), [
    (b"not json at all", "invalid_json"),
    (b"[1,2]", "not_object"),
    (b'{"symbol":"BTCUSDT","timestamp":1744631432487}', "missing_field"),
    (b'{"symbol":"XYZUSDT","price":1,"timestamp":1744631432487}', "unknown_symbol"),
    (b'{"symbol":"BTCUSDT","price":-1,"timestamp":1744631432487}', "bad_price"),
    (b'{"symbol":"BTCUSDT","price":"1","timestamp":1744631432487}', "bad_type"),
    (b'{"symbol":"BTCUSDT","price":1,"timestamp":"yesterday"}', "bad_timestamp"),
    (b'{"symbol":"BTCUSDT","price":1,"timestamp":-5}', "bad_timestamp"),
    (b"   ", "empty"),
])
def test_bad_lines(line: bytes, why: str) -> None:
    with pytest.raises(InvalidTick) as ei:
        parse_line(line, "x", PAIRS, NOW)
    assert ei.value.reason == why


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    b = Backoff(1.0, 30.0, jitter=0.2, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    for d, base in zip(delays, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert 0.8 * base <= d <= 1.2 * base
    b.reset()
    assert b.next() <= 1.2


def test_generator_random_walk_is_positive_and_realistic() -> None:
    g = SyntheticTicks(["e1", "e2"], ["BTCUSDT", "DOGEUSDT"], seed=3)
    ticks = [g.next(NOW + i) for i in range(5000)]
    assert {(t.exchange, t.symbol) for t in ticks} == {
        (e, p) for e in ("e1", "e2") for p in ("BTCUSDT", "DOGEUSDT")}
    assert all(t.price > 0 and t.source == "test" for t in ticks)
    btc = [t.price for t in ticks if t.symbol == "BTCUSDT"]
    assert 50_000 < min(btc) and max(btc) < 200_000


async def test_publisher_batches_per_key_and_dead_letters() -> None:
    sent: list[tuple[bytes | None, bytes]] = []
    dead: list[tuple[bytes | None, bytes]] = []

    async def send_tick(key: bytes | None, value: bytes) -> Any:
        sent.append((key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def send_dead(key: bytes | None, value: bytes) -> Any:
        dead.append((key, value))
        return await send_tick(None, b"")

    pub = TickPublisher(send_tick, send_dead, max_pending=1000)
    g = SyntheticTicks(["e1"], ["BTCUSDT", "ETHUSDT"], seed=1)
    ticks = [g.next(NOW + i) for i in range(100)]
    await pub.publish(ticks)
    assert sent == []  # buffered until flush
    assert await pub.flush() == 100
    assert {k for k, _ in sent} == {b"e1:BTCUSDT", b"e1:ETHUSDT"}
    got = [orjson.loads(v) for _, v in sent]
    assert sum(len(b) for b in got) == 100
    assert all(len({t["symbol"] for t in b}) == 1 for b in got)
    await pub.dead_letter(b"not json", "invalid_json", "x")
    assert orjson.loads(dead[0][1])["reason"] == "invalid_json"


async def test_publisher_backlog_goes_out_in_event_time_order() -> None:
    """A backlog (a broker outage) is cut into messages of at most ``max_span_ms`` of event
    time and sent in event-time order across keys, each key's ticks in arrival order: no
    message of one key starts more than ``max_span_ms`` before the newest tick sent
    before it (so the watermark never passes a buffered tick of another key)."""
    sent: list[tuple[bytes | None, bytes]] = []

    async def send(key: bytes | None, value: bytes) -> Any:
        sent.append((key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    pub = TickPublisher(send, send, max_pending=10**6, max_span_ms=50)
    g = SyntheticTicks(["e1", "e2"], ["BTCUSDT", "ETHUSDT"], seed=3)
    ticks = [g.next(NOW + i * 7) for i in range(2000)]  # 14 s of ticks, 4 keys
    await pub.publish(ticks)
    assert await pub.flush() == 2000
    msgs = [(k, orjson.loads(v)) for k, v in sent]
    assert len(msgs) > 4
    newest = 0
    for _, batch in msgs:
        assert batch[-1]["ts_ms"] - batch[0]["ts_ms"] < 50
        assert batch[0]["ts_ms"] >= newest - 50
        newest = max(newest, max(t["ts_ms"] for t in batch))
    for key in {k for k, _ in msgs}:  # per key: arrival order kept, nothing lost
        mine = [(t["exchange"], t["symbol"], t["ts_ms"]) for k, b in msgs if k == key for t in b]
        assert mine == [(t.exchange, t.symbol, t.ts_ms) for t in ticks
                        if f"{t.exchange}:{t.symbol}".encode() == key]
