"""Kafka security (docs/security.md#kafka): a Kafka of the test's own started by
``scripts/services.sh`` with ``MF_KAFKA_SASL=1`` (a SASL_SSL listener with SCRAM users made
at format time, and an SSL listener that requires client certificates, both with
certificates of a CA generated for the test). The whole pipeline (worker, replay) runs over
SASL_SSL with every bar equal to the clean computation; each mechanism and client
certificates work; a wrong password, a wrong CA and a missing client certificate are
refused; a worker with a wrong password stops with an error that says why, and no secret
appears in its log."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from core.admin import ensure_topics
from core.config import BrokerSection, Settings
from core.errors import ConfigError
from core.kafka_security import check_security, client_security
from tests.integration.conftest import PrivateKafka, Stack, _settings_with
from tests.integration.test_faults_db_and_workers import (
    FILES,
    assert_exactly_once_and_clean,
    clean_bars,
    replay_args,
    wait_all_bars,
)

pytestmark = pytest.mark.integration

PASSWORD = "it-kafka-scram-0123456789"
WRONG = "it-wrong-password-987654321"
#: a CA bundle that did not sign the test's broker certificate
OTHER_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
async def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateKafka]:
    """One private SASL_SSL/SSL broker for the module's tests (each uses its own topics)."""
    k = PrivateKafka(tmp_path_factory.mktemp("kafka-sasl"), sasl_password=PASSWORD)
    out = await k.up()
    assert f"SASL_SSL on 127.0.0.1:{k.sasl_port}" in out, out
    assert PASSWORD not in out
    try:
        yield k
    finally:
        k.kill_all()


def sasl_env(k: PrivateKafka, password_file: Path, mechanism: str = "SCRAM-SHA-512"
             ) -> dict[str, str]:
    """``MARKETFLOW_BROKER__*`` for the SASL_SSL listener, the password read from a file."""
    return {"MARKETFLOW_BROKER__URL": f"kafka://127.0.0.1:{k.sasl_port}",
            "MARKETFLOW_BROKER__SECURITY_PROTOCOL": "SASL_SSL",
            "MARKETFLOW_BROKER__SSL_CAFILE": str(k.tls_dir / "ca.pem"),
            "MARKETFLOW_BROKER__SASL_MECHANISM": mechanism,
            "MARKETFLOW_BROKER__SASL_USERNAME": "marketflow",
            "MARKETFLOW_BROKER__SASL_PASSWORD_FILE": str(password_file)}


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    p = tmp_path / name
    p.write_text(value + "\n")
    p.chmod(0o600)
    return p


async def roundtrip(settings: Settings, topic: str) -> None:
    """Create ``topic`` (admin), write one record (producer) and read it back (consumer),
    all with ``settings.broker``'s security."""
    sec = client_security(settings.broker)
    settings.topics.ticks = topic
    await ensure_topics(settings)
    prod = AIOKafkaProducer(bootstrap_servers=settings.broker.bootstrap_servers, **sec)
    await prod.start()
    try:
        await prod.send_and_wait(topic, b"hello", key=b"k", partition=0)
    finally:
        await prod.stop()
    cons = AIOKafkaConsumer(bootstrap_servers=settings.broker.bootstrap_servers,
                            enable_auto_commit=False, auto_offset_reset="earliest",
                            **client_security(settings.broker))
    await cons.start()
    try:
        tp = TopicPartition(topic, 0)
        cons.assign([tp])
        got = await cons.getone()
        assert (got.key, got.value) == (b"k", b"hello")
    finally:
        await cons.stop()


def broker(k: PrivateKafka, **kw: Any) -> BrokerSection:
    return BrokerSection(**{"ssl_cafile": k.tls_dir / "ca.pem", **kw})


