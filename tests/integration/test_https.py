"""HTTPS (docs/security.md#https): a worker serving TLS from a self-signed certificate
made for the test; the API, the WebSocket stream (``wss://``) and the chart page in
Chromium work over it, plain HTTP on the same port does not, the optional redirect port
answers 308 to HTTPS, and a certificate that cannot be loaded stops the worker with an
error naming the setting."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import aiohttp
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import Stack
from tests.support.browser import chromium, watched_page
from tests.support.harness import free_port

pytestmark = pytest.mark.integration


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A P-256 certificate for 127.0.0.1 and localhost, valid for a day: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "marketflow test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_api_stream_and_chart_over_https(stack: Stack) -> None:
    cert, key = self_signed(stack.tmp)
    redirect_port = free_port()
    w = stack.worker(MARKETFLOW_WEB__TLS_CERT_FILE=str(cert),
                     MARKETFLOW_WEB__TLS_KEY_FILE=str(key),
                     MARKETFLOW_WEB__HTTPS_REDIRECT_PORT=str(redirect_port),
                     # the page must see /health 200: no breaker trip on a busy loop
                     # (test_chart_browser.py says why)
                     MARKETFLOW_REDIS__REQUEST_TIMEOUT_S="1").start()
    await w.wait_ready()
    port = stack.settings.web.port
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))  # verifies the name 127.0.0.1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
        async with s.get(f"{base}/health") as r:
            assert r.status == 200, await r.text()
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        # the certificate is checked: a client that does not trust it is refused
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with aiohttp.ClientSession() as plain, plain.get(f"{base}/health"):
                pass
        # plain HTTP on the TLS port gets no HTTP answer
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{port}/health") as r:
                await r.read()
        # the redirect listener: 308 to the same path and query over HTTPS
        async with s.get(f"http://127.0.0.1:{redirect_port}/ohlcv?symbol=BTCUSDT",
                         allow_redirects=False) as r:
            assert r.status == 308
            assert r.headers["Location"] == f"{base}/ohlcv?symbol=BTCUSDT"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with s.post(f"http://localhost:{redirect_port}/mode/test",
                          allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (
                308, f"https://localhost:{port}/mode/test")
        # the stream over wss://
        ws = await s.ws_connect(f"wss://127.0.0.1:{port}/stream")
        welcome = orjson.loads((await ws.receive(timeout=10)).data)
        assert welcome["type"] == "welcome"
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "r",
                                        "channel": "replay"}).decode())
        snap = orjson.loads((await ws.receive(timeout=10)).data)
        assert (snap["type"], snap["id"]) == ("snapshot", "r"), snap
        await ws.close()

    # the chart page: loads, connects its stream over wss://, reports the worker healthy
    async with chromium() as browser, watched_page(browser, base,
                                                    ignore_https_errors=True) as wp:
        page = wp.page
        await page.goto(f"{base}/")
        await page.wait_for_function(
            "() => document.getElementById('health').classList.contains('ok')",
            timeout=15_000)
        await asyncio.sleep(1.0)  # late errors (a refused stream, an asset) show up too
        assert wp.problems() == []
    assert w.stop() == 0, w.tail()


async def test_unloadable_certificate_stops_the_worker(stack: Stack) -> None:
    cert, _ = self_signed(stack.tmp)
    other_key = stack.tmp / "other.key"
    other_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    w = stack.worker(MARKETFLOW_WEB__TLS_CERT_FILE=str(cert),
                     MARKETFLOW_WEB__TLS_KEY_FILE=str(other_key)).start()
    assert await w.wait_exit() == 2, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert "web.tls_cert_file" in log and "PRIVATE KEY" not in log
