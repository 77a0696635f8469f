"""The worker's Redis connections: one pool shared by the background writers (the write
buffer, the stream hub, ingest control), and one guarded pool for the request path.

Socket timeouts are short, so a hung Redis fails a call fast instead of blocking it: the
write buffer (:mod:`stores.buffer`) has its own backoff. The request path's client
(:class:`GuardedRedis`, from :func:`connect_guarded`) bounds every command and pipeline
by ``redis.request_timeout_s`` and goes through a :class:`core.breaker.CircuitBreaker`:
once Redis failed three times in a row, or once gave no answer in time, requests skip it
at once (:class:`RedisUnavailable`) and fall back to TimescaleDB, until a probe
(:class:`RedisConnection`) finds it answering again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from mode import Service
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.breaker import CircuitBreaker, CircuitOpen
from core.errors import MarketflowError

__all__ = ["CONNECT_TIMEOUT_S", "MAX_CONNECTIONS", "SOCKET_TIMEOUT_S", "GuardedRedis",
           "RedisConnection", "RedisUnavailable", "bounded", "connect", "connect_guarded",
           "stall_allowance_s"]

#: socket timeouts of the client (seconds): a hung Redis fails fast instead of blocking
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
#: most connections of the shared pool
MAX_CONNECTIONS = 64


def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``; decoded responses): one quick
    retry (a pooled connection broken by a Redis restart), then the error. Connects on
    first use. The pool holds at most ``max_connections``; a call that finds them all busy
    waits for one (up to the socket timeout) instead of failing, so a burst of requests
    (e.g. many stream subscriptions at once) never looks like a Redis outage."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=SOCKET_TIMEOUT_S,
        decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
    return aioredis.Redis(connection_pool=pool)


class RedisUnavailable(MarketflowError, RedisError):
    """A request-path Redis call failed fast: the circuit is open, or Redis gave no answer
    within ``redis.request_timeout_s``. A :class:`RedisError`, so every fallback that
    handles Redis errors handles it."""


def stall_allowance_s(timeout_s: float) -> float:
    """How much later than due a request deadline may fire before the event loop counts
    as stalled (see :func:`bounded`): a fifth of the bound, at least 10 ms."""
    return max(0.01, timeout_s / 5)


async def bounded(call: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
    """``await call``, bounded by ``timeout_s`` of Redis's time, not of the event loop's.

    A deadline that fires late means the loop was busy (a large replay batch, a GC pause)
    rather than Redis slow: the answer may have arrived meanwhile, its read only queued
    behind the deadline. Then the call gets one more ``timeout_s`` before it counts as
    hung, so a stalled loop does not trip the breaker; a Redis that truly hangs still
    fails after ``timeout_s`` (after ``2 x timeout_s`` plus the stall when the loop
    stalled too).

    Raises:
        TimeoutError: no answer in time (the call is cancelled).
        Exception: whatever the call raises.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(call)
    try:
        t0 = loop.time()
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
        if not done and loop.time() - t0 - timeout_s > stall_allowance_s(timeout_s):
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        if not done:
            raise TimeoutError(f"no answer within {timeout_s * 1000:.0f} ms")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


async def _guarded(breaker: CircuitBreaker, timeout_s: float,
                   call: Coroutine[Any, Any, Any]) -> Any:
    try:
        breaker.check()
    except CircuitOpen as exc:
        call.close()  # never awaited
        raise RedisUnavailable(str(exc)) from None
    try:
        result = await bounded(call, timeout_s)
    except TimeoutError as exc:
        breaker.trip(exc)  # a hang: the next requests must not wait for it too
        raise RedisUnavailable(f"redis: no answer within {timeout_s * 1000:.0f} ms") from exc
    except (RedisError, OSError) as exc:
        breaker.failure(exc)
        raise
    breaker.success()
    return result


class GuardedPipeline(Pipeline):
    """A :class:`Pipeline` whose ``execute`` is bounded and counted like a command."""

    breaker: CircuitBreaker
    timeout_s: float

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the queued commands (see :class:`GuardedRedis`)."""
        return list(await _guarded(self.breaker, self.timeout_s,
                                   super().execute(raise_on_error)))


class GuardedRedis(aioredis.Redis):
    """The request path's client: each command and pipeline is refused at once while
    ``breaker`` is open, and fails with :class:`RedisUnavailable` after ``timeout_s``.

    Raises:
        RedisUnavailable: circuit open, or no answer in time (also trips the breaker).
        redis.exceptions.RedisError, OSError: Redis answered with an error or refused the
            connection (counted by the breaker).
    """

    breaker: CircuitBreaker
    timeout_s: float

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """One command, guarded."""
        return await _guarded(self.breaker, self.timeout_s,
                              super().execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None
                 ) -> GuardedPipeline:
        """A guarded pipeline on the same pool."""
        pipe = GuardedPipeline(self.connection_pool, self.response_callbacks, transaction,
                               shard_hint)
        pipe.breaker, pipe.timeout_s = self.breaker, self.timeout_s
        return pipe

    async def probe(self) -> None:
        """PING past the breaker (the breaker's probe)."""
        await super().execute_command("PING")


def connect_guarded(url: str, breaker: CircuitBreaker, timeout_s: float,
                    max_connections: int = MAX_CONNECTIONS) -> GuardedRedis:
    """The request path's client for ``url``: each call bounded by ``timeout_s``
    (:func:`bounded`), no retry (a failed call falls back at once), guarded by
    ``breaker``. The socket, connect and pool-wait timeouts are only a backstop, above
    the stall allowance of :func:`bounded` (they would count a stalled loop as a slow
    Redis)."""
    backstop_s = 3 * timeout_s
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=backstop_s, decode_responses=True,
        socket_timeout=backstop_s, socket_connect_timeout=backstop_s,
        retry=Retry(NoBackoff(), 0))
    client = GuardedRedis(connection_pool=pool)
    client.breaker, client.timeout_s = breaker, timeout_s
    return client


class RedisConnection(Service):
    """Owns the shared client and the request path's guarded client; probes Redis while
    the request breaker is open; closes both pools when the service stops (after the
    services that depend on it: see :func:`app.factory.create_app`).

    Args:
        url: Redis URL.
        request_timeout_s: bound of each request-path command (``redis.request_timeout_s``).

    Attributes:
        client: the shared ``redis.asyncio.Redis`` (background writers).
        breaker: the request path's breaker (``/health``: ``breakers.redis``).
        request_client: the request path's :class:`GuardedRedis`.
    """

    def __init__(self, url: str, request_timeout_s: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = connect(url)
        self.breaker = CircuitBreaker("redis")
        self.request_client = connect_guarded(url, self.breaker, request_timeout_s)
        self.request_timeout_s = request_timeout_s

    @Service.task
    async def _probe(self) -> None:
        await self.breaker.probe_loop(self.request_client.probe,
                                      max(self.request_timeout_s, 0.5), (RedisError,),
                                      lambda: self.should_stop)

    async def on_stop(self) -> None:
        """Close the connection pools."""
        await self.request_client.aclose(close_connection_pool=True)
        await self.client.aclose(close_connection_pool=True)
