"""Queries on ``backfill_jobs`` (migration 003; bind parameters only).

A job is one (source, exchange, symbol, [start_ms, end_ms)) range fetched backwards;
``next_to_ms`` is the exclusive upper end still to fetch (NULL once done), ``state`` one of
``pending | fetching | done | error``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

__all__ = ["create_job", "get_job", "record_page", "reset_job", "set_state"]

_GET = """
SELECT job_id, source, exchange, symbol, start_ms, end_ms, next_to_ms, state, bars_written,
       requests, last_error, created_at, updated_at
FROM backfill_jobs WHERE job_id = $1
"""

_CREATE = """
INSERT INTO backfill_jobs (job_id, source, exchange, symbol, start_ms, end_ms, next_to_ms,
                           state)
VALUES ($1, $2, $3, $4, $5, $6, $6, 'pending')
ON CONFLICT (job_id) DO NOTHING
"""

_RESET = """
UPDATE backfill_jobs
SET next_to_ms = end_ms, state = 'pending', bars_written = 0, requests = 0,
    last_error = NULL, updated_at = now()
WHERE job_id = $1
"""

_SET_STATE = """
UPDATE backfill_jobs
SET state = $2, last_error = $3, requests = requests + $4,
    next_to_ms = CASE WHEN $2 = 'done' THEN NULL ELSE next_to_ms END, updated_at = now()
WHERE job_id = $1
"""

_RECORD_PAGE = """
UPDATE backfill_jobs
SET next_to_ms = $2, bars_written = bars_written + $3, requests = requests + $4,
    updated_at = now()
WHERE job_id = $1
"""


async def get_job(conn: asyncpg.Connection, job_id: str) -> asyncpg.Record | None:
    """The job row (all columns), or None."""
    return await conn.fetchrow(_GET, job_id)


async def create_job(conn: asyncpg.Connection, job_id: str, source: str, exchange: str,
                     symbol: str, start_ms: int, end_ms: int) -> asyncpg.Record:
    """Create the job (state ``pending``, ``next_to_ms = end_ms``) unless it exists; return
    its row (the existing one when it did)."""
    await conn.execute(_CREATE, job_id, source, exchange, symbol, start_ms, end_ms)
    row = await conn.fetchrow(_GET, job_id)
    assert row is not None
    return row


async def reset_job(conn: asyncpg.Connection, job_id: str) -> None:
    """Start the job over (``--force``): ``next_to_ms = end_ms``, counters 0, pending."""
    await conn.execute(_RESET, job_id)


async def set_state(conn: asyncpg.Connection, job_id: str, state: str,
                    last_error: str | None = None, add_requests: int = 0) -> None:
    """Set ``state`` (``done`` also clears ``next_to_ms``) and ``last_error``; add
    ``add_requests`` requests not recorded with a page (e.g. those of a failed page)."""
    await conn.execute(_SET_STATE, job_id, state, last_error, add_requests)


async def record_page(conn: asyncpg.Connection, job_id: str, next_to_ms: int, bars: int,
                      requests: int) -> None:
    """Advance the job after a committed page (call in the page's transaction)."""
    await conn.execute(_RECORD_PAGE, job_id, next_to_ms, bars, requests)


# ---- retention (agents/retention.py; appended)

__all__ += ["delete_finished_before"]

#: Finished jobs (done, or failed: error) last updated before $1.
_DELETE_FINISHED_BEFORE = """
DELETE FROM backfill_jobs WHERE state IN ('done', 'error') AND updated_at < $1
"""


async def delete_finished_before(conn: asyncpg.Connection, cutoff_ms: int) -> int:
    """Delete the ``done`` and ``error`` jobs last updated before ``cutoff_ms`` (UTC epoch
    ms); ``pending`` and ``fetching`` jobs are kept whatever their age (they resume). A
    deleted job run again starts from scratch.

    Returns:
        int: jobs deleted.

    Raises:
        asyncpg.PostgresError / OSError: the database failed.
    """
    status = await conn.execute(_DELETE_FINISHED_BEFORE,
                                datetime.fromtimestamp(cutoff_ms / 1000, tz=UTC))
    return int(status.rsplit(" ", 1)[1])
