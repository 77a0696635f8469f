"""A local stand-in for the CryptoCompare legacy streamer, for tests.

It speaks the documented protocol (see :mod:`feeds.live.cryptocompare` for the sources):

* websocket at ``ws://127.0.0.1:<port>/v2?api_key=KEY``; a missing or wrong key gets
  ``{"TYPE":"401","MESSAGE":"UNAUTHORIZED",...}`` and the socket is closed;
* a good key gets the ``{"TYPE":"20","MESSAGE":"STREAMERWELCOME",...}`` welcome;
* ``{"action":"SubAdd","subs":[...]}``: for each valid sub, the scripted snapshot trades
  of that sub (the real server replays the latest 20) then
  ``{"TYPE":"16","MESSAGE":"SUBSCRIBECOMPLETE","SUB":...}``; malformed subs get
  ``{"TYPE":"500","MESSAGE":"INVALID_SUB","PARAMETER":...}``; repeated ones
  ``SUBSCRIPTION_ALREADY_ACTIVE``; finally ``{"TYPE":"3","MESSAGE":"LOADCOMPLETE"}``;
* ``SubRemove`` answers ``17 UNSUBSCRIBECOMPLETE`` (or ``500 SUBSCRIPTION_UNRECOGNIZED``),
  undecodable frames ``500 INVALID_JSON``, other actions ``500 INVALID_PARAMETER``;
* optional ``999 HEARTBEAT`` every ``heartbeat_interval_s``.

The test drives the rest: :meth:`CryptoCompareServer.send_trades` (routed to connections
subscribed to ``0~M~FSYM~TSYM``), :meth:`~CryptoCompareServer.broadcast` (any frame, e.g. an
unknown TYPE or a raw string), :meth:`~CryptoCompareServer.send_heartbeat`,
:meth:`~CryptoCompareServer.drop_all` (clean close or abrupt TCP reset). Every connection
is recorded (:class:`Connection`: query key, client frames, SubAdd messages, subs).

Usage::

    async with CryptoCompareServer(api_key="k") as server:
        feed = CryptoCompareFeed(server.url, "k", [...], ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

__all__ = [
    "Connection",
    "CryptoCompareServer",
    "make_trade",
    "trade_sub",
    "wait_until",
]

#: ``<channel>~<market>~<base>~<quote>`` with an optional ``~<period>`` (OHLC channel 24).
SUB_RE = re.compile(r"^\d{1,3}~[A-Za-z0-9*_.\-]+~[A-Za-z0-9*_.\-]+~[A-Za-z0-9*_.\-]+(~[mHD*])?$")


def trade_sub(trade: dict[str, Any]) -> str | None:
    """The subscription a trade frame belongs to (``0~M~FSYM~TSYM``), None if it lacks one."""
    m, f, t = trade.get("M"), trade.get("FSYM"), trade.get("TSYM")
    if isinstance(m, str) and isinstance(f, str) and isinstance(t, str):
        return f"0~{m}~{f}~{t}"
    return None


def make_trade(market: str = "Coinbase", fsym: str = "BTC", tsym: str = "USD", *,
               price: float = 32500.12, qty: float = 0.01, ts_s: int = 1_593_768_260,
               trade_id: str | int = "12345678", flags: str = "2",
               tsns: int | None = None, **extra: Any) -> dict[str, Any]:
    """A TYPE ``"0"`` trade frame shaped like the documented one (``extra`` overrides)."""
    d: dict[str, Any] = {
        "TYPE": "0", "M": market, "FSYM": fsym, "TSYM": tsym, "F": flags,
        "ID": trade_id, "TS": ts_s, "Q": qty, "P": price, "TOTAL": qty * price,
        "RTS": ts_s, "CCSEQ": 987654321,
    }
    if tsns is not None:
        d["TSNS"] = tsns
        d["RTSNS"] = tsns
    d.update(extra)
    return d


async def wait_until(pred: Callable[[], bool], timeout_s: float = 5.0,
                     what: str = "condition", interval_s: float = 0.01) -> None:
    """Poll ``pred`` until true; fail the test (AssertionError) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


