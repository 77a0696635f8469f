"""The write path to Redis: latest prices, per-second statistics and live-bar snapshots
from the bar agent, queued off the agent's path and written by one background task
(:class:`RedisWriteBuffer`) through the stores :mod:`stores.latest`, :mod:`stores.stats`
and :mod:`stores.live_bars`, so an unreachable Redis never blocks or stops the agent.

While Redis is down the queue stays bounded: latest prices are coalesced per key (one
entry per ``exchange:symbol``), per-second statistics and live-bar snapshots are capped
at ``max_pending_seconds`` / ``max_pending_bars`` entries, the oldest dropped first and
counted in ``marketflow_redis_dropped_total{kind}``. Writes are retried with exponential
backoff (50 ms doubling to 2 s), and a probe (``INFO server``, every second) notices a
restarted Redis even when no write failed. When Redis is reachable again after a
failure, or its ``run_id`` changed (a restart, possibly with an empty keyspace), the
worker re-publishes its current state: the newest price of every key it has seen (set-
if-newer, so never backwards), the ``exchanges`` sets, and its open live bars (``SET
NX``: a newer snapshot already there wins). Per-second state from before a Redis data
loss is not rebuilt (the statistics views then cover less than the period until it ages
out; see :mod:`query.prices` for the fallback while Redis is down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import islice
from typing import Any

import redis.asyncio as aioredis
from mode import Service
from redis.exceptions import RedisError, ResponseError

from core.metrics import (
    REDIS_BACKLOG,
    REDIS_DROPPED,
    REDIS_REPUBLISHED,
    REDIS_WRITER_UP,
    SINK_ERRORS,
    SINK_RETRIES,
)
from core.timeutil import now_ms
from stores.latest import LatestPriceStore
from stores.live_bars import OPEN_BAR_TTL_MS, LiveBarStore
from stores.stats import SecondStatsStore
from stores.stream_channel import StreamChannel

__all__ = ["MAX_PENDING_BARS", "MAX_PENDING_SECONDS", "RedisWriteBuffer"]

log = logging.getLogger(__name__)

#: default bounds of the write buffer while Redis is unreachable (entries; oldest dropped)
MAX_PENDING_SECONDS = 200_000
MAX_PENDING_BARS = 20_000

#: write retry backoff (seconds): initial, cap
_BACKOFF_INITIAL_S = 0.05
_BACKOFF_MAX_S = 2.0
#: how often the writer probes Redis (seconds; a restart shows as a new run_id)
_PROBE_INTERVAL_S = 1.0
#: keys per re-publish pipeline
_REPUBLISH_CHUNK = 1000


class RedisWriteBuffer(Service):
    """Coalescing writer of latest prices, per-second statistics and live bars.

    The bar agent calls :meth:`update` (and :meth:`update_seconds`, :meth:`update_bars`)
    after every tick batch (no I/O on the agent's
    path); a background task writes everything pending in one pipeline, so Redis sees
    each batch's newest trade within one round trip. Failed writes are retried with
    backoff: newer values for a key supersede older pending ones, and the per-second and
    live-bar backlogs are bounded (see the module docstring for the outage behaviour).

    Args:
        redis: the shared connection (probed for restarts).
        latest: where latest prices and the exchanges sets are written.
        stats: where per-second statistics are written.
        live_bars: where live-bar snapshots are written.
        max_pending_seconds: bound of the per-second statistics backlog (entries
            ``(exchange:symbol, second, source offset)``).
        max_pending_bars: bound of the live-bar snapshot backlog (entries).
        channel: where each flush's changed bars and prices are also published (in the
            same pipeline, after the writes), None for no publishing.
    """

    def __init__(self, redis: aioredis.Redis, latest: LatestPriceStore,
                 stats: SecondStatsStore, live_bars: LiveBarStore, *,
                 max_pending_seconds: int = MAX_PENDING_SECONDS,
                 max_pending_bars: int = MAX_PENDING_BARS,
                 channel: StreamChannel | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channel = channel
        self.redis = redis
        self.latest = latest
        self.stats = stats
        self.live_bars = live_bars
        self.max_pending_seconds = max_pending_seconds
        self.max_pending_bars = max_pending_bars
        self._pending: dict[str, tuple[float, int]] = {}
        self._pending_secs: dict[tuple[str, int, int], list[float]] = {}
        self._pending_bars: dict[tuple[str, str, int], dict[str, Any]] = {}
        #: current state re-published when Redis comes back: newest price per key, and
        #: open live bars with the wall time (ms) of their last update
        self._known: dict[str, tuple[float, int]] = {}
        self._open_bars: dict[tuple[str, str, int], tuple[int, dict[str, Any]]] = {}
        self._redis_up = True
        self._republish_needed = False
        self._run_id: str | None = None
        self._info_supported = True
        self._outage_since_ms: int | None = None
        self._last_error: str | None = None
        self._last_probe = 0.0
        self._failures = 0
        self._dropped = {"seconds": 0, "bars": 0}
        self._republished_ms: int | None = None
        self._wake = asyncio.Event()

    def update(self, latest: dict[str, tuple[float, int]]) -> None:
        """Queue ``"exchange:symbol" -> (price, ts_ms)`` for writing (newest wins)."""
        pending = self._pending
        known = self._known
        for key, val in latest.items():
            cur = pending.get(key)
            if cur is None or val[1] >= cur[1]:
                pending[key] = val
            cur = known.get(key)
            if cur is None or val[1] >= cur[1]:
                known[key] = val
        self._wake.set()

    def update_seconds(self, aggs: dict[tuple[str, int], list[float]], offset: int) -> None:
        """Queue the per-second aggregates ``(exchange:symbol, second) -> [min, max, sum,
        count]`` of the ``ticks`` message at ``offset``. They stay apart from other
        messages' until written, so that Redis merges each offset once
        (:mod:`stores.stats`)."""
        self._merge_seconds({(k, sec, offset): a for (k, sec), a in aggs.items()})

    def _merge_seconds(self, aggs: dict[tuple[str, int, int], list[float]]) -> None:
        pending = self._pending_secs
        for k, a in aggs.items():
            cur = pending.get(k)
            if cur is None:
                pending[k] = list(a)
            else:
                cur[0] = min(cur[0], a[0])
                cur[1] = max(cur[1], a[1])
                cur[2] += a[2]
                cur[3] += a[3]
        if len(pending) > self.max_pending_seconds:
            self._drop_oldest(pending, self.max_pending_seconds, "seconds")
        self._wake.set()

    def update_bars(self, bars: list[dict[str, Any]]) -> None:
        """Queue live 1-minute bar snapshots (closed-bar schema + ``closed``); a closed
        snapshot is never replaced by an open one."""
        pending = self._pending_bars
        open_bars = self._open_bars
        wall_ms = now_ms()
        for b in bars:
            k = (b["exchange"], b["symbol"], b["bucket_start_ms"])
            cur = pending.get(k)
            if cur is None or b["closed"] or not cur["closed"]:
                pending[k] = b
            if b["closed"]:
                open_bars.pop(k, None)
            else:
                open_bars[k] = (wall_ms, b)
        if len(pending) > self.max_pending_bars:
            self._drop_oldest(pending, self.max_pending_bars, "bars")
        if len(open_bars) > self.max_pending_bars:
            self._prune_open_bars(wall_ms)
        self._wake.set()

    def _drop_oldest(self, pending: dict[Any, Any], bound: int, kind: str) -> None:
        """Drop the oldest entries (insertion order) of a backlog down to ``bound``."""
        n = len(pending) - bound
        for k in list(islice(pending, n)):
            del pending[k]
        self._dropped[kind] += n
        REDIS_DROPPED.labels(kind).inc(n)
        if self._dropped[kind] == n or self._dropped[kind] % 10_000 < n:
            log.warning("redis unreachable: %s backlog full (%d); dropped %d oldest "
                        "(%d in total)", kind, bound, n, self._dropped[kind],
                        extra={"kind": kind, "dropped": self._dropped[kind]})

    def _prune_open_bars(self, wall_ms: int) -> None:
        """Forget open bars not updated for :data:`OPEN_BAR_TTL_MS` (their key expired in
        Redis anyway; e.g. of partitions now owned by another worker), then the oldest
        beyond ``max_pending_bars``."""
        ob = self._open_bars
        for k in [k for k, (t, _) in ob.items() if t < wall_ms - OPEN_BAR_TTL_MS]:
            del ob[k]
        if len(ob) > self.max_pending_bars:
            for k in sorted(ob, key=lambda k: ob[k][0])[:len(ob) - self.max_pending_bars]:
                del ob[k]

    async def flush(self) -> int:
        """Write everything pending now. Returns the number of keys written.

        Raises:
            redis.exceptions.RedisError: the write failed (pending values are kept).
        """
        if not self._pending and not self._pending_secs and not self._pending_bars:
            return 0
        batch, self._pending = self._pending, {}
        secs, self._pending_secs = self._pending_secs, {}
        bars, self._pending_bars = self._pending_bars, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                traded = await self.stats.queue_seconds(pipe, secs)
                self.live_bars.queue_bars(pipe, list(bars.values()))
                self.latest.queue_exchanges(pipe, traded)
                await self.latest.queue_prices(pipe, batch)
                if self.channel is not None:
                    self.channel.queue_publish(pipe, list(bars.values()), batch.items())
                await pipe.execute()
        except BaseException:
            batch.update({k: v for k, v in self._pending.items()
                          if k not in batch or v[1] >= batch[k][1]})
            self._pending = batch
            later, self._pending_secs = self._pending_secs, secs
            self._merge_seconds(later)
            later_bars, self._pending_bars = self._pending_bars, bars
            self.update_bars(list(later_bars.values()))
            raise
        return len(batch) + len(secs) + len(bars)

    async def republish(self) -> int:
        """Write the current state again (after Redis came back, possibly empty): the
        newest price of every key seen (set-if-newer), the ``exchanges`` sets, and the open
        live bars (``SET NX``, so a newer snapshot already in Redis wins). Returns the
        number of keys sent.

        Raises:
            redis.exceptions.RedisError, OSError: the write failed (call again later).
        """
        wall_ms = now_ms()
        self._prune_open_bars(wall_ms)
        latest = list(self._known.items())
        bars = [b for _, b in self._open_bars.values()]
        for i in range(0, len(latest), _REPUBLISH_CHUNK):
            chunk = dict(latest[i:i + _REPUBLISH_CHUNK])
            async with self.redis.pipeline(transaction=False) as pipe:
                self.latest.queue_exchanges(pipe, set(chunk))
                await self.latest.queue_prices(pipe, chunk)
                await pipe.execute()
        for i in range(0, len(bars), _REPUBLISH_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                self.live_bars.queue_bars(pipe, bars[i:i + _REPUBLISH_CHUNK], only_new=True)
                await pipe.execute()
        REDIS_REPUBLISHED.labels("latest").inc(len(latest))
        REDIS_REPUBLISHED.labels("bars").inc(len(bars))
        self._republished_ms = wall_ms
        log.info("redis: re-published %d latest prices and %d open live bars",
                 len(latest), len(bars), extra={"latest": len(latest), "bars": len(bars)})
        return len(latest) + len(bars)

    async def _probe(self) -> None:
        """Check Redis; a changed ``run_id`` (restart) asks for a re-publish.

        Raises:
            redis.exceptions.RedisError, OSError: Redis unreachable.
        """
        self._last_probe = time.monotonic()
        if not self._info_supported:
            await self.redis.ping()
            return
        try:
            info = await self.redis.info("server")
        except ResponseError:  # INFO disabled (managed Redis): PING only, no restart check
            self._info_supported = False
            await self.redis.ping()
            return
        run_id = str(info.get("run_id") or "")
        if self._run_id is not None and run_id != self._run_id:
            log.warning("redis restarted (run_id changed); re-publishing current state")
            self._republish_needed = True
        self._run_id = run_id

    def _on_failure(self, exc: BaseException) -> None:
        SINK_ERRORS.labels("redis").inc()
        SINK_RETRIES.labels("redis").inc()
        REDIS_WRITER_UP.set(0)
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self._redis_up:
            self._redis_up = False
            self._outage_since_ms = now_ms()
            log.warning("redis unreachable (%s); buffering writes (bounded) and retrying",
                        self._last_error)
        elif self._failures % 20 == 0:
            log.warning("redis still unreachable after %d attempts (%s); backlog: %s",
                        self._failures, self._last_error, self._backlog())
        self._republish_needed = True  # whatever Redis held may be gone when it returns

    def _on_success(self) -> None:
        if not self._redis_up:
            log.warning("redis reachable again after %.1fs; backlog written",
                        (now_ms() - (self._outage_since_ms or 0)) / 1000)
        self._redis_up = True
        self._outage_since_ms = None
        self._failures = 0
        REDIS_WRITER_UP.set(1)

    def _backlog(self) -> dict[str, int]:
        return {"latest": len(self._pending), "seconds": len(self._pending_secs),
                "bars": len(self._pending_bars)}

    def status(self) -> dict[str, Any]:
        """The writer's view of Redis (for ``/health``): ``{"up": bool, "outage_since_ms":
        int|None, "backlog": {"latest", "seconds", "bars"}, "dropped": {"seconds", "bars"},
        "republished_ms": int|None, "last_error": str|None}``."""
        return {"up": self._redis_up, "outage_since_ms": self._outage_since_ms,
                "backlog": self._backlog(), "dropped": dict(self._dropped),
                "republished_ms": self._republished_ms, "last_error": self._last_error}

    @Service.task
    async def _writer(self) -> None:
        delay = _BACKOFF_INITIAL_S
        REDIS_WRITER_UP.set(1)
        while not self.should_stop:
            try:  # asyncio.timeout: 3.11's wait_for can drop a cancel (the stop)
                async with asyncio.timeout(_PROBE_INTERVAL_S):
                    await self._wake.wait()
            except TimeoutError:
                pass  # no wake-up within the interval: probe and flush anyway
            self._wake.clear()
            try:
                if time.monotonic() - self._last_probe >= _PROBE_INTERVAL_S:
                    await self._probe()
                if self._republish_needed:
                    await self.republish()
                    self._republish_needed = False
                await self.flush()
                self._on_success()
                delay = _BACKOFF_INITIAL_S
            except (RedisError, OSError, TimeoutError) as exc:
                self._on_failure(exc)
                await self.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                self._last_probe = 0.0  # probe first on the next attempt
                self._wake.set()
            finally:
                for kind, n in self._backlog().items():
                    REDIS_BACKLOG.labels(kind).set(n)

    async def on_stop(self) -> None:
        """Flush what is pending (the connection is closed by its own service)."""
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            log.error("redis: %d latest prices not written at shutdown: %s",
                      len(self._pending), exc)
