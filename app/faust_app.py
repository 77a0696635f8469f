"""The :class:`faust.App` subclass marketflow runs, and its options from :mod:`core.config`
(built by :func:`app.factory.create_app`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiokafka
import faust
from aiokafka.errors import KafkaConnectionError
from faust.transport.drivers import aiokafka as faust_kafka

from core.admin import ensure_topics
from core.config import BrokerSection, Settings, WebSection
from core.errors import ConfigError
from core.kafka_security import client_ssl_context

__all__ = ["MarketflowApp", "faust_credentials", "faust_options", "json_logging_config",
           "server_ssl_context", "use_event_loop"]


def json_logging_config() -> dict[str, Any]:
    """dictConfig merged into Faust's: one JSON object per line on stderr, with ``ts``,
    ``level``, ``logger``, ``pid``, ``message`` and any ``extra={...}`` context (exchange,
    symbol, counts) the call adds."""
    return {
        "merge": True,
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                "rename_fields": {"asctime": "ts", "levelname": "level", "name": "logger",
                                  "process": "pid"},
            },
        },
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json"}},
    }


def server_ssl_context(web: WebSection) -> ssl.SSLContext:
    """The web server's TLS context: ``web.tls_cert_file`` / ``web.tls_key_file``, TLS 1.2
    or later, Python's default server ciphers.

    Raises:
        ConfigError: a file is missing, unreadable, or the key does not match.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cast(Path, web.tls_cert_file), web.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"web.tls_cert_file / web.tls_key_file: cannot load "
                          f"{web.tls_cert_file} / {web.tls_key_file}: {exc}") from None
    return ctx


def faust_credentials(broker: BrokerSection) -> faust.auth.Credentials | None:
    """Faust's ``broker_credentials`` for ``broker``'s security settings (the same ones
    :func:`core.kafka_security.client_security` gives the other clients): SASL
    credentials (over TLS for ``SASL_SSL``), TLS credentials for ``SSL``, None for
    ``PLAINTEXT``. Faust hands them to every client of the worker: its consumer, its
    (transactional) producers and its admin client.

    Raises:
        ConfigError: see :func:`core.kafka_security.client_ssl_context`.
    """
    ctx = client_ssl_context(broker)
    if broker.sasl_password is not None:
        return faust.SASLCredentials(username=broker.sasl_username,
                                     password=broker.sasl_password.get_secret_value(),
                                     ssl_context=ctx, mechanism=broker.sasl_mechanism)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def faust_options(s: Settings) -> dict[str, Any]:
    """Faust settings for ``s``: Faust's defaults except where a setting of ours says
    otherwise (group timeouts of ``[broker]``, ``app.processing_guarantee``)."""
    opts: dict[str, Any] = {
        "broker": s.broker.url,
        "store": "memory://",
        "datadir": s.app.datadir,
        "topic_partitions": s.topics.partitions,
        "topic_replication_factor": s.topics.replication,
        "processing_guarantee": s.app.processing_guarantee,
        "consumer_auto_offset_reset": "earliest",
        "web_bind": s.web.host,
        "web_host": s.web.host,
        "web_port": s.web.port,
        "web_enabled": True,
        "table_standby_replicas": 0,
        "Worker": _Worker,
    }
    if s.web.tls_cert_file is not None:
        opts["web_ssl_context"] = server_ssl_context(s.web)
    credentials = faust_credentials(s.broker)
    if credentials is not None:
        opts["broker_credentials"] = credentials
    if s.log.format == "json":
        opts["logging_config"] = json_logging_config()
    for key, value in (("broker_session_timeout", s.broker.session_timeout_s),
                       ("broker_heartbeat_interval", s.broker.heartbeat_interval_s),
                       ("broker_rebalance_timeout", s.broker.rebalance_timeout_s)):
        if value is not None:
            opts[key] = value
    return opts


