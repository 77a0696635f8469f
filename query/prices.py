"""Latest prices and price statistics over a period, from Redis with TimescaleDB as the
fallback.

* :meth:`PriceQueries.latest`: the newest trade from Redis; while Redis is unreachable the
  close of the newest stored 1-minute bar (``source`` ``database``, degraded), stale by up
  to about a minute plus ``window.grace_ms`` plus the sink's flush interval.
* :meth:`PriceQueries.period_stats`: highest / lowest / average tick price over a period
  (bounds and granularity in :mod:`query.price_stats`): per-second aggregates in Redis for
  the last :data:`query.price_stats.RECENT_S` seconds, 1-minute bars before that. Replayed
  data follows the replay's simulated clock. While Redis is unreachable every period is
  computed from the stored 1-minute bars alone (``granularity`` ``minute``, degraded), on
  the wall clock; the newest minute or so (open bar, grace, sink flush) is missing then.

Every Redis read failure answered from TimescaleDB is counted
(``marketflow_redis_fallbacks_total{view}``) and logged at debug level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.errors import StorageUnavailable
from core.metrics import REDIS_FALLBACKS
from core.timeutil import MINUTE_MS
from query.price_stats import RECENT_S, SecondAgg, seconds_in_period, stats
from sql.bars_1m import latest_close, price_stats, symbol_known
from sql.pool import Database
from stores.latest import LatestPriceStore
from stores.replay_control import active_clock_ms
from stores.stats import SecondStatsStore

__all__ = ["LatestPrice", "PeriodStats", "PriceQueries"]

log = logging.getLogger(__name__)

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
_MINUTE_S = MINUTE_MS // 1000


@dataclass(frozen=True)
class LatestPrice:
    """The newest known trade price of a symbol.

    Attributes:
        exchange: exchange of that trade.
        price: quote currency per base unit.
        ts_ms: trade event time, UTC epoch ms (from the database: the bar's last trade).
        source: ``redis`` or ``database`` (the fallback).
        degraded: answered from the fallback source.
    """

    exchange: str
    price: float
    ts_ms: int
    source: str
    degraded: bool


@dataclass(frozen=True)
class PeriodStats:
    """Highest, lowest and average tick price over a period.

    Attributes:
        known: whether the symbol (on that exchange) ever traded; the other price fields
            are None and ``count`` 0 when it did not, or not in the period.
        first_s: first second covered, Unix seconds.
        last_s: last second covered (inclusive), Unix seconds.
        highest: highest tick price, None without ticks.
        lowest: lowest tick price, None without ticks.
        average: mean tick price, None without ticks.
        count: ticks in the period.
        granularity: ``second`` (exact to the second) or ``minute`` (exact to the minute
            at the start).
        degraded: computed from the stored 1-minute bars only (Redis unreachable).
    """

    known: bool
    first_s: int
    last_s: int
    highest: float | None
    lowest: float | None
    average: float | None
    count: int
    granularity: str
    degraded: bool


def _redis_fallback(view: str, exc: BaseException) -> None:
    """Count and log (debug: one per request) a Redis read failure answered from
    TimescaleDB."""
    REDIS_FALLBACKS.labels(view).inc()
    log.debug("redis unavailable for /prices/%s (%s: %s); answering from TimescaleDB",
              view, type(exc).__name__, exc)


def _period_stats(aggs: list[SecondAgg] | None, first_s: int, last_s: int, granularity: str,
                  degraded: bool) -> PeriodStats:
    result = stats(aggs or [])
    if result is None:
        return PeriodStats(aggs is not None, first_s, last_s, None, None, None, 0,
                           granularity, degraded)
    high, low, avg, count = result
    return PeriodStats(True, first_s, last_s, high, low, avg, count, granularity, degraded)


class PriceQueries:
    """Latest prices and period statistics (see the module docstring).

    Args:
        database: the TimescaleDB pool service.
        latest: the Redis store of latest prices.
        stats: the Redis store of per-second aggregates.
        redis: the worker's Redis connection (the replay state).
        key_prefix: ``redis.key_prefix``.
    """

    def __init__(self, database: Database, latest: LatestPriceStore, stats: SecondStatsStore,
                 redis: Redis, key_prefix: str) -> None:
        self.database = database
        self.latest_store = latest
        self.stats = stats
        self.redis = redis
        self.key_prefix = key_prefix

    async def latest(self, symbol: str, exchange: str | None) -> LatestPrice | None:
        """The newest trade price of ``symbol`` (on ``exchange``, or any).

        Returns:
            LatestPrice | None: None when no price is known.

        Raises:
            StorageUnavailable: Redis and the database are unreachable.
        """
        try:
            found = await self.latest_store.get(symbol, exchange)
            source, degraded = "redis", False
        except (RedisError, OSError) as exc:
            _redis_fallback("latest", exc)
            try:
                async with self.database.request() as conn:
                    found = await latest_close(conn, symbol, exchange)
            except _DB_ERRORS as db_exc:
                raise StorageUnavailable(
                    f"redis and database unavailable: {type(exc).__name__}, "
                    f"{type(db_exc).__name__}") from db_exc
            source, degraded = "database", True
        if found is None:
            return None
        return LatestPrice(found["exchange"], found["price"], found["ts_ms"], source, degraded)

    async def period_stats(self, symbol: str, exchange: str | None, period_s: int,
                           now_ms: int, *, replayed: bool = False) -> PeriodStats:
        """Highest, lowest and average tick price of ``symbol`` over the last
        ``period_s`` seconds.

        Args:
            symbol: the symbol.
            exchange: one exchange, None for all.
            period_s: period length, seconds (1 .. :data:`query.price_stats.MAX_PERIOD_S`).
            now_ms: wall clock, UTC epoch ms.
            replayed: ``exchange`` is replayed data (a namespaced exchange,
                :func:`tables.aggregator.clock_of`): the period ends at the replay's
                simulated clock while a replay of that namespace runs.

        Returns:
            PeriodStats: the statistics (from the stored bars alone while Redis is
            unreachable).

        Raises:
            StorageUnavailable: the database is unreachable (or Redis failed with an
                ``OSError``).
        """
        granularity = "second"
        try:
            clock_ms = now_ms
            if replayed:
                replay_ms = await active_clock_ms(self.redis, self.key_prefix, exchange)
                clock_ms = now_ms if replay_ms is None else replay_ms
            first_s, last_s = seconds_in_period(clock_ms, period_s)
            if period_s <= RECENT_S:
                aggs = await self.stats.seconds(symbol, exchange, first_s, last_s)
            else:
                granularity = "minute"
                cut_s = last_s - RECENT_S
                cut_s -= cut_s % _MINUTE_S
                first_s -= first_s % _MINUTE_S
                aggs = await self.stats.seconds(symbol, exchange, cut_s, last_s)
                try:
                    async with self.database.request() as conn:
                        stored = await price_stats(conn, symbol, exchange, first_s * 1000,
                                                   cut_s * 1000)
                        if aggs is None and stored is None and not await symbol_known(
                                conn, symbol, exchange):
                            aggs = None
                        else:
                            aggs = (aggs or []) + ([stored] if stored else [])
                except _DB_ERRORS as exc:
                    raise StorageUnavailable(
                        f"database unavailable: {type(exc).__name__}") from exc
        except RedisError as exc:
            _redis_fallback("stats", exc)
            return await self._stats_from_database(symbol, exchange, period_s, now_ms)
        except _DB_ERRORS as exc:
            raise StorageUnavailable(f"storage unavailable: {type(exc).__name__}") from exc
        return _period_stats(aggs, first_s, last_s, granularity, degraded=False)

    async def _stats_from_database(self, symbol: str, exchange: str | None, period_s: int,
                                   now_ms: int) -> PeriodStats:
        """The statistics from the stored 1-minute bars only (Redis down): the bars
        starting in ``[period start aligned down to the minute, now]``, on the wall clock.

        Raises:
            StorageUnavailable: the database is unreachable too.
        """
        first_s, last_s = seconds_in_period(now_ms, period_s)
        first_s -= first_s % _MINUTE_S
        try:
            async with self.database.request() as conn:
                stored = await price_stats(conn, symbol, exchange, first_s * 1000,
                                           (last_s + 1) * 1000)
                known = stored is not None or await symbol_known(conn, symbol, exchange)
        except _DB_ERRORS as exc:
            raise StorageUnavailable(
                f"redis and database unavailable: {type(exc).__name__}") from exc
        aggs = ([stored] if stored else []) if known else None
        return _period_stats(aggs, first_s, last_s, "minute", degraded=True)
