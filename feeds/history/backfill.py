"""Resumable backfill of 1-minute bars from a REST history source into ``bars_1m``.

A job is identified by (source, exchange, symbol, start_ms, end_ms) and recorded in
``backfill_jobs`` (:mod:`sql.backfill_jobs`). It pages backwards from ``end_ms`` with
:meth:`feeds.history.rest.HistoryClient.fetch_minutes`; each page is upserted with
:func:`sql.bars_1m.upsert_fetched_bars` in the same transaction that advances
``next_to_ms`` to the page's lower bound, so an interrupted job resumes exactly where the
last committed page ended and never fetches a committed page again. A finished job is
not run again unless ``force``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from core.errors import HistoryError
from feeds.history.rest import BarPage, HistoryClient
from sql import backfill_jobs
from sql.bars_1m import upsert_fetched_bars

__all__ = ["BackfillProgress", "job_id_for", "run_backfill"]

log = logging.getLogger(__name__)


def job_id_for(source: str, exchange: str, symbol: str, start_ms: int, end_ms: int) -> str:
    """Deterministic job id, e.g. ``cryptocompare:binance:BTCUSDT:1723075200000-1723161600000``."""
    return f"{source}:{exchange}:{symbol}:{start_ms}-{end_ms}"


@dataclass
class BackfillProgress:
    """State of one backfill run (also passed to the ``progress`` callback after each page).

    Attributes:
        job_id, source, exchange, symbol: the job.
        start_ms, end_ms: the job's range, UTC epoch ms, half-open.
        next_to_ms: exclusive upper end still to fetch (None once done).
        resumed_from_ms: ``next_to_ms`` when this run started (``end_ms`` for a new job).
        state: ``pending | fetching | done | error``.
        pages: pages committed by this run.
        bars_written: bars upserted by this run; total_bars_written: over the job's life.
        requests: HTTP requests of this run (retries included).
        last_error: the error of a failed run.
        skipped: the job was already done and not forced (nothing was fetched).
        started_s: ``time.monotonic()`` at the start of the run.
    """

    job_id: str
    source: str
    exchange: str
    symbol: str
    start_ms: int
    end_ms: int
    next_to_ms: int | None
    resumed_from_ms: int
    state: str = "pending"
    pages: int = 0
    bars_written: int = 0
    total_bars_written: int = 0
    requests: int = 0
    last_error: str | None = None
    skipped: bool = False
    started_s: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started_s

    @property
    def done_ms(self) -> int:
        """Milliseconds of the range fetched so far by this run."""
        pos = self.start_ms if self.next_to_ms is None else self.next_to_ms
        return max(0, self.resumed_from_ms - pos)

    @property
    def fraction(self) -> float:
        """Share of the job's range fetched (0..1, resumed parts included)."""
        span = self.end_ms - self.start_ms
        if span <= 0 or self.next_to_ms is None:
            return 1.0
        return min(1.0, max(0.0, (self.end_ms - self.next_to_ms) / span))

    @property
    def bars_per_s(self) -> float:
        """Bars written per second by this run."""
        return self.bars_written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Estimated seconds left (None before any progress)."""
        if self.next_to_ms is None:
            return 0.0
        if self.done_ms <= 0:
            return None
        left = max(0, self.next_to_ms - self.start_ms)
        return self.elapsed_s * left / self.done_ms


async def run_backfill(
    pool: asyncpg.Pool, client: HistoryClient, exchange: str, symbol: str, start_ms: int,
    end_ms: int, *, overwrite_own: bool,
    on_written: Callable[[list[dict[str, Any]]], Awaitable[None]] | None = None,
    progress: Callable[[BackfillProgress], None] | None = None, force: bool = False,
) -> BackfillProgress:
    """Fetch ``[start_ms, end_ms)`` of ``exchange``/``symbol`` from ``client`` into
    ``bars_1m``, resumably.

    Args:
        pool: database pool (migrations applied).
        client: the history source.
        exchange, symbol: our names.
        start_ms, end_ms: UTC epoch ms, half-open.
        overwrite_own: replace bars built from our own ticks (source ``ticks``) too.
        on_written: awaited with each page's bars after its commit (cache invalidation).
        progress: called after each committed page and at the end.
        force: run a finished job again from ``end_ms``.

    Returns:
        The final :class:`BackfillProgress` (``state`` ``done``).

    Raises:
        HistoryError: the source failed for good or ``start_ms >= end_ms``; the job is
            left in state ``error`` with ``last_error`` and resumes on the next run.
        asyncpg.PostgresError / OSError: a database write failed (the job resumes from the
            last committed page).
    """
    if start_ms >= end_ms:
        raise HistoryError(f"empty range: start {start_ms} >= end {end_ms}")
    job_id = job_id_for(client.source, exchange, symbol, start_ms, end_ms)
    async with pool.acquire() as conn:
        row = await backfill_jobs.create_job(conn, job_id, client.source, exchange, symbol,
                                             start_ms, end_ms)
        if row["state"] == "done" and force:
            await backfill_jobs.reset_job(conn, job_id)
            row = await backfill_jobs.get_job(conn, job_id)
            assert row is not None
        if row["state"] == "done":
            prog = BackfillProgress(job_id, client.source, exchange, symbol, start_ms, end_ms,
                                    None, end_ms, state="done", skipped=True,
                                    total_bars_written=row["bars_written"])
            log.info("backfill %s: already done (use force to run again)", job_id)
            if progress is not None:
                progress(prog)
            return prog
        next_to_ms = row["next_to_ms"] if row["next_to_ms"] is not None else end_ms
        await backfill_jobs.set_state(conn, job_id, "fetching")
    prog = BackfillProgress(job_id, client.source, exchange, symbol, start_ms, end_ms,
                            next_to_ms, next_to_ms, state="fetching",
                            total_bars_written=row["bars_written"])
    log.info("backfill %s: fetching [%d, %d)%s", job_id, start_ms, next_to_ms,
             " (resumed)" if next_to_ms != end_ms else "")
    base_requests = client.requests
    try:
        if next_to_ms > start_ms:
            async for page in client.fetch_minutes(exchange, symbol, start_ms, next_to_ms):
                bars = list(page)
                from_ms = page.from_ms if isinstance(page, BarPage) else min(
                    b["bucket_start_ms"] for b in bars)
                requests = page.requests if isinstance(page, BarPage) else 0
                async with pool.acquire() as conn, conn.transaction():
                    n = await upsert_fetched_bars(conn, bars, client.source, overwrite_own)
                    await backfill_jobs.record_page(conn, job_id, from_ms, n, requests)
                prog.pages += 1
                prog.bars_written += n
                prog.total_bars_written += n
                prog.requests += requests
                prog.next_to_ms = from_ms
                if on_written is not None:
                    await on_written(bars)
                if progress is not None:
                    progress(prog)
    except HistoryError as exc:
        prog.state, prog.last_error = "error", str(exc)
        unrecorded = max(0, client.requests - base_requests - prog.requests)
        prog.requests += unrecorded
        async with pool.acquire() as conn:
            await backfill_jobs.set_state(conn, job_id, "error", str(exc), unrecorded)
        log.error("backfill %s failed: %s (resumes from %s on the next run)", job_id, exc,
                  prog.next_to_ms)
        if progress is not None:
            progress(prog)
        raise
    unrecorded = max(0, client.requests - base_requests - prog.requests)
    prog.requests += unrecorded
    async with pool.acquire() as conn:
        await backfill_jobs.set_state(conn, job_id, "done", None, unrecorded)
    prog.state, prog.next_to_ms = "done", None
    log.info("backfill %s: done, %d bars in %d pages, %d requests", job_id, prog.bars_written,
             prog.pages, prog.requests)
    if progress is not None:
        progress(prog)
    return prog
