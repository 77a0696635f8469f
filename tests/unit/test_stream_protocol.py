"""The stream's pure parts: client frame parsing, the coalescing outbox, frame numbering,
closed-once/correction marking, the per-group throttle, and a slow client closed with its
memory bounded
(``views/stream_protocol.py``, ``views/stream_hub.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from views.stream_hub import (
    CLOSE_SLOW,
    PHASES,
    Audience,
    BarUpdate,
    Connection,
    Outbox,
    Subscription,
    WriteBatcher,
    close_stalled,
    ws_text_frame,
)
from views.stream_protocol import (
    Auth,
    Ping,
    PriceItem,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    parse_frame,
)


def parse(obj: Any) -> Any:
    return parse_frame(obj if isinstance(obj, str) else orjson.dumps(obj), max_symbols=3)


def test_valid_frames() -> None:
    assert parse({"op": "ping"}) == Ping()
    assert parse({"op": "auth", "token": "t"}) == Auth("t")
    assert parse({"op": "unsubscribe", "id": "a"}) == Unsubscribe("a")
    assert parse({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTCUSDT"}
                 ) == Subscribe("a", "bars", symbol="BTCUSDT", exchange=None, interval="1m")
    assert parse({"op": "subscribe", "id": "b", "channel": "bars", "symbol": "BTCUSDT",
                  "exchange": "replay.binance-usdm", "interval": "4h"}).exchange == \
        "replay.binance-usdm"
    sub = parse({"op": "subscribe", "id": "p", "channel": "prices",
                 "symbols": ["BTCUSDT", "binance:ETHUSDT", "BTCUSDT"]})
    assert sub.items == (PriceItem("BTCUSDT", None), PriceItem("ETHUSDT", "binance"))
    assert [i.key for i in sub.items] == ["BTCUSDT", "binance:ETHUSDT"]
    assert parse({"op": "subscribe", "id": "r", "channel": "replay"}) == Subscribe("r", "replay")


@pytest.mark.parametrize(("frame", "code", "sub_id"), [
    ("{nope", "bad_json", None),
    ("[1]", "bad_request", None),
    ({"op": "fly"}, "bad_request", None),
    ({"op": "auth"}, "bad_request", None),
    ({"op": "subscribe", "id": "", "channel": "replay"}, "bad_request", None),
    ({"op": "subscribe", "id": "x" * 65, "channel": "replay"}, "bad_request", None),
    ({"op": "subscribe", "id": "a", "channel": "trades"}, "bad_request", "a"),
    ({"op": "subscribe", "id": "a", "channel": "bars"}, "bad_request", "a"),
    ({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTC USDT"}, "bad_request",
     "a"),
    ({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTCUSDT", "exchange": 5},
     "bad_request", "a"),
    ({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTCUSDT",
      "interval": "3m"}, "bad_request", "a"),
    ({"op": "subscribe", "id": "a", "channel": "prices", "symbols": "BTCUSDT"}, "bad_request",
     "a"),
    ({"op": "subscribe", "id": "a", "channel": "prices", "symbols": ["a:b:c d"]},
     "bad_request", "a"),
    ({"op": "subscribe", "id": "a", "channel": "prices", "symbols": ["A", "B", "C", "D"]},
     "limit", "a"),
])
def test_bad_frames(frame: Any, code: str, sub_id: str | None) -> None:
    with pytest.raises(ProtocolError) as err:
        parse(frame)
    assert err.value.code == code and err.value.sub_id == sub_id
    assert err.value.message


async def test_outbox_coalesces_keeps_order_and_is_bounded() -> None:
    box = Outbox(3)
    assert box.put("a", 1) and box.put("b", 2) and box.put("a", 3)  # a replaced in place
    assert len(box) == 2
    assert await box.get() == ("a", 3)
    assert box.put("c", 4) and box.put("d", 5)
    assert not box.put("e", 6) and box.overflowed  # a 4th key does not fit
    with pytest.raises(Exception, match="overflowed"):
        await box.get()
    box2 = Outbox(10)
    box2.put(("s1", "bar", 1), "x")
    box2.put(("s2", "bar", 1), "y")
    box2.discard("s1")
    assert await box2.get() == (("s2", "bar", 1), "y")


class FakeWs:
    """Records sent frames; ``block`` makes every send wait forever (a client that does
    not read)."""

    def __init__(self, block: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.block = block
        self.closed = False
        self.close_code: int | None = None

    async def send_frame(self, data: bytes, opcode: Any) -> None:
        if self.block:
            await asyncio.Event().wait()
        self.sent.append(orjson.loads(data))

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed = True
        self.close_code = code


def bar(b: int, closed: bool, close: float, **extra: Any) -> BarUpdate:
    body = {"bucket_start_ms": b, "close": close, "closed": closed, **extra}
    return BarUpdate(b, closed, orjson.dumps(body), body)


def sub_of(conn: Connection, sub_id: str) -> Subscription:
    s = Subscription(Subscribe(sub_id, "bars", symbol="BTCUSDT"))
    conn.subs[sub_id] = s
    s.snapshotted = True
    return s


async def test_frames_are_numbered_deduplicated_and_closed_once() -> None:
    ws = FakeWs()
    conn = Connection(ws, "t", 100, 5.0)  # type: ignore[arg-type]
    s = sub_of(conn, "c")
    writer = asyncio.ensure_future(conn.writer())
    conn.push(s, "snapshot", "", orjson.dumps({"channel": "bars", "bars": []}))
    for upd in (bar(0, False, 1.0), bar(0, False, 2.0)):
        conn.push(s, "bar", 0, upd)  # the same bucket twice before sending: coalesced
    await asyncio.sleep(0.05)
    conn.push(s, "bar", 0, bar(0, False, 2.0))  # no change: not sent again
    conn.push(s, "bar", 0, bar(0, True, 2.5))   # closed
    await asyncio.sleep(0.05)
    conn.push(s, "bar", 0, bar(0, True, 2.6))   # changed after closing: a correction
    conn.push(s, "bar", 60, bar(60, False, 3.0))
    await asyncio.sleep(0.05)
    conn.subs.pop("c")
    conn.push(s, "bar", 60, bar(60, False, 4.0))  # unsubscribed: dropped
    conn.control({"type": "pong"})
    await asyncio.sleep(0.05)
    writer.cancel()
    frames = [f for f in ws.sent if f.get("id") == "c"]
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert [f["type"] for f in frames] == ["snapshot", "bar", "bar", "bar", "bar"]
    assert [(f["bar"]["close"], f["bar"]["closed"], f["bar"].get("correction"))
            for f in frames[1:]] == [(2.0, False, None), (2.5, True, None),
                                     (2.6, True, True), (3.0, False, None)]
    assert ws.sent[-1] == {"type": "pong"}


async def test_a_client_that_does_not_read_is_closed_and_stays_bounded() -> None:
    ws = FakeWs(block=True)
    conn = Connection(ws, "t", 50, 0.2)  # type: ignore[arg-type]
    s = sub_of(conn, "c")
    writer = conn.writer_task = asyncio.ensure_future(conn.writer())
    for i in range(10_000):  # 10,000 updates of 10 buckets: at most 10 entries pending
        conn.push(s, "bar", i % 10, bar(i % 10, False, float(i)))
        assert len(conn.outbox) <= 11
    await asyncio.sleep(0.01)
    assert conn.send_started_s is not None  # the first send blocks
    assert close_stalled([conn], conn.send_started_s + 0.1) == []  # not for long yet
    tasks = close_stalled([conn], conn.send_started_s + 0.3)
    await asyncio.gather(*tasks)
    assert writer.cancelled() or writer.done()
    assert ws.close_code == CLOSE_SLOW and conn.close_reason == "send_timeout"

    ws2 = FakeWs(block=True)
    conn2 = Connection(ws2, "t", 20, 30.0)  # type: ignore[arg-type]
    s2 = sub_of(conn2, "c")
    writer2 = asyncio.ensure_future(conn2.writer())
    await asyncio.sleep(0)
    for b in range(100):  # 100 distinct buckets > the 20-entry outbox
        conn2.push(s2, "bar", b, bar(b, True, 1.0))
    writer2.cancel()  # the send in progress blocks forever; the overflow is recorded
    assert conn2.outbox.overflowed and len(conn2.outbox) == 20


class FakeTransport:
    """What the batched write checks (closing, bytes still buffered) and what it wrote."""

    def __init__(self) -> None:
        self.buffered = 0
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def ws_frames(data: bytes) -> list[dict[str, Any]]:
    """Decode unmasked WebSocket text frames (RFC 6455 section 5.2) into JSON objects."""
    out, i = [], 0
    while i < len(data):
        assert data[i] == 0x81  # FIN, text
        n, i = data[i + 1], i + 2
        assert n & 0x80 == 0  # a server does not mask
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        out.append(orjson.loads(data[i:i + n]))
        i += n
    return out


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536, 70000])
def test_ws_text_frame_lengths(n: int) -> None:
    payload = orjson.dumps("x" * n)
    assert ws_frames(ws_text_frame(payload)) == ["x" * n]


async def test_frames_of_one_loop_turn_go_out_in_one_write() -> None:
    ws = FakeWs()
    transport = FakeTransport()
    conn = Connection(ws, "t", 100, 5.0, transport, WriteBatcher())  # type: ignore[arg-type]
    s, p = sub_of(conn, "c"), sub_of(conn, "p")
    writer = conn.writer_task = asyncio.ensure_future(conn.writer())
    await asyncio.sleep(0)  # the writer waits for the outbox
    conn.push(s, "bar", 0, bar(0, False, 1.0))
    conn.push(p, "bar", 0, bar(0, False, 7.0))
    assert transport.writes == []  # written on the next loop turn
    await asyncio.sleep(0)
    assert len(transport.writes) == 1 and ws.sent == []  # one write, not the writer task
    assert [(f["id"], f["seq"], f["bar"]["close"]) for f in ws_frames(transport.writes[0])] \
        == [("c", 1, 1.0), ("p", 1, 7.0)]
    conn.push(s, "bar", 0, bar(0, False, 1.5))
    conn.control({"type": "pong"})  # a control frame: the batch is written before it
    assert [f["seq"] for f in ws_frames(transport.writes[1])] == [2]
    await asyncio.sleep(0.05)
    assert ws.sent == [{"type": "pong"}]
    transport.buffered = 10  # the socket is behind: frames queue (and coalesce) instead
    conn.push(s, "bar", 0, bar(0, False, 2.0))
    conn.push(s, "bar", 0, bar(0, False, 3.0))
    assert len(conn.outbox) == 1
    await asyncio.sleep(0.05)  # the writer sends the newest state
    assert [(f.get("seq"), f.get("bar", {}).get("close")) for f in ws.sent] \
        == [(None, None), (3, 3.0)]
    assert len(transport.writes) == 2
    writer.cancel()


class _Rounds:
    """A hub stand-in for :class:`Audience`: rounds set by the test, due groups noted."""

    def __init__(self) -> None:
        self.rounds: dict[int, int] = {}
        self.due_calls: list[int] = []

    def round_no(self, phase: int = 0) -> int:
        return self.rounds.get(phase, 0)

    def due(self, phase: int, audience: Audience) -> None:
        self.due_calls.append(phase)


class _Conn:
    """A connection stand-in that records what it is handed."""

    def __init__(self, phase: int) -> None:
        self.phase = phase
        self.got: list[tuple[str, Any, Any]] = []

    def push(self, sub: Subscription, kind: str, item: Any, payload: Any) -> None:
        self.got.append((kind, item, payload))


def test_audience_throttles_each_group_in_its_own_rounds() -> None:
    hub = _Rounds()
    aud = Audience(hub, "price")  # type: ignore[arg-type]
    c0, c1 = _Conn(0), _Conn(1)
    s0 = Subscription(Subscribe("a", "prices", items=(PriceItem("BTCUSDT", None),)))
    s1 = Subscription(Subscribe("b", "prices", items=(PriceItem("BTCUSDT", None),)))
    s0.snapshotted = s1.snapshotted = True
    aud.add(s0, c0)  # type: ignore[arg-type]
    aud.add(s1, c1)  # type: ignore[arg-type]
    assert len(aud) == 2 and aud
    hub.rounds = {0: 5, 1: 7}
    aud.publish("k", b"1")  # the first update of a round goes at once, to both groups
    assert c0.got == c1.got == [("price", "k", b"1")]
    aud.publish("k", b"2")  # both groups already had one this round: held
    assert len(c0.got) == len(c1.got) == 1 and sorted(set(hub.due_calls)) == [0, 1]
    hub.rounds[0] = 6  # group 0's round starts: only it gets the held state
    aud.flush(0)
    assert c0.got[-1] == ("price", "k", b"2") and len(c1.got) == 1
    aud.publish("k", b"3")  # held for both again; group 1's held state is replaced
    hub.rounds[1] = 8
    aud.flush(1)
    assert c1.got == [("price", "k", b"1"), ("price", "k", b"3")]
    aud.flush(1)  # nothing held any more
    assert len(c1.got) == 2
    hub.rounds[0] = 7  # a publish in a new round sends what is still held first
    aud.publish("j", b"x")
    assert c0.got[-2:] == [("price", "k", b"3"), ("price", "j", b"x")]
    aud.remove(s1, c1)  # type: ignore[arg-type]
    assert len(aud) == 1 and 1 not in aud.groups
    aud.flush(1)
    aud.remove(s0, c0)  # type: ignore[arg-type]
    assert not aud


def test_connections_are_dealt_into_phase_groups() -> None:
    phases = [Connection(FakeWs(), "t", 10, 1.0).phase  # type: ignore[arg-type]
              for _ in range(3 * PHASES)]
    assert sorted(set(phases)) == list(range(PHASES))
    assert all(phases.count(p) == 3 for p in range(PHASES))


def test_audience_send_now_bypasses_the_group_throttle() -> None:
    hub = _Rounds()
    aud = Audience(hub, "bar")  # type: ignore[arg-type]
    c0, c1 = _Conn(0), _Conn(1)
    for i, c in enumerate((c0, c1)):
        s = Subscription(Subscribe(f"s{i}", "bars", symbol="BTCUSDT"))
        s.snapshotted = True
        aud.add(s, c)  # type: ignore[arg-type]
    aud.publish(0, "a")
    aud.publish(0, "b")  # held for both groups
    aud.send_now(0, "c")  # at once to both, and the held state is dropped
    assert c0.got == c1.got == [("bar", 0, "a"), ("bar", 0, "c")]
    aud.flush(0)
    aud.flush(1)
    assert len(c0.got) == len(c1.got) == 2