async def test_mechanisms_client_certificates_and_refusals(sasl_kafka: PrivateKafka,
                                                           stack: Stack,
                                                           tmp_path: Path) -> None:
    k = sasl_kafka
    sasl_url = f"kafka://127.0.0.1:{k.sasl_port}"
    ssl_url = f"kafka://127.0.0.1:{k.ssl_port}"
    good = {
        "PLAIN": broker(k, url=sasl_url, security_protocol="SASL_SSL",
                        sasl_mechanism="PLAIN", sasl_username="marketflow",
                        sasl_password=PASSWORD),
        "SCRAM-SHA-256": broker(k, url=sasl_url, security_protocol="SASL_SSL",
                                sasl_mechanism="SCRAM-SHA-256", sasl_username="marketflow",
                                sasl_password_file=secret_file(tmp_path, "pw", PASSWORD)),
        "SSL client certificate": broker(
            k, url=ssl_url, security_protocol="SSL", ssl_certfile=k.tls_dir / "client.pem",
            ssl_keyfile=k.tls_dir / "client.key"),
    }
    for i, b in enumerate(good.values()):
        s = stack.settings.model_copy(update={"broker": b, "topics": stack.settings.topics
                                              .model_copy()})
        await check_security(b)
        await roundtrip(s, f"{stack.name}-sec-{i}")
    # wrong password: refused, the error names the user and the reason, not the secret
    wrong = broker(k, url=sasl_url, security_protocol="SASL_SSL",
                   sasl_mechanism="SCRAM-SHA-256", sasl_username="marketflow",
                   sasl_password=WRONG)
    with pytest.raises(ConfigError) as err:
        await check_security(wrong)
    text = str(err.value)
    assert "SaslAuthenticationFailed" in text and "'marketflow'" in text, text
    assert WRONG not in text and PASSWORD not in text
    # ensure_topics (the first call of every marketflow process) stops with that error too
    with pytest.raises(ConfigError, match="SaslAuthenticationFailed"):
        await ensure_topics(stack.settings.model_copy(update={"broker": wrong}))
    # a CA that did not sign the broker's certificate
    other = broker(k, url=sasl_url, security_protocol="SASL_SSL", ssl_cafile=OTHER_CA,
                   sasl_username="marketflow", sasl_password=PASSWORD)
    with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED"):
        await check_security(other)
    # the SSL listener requires a client certificate: without one the broker closes it
    no_cert = broker(k, url=ssl_url, security_protocol="SSL")
    prod = AIOKafkaProducer(bootstrap_servers=no_cert.bootstrap_servers,
                            request_timeout_ms=5000, **client_security(no_cert))
    with pytest.raises(KafkaConnectionError):
        await prod.start()
    await prod.stop()
    # a plaintext client gets nothing from the SASL_SSL listener
    plain = BrokerSection(url=sasl_url)
    prod = AIOKafkaProducer(bootstrap_servers=plain.bootstrap_servers,
                            request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError):
        await prod.start()
    await prod.stop()


async def test_pipeline_over_sasl_ssl(sasl_kafka: PrivateKafka, stack: Stack,
                                      tmp_path: Path) -> None:
    """Worker and replay over SASL_SSL (SCRAM-SHA-512, password from a file): every bar is
    stored once, equal to the clean computation, and the password is in no log."""
    stack.env.update(sasl_env(sasl_kafka, secret_file(tmp_path, "kafka-pw", PASSWORD)))
    stack.settings = _settings_with(stack.env)
    want = clean_bars(FILES)
    w = stack.worker().start()
    await w.wait_ready()
    out = await stack.replay_cli(*replay_args(), timeout=300)
    assert_exactly_once_and_clean(await wait_all_bars(stack, want, 120), want)
    # the closed bars reached the bars topic, read with the same security
    bars = await stack.read_topic(stack.settings.topics.bars)
    assert len(bars) >= len(want)
    status, health = await stack.http("/health")
    assert status == 200 and health["broker"] == "up", health
    assert w.stop() == 0, w.tail()
    log = w.log_path.read_text(errors="replace")
    assert PASSWORD not in log and PASSWORD not in out


async def test_worker_with_wrong_password_stops_and_says_why(
        sasl_kafka: PrivateKafka, stack: Stack, tmp_path: Path) -> None:
    stack.env.update(sasl_env(sasl_kafka, secret_file(tmp_path, "kafka-pw", WRONG),
                              mechanism="SCRAM-SHA-256"))
    stack.env["MARKETFLOW_BROKER__CONNECT_TIMEOUT_S"] = "600"
    t0 = time.monotonic()
    w = stack.worker().start()
    code = await w.wait_exit(120)
    took = time.monotonic() - t0
    log = w.log_path.read_text(errors="replace")
    assert code not in (None, 0), log[-3000:]
    assert took < 120  # it did not retry for the 600 s connect timeout
    assert "refused the connection" in log and "SaslAuthenticationFailed" in log, log[-3000:]
    assert "invalid credentials" in log
    assert WRONG not in log and PASSWORD not in log
