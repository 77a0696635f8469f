"""Limits shared by every worker of the cluster, kept in Redis (docs/security.md#limits).

* :class:`SharedRateLimiter`: token buckets per client id, ``rate_per_s`` tokens per
  second up to ``burst``, plus an optional bucket for the whole cluster. One Lua script
  takes a token from both atomically (or from neither), on Redis's own clock (``TIME``),
  so workers with skewed clocks share one bucket correctly. Hash ``{tokens, ts_ms}`` per
  bucket, expiring once it would be full again.
* :class:`StreamSlots`: a client's open ``/stream`` sockets (or its subscriptions) across
  workers, a sorted set of socket id (``<socket id>/<sub id>``) -> expiry (ms, Redis
  clock). A worker holds a slot while its socket (subscription) is open and renews it
  every :data:`SLOT_RENEW_S`; a slot of a worker that died expires after
  :data:`SLOT_TTL_S`.

Both raise the Redis client's errors (:class:`redis.exceptions.RedisError`, ``OSError``)
when Redis fails; the caller falls back to per-process limits.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from stores.keys import rate_limit_key, stream_conns_key

__all__ = ["GLOBAL_CLIENT", "SLOT_RENEW_S", "SLOT_TTL_S", "SharedRateLimiter", "StreamSlots"]

#: the client id of the cluster-wide bucket
GLOBAL_CLIENT = "@global"
#: a stream slot not renewed for this long is free again, seconds
SLOT_TTL_S = 60.0
#: how often a worker renews its sockets' slots, seconds
SLOT_RENEW_S = 20.0

# KEYS: bucket keys (1 or 2); ARGV: rate_per_s, burst per key. Returns the seconds to wait
# as a string ("0": a token was taken from every bucket).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1]) / 1000
  local burst = tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate) end
  if tokens < 1 then wait = math.max(wait, (1 - tokens) / rate) end
  state[i] = {tokens, math.max(now, ts), rate, burst}
end
for i, key in ipairs(KEYS) do
  local s = state[i]
  local tokens = s[1]
  if wait == 0 then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', s[2])
  redis.call('PEXPIRE', key, math.ceil(s[4] / s[3]) + 1000)
end
return tostring(wait / 1000)
"""

# KEYS[1]: the client's slots; ARGV: socket id, max slots, ttl ms. 1: taken, 0: full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS: slot keys; ARGV[1]: ttl ms, then one socket id per key. Renews existing slots only.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


class SharedRateLimiter:
    """Cluster-wide token buckets (module docstring).

    Args:
        redis: a client (the request path's guarded one: short timeouts).
        prefix: ``redis.key_prefix``.
        rate_per_s: tokens per second of each client's bucket; 0: none.
        burst: size of each client's bucket (>= 1).
        global_rate_per_s: tokens per second of the cluster's bucket; 0: none.
        global_burst: size of the cluster's bucket.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, rate_per_s: float, burst: int,
                 global_rate_per_s: float = 0.0, global_burst: int = 1) -> None:
        self.prefix = prefix
        self._per_client = rate_per_s > 0
        self._global = global_rate_per_s > 0
        self._args: list[float] = []
        if self._per_client:
            self._args += [rate_per_s, burst]
        if self._global:
            self._args += [global_rate_per_s, global_burst]
        self._take = redis.register_script(_TAKE)

    async def acquire(self, client_id: str) -> float | None:
        """Take one token for ``client_id`` (and one of the cluster's).

        Returns:
            None when the request may proceed, else the seconds until it may (nothing
            was taken).

        Raises:
            redis.exceptions.RedisError, OSError: Redis failed.
        """
        keys = [rate_limit_key(self.prefix, client_id)] if self._per_client else []
        if self._global:
            keys.append(rate_limit_key(self.prefix, GLOBAL_CLIENT))
        if not keys:
            return None
        wait = float(await self._take(keys=keys, args=self._args))
        return wait if wait > 0 else None


class StreamSlots:
    """A client's ``/stream`` sockets (or subscriptions) across the cluster (module
    docstring).

    Args:
        redis: a client.
        prefix: ``redis.key_prefix``.
        max_per_client: slots per client id.
        key: the sorted set of a client (``stores.keys.stream_conns_key`` for sockets,
            ``stream_subs_key`` for subscriptions).
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, max_per_client: int,
                 key: Callable[[str, str], str] = stream_conns_key) -> None:
        self.prefix = prefix
        self._key = key
        self.max_per_client = max_per_client
        self._ttl_ms = int(SLOT_TTL_S * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._redis = redis

    async def acquire(self, client_id: str, socket_id: str) -> bool:
        """Take a slot for ``socket_id``; False when the client has ``max_per_client``.

        Raises:
            redis.exceptions.RedisError, OSError: Redis failed.
        """
        got = await self._acquire(keys=[self._key(self.prefix, client_id)],
                                  args=[socket_id, self.max_per_client, self._ttl_ms])
        return bool(int(got))

    async def release(self, client_id: str, socket_id: str) -> None:
        """Free the slot (idempotent).

        Raises:
            redis.exceptions.RedisError, OSError: Redis failed.
        """
        await self._redis.zrem(self._key(self.prefix, client_id), socket_id)

    async def renew(self, held: list[tuple[str, str]]) -> None:
        """Renew the slots ``(client id, socket id)`` this worker holds.

        Raises:
            redis.exceptions.RedisError, OSError: Redis failed.
        """
        if held:
            await self._renew(keys=[self._key(self.prefix, c) for c, _ in held],
                              args=[self._ttl_ms, *(s for _, s in held)])
