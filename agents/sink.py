"""Closed bars -> TimescaleDB, in batches, idempotently.

The agent reads the closed-bars topic with manual acks: a bar's offset becomes
committable only after the batch holding it is upserted. Messages its Faust stream
skipped are read back first (:mod:`agents.skipped`), as in the bar agent. A bar that
finds the writer idle (no flush started within ``sink.min_flush_gap_s``) is written at
once; bars that arrive while a batch is written, or within that gap, go out together in
the next batch. A batch is also written when ``sink.batch_size`` bars are pending, and a
backstop timer writes any bar pending for ``sink.flush_interval_s``. A failing database
is retried with exponential backoff (capped at ``sink.retry_max_s``) while the agent
waits, which pauses consumption (back-pressure).

Memory bound: at most ``2 * sink.batch_size`` bars are held in memory -- one batch being
written (or retried) plus one filling up; when the filling batch is full the agent waits
for the write, so Faust stops fetching once its stream buffer is full and the remaining
closed bars stay in the broker (nothing is dropped). ``marketflow_sink_pending_bars``
shows the bars held.
After a commit that holds bars older than :func:`core.timeutil.stale_write_ms`, the
symbols' cached ``/ohlcv`` ranges are invalidated (:mod:`stores.ohlcv_cache`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import asyncpg
import faust
import orjson
from faust.types import EventT, StreamT
from mode import Service

from agents.skipped import (
    STALL_CHECK_INTERVAL_S,
    FetchedEvent,
    OffsetGuard,
    SkippedMessages,
)
from core.config import Settings
from core.metrics import (
    BARS_WRITTEN,
    FLUSH_SECONDS,
    PENDING_BARS,
    SINK_ERRORS,
    SINK_RETRIES,
    TIMESCALEDB_WRITER_UP,
)
from core.timeutil import now_ms, stale_write_ms
from core.topics import Topics
from sql.bars_1m import upsert_bars
from sql.pool import Database
from stores.ohlcv_cache import OhlcvCache

__all__ = ["Acks", "BarWriter", "register_sink"]

log = logging.getLogger(__name__)

_REQUIRED = ("exchange", "symbol", "bucket_start_ms", "open", "high", "low", "close",
             "volume", "trade_count", "avg_price", "vwap", "open_ts_ms", "close_ts_ms")


class BarWriter(Service):
    """Buffers closed bars with their events and upserts them in batches; a service that
    owns the database service (mode stops a dependency after its owner, so the pool
    closes only after the last flush).

    Args:
        db: the database service.
        batch_size: flush when this many bars are pending.
        flush_interval_s: flush when the oldest pending bar is this old (seconds; the
            backstop, :meth:`flush_if_due`).
        retry_max_s: cap of the exponential retry delay (seconds).
        min_flush_gap_s: least time between the starts of two flushes of the service's
            own flusher task (seconds): a bar arriving later than this after the last
            flush started is written at once.
        upsert: ``async (conn, bars) -> rows`` (default :func:`sql.bars_1m.upsert_bars`).
        invalidate: ``async (symbols) -> None`` called after a commit with the symbols of
            the bars older than ``stale_ms`` (wall clock minus ``bucket_start_ms``).
        stale_ms: see ``invalidate``.

    Each bar is queued with the stream it came from, which acks its event once the row is
    committed.

    At most ``2 * batch_size`` bars are held (:attr:`held`): the batch being written and
    the next one; :meth:`add` blocks the agent while both are full (back-pressure).
    """

    def __init__(self, db: Database, batch_size: int, flush_interval_s: float,
                 retry_max_s: float, upsert: Callable[..., Awaitable[int]] = upsert_bars,
                 invalidate: Callable[[set[str]], Awaitable[None]] | None = None,
                 stale_ms: int = 0, min_flush_gap_s: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_dependency(db)
        self.db = db
        self.upsert = upsert
        self.invalidate = invalidate
        self.stale_ms = stale_ms
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_max_s = retry_max_s
        self._pending: list[tuple[dict[str, Any], Any, Acks]] = []
        self._inflight = 0
        self._oldest_s = 0.0
        self._lock = asyncio.Lock()
        self.min_flush_gap_s = min_flush_gap_s
        self._last_flush_s = -math.inf
        self._has_pending = asyncio.Event()

    async def on_start(self) -> None:
        """Export ``marketflow_timescaledb_writer_up`` 1 until a write fails."""
        TIMESCALEDB_WRITER_UP.set(1)

    @property
    def held(self) -> int:
        """Bars held in memory: pending plus the batch being written (<= 2 x batch_size)."""
        return len(self._pending) + self._inflight

    async def add(self, bar: dict[str, Any], event: Any, stream: Acks) -> None:
        """Queue one bar (``stream`` acks ``event`` once it is written); when the batch
        is full, flush it and wait (back-pressure: while a write is retried, the caller
        waits here instead of queueing more bars)."""
        if not self._pending:
            self._oldest_s = time.monotonic()
        self._pending.append((bar, event, stream))
        self._has_pending.set()
        PENDING_BARS.set(self.held)
        if len(self._pending) >= self.batch_size:
            await self.flush()

    @Service.task
    async def _flusher(self) -> None:
        """Write pending bars as soon as they arrive, at most one flush start per
        ``min_flush_gap_s`` (see the module docstring)."""
        while not self.should_stop:
            try:
                async with asyncio.timeout(1.0):  # look at should_stop now and then
                    await self._has_pending.wait()
            except TimeoutError:
                continue
            self._has_pending.clear()
            pause_s = self._last_flush_s + self.min_flush_gap_s - time.monotonic()
            if pause_s > 0:
                await self.sleep(pause_s)
            await self.flush()

    async def flush_if_due(self) -> None:
        """Flush when the oldest pending bar waited ``flush_interval_s``."""
        if self._pending and time.monotonic() - self._oldest_s >= self.flush_interval_s:
            await self.flush()

    async def flush(self) -> int:
        """Upsert everything pending, retrying until it succeeds; then ack the events.

        Returns:
            int: rows written.
        """
        async with self._lock:
            if not self._pending:
                return 0
            self._last_flush_s = time.monotonic()
            # Take the batch out first: bars arriving during the awaits below start a new
            # batch (they must not be acked with this one before they are written).
            batch, self._pending = self._pending, []
            self._inflight = len(batch)
            try:
                return await self._write(batch)
            finally:
                self._inflight = 0
                PENDING_BARS.set(self.held)

    async def _write(self, batch: list[tuple[dict[str, Any], Any, Acks]]) -> int:
        """Upsert ``batch`` (retrying with backoff until it succeeds), then ack its events."""
        delay = 0.2
        while True:
            try:
                pool = await self.db.pool()
                with FLUSH_SECONDS.time():
                    async with pool.acquire() as conn:
                        n = await self.upsert(conn, [b for b, _, _ in batch])
                TIMESCALEDB_WRITER_UP.set(1)
                break
            except (TimeoutError, OSError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                SINK_ERRORS.labels("timescaledb").inc()
                SINK_RETRIES.labels("timescaledb").inc()
                TIMESCALEDB_WRITER_UP.set(0)
                log.warning("bar upsert of %d rows failed (%s); retry in %.1fs",
                            len(batch), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        BARS_WRITTEN.inc(n)
        if self.invalidate is not None:
            old_before = now_ms() - self.stale_ms
            stale = {b["symbol"] for b, _, _ in batch if b["bucket_start_ms"] < old_before}
            if stale:
                await self.invalidate(stale)
        for _, event, stream in batch:
            await stream.ack(event)
        return n


class Acks(Protocol):
    """What acknowledges a bar's message once its row is committed (a Faust stream)."""

    async def ack(self, event: Any) -> Any:
        """Acknowledge ``event``."""


