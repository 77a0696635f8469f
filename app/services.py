"""The worker's long-lived clients, started and stopped with the Faust app."""

from __future__ import annotations

from typing import Any

from app import settings
from app.faust_app import app
from app.topics import dead_letter_topic, ticks_topic
from feeds.history.gaps import GapService
from feeds.live.manager import IngestManager, TickPublisher
from sql.pool import Database
from stores.latest import LatestPrices
from stores.ohlcv_cache import OhlcvCache

__all__ = ["database", "gaps", "ingest", "latest_prices", "ohlcv_cache", "publisher"]

database = Database(
    settings.database.dsn,
    pool_max=settings.database.pool_max,
    migrate=settings.database.migrate_on_start,
)
latest_prices = LatestPrices(
    settings.redis.url, settings.redis.key_prefix, settings.redis.latest_ttl_s
)

ohlcv_cache = OhlcvCache(
    settings.redis.url, settings.redis.key_prefix, settings.web.ohlcv_cache_ttl_s,
    settings.web.ohlcv_cache_max_bytes,
)

# `database` is started and stopped by agents.sink.BarSinkService (flush before close).
app.service(latest_prices)  # type: ignore[arg-type]
app.service(ohlcv_cache)  # type: ignore[arg-type]


# ---- ingest (feeds -> ticks topic), leader only; see feeds/live/manager.py


async def _send_tick(key: bytes | None, value: bytes) -> Any:
    return await ticks_topic.send(key=key, value=value)


async def _send_dead(key: bytes | None, value: bytes) -> Any:
    return await dead_letter_topic.send(key=key, value=value)


publisher = TickPublisher(_send_tick, _send_dead, settings.feeds.max_buffered_ticks,
                          settings.feeds.publish_interval_ms)
ingest = IngestManager(settings, publisher, latest_prices.client, app.is_leader)
app.service(ingest)  # type: ignore[arg-type]
gaps = GapService(settings, database, ingest, app.is_leader, latest_prices.client,
                  ohlcv_cache.invalidate)  # feeds/history/gaps.py: outages, scan, repair
app.service(gaps)  # type: ignore[arg-type]


@app.before_stop
async def stop_ingest() -> None:
    """Stop the feeds and send what they produced while the producer is still up."""
    await ingest.stop()
