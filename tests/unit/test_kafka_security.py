"""``[broker]`` security settings (docs/security.md#kafka): validation, secrets from files,
the aiokafka keywords every client gets and the Faust credentials (no broker needed; the
broker side is tests/integration/test_kafka_security.py)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import faust
import pytest

from app.faust_app import faust_credentials
from core.config import load_settings
from core.errors import ConfigError
from core.kafka_security import client_security

SECRET = "unit-sasl-secret-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed CA and a client key + certificate (openssl)."""
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(d / "client.key"),
                    "-out", str(d / "client.pem"), "-days", "2", "-subj", "/CN=t"],
                   check=True, capture_output=True)
    (d / "ca.pem").write_bytes((d / "client.pem").read_bytes())
    return d


def test_plaintext_by_default() -> None:
    b = load_settings().broker
    assert client_security(b) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(b) is None


def test_sasl_ssl_with_password_file(tmp_path: Path, certs: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(f"  {SECRET}\n")
    b = load_settings(broker={"security_protocol": "SASL_SSL", "ssl_cafile": certs / "ca.pem",
                              "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "mf",
                              "sasl_password_file": pw}).broker
    kw = client_security(b)
    assert kw["security_protocol"] == "SASL_SSL"
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "mf", SECRET)
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    cred = faust_credentials(b)
    assert isinstance(cred, faust.SASLCredentials)
    assert cred.protocol.value == "SASL_SSL" and cred.mechanism.value == "SCRAM-SHA-512"
    assert (cred.username, cred.password) == ("mf", SECRET)
    # the secret is in no representation of the settings
    assert SECRET not in repr(b) and SECRET not in str(b)
    assert SECRET not in b.model_dump_json()


def test_ssl_with_client_certificate(certs: Path) -> None:
    b = load_settings(broker={"security_protocol": "SSL", "ssl_cafile": certs / "ca.pem",
                              "ssl_certfile": certs / "client.pem",
                              "ssl_keyfile": certs / "client.key",
                              "ssl_check_hostname": False}).broker
    kw = client_security(b)
    assert set(kw) == {"security_protocol", "ssl_context"}
    assert kw["ssl_context"].check_hostname is False
    cred = faust_credentials(b)
    assert isinstance(cred, faust.SSLCredentials) and cred.protocol.value == "SSL"


@pytest.mark.parametrize(("broker", "message"), [
    ({"security_protocol": "SASL_SSL", "sasl_username": "mf"}, "needs sasl_username"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_password": SECRET}, "needs sasl_username"),
    ({"sasl_username": "mf", "sasl_password": SECRET}, "need security_protocol SASL"),
    ({"ssl_cafile": "/etc/hostname"}, "need security_protocol SSL or SASL_SSL"),
    ({"security_protocol": "SSL", "ssl_certfile": "/etc/hostname"}, "both ssl_certfile"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "cannot read"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "mf", "sasl_password": SECRET,
      "sasl_password_file": "/etc/hostname"}, "not both"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "mf",
      "sasl_password_file": "/nonexistent/pw"}, "sasl_password_file: cannot read"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
])
def test_invalid_settings_are_refused(broker: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(broker=broker)
    assert SECRET not in str(err.value)


def test_unloadable_key_is_a_config_error(tmp_path: Path, certs: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    b = load_settings(broker={"security_protocol": "SSL", "ssl_certfile": certs / "client.pem",
                              "ssl_keyfile": bad, "ssl_key_password": SECRET}).broker
    with pytest.raises(ConfigError, match="cannot load") as err:
        client_security(b)
    assert SECRET not in str(err.value)
