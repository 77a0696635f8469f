"""Limits across the cluster (docs/security.md#limits): two workers share one client's
rate-limit bucket, its ``/stream`` socket slots and its subscription slots through Redis;
with Redis killed each worker falls back to its own per-process bucket and keeps
answering."""

from __future__ import annotations

import asyncio
import math
import time
from functools import partial
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import Stack, until
from tests.integration.test_redis_outage import PrivateRedis, private_redis
from tests.support.harness import free_port

pytestmark = pytest.mark.integration

__all__ = ["private_redis"]  # the fixture, used by name

KEY = "it-limits-0123456789abcdef"
BURST = 4
RATE_PER_S = 0.01  # one token per 100 s: refills only bound the counts below


async def _get(port: int, path: str = "/openapi.json") -> int:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {KEY}"}) as r:
        await r.read()
        return r.status


async def _ws(s: aiohttp.ClientSession, port: int) -> tuple[aiohttp.ClientWebSocketResponse,
                                                            bool]:
    """A stream socket, and whether the worker kept it: after the welcome frame, a ping
    is answered with a pong (kept) or the socket is closed (refused)."""
    ws = await s.ws_connect(f"ws://127.0.0.1:{port}/stream",
                            headers={"Authorization": f"Bearer {KEY}"})
    welcome = orjson.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome", welcome
    await ws.send_str('{"op": "ping"}')
    msg = await ws.receive(timeout=10)
    if msg.type == aiohttp.WSMsgType.TEXT:
        assert orjson.loads(msg.data)["type"] == "pong", msg.data
        return ws, True
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    return ws, False


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    # a request-path Redis call slower than its timeout falls back to the process's own
    # bucket (by design); 2 s instead of 0.1 s keeps a loaded machine from doing that here
    return {"MARKETFLOW_REDIS__URL": redis_url, "MARKETFLOW_AUTH__ENABLED": "true",
            "MARKETFLOW_AUTH__API_KEYS": orjson.dumps([KEY]).decode(),
            "MARKETFLOW_REDIS__REQUEST_TIMEOUT_S": "2", **extra}


async def _two_workers(stack: Stack, env: dict[str, str]) -> tuple[Any, Any, int, int]:
    port1, port2 = stack.settings.web.port, free_port()
    w1 = stack.worker(**env).start()
    w2 = stack.worker(MARKETFLOW_WEB__PORT=str(port2), **env).start()
    await asyncio.gather(w1.wait_ready(), w2.wait_ready())
    return w1, w2, port1, port2


async def test_rate_limit_shared_by_two_workers(stack: Stack,
                                                private_redis: PrivateRedis) -> None:
    w1, w2, port1, port2 = await _two_workers(stack, _env(
        private_redis.url, MARKETFLOW_AUTH__RATE_LIMIT_PER_S=str(RATE_PER_S),
        MARKETFLOW_AUTH__RATE_LIMIT_BURST=str(BURST)))
    # one bucket of BURST tokens for the client, whichever worker it asks
    t0 = time.monotonic()
    statuses = [await _get(port) for port in (port1, port2) * BURST]
    extra = math.floor((time.monotonic() - t0) * RATE_PER_S)  # tokens refilled meanwhile
    assert statuses.count(200) <= BURST + extra, statuses
    assert statuses[:BURST] == [200] * BURST and set(statuses[BURST:]) <= {200, 429}
    assert statuses.count(429) >= BURST - extra, statuses

    # Redis killed: each worker counts for itself (a full bucket of its own), no 5xx
    private_redis.kill()
    for port in (port1, port2):
        t0 = time.monotonic()
        got = [await _get(port) for _ in range(BURST + 2)]
        extra = math.floor((time.monotonic() - t0) * RATE_PER_S)
        assert got[:BURST] == [200] * BURST, (port, got)
        assert got.count(200) <= BURST + extra, (port, got)
        assert set(got) <= {200, 429}, (port, got)
    w1.assert_alive()
    w2.assert_alive()
    for w in (w1, w2):
        assert "rate limit: Redis unavailable" in w.log_path.read_text(errors="replace")


async def test_stream_sockets_per_client_shared_by_two_workers(
        stack: Stack, private_redis: PrivateRedis) -> None:
    _, _, port1, port2 = await _two_workers(stack, _env(
        private_redis.url, MARKETFLOW_STREAM__MAX_CONNECTIONS_PER_CLIENT="2"))
    async with aiohttp.ClientSession() as s:
        ws1, kept1 = await _ws(s, port1)
        ws2, kept2 = await _ws(s, port2)
        assert kept1 and kept2
        for port in (port1, port2):  # a third one, on either worker: closed with 1013
            ws3, kept3 = await _ws(s, port)
            assert not kept3 and ws3.close_code == 1013, (port, ws3.close_code)
            await ws3.close()
        await ws1.close()  # its slot is freed: the client may open one again

        async def kept_socket() -> aiohttp.ClientWebSocketResponse | None:
            ws, kept = await _ws(s, port2)
            if not kept:
                await ws.close()
            return ws if kept else None

        ws4 = await until(kept_socket, 20, "a socket slot freed by a close", step=0.5)
        await ws4.close()
        await ws2.close()


async def _subscribe(ws: aiohttp.ClientWebSocketResponse, sub_id: str) -> dict[str, Any]:
    """Subscribe ``sub_id`` to the replay channel; the first frame about it (its snapshot,
    or an error frame)."""
    await ws.send_str(orjson.dumps({"op": "subscribe", "id": sub_id,
                                    "channel": "replay"}).decode())
    while True:
        frame = orjson.loads((await ws.receive(timeout=10)).data)
        if frame.get("id") == sub_id:
            return frame


async def test_stream_subscriptions_per_client_shared_by_two_workers(
        stack: Stack, private_redis: PrivateRedis) -> None:
    _, _, port1, port2 = await _two_workers(stack, _env(
        private_redis.url, MARKETFLOW_STREAM__MAX_SUBSCRIPTIONS_PER_CLIENT="3"))
    async with aiohttp.ClientSession() as s:
        ws1, _ = await _ws(s, port1)
        ws2, _ = await _ws(s, port2)
        for ws, sub_id in ((ws1, "a"), (ws1, "b"), (ws2, "c")):
            assert (await _subscribe(ws, sub_id))["type"] == "snapshot", sub_id
        for ws in (ws1, ws2):  # a fourth one, on either worker: an error frame
            frame = await _subscribe(ws, "d")
            assert frame["type"] == "error" and frame["code"] == "limit", frame
            assert "3 subscriptions per client" in frame["message"], frame
        async def subscribed(sub_id: str) -> dict[str, Any] | None:
            frame = await _subscribe(ws2, sub_id)
            return frame if frame["type"] == "snapshot" else None

        await ws1.send_str('{"op": "unsubscribe", "id": "a"}')  # frees a slot
        await until(partial(subscribed, "d"), 20, "a slot freed by unsubscribe", step=0.5)
        await ws1.close()  # closing a socket frees its subscriptions' slots
        await until(partial(subscribed, "e"), 20, "the slots of a closed socket", step=0.5)
        await ws2.close()
