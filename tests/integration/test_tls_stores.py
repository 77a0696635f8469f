"""TLS to PostgreSQL and Redis, and Redis AUTH (docs/security.md#tls-to-postgresql-and-redis):
``scripts/services.sh`` started on request with ``MF_TLS=1`` and ``MF_REDIS_PASSWORD`` (a
private state directory and free ports; the shared services are not touched).
``sslmode=verify-full`` and ``rediss://`` with the local CA work, a wrong CA is refused
with a certificate error, a wrong or missing password is refused, an ACL user works, and a
worker runs the pipeline over TLS with the password nowhere in its log."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.integration.conftest import REPO, SAMPLE, Stack
from tests.support.harness import free_port_run

pytestmark = pytest.mark.integration

PASSWORD = "it-redis-pass-0123456789"
#: a CA bundle that did not sign the local certificate
OTHER_CA = "/etc/ssl/certs/ca-certificates.crt"
TRADES = SAMPLE / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"


@dataclass
class TlsServices:
    env: dict[str, str]
    ca: Path
    pg_port: int
    redis_tls_port: int

    def dsn(self, ca: str | Path) -> str:
        return (f"postgresql://marketflow:marketflow@127.0.0.1:{self.pg_port}/marketflow"
                f"?sslmode=verify-full&sslrootcert={ca}")

    def redis_url(self, ca: str | Path, auth: str = f":{PASSWORD}") -> str:
        at = f"{auth}@" if auth else ""
        return f"rediss://{at}127.0.0.1:{self.redis_tls_port}/0?ssl_ca_certs={ca}"


async def _services(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "services.sh"), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.fixture
async def tls_services(tmp_path: Path) -> AsyncIterator[TlsServices]:
    pg_port, redis_port = free_port_run(1), free_port_run(2)
    env = {**os.environ, "MF_VAR_DIR": str(tmp_path / "var"), "MF_PG_PORT": str(pg_port),
           "MF_REDIS_PORT": str(redis_port), "MF_TLS": "1", "MF_REDIS_PASSWORD": PASSWORD}
    try:
        out = await _services(env, "up", "redis")
        assert f"TLS on 127.0.0.1:{redis_port + 1}" in out, out
        await _services(env, "up", "postgres")
        yield TlsServices(env, tmp_path / "var" / "tls" / "ca.pem", pg_port, redis_port + 1)
    finally:
        for name in ("postgres", "redis"):
            await _services(env, "down", name)


async def test_verify_full_wrong_ca_and_auth(tls_services: TlsServices) -> None:
    t = tls_services
    conn = await asyncpg.connect(t.dsn(t.ca))
    try:
        assert await conn.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await asyncpg.connect(t.dsn(OTHER_CA))

    r = aioredis.from_url(t.redis_url(t.ca))
    try:
        assert await r.ping() is True
        # an ACL user of its own, over the same TLS port
        await r.execute_command("ACL", "SETUSER", "mf-reader", "on", ">reader-pass-0123",
                                "~*", "+@read", "+ping", "+hello")
    finally:
        await r.aclose()
    reader = aioredis.from_url(t.redis_url(t.ca, auth="mf-reader:reader-pass-0123"))
    try:
        assert await reader.ping() is True
        with pytest.raises(ResponseError, match="no permissions"):
            await reader.set("x", "1")  # read-only user
    finally:
        await reader.aclose()
    for url, error, text in (
            (t.redis_url(OTHER_CA), RedisConnectionError, "certificate verify failed"),
            (t.redis_url(t.ca, auth=":wrong-password"), AuthenticationError, "invalid"),
            (t.redis_url(t.ca, auth=""), AuthenticationError, "(?i)auth")):
        bad = aioredis.from_url(url)
        try:
            with pytest.raises(error, match=text):
                await bad.ping()
        finally:
            await bad.aclose()


async def test_pipeline_over_tls(stack: Stack, tls_services: TlsServices) -> None:
    t = tls_services
    stack.env["MARKETFLOW_DATABASE__DSN"] = t.dsn(t.ca)
    stack.env["MARKETFLOW_REDIS__URL"] = t.redis_url(t.ca)
    w = stack.worker().start()
    await w.wait_ready()
    status, health = await stack.http("/health")
    assert status == 200, health
    await stack.replay_cli("--namespace", "", str(TRADES))
    # prices in Redis and bars in TimescaleDB, both reached over TLS
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        s1, price = await stack.http("/prices/latest/binance/BTCUSDT")
        conn = await asyncpg.connect(t.dsn(t.ca))
        try:
            n = await conn.fetchval("SELECT count(*) FROM bars_1m")
        finally:
            await conn.close()
        if (s1 == 200 and n) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert s1 == 200 and price["exchange"] == "binance", price
    assert n > 0
    assert w.stop() == 0, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert PASSWORD not in log
