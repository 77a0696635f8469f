"""Feed parsing and plumbing (pure / in-process, no services)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import REGISTRY

from core.config import load_settings
from core.errors import InvalidTick, PublishError
from core.models import decode_ticks_payload, tick_objects
from core.state import StateHolder
from feeds.live.base import Backoff, normalise_ts_ms
from feeds.live.generator import SyntheticTicks
from feeds.live.manager import IngestManager
from feeds.live.marketflow_tcp import MarketflowExchangeFeed, parse_line
from feeds.live.publisher import TickPublisher, next_flush_s
from feeds.live.supervisor import Supervisor

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
    got = [tick_objects(decode_ticks_payload(v)) for _, v in sent]
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
    msgs = [(k, tick_objects(decode_ticks_payload(v))) for k, v in sent]
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


def restarts_of(feed: str) -> float:
    return REGISTRY.get_sample_value("marketflow_feed_restarts_total", {"feed": feed}) or 0.0


async def test_supervisor_restarts_a_crashed_task_with_backoff() -> None:
    """Two crashes, then a clean run: restarted twice, after growing delays, each crash
    counted and visible in the state; the supervisor ends when the task returns."""
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def start() -> None:
        runs.append(loop.time())
        if len(runs) <= 2:
            raise RuntimeError(f"parser bug {len(runs)}")

    st = StateHolder("sup-test", "marketflow_tcp")
    before = restarts_of("sup-test")
    sup = Supervisor("sup-test", start, Backoff(0.05, 1.0, jitter=0.0), st)
    await asyncio.wait_for(sup.run(), 10)
    assert len(runs) == 3 and sup.restarts == 2 and st.restarts == 2
    assert runs[1] - runs[0] >= 0.05 and runs[2] - runs[1] >= 0.1  # doubling backoff
    assert restarts_of("sup-test") - before == 2
    assert st.state == "crashed" and "RuntimeError: parser bug 2" in (st.last_error or "")
    assert st.as_dict()["restarts"] == 2


async def test_supervisor_passes_cancellation_through() -> None:
    started = asyncio.Event()

    async def start() -> None:
        started.set()
        await asyncio.Event().wait()

    sup = Supervisor("sup-cancel", start, Backoff(0.01, 0.01))
    task = asyncio.ensure_future(sup.run())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sup.restarts == 0


async def test_publisher_keeps_what_the_broker_did_not_ack() -> None:
    """A flush whose send for one key fails raises PublishError and keeps exactly that
    key's ticks, ahead of ticks that arrive meanwhile; acked messages are not resent; the
    next flush sends the rest in order."""
    sent: list[tuple[bytes | None, bytes]] = []
    fail_keys = {b"e1:ETHUSDT"}

    async def send(key: bytes | None, value: bytes) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if key in fail_keys:
            fut.set_exception(KafkaTimeoutError())
        else:
            sent.append((key, value))
            fut.set_result(None)
        return fut

    pub = TickPublisher(send, send, max_pending=10**6)
    g = SyntheticTicks(["e1"], ["BTCUSDT", "ETHUSDT"], seed=5)
    first = [g.next(NOW + i) for i in range(40)]
    await pub.publish(first)
    with pytest.raises(PublishError, match="1 of 2 ticks messages not acked"):
        await pub.flush()
    eth = [t for t in first if t.symbol == "ETHUSDT"]
    assert pub.pending == len(eth) and {k for k, _ in sent} == {b"e1:BTCUSDT"}
    later = [g.next(NOW + 100 + i) for i in range(10)]
    await pub.publish(later)
    fail_keys.clear()
    sent.clear()
    assert await pub.flush() == len(eth) + len(later)
    got: dict[bytes | None, list[Any]] = {}
    for k, v in sent:  # a key's backlog may be cut into several messages (max_span_ms)
        got.setdefault(k, []).extend(tick_objects(decode_ticks_payload(v)))
    eth_sent = [(t["ts_ms"], t["price"]) for t in got[b"e1:ETHUSDT"]]
    assert eth_sent == [(t.ts_ms, t.price) for t in eth + later if t.symbol == "ETHUSDT"]
    assert len(got[b"e1:BTCUSDT"]) == sum(t.symbol == "BTCUSDT" for t in later)
    assert pub.pending == 0


def test_next_flush_pause_follows_the_message_rate() -> None:
    assert next_flush_s(10.0, 0, 2000, 0.05) == 10.0             # idle: at once
    assert next_flush_s(10.0, 30, 2000, 0.05) == pytest.approx(10.015)
    assert next_flush_s(10.0, 500, 2000, 0.05) == pytest.approx(10.05)  # capped


async def test_flusher_sends_at_once_when_idle_and_batches_under_load() -> None:
    """A tick that finds the publisher idle goes out at once (long before the 10 s
    interval); ticks published during the pause after a flush wait for it and go out
    together in the next flush."""
    loop = asyncio.get_running_loop()
    flushes: list[list[bytes]] = []
    current: list[bytes] = []

    async def send(key: bytes | None, value: bytes) -> Any:
        current.append(value)
        fut = loop.create_future()
        fut.set_result(None)
        return fut

    pub = TickPublisher(send, send)
    real_flush = pub.flush

    async def flush() -> int:
        n = await real_flush()
        if current:
            flushes.append(list(current))
            current.clear()
        return n

    pub.flush = flush  # type: ignore[method-assign]
    # one message per 2 s at most: the pause after a 1-message flush is 2 s
    settings = load_settings(feeds={"publish_interval_ms": 10_000, "max_messages_per_s": 0.5})
    manager = IngestManager(settings, pub, None, is_leader=lambda: True)
    task = asyncio.ensure_future(manager._flush_forever())
    g = SyntheticTicks(["e1"], ["BTCUSDT", "ETHUSDT"], seed=5)
    try:
        t0 = loop.time()
        await pub.publish([g.next(NOW)])
        while not flushes:
            assert loop.time() - t0 < 5, "an idle publisher did not send at once"
            await asyncio.sleep(0.01)
        assert len(flushes[0]) == 1
        t1 = loop.time()
        for i in range(1, 4):
            await pub.publish([g.next(NOW + i)])
        await asyncio.sleep(0.5)
        assert len(flushes) == 1  # the pause (2 s) holds them
        while len(flushes) < 2:
            assert loop.time() - t1 < 15
            await asyncio.sleep(0.05)
        assert loop.time() - t1 >= 1.9  # the pause was kept (it cannot end early)
        # the three ticks went out together, one message per key
        batch = [tick_objects(decode_ticks_payload(v)) for v in flushes[1]]
        assert sum(len(m) for m in batch) == 3
        assert len(batch) == len({m[0]["symbol"] for m in batch})
        assert pub.pending == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class _NoSink:
    """A feed sink that must not be called (the feeds below never get a line)."""

    async def publish(self, ticks: Any) -> None:
        raise AssertionError(f"unexpected ticks {ticks!r}")

    async def dead_letter(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"unexpected dead letter {args!r}")


async def _wait_for_error(st: StateHolder, needle: str) -> None:
    while needle not in (st.last_error or ""):
        await asyncio.sleep(0.01)


async def test_tcp_feed_redials_a_silent_exchange_and_stops_when_cancelled() -> None:
    """An exchange that accepts and then sends nothing is dropped after ``idle_timeout_s``
    and re-dialled (counted, reported as silence); cancelling the feed stops it."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    st = StateHolder("tcp-silent", "marketflow_tcp")
    feed = MarketflowExchangeFeed("silent", "127.0.0.1", port, PAIRS, _NoSink(),
                                  st, idle_timeout_s=0.05, backoff=Backoff(0.01, 0.01))
    task = asyncio.ensure_future(feed.run())
    try:
        await asyncio.wait_for(_wait_for_error(st, "no data for 0.05 s"), 10)
        while len(accepted) < 2:  # re-dialled after the silence
            await asyncio.sleep(0.01)
        assert st.reconnects >= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.close()
        for w in accepted:
            w.close()
    assert st.state == "stopped"


async def test_tcp_feed_reports_a_hung_dial_as_a_connect_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dial that never completes (a black-holed port) is abandoned after the connect
    timeout and reported as such, not as a silent exchange."""
    import feeds.live.marketflow_tcp as tcp

    async def hung(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(tcp, "_CONNECT_TIMEOUT_S", 0.05)
    monkeypatch.setattr(tcp.asyncio, "open_connection", hung)
    st = StateHolder("tcp-hung", "marketflow_tcp")
    feed = MarketflowExchangeFeed("hung", "127.0.0.1", 9, PAIRS, _NoSink(),
                                  st, idle_timeout_s=60, backoff=Backoff(0.01, 0.01))
    task = asyncio.ensure_future(feed.run())
    try:
        await asyncio.wait_for(
            _wait_for_error(st, "ConnectionError: connect timed out after 0.05 s"), 10)
        assert "no data" not in (st.last_error or "")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
