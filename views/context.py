"""What the HTTP views depend on, built once by :func:`app.factory.create_app` and handed to
:func:`views.register_views` (no view reaches for a module global)."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from core.breaker import CircuitBreaker
from core.config import Settings
from feeds.history.on_demand import OnDemandHistory
from query.series import LocalLive
from sql.pool import Database
from stores.buffer import RedisWriteBuffer
from stores.latest import LatestPriceStore
from stores.live_bars import LiveBarStore
from stores.ohlcv_cache import OhlcvCache
from stores.stats import SecondStatsStore
from views.auth import AccessGuard
from views.stream_hub import StreamHub

__all__ = ["ViewContext"]


@dataclass(frozen=True)
class ViewContext:
    """The views' dependencies.

    Attributes:
        settings: the worker's settings.
        database: the TimescaleDB pools (``async with database.request() as conn``: bounded,
            behind the database circuit breaker).
        redis: the worker's shared Redis connection (mode, ingest status, replay state, gap
            status; key formats in :mod:`stores.keys`).
        latest: latest prices in Redis.
        stats: per-second statistics in Redis.
        live_bars: live 1-minute bars in Redis.
        redis_writes: the write buffer in front of those stores (its ``status()``).
        ohlcv_cache: the sealed-range ``/ohlcv`` cache.
        on_demand: on-demand history requests (``ask``, ``wait_for_request``, ``status``).
        access_guard: bearer-token checks and the rate limit.
        stream_hub: the WebSocket stream's hub (``/stream``).
        breakers: the request path's circuit breakers (Redis, database) for ``/health``.
        local_live: this worker's open minutes from its window state
            (:data:`query.series.LocalLive`), for series built while Redis is down.
    """

    settings: Settings
    database: Database
    redis: Redis
    latest: LatestPriceStore
    stats: SecondStatsStore
    live_bars: LiveBarStore
    redis_writes: RedisWriteBuffer
    ohlcv_cache: OhlcvCache
    on_demand: OnDemandHistory
    access_guard: AccessGuard
    stream_hub: StreamHub
    breakers: list[CircuitBreaker] = field(default_factory=list)
    local_live: LocalLive | None = None
