"""Read-through Redis cache of *sealed* OHLCV ranges, invalidated by late writes.

``GET /ohlcv`` splits a request at the **seal boundary**: buckets that end before the live
window (:func:`core.timeutil.live_window_ms`) are *sealed* — all their minutes are old
enough to be in TimescaleDB, so the answer for them changes only when an old bar is
(re)written. Their serialised JSON is cached; the newer buckets (database + live bars in
Redis) are computed on every request and spliced after them.

Keys (``<p>`` is ``redis.key_prefix``):

* ``<p>:ohlcv:gen:<symbol>`` — integer generation of the symbol's stored bars;
* ``<p>:ohlcv:<symbol>:<gen>:<exchange|*>:<interval>:<fill>:<start_ms>:<sealed_end_ms>`` —
  ``<last bar JSON or null>\\n<JSON array of the sealed bars>``, TTL ``web.ohlcv_cache_ttl_s``.

Invalidation: every writer of ``bars_1m`` calls :meth:`OhlcvCache.invalidate` after its
commit for the symbols of bars older than :func:`core.timeutil.stale_write_ms` (a correction, a
backfill, a sink catching up after an outage); that ``INCR`` makes every cached entry of
the symbol unreachable (they expire by TTL). Readers read the generation *before* querying
the database and store under that generation, so a write committed during a read leaves
at most an unreachable entry. Writes of recent bars (the normal once-a-minute close) do
not invalidate: a bar younger than :func:`core.timeutil.stale_write_ms` at commit lies at least
2 minutes after every seal boundary a reader could have used before that commit
(margin for clock skew between workers). An invalidation that fails because Redis is
down is retried on the next call (:meth:`OhlcvCache.retry_pending`); meanwhile entries
can be stale for at most the TTL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.metrics import CACHE_REQUESTS, SINK_ERRORS
from stores.keys import ohlcv_gen_key

__all__ = ["OhlcvCache"]

log = logging.getLogger(__name__)

#: margin between the newest bar a write may touch without invalidating and the oldest
_INVALIDATE_TIMEOUT_S = 2.0






class OhlcvCache:
    """The sealed-range cache (see the module docstring).

    Args:
        redis: the shared connection (:mod:`stores.connection`; responses decoded, so a
            cached range is re-encoded to bytes on a hit).
        prefix: key prefix.
        ttl_s: entry lifetime; 0 disables the cache (reads miss, writes are skipped;
            invalidations still happen, so enabling it later is safe).
        max_bytes: larger entries are not stored.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_s: int, max_bytes: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._pending: set[str] = set()

    @property
    def enabled(self) -> bool:
        """Whether reads and writes use the cache."""
        return self.ttl_s > 0

    async def generation(self, symbol: str) -> int | None:
        """The symbol's current generation (0 before any invalidation); None when the
        cache is disabled or Redis does not answer (counted, logged at debug)."""
        if not self.enabled:
            return None
        try:
            raw = await self.redis.get(ohlcv_gen_key(self.prefix, symbol))
        except (RedisError, OSError) as exc:
            CACHE_REQUESTS.labels("error").inc()
            log.debug("ohlcv cache: generation read failed: %s", exc)
            return None
        return int(raw) if raw else 0

    async def get(self, key: str) -> tuple[dict[str, Any] | None, bytes] | None:
        """``(last sealed bar or None, JSON array bytes)`` of a cached range, or None on a
        miss (or a Redis error, counted)."""
        try:
            raw = await self.redis.get(key)
        except (RedisError, OSError) as exc:
            CACHE_REQUESTS.labels("error").inc()
            log.debug("ohlcv cache: read failed: %s", exc)
            return None
        if raw is None:
            CACHE_REQUESTS.labels("miss").inc()
            return None
        CACHE_REQUESTS.labels("hit").inc()
        data = raw.encode() if isinstance(raw, str) else raw
        head, _, blob = data.partition(b"\n")
        return orjson.loads(head), blob

    async def put(self, key: str, last_bar: dict[str, Any] | None, blob: bytes) -> None:
        """Store a sealed range (skipped when disabled or larger than ``max_bytes``; a
        Redis error is counted and logged at debug: the next request recomputes)."""
        if not self.enabled or len(blob) > self.max_bytes:
            return
        try:
            await self.redis.set(key, orjson.dumps(last_bar) + b"\n" + blob, ex=self.ttl_s)
        except (RedisError, OSError) as exc:
            CACHE_REQUESTS.labels("error").inc()
            log.debug("ohlcv cache: write failed: %s", exc)

    async def invalidate(self, symbols: Iterable[str]) -> None:
        """Bump the generation of ``symbols`` (after a commit of old bars). On a Redis
        error the symbols stay pending (retried by the next call or
        :meth:`retry_pending`); the error is counted as a sink error and logged."""
        self._pending.update(symbols)
        await self.retry_pending()

    async def retry_pending(self) -> None:
        """Bump the generations whose invalidation has not reached Redis yet."""
        if not self._pending:
            return
        todo = sorted(self._pending)
        try:
            async with asyncio.timeout(_INVALIDATE_TIMEOUT_S):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for s in todo:
                        pipe.incr(ohlcv_gen_key(self.prefix, s))
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            SINK_ERRORS.labels("ohlcv_cache").inc()
            log.warning("ohlcv cache: invalidation of %d symbol(s) failed (%s); retrying "
                        "on the next flush", len(todo), exc)
            return
        self._pending.difference_update(todo)
