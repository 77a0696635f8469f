"""``GET /stream`` against real workers fed by a replay: snapshot then updates with no gap
and no duplicate, bars equal to ``/ohlcv`` and to the exchange's klines, several workers,
a dead client dropped, auth, bad frames and limits (protocol: ``docs/stream.md``)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
    until,
)
from tests.integration.test_replay_simulator import ReplayProc
from tests.support.harness import free_port

pytestmark = pytest.mark.integration

USDM = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
USDM_KLINES = "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"
FILES_0808 = ["binance_spot_btcusdt_2024-08-08T2354_trades.csv",
              "binance_spot_ethusdt_2024-08-08T2354_trades.csv", USDM,
              "binance_usdm_ethusdt_2024-08-08T2354_trades.csv"]
EXCHANGE = "replay.binance-usdm"
KEYS = ["replay.binance:BTCUSDT", "replay.binance:ETHUSDT", "replay.binance-usdm:BTCUSDT",
        "replay.binance-usdm:ETHUSDT"]
API_KEY = "stream-test-key-0123456789"


class Client:
    """A ``/stream`` client that records every frame it gets."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse
                 ) -> None:
        self.session = session
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        #: when each frame arrived (monotonic s), parallel to ``frames``
        self.recv_s: list[float] = []
        self._task = asyncio.ensure_future(self._read())
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, headers: dict[str, str] | None = None) -> Client:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}/stream", headers=headers)
        return cls(session, ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(orjson.loads(msg.data))
                self.recv_s.append(time.monotonic())
        self.close_code = self.ws.close_code

    async def send(self, obj: Any) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    def of(self, sub_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("id") == sub_id]

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "error"]

    async def wait(self, pred: Any, timeout: float, what: str) -> Any:
        async def check() -> Any:
            return pred()
        return await until(check, timeout, what, step=0.05)

    async def close(self) -> None:
        await self.ws.close()
        await self._task
        await self.session.close()


