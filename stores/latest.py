"""Latest trade price per (exchange, symbol) and per symbol across exchanges, in Redis.

Keys (``<p>`` is ``redis.key_prefix``, default ``mf``), each a hash
``{price, ts_ms, exchange}`` with TTL ``redis.latest_ttl_s``:

* ``<p>:latest:<exchange>:<symbol>`` — newest trade of that exchange's pair;
* ``<p>:latest:<symbol>`` — newest trade of the symbol on any exchange.

A write only replaces a value whose ``ts_ms`` is not newer (one Lua script, atomic), so
re-delivered or out-of-order batches never move the latest price backwards.

Recent per-second state for price statistics (:mod:`query.price_stats`):

* ``<p>:sec:<exchange>:<symbol>:<minute>`` — hash ``<second> -> "min,max,sum,count"`` of
  the ticks with event time in that second (``minute``/``second`` are epoch minutes and
  seconds); merged atomically by a Lua script, expiring 16 minutes after its last write,
  so stale data deletes itself and memory stays bounded;
* ``<p>:exchanges:<symbol>`` — set of exchanges that traded the symbol.

Live 1-minute bars for ``/ohlcv``'s still-open bucket:

* ``<p>:bar:<exchange>:<symbol>:<bucket_start_ms>`` — JSON closed-bar schema plus
  ``"closed": false|true``; open bars live 20 minutes after their last update, closed ones
  3 minutes (long enough for the sink to have written them to TimescaleDB).

Redis outages (:class:`LatestPrices`): writes are queued off the agent's path and written by
one background task, so an unreachable Redis never blocks or stops the bar agent. While it
is down the queue stays bounded: latest prices are coalesced per key (one entry per
``exchange:symbol``), per-second statistics and live-bar snapshots are capped at
``max_pending_seconds`` / ``max_pending_bars`` entries, the oldest dropped first and counted
in ``marketflow_redis_dropped_total{kind}``. Writes are retried with exponential backoff
(50 ms doubling to 2 s), and a probe (``INFO server``, every second) notices a restarted
Redis even when no write failed. When Redis is reachable again after a failure, or its
``run_id`` changed (a restart, possibly with an empty keyspace), the worker re-publishes
its current state: the newest price of every key it has seen (set-if-newer, so never
backwards), the ``exchanges`` sets, and its open live bars (``SET NX``: a newer snapshot
already there wins). Per-second state from before a Redis data loss is not rebuilt (the
statistics views then cover less than the period until it ages out; see
:mod:`views.prices` for the fallback while Redis is down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import islice
from typing import Any

import orjson
import redis.asyncio as aioredis
from mode import Service
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from core.metrics import (
    REDIS_BACKLOG,
    REDIS_DROPPED,
    REDIS_REPUBLISHED,
    REDIS_WRITER_UP,
    SINK_ERRORS,
    SINK_RETRIES,
)

__all__ = ["CLOSED_BAR_TTL_MS", "MAX_PENDING_BARS", "MAX_PENDING_SECONDS", "OPEN_BAR_TTL_MS",
           "SECONDS_TTL_MS", "LatestPrices", "bar_key", "exchanges_key", "latest_key",
           "seconds_key"]

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

#: default bounds of the write buffer while Redis is unreachable (entries; oldest dropped)
MAX_PENDING_SECONDS = 200_000
MAX_PENDING_BARS = 20_000

#: write retry backoff (seconds): initial, cap
_BACKOFF_INITIAL_S = 0.05
_BACKOFF_MAX_S = 2.0
#: how often the writer probes Redis (seconds; a restart shows as a new run_id)
_PROBE_INTERVAL_S = 1.0
#: socket timeouts of the client (seconds): a hung Redis fails fast instead of blocking
_SOCKET_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 1.0
#: keys per re-publish pipeline
_REPUBLISH_CHUNK = 1000


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
    backoff: newer values for a key supersede older pending ones, and the per-second and
    live-bar backlogs are bounded (see the module docstring for the outage behaviour).

    Args:
        url: Redis URL.
        prefix: key prefix.
        ttl_s: key time to live, seconds.
        max_pending_seconds: bound of the per-second statistics backlog (entries
            ``(exchange:symbol, second)``).
        max_pending_bars: bound of the live-bar snapshot backlog (entries).
    """

    def __init__(self, url: str, prefix: str, ttl_s: int, *,
                 max_pending_seconds: int = MAX_PENDING_SECONDS,
                 max_pending_bars: int = MAX_PENDING_BARS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_pending_seconds = max_pending_seconds
        self.max_pending_bars = max_pending_bars
        # one quick retry (a pooled connection broken by a Redis restart), then fail: the
        # writer has its own backoff and the views fall back to TimescaleDB
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        self._pending: dict[str, tuple[float, int]] = {}
        self._pending_secs: dict[tuple[str, int], list[float]] = {}
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
        self._script = self.client.register_script(_SET_IF_NEWER)
        self._merge_seconds = self.client.register_script(_MERGE_SECONDS)

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
        if len(pending) > self.max_pending_seconds:
            self._drop_oldest(pending, self.max_pending_seconds, "seconds")
        self._wake.set()

    def update_bars(self, bars: list[dict[str, Any]]) -> None:
        """Queue live 1-minute bar snapshots (closed-bar schema + ``closed``); a closed
        snapshot is never replaced by an open one."""
        pending = self._pending_bars
        open_bars = self._open_bars
        now_ms = time.time_ns() // 1_000_000
        for b in bars:
            k = (b["exchange"], b["symbol"], b["bucket_start_ms"])
            cur = pending.get(k)
            if cur is None or b["closed"] or not cur["closed"]:
                pending[k] = b
            if b["closed"]:
                open_bars.pop(k, None)
            else:
                open_bars[k] = (now_ms, b)
        if len(pending) > self.max_pending_bars:
            self._drop_oldest(pending, self.max_pending_bars, "bars")
        if len(open_bars) > self.max_pending_bars:
            self._prune_open_bars(now_ms)
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

    def _prune_open_bars(self, now_ms: int) -> None:
        """Forget open bars not updated for :data:`OPEN_BAR_TTL_MS` (their key expired in
        Redis anyway; e.g. of partitions now owned by another worker), then the oldest
        beyond ``max_pending_bars``."""
        ob = self._open_bars
        for k in [k for k, (t, _) in ob.items() if t < now_ms - OPEN_BAR_TTL_MS]:
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

    async def republish(self) -> int:
        """Write the current state again (after Redis came back, possibly empty): the
        newest price of every key seen (set-if-newer), the ``exchanges`` sets, and the open
        live bars (``SET NX``, so a newer snapshot already in Redis wins). Returns the
        number of keys sent.

        Raises:
            redis.exceptions.RedisError, OSError: the write failed (call again later).
        """
        now_ms = time.time_ns() // 1_000_000
        self._prune_open_bars(now_ms)
        latest = list(self._known.items())
        bars = [b for _, b in self._open_bars.values()]
        for i in range(0, len(latest), _REPUBLISH_CHUNK):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, (price, ts_ms) in latest[i:i + _REPUBLISH_CHUNK]:
                    exchange, symbol = key.split(":", 1)
                    pipe.sadd(exchanges_key(self.prefix, symbol), exchange)
                    await self._script(
                        keys=[latest_key(self.prefix, symbol, exchange),
                              latest_key(self.prefix, symbol)],
                        args=[repr(price), ts_ms, exchange, self.ttl_s], client=pipe)
                await pipe.execute()
        for i in range(0, len(bars), _REPUBLISH_CHUNK):
            async with self.client.pipeline(transaction=False) as pipe:
                for bar in bars[i:i + _REPUBLISH_CHUNK]:
                    pipe.set(bar_key(self.prefix, bar["exchange"], bar["symbol"],
                                     bar["bucket_start_ms"]),
                             orjson.dumps(bar), px=OPEN_BAR_TTL_MS, nx=True)
                await pipe.execute()
        REDIS_REPUBLISHED.labels("latest").inc(len(latest))
        REDIS_REPUBLISHED.labels("bars").inc(len(bars))
        self._republished_ms = now_ms
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
            await self.client.ping()
            return
        try:
            info = await self.client.info("server")
        except ResponseError:  # INFO disabled (managed Redis): PING only, no restart check
            self._info_supported = False
            await self.client.ping()
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
            self._outage_since_ms = time.time_ns() // 1_000_000
            log.warning("redis unreachable (%s); buffering writes (bounded) and retrying",
                        self._last_error)
        elif self._failures % 20 == 0:
            log.warning("redis still unreachable after %d attempts (%s); backlog: %s",
                        self._failures, self._last_error, self._backlog())
        self._republish_needed = True  # whatever Redis held may be gone when it returns

    def _on_success(self) -> None:
        if not self._redis_up:
            log.warning("redis reachable again after %.1fs; backlog written",
                        (time.time_ns() // 1_000_000 - (self._outage_since_ms or 0)) / 1000)
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
            try:
                await asyncio.wait_for(self._wake.wait(), _PROBE_INTERVAL_S)
            except TimeoutError:
                pass
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
