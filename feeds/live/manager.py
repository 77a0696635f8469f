"""Ingest inside the worker: fan-in of every feed to the ``ticks`` topic.

* :class:`TickPublisher` batches the feeds' ticks per ``exchange:symbol`` for at most
  ``feeds.publish_interval_ms`` and sends one JSON-array message per key (Faust's
  per-event cost caps an agent at ~11k events/s). Its buffer is bounded: when the broker is
  slow, ``publish`` waits for the sends, which stops the feeds reading, so TCP/websocket
  back-pressure reaches the exchanges and memory stays bounded.
* :class:`IngestManager` runs on every worker but ingests only on the consumer-group
  leader (``app.is_leader()``), in the mode requested through Redis (:mod:`stores.control`):
  ``live`` = one task per exchange program (+ CryptoCompare when enabled), ``test`` = the
  synthetic generator, ``off`` = nothing. It re-checks every 0.5 s, so a mode switch or a
  leader change takes effect within about a second, and it publishes its feeds' state for
  ``/health``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from mode import Service
from redis.exceptions import RedisError

from core.config import Settings
from core.metrics import DEAD_LETTERED
from core.models import Tick, dead_letter_message, tick_to_json
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import Backoff
from feeds.live.cryptocompare import CryptoCompareFeed
from feeds.live.generator import SyntheticTicks, TestGenerator
from feeds.live.marketflow_tcp import MarketflowExchangeFeed
from stores.control import get_mode, write_ingest_status

__all__ = ["IngestManager", "TickPublisher"]

log = logging.getLogger(__name__)

Send = Callable[[bytes | None, bytes], Awaitable[Any]]


class TickPublisher:
    """Per-key batching of feed output into ``ticks`` messages (see module docstring).

    Args:
        send_tick: ``async (key, value) -> future``: produce to ``ticks``.
        send_dead: ``async (key, value) -> future``: produce to the dead-letter topic.
        max_pending: ticks buffered before ``publish`` flushes (and waits) itself.
        max_span_ms: most event time (``ts_ms``) one message spans.

    A flush sends each key's ticks in arrival order, cut into messages spanning at most
    ``max_span_ms`` of event time, and interleaves the keys' messages by their first
    ``ts_ms``. In normal operation that is one message per key; after a broker outage the
    backlog of every key goes out in event-time order, so the partition's watermark
    advances with it and no buffered tick of another key falls behind it (late).
    """

    def __init__(self, send_tick: Send, send_dead: Send, max_pending: int = 20_000,
                 max_span_ms: int = 50) -> None:
        self.send_tick = send_tick
        self.send_dead = send_dead
        self.max_pending = max_pending
        self.max_span_ms = max_span_ms
        self._buf: dict[str, list[Tick]] = {}
        self._n = 0
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Ticks buffered and not yet handed to the producer."""
        return self._n

    async def publish(self, ticks: list[Tick]) -> None:
        """Buffer ticks; flushes when ``max_pending`` are waiting."""
        buf = self._buf
        for t in ticks:
            buf.setdefault(f"{t.exchange}:{t.symbol}", []).append(t)
        self._n += len(ticks)
        if self._n >= self.max_pending:
            await self.flush()

    async def dead_letter(self, payload: Any, reason: str, detail: str,
                          key: str | None = None) -> None:
        """Dead-letter a rejected feed input (counted by reason)."""
        DEAD_LETTERED.labels(reason).inc()
        await self.send_dead(key.encode() if key else None,
                             dead_letter_message(payload, reason, detail, None, None, now_ms()))

    def _messages(self, buf: dict[str, list[Tick]]) -> Iterator[tuple[bytes, list[Tick]]]:
        """``(key, ticks)`` messages of ``buf`` in the order described in the class."""
        span = self.max_span_ms

        def cut(key: str, ticks: list[Tick]) -> Iterator[tuple[int, bytes, list[Tick]]]:
            k = key.encode()
            start = 0
            first = ticks[0].ts_ms
            for i, t in enumerate(ticks):
                if abs(t.ts_ms - first) >= span:
                    yield first, k, ticks[start:i]
                    start, first = i, t.ts_ms
            yield first, k, ticks[start:]

        if all(t[-1].ts_ms - t[0].ts_ms < span for t in buf.values()):  # the usual case
            return ((k.encode(), t) for k, t in buf.items())
        merged = heapq.merge(*(cut(k, t) for k, t in buf.items()), key=lambda m: m[0])
        return ((k, t) for _, k, t in merged)

    async def flush(self) -> int:
        """Send everything buffered and wait for the broker's acks.

        Returns:
            int: ticks sent.
        """
        async with self._lock:
            if not self._buf:
                return 0
            buf, n = self._buf, self._n
            self._buf, self._n = {}, 0
            futs = [await self.send_tick(key, orjson.dumps([tick_to_json(t) for t in ticks]))
                    for key, ticks in self._messages(buf)]
            await asyncio.gather(*futs)
            return n


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
