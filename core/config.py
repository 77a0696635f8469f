"""Typed configuration: a TOML file plus ``MARKETFLOW_*`` environment overrides.

Sources, highest priority first:

1. environment variables ``MARKETFLOW_<SECTION>__<FIELD>`` (for example
   ``MARKETFLOW_BROKER__URL=kafka://127.0.0.1:9092``,
   ``MARKETFLOW_WINDOW__GRACE_MS=2000``);
2. the TOML file named by ``MARKETFLOW_CONFIG`` (default ``marketflow.toml`` in the
   working directory, when it exists);
3. the defaults below, which are the **production** defaults (no broker workarounds).

Invalid configuration raises :class:`ConfigError` with every problem listed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.errors import ConfigError
from core.timeutil import MINUTE_MS

__all__ = [
    "ALL_SCOPES",
    "DEFAULT_PAIRS",
    "ApiKey",
    "AppSection",
    "AuthSection",
    "BrokerSection",
    "CryptoCompareSection",
    "DatabaseSection",
    "ExchangeFeed",
    "FeedsSection",
    "GeneratorSection",
    "LogSection",
    "RedisSection",
    "RetentionSection",
    "Scope",
    "Settings",
    "SinkSection",
    "StreamSection",
    "TopicsSection",
    "WebSection",
    "WindowSection",
    "config_path",
    "load_settings",
]

CONFIG_ENV = "MARKETFLOW_CONFIG"
DEFAULT_CONFIG_FILE = "marketflow.toml"


_API_KEY_RE = re.compile(r"^[\x21-\x7e]{16,}$")
_MIN_JWT_SECRET_BYTES = 32  # RFC 7518 3.2: a key at least as long as the hash output


#: access scopes (docs/security.md#scopes): ``read`` every GET view and the stream,
#: ``control`` mode switch and replay control, ``admin`` on-demand history
Scope = Literal["read", "control", "admin"]
ALL_SCOPES: tuple[Scope, ...] = ("read", "control", "admin")


def _read_only() -> list[Scope]:
    return ["read"]


def _read_secret_file(path: Path, what: str) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not text:
        raise ValueError(f"{what}: {path} is empty")
    return SecretStr(text)


def _secret_or_file(value: SecretStr | None, path: Path | None,
                    name: str) -> SecretStr | None:
    """``value``, or the secret read from ``path`` (``<name>_file``); never both."""
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"give {name} or {name}_file, not both")
    return _read_secret_file(path, f"{name}_file")


class ApiKey(BaseModel):
    """One API key of ``auth.api_keys`` in table form.

    Attributes:
        key: the bearer token, at least 16 visible ASCII characters (or ``key_file``).
        key_file: read the key from this file (surrounding whitespace stripped).
        name: shown in logs and the client id (``key:<name>``); default the key's
            fingerprint.
        scopes: what the key may do (default ``["read"]``).
        symbols: only these symbols (None: any).
        exchanges: only these exchanges (None: any; a key limited to exchanges cannot
            read consolidated series, which mix every exchange).
    """

    model_config = ConfigDict(extra="forbid")

    key: SecretStr | None = None
    key_file: Path | None = None
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    scopes: list[Scope] = Field(default_factory=_read_only, min_length=1)
    symbols: list[str] | None = Field(default=None, min_length=1)
    exchanges: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.key is None) == (self.key_file is None):
            raise ValueError("give exactly one of key and key_file")
        if self.key_file is not None:
            self.key = _read_secret_file(self.key_file, "key_file")
        if not _API_KEY_RE.match(cast(SecretStr, self.key).get_secret_value()):
            raise ValueError("key: must be at least 16 visible ASCII characters without "
                             "spaces")
        return self

    @property
    def secret(self) -> str:
        """The key's value."""
        return cast(SecretStr, self.key).get_secret_value()


