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
from typing import Any, Literal

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
    "DEFAULT_PAIRS",
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


class AuthSection(BaseModel):
    """The ``[auth]`` settings, ``Settings.auth`` (the rules are in :mod:`views.auth`).

    Attributes:
        enabled: require a bearer token on every API view except ``/health``.
        api_keys: static bearer tokens, each at least 16 visible ASCII characters.
        jwt_hs256_secret: also accept HS256 JWTs signed with this secret (>= 32 bytes).
        rate_limit_per_s: sustained requests per second per client; 0 turns it off.
        rate_limit_burst: requests a client may make at once (bucket size).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    api_keys: list[SecretStr] = Field(default_factory=list)
    jwt_hs256_secret: SecretStr | None = None
    rate_limit_per_s: float = Field(default=0.0, ge=0, le=1_000_000, allow_inf_nan=False)
    rate_limit_burst: int = Field(default=20, ge=1, le=1_000_000)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(v):
            if not _API_KEY_RE.match(key.get_secret_value()):
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
    def _credentials_when_enabled(self) -> AuthSection:
        if self.enabled and not self.api_keys and self.jwt_hs256_secret is None:
            raise ValueError("auth.enabled needs api_keys or jwt_hs256_secret")
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
    """

    url: str = "kafka://127.0.0.1:9092"
    connect_timeout_s: float = Field(default=30.0, gt=0, le=3_600)
    session_timeout_s: float | None = Field(default=None, ge=1, le=3_600)
    heartbeat_interval_s: float | None = Field(default=None, gt=0, le=600)
    rebalance_timeout_s: float | None = Field(default=None, ge=1, le=3_600)

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
    """TimescaleDB (PostgreSQL) connection."""

    dsn: str = "postgresql://marketflow:marketflow@127.0.0.1:5432/marketflow"
    pool_max: int = Field(default=4, ge=1, le=100)
    migrate_on_start: bool = True

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v


class RedisSection(BaseModel):
    """Redis connection and key layout (every key format: :mod:`stores.keys`)."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "mf"
    latest_ttl_s: int = Field(default=86_400, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return v


class WebSection(BaseModel):
    """HTTP API.

    Attributes:
        host: bind address.
        port: bind port.
        ohlcv_cache_ttl_s: lifetime of a cached sealed OHLCV range in Redis
            (:mod:`stores.ohlcv_cache`); 0 disables the cache.
        ohlcv_cache_max_bytes: larger ranges are not cached.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=6066, ge=1, le=65535)
    ohlcv_cache_ttl_s: int = Field(default=600, ge=0, le=86_400)
    ohlcv_cache_max_bytes: int = Field(default=4 * 1024 * 1024, ge=0)


class StreamSection(BaseModel):
    """The WebSocket stream ``GET /stream`` (``docs/stream.md``).

    Attributes:
        max_updates_per_s: open-bar, price and replay-clock frames per second per
            subscription item (bucket, price item, replay); the newest state wins.
        max_connections: sockets per worker.
        max_subscriptions: subscriptions per connection.
        max_symbols: items per prices subscription.
        max_queued_frames: closed bars and snapshots waiting per connection before the
            client is closed as a slow consumer (code 4008).
        heartbeat_s: WebSocket ping interval, seconds (a missing pong closes the socket).
        auth_timeout_s: with auth on and no ``Authorization`` header, how long the first
            ``auth`` frame may take, seconds.
    """

    max_updates_per_s: float = Field(default=4.0, gt=0, le=1000)
    max_connections: int = Field(default=2000, ge=1, le=100_000)
    max_subscriptions: int = Field(default=50, ge=1, le=10_000)
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
    """Batching of closed bars into TimescaleDB."""

    batch_size: int = Field(default=500, ge=1, le=100_000)
    flush_interval_s: float = Field(default=1.0, gt=0, le=600)
    retry_max_s: float = Field(default=30.0, gt=0, le=3_600)


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
    (``BTCUSD``). The free tier was retired in 2026: an ``api_key`` is required.
    """

    enabled: bool = False
    url: str = "wss://streamer.cryptocompare.com/v2"
    api_key: str = ""
    subs: list[str] = Field(default_factory=lambda: ["0~Coinbase~BTC~USD", "0~Coinbase~ETH~USD"])
    #: the streamer heartbeats every 30-60 s; two missed ones mean a stale connection
    idle_timeout_s: float = Field(default=90.0, gt=0)

    @model_validator(mode="after")
    def _key_when_enabled(self) -> CryptoCompareSection:
        if self.enabled and not self.api_key:
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
        publish_interval_ms: ticks are batched per key for at most this long.
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
    api_key: str = ""
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
