"""Latest trade price per (exchange, symbol) and per symbol across exchanges, in Redis.

Keys (``<p>`` is ``redis.key_prefix``, default ``mf``), each a hash
``{price, ts_ms, exchange}`` with TTL ``redis.latest_ttl_s``:

* ``<p>:latest:<exchange>:<symbol>`` — newest trade of that exchange's pair;
* ``<p>:latest:<symbol>`` — newest trade of the symbol on any exchange.

A write only replaces a value whose ``ts_ms`` is not newer (one Lua script, atomic), so
re-delivered or out-of-order batches never move the latest price backwards.

Recent per-second state for price statistics (:mod:`tables.price_stats`):

* ``<p>:sec:<exchange>:<symbol>:<minute>`` — hash ``<second> -> "min,max,sum,count"`` of
  the ticks with event time in that second (``minute``/``second`` are epoch minutes and
  seconds); merged atomically by a Lua script, expiring 16 minutes after its last write,
  so stale data deletes itself and memory stays bounded;
* ``<p>:exchanges:<symbol>`` — set of exchanges that traded the symbol.

Live 1-minute bars for ``/ohlcv``'s still-open bucket:

* ``<p>:bar:<exchange>:<symbol>:<bucket_start_ms>`` — JSON closed-bar schema plus
  ``"closed": false|true``; open bars live 20 minutes after their last update, closed ones
  3 minutes (long enough for the sink to have written them to TimescaleDB).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from mode import Service
from redis.exceptions import RedisError

from app.metrics import SINK_ERRORS, SINK_RETRIES

__all__ = ["CLOSED_BAR_TTL_MS", "OPEN_BAR_TTL_MS", "SECONDS_TTL_MS", "LatestPrices", "bar_key",
           "exchanges_key", "latest_key", "seconds_key"]

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

#: live-bar TTLs (open / just closed)
OPEN_BAR_TTL_MS = 20 * 60_000
CLOSED_BAR_TTL_MS = 3 * 60_000

#: how long a per-minute hash of per-second state lives after its last write
SECONDS_TTL_MS = 16 * 60_000


def seconds_key(prefix: str, exchange: str, symbol: str, minute: int) -> str:
    """Redis key of one minute of per-second state (``minute`` = epoch minutes)."""
    return f"{prefix}:sec:{exchange}:{symbol}:{minute}"


def bar_key(prefix: str, exchange: str, symbol: str, bucket_start_ms: int) -> str:
    """Redis key of one live 1-minute bar."""
    return f"{prefix}:bar:{exchange}:{symbol}:{bucket_start_ms}"


def exchanges_key(prefix: str, symbol: str) -> str:
    """Redis key of the set of exchanges trading ``symbol``."""
    return f"{prefix}:exchanges:{symbol}"


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
        self._pending_secs: dict[tuple[str, int], list[float]] = {}
        self._pending_bars: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._script = self.client.register_script(_SET_IF_NEWER)
        self._merge_seconds = self.client.register_script(_MERGE_SECONDS)

    def update(self, latest: dict[str, tuple[float, int]]) -> None:
        """Queue ``"exchange:symbol" -> (price, ts_ms)`` for writing (newest wins)."""
        pending = self._pending
        for key, val in latest.items():
            cur = pending.get(key)
            if cur is None or val[1] >= cur[1]:
                pending[key] = val
        self._wake.set()

    def update_seconds(self, aggs: dict[tuple[str, int], list[float]]) -> None:
        """Queue per-second aggregates ``(exchange:symbol, second) -> [min, max, sum,
        count]`` (merged with anything pending)."""
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
        self._wake.set()

    def update_bars(self, bars: list[dict[str, Any]]) -> None:
        """Queue live 1-minute bar snapshots (closed-bar schema + ``closed``); a closed
        snapshot is never replaced by an open one."""
        pending = self._pending_bars
        for b in bars:
            k = (b["exchange"], b["symbol"], b["bucket_start_ms"])
            cur = pending.get(k)
            if cur is None or b["closed"] or not cur["closed"]:
                pending[k] = b
        self._wake.set()

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
        by_minute: dict[tuple[str, int], list[str]] = {}
        for (key, sec), a in secs.items():
            by_minute.setdefault((key, sec // 60), []).extend(
                (str(sec), repr(a[0]), repr(a[1]), repr(a[2]), str(int(a[3]))))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for (key, minute), args in by_minute.items():
                    exchange, symbol = key.split(":", 1)
                    await self._merge_seconds(
                        keys=[seconds_key(self.prefix, exchange, symbol, minute)],
                        args=[SECONDS_TTL_MS, *args], client=pipe)
                for (ex, sym, b), bar in bars.items():
                    pipe.set(bar_key(self.prefix, ex, sym, b), orjson.dumps(bar),
                             px=CLOSED_BAR_TTL_MS if bar["closed"] else OPEN_BAR_TTL_MS)
                for key in {k for k, _ in by_minute}:
                    exchange, symbol = key.split(":", 1)
                    pipe.sadd(exchanges_key(self.prefix, symbol), exchange)
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
            later, self._pending_secs = self._pending_secs, secs
            self.update_seconds(later)
            later_bars, self._pending_bars = self._pending_bars, bars
            self.update_bars(list(later_bars.values()))
            raise
        return len(batch) + len(secs) + len(bars)

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

    async def seconds(self, symbol: str, exchange: str | None, first_s: int, last_s: int
                      ) -> list[list[float]] | None:
        """Per-second aggregates of ``symbol`` (one exchange or all) for seconds
        ``first_s..last_s`` inclusive; None when the symbol (on that exchange) is unknown.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        if exchange is None:
            exchanges = sorted(str(e) for e in
                               await self.client.smembers(exchanges_key(self.prefix, symbol)))
            if not exchanges:
                return None
        else:
            if not await self.client.sismember(exchanges_key(self.prefix, symbol), exchange):
                return None
            exchanges = [exchange]
        async with self.client.pipeline(transaction=False) as pipe:
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

    async def live_bars(self, symbol: str, exchange: str | None, start_ms: int, end_ms: int
                        ) -> list[dict[str, Any]]:
        """Live 1-minute bars of ``symbol`` (one exchange or all) with start in
        ``[start_ms, end_ms)``.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        if exchange is None:
            exchanges = sorted(str(e) for e in
                               await self.client.smembers(exchanges_key(self.prefix, symbol)))
        else:
            exchanges = [exchange]
        first = start_ms - start_ms % 60_000
        keys = [bar_key(self.prefix, ex, symbol, b) for ex in exchanges
                for b in range(first, end_ms, 60_000)]
        if not keys:
            return []
        return [orjson.loads(v) for v in await self.client.mget(keys) if v]

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        return bool(await self.client.ping())
