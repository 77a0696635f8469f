"""HTTP API access control, JSON 405 and the OpenAPI document through a real worker.

Only views built on :class:`views.base.ApiView` (``/openapi.json``, ``/docs`` for now)
are protected; the other views answer as before until they are migrated.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from openapi_spec_validator import validate

from app.factory import create_app
from core.config import load_settings
from tests.integration.conftest import Stack
from views.openapi import build_spec

pytestmark = pytest.mark.integration

KEY = "it-key-0123456789abcdef"
SECRET = "it-secret-0123456789abcdef0123456789"
#: views still in progress elsewhere (views/udf.py, uncommitted) whose PATHS entries in
#: views/openapi.py are to be written with them: remove each one once documented
PENDING_DOCS: set[str] = set()


async def request(stack: Stack, method: str, path: str, token: str | None = None,
                  json_body: Any = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(
            method, stack.base_url + path, headers=headers, json=json_body) as r:
        raw = await r.read()
        body: Any = raw.decode(errors="replace")
        if raw and r.content_type == "application/json":
            body = orjson.loads(raw)
        return r.status, dict(r.headers), body


def assert_error(body: Any, status: int) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["status"] == status and body["error"]["message"], body


def test_every_registered_view_is_documented() -> None:
    app = create_app(load_settings())
    spec = build_spec()
    validate(spec)
    routes = set(app.web.views) - PENDING_DOCS
    assert routes <= set(spec["paths"]), routes - set(spec["paths"])


async def test_auth_off_views_unchanged_docs_and_405(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    # views answer without a token; errors in the one documented shape
    assert (await stack.http("/health"))[0] == 200
    status, body = await stack.http("/prices/latest/NOPEUSDT")
    assert status == 404 and body["error"]["status"] == 404
    assert body["error"]["param"] == "symbol" and "NOPEUSDT" in body["error"]["message"]
    status, body = await stack.http("/ohlcv")
    assert status == 400 and body["error"]["param"] == "symbol"
    status, body = await stack.http("/prices/average/BTCUSDT?period=7x")
    assert status == 400 and body["error"]["param"] == "period"
    assert (await stack.http("/mode"))[0] == 200
    # the document
    status, headers, spec = await request(stack, "GET", "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    validate(spec)
    for path in ("/prices/latest/{symbol}", "/prices/latest/{exchange}/{symbol}", "/ohlcv",
                 "/prices/{stat}/{symbol}", "/prices/{stat}/{exchange}/{symbol}",
                 "/health", "/metrics", "/mode", "/mode/{mode}"):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/health"]["get"]["security"] == []
    status, headers, page = await request(stack, "GET", "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<table>" in page and "/prices/latest/{exchange}/{symbol}" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # methods
    status, headers, body = await request(stack, "POST", "/openapi.json", json_body={"a": 1})
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
    assert headers["Content-Type"].startswith("application/json")
    assert body == {"error": {"status": 405, "message": "method POST not allowed"}}
    for method in ("PUT", "DELETE", "PATCH"):
        assert (await request(stack, method, "/docs"))[0] == 405
    status, headers, _ = await request(stack, "HEAD", "/openapi.json")
    assert status == 200
    status, headers, _ = await request(stack, "OPTIONS", "/openapi.json")
    assert status == 204 and headers["Allow"] == "GET, HEAD, OPTIONS"


async def test_auth_enabled_bearer_key_and_jwt(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_AUTH__ENABLED="true",
                     MARKETFLOW_AUTH__API_KEYS=orjson.dumps([KEY]).decode(),
                     MARKETFLOW_AUTH__JWT_HS256_SECRET=SECRET).start()
    await w.wait_ready()
    now = int(time.time())
    good_jwt = jwt.encode({"sub": "it-client", "exp": now + 300}, SECRET, algorithm="HS256")
    expired = jwt.encode({"sub": "it-client", "exp": now - 60}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "it-client"}, "x" * 40, algorithm="HS256")
    for path in ("/openapi.json", "/docs"):
        status, headers, body = await request(stack, "GET", path)
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="marketflow"'
        assert_error(body, 401)
        for bad in (KEY + "x", "wrong-but-long-enough-key", expired, forged):
            status, headers, body = await request(stack, "GET", path, token=bad)
            assert status == 401, (path, status, body)
            assert 'error="invalid_token"' in headers["WWW-Authenticate"]
            assert_error(body, 401)
            assert bad not in str(body) and bad not in headers["WWW-Authenticate"]
        assert (await request(stack, "GET", path, token=KEY))[0] == 200
        assert (await request(stack, "GET", path, token=good_jwt))[0] == 200
    status, _, body = await request(stack, "GET", "/openapi.json", token=expired)
    assert body["error"]["message"] == "token expired"
    # /health stays open; a wrong method is 405 before any token check
    status, _, body = await request(stack, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert (await request(stack, "POST", "/openapi.json", json_body={}))[0] == 405
    # tokens never reach the log
    log = w.log_path.read_text(errors="replace")
    assert KEY not in log and SECRET not in log and good_jwt not in log


async def test_rate_limit_429_with_retry_after(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_AUTH__ENABLED="true",
                     MARKETFLOW_AUTH__API_KEYS=orjson.dumps([KEY]).decode(),
                     MARKETFLOW_AUTH__RATE_LIMIT_PER_S="2",
                     MARKETFLOW_AUTH__RATE_LIMIT_BURST="2",
                     # the bucket of this process (the shared one: test_cluster_limits.py;
                     # a Redis call slower than the request timeout falls back to this one)
                     MARKETFLOW_AUTH__RATE_LIMIT_SHARED="false").start()
    await w.wait_ready()
    # bursts of 8 concurrent requests: the token bucket (2 tokens, 2 per second) lets
    # through the first 2 and at most 2 more per second the burst took (measured, so a
    # slow machine only widens the bound), refusing the others with 429
    results: list[tuple[int, dict[str, str], Any]] = []
    for attempt in range(3):  # a burst that took > 3 s may see no 429: send another
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(request(stack, "GET", "/openapi.json", token=KEY) for _ in range(8)))
        took = time.monotonic() - t0
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 429}, statuses
        passed = statuses.count(200)
        assert passed <= 2 + math.floor(2 * took), (statuses, took)
        if attempt == 0:
            assert passed >= 2, statuses  # the full bucket's 2 tokens
        if 429 in statuses:
            break
    _, headers, body = next(r for r in results if r[0] == 429)
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    assert_error(body, 429)
    await asyncio.sleep(retry_after)
    assert (await request(stack, "GET", "/openapi.json", token=KEY))[0] == 200
    # /health is not limited
    statuses = await asyncio.gather(*(request(stack, "GET", "/health") for _ in range(4)))
    assert [s[0] for s in statuses] == [200] * 4


async def test_invalid_auth_settings_stop_the_worker(stack: Stack) -> None:
    w = stack.worker(MARKETFLOW_AUTH__ENABLED="true",
                     MARKETFLOW_AUTH__JWT_HS256_SECRET="short-secret-value").start()
    assert await w.wait_exit() == 2, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert "auth.jwt_hs256_secret" in log and "short-secret-value" not in log


READER = "it-reader-0123456789abcdef"
OPERATOR = "it-operator-0123456789abcdef"


async def _ws_frames(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    return [orjson.loads((await ws.receive(timeout=10)).data) for _ in range(n)]


async def test_scopes_restrictions_and_security_headers(stack: Stack) -> None:
    """Scopes (docs/security.md#scopes): a read-only key reads but gets 403 naming the
    ``control`` scope on replay control; a JWT's ``scope`` claim grants ``control``;
    restrictions give 403 on other symbols or exchanges, over HTTP and as ``forbidden``
    error frames on the stream (the socket stays usable); every response carries the
    security headers."""
    keys = [KEY, {"key": READER, "name": "reader", "symbols": ["BTCUSDT"]},
            {"key": OPERATOR, "name": "operator", "scopes": ["read", "control"],
             "exchanges": ["binance"]}]
    w = stack.worker(MARKETFLOW_AUTH__ENABLED="true",
                     MARKETFLOW_AUTH__API_KEYS=orjson.dumps(keys).decode(),
                     MARKETFLOW_AUTH__JWT_HS256_SECRET=SECRET).start()
    await w.wait_ready()
    now = int(time.time())

    def token(scope: str) -> str:
        return jwt.encode({"sub": "it-jwt", "exp": now + 300, "scope": scope}, SECRET,
                          algorithm="HS256")

    assert (await request(stack, "GET", "/mode", token=READER))[0] == 200
    for who in (READER, token("read")):
        status, headers, body = await request(stack, "POST", "/replay/pause", token=who)
        assert status == 403, body
        assert body["error"]["message"] == "this credential lacks the 'control' scope"
        assert 'error="insufficient_scope", scope="control"' in headers["WWW-Authenticate"]
    for who in (OPERATOR, KEY, token("read control")):  # allowed: no replay runs, so 409
        status, _, body = await request(stack, "POST", "/replay/pause", token=who)
        assert status not in (401, 403), body
    status, _, body = await request(stack, "GET", "/mode", token=token("control"))
    assert status == 403 and "'read'" in body["error"]["message"]

    # restrictions: the reader only BTCUSDT, the operator only binance
    for path in ("/prices/latest/ETHUSDT", "/ohlcv?symbol=ETHUSDT",
                 "/udf/history?symbol=ETHUSDT&resolution=1&from=1&to=2"):
        status, _, body = await request(stack, "GET", path, token=READER)
        assert status == 403 and "'ETHUSDT'" in body["error"]["message"], (path, body)
    status, _, body = await request(stack, "GET", "/prices/latest/BTCUSDT", token=READER)
    assert status == 404, body  # allowed; no price seen yet
    status, _, body = await request(stack, "GET", "/prices/latest/BTCUSDT", token=OPERATOR)
    assert status == 403 and "name one" in body["error"]["message"], body
    status, _, body = await request(stack, "GET", "/prices/latest/kraken/BTCUSDT",
                                    token=OPERATOR)
    assert status == 403 and "'kraken'" in body["error"]["message"], body
    assert (await request(stack, "GET", "/prices/latest/binance/BTCUSDT",
                          token=OPERATOR))[0] == 404

    # the stream: forbidden subscriptions are error frames, the socket stays usable
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://127.0.0.1:{stack.settings.web.port}/stream",
                                headers={"Authorization": f"Bearer {READER}"})
        (welcome,) = await _ws_frames(ws, 1)
        assert welcome["type"] == "welcome" and welcome["auth_required"] is False
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "e", "channel": "bars",
                                        "symbol": "ETHUSDT", "interval": "1m"}).decode())
        (err,) = await _ws_frames(ws, 1)
        assert (err["type"], err["code"], err["id"]) == ("error", "forbidden", "e"), err
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "p", "channel": "prices",
                                        "symbols": ["BTCUSDT", "ETHUSDT"]}).decode())
        (err,) = await _ws_frames(ws, 1)
        assert err["code"] == "forbidden" and "'ETHUSDT'" in err["message"], err
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "b", "channel": "bars",
                                        "symbol": "BTCUSDT", "interval": "1m"}).decode())
        (snap,) = await _ws_frames(ws, 1)
        assert (snap["type"], snap["id"]) == ("snapshot", "b"), snap
        await ws.close()
        # first-frame auth needs the read scope too
        ws = await s.ws_connect(f"ws://127.0.0.1:{stack.settings.web.port}/stream")
        await _ws_frames(ws, 1)
        await ws.send_str(orjson.dumps({"op": "auth", "token": token("control")}).decode())
        (err,) = await _ws_frames(ws, 1)
        assert err["code"] == "unauthorized" and "'read'" in err["message"], err
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4001

    # security headers on JSON, errors and the chart page
    for path, who in (("/mode", READER), ("/ohlcv?symbol=ETHUSDT", READER),
                      ("/health", None)):
        _, headers, _ = await request(stack, "GET", path, token=who)
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Content-Security-Policy"].startswith("default-src 'none'"), path
        assert headers["X-Frame-Options"] == "DENY"
    _, headers, _ = await request(stack, "GET", "/")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "*" not in csp
    assert "Access-Control-Allow-Origin" not in headers  # CORS off
    log = w.log_path.read_text(errors="replace")
    assert READER not in log and OPERATOR not in log and SECRET not in log
