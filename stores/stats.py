"""Recent per-second trade statistics in Redis, for the price-statistics views
(:mod:`query.price_stats` defines the aggregate).

* ``<p>:sec:<exchange>:<symbol>:<minute>`` (:mod:`stores.keys`) — hash
  ``<second> -> "min,max,sum,count"`` of the ticks with event time in that second
  (``minute``/``second`` are epoch minutes and seconds), plus the field ``off``: the
  highest source offset (``ticks`` message offset; a key lives on one partition) merged
  into the hash. Merged atomically by a Lua script that skips an entry whose offset is
  not above ``off``, so a message applied again — re-delivered after a crash that fell
  between this write and the window state's changelog write, or a pipeline retried after
  a lost reply — is counted once, as the window state does (:mod:`tables.aggregator`).
  The hash expires :data:`SECONDS_TTL_MS` after its last write, so stale data deletes
  itself and memory stays bounded.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from core.timeutil import MINUTE_MS
from stores.keys import exchanges_key, seconds_key
from stores.latest import exchanges_of

__all__ = ["OFFSET_FIELD", "SECONDS_TTL_MS", "SecondStatsStore"]

#: how long a per-minute hash of per-second state lives after its last write
SECONDS_TTL_MS = 16 * MINUTE_MS

#: hash field holding the highest source offset merged
OFFSET_FIELD = "off"

# ARGV: ttl_ms, then per entry: offset, second, min, max, sum, count
_MERGE_SECONDS = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'off') or '-1')
local top = stored
for i = 2, #ARGV, 6 do
  local off = tonumber(ARGV[i])
  if off > stored then
    local f = ARGV[i+1]
    local lo, hi, sum, n = tonumber(ARGV[i+2]), tonumber(ARGV[i+3]), tonumber(ARGV[i+4]),
                           tonumber(ARGV[i+5])
    local cur = redis.call('HGET', KEYS[1], f)
    if cur then
      local a, b, c, d = string.match(cur, '([^,]+),([^,]+),([^,]+),([^,]+)')
      lo = math.min(lo, tonumber(a)); hi = math.max(hi, tonumber(b))
      sum = sum + tonumber(c); n = n + tonumber(d)
    end
    redis.call('HSET', KEYS[1], f, string.format('%.17g,%.17g,%.17g,%d', lo, hi, sum, n))
    if off > top then top = off end
  end
end
if top > stored then redis.call('HSET', KEYS[1], 'off', top) end
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
                            aggs: dict[tuple[str, int, int], list[float]]) -> set[str]:
        """Add merges of ``(exchange:symbol, second, source offset) -> [min, max, sum,
        count]`` to ``pipe``, one script call per key and minute; entries whose offset the
        hash already merged are skipped by the script (module docstring).

        Returns:
            set[str]: the ``exchange:symbol`` keys written.
        """
        by_minute: dict[tuple[str, int], list[str]] = {}
        for (key, sec, off), a in aggs.items():
            by_minute.setdefault((key, sec // 60), []).extend(
                (str(off), str(sec), repr(a[0]), repr(a[1]), repr(a[2]), str(int(a[3]))))
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
                if f != OFFSET_FIELD and first_s <= int(f) <= last_s:
                    lo, hi, total, n = v.split(",")
                    out.append([float(lo), float(hi), float(total), float(n)])
        return out
