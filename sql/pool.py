"""TimescaleDB connection pools as a Faust/mode service (paired start/stop).

Two pools: :meth:`Database.pool` for the sink and the background jobs (long statement
timeout), and :meth:`Database.request` for the request path. The request path's work is
bounded by ``database.request_timeout_s`` (getting a connection, and each query) and
goes through a :class:`core.breaker.CircuitBreaker`: once the database refused
connections three times in a row, or once did not answer in time, requests get
:class:`DatabaseUnavailable` at once (the views answer 503) until a probe connects again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from mode import Service

from core.breaker import CircuitBreaker, CircuitOpen
from core.errors import MarketflowError
from sql.migrate import apply_migrations

__all__ = ["Database", "DatabaseUnavailable"]

log = logging.getLogger(__name__)

#: errors that say the database is unreachable (not that a statement was wrong)
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.CannotConnectNowError)


class DatabaseUnavailable(MarketflowError, OSError):
    """A request-path database call failed fast: the circuit is open, or the database gave
    no answer within ``database.request_timeout_s``. An :class:`OSError`, so every handler
    of an unreachable database handles it."""


class Database(Service):
    """asyncpg pools, created lazily so the worker starts even while the DB is down.

    Args:
        dsn: ``postgresql://`` URL.
        pool_max: size of the background pool.
        migrate: apply ``sql/migrations`` on first connect.
        request_timeout_s: bound of the request path's waits (``database.request_timeout_s``).
        request_pool_max: size of the request path's pool.

    Attributes:
        breaker: the request path's breaker (``/health``: ``breakers.database``).
    """

    def __init__(self, dsn: str, pool_max: int = 4, migrate: bool = True,
                 request_timeout_s: float = 1.0, request_pool_max: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.dsn = dsn
        self.pool_max = pool_max
        self.migrate = migrate
        self.request_timeout_s = request_timeout_s
        self.request_pool_max = request_pool_max
        self.breaker = CircuitBreaker("database")
        self._pool: asyncpg.Pool | None = None
        self._request_pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        """The background pool, connecting (and migrating) on first use.

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

    async def _requests_pool(self) -> asyncpg.Pool:
        if self._request_pool is None:
            await self.pool()  # migrated first
            t = self.request_timeout_s
            self._request_pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=self.request_pool_max, command_timeout=t,
                timeout=t)
        return self._request_pool

    @asynccontextmanager
    async def request(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the request pool for one request's queries (each query bounded
        by ``request_timeout_s``).

        Raises:
            DatabaseUnavailable: circuit open, or no connection / answer in time (the
                latter opens the circuit).
            OSError, asyncpg.PostgresError: the database refused or failed (connection
                errors count towards opening the circuit).
        """
        try:
            self.breaker.check()
        except CircuitOpen as exc:
            raise DatabaseUnavailable(str(exc)) from None
        t = self.request_timeout_s
        try:
            async with asyncio.timeout(t):
                pool = await self._requests_pool()
                conn = await pool.acquire()
        except TimeoutError as exc:
            self.breaker.trip(exc)
            raise DatabaseUnavailable(f"database: no connection within {t:g} s") from exc
        except _CONNECTION_ERRORS as exc:
            self.breaker.failure(exc)
            raise
        try:
            yield conn
        except TimeoutError as exc:  # a query ran past command_timeout
            self.breaker.trip(exc)
            # closed, not reset: a reset would wait for the query's cancellation, which
            # needs a new connection to the database that does not answer
            conn.terminate()
            raise DatabaseUnavailable(f"database: no answer within {t:g} s") from exc
        except _CONNECTION_ERRORS as exc:
            self.breaker.failure(exc)
            raise
        else:
            self.breaker.success()
        finally:
            try:
                await pool.release(conn, timeout=t)
            except (*_CONNECTION_ERRORS, TimeoutError) as exc:
                log.debug("database: request connection dropped (%s)", exc)
                conn.terminate()

    async def _probe(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=max(self.request_timeout_s, 1.0))
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close(timeout=1.0)

    @Service.task
    async def _probe_loop(self) -> None:
        await self.breaker.probe_loop(self._probe, max(self.request_timeout_s, 1.0),
                                      (asyncpg.PostgresError, asyncpg.InterfaceError),
                                      lambda: self.should_stop)

    async def on_start(self) -> None:
        """Connect and migrate now if the database is up; otherwise retry on first use."""
        try:
            await self.pool()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("database not reachable at start (%s); will retry on first use", exc)

    async def on_stop(self) -> None:
        """Close the pools."""
        for pool in (self._request_pool, self._pool):
            if pool is not None:
                await pool.close()
        self._pool = self._request_pool = None
