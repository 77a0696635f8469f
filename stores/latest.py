"""Latest trade price per (exchange, symbol) and per symbol across exchanges, in Redis.

Keys (formats in :mod:`stores.keys`; ``<p>`` is ``redis.key_prefix``), each a hash
``{price, ts_ms, exchange}`` with TTL ``redis.latest_ttl_s``:

* ``<p>:latest:<exchange>:<symbol>`` — newest trade of that exchange's pair;
* ``<p>:latest:<symbol>`` — newest trade of the symbol on any exchange;
* ``<p>:exchanges:<symbol>`` — set of the exchanges that traded the symbol (read by the
  statistics and live-bar stores too).

A write only replaces a value whose ``ts_ms`` is not newer (one Lua script, atomic), so
re-delivered or out-of-order batches never move the latest price backwards. Writes are
queued into a pipeline by :class:`stores.buffer.RedisWriteBuffer`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from stores.keys import exchanges_key, latest_key

__all__ = ["LatestPriceStore", "exchanges_of"]

_SET_IF_NEWER = """
local n = 0
for i, k in ipairs(KEYS) do
  local cur = redis.call('HGET', k, 'ts_ms')
  if (not cur) or tonumber(cur) <= tonumber(ARGV[2]) then
    redis.call('HSET', k, 'price', ARGV[1], 'ts_ms', ARGV[2], 'exchange', ARGV[3])
    redis.call('EXPIRE', k, tonumber(ARGV[4]))
    n = n + 1
  end
end
return n
"""


async def exchanges_of(redis: aioredis.Redis, prefix: str, symbol: str) -> list[str]:
    """The exchanges that traded ``symbol``, sorted.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    return sorted(str(e) for e in await redis.smembers(exchanges_key(prefix, symbol)))


class LatestPriceStore:
    """Latest prices in Redis (module docstring).

    Args:
        redis: the shared connection (:mod:`stores.connection`).
        prefix: key prefix.
        ttl_s: key time to live, seconds.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._set_if_newer = redis.register_script(_SET_IF_NEWER)

    async def queue_prices(self, pipe: Pipeline, latest: dict[str, tuple[float, int]]) -> None:
        """Add set-if-newer writes of ``"exchange:symbol" -> (price, ts_ms)`` to ``pipe``."""
        for key, (price, ts_ms) in latest.items():
            exchange, symbol = key.split(":", 1)
            await self._set_if_newer(
                keys=[latest_key(self.prefix, symbol, exchange), latest_key(self.prefix, symbol)],
                args=[repr(price), ts_ms, exchange, self.ttl_s], client=pipe)

    def queue_exchanges(self, pipe: Pipeline, keys: set[str]) -> None:
        """Add the exchanges of ``"exchange:symbol"`` keys to their symbols' sets."""
        for key in keys:
            exchange, symbol = key.split(":", 1)
            pipe.sadd(exchanges_key(self.prefix, symbol), exchange)

    async def get(self, symbol: str, exchange: str | None = None) -> dict[str, Any] | None:
        """Read a latest price: ``{"price": float, "ts_ms": int, "exchange": str}`` or None.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        h = await self.redis.hgetall(latest_key(self.prefix, symbol, exchange))
        if not h:
            return None
        return {"price": float(h["price"]), "ts_ms": int(h["ts_ms"]), "exchange": h["exchange"]}

    async def ping(self) -> bool:
        """True when Redis answers PING.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        return bool(await self.redis.ping())