class _Acks:
    """Acks of the sink's stream: a Faust event through the stream, a read-back record
    (:class:`agents.skipped.FetchedEvent`) through the :class:`agents.skipped.OffsetGuard`."""

    def __init__(self, stream: StreamT, guard: OffsetGuard) -> None:
        self.stream = stream
        self.guard = guard

    async def ack(self, event: Any) -> Any:
        if isinstance(event, FetchedEvent):
            return await self.guard.ack(event)
        return await self.stream.ack(event)


def _decode_bar(raw: Any) -> dict[str, Any] | None:
    try:
        bar = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(bar, dict) or any(k not in bar for k in _REQUIRED):
        return None
    return bar


def register_sink(app: faust.App, settings: Settings, topics: Topics, database: Database,
                  ohlcv_cache: OhlcvCache) -> BarWriter:
    """Register the sink on ``app``: the closed-bars agent (``agents.sink.persist_bars``,
    upserts every closed bar into ``bars_1m`` and acks only after the row is committed;
    bars its stream skipped are read back, :mod:`agents.skipped`), the skipped-tail check
    timer, the flush timer (a quiet stream still gets its bars written; cache invalidations that did
    not reach Redis are retried), the writer service (which owns ``database``) and the
    shutdown flush (before Faust waits for acks and stops).

    Returns:
        BarWriter: the writer, already a service of ``app``.
    """
    sink = settings.sink
    writer = BarWriter(database, sink.batch_size, sink.flush_interval_s, sink.retry_max_s,
                       invalidate=ohlcv_cache.invalidate,
                       stale_ms=stale_write_ms(settings.window.grace_ms),
                       min_flush_gap_s=sink.min_flush_gap_s)

    skipped = SkippedMessages(settings.broker, settings.topics.bars)
    guard = OffsetGuard(app, skipped, settings.app.id, agent="sink")
    live: list[_Acks] = []  # the running agent's acks (one actor)

    async def handle(event: EventT | FetchedEvent, acks: _Acks) -> None:
        bar = _decode_bar(event.value)
        if bar is None:
            SINK_ERRORS.labels("bad_bar").inc()
            log.error("skipping undecodable closed-bar message at %s[%s]@%s: %r",
                      event.message.topic, event.message.partition, event.message.offset,
                      event.value[:200] if event.value else event.value)
            await acks.ack(event)
            return
        await writer.add(bar, event, acks)

    async def persist_bars(stream: StreamT) -> None:
        acks = _Acks(cast(faust.Stream, stream).noack(), guard)
        live[:] = [acks]
        try:
            async for event in acks.stream.events():
                async with guard.lock:
                    p = event.message.partition
                    missing = await guard.missing_before(p, event.message.offset)
                    if missing is not None:
                        for fetched in await guard.read_back(p, *missing):
                            await handle(fetched, acks)
                    await handle(event, acks)
        finally:
            live.clear()

    async def stall_check() -> None:
        if not live or guard.lock.locked():
            return
        async with guard.lock:
            for p, start, end in await guard.stalled_ranges():
                for fetched in await guard.read_back(p, start, end):
                    await handle(fetched, live[0])

    async def flush_bars() -> None:
        await writer.flush_if_due()
        await ohlcv_cache.retry_pending()

    async def flush_bars_at_shutdown() -> None:
        try:
            n = await asyncio.wait_for(writer.flush(), timeout=max(5.0, sink.retry_max_s))
        except TimeoutError:
            log.error("database unreachable at shutdown: pending bars stay unacknowledged "
                      "and are written after the next start")
            return
        if n:
            log.info("flushed %d bars at shutdown", n, extra={"bars": n})

    def reset_guard(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        guard.reset()

    app.agent(topics.bars, name="agents.sink.persist_bars")(persist_bars)
    app.on_partitions_revoked.connect(reset_guard)
    app.on_partitions_assigned.connect(reset_guard)
    cast(Any, app).before_stop(skipped.close)
    app.timer(interval=max(0.05, sink.flush_interval_s / 4))(flush_bars)
    app.timer(interval=STALL_CHECK_INTERVAL_S)(stall_check)
    cast(Any, app).before_stop(flush_bars_at_shutdown)
    app.service(writer)  # type: ignore[arg-type]
    return writer
