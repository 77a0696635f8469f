"""The worker's long-lived clients, started and stopped with the Faust app."""

from __future__ import annotations

from app import settings
from app.db import Database
from app.faust_app import app
from app.latest import LatestPrices

__all__ = ["database", "latest_prices"]

database = Database(
    settings.database.dsn,
    pool_max=settings.database.pool_max,
    migrate=settings.database.migrate_on_start,
)
latest_prices = LatestPrices(
    settings.redis.url, settings.redis.key_prefix, settings.redis.latest_ttl_s
)

app.service(database)  # type: ignore[arg-type]  # instances are accepted too
app.service(latest_prices)  # type: ignore[arg-type]
