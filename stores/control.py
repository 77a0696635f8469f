"""Runtime ingest mode (``live`` / ``test`` / ``off``), shared by all workers through Redis.

Keys (``<p>`` = ``redis.key_prefix``):

* ``<p>:mode`` — the requested mode (string). Absent: ``feeds.mode`` from the settings.
* ``<p>:ingest`` — JSON status written every ~0.5 s by the one worker that ingests (the
  consumer-group leader), TTL 5 s: ``{"worker", "mode", "updated_ms", "feeds": {...}}``.

Every worker's HTTP API can switch the mode (``POST /mode/{mode}``); the leader's
:class:`feeds.live.manager.IngestManager` polls the key and starts/stops its feeds, so exactly one
ingest runs cluster-wide.

Redis outages: reads raise (callers keep their current mode and retry); the status is
simply rewritten on the next tick once Redis is back. The requested mode is remembered per
process: when Redis comes back *without* the key (a restart without persistence), the mode
last seen is written back (``SET NX``) instead of silently falling back to ``feeds.mode``.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from stores.keys import ingest_status_key, mode_key

__all__ = ["MODES", "get_mode", "read_ingest_status",
           "set_mode", "write_ingest_status"]

MODES = ("live", "test", "off")
STATUS_TTL_MS = 5_000

#: prefix -> mode last read or set by this process (restored after a Redis data loss)
_last_mode: dict[str, str] = {}






async def get_mode(client: aioredis.Redis, prefix: str, default: str) -> str:
    """The requested mode (``default`` when never set).

    Raises:
        redis.exceptions.RedisError: Redis unreachable.
    """
    v = await client.get(mode_key(prefix))
    if v in MODES:
        _last_mode[prefix] = v
        return str(v)
    known = _last_mode.get(prefix)
    if v is None and known is not None:  # the key vanished: Redis lost its data
        await client.set(mode_key(prefix), known, nx=True)
        return known
    return default


async def set_mode(client: aioredis.Redis, prefix: str, mode: str, default: str) -> str:
    """Atomically set the mode; returns the previous one (``default`` when never set).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
        redis.exceptions.RedisError: Redis unreachable.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    old = await client.set(mode_key(prefix), mode, get=True)
    _last_mode[prefix] = mode
    return old if old in MODES else default


async def write_ingest_status(client: aioredis.Redis, prefix: str, status: dict[str, Any]
                              ) -> None:
    """Publish the ingesting worker's status (expires unless refreshed)."""
    await client.set(ingest_status_key(prefix), orjson.dumps(status), px=STATUS_TTL_MS)


async def read_ingest_status(client: aioredis.Redis, prefix: str) -> dict[str, Any] | None:
    """The ingesting worker's status, or None when no worker ingests."""
    raw = await client.get(ingest_status_key(prefix))
    return orjson.loads(raw) if raw else None
