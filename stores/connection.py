"""The worker's one Redis connection (a pool), shared by every store.

Socket timeouts are short, so a hung Redis fails a call fast instead of blocking it: the
write buffer (:mod:`stores.buffer`) has its own backoff, and the views fall back to
TimescaleDB.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from mode import Service
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["CONNECT_TIMEOUT_S", "SOCKET_TIMEOUT_S", "RedisConnection", "connect"]

#: socket timeouts of the client (seconds): a hung Redis fails fast instead of blocking
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0


def connect(url: str) -> aioredis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``; decoded responses): one quick
    retry (a pooled connection broken by a Redis restart), then the error. Connects on
    first use."""
    return aioredis.Redis.from_url(
        url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1))


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
        await self.client.aclose()