class AuthSection(BaseModel):
    """The ``[auth]`` settings, ``Settings.auth`` (the rules are in :mod:`views.auth` and
    docs/security.md).

    Attributes:
        enabled: require a bearer token on every API view except ``/health`` and the
            chart page's static files.
        api_keys: static bearer tokens. A string is a key with every scope (as before
            scopes existed); a table (:class:`ApiKey`) names its scopes and may limit
            symbols and exchanges.
        jwt_hs256_secret: accept HS256 JWTs signed with this secret (>= 32 bytes).
        jwt_hs256_secret_file: read that secret from a file instead.
        jwt_public_key_file: accept RS256 (RSA key) or ES256 (P-256 key) JWTs verified with
            this PEM public key.
        jwt_jwks_file: accept RS256/ES256 JWTs verified with the key of this JWKS file
            (RFC 7517) whose ``kid`` the token names.
        jwt_audience: tokens must carry this ``aud``; None: tokens with an ``aud`` are
            refused.
        jwt_issuer: tokens must carry this ``iss`` (None: not checked).
        jwt_require_exp: tokens without ``exp`` are refused.
        jwt_leeway_s: clock skew allowed on ``exp``/``nbf``/``iat``, seconds (<= 300).
        jwt_default_scopes: scopes of a JWT without a ``scope``/``scp`` claim.
        rate_limit_per_s: sustained requests per second per client; 0 turns it off.
        rate_limit_burst: requests a client may make at once (bucket size).
        global_rate_limit_per_s: sustained requests per second of all clients together;
            0 turns it off.
        global_rate_limit_burst: the cluster's bucket size.
        rate_limit_shared: count the limits in Redis for every worker together (falls
            back to per-process counting while Redis fails); off: per process.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    api_keys: list[ApiKey | SecretStr] = Field(default_factory=list)
    jwt_hs256_secret: SecretStr | None = None
    jwt_hs256_secret_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_require_exp: bool = True
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=300, allow_inf_nan=False)
    jwt_default_scopes: list[Scope] = Field(default_factory=_read_only)
    rate_limit_per_s: float = Field(default=0.0, ge=0, le=1_000_000, allow_inf_nan=False)
    rate_limit_burst: int = Field(default=20, ge=1, le=1_000_000)
    global_rate_limit_per_s: float = Field(default=0.0, ge=0, le=1_000_000,
                                           allow_inf_nan=False)
    global_rate_limit_burst: int = Field(default=200, ge=1, le=1_000_000)
    rate_limit_shared: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_as_tables(cls, v: Any) -> Any:
        # a string stays a SecretStr (every scope); anything else is parsed as a table
        return [SecretStr(k) if isinstance(k, str) else k for k in v] if isinstance(
            v, list) else v

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: list[ApiKey | SecretStr]) -> list[ApiKey | SecretStr]:
        for i, key in enumerate(v):
            if isinstance(key, SecretStr) and not _API_KEY_RE.match(key.get_secret_value()):
                raise ValueError(f"api_keys[{i}]: must be at least 16 visible ASCII "
                                 "characters without spaces")
        return v

    @field_validator("jwt_hs256_secret")
    @classmethod
    def _check_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < _MIN_JWT_SECRET_BYTES:
            raise ValueError(f"must be at least {_MIN_JWT_SECRET_BYTES} bytes (HS256)")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> AuthSection:
        if self.jwt_hs256_secret_file is not None:
            if self.jwt_hs256_secret is not None:
                raise ValueError("give jwt_hs256_secret or jwt_hs256_secret_file, not both")
            from_file = _read_secret_file(self.jwt_hs256_secret_file, "jwt_hs256_secret_file")
            if len(from_file.get_secret_value().encode()) < _MIN_JWT_SECRET_BYTES:
                raise ValueError(f"jwt_hs256_secret_file: the secret must be at least "
                                 f"{_MIN_JWT_SECRET_BYTES} bytes (HS256)")
            self.jwt_hs256_secret = from_file
        secret = self.jwt_hs256_secret
        if self.enabled and not (self.api_keys or secret is not None
                                 or self.jwt_public_key_file or self.jwt_jwks_file):
            raise ValueError("auth.enabled needs api_keys, jwt_hs256_secret, "
                             "jwt_public_key_file or jwt_jwks_file")
        return self


class BrokerSection(BaseModel):
    """Kafka-protocol broker (Apache Kafka, Redpanda).

    Attributes:
        url: ``kafka://host:port[;host:port...]``, the bootstrap servers.
        connect_timeout_s: how long a starting worker retries an unreachable broker
            before exiting non-zero.
        session_timeout_s: consumer-group session timeout; a worker that stops
            heartbeating (killed, partitioned) loses its partitions after this long.
            ``None`` keeps Faust's default (60 s).
        heartbeat_interval_s: consumer-group heartbeat (``None``: Faust's 3 s); keep it
            at most a third of the session timeout.
        rebalance_timeout_s: how long a rebalance waits for members to rejoin
            (``None``: Faust's 60 s).
        fetch_max_wait_ms: longest the broker holds the worker's fetch request when it
            has no new data (Kafka's ``fetch.max.wait.ms``; Faust fixes 1500). The
            consumer has one fetch in flight per broker and leaves out partitions whose
            records it still buffers, so a fetch parked for a quiet partition delays
            every other partition by up to this long (``docs/architecture.md``,
            "Consumer fetch wait").
        security_protocol: Kafka's ``security.protocol`` for every client marketflow
            creates (``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``;
            docs/security.md#kafka).
        ssl_cafile: PEM CA bundle the broker's certificate is checked against (default:
            the system's CAs). Needs ``SSL`` or ``SASL_SSL``.
        ssl_certfile, ssl_keyfile: the client's PEM certificate and key, for brokers that
            require client certificates (``ssl.client.auth=required``).
        ssl_key_password / ssl_key_password_file: the key's passphrase, if encrypted.
        ssl_check_hostname: check the broker's name against its certificate (default on).
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` (default) or ``SCRAM-SHA-512``.
        sasl_username: the SASL user. Needs ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_password / sasl_password_file: its password (one of the two).
    """

    url: str = "kafka://127.0.0.1:9092"
    connect_timeout_s: float = Field(default=30.0, gt=0, le=3_600)
    session_timeout_s: float | None = Field(default=None, ge=1, le=3_600)
    heartbeat_interval_s: float | None = Field(default=None, gt=0, le=600)
    rebalance_timeout_s: float | None = Field(default=None, ge=1, le=3_600)
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=30_000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_key_password_file: Path | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-256"
    sasl_username: str | None = Field(default=None, min_length=1)
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None

    @model_validator(mode="after")
    def _check_security(self) -> BrokerSection:
        self.ssl_key_password = _secret_or_file(
            self.ssl_key_password, self.ssl_key_password_file, "ssl_key_password")
        self.sasl_password = _secret_or_file(
            self.sasl_password, self.sasl_password_file, "sasl_password")
        uses_ssl = self.security_protocol in ("SSL", "SASL_SSL")
        uses_sasl = self.security_protocol.startswith("SASL_")
        ssl_set = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile",
                                     "ssl_key_password") if getattr(self, name) is not None]
        if ssl_set and not uses_ssl:
            raise ValueError(f"{', '.join(ssl_set)} need security_protocol SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("give both ssl_certfile and ssl_keyfile, or neither")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path}")
        if uses_sasl and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"security_protocol {self.security_protocol} needs "
                             "sasl_username and sasl_password (or sasl_password_file)")
        if not uses_sasl and (self.sasl_username is not None
                              or self.sasl_password is not None):
            raise ValueError("sasl_username / sasl_password need security_protocol "
                             "SASL_PLAINTEXT or SASL_SSL")
        return self

    @model_validator(mode="after")
    def _check_heartbeat(self) -> BrokerSection:
        if (self.session_timeout_s is not None and self.heartbeat_interval_s is not None
                and self.heartbeat_interval_s * 3 > self.session_timeout_s):
            raise ValueError("heartbeat_interval_s must be at most a third of "
                             "session_timeout_s")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("kafka://", "aiokafka://")):
            raise ValueError("must look like kafka://host:port[;host:port]")
        return v

    @property
    def bootstrap_servers(self) -> list[str]:
        """``host:port`` strings for aiokafka clients."""
        rest = self.url.split("://", 1)[1]
        return [h.strip() for h in rest.replace(";", ",").split(",") if h.strip()]


class TopicsSection(BaseModel):
    """Topic names and partition counts (all topics are declared in :mod:`core.topics`)."""

    ticks: str = "ticks"
    bars: str = "bars-1m"
    dead_letter: str = "ticks-dead-letter"
    history_requests: str = "history-requests"
    partitions: int = Field(default=4, ge=1, le=1024)
    replication: int = Field(default=1, ge=1, le=16)


class AppSection(BaseModel):
    """Faust application identity, local state and event loop.

    Attributes:
        event_loop: ``uvloop`` (default; faster HTTP and Kafka I/O) or ``asyncio``.
            Faust's own ``-L/--loop`` option or ``FAUST_LOOP`` take precedence.
        processing_guarantee: ``at_least_once`` (default: every effect is idempotent,
            see docs/guarantees.md) or ``exactly_once`` (Faust's Kafka transactions:
            changelog writes, produced bars and offsets commit atomically; needs a broker
            with transactions, such as Apache Kafka).
    """

    id: str = "marketflow"
    datadir: str = "var/faust"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError("must be a non-empty name without spaces")
        return v


class DatabaseSection(BaseModel):
    """TimescaleDB (PostgreSQL) connection.

    Attributes:
        dsn: ``postgresql://user:password@host:port/db[?sslmode=verify-full&sslrootcert=
            ca.pem]`` (libpq URL, as asyncpg reads it); a secret (it holds the password).
        dsn_file: read the DSN from this file instead.
        request_timeout_s: bound of the request path's database work per request
            (getting a connection and each query), seconds; beyond it the view answers
            503 and the database's circuit breaker opens (``core/breaker.py``).
        request_pool_max: connections of the request path's pool (the sink and the
            background jobs have ``pool_max`` of their own).
    """

    dsn: SecretStr = SecretStr("postgresql://marketflow:marketflow@127.0.0.1:5432/marketflow")
    dsn_file: Path | None = None
    pool_max: int = Field(default=4, ge=1, le=100)
    migrate_on_start: bool = True
    request_timeout_s: float = Field(default=1.0, gt=0, le=300)
    request_pool_max: int = Field(default=8, ge=1, le=100)

    @model_validator(mode="after")
    def _check_dsn(self) -> DatabaseSection:
        if self.dsn_file is not None:
            self.dsn = _read_secret_file(self.dsn_file, "dsn_file")
        if not self.dsn.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("dsn: must be a postgresql:// URL")
        return self


class RedisSection(BaseModel):
    """Redis connection and key layout (every key format: :mod:`stores.keys`).

    Attributes:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://...?ssl_ca_certs=ca.pem``
            (TLS) or ``unix://path`` (redis-py's URL forms); a secret (it may hold the
            password).
        url_file: read the URL from this file instead.
        request_timeout_s: bound of each Redis command on the request path, seconds;
            beyond it the view falls back to TimescaleDB and Redis's circuit breaker opens
            (``stores/connection.py``). A deadline that fires late because the worker's
            event loop was busy gives the command one more bound first, so a stalled loop
            does not count as a hung Redis.
    """

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    url_file: Path | None = None
    key_prefix: str = "mf"
    latest_ttl_s: int = Field(default=86_400, ge=1)
    request_timeout_s: float = Field(default=0.1, gt=0, le=60)

    @model_validator(mode="after")
    def _check_url(self) -> RedisSection:
        if self.url_file is not None:
            self.url = _read_secret_file(self.url_file, "url_file")
        if not self.url.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url: must be a redis:// URL")
        return self


class WebSection(BaseModel):
    """HTTP API.

    Attributes:
        host: bind address.
        port: bind port.
        ohlcv_cache_ttl_s: lifetime of a cached sealed OHLCV range in Redis
            (:mod:`stores.ohlcv_cache`); 0 disables the cache.
        ohlcv_cache_max_bytes: larger ranges are not cached.
        tls_cert_file: serve HTTPS (and ``wss://``) with this PEM certificate chain
            (docs/security.md#https); None: plain HTTP.
        tls_key_file: the certificate's PEM private key (unencrypted).
        https_redirect_port: also listen for plain HTTP on this port and answer every
            request with a 308 to the same path over HTTPS (off by default).
    """

    host: str = "127.0.0.1"
    port: int = Field(default=6066, ge=1, le=65535)
    ohlcv_cache_ttl_s: int = Field(default=600, ge=0, le=86_400)
    ohlcv_cache_max_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    https_redirect_port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _check_tls(self) -> WebSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.https_redirect_port is not None:
            if self.tls_cert_file is None:
                raise ValueError("https_redirect_port needs tls_cert_file and tls_key_file")
            if self.https_redirect_port == self.port:
                raise ValueError("https_redirect_port must differ from port")
        return self

    @property
    def scheme(self) -> str:
        """``https`` when TLS is configured, else ``http``."""
        return "http" if self.tls_cert_file is None else "https"


class StreamSection(BaseModel):
    """The WebSocket stream ``GET /stream`` (``docs/stream.md``).

    Attributes:
        max_updates_per_s: open-bar, price and replay-clock frames per second per
            subscription item (bucket, price item, replay): at most one per round of
            1/N s, the newest state wins (``docs/stream.md``, "Throttle").
        max_connections: sockets per worker.
        max_connections_per_client: sockets per client id (credential, else address)
            across the cluster, counted in Redis (per worker while Redis fails); 0: no
            limit. With ``max_subscriptions`` it bounds a client's subscriptions.
        max_subscriptions: subscriptions per connection.
        max_subscriptions_per_client: subscriptions per client id across its sockets and
            the cluster, counted in Redis (per worker while Redis fails); 0: no limit.
        max_symbols: items per prices subscription.
        max_queued_frames: closed bars and snapshots waiting per connection before the
            client is closed as a slow consumer (code 4008).
        heartbeat_s: WebSocket ping interval, seconds (a missing pong closes the socket).
        auth_timeout_s: with auth on and no ``Authorization`` header, how long the first
            ``auth`` frame may take, seconds.
    """

    max_updates_per_s: float = Field(default=10.0, gt=0, le=1000)
    max_connections: int = Field(default=2000, ge=1, le=100_000)
    max_connections_per_client: int = Field(default=0, ge=0, le=100_000)
    max_subscriptions: int = Field(default=50, ge=1, le=10_000)
    max_subscriptions_per_client: int = Field(default=0, ge=0, le=1_000_000)
    max_symbols: int = Field(default=100, ge=1, le=10_000)
    max_queued_frames: int = Field(default=1000, ge=10, le=1_000_000)
    heartbeat_s: float = Field(default=15.0, gt=0, le=3600)
    auth_timeout_s: float = Field(default=5.0, gt=0, le=600)


class WindowSection(BaseModel):
    """Tumbling-window behaviour (event time).

    Attributes:
        size_ms: window length; bars are 1-minute, so only 60000 is accepted.
        grace_ms: the watermark is ``max ts_ms seen on the partition - grace_ms``.
        idle_timeout_s: a key with no tick for this long (wall clock) has its windows
            closed once wall-clock time is past ``window end + grace``.
        idle_check_interval_s: how often idle keys are checked.
        max_future_ms: ticks stamped further than this ahead of the wall clock are
            rejected (dead-letter reason ``ts_in_future``).
        late_policy: what happens to a tick whose window already closed:
            ``dead_letter`` (default) sends it to the dead-letter topic with reason
            ``late``; ``correct`` applies it to the closed bar while that bar is within
            ``correction_horizon_ms`` and re-emits the bar (``"correction": true``, upserted
            by the sink), and dead-letters it (reason ``late``) beyond the horizon.
        correction_horizon_ms: with ``correct``, how long (event time behind the
            watermark, ms) closed bars are kept in key state to accept corrections; memory
            per key is bounded by ``(horizon + 60 s + grace) / 60 s + 1`` bars.
    """

    size_ms: int = MINUTE_MS
    grace_ms: int = Field(default=5_000, ge=0, le=3_600_000)
    idle_timeout_s: float = Field(default=10.0, gt=0, le=86_400)
    idle_check_interval_s: float = Field(default=1.0, gt=0, le=3_600)
    max_future_ms: int = Field(default=300_000, ge=0)
    late_policy: Literal["dead_letter", "correct"] = "dead_letter"
    correction_horizon_ms: int = Field(default=600_000, ge=0, le=86_400_000)

    @field_validator("size_ms")
    @classmethod
    def _one_minute(cls, v: int) -> int:
        if v != MINUTE_MS:
            raise ValueError("only 1-minute bars (60000) are supported")
        return v


class SinkSection(BaseModel):
    """Batching of closed bars into TimescaleDB (``agents/sink.py``).

    Attributes:
        batch_size: a batch is written when this many bars are pending.
        flush_interval_s: the backstop: a bar pending this long is written (seconds).
        min_flush_gap_s: a bar that arrives when no flush started within this many
            seconds is written at once; others join the next batch.
        retry_max_s: cap of the retry delay while the database fails (seconds).
    """

    batch_size: int = Field(default=500, ge=1, le=100_000)
    flush_interval_s: float = Field(default=1.0, gt=0, le=600)
    min_flush_gap_s: float = Field(default=0.05, ge=0, le=600)
    retry_max_s: float = Field(default=30.0, gt=0, le=3_600)


class RetentionSection(BaseModel):
    """The ``[retention]`` settings, ``Settings.retention``: what the leader worker deletes
    and how often (``agents/retention.py``; ``docs/operations.md``, "Retention"). Every
    horizon is off (``None``, keep forever) by default.

    Attributes:
        bars_1m_days: drop the ``bars_1m`` chunks (1 day each) whose whole time range is
            older than this many days; bars newer than that are always kept, older ones
            go with their chunk, so a bar lives between ``bars_1m_days`` and
            ``bars_1m_days + 1`` days. The symbols' cached ``/ohlcv`` ranges are
            invalidated.
        gaps_days: delete gap records whose range ended this many days ago or more, in
            any state but ``repairing`` (an ``open`` gap that old is not repaired any more).
        backfill_jobs_days: delete finished backfill jobs (``done`` or ``error``) not
            updated for this many days; ``pending`` and ``fetching`` jobs are kept.
        interval_s: time between cleanup runs, seconds; the first run is at most
            ``min(interval_s, 60)`` s after a worker becomes the leader, a failed run is
            retried after that long.
    """

    model_config = ConfigDict(extra="forbid")

    bars_1m_days: int | None = Field(default=None, ge=1, le=36_500)
    gaps_days: int | None = Field(default=None, ge=1, le=36_500)
    backfill_jobs_days: int | None = Field(default=None, ge=1, le=36_500)
    interval_s: float = Field(default=3_600.0, ge=1, le=7 * 86_400, allow_inf_nan=False)

    @property
    def enabled(self) -> bool:
        """Whether any horizon is set (otherwise no cleanup runs)."""
        return any(d is not None for d in (self.bars_1m_days, self.gaps_days,
                                           self.backfill_jobs_days))


DEFAULT_PAIRS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


class ExchangeFeed(BaseModel):
    """One marketflow exchange program (newline-delimited JSON over TCP)."""

    name: str
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not v or ":" in v or any(c.isspace() for c in v):
            raise ValueError("exchange name must be non-empty, without ':' or spaces")
        return v


class CryptoCompareSection(BaseModel):
    """CryptoCompare/CoinDesk legacy streaming trades (TYPE 0).

    ``subs`` are subscription strings ``0~<Market>~<FSYM>~<TSYM>``; a trade becomes a tick
    with exchange = market lower-cased (``Coinbase`` -> ``coinbase``) and symbol = FSYM+TSYM
    (``BTCUSD``). The free tier was retired in 2026: an ``api_key`` (or ``api_key_file``)
    is required.
    """

    enabled: bool = False
    url: str = "wss://streamer.cryptocompare.com/v2"
    api_key: SecretStr = SecretStr("")
    api_key_file: Path | None = None
    subs: list[str] = Field(default_factory=lambda: ["0~Coinbase~BTC~USD", "0~Coinbase~ETH~USD"])
    #: the streamer heartbeats every 30-60 s; two missed ones mean a stale connection
    idle_timeout_s: float = Field(default=90.0, gt=0)

    @model_validator(mode="after")
    def _key_when_enabled(self) -> CryptoCompareSection:
        if self.api_key_file is not None:
            self.api_key = _read_secret_file(self.api_key_file, "api_key_file")
        if self.enabled and not self.api_key.get_secret_value():
            raise ValueError("cryptocompare.api_key is required when enabled")
        return self


class GeneratorSection(BaseModel):
    """Synthetic test-mode ticks: a random walk per exchange and pair."""

    rate_per_s: float = Field(default=50.0, gt=0, le=1_000_000)
    exchanges: list[str] = Field(default_factory=lambda: ["exchange1", "exchange2", "exchange3"])
    seed: int | None = None


class FeedsSection(BaseModel):
    """Live and test inputs run by the worker (only one worker, the group leader, ingests).

    Attributes:
        mode: mode used when none was set at runtime (``POST /mode/{live,test}``);
            ``off`` runs no ingest (replay or external producers only).
        exchanges: the marketflow exchange programs (live mode).
        pairs: symbols kept from the exchanges; others are dead-lettered
            (``unknown_symbol``).
        idle_timeout_s: reconnect when an exchange sends nothing for this long.
        backoff_initial_s, backoff_max_s: reconnect delay, doubling, with jitter.
        publish_interval_ms: the longest pause between two publisher flushes, and the
            most event time one message spans (a tick waits at most this long).
        max_messages_per_s: the ``ticks`` message rate the publisher stays under: a tick
            that finds it idle is sent at once; under load a flush of ``m`` messages is
            followed by a pause of ``m / max_messages_per_s`` s (at most
            ``publish_interval_ms``), so messages carry more ticks as the load grows. The
            agent's cost is per message (a changelog write per key per message): at 2,000
            messages/s a loaded 2-CPU worker fell behind for good after a broker outage
            (``tests/integration/test_broker_faults.py``); 300 kept up.
        max_buffered_ticks: ticks the publisher holds while the broker does not take
            them (an outage); beyond it the feeds stop reading (back-pressure).
    """

    mode: str = "off"
    exchanges: list[ExchangeFeed] = Field(default_factory=lambda: [
        ExchangeFeed(name="exchange1", port=40101),
        ExchangeFeed(name="exchange2", port=40102),
        ExchangeFeed(name="exchange3", port=40103),
    ])
    pairs: list[str] = Field(default_factory=lambda: list(DEFAULT_PAIRS))
    idle_timeout_s: float = Field(default=10.0, gt=0)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    publish_interval_ms: int = Field(default=50, ge=1, le=10_000)
    max_messages_per_s: float = Field(default=300.0, gt=0, le=1_000_000)
    max_buffered_ticks: int = Field(default=20_000, ge=1, le=10_000_000)
    cryptocompare: CryptoCompareSection = CryptoCompareSection()
    generator: GeneratorSection = GeneratorSection()

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, v: str) -> str:
        if v not in ("live", "test", "off"):
            raise ValueError("must be live, test or off")
        return v


class HistorySection(BaseModel):
    """Historical 1-minute bars from a REST source: backfill, on-demand fetch, gap repair.

    Attributes:
        source: ``cryptocompare`` (legacy min-api ``data/v2/histominute``), ``coindesk``
            (Data API ``spot/v1/historical/minutes``) or ``none`` (no fetching).
        cryptocompare_url, coindesk_url: base URLs (tests point them at a local server).
        api_key: sent as ``Authorization: Apikey <key>``; never logged.
        api_key_file: read the key from this file instead.
        requests_per_s: client-side cap on request rate (the sources' documented limits
            are per second/minute/hour; stay under the per-second one).
        max_retries: attempts per page on 429, 5xx and timeouts (exponential backoff
            from ``backoff_initial_s`` to ``backoff_max_s``; a 429's ``Retry-After`` wins).
        timeout_s: per request.
        overwrite_own: when true, fetched bars replace bars we built from our own ticks;
            by default they only fill minutes we did not compute.
        exchange_map: our exchange name -> the source's exchange/market name
            (default: the same name).
        on_demand: ``/ohlcv`` asks the coordinator to fetch ranges missing from the
            database.
        on_demand_wait_s: how long ``/ohlcv`` waits for an on-demand fetch.
        topic_prefix: dynamic topics are ``<topic_prefix>.<exchange>.<symbol>``.
        gap_scan_interval_s: how often the gap job looks for missing minutes (0 = off).
    """

    source: Literal["cryptocompare", "coindesk", "none"] = "none"
    cryptocompare_url: str = "https://min-api.cryptocompare.com"
    coindesk_url: str = "https://data-api.coindesk.com"
    api_key: SecretStr = SecretStr("")
    api_key_file: Path | None = None
    requests_per_s: float = Field(default=5.0, gt=0, le=1000)
    max_retries: int = Field(default=5, ge=0, le=50)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    overwrite_own: bool = False
    exchange_map: dict[str, str] = Field(default_factory=dict)
    on_demand: bool = True
    on_demand_wait_s: float = Field(default=5.0, ge=0, le=120)
    topic_prefix: str = "backfill"
    gap_scan_interval_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _key_file(self) -> HistorySection:
        if self.api_key_file is not None:
            self.api_key = _read_secret_file(self.api_key_file, "api_key_file")
        return self


class ReplaySection(BaseModel):
    """Market replay simulator.

    Attributes:
        namespace: replayed exchanges are renamed ``<namespace>.<exchange>`` (ticks tagged
            ``source=replay``) so replays never touch live or historical bars; ``""``
            keeps the real names (``--rebase-now`` live-like feeds default to that).
    """

    namespace: str = "replay"


class LogSection(BaseModel):
    """Logging: ``json`` (one JSON object per line) or ``text``."""

    format: str = "json"

    @field_validator("format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        if v not in ("json", "text"):
            raise ValueError("must be json or text")
        return v


class Settings(BaseSettings):
    """The one settings object. Sections mirror the TOML tables of ``marketflow.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="MARKETFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    broker: BrokerSection = BrokerSection()
    topics: TopicsSection = TopicsSection()
    app: AppSection = AppSection()
    database: DatabaseSection = DatabaseSection()
    redis: RedisSection = RedisSection()
    web: WebSection = WebSection()
    stream: StreamSection = StreamSection()
    window: WindowSection = WindowSection()
    sink: SinkSection = SinkSection()
    retention: RetentionSection = RetentionSection()
    feeds: FeedsSection = FeedsSection()
    log: LogSection = LogSection()
    auth: AuthSection = AuthSection()
    history: HistorySection = HistorySection()
    replay: ReplaySection = ReplaySection()

    @model_validator(mode="after")
    def _distinct_topics(self) -> Settings:
        names = [self.topics.ticks, self.topics.bars, self.topics.dead_letter]
        if len(set(names)) != len(names):
            raise ValueError("topics.ticks, topics.bars and topics.dead_letter must differ")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def config_path() -> Path | None:
    """The TOML file to read: ``$MARKETFLOW_CONFIG`` (must exist) or ./marketflow.toml if
    present, else None.

    Raises:
        ConfigError: ``MARKETFLOW_CONFIG`` names a missing file.
    """
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(f"{CONFIG_ENV}={explicit}: no such file")
        return p
    p = Path(DEFAULT_CONFIG_FILE)
    return p if p.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Load and validate the configuration.

    Args:
        **overrides: values that win over every other source (used by tests).

    Returns:
        Settings: the validated settings.

    Raises:
        ConfigError: the file is missing/unreadable/not TOML, or a value is invalid;
            the message lists every offending setting.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        # from None: the ValidationError's text would repeat the inputs (secrets included)
        raise ConfigError(f"invalid configuration: {problems}") from None
    except (OSError, ValueError) as exc:  # TOML decode errors are ValueError subclasses
        raise ConfigError(f"cannot read configuration: {exc}") from exc