@dataclass
class Connection:
    """One client connection as the server saw it.

    Attributes:
        api_key: the ``api_key`` query parameter (None when absent).
        frames: every decoded client frame, in order.
        sub_messages: the ``SubAdd`` frames.
        subs: valid, active subscriptions.
        sent: every frame the server sent (decoded objects, or raw strings).
        loaded: set once ``LOADCOMPLETE`` was sent for a ``SubAdd``.
        closed: set when the connection ended.
    """

    ws: web.WebSocketResponse
    request: web.Request
    api_key: str | None
    frames: list[Any] = field(default_factory=list)
    sub_messages: list[dict[str, Any]] = field(default_factory=list)
    subs: list[str] = field(default_factory=list)
    sent: list[Any] = field(default_factory=list)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class CryptoCompareServer:
    """The fake streamer: an aiohttp app on ``127.0.0.1`` and an OS-assigned port.

    Args:
        api_key: the only key accepted.
        snapshot: trades sent right after subscribing, per subscription string (the real
            streamer replays the latest 20 trades of each trade subscription).
        heartbeat_interval_s: send ``999 HEARTBEAT`` this often (None: only on request).
        silent: accept websockets but never send anything (for idle-timeout tests);
            may be changed while running, affects new connections.
        reject_status: answer the upgrade request with this HTTP status instead.
        path: websocket path.
    """

    def __init__(self, api_key: str = "test-key", *,
                 snapshot: dict[str, list[dict[str, Any]]] | None = None,
                 heartbeat_interval_s: float | None = None, silent: bool = False,
                 reject_status: int | None = None, path: str = "/v2") -> None:
        self.api_key = api_key
        self.snapshot = snapshot or {}
        self.heartbeat_interval_s = heartbeat_interval_s
        self.silent = silent
        self.reject_status = reject_status
        self.path = path
        self.connections: list[Connection] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:<port>/v2`` (without the key)."""
        if self.port is None:
            raise RuntimeError("server not started")
        return f"ws://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> None:
        """Listen on ``127.0.0.1``, OS-assigned port."""
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        await self.drop_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> CryptoCompareServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- inspection

    @property
    def open_connections(self) -> list[Connection]:
        """Connections not closed yet."""
        return [c for c in self.connections if not c.closed.is_set()]

    @property
    def subscription_messages(self) -> list[list[dict[str, Any]]]:
        """The ``SubAdd`` frames received, per connection (in connection order)."""
        return [c.sub_messages for c in self.connections]

    def loaded_connections(self) -> list[Connection]:
        """Open connections whose subscription completed (``LOADCOMPLETE`` sent)."""
        return [c for c in self.open_connections if c.loaded.is_set()]

    async def wait_loaded(self, n: int = 1, timeout_s: float = 5.0) -> Connection:
        """Wait until ``n`` connections in total have completed a subscription; returns
        the latest open one."""
        await wait_until(lambda: sum(c.loaded.is_set() for c in self.connections) >= n
                         and bool(self.loaded_connections()),
                         timeout_s, f"{n} subscribed connection(s)")
        return self.loaded_connections()[-1]

    # ----------------------------------------------------------------- driving

    async def send_trades(self, trades: list[dict[str, Any]]) -> int:
        """Send trade frames to the connections subscribed to their ``0~M~FSYM~TSYM``
        (a frame without those fields goes to every subscribed connection).

        Returns:
            Number of frames sent.
        """
        n = 0
        for trade in trades:
            sub = trade_sub(trade)
            for conn in self.loaded_connections():
                if sub is None or sub in conn.subs:
                    n += await self._send(conn, trade)
        return n

    async def broadcast(self, frame: dict[str, Any] | str) -> int:
        """Send one frame (an object, or raw text sent as is) to every open connection."""
        n = 0
        for conn in self.open_connections:
            n += await self._send(conn, frame)
        return n

    async def send_heartbeat(self) -> int:
        """``{"TYPE":"999","MESSAGE":"HEARTBEAT","TIMEMS":...}`` to every open connection."""
        return await self.broadcast(_heartbeat())

    async def drop_all(self, abrupt: bool = False) -> None:
        """End every open connection: a websocket close (code 1001), or with ``abrupt``
        a TCP close without a close frame."""
        for conn in self.open_connections:
            if abrupt and conn.request.transport is not None:
                conn.request.transport.close()
            else:
                with contextlib.suppress(ConnectionError):
                    await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server restart")
        await wait_until(lambda: not self.open_connections, 5.0, "connections to close")

    # ----------------------------------------------------------------- protocol

    async def _send(self, conn: Connection, frame: dict[str, Any] | str) -> int:
        if conn.ws.closed:
            return 0
        text = frame if isinstance(frame, str) else orjson.dumps(frame).decode()
        try:
            await conn.ws.send_str(text)
        except ConnectionError:
            return 0
        conn.sent.append(frame)
        return 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.reject_status is not None:
            return web.Response(status=self.reject_status, text="rejected by test server")
        ws = web.WebSocketResponse(autoping=True, timeout=2.0)
        await ws.prepare(request)
        conn = Connection(ws=ws, request=request, api_key=request.query.get("api_key"))
        self.connections.append(conn)
        silent = self.silent
        heartbeats: asyncio.Task[None] | None = None
        try:
            if not silent:
                if conn.api_key != self.api_key:
                    await self._send(conn, {
                        "TYPE": "401", "MESSAGE": "UNAUTHORIZED", "PARAMETER": "format",
                        "INFO": "We only support JSON format with a valid api_key."})
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"UNAUTHORIZED")
                    return ws
                await self._send(conn, _welcome(len(self.open_connections)))
                if self.heartbeat_interval_s:
                    heartbeats = asyncio.create_task(self._heartbeats(conn))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    replies, loaded = self._on_client_frame(conn, msg.data)
                    if not silent:
                        await self._send_all(conn, replies, loaded)
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
            conn.closed.set()
        return ws

    async def _heartbeats(self, conn: Connection) -> None:
        assert self.heartbeat_interval_s
        while not conn.ws.closed:
            await asyncio.sleep(self.heartbeat_interval_s)
            await self._send(conn, _heartbeat())

    def _on_client_frame(self, conn: Connection, data: str
                         ) -> tuple[list[dict[str, Any]], bool]:
        """Record a client frame; returns the reply frames and whether it was a SubAdd."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            conn.frames.append(data)
            return [_error("500", "INVALID_JSON", data[:100])], False
        conn.frames.append(obj)
        action = obj.get("action") if isinstance(obj, dict) else None
        subs = obj.get("subs") if isinstance(obj, dict) else None
        if action not in ("SubAdd", "SubRemove") or not isinstance(subs, list):
            return [_error("500", "INVALID_PARAMETER", str(data)[:100])], False
        replies: list[dict[str, Any]] = []
        if action == "SubRemove":
            for sub in subs:
                if sub in conn.subs:
                    conn.subs.remove(sub)
                    replies.append({"TYPE": "17", "MESSAGE": "UNSUBSCRIBECOMPLETE", "SUB": sub})
                else:
                    replies.append(_error("500", "SUBSCRIPTION_UNRECOGNIZED", str(sub)))
            return replies, False
        conn.sub_messages.append(obj)
        for sub in subs:
            if not isinstance(sub, str) or not SUB_RE.match(sub):
                replies.append(_error("500", "INVALID_SUB", str(sub)[:100],
                                      "Subscription is invalid."))
            elif sub in conn.subs:
                replies.append(_error("500", "SUBSCRIPTION_ALREADY_ACTIVE", sub))
            else:
                conn.subs.append(sub)
                replies.extend(self.snapshot.get(sub, []))
                replies.append({"TYPE": "16", "MESSAGE": "SUBSCRIBECOMPLETE", "SUB": sub})
        replies.append({"TYPE": "3", "MESSAGE": "LOADCOMPLETE",
                        "INFO": "All your valid subs have been loaded."})
        return replies, True

    async def _send_all(self, conn: Connection, frames: list[dict[str, Any]],
                        loaded: bool = False) -> None:
        for frame in frames:
            await self._send(conn, frame)
        if loaded:
            conn.loaded.set()


def _welcome(sockets_active: int) -> dict[str, Any]:
    return {
        "TYPE": "20", "MESSAGE": "STREAMERWELCOME", "SERVER_UPTIME_SECONDS": 6,
        "SERVER_NAME": "local-test", "SERVER_TIME_MS": int(time.time() * 1000),
        "CLIENT_ID": 5509, "DATA_FORMAT": "JSON", "SOCKETS_ACTIVE": sockets_active,
        "SOCKETS_REMAINING": 0, "RATELIMIT_MAX_SECOND": 30, "RATELIMIT_MAX_MINUTE": 60,
    }


def _heartbeat() -> dict[str, Any]:
    return {"TYPE": "999", "MESSAGE": "HEARTBEAT", "TIMEMS": int(time.time() * 1000)}


def _error(type_: str, message: str, parameter: str, info: str = "") -> dict[str, Any]:
    d = {"TYPE": type_, "MESSAGE": message, "PARAMETER": parameter}
    if info:
        d["INFO"] = info
    return d
