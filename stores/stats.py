"""Recent per-second trade statistics in Redis, for the price-statistics views
(:mod:`query.price_stats` defines the aggregate).

* ``<p>:sec:<exchange>:<symbol>:<minute>`` (:mod:`stores.keys`) — hash
  ``<second> -> "min,max,sum,count"`` of the ticks with event time in that second
  (``minute``/``second`` are epoch minutes and seconds); merged atomically by a Lua
  script, expiring :data:`SECONDS_TTL_MS` after its last write, so stale data deletes
  itself and memory stays bounded.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from core.timeutil import MINUTE_MS
from stores.keys import exchanges_key, seconds_key
from stores.latest import exchanges_of

__all__ = ["SECONDS_TTL_MS", "SecondStatsStore"]

#: how long a per-minute hash of per-second state lives after its last write
SECONDS_TTL_MS = 16 * MINUTE_MS

_MERGE_SECONDS = """
for i = 2, #ARGV, 5 do
  local f = ARGV[i]
  local lo, hi, sum, n = tonumber(ARGV[i+1]), tonumber(ARGV[i+2]), tonumber(ARGV[i+3]),
                         tonumber(ARGV[i+4])
  local cur = redis.call('HGET', KEYS[1], f)
  if cur then
    local a, b, c, d = string.match(cur, '([^,]+),([^,]+),([^,]+),([^,]+)')
    lo = math.min(lo, tonumber(a)); hi = math.max(hi, tonumber(b))
    sum = sum + tonumber(c); n = n + tonumber(d)
  end
  redis.call('HSET', KEYS[1], f, string.format('%.17g,%.17g,%.17g,%d', lo, hi, sum, n))
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class SecondStatsStore:
    """Per-second statistics in Redis (module docstring).

    Args:
        redis: the shared connection (:mod:`stores.connection`).
        prefix: key prefix.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._merge = redis.register_script(_MERGE_SECONDS)

    async def queue_seconds(self, pipe: Pipeline,
                            aggs: dict[tuple[str, int], list[float]]) -> set[str]:
        """Add merges of ``(exchange:symbol, second) -> [min, max, sum, count]`` to
        ``pipe``, one script call per key and minute.

        Returns:
            set[str]: the ``exchange:symbol`` keys written.
        """
        by_minute: dict[tuple[str, int], list[str]] = {}
        for (key, sec), a in aggs.items():
            by_minute.setdefault((key, sec // 60), []).extend(
                (str(sec), repr(a[0]), repr(a[1]), repr(a[2]), str(int(a[3]))))
        for (key, minute), args in by_minute.items():
            exchange, symbol = key.split(":", 1)
            await self._merge(keys=[seconds_key(self.prefix, exchange, symbol, minute)],
                              args=[SECONDS_TTL_MS, *args], client=pipe)
        return {k for k, _ in by_minute}

    async def seconds(self, symbol: str, exchange: str | None, first_s: int, last_s: int
                      ) -> list[list[float]] | None:
        """Per-second aggregates ``[min, max, sum, count]`` of ``symbol`` (one exchange or
        all) for seconds ``first_s..last_s`` inclusive; None when the symbol (on that
        exchange) is unknown.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        if exchange is None:
            exchanges = await exchanges_of(self.redis, self.prefix, symbol)
            if not exchanges:
                return None
        else:
            if not await self.redis.sismember(exchanges_key(self.prefix, symbol), exchange):
                return None
            exchanges = [exchange]
        async with self.redis.pipeline(transaction=False) as pipe:
            for ex in exchanges:
                for minute in range(first_s // 60, last_s // 60 + 1):
                    pipe.hgetall(seconds_key(self.prefix, ex, symbol, minute))
            hashes = await pipe.execute()
        out = []
        for h in hashes:
            for f, v in h.items():
                if first_s <= int(f) <= last_s:
                    lo, hi, total, n = v.split(",")
                    out.append([float(lo), float(hi), float(total), float(n)])
        return out