class _Worker(faust.Worker):
    """Faust's worker with the root logger kept at the ``-l`` level, and the objects of
    the started worker frozen out of the garbage collector (:meth:`on_startup_finished`).

    At ``-l warn`` (Faust's default) Faust sets the root logger to DEBUG so that its
    terminal spinner moves on every record; then every ``log.debug`` of aiokafka and Faust
    (one per message sent) builds a record that no handler prints. Here the root logger
    stays at the chosen level, and the spinner moves on the records that are printed.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        if level:
            logger.setLevel(level)

    async def on_startup_finished(self) -> None:
        """Faust's, then :func:`gc.freeze`: the objects alive once the worker runs (the
        modules, the app, its services and recovered tables) leave the collector's
        generations, so a full collection no longer walks them. Measured with
        ``bench/stream.py`` (``docs/benchmarks.md``, "WebSocket stream"): the worker's
        full collections stopped the event loop 100-120 ms each before.
        """
        await super().on_startup_finished()
        gc.collect()
        gc.freeze()


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with ``broker.fetch_max_wait_ms`` instead of Faust's fixed
    1500 ms (:class:`core.config.BrokerSection`)."""

    def _create_worker_consumer(self, transport: faust_kafka.Transport
                                ) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        settings: Settings = cast(Any, self.app).mf_settings
        # aiokafka hands this to its Fetcher in start(), which has not run yet
        consumer._fetch_max_wait_ms = settings.broker.fetch_max_wait_ms
        return consumer


class _Consumer(faust_kafka.Consumer):
    """Faust's aiokafka consumer with :class:`_ConsumerThread`, and the offset of the last
    record of each partition handed to Faust's streams (:attr:`fetched_offsets`, read by
    :class:`agents.skipped.OffsetGuard`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: topic partition -> offset of the last record converted for Faust's streams
        self.fetched_offsets: dict[Any, int] = {}

    def _new_consumer_thread(self) -> faust_kafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _to_message(self, tp: Any, record: Any) -> Any:
        self.fetched_offsets[tp] = record.offset
        return super()._to_message(tp, record)


class _Transport(faust_kafka.Transport):
    """Faust's aiokafka transport with :class:`_ConsumerThread`."""

    Consumer = _Consumer


class MarketflowApp(faust.App):
    """:class:`faust.App` that creates its topics (explicit partition counts) before the
    consumer subscribes, and runs shutdown hooks before Faust's own stop.

    Args:
        settings: marketflow's settings (``app.id`` and :func:`faust_options` come from it).
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings.app.id, **faust_options(settings), **kwargs)
        self.mf_settings = settings
        self._pre_stop_hooks: list[Callable[[], Awaitable[Any]]] = []

    def before_stop(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Register ``async fn()`` to run when the worker stops, before Faust waits for
        every consumed message to be acked and before the producer and services stop
        (stop ingest, flush sinks). Hooks run in registration order; a failing hook is
        logged and the next one still runs."""
        self._pre_stop_hooks.append(fn)
        return fn

    async def on_stop(self) -> None:
        """Run the :meth:`before_stop` hooks, then Faust's shutdown."""
        for fn in self._pre_stop_hooks:
            try:
                await fn()
            except Exception:
                self.log.exception("shutdown hook %r failed", fn)
        await super().on_stop()

    def _new_transport(self) -> Any:
        """Faust's aiokafka transport, with the fetch wait of ``broker.fetch_max_wait_ms``."""
        return _Transport(self.conf.broker_consumer, self)

    async def on_first_start(self) -> None:
        """Create topics first (auto-created ones would get the broker's default count),
        retrying an unreachable broker for ``broker.connect_timeout_s``.

        Raises:
            ConfigError: the broker stayed unreachable (the worker exits non-zero).
        """
        settings = self.mf_settings
        await super().on_first_start()
        deadline = time.monotonic() + settings.broker.connect_timeout_s
        delay = 0.5
        while True:
            try:
                await ensure_topics(settings)
                return
            except KafkaConnectionError as exc:
                if time.monotonic() + delay > deadline:
                    raise ConfigError(
                        f"broker unreachable at {settings.broker.url} for "
                        f"{settings.broker.connect_timeout_s:g} s: {exc}") from exc
                self.log.warning("broker not reachable yet (%s); retrying in %.1f s",
                                 exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _faust_cli() -> bool:
    """Whether this process is the ``faust`` command (worker or one of its commands)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) == "faust" or argv0.endswith(
        os.path.join("faust", "__main__.py"))


def use_event_loop(name: str, *, cli_only: bool = True) -> str:
    """Install the asyncio event-loop policy ``name`` (``uvloop`` or ``asyncio``) unless
    Faust's ``-L/--loop`` option or ``FAUST_LOOP`` already chose one (Faust applies those
    when ``faust`` is imported). Must run before the worker creates its loop.

    With ``cli_only`` (the default) only the ``faust`` command changes the policy: a
    process that merely imports the app (tests, scripts) keeps its own event loop.

    Returns:
        str: the loop implementation in effect.
    """
    chosen = os.environ.get("FAUST_LOOP") or os.environ.get("F_LOOP")
    if chosen:
        return chosen
    if cli_only and not _faust_cli():
        return "asyncio"
    if name == "uvloop":
        import uvloop

        if not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy):
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name
