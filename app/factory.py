"""The composition root: :func:`create_app` builds the Faust app, the clients and the
services, and wires every agent, table, timer, view and command to them.

Nothing else in the project builds a client or registers on an app: the modules below
``app/`` export classes and ``register_*`` functions that receive their dependencies
(see ``docs/architecture.md`` for the package map).

Lifetimes follow Faust's service tree (``app.service``; the app stops its services in
reverse order, and a service stops its dependencies after itself): the shared Redis
connection is registered first, so it closes last; the Redis write buffer, ingest, gap
repair and the history writer are services of the app; the TimescaleDB pool is a dependency
of the bar writer, so it closes only after the last flush. Shutdown hooks
(:meth:`app.faust_app.MarketflowApp.before_stop`) run first, in this order: stop ingest,
close the read-back consumer, flush the bar batch.
"""

from __future__ import annotations

from typing import Any

from agents.bars import BarAggregation
from agents.on_demand import register_on_demand_agent
from agents.sink import register_sink
from app.commands import register_commands
from app.faust_app import MarketflowApp, use_event_loop
from core.config import Settings
from core.topics import declare_topics
from feeds.history.gaps import GapService
from feeds.history.on_demand import HistoryWriter, OnDemandHistory
from feeds.live.manager import IngestManager
from feeds.live.publisher import TickPublisher
from sql.pool import Database
from stores.buffer import RedisWriteBuffer
from stores.connection import RedisConnection
from stores.latest import LatestPriceStore
from stores.live_bars import LiveBarStore
from stores.ohlcv_cache import OhlcvCache
from stores.stats import SecondStatsStore
from stores.stream_channel import StreamChannel
from tables.bars import declare_window_table
from views import register_views
from views.auth import AccessGuard
from views.context import ViewContext
from views.stream_hub import StreamHub

__all__ = ["create_app"]


def create_app(settings: Settings) -> MarketflowApp:
    """Build and wire the worker for ``settings``; starts nothing (the ``faust`` command
    starts the app and with it every service registered here).

    Returns:
        MarketflowApp: the app, with every topic, table, agent, timer, view, service and CLI
        command registered.
    """
    use_event_loop(settings.app.event_loop)
    app = MarketflowApp(settings)
    topics = declare_topics(app, settings)
    table = declare_window_table(app, settings.topics.partitions)

    r, w = settings.redis, settings.web
    database = Database(settings.database.dsn, pool_max=settings.database.pool_max,
                        migrate=settings.database.migrate_on_start)
    connection = RedisConnection(r.url)
    app.service(connection)  # type: ignore[arg-type]
    redis = connection.client  # one connection, a store per role (stores/keys.py)
    latest = LatestPriceStore(redis, r.key_prefix, r.latest_ttl_s)
    stats = SecondStatsStore(redis, r.key_prefix)
    live_bars = LiveBarStore(redis, r.key_prefix)
    ohlcv_cache = OhlcvCache(redis, r.key_prefix, w.ohlcv_cache_ttl_s, w.ohlcv_cache_max_bytes)
    redis_writes = RedisWriteBuffer(redis, latest, stats, live_bars,
                                    channel=StreamChannel(r.key_prefix))
    app.service(redis_writes)  # type: ignore[arg-type]
    stream_hub = StreamHub(settings, redis, database, latest, live_bars)
    app.service(stream_hub)  # type: ignore[arg-type]

    # ingest (feeds -> ticks topic), leader only; see feeds/live/manager.py
    async def send_tick(key: bytes | None, value: bytes) -> Any:
        return await topics.ticks.send(key=key, value=value)

    async def send_dead(key: bytes | None, value: bytes) -> Any:
        return await topics.dead_letter.send(key=key, value=value)

    publisher = TickPublisher(send_tick, send_dead, settings.feeds.max_buffered_ticks,
                              settings.feeds.publish_interval_ms)
    ingest = IngestManager(settings, publisher, redis, app.is_leader)
    gaps = GapService(settings, database, app.is_leader, redis, ohlcv_cache.invalidate)
    ingest.on_feed_state = gaps.on_feed_state  # outages are recorded from feed transitions
    app.service(ingest)  # type: ignore[arg-type]
    app.service(gaps)  # type: ignore[arg-type]
    app.before_stop(ingest.stop)  # the feeds' last ticks go out while the producer is up

    # on-demand history: requests topic -> coordinator -> dynamic topics -> writer
    async def send_request(key: bytes, value: bytes) -> Any:
        return await topics.history_requests.send(key=key, value=value)

    async def send_page(topic: str, value: bytes) -> Any:
        return await app.producer.send_and_wait(topic, None, value, 0, None, None)

    on_demand = OnDemandHistory(settings, redis, send_request, send_page)
    history_writer = HistoryWriter(settings, database, on_demand, ohlcv_cache.invalidate)

    BarAggregation(app, settings, topics, table, redis_writes).register()
    register_sink(app, settings, topics, database, ohlcv_cache)
    register_on_demand_agent(app, topics.history_requests, on_demand)
    app.service(history_writer)  # type: ignore[arg-type]

    register_views(app, ViewContext(
        settings=settings, database=database, redis=redis, latest=latest, stats=stats,
        live_bars=live_bars, redis_writes=redis_writes, ohlcv_cache=ohlcv_cache,
        on_demand=on_demand, access_guard=AccessGuard(settings.auth),
        stream_hub=stream_hub))
    register_commands(app, settings)
    return app
