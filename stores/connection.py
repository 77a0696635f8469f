"""The worker's one Redis connection (a pool), shared by every store.

Socket timeouts are short, so a hung Redis fails a call fast instead of blocking it: the
write buffer (:mod:`stores.buffer`) has its own backoff, and the views fall back to
TimescaleDB.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from mode import Service
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["CONNECT_TIMEOUT_S", "MAX_CONNECTIONS", "SOCKET_TIMEOUT_S", "RedisConnection",
           "connect"]

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


class RedisConnection(Service):
    """Owns the shared client; closes its pool when the service stops (after the services
    that depend on it: see :func:`app.factory.create_app`).

    Args:
        url: Redis URL.

    Attributes:
        client: the shared ``redis.asyncio.Redis``.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = connect(url)

    async def on_stop(self) -> None:
        """Close the connection pool."""
        await self.client.aclose(close_connection_pool=True)