def check_bar_stream(frames: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Check one bars subscription's frames and return the newest bar per bucket:
    ``seq`` 1, 2, 3 ... without a gap; the snapshot first; no frame repeats the state the
    subscription already had for that bucket; each bucket is sent closed at most once
    without ``correction``, and never open again after that."""
    assert frames and frames[0]["type"] == "snapshot", frames[:1]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    last: dict[int, dict[str, Any]] = {}
    closed_once: set[int] = set()
    for bar in frames[0]["bars"]:
        last[bar["bucket_start_ms"]] = bar
        if bar["closed"]:
            closed_once.add(bar["bucket_start_ms"])
    for f in frames[1:]:
        assert f["type"] == "bar", f
        bar = f["bar"]
        b = bar["bucket_start_ms"]
        assert bar != last.get(b), f"duplicate frame for bucket {b}: {f}"
        if b in closed_once:
            assert bar["closed"] and bar.get("correction"), f"bucket {b} re-sent: {f}"
        elif bar["closed"]:
            assert not bar.get("correction"), f
            closed_once.add(b)
        last[b] = bar
    return last


def assert_same_bars(streamed: dict[int, dict[str, Any]], ohlcv: list[dict[str, Any]]
                     ) -> None:
    """The streamed bars equal the ``/ohlcv`` bars bucket by bucket (same buckets, every
    field; floats to 1e-12 relative)."""
    want = {b["bucket_start_ms"]: b for b in ohlcv}
    assert set(streamed) == set(want), (sorted(set(streamed) ^ set(want)))
    for b, bar in want.items():
        got = {k: v for k, v in streamed[b].items() if k != "correction"}
        assert got.keys() == bar.keys(), b
        for k, v in bar.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, rel=1e-12), (b, k, got[k], v)
            else:
                assert got[k] == v, (b, k, got[k], v)


def assert_throttled(c: Client, sub_id: str, item: Any, per_s: float) -> int:
    """Frames of one item of ``sub_id`` (``item(frame)`` names it, None: not counted) number
    at most one per throttle round (1/``per_s`` s) over the time they spanned; 1 s of
    slack covers delivery jitter at both ends. Returns how many frames the item had."""
    times = [t for f, t in zip(c.frames, c.recv_s, strict=True)
             if f.get("id") == sub_id and f["type"] != "snapshot" and item(f)]
    assert times, f"no frame of {sub_id}"
    span_s = times[-1] - times[0]
    assert len(times) <= (span_s + 1.0) * per_s + 1, (len(times), span_s, per_s)
    return len(times)


async def replay_0808(stack: Stack) -> None:
    """Replay the four 2024-08-08 sample files at full speed into the namespace."""
    rp = await ReplayProc(stack, "--speed", "0", *(str(SAMPLE / "trades" / f)
                                                  for f in FILES_0808)).start()
    try:
        assert await rp.wait(120) == 0, rp.output()
    finally:
        rp.kill()


async def ohlcv(stack: Stack, symbol: str, exchange: str | None, interval: str,
                port: int | None = None) -> list[dict[str, Any]]:
    q = f"/ohlcv?symbol={symbol}&interval={interval}&start=2024-08-08T23:40:00Z" \
        f"&end=2024-08-09T00:20:00Z" + (f"&exchange={exchange}" if exchange else "")
    status, body = await stack.http(q, port)
    assert status == 200, body
    return list(body["bars"])


async def test_snapshot_then_updates_equal_ohlcv_and_klines(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    port = stack.settings.web.port
    early = await Client.connect(port)
    await early.send({"op": "subscribe", "id": "m1", "channel": "bars", "symbol": "BTCUSDT",
                      "exchange": EXCHANGE, "interval": "1m"})
    await early.send({"op": "subscribe", "id": "c5", "channel": "bars", "symbol": "BTCUSDT",
                      "interval": "5m"})
    await early.send({"op": "subscribe", "id": "p", "channel": "prices",
                      "symbols": ["BTCUSDT", f"{EXCHANGE}:BTCUSDT"]})
    await early.wait(lambda: len(early.of("m1")) and len(early.of("c5")), 10, "snapshots")
    assert early.of("m1")[0]["bars"] == []  # nothing traded yet
    rp = await ReplayProc(stack, "--speed", "40", str(SAMPLE / "trades" / USDM),
                          str(SAMPLE / "trades" / FILES_0808[0])).start()
    late: Client | None = None
    try:
        # a second client joins while the replay runs: its snapshot holds the open bar
        await early.wait(lambda: len(early.of("m1")) > 20, 60, "bars streaming")
        late = await Client.connect(port)
        await late.send({"op": "subscribe", "id": "m1", "channel": "bars",
                         "symbol": "BTCUSDT", "exchange": EXCHANGE})
        await late.send({"op": "subscribe", "id": "c5", "channel": "bars",
                         "symbol": "BTCUSDT", "interval": "5m"})
        await late.wait(lambda: len(late.of("c5")) > 0, 10, "late snapshot")
        assert late.of("m1")[0]["bars"], "a snapshot taken mid-replay holds the open bar"
        assert await rp.wait(120) == 0, rp.output()
    finally:
        rp.kill()
    _, rows = complete_minutes(USDM, load_klines(USDM_KLINES))
    minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
    await stack.wait_for_bars(EXCHANGE, "BTCUSDT", minutes, 60)

    def all_closed(c: Client, sub: str, n: int) -> bool:
        got = check_bar_stream(c.of(sub))
        return len(got) >= n and all(b["closed"] for b in got.values())

    assert late is not None
    for c in (early, late):
        await c.wait(lambda c=c: all_closed(c, "m1", len(minutes)), 30, "1m bars closed")
        await c.wait(lambda c=c: all_closed(c, "c5", 3), 30, "5m bars closed")
    want_1m = await ohlcv(stack, "BTCUSDT", EXCHANGE, "1m")
    want_5m = await ohlcv(stack, "BTCUSDT", None, "5m")
    assert_same_bars(check_bar_stream(early.of("m1")), want_1m)
    assert_same_bars(check_bar_stream(early.of("c5")), want_5m)
    # the late client saw the same final bars from the buckets of its snapshot on
    late_1m = check_bar_stream(late.of("m1"))
    assert_same_bars(late_1m, [b for b in want_1m if b["bucket_start_ms"] in late_1m])
    klines = load_klines(USDM_KLINES)
    complete, _ = complete_minutes(USDM, klines)
    assert_bars_equal_klines(check_bar_stream(early.of("m1")), klines, complete)
    # prices: seq without gap, never backwards per item, the newest is the file's last trade
    prices = early.of("p")
    assert [f["seq"] for f in prices] == list(range(1, len(prices) + 1))
    last: dict[str, dict[str, Any]] = {}
    for f in prices[1:]:
        p = f["price"]
        assert p["ts_ms"] >= last.get(p["item"], p)["ts_ms"], (last[p["item"]], p)
        last[p["item"]] = p
    assert set(last) == {"BTCUSDT", f"{EXCHANGE}:BTCUSDT"}
    # throttled: each price item and the 1m series at most once per round, though every
    # tick (tens per round at x40) changed them
    per_s = stack.settings.stream.max_updates_per_s
    for key in last:
        assert assert_throttled(early, "p", lambda f, k=key: f["price"]["item"] == k,
                                per_s) > 5
    assert assert_throttled(early, "m1", lambda f: not f["bar"]["closed"], per_s) > 5
    assert last[f"{EXCHANGE}:BTCUSDT"]["ts_ms"] == max(int(r["ts_ms"]) for r in rows)
    assert not early.errors() and not late.errors()
    await early.close()
    await late.close()


async def test_several_workers_each_serve_every_symbol(stack: Stack) -> None:
    ports = [stack.settings.web.port, free_port()]
    w0 = stack.worker().start()
    w1 = stack.worker(MARKETFLOW_WEB__PORT=str(ports[1])).start()
    await w0.wait_ready()
    await w1.wait_ready()
    clients = [await Client.connect(p) for p in ports]
    for c in clients:
        await c.send({"op": "subscribe", "id": "p", "channel": "prices", "symbols": KEYS})
        for i, key in enumerate(KEYS):
            ex, sym = key.split(":")
            await c.send({"op": "subscribe", "id": f"b{i}", "channel": "bars", "symbol": sym,
                          "exchange": ex})
    await replay_0808(stack)

    def keys_seen(c: Client) -> set[str]:
        return {f"{f['price']['exchange']}:{f['price']['symbol']}" for f in c.of("p")
                if f["type"] == "price"}
    for c in clients:
        await c.wait(lambda c=c: keys_seen(c) == set(KEYS), 30, "prices of every key")
        await c.wait(lambda c=c: all(len(c.of(f"b{i}")) > 1 for i in range(len(KEYS))),
                     30, "bars of every key")
    # the keys really are aggregated by both workers
    applied = []
    for port in ports:
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        applied.append(sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("marketflow_ticks_applied_total")))
    assert all(a > 0 for a in applied), applied
    for c in clients:
        assert not c.errors()
        await c.close()


def _raw_ws(port: int, frame: bytes) -> socket.socket:
    """A WebSocket client that sends the handshake and one masked text frame, then never
    reads (and so never answers a ping)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(frame))
    assert len(frame) < 126
    s.sendall(bytes([0x81, 0x80 | len(frame)]) + mask + payload)
    return s


