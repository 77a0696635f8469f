"""Retention: the leader worker deletes data older than the ``[retention]`` horizons
(:class:`core.config.RetentionSection`; ``docs/operations.md``, "Retention").

One run (:meth:`RetentionJob.run_once`), each step on its own and only when its horizon
is set:

* ``bars_1m`` (``bars_1m_days``): every chunk whose whole range ends at or before
  ``now - bars_1m_days`` is dropped, oldest first, one transaction per chunk
  (:func:`sql.bars_1m.chunks_before`, :func:`sql.bars_1m.drop_chunk`; ``drop_chunks`` of
  the Apache-2 edition, no TimescaleDB policy). Bars newer than the cutoff always stay.
  The symbols of the dropped chunks get their ``/ohlcv`` cache generation bumped
  (:meth:`stores.ohlcv_cache.OhlcvCache.invalidate`), so no cached sealed range serves a
  dropped bar; an invalidation Redis did not take is retried by the cache.
* ``gaps`` (``gaps_days``): gaps that ended at or before the cutoff, in any state but
  ``repairing`` (:func:`sql.gaps.delete_ended_before`).
* ``backfill_jobs`` (``backfill_jobs_days``): ``done`` and ``error`` jobs last updated
  before the cutoff; ``pending`` and ``fetching`` jobs stay
  (:func:`sql.backfill_jobs.delete_finished_before`).

Redis holds nothing that outlives a horizon (all horizons are at least a day), so no key
needs deleting: the per-minute keys (``<p>:sec:...``, ``<p>:bar:...``) expire at most
:data:`stores.stats.SECONDS_TTL_MS` / :data:`stores.live_bars.OPEN_BAR_TTL_MS` after their
last write, cached ``/ohlcv`` ranges after ``web.ohlcv_cache_ttl_s`` (at most a day, and
unreachable once invalidated); the per-symbol keys (latest prices, exchanges, cache
generations) are not data of a time range and keep their own lifetimes.

Schedule: a Faust timer with ``on_leader=True`` ticking every :func:`check_interval_s`; a
run is due on the first tick (so within a minute of becoming the leader), then
``interval_s`` after a successful run and one tick after a failed one. A failed step is
logged and counted (``marketflow_retention_runs_total{result="error"}``); it never stops
the worker or the other steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust

from core.config import RetentionSection
from core.metrics import RETENTION_CHUNKS, RETENTION_DELETED, RETENTION_RUNS
from core.timeutil import MINUTE_MS, now_ms
from sql import backfill_jobs as backfill_jobs_sql
from sql import bars_1m as bars_sql
from sql import gaps as gaps_sql
from sql.pool import Database
from stores.ohlcv_cache import OhlcvCache

__all__ = ["CHECK_MAX_S", "DAY_MS", "RetentionCutoffs", "RetentionJob", "RetentionReport",
           "check_interval_s", "register_retention", "retention_cutoffs"]

log = logging.getLogger(__name__)

#: one retention day, ms
DAY_MS = 24 * 60 * MINUTE_MS
#: longest time between two checks of the timer, seconds
CHECK_MAX_S = 60.0

#: what a failing database raises (a failed step: logged, counted, retried)
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

Invalidate = Callable[[Iterable[str]], Awaitable[None]]


@dataclass(frozen=True)
class RetentionCutoffs:
    """Cutoffs of one run, UTC epoch ms; None where the horizon is off.

    Attributes:
        bars_1m_ms: chunks of ``bars_1m`` ending at or before it are dropped.
        gaps_ms: gaps ending at or before it are deleted.
        backfill_jobs_ms: finished jobs updated before it are deleted.
    """

    bars_1m_ms: int | None
    gaps_ms: int | None
    backfill_jobs_ms: int | None


def retention_cutoffs(now: int, retention: RetentionSection) -> RetentionCutoffs:
    """The cutoffs at wall-clock time ``now`` (UTC epoch ms): ``now - days * DAY_MS`` per
    horizon that is set.

    Args:
        now: UTC epoch ms.
        retention: the horizons (days, None = off).

    Returns:
        RetentionCutoffs: one cutoff (UTC epoch ms) or None per table.
    """
    def cut(days: int | None) -> int | None:
        return None if days is None else now - days * DAY_MS

    return RetentionCutoffs(cut(retention.bars_1m_days), cut(retention.gaps_days),
                            cut(retention.backfill_jobs_days))


def check_interval_s(retention: RetentionSection) -> float:
    """Seconds between two ticks of the timer: ``min(interval_s, CHECK_MAX_S)``."""
    return min(retention.interval_s, CHECK_MAX_S)


@dataclass
class RetentionReport:
    """What one run did.

    Attributes:
        cutoffs: the run's cutoffs.
        chunks: ``bars_1m`` chunks dropped.
        deleted: table -> rows deleted (``bars_1m``: the rows of the dropped chunks, also
            those dropped before a failure), for the tables whose step ran.
        symbols: symbols whose bars were dropped (their ``/ohlcv`` cache is invalidated).
        errors: table (or ``database``) -> ``"<ExceptionType>: <message>"`` of the steps
            that failed.
    """

    cutoffs: RetentionCutoffs
    chunks: int = 0
    deleted: dict[str, int] = field(default_factory=dict)
    symbols: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every step succeeded."""
        return not self.errors

    def summary(self) -> str:
        """One human-readable line: per table what was deleted before which cutoff."""
        parts = []
        c = self.cutoffs
        for table, cutoff in (("bars_1m", c.bars_1m_ms), ("gaps", c.gaps_ms),
                              ("backfill_jobs", c.backfill_jobs_ms)):
            if cutoff is None:
                continue
            if table in self.errors:
                what = "failed"
            elif table == "bars_1m":
                what = (f"{self.chunks} chunk(s) dropped ({self.deleted.get(table, 0)} rows, "
                        f"{len(self.symbols)} symbol(s))")
            else:
                what = f"{self.deleted.get(table, 0)} row(s) deleted"
            parts.append(f"{table}: {what} before {_iso(cutoff)}")
        if "database" in self.errors:
            parts.append("database unavailable")
        return "; ".join(parts)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class RetentionJob:
    """Runs the cleanup (module docstring) when it is due.

    Args:
        retention: the horizons and the interval.
        database: the :class:`sql.pool.Database` service (its ``pool()``).
        invalidate: ``async (symbols) -> None``, the ``/ohlcv`` cache invalidation (it
            handles Redis errors itself).
        clock: monotonic clock, seconds (tests pass their own).

    Attributes:
        last_report: the report of the latest run, None before the first.
    """

    def __init__(self, retention: RetentionSection, database: Any, invalidate: Invalidate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retention = retention
        self.database = database
        self.invalidate = invalidate
        self.clock = clock
        self.last_report: RetentionReport | None = None
        self._next_s: float | None = None  # None: due now

    async def tick(self) -> RetentionReport | None:
        """Run when due (the timer's body, on the leader only).

        Returns:
            The run's report, None when no run was due.
        """
        if self._next_s is not None and self.clock() < self._next_s:
            return None
        report = await self.run_once(now_ms())
        self._next_s = self.clock() + (self.retention.interval_s if report.ok
                                       else check_interval_s(self.retention))
        return report

    async def run_once(self, now: int) -> RetentionReport:
        """One cleanup run at wall-clock time ``now`` (UTC epoch ms): every step whose
        horizon is set, each on its own. Logs one info line (what was deleted, the
        cutoffs) and a warning per failed step; counts the run, the rows and the chunks.

        Returns:
            RetentionReport: what was deleted and which steps failed. Database errors are
            reported there, never raised.
        """
        report = RetentionReport(retention_cutoffs(now, self.retention))
        try:
            pool = await self.database.pool()
        except _DB_ERRORS as exc:
            report.errors["database"] = _err(exc)
            log.warning("retention: database unavailable (retrying): %s", exc)
        else:
            await self._bars(pool, report)
            await self._delete(pool, report, "gaps", report.cutoffs.gaps_ms,
                               gaps_sql.delete_ended_before)
            await self._delete(pool, report, "backfill_jobs", report.cutoffs.backfill_jobs_ms,
                               backfill_jobs_sql.delete_finished_before)
        RETENTION_RUNS.labels("ok" if report.ok else "error").inc()
        c = report.cutoffs
        log.info("retention: %s", report.summary(), extra={
            "result": "ok" if report.ok else "error", "chunks": report.chunks,
            "deleted": dict(report.deleted), "bars_1m_cutoff_ms": c.bars_1m_ms,
            "gaps_cutoff_ms": c.gaps_ms, "backfill_jobs_cutoff_ms": c.backfill_jobs_ms})
        self.last_report = report
        return report

    async def _bars(self, pool: asyncpg.Pool, report: RetentionReport) -> None:
        cutoff = report.cutoffs.bars_1m_ms
        if cutoff is None:
            return
        rows = 0
        try:
            async with pool.acquire() as conn:
                for start_ms, end_ms in await bars_sql.chunks_before(conn, cutoff):
                    n_chunks, n_rows, symbols = await bars_sql.drop_chunk(conn, start_ms,
                                                                          end_ms)
                    report.chunks += n_chunks
                    rows += n_rows
                    report.symbols.update(symbols)
                    RETENTION_CHUNKS.inc(n_chunks)
                    RETENTION_DELETED.labels("bars_1m").inc(n_rows)
        except _DB_ERRORS as exc:
            report.errors["bars_1m"] = _err(exc)
            log.warning("retention: dropping bars_1m chunks before %s failed (retrying): %s",
                        _iso(cutoff), exc)
        finally:
            report.deleted["bars_1m"] = rows
            if report.symbols:  # also after a failure: the chunks dropped so far are gone
                await self.invalidate(sorted(report.symbols))

    async def _delete(self, pool: asyncpg.Pool, report: RetentionReport, table: str,
                      cutoff: int | None,
                      delete: Callable[[asyncpg.Connection, int], Awaitable[int]]) -> None:
        if cutoff is None:
            return
        try:
            async with pool.acquire() as conn:
                n = await delete(conn, cutoff)
        except _DB_ERRORS as exc:
            report.errors[table] = _err(exc)
            log.warning("retention: deleting %s before %s failed (retrying): %s", table,
                        _iso(cutoff), exc)
            return
        report.deleted[table] = n
        RETENTION_DELETED.labels(table).inc(n)


def register_retention(app: faust.App, retention: RetentionSection, database: Database,
                       ohlcv_cache: OhlcvCache) -> RetentionJob | None:
    """Register the retention timer on ``app`` (leader only, every
    :func:`check_interval_s`), when any horizon is set.

    Returns:
        The job, or None when retention is off (nothing registered).
    """
    if not retention.enabled:
        return None
    job = RetentionJob(retention, database, ohlcv_cache.invalidate)

    async def retention_cleanup() -> None:
        await job.tick()

    app.timer(interval=check_interval_s(retention), on_leader=True,
              name="agents.retention.cleanup")(retention_cleanup)
    return job
