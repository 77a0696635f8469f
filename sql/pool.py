"""TimescaleDB connection pool as a Faust/mode service (paired start/stop)."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from mode import Service

from sql.migrate import apply_migrations

__all__ = ["Database"]

log = logging.getLogger(__name__)


class Database(Service):
    """asyncpg pool, created lazily so the worker starts even while the DB is down.

    Args:
        dsn: ``postgresql://`` URL.
        pool_max: pool size.
        migrate: apply ``sql/migrations`` on first connect.
    """

    def __init__(self, dsn: str, pool_max: int = 4, migrate: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.dsn = dsn
        self.pool_max = pool_max
        self.migrate = migrate
        self._pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        """The pool, connecting (and migrating) on first use.

        Raises:
            OSError / asyncpg.PostgresError: the database is unreachable or migration failed.
        """
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_max, command_timeout=30
            )
            if self.migrate:
                try:
                    async with pool.acquire() as conn:
                        await apply_migrations(conn)
                except BaseException:
                    await pool.close()
                    raise
            self._pool = pool
        return self._pool

    async def on_start(self) -> None:
        """Connect and migrate now if the database is up; otherwise retry on first use."""
        try:
            await self.pool()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("database not reachable at start (%s); will retry on first use", exc)

    async def on_stop(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