async def test_dead_and_slow_clients_are_dropped_and_bounded(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_STREAM__HEARTBEAT_S="4",
                     MARKETFLOW_STREAM__MAX_UPDATES_PER_S="1000").start()
    await w.wait_ready()
    port = stack.settings.web.port
    dead = [_raw_ws(port, orjson.dumps({"op": "subscribe", "id": "p", "channel": "prices",
                                        "symbols": KEYS[:2]}))
            for _ in range(3)]
    alive = await Client.connect(port)
    await alive.send({"op": "subscribe", "id": "p", "channel": "prices", "symbols": KEYS})

    async def health() -> dict[str, Any]:
        return (await stack.http("/health", port))[1]["stream"]
    await until(lambda: _gte(health, "connections", 4), 10, "4 sockets")
    rss0 = w.memory_kb()["VmRSS"]
    await replay_0808(stack)
    # the clients that never read nor answer pings are closed; the reading one stays
    await until(lambda: _eq(health, "connections", 1), 20, "dead sockets dropped")
    # the server closed their TCP connections (read in threads: the loop must keep
    # answering the server's pings on the live socket)
    await asyncio.gather(*(asyncio.to_thread(_read_to_eof, s) for s in dead))
    assert alive.close_code is None and len(alive.of("p")) > 10
    assert w.memory_kb()["VmRSS"] - rss0 < 200_000  # kB; nothing queued per dead client
    await alive.send({"op": "ping"})
    await alive.wait(lambda: any(f["type"] == "pong" for f in alive.frames), 5, "pong")
    await alive.close()


def _read_to_eof(s: socket.socket) -> None:
    s.settimeout(30)  # aiohttp waits up to 10 s for the close reply
    while s.recv(65536):
        pass
    s.close()


async def _gte(health: Any, field: str, n: int) -> bool:
    return bool((await health())[field] >= n)


async def _eq(health: Any, field: str, n: int) -> bool:
    return bool((await health())[field] == n)


