"""Builds the :class:`faust.App` from :mod:`app.config`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.errors import KafkaConnectionError
from faust.transport.drivers import aiokafka as aiokafka_driver

from app.config import Settings

__all__ = ["MarketflowApp", "app", "faust_options", "json_logging_config"]


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


def faust_options(s: Settings) -> dict[str, Any]:
    """Faust settings for ``s``.

    With ``broker.tansu_compat`` the options the local Tansu broker needs are added
    (see ``../shared/reference/broker.md``): 6 s session/rebalance timeout (Tansu makes a
    group join wait half the session timeout), 2 s heartbeat, and one record per produce
    batch (Tansu reports wrong end offsets for multi-record batches, which breaks
    changelog recovery). Production brokers (Redpanda, Kafka) keep Faust's defaults.
    """
    opts: dict[str, Any] = {
        "broker": s.broker.url,
        "store": "memory://",
        "datadir": s.app.datadir,
        "topic_partitions": s.topics.partitions,
        "topic_replication_factor": s.topics.replication,
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "web_bind": s.web.host,
        "web_host": s.web.host,
        "web_port": s.web.port,
        "web_enabled": True,
        "table_standby_replicas": 0,
    }
    if s.log.format == "json":
        opts["logging_config"] = json_logging_config()
    if s.broker.tansu_compat:
        opts.update(
            broker_session_timeout=6.0,
            broker_rebalance_timeout=6.0,
            broker_heartbeat_interval=2.0,
            producer_max_batch_size=1,
        )
    return opts


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer with a configurable fetch wait.

    Faust hard-codes ``fetch_max_wait_ms=1500`` (faust/transport/drivers/aiokafka.py).
    aiokafka sends one fetch at a time per broker, and Tansu holds a fetch that finds no
    new data for about half that wait without answering early when data arrives, so a
    fetch parked on an idle partition starves the busy ones (measured by
    bench/fetch_stall.py: 53k ticks/s at 1500 ms vs 168k at 100 ms).
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            # aiokafka keeps the value here until start() builds its Fetcher.
            consumer._fetch_max_wait_ms = wait_ms
        return consumer


class _Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(aiokafka_driver.Transport):
    Consumer = _Consumer


class MarketflowApp(faust.App):
    """:class:`faust.App` that creates its topics (explicit partition counts) before the
    consumer subscribes, and applies ``broker.fetch_max_wait_ms``."""

    #: consumer fetch wait in ms (None: Faust's 1500 ms); set from the settings.
    fetch_max_wait_ms: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        if self.conf.broker_consumer[0].scheme in ("kafka", "aiokafka"):
            return _Transport(self.conf.broker_consumer, self)
        return super()._new_transport()

    async def on_first_start(self) -> None:
        """Create topics first (auto-created ones would get the broker's default count),
        retrying an unreachable broker for ``broker.connect_timeout_s``.

        Raises:
            ConfigError: the broker stayed unreachable (the worker exits non-zero).
        """
        from app import settings
        from app.admin import ensure_topics
        from app.errors import ConfigError

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


def _make_app() -> MarketflowApp:
    from app import settings

    use_event_loop(settings.app.event_loop)
    opts = faust_options(settings)
    app = MarketflowApp(settings.app.id, **opts)
    app.fetch_max_wait_ms = settings.broker.fetch_max_wait_ms
    return app


app: MarketflowApp = _make_app()
