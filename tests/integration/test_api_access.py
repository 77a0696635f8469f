"""HTTP API access control, JSON 405 and the OpenAPI document through a real worker.

Only views built on :class:`views.base.ApiView` (``/openapi.json``, ``/docs`` for now)
are protected; the other views answer as before until they are migrated.
"""

from __future__ import annotations

import asyncio
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
                     MARKETFLOW_AUTH__RATE_LIMIT_BURST="2").start()
    await w.wait_ready()
    results = await asyncio.gather(
        *(request(stack, "GET", "/openapi.json", token=KEY) for _ in range(3)))
    assert sorted(r[0] for r in results) == [200, 200, 429]
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
    assert w.proc is not None
    deadline = time.monotonic() + 60
    while w.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    w.ended_on_purpose = True
    assert w.proc.returncode == 2, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert "auth.jwt_hs256_secret" in log and "short-secret-value" not in log