async def test_bad_frames_get_errors_and_the_socket_stays_usable(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_STREAM__MAX_SUBSCRIPTIONS="3",
                     MARKETFLOW_STREAM__MAX_SYMBOLS="2").start()
    await w.wait_ready()
    c = await Client.connect(stack.settings.web.port)
    cases: list[tuple[Any, str]] = [
        ("{not json", "bad_json"),
        ([1, 2], "bad_request"),
        ({"op": "dance"}, "bad_request"),
        ({"op": "subscribe", "id": "x y", "channel": "bars", "symbol": "BTCUSDT"},
         "bad_request"),
        ({"op": "subscribe", "id": "a", "channel": "candles", "symbol": "BTCUSDT"},
         "bad_request"),
        ({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTC USDT"},
         "bad_request"),
        ({"op": "subscribe", "id": "a", "channel": "bars", "symbol": "BTCUSDT",
          "interval": "2m"}, "bad_request"),
        ({"op": "subscribe", "id": "a", "channel": "prices", "symbols": []}, "bad_request"),
        ({"op": "subscribe", "id": "a", "channel": "prices", "symbols": ["A", "B", "C"]},
         "limit"),
        ({"op": "unsubscribe", "id": "nope"}, "unknown_id"),
    ]
    for frame, code in cases:
        n = len(c.errors())
        await c.send(frame)
        await c.wait(lambda n=n: len(c.errors()) > n, 5, f"error for {frame!r}")
        assert c.errors()[-1]["code"] == code, (frame, c.errors()[-1])
    await c.ws.send_bytes(b"\x00\x01")
    await c.wait(lambda: c.errors()[-1]["message"].startswith("text frames"), 5, "binary")
    for i in range(3):
        await c.send({"op": "subscribe", "id": f"s{i}", "channel": "replay"})
    await c.send({"op": "subscribe", "id": "s0", "channel": "replay"})
    await c.wait(lambda: c.errors()[-1]["code"] == "duplicate_id", 5, "duplicate id")
    await c.send({"op": "subscribe", "id": "s3", "channel": "replay"})
    await c.wait(lambda: c.errors()[-1]["code"] == "limit", 5, "subscription limit")
    await c.send({"op": "unsubscribe", "id": "s0"})
    await c.wait(lambda: {"type": "unsubscribed", "id": "s0"} in c.frames, 5, "unsubscribed")
    await c.send({"op": "subscribe", "id": "s3", "channel": "replay"})
    await c.wait(lambda: [f for f in c.of("s3") if f["type"] == "snapshot"], 10,
                 "subscribe after unsubscribe")
    assert [f for f in c.of("s3") if f["type"] != "error"] == [
        {"type": "snapshot", "id": "s3", "seq": 1, "channel": "replay", "replay": None}]
    assert c.close_code is None
    # a frame over 16 KiB closes the socket (1009), it is not read
    await c.send({"op": "ping", "pad": "x" * 20_000})
    await c.wait(lambda: c.close_code is not None, 5, "close on a big frame")
    assert c.close_code == 1009
    await c.close()
    status, body = await stack.http("/stream", stack.settings.web.port)  # plain GET
    assert status == 426 and "WebSocket" in body["error"]["message"]


async def test_auth_in_the_header_or_the_first_frame(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_AUTH__ENABLED="true",
                     MARKETFLOW_AUTH__API_KEYS=orjson.dumps([API_KEY]).decode(),
                     MARKETFLOW_STREAM__AUTH_TIMEOUT_S="4").start()
    await w.wait_ready()
    port = stack.settings.web.port
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(f"ws://127.0.0.1:{port}/stream",
                               headers={"Authorization": "Bearer wrong-key-wrong-key"})
        assert err.value.status == 401
    ok = await Client.connect(port, {"Authorization": f"Bearer {API_KEY}"})
    await ok.send({"op": "subscribe", "id": "r", "channel": "replay"})
    await ok.wait(lambda: len(ok.of("r")) == 1, 5, "snapshot with header auth")
    assert ok.frames[0]["auth_required"] is False
    await ok.close()
    # first-frame auth (browsers): right token
    first = await Client.connect(port)
    await first.wait(lambda: first.frames, 5, "welcome")
    assert first.frames[0]["auth_required"] is True
    await first.send({"op": "auth", "token": API_KEY})
    await first.send({"op": "subscribe", "id": "r", "channel": "replay"})
    await first.wait(lambda: len(first.of("r")) == 1, 10, "snapshot after auth frame")
    await first.close()
    # wrong token, another frame first, or nothing in time: error frame, then close 4001
    for frame in ({"op": "auth", "token": "not-the-key-at-all"},
                  {"op": "subscribe", "id": "r", "channel": "replay"}, None):
        c = await Client.connect(port)
        if frame is not None:
            await c.send(frame)
        await c.wait(lambda c=c: c.close_code is not None, 10, f"close after {frame}")
        assert c.close_code == 4001
        assert [f["code"] for f in c.errors()] == ["unauthorized"]
        assert not c.of("r")
        assert API_KEY not in str(c.frames) and "not-the-key" not in str(c.frames)
        await c.close()
    # the page itself needs no token (it holds no data)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert r.status == 200 and "text/html" in r.headers["Content-Type"]
    assert (await stack.http("/ohlcv?symbol=BTCUSDT", port))[0] == 401
