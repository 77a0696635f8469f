"""Ingest inside the worker: fan-in of every feed to the ``ticks`` topic, through
:class:`feeds.live.publisher.TickPublisher`.

* :class:`IngestManager` runs on every worker but ingests only on the consumer-group
  leader (``app.is_leader()``), in the mode requested through Redis (:mod:`stores.control`):
  ``live`` = one task per exchange program (+ CryptoCompare when enabled), ``test`` = the
  synthetic generator, ``off`` = nothing. It re-checks every 0.5 s, so a mode switch or a
  leader change takes effect within about a second, and it publishes its feeds' state for
  ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from mode import Service
from redis.exceptions import RedisError

from core.config import Settings
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import Backoff
from feeds.live.cryptocompare import CryptoCompareFeed
from feeds.live.generator import SyntheticTicks, TestGenerator
from feeds.live.marketflow_tcp import MarketflowExchangeFeed
from feeds.live.publisher import TickPublisher
from stores.control import get_mode, write_ingest_status

__all__ = ["IngestManager"]

log = logging.getLogger(__name__)

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
        #: given to every feed's :attr:`StateHolder.on_change` (set by :mod:`feeds.history.gaps`)
        self.on_feed_state: Callable[[StateHolder, str], None] | None = None

    def _make_feeds(self, mode: str) -> list[tuple[StateHolder, Awaitable[None]]]:
        f = self.settings.feeds
        out: list[tuple[StateHolder, Awaitable[None]]] = []
        if mode == "live":
            for ex in f.exchanges:
                st = StateHolder(ex.name, "marketflow_tcp")
                feed = MarketflowExchangeFeed(
                    ex.name, ex.host, ex.port, f.pairs, self.publisher, st, f.idle_timeout_s,
                    Backoff(f.backoff_initial_s, f.backoff_max_s))
                out.append((st, feed.run()))
            cc = f.cryptocompare
            if cc.enabled:
                st = StateHolder("cryptocompare", "cryptocompare")
                ccfeed = CryptoCompareFeed(cc.url, cc.api_key, cc.subs, self.publisher, st,
                                           cc.idle_timeout_s,
                                           Backoff(f.backoff_initial_s, f.backoff_max_s))
                out.append((st, ccfeed.run()))
        elif mode == "test":
            g = f.generator
            st = StateHolder("generator", "generator")
            gen = TestGenerator(SyntheticTicks(g.exchanges, f.pairs, g.seed), g.rate_per_s,
                                self.publisher, st)
            out.append((st, gen.run()))
        return out

    async def switch(self, mode: str) -> None:
        """Stop the running feeds (flushing what they produced), start ``mode``'s."""
        if mode == self.running_mode:
            return
        for t in self._feed_tasks:
            t.cancel()
        # results are the CancelledErrors we asked for (crashes were logged when they happened)
        await asyncio.gather(*self._feed_tasks, return_exceptions=True)
        self._feed_tasks = []
        await self.publisher.flush()
        log.info("ingest: %s -> %s", self.running_mode, mode,
                 extra={"mode": mode, "previous_mode": self.running_mode})
        self.running_mode = mode
        self.states = {}
        for st, coro in self._make_feeds(mode):
            st.on_change = self.on_feed_state
            self.states[st.name] = st
            task = asyncio.ensure_future(coro)
            task.add_done_callback(self._feed_done)
            self._feed_tasks.append(task)

    def _feed_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("ingest: feed task crashed: %r", task.exception())

    def status(self) -> dict[str, Any]:
        """JSON-able status for ``/health`` and ``GET /mode``."""
        return {"worker": self.worker_id, "mode": self.running_mode, "updated_ms": now_ms(),
                "buffered_ticks": self.publisher.pending,
                "max_buffered_ticks": self.publisher.max_pending,
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
        interval_s = self.settings.feeds.publish_interval_ms / 1000
        while not self.should_stop:
            await self.sleep(interval_s)
            await self.publisher.flush()

    async def on_stop(self) -> None:
        """Stop the feeds and send what they produced."""
        await self.switch("off")
