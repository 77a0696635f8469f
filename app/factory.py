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

import ipaddress
import logging
from functools import partial
from typing import Any

from agents.bars import BarAggregation
from agents.on_demand import register_on_demand_agent
from agents.retention import register_retention
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
from stores.keys import stream_subs_key
from stores.latest import LatestPriceStore
from stores.live_bars import LiveBarStore
from stores.ohlcv_cache import OhlcvCache
from stores.rate_limit import SharedRateLimiter, StreamSlots
from stores.stats import SecondStatsStore
from stores.stream_channel import StreamChannel
from tables.bars import declare_window_table, open_bars
from views import register_views
from views.auth import AccessGuard
from views.context import ViewContext
from views.http_metrics import http_metrics
from views.https_redirect import HttpsRedirect
from views.security_headers import security_headers
from views.stream_hub import StreamHub

__all__ = ["create_app"]

log = logging.getLogger(__name__)



def _is_loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def create_app(settings: Settings) -> MarketflowApp:
    """Build and wire the worker for ``settings``; starts nothing (the ``faust`` command
    starts the app and with it every service registered here).

    Returns:
        MarketflowApp: the app, with every topic, table, agent, timer, view, service and CLI
        command registered.
    """
    use_event_loop(settings.app.event_loop)
    # every HTTP response gets the security headers (views/security_headers.py, outermost);
    # every request is counted and timed (views/http_metrics.py)
    app = MarketflowApp(settings, web_application_options={
        "middlewares": [security_headers, http_metrics]})
    topics = declare_topics(app, settings)
    table = declare_window_table(app, settings.topics.partitions)

    r, w = settings.redis, settings.web
    d = settings.database
    database = Database(d.dsn.get_secret_value(), pool_max=d.pool_max, migrate=d.migrate_on_start,
                        request_timeout_s=d.request_timeout_s,
                        request_pool_max=d.request_pool_max)
    connection = RedisConnection(r.url.get_secret_value(), r.request_timeout_s)
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

    # ingest (feeds -> ticks topic), leader only; see feeds/live/manager.py. Records sent
    # outside message handling use the plain producer: with exactly_once, ``topic.send``
    # joins a partition's open transaction, which Faust commits only with newly acked
    # offsets (docs/broker.md#processing-guarantees), so they could wait there for ever.
    async def send_tick(key: bytes | None, value: bytes) -> Any:
        return await app.producer.send(settings.topics.ticks, key, value, None, None, None)

    async def send_dead(key: bytes | None, value: bytes) -> Any:
        return await app.producer.send(settings.topics.dead_letter, key, value, None, None,
                                       None)

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
        return await app.producer.send(settings.topics.history_requests, key, value,
                                       None, None, None)

    async def send_page(topic: str, value: bytes) -> Any:
        return await app.producer.send_and_wait(topic, None, value, 0, None, None)

    on_demand = OnDemandHistory(settings, redis, send_request, send_page)
    history_writer = HistoryWriter(settings, database, on_demand, ohlcv_cache.invalidate)

    BarAggregation(app, settings, topics, table, redis_writes).register()
    register_sink(app, settings, topics, database, ohlcv_cache)
    register_retention(app, settings.retention, database, ohlcv_cache)  # leader timer
    register_on_demand_agent(app, topics.history_requests, on_demand)
    app.service(history_writer)  # type: ignore[arg-type]

    # the request path reads Redis through the guarded client (timeouts, circuit breaker;
    # stores/connection.py): the same stores, on that client
    rq = connection.request_client
    a = settings.auth
    shared_limit = (SharedRateLimiter(rq, r.key_prefix, a.rate_limit_per_s, a.rate_limit_burst,
                                      a.global_rate_limit_per_s, a.global_rate_limit_burst)
                    if a.rate_limit_shared else None)
    if settings.stream.max_connections_per_client > 0:  # counted in Redis across workers
        stream_hub.slots = StreamSlots(rq, r.key_prefix,
                                       settings.stream.max_connections_per_client)
    if settings.stream.max_subscriptions_per_client > 0:
        stream_hub.sub_slots = StreamSlots(rq, r.key_prefix,
                                           settings.stream.max_subscriptions_per_client,
                                           key=stream_subs_key)
    register_views(app, ViewContext(
        settings=settings, database=database, redis=rq,
        latest=LatestPriceStore(rq, r.key_prefix, r.latest_ttl_s),
        stats=SecondStatsStore(rq, r.key_prefix), live_bars=LiveBarStore(rq, r.key_prefix),
        redis_writes=redis_writes,
        ohlcv_cache=OhlcvCache(rq, r.key_prefix, w.ohlcv_cache_ttl_s, w.ohlcv_cache_max_bytes),
        on_demand=on_demand, access_guard=AccessGuard(settings.auth, shared=shared_limit),
        stream_hub=stream_hub, breakers=[connection.breaker, database.breaker],
        local_live=partial(open_bars, table)))
    register_commands(app, settings)
    if settings.web.https_redirect_port is not None:
        app.service(HttpsRedirect(settings.web))  # type: ignore[arg-type]

    @app.task
    async def warn_if_exposed() -> None:  # at worker start (docs/security.md)
        host = settings.web.host
        if not settings.auth.enabled and not _is_loopback(host):
            log.warning("web server bound to %s with auth off: anyone who can reach it may "
                        "read the data, switch the mode and drive replays; set "
                        "auth.enabled (docs/security.md)", host)

    return app
