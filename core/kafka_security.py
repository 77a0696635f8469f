"""Kafka client security from ``[broker]`` (TLS and SASL), for every aiokafka client
marketflow creates: the admin client, the replay's and the bench's producers, the
skipped-message and on-demand consumers, the health probe. The Faust worker gets the same
settings as Faust credentials (:func:`app.faust_app.faust_credentials`).

The keyword names are aiokafka's (``aiokafka.AIOKafkaProducer`` / ``AIOKafkaConsumer`` /
``AIOKafkaAdminClient``: ``security_protocol``, ``ssl_context``, ``sasl_mechanism``,
``sasl_plain_username``, ``sasl_plain_password``). Settings and examples:
docs/security.md#kafka.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from core.config import BrokerSection
from core.errors import ConfigError

__all__ = ["check_security", "client_security", "client_ssl_context"]


def client_ssl_context(broker: BrokerSection) -> ssl.SSLContext | None:
    """The TLS context of ``broker.security_protocol`` ``SSL`` / ``SASL_SSL`` (None for
    the plaintext protocols): verifies the broker against ``ssl_cafile`` (else the system
    CAs), checks its host name unless ``ssl_check_hostname`` is off, and presents
    ``ssl_certfile`` / ``ssl_keyfile`` when set.

    Raises:
        ConfigError: a certificate or key file cannot be loaded (the message names the
            setting and the file, never the key's passphrase).
    """
    if broker.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    password = (broker.ssl_key_password.get_secret_value()
                if broker.ssl_key_password is not None else None)
    try:
        ctx = create_ssl_context(cafile=broker.ssl_cafile, certfile=broker.ssl_certfile,
                                 keyfile=broker.ssl_keyfile, password=password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"broker.ssl_cafile / ssl_certfile / ssl_keyfile: cannot load "
            f"{broker.ssl_cafile} / {broker.ssl_certfile} / {broker.ssl_keyfile}: "
            f"{exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = broker.ssl_check_hostname
    return ctx


def client_security(broker: BrokerSection) -> dict[str, Any]:
    """aiokafka keyword arguments for ``broker``'s security settings.

    Returns:
        dict: ``security_protocol`` always; ``ssl_context`` for ``SSL`` / ``SASL_SSL``;
        ``sasl_mechanism``, ``sasl_plain_username`` and ``sasl_plain_password`` for
        ``SASL_PLAINTEXT`` / ``SASL_SSL``.

    Raises:
        ConfigError: see :func:`client_ssl_context`.
    """
    kwargs: dict[str, Any] = {"security_protocol": broker.security_protocol}
    ctx = client_ssl_context(broker)
    if ctx is not None:
        kwargs["ssl_context"] = ctx
    if broker.sasl_password is not None:  # set exactly for the SASL protocols (validated)
        kwargs.update(sasl_mechanism=broker.sasl_mechanism,
                      sasl_plain_username=broker.sasl_username,
                      sasl_plain_password=broker.sasl_password.get_secret_value())
    return kwargs


async def check_security(broker: BrokerSection, timeout_s: float = 5.0) -> None:
    """Connect once to each bootstrap server with ``broker``'s security settings and
    raise when one refuses them: wrong SASL credentials, a mechanism the broker does not
    enable, a TLS handshake that fails (a certificate the CA did not sign, a wrong host
    name). Retrying cannot fix those, so callers stop at once instead of reporting an
    unreachable broker. A server that does not answer is left to the caller's retry.

    Raises:
        ConfigError: the first refusal, naming the server, the protocol, the mechanism
            and the user, and the broker's or TLS's reason; never the password.
    """
    security = client_security(broker)
    for hostport in broker.bootstrap_servers:
        host, _, port = hostport.rpartition(":")
        try:
            conn = await create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000),
                                     **security)
        except (ssl.SSLError, SaslAuthenticationFailed, UnsupportedSaslMechanismError,
                IllegalSaslStateError) as exc:
            who = (f", {broker.sasl_mechanism} user {broker.sasl_username!r}"
                   if broker.sasl_username is not None else "")
            raise ConfigError(
                f"broker {hostport} refused the connection ({broker.security_protocol}"
                f"{who}): {type(exc).__name__}: {exc}") from None
        except (TimeoutError, OSError, KafkaError):
            continue  # unreachable, or failing for another reason: the caller retries
        conn.close()
