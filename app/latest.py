"""Latest trade price per (exchange, symbol) and per symbol across exchanges, in Redis.

Keys (``<p>`` is ``redis.key_prefix``, default ``mf``), each a hash
``{price, ts_ms, exchange}`` with TTL ``redis.latest_ttl_s``:

* ``<p>:latest:<exchange>:<symbol>`` — newest trade of that exchange's pair;
* ``<p>:latest:<symbol>`` — newest trade of the symbol on any exchange.

A write only replaces a value whose ``ts_ms`` is not newer (one Lua script, atomic), so
re-delivered or out-of-order batches never move the latest price backwards.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from mode import Service
from redis.exceptions import RedisError

from app.metrics import SINK_ERRORS, SINK_RETRIES

__all__ = ["LatestPrices", "latest_key"]

log = logging.getLogger(__name__)

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


def latest_key(prefix: str, symbol: str, exchange: str | None = None) -> str:
    """Redis key of the latest price (``exchange=None``: across exchanges)."""
    if exchange is None:
        return f"{prefix}:latest:{symbol}"
    return f"{prefix}:latest:{exchange}:{symbol}"


class LatestPrices(Service):
    """Coalescing writer and reader of latest prices.

    The bar agent calls :meth:`update` after every tick batch (no I/O on the agent's
    path); a background task writes everything pending in one pipeline, so Redis sees
    each batch's newest trade within one round trip. Failed writes are retried with
    backoff and never lost: newer values for a key supersede older pending ones.

    Args:
        url: Redis URL.
        prefix: key prefix.
        ttl_s: key time to live, seconds.
    """

    def __init__(self, url: str, prefix: str, ttl_s: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._pending: dict[str, tuple[float, int]] = {}
        self._wake = asyncio.Event()
        self._script = self.client.register_script(_SET_IF_NEWER)

    def update(self, latest: dict[str, tuple[float, int]]) -> None:
        """Queue ``"exchange:symbol" -> (price, ts_ms)`` for writing (newest wins)."""
        pending = self._pending
        for key, val in latest.items():
            cur = pending.get(key)
            if cur is None or val[1] >= cur[1]:
                pending[key] = val
        self._wake.set()

    async def flush(self) -> int:
        """Write everything pending now. Returns the number of keys written.

        Raises:
            redis.exceptions.RedisError: the write failed (pending values are kept).
        """
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, (price, ts_ms) in batch.items():
                    exchange, symbol = key.split(":", 1)
                    await self._script(
                        keys=[latest_key(self.prefix, symbol, exchange),
                              latest_key(self.prefix, symbol)],
                        args=[repr(price), ts_ms, exchange, self.ttl_s],
                        client=pipe,
                    )
                await pipe.execute()
        except BaseException:
            batch.update({k: v for k, v in self._pending.items()
                          if k not in batch or v[1] >= batch[k][1]})
            self._pending = batch
            raise
        return len(batch)

    @Service.task
    async def _writer(self) -> None:
        delay = 0.05
        while not self.should_stop:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                delay = 0.05
            except (RedisError, OSError) as exc:
                SINK_ERRORS.labels("redis").inc()
                SINK_RETRIES.labels("redis").inc()
                log.warning("redis latest-price write failed (%s); retry in %.2fs", exc, delay)
                await self.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._wake.set()

    async def on_stop(self) -> None:
        """Flush what is pending, then close the connection pool."""
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            log.error("redis: %d latest prices not written at shutdown: %s",
                      len(self._pending), exc)
        await self.client.aclose()

    async def get(self, symbol: str, exchange: str | None = None) -> dict[str, Any] | None:
        """Read a latest price: ``{"price": float, "ts_ms": int, "exchange": str}`` or None.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        h = await self.client.hgetall(latest_key(self.prefix, symbol, exchange))
        if not h:
            return None
        return {"price": float(h["price"]), "ts_ms": int(h["ts_ms"]), "exchange": h["exchange"]}

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        return bool(await self.client.ping())
