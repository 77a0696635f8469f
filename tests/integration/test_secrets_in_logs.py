"""Secrets hygiene (docs/security.md#secrets): a full run with every secret set (API keys,
one of them from a file, the JWT secret from a file, the Redis password, TLS to PostgreSQL
(the DSN from a file) and Redis, the CryptoCompare API key from a file, SASL_SSL to Kafka
with the SCRAM password from a file) and every view asked with good and bad credentials;
no secret appears in the worker's log, in any response (bodies and headers, errors
included), in ``/health``, ``/metrics`` or the OpenAPI document."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tests.integration.conftest import PrivateKafka, Stack
from tests.integration.test_kafka_security import PASSWORD as KAFKA_PASSWORD
from tests.integration.test_kafka_security import sasl_env, sasl_kafka, secret_file
from tests.integration.test_tls_stores import PASSWORD, TlsServices, tls_services
from tests.support.cc_server import CryptoCompareServer, make_trade

pytestmark = pytest.mark.integration

__all__ = ["sasl_kafka", "tls_services"]  # the fixtures, used by name

KEY = "it-secret-key-bare-0123456789"
FILE_KEY = "it-secret-key-file-0123456789"
JWT_SECRET = "it-secret-jwt-0123456789abcdef0123456789"
CC_KEY = "it-secret-cryptocompare-0123456789"


async def _ask(base: str, path: str, token: str | None, method: str = "GET") -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, base + path,
                                                       headers=headers) as r:
        body = await r.text(errors="replace")
        return f"{r.status} {dict(r.headers)} {body}"


async def test_no_secret_anywhere_in_a_full_run(stack: Stack, tls_services: TlsServices,
                                               sasl_kafka: PrivateKafka) -> None:
    t = tls_services
    (stack.tmp / "jwt-secret").write_text(JWT_SECRET + "\n")
    (stack.tmp / "file-key").write_text(FILE_KEY + "\n")
    # the DSN (with its password) and the CryptoCompare key come from files (*_file)
    (stack.tmp / "dsn").write_text(t.dsn(t.ca) + "\n")
    (stack.tmp / "cc-key").write_text(CC_KEY + "\n")
    keys: list[Any] = [KEY, {"key_file": str(stack.tmp / "file-key"), "name": "filed",
                             "scopes": ["read"]}]
    secrets = [KEY, FILE_KEY, JWT_SECRET, CC_KEY, PASSWORD, KAFKA_PASSWORD]
    kafka = sasl_env(sasl_kafka, secret_file(stack.tmp, "kafka-pw", KAFKA_PASSWORD))
    async with CryptoCompareServer(api_key=CC_KEY) as server:
        w = stack.worker(
            **kafka,
            MARKETFLOW_DATABASE__DSN_FILE=str(stack.tmp / "dsn"),
            MARKETFLOW_REDIS__URL=t.redis_url(t.ca),
            MARKETFLOW_AUTH__ENABLED="true",
            MARKETFLOW_AUTH__API_KEYS=orjson.dumps(keys).decode(),
            MARKETFLOW_AUTH__JWT_HS256_SECRET_FILE=str(stack.tmp / "jwt-secret"),
            MARKETFLOW_AUTH__RATE_LIMIT_PER_S="1000",
            MARKETFLOW_FEEDS__EXCHANGES="[]",
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__ENABLED="true",
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__URL=server.url,
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__API_KEY_FILE=str(stack.tmp / "cc-key"),
            MARKETFLOW_FEEDS__CRYPTOCOMPARE__SUBS='["0~Coinbase~BTC~USD"]').start()
        await w.wait_ready()
        base = stack.base_url
        seen = [await _ask(base, "/mode/live", KEY, "POST")]
        await server.wait_loaded(1, timeout_s=60)  # a loaded machine: TLS, SASL, leader
        await server.send_trades([make_trade("Coinbase", "BTC", "USD", price=97001.5,
                                             qty=0.25, ts_s=int(time.time()),
                                             trade_id="s1")])
        good_jwt = jwt.encode({"sub": "it", "exp": int(time.time()) + 300, "scope": "read"},
                              JWT_SECRET, algorithm="HS256")
        expired = jwt.encode({"sub": "it", "exp": int(time.time()) - 600}, JWT_SECRET,
                             algorithm="HS256")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = await _ask(base, "/prices/latest/coinbase/BTCUSD", FILE_KEY)
            if answer.startswith("200"):
                break
            await asyncio.sleep(0.5)
        seen.append(answer)
        assert answer.startswith("200"), answer
        for path in ("/health", "/openapi.json", "/docs", "/metrics", "/mode",
                     "/ohlcv?symbol=BTCUSD", "/udf/config", "/asyncapi.json"):
            for token in (KEY, FILE_KEY, good_jwt, expired, None, KEY + "x", FILE_KEY[:-1],
                          JWT_SECRET):
                seen.append(await _ask(base, path, token))
        seen.append(await _ask(base, "/mode/test", FILE_KEY, "POST"))  # 403: read only
        assert w.stop() == 0, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert server.subscription_messages  # the feed connected with its key
    for secret in secrets:
        assert secret not in log, f"a secret ({secret[:12]}...) is in the worker log"
        for text in seen:
            assert secret not in text, (secret[:12], text[:300])
