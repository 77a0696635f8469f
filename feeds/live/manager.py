"""Ingest inside the worker: fan-in of every feed to the ``ticks`` topic, through
:class:`feeds.live.publisher.TickPublisher`.

* :class:`IngestManager` runs on every worker but ingests only on the consumer-group
  leader (``app.is_leader()``), in the mode requested through Redis (:mod:`stores.control`):
  ``live`` = one task per exchange program (+ CryptoCompare when enabled), ``test`` = the
  synthetic generator, ``off`` = nothing. It re-checks every 0.5 s, so a mode switch or a
  leader change takes effect within about a second, and it publishes its feeds' state for
  ``/health``.
* Every feed task, and the publisher's periodic flush, runs under a
  :class:`~feeds.live.supervisor.Supervisor`: a crash is logged, counted
  (``marketflow_feed_restarts_total{feed}``), shown in ``/health`` and restarted with
  backoff.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from mode import Service
from redis.exceptions import RedisError

from core.config import ExchangeFeed, Settings
from core.metrics import FEED_CONNECTED
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import Backoff
from feeds.live.cryptocompare import CryptoCompareFeed
from feeds.live.generator import SyntheticTicks, TestGenerator
from feeds.live.marketflow_tcp import MarketflowExchangeFeed
from feeds.live.publisher import TickPublisher, next_flush_s
from feeds.live.supervisor import Supervisor
from stores.control import get_mode, write_ingest_status

__all__ = ["IngestManager"]

log = logging.getLogger(__name__)

async def _cancel_all(tasks: list[asyncio.Task[None]], recancel_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again every
    ``recancel_s`` those still running: a task can drop a cancellation (Python 3.11's
    ``asyncio.wait_for`` returns its awaitable's result when both arrive together), and a
    mode switch must not wait forever for it. Results (the CancelledErrors asked for;
    crashes were logged when they happened) are discarded."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        if pending:
            log.warning("ingest: %d feed task(s) still running after a cancel; cancelling "
                        "again", len(pending))
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" warning


class IngestManager(Service):
    """Starts and stops the feeds of the requested mode on the leader worker only.

    Args:
        settings: the worker's settings.
        publisher: where feeds publish.
        redis_client: a ``redis.asyncio`` client (mode and status keys).
        is_leader: ``() -> bool``, whether this worker is the consumer-group leader.
        worker_id: shown in the status (host:port).
    """

    def __init__(self, settings: Settings, publisher: TickPublisher, redis_client: Any,
                 is_leader: Callable[[], bool], worker_id: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.publisher = publisher
        self.redis = redis_client
        self.is_leader = is_leader
        self.worker_id = worker_id or f"{socket.gethostname()}:{settings.web.port}"
        self.running_mode = "off"
        self.states: dict[str, StateHolder] = {}
        self._feed_tasks: list[asyncio.Task[None]] = []
        self._requested = settings.feeds.mode
        #: the periodic flush's state (restarts after a failed flush)
        self.publisher_state = StateHolder("publisher", "publisher")
        #: given to every feed's :attr:`StateHolder.on_change` (set by :mod:`feeds.history.gaps`)
        self.on_feed_state: Callable[[StateHolder, str], None] | None = None

    def _make_feeds(self, mode: str) -> list[tuple[StateHolder, Callable[[], Awaitable[None]]]]:
        """``(state, start)`` per feed of ``mode``; each ``start()`` runs a fresh feed
        object (after a crash, its supervisor calls it again)."""
        f = self.settings.feeds
        out: list[tuple[StateHolder, Callable[[], Awaitable[None]]]] = []
        if mode == "live":
            for ex in f.exchanges:
                st = StateHolder(ex.name, "marketflow_tcp")
                out.append((st, partial(self._tcp_feed, ex, st)))
            if f.cryptocompare.enabled:
                st = StateHolder("cryptocompare", "cryptocompare")
                out.append((st, partial(self._cryptocompare_feed, st)))
        elif mode == "test":
            st = StateHolder("generator", "generator")
            out.append((st, partial(self._generator, st)))
        return out

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.feeds.backoff_initial_s, self.settings.feeds.backoff_max_s)

    def _tcp_feed(self, ex: ExchangeFeed, st: StateHolder) -> Awaitable[None]:
        f = self.settings.feeds
        return MarketflowExchangeFeed(ex.name, ex.host, ex.port, f.pairs, self.publisher, st,
                                      f.idle_timeout_s, self._backoff()).run()

    def _cryptocompare_feed(self, st: StateHolder) -> Awaitable[None]:
        cc = self.settings.feeds.cryptocompare
        return CryptoCompareFeed(cc.url, cc.api_key.get_secret_value(), cc.subs, self.publisher, st,
                                 cc.idle_timeout_s, self._backoff()).run()

    def _generator(self, st: StateHolder) -> Awaitable[None]:
        f = self.settings.feeds
        g = f.generator
        return TestGenerator(SyntheticTicks(g.exchanges, f.pairs, g.seed), g.rate_per_s,
                             self.publisher, st).run()

    async def switch(self, mode: str) -> None:
        """Stop the running feeds (flushing what they produced), start ``mode``'s."""
        if mode == self.running_mode:
            return
        await _cancel_all(self._feed_tasks)
        self._feed_tasks = []
        await self.publisher.flush()
        log.info("ingest: %s -> %s", self.running_mode, mode,
                 extra={"mode": mode, "previous_mode": self.running_mode})
        self.running_mode = mode
        for old in self.states.values():  # stopped feeds export no state
            FEED_CONNECTED.remove(old.name, old.kind)
        self.states = {}
        for st, start in self._make_feeds(mode):
            st.on_change = self._feed_state_changed
            FEED_CONNECTED.labels(st.name, st.kind).set(0)
            self.states[st.name] = st
            sup = Supervisor(st.name, start, self._backoff(), st)
            task = asyncio.ensure_future(sup.run())
            task.add_done_callback(self._feed_done)
            self._feed_tasks.append(task)

    def _feed_state_changed(self, st: StateHolder, previous: str) -> None:
        """Export a feed's transition (``marketflow_feed_connected{feed,kind}``: 1 while
        ``connected``), then pass it on to :attr:`on_feed_state`."""
        FEED_CONNECTED.labels(st.name, st.kind).set(1 if st.state == "connected" else 0)
        if self.on_feed_state is not None:
            self.on_feed_state(st, previous)

    def _feed_done(self, task: asyncio.Task[None]) -> None:
        """A supervised feed only ends by cancellation or by returning; anything else is a
        bug of the supervisor itself, logged."""
        if not task.cancelled() and task.exception() is not None:
            log.error("ingest: feed supervisor failed: %r", task.exception())

    def status(self) -> dict[str, Any]:
        """JSON-able status for ``/health`` and ``GET /mode``."""
        return {"worker": self.worker_id, "mode": self.running_mode, "updated_ms": now_ms(),
                "buffered_ticks": self.publisher.pending,
                "max_buffered_ticks": self.publisher.max_pending,
                "publisher": self.publisher_state.as_dict(),
                "feeds": {n: s.as_dict() for n, s in self.states.items()}}

    @Service.task
    async def _control(self) -> None:
        prefix = self.settings.redis.key_prefix
        while not self.should_stop:
            try:
                self._requested = await get_mode(self.redis, prefix, self.settings.feeds.mode)
            except (RedisError, OSError) as exc:
                log.warning("ingest: cannot read the mode from Redis (%s); keeping %s",
                            exc, self._requested)
            desired = self._requested if self.is_leader() else "off"
            await self.switch(desired)
            if self.running_mode != "off":
                try:
                    await write_ingest_status(self.redis, prefix, self.status())
                except (RedisError, OSError) as exc:
                    log.warning("ingest: cannot publish status: %s", exc)
            await self.sleep(0.5)

    @Service.task
    async def _flusher(self) -> None:
        sup = Supervisor("publisher", self._flush_forever, self._backoff(),
                         self.publisher_state)
        await sup.run()

    async def _flush_forever(self) -> None:
        """Flush the publisher when ticks are buffered, at once when it was idle, else
        after the pause :func:`feeds.live.publisher.next_flush_s` gives (a failed flush
        keeps the unsent ticks buffered: :meth:`TickPublisher.flush`)."""
        f = self.settings.feeds
        max_interval_s = f.publish_interval_ms / 1000
        pub = self.publisher
        loop = asyncio.get_running_loop()
        self.publisher_state.set_state("running")
        next_s = 0.0
        while not self.should_stop:
            try:
                async with asyncio.timeout(1.0):  # look at should_stop now and then
                    await pub.wait_for_ticks()
            except TimeoutError:
                continue
            pause_s = next_s - loop.time()
            if pause_s > 0:
                await self.sleep(pause_s)
            started_s = loop.time()
            await pub.flush()
            next_s = next_flush_s(started_s, pub.last_messages, f.max_messages_per_s,
                                  max_interval_s)

    async def on_stop(self) -> None:
        """Stop the feeds and send what they produced."""
        await self.switch("off")
