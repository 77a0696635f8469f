"""``GET /stream``: the WebSocket stream of bars, latest prices and the replay state
(protocol: ``docs/stream.md``; machine-readable: ``/asyncapi.json``).

The view upgrades the request, registers a :class:`views.stream_hub.Connection` with the
worker's hub, and reads client frames (:mod:`views.stream_protocol`) until the socket
closes; a separate task (:meth:`Connection.writer`) sends what the hub queues. A plain
``GET`` without the upgrade is answered 426.

Auth (``[auth]``): a handshake with ``Authorization`` is checked like any request (401
before the upgrade); with auth on and no header, the first frame must be ``auth`` within
``stream.auth_timeout_s``, or the socket is closed with code 4001.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from faust.web import Request, Response

from core.errors import StorageUnavailable
from core.timeutil import now_ms
from views.auth import AccessDenied, Forbidden, Principal
from views.base import CLIENT_ID_KEY, ApiView, Routes
from views.stream_hub import Connection
from views.stream_protocol import (
    Auth,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    error_frame,
    parse_frame,
)

__all__ = ["CLOSE_UNAUTHORIZED", "MAX_FRAME_BYTES", "ROUTES", "Stream"]

log = logging.getLogger(__name__)

#: largest client frame (bytes); a larger one closes the socket (1009)
MAX_FRAME_BYTES = 16 * 1024
#: close code: the worker or the client has too many sockets (RFC 6455 7.4.1 "try again")
CLOSE_TRY_LATER = 1013
#: close code: auth on and no valid ``auth`` first frame
CLOSE_UNAUTHORIZED = 4001
#: longest a single send may block before the client counts as slow (seconds)
SEND_TIMEOUT_S = 10.0


class Stream(ApiView):
    """The WebSocket stream."""

    auth_in_first_frame = True

    async def get(self, request: Request) -> Response:
        raw: Any = request
        # no per-message deflate: the frames are small, and compressing each one for
        # each client would cost more CPU than the whole fan-out
        ws = web.WebSocketResponse(heartbeat=self.ctx.settings.stream.heartbeat_s,
                                   max_msg_size=MAX_FRAME_BYTES, compress=False)
        if not ws.can_prepare(raw).ok:
            return self.fail(426, "GET /stream is a WebSocket: send Upgrade: websocket "
                                  "(see docs/stream.md)", headers={"Upgrade": "websocket"})
        hub = self.ctx.stream_hub
        settings = self.ctx.settings
        await ws.prepare(raw)
        client = raw.get(CLIENT_ID_KEY) or f"addr:{raw.remote}"
        conn = Connection(ws, client, settings.stream.max_queued_frames, SEND_TIMEOUT_S,
                          raw.transport, hub.batcher)
        if hub.full:
            await conn.close(CLOSE_TRY_LATER, "too many connections", "too_many_connections")
            return ws  # type: ignore[return-value]
        need_auth = settings.auth.enabled and raw.get(CLIENT_ID_KEY) is None
        hub.add(conn)
        writer = conn.writer_task = asyncio.ensure_future(conn.writer())
        try:
            s = settings.stream
            conn.control({"type": "welcome", "server_time_ms": now_ms(),
                          "auth_required": need_auth,
                          "limits": {"max_subscriptions": s.max_subscriptions,
                                     "max_updates_per_s": s.max_updates_per_s,
                                     "max_symbols": s.max_symbols,
                                     "heartbeat_s": s.heartbeat_s}})
            principal = self.principal(raw)
            if need_auth:
                got = await self._first_frame_auth(conn, raw)
                if got is None:
                    return ws  # type: ignore[return-value]
                principal = got
            if not await hub.admit_client(conn):
                await conn.close(CLOSE_TRY_LATER, "too many connections for this client",
                                 "client_connections")
                return ws  # type: ignore[return-value]
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._handle(conn, msg.data, principal)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    conn.control(error_frame("bad_request", "text frames only (JSON)"))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    log.info("stream: socket %d error: %s", conn.conn_id, ws.exception())
                    break
        finally:
            hub.remove(conn)
            writer.cancel()
            if not ws.closed:
                await ws.close()
        return ws  # type: ignore[return-value]

    async def _first_frame_auth(self, conn: Connection, raw: Any) -> Principal | None:
        """Wait for the ``auth`` frame (its token needs the ``read`` scope); on anything
        else close the socket (4001) and return None."""
        reason = "auth required: send {\"op\": \"auth\", \"token\": ...} first"
        try:
            msg = await conn.ws.receive(timeout=self.ctx.settings.stream.auth_timeout_s)
        except TimeoutError:
            msg = None
            reason = "auth required: no auth frame in time"
        if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
            try:
                req = parse_frame(msg.data, max_symbols=self.ctx.settings.stream.max_symbols)
            except ProtocolError as exc:
                req = None
                reason = exc.message
            if isinstance(req, Auth):
                try:
                    principal = await self.ctx.access_guard.acheck(
                        f"Bearer {req.token}", raw.remote, time.monotonic())
                    conn.client_id = principal.client_id
                    conn.control({"type": "authenticated"})
                    return principal
                except AccessDenied as exc:
                    reason = exc.message
        await conn.ws.send_json(error_frame("unauthorized", reason))
        await conn.close(CLOSE_UNAUTHORIZED, "unauthorized", "unauthorized")
        return None

    async def _handle(self, conn: Connection, text: str, principal: Principal) -> None:
        """One client frame; errors become error frames (the socket stays open). A
        subscription outside ``principal``'s symbols/exchanges gets ``forbidden``."""
        s = self.ctx.settings.stream
        hub = self.ctx.stream_hub
        try:
            req = parse_frame(text, max_symbols=s.max_symbols)
            if isinstance(req, Ping):
                conn.control({"type": "pong", "server_time_ms": now_ms()})
            elif isinstance(req, Auth):
                conn.control({"type": "authenticated"})  # already admitted
            elif isinstance(req, Unsubscribe):
                if not hub.unsubscribe(conn, req.sub_id):
                    raise ProtocolError("unknown_id", f"no subscription {req.sub_id!r}",
                                        req.sub_id)
                conn.control({"type": "unsubscribed", "id": req.sub_id})
            elif isinstance(req, Subscribe):
                if req.sub_id in conn.subs:
                    raise ProtocolError("duplicate_id", f"subscription {req.sub_id!r} exists",
                                        req.sub_id)
                if len(conn.subs) >= s.max_subscriptions:
                    raise ProtocolError("limit", f"at most {s.max_subscriptions} "
                                                 "subscriptions per connection", req.sub_id)
                try:
                    if req.channel == "bars":
                        principal.check_market(req.symbol, req.exchange)
                    for item in req.items:
                        principal.check_market(item.symbol, item.exchange)
                except Forbidden as exc:
                    raise ProtocolError("forbidden", exc.message, req.sub_id) from None
                if not await hub.admit_subscription(conn, req.sub_id):
                    raise ProtocolError("limit", f"at most {s.max_subscriptions_per_client} "
                                                 "subscriptions per client", req.sub_id)
                try:
                    await hub.subscribe(conn, req)
                except StorageUnavailable as exc:
                    raise ProtocolError("unavailable", f"{exc}: subscribe again",
                                        req.sub_id) from exc
        except ProtocolError as exc:
            conn.control(error_frame(exc.code, exc.message, exc.sub_id))


ROUTES: Routes = [("/stream", Stream)]
