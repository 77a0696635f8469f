"""Live 1-minute bars in Redis, for the still-open buckets of ``/ohlcv`` and
``/udf/history``.

* ``<p>:bar:<exchange>:<symbol>:<bucket_start_ms>`` (:mod:`stores.keys`) — JSON
  closed-bar schema (:mod:`core.models`) plus ``"closed": false|true``; open bars live
  :data:`OPEN_BAR_TTL_MS` after their last update, closed ones :data:`CLOSED_BAR_TTL_MS`
  (long enough for the sink to have written them to TimescaleDB).
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from core.timeutil import MINUTE_MS, floor_minute
from stores.keys import bar_key
from stores.latest import exchanges_of

__all__ = ["CLOSED_BAR_TTL_MS", "OPEN_BAR_TTL_MS", "LiveBarStore"]

#: live-bar TTLs (open / just closed)
OPEN_BAR_TTL_MS = 20 * MINUTE_MS
CLOSED_BAR_TTL_MS = 3 * MINUTE_MS


class LiveBarStore:
    """Live bars in Redis (module docstring), under ``prefix`` on the shared connection
    ``redis`` (:mod:`stores.connection`)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def queue_bars(self, pipe: Pipeline, bars: list[dict[str, Any]], *,
                   only_new: bool = False) -> None:
        """Add ``SET`` of each bar snapshot to ``pipe`` (``only_new``: ``SET NX``, so a
        newer snapshot already in Redis wins; used when re-publishing)."""
        for bar in bars:
            pipe.set(bar_key(self.prefix, bar["exchange"], bar["symbol"], bar["bucket_start_ms"]),
                     orjson.dumps(bar),
                     px=CLOSED_BAR_TTL_MS if bar["closed"] else OPEN_BAR_TTL_MS,
                     nx=only_new)

    async def live_bars(self, symbol: str, exchange: str | None, start_ms: int, end_ms: int
                        ) -> list[dict[str, Any]]:
        """Live 1-minute bars of ``symbol`` (one exchange or all) with start in
        ``[start_ms, end_ms)``.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        exchanges = ([exchange] if exchange is not None
                     else await exchanges_of(self.redis, self.prefix, symbol))
        keys = [bar_key(self.prefix, ex, symbol, b) for ex in exchanges
                for b in range(floor_minute(start_ms), end_ms, MINUTE_MS)]
        if not keys:
            return []
        return [orjson.loads(v) for v in await self.redis.mget(keys) if v]
