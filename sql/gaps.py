"""Queries on the ``gaps`` table and the missing-minute scan of ``bars_1m`` (bind
parameters only).

A gap is ``[start_ms, end_ms)`` (UTC epoch ms, minute-aligned) of one ``(exchange,
symbol)`` without bars while the pair was active; its ``cause`` is ``feed_outage`` (from the
feeds' connection state) or ``scan`` (found in the stored bars), its ``state`` ``open`` ->
``repairing`` -> ``repaired`` | ``unrepairable`` (see :mod:`feeds.history.gaps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

__all__ = ["CAUSES", "STATES", "count_by_state", "list_gaps", "missing_minutes",
           "missing_sealed_minutes", "open_gaps", "outage_intervals", "record_gap",
           "record_scan_gap", "reset_repairing", "set_state"]

#: values of ``gaps.cause``
CAUSES = ("feed_outage", "scan")
#: values of ``gaps.state``
STATES = ("open", "repairing", "repaired", "unrepairable")

_COLUMNS = """exchange, symbol, start_ms, end_ms, cause, state, detail,
       (extract(epoch FROM detected_at) * 1000)::bigint AS detected_ms,
       (extract(epoch FROM updated_at) * 1000)::bigint AS updated_ms"""

#: An outage gap: new, or the same start seen again (extends it and reopens it unless a
#: repair is running on it). Returns the row's state (no row: left alone, repairing).
_RECORD = """
INSERT INTO gaps AS g (exchange, symbol, start_ms, end_ms, cause, state, detail)
VALUES ($1, $2, $3, $4, $5, 'open', $6)
ON CONFLICT (exchange, symbol, start_ms) DO UPDATE SET
    end_ms = greatest(g.end_ms, EXCLUDED.end_ms), state = 'open',
    detail = EXCLUDED.detail, updated_at = now()
WHERE g.state <> 'repairing'
RETURNING state
"""

#: A scan gap: inserted only when no known gap of the pair (any cause or state) overlaps
#: it, so a hole the source could not fill is not recorded again on every scan.
_RECORD_SCAN = """
INSERT INTO gaps (exchange, symbol, start_ms, end_ms, cause, state, detail)
SELECT $1, $2, $3, $4, 'scan', 'open', $5
WHERE NOT EXISTS (
    SELECT 1 FROM gaps
    WHERE exchange = $1 AND symbol = $2 AND start_ms < $4 AND end_ms > $3)
ON CONFLICT (exchange, symbol, start_ms) DO NOTHING
RETURNING state
"""

_LIST = """
SELECT """ + _COLUMNS + """
FROM gaps
WHERE ($1::text IS NULL OR exchange = $1) AND ($2::text IS NULL OR symbol = $2)
  AND ($3::text IS NULL OR state = $3)
ORDER BY start_ms DESC, exchange, symbol
LIMIT $4
"""

_OPEN = """
SELECT """ + _COLUMNS + """
FROM gaps
WHERE state = 'open' AND detected_at <= $1
ORDER BY start_ms, exchange, symbol
LIMIT $2
"""

_SET_STATE = """
UPDATE gaps SET state = $4, detail = $5, updated_at = now()
WHERE exchange = $1 AND symbol = $2 AND start_ms = $3
"""

_RESET_REPAIRING = """
UPDATE gaps SET state = 'open', detail = 'repair interrupted; retried', updated_at = now()
WHERE state = 'repairing'
"""

_COUNT = "SELECT state, count(*)::bigint AS n FROM gaps GROUP BY state"

#: Feed-outage gaps (per exchange, merged over symbols by the caller) ending after $1.
_OUTAGES = """
SELECT DISTINCT exchange, start_ms, end_ms FROM gaps
WHERE cause = 'feed_outage' AND end_ms > $1
"""

#: Holes between consecutive bars of each pair with bars in [$1, $2): a bar at ``b`` whose
#: next bar (lead) starts later than ``b + 1 min`` leaves ``[b + 1 min, next)`` empty. Only
#: minutes between a pair's first and last bar of the horizon are considered, so a pair
#: that stopped trading (or was never active) yields nothing. At most $3 holes.
_HOLES = """
SELECT exchange, symbol,
       (extract(epoch FROM bucket_start) * 1000)::bigint + 60000 AS start_ms,
       (extract(epoch FROM nxt) * 1000)::bigint AS end_ms
FROM (
    SELECT exchange, symbol, bucket_start,
           lead(bucket_start) OVER (PARTITION BY exchange, symbol ORDER BY bucket_start) AS nxt
    FROM bars_1m
    WHERE bucket_start >= $1 AND bucket_start < $2
) AS b
WHERE nxt > bucket_start + interval '1 minute'
ORDER BY exchange, symbol, start_ms
LIMIT $3
"""

#: Minutes of [$3, $4) without a bar of ($1, $2).
_MISSING_IN_RANGE = """
SELECT count(*)::bigint FROM generate_series($3::timestamptz, $4::timestamptz
                                             - interval '1 minute', interval '1 minute') AS m
WHERE NOT EXISTS (SELECT 1 FROM bars_1m
                  WHERE exchange = $1 AND symbol = $2 AND bucket_start = m)
"""


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def record_gap(conn: asyncpg.Connection, exchange: str, symbol: str, start_ms: int,
                     end_ms: int, cause: str, detail: str | None = None) -> bool:
    """Record a gap as ``open`` (upsert on ``(exchange, symbol, start_ms)``).

    The same start seen again extends ``end_ms`` to the larger value and reopens the gap,
    unless it is being repaired (then it is left alone).

    Args:
        conn: connection.
        exchange, symbol: the pair.
        start_ms, end_ms: ``[start_ms, end_ms)``, UTC epoch ms, minute-aligned.
        cause: one of :data:`CAUSES`.
        detail: free text (e.g. the feed's last error).

    Returns:
        bool: whether a row was inserted or updated.

    Raises:
        ValueError: ``cause`` unknown or ``end_ms <= start_ms``.
        asyncpg.PostgresError / OSError: the database failed.
    """
    if cause not in CAUSES:
        raise ValueError(f"unknown gap cause {cause!r}")
    if end_ms <= start_ms:
        raise ValueError(f"empty gap [{start_ms}, {end_ms})")
    return await conn.fetchval(_RECORD, exchange, symbol, start_ms, end_ms, cause,
                               detail) is not None


async def record_scan_gap(conn: asyncpg.Connection, exchange: str, symbol: str,
                          start_ms: int, end_ms: int, detail: str | None = None) -> bool:
    """Record a hole found by the scan (cause ``scan``, state ``open``) unless a known gap
    of the pair overlaps ``[start_ms, end_ms)``.

    Returns:
        bool: whether it was inserted.

    Raises:
        asyncpg.PostgresError / OSError: the database failed.
    """
    return await conn.fetchval(_RECORD_SCAN, exchange, symbol, start_ms, end_ms,
                               detail) is not None


async def list_gaps(conn: asyncpg.Connection, exchange: str | None, symbol: str | None,
                    state: str | None, limit: int) -> Sequence[asyncpg.Record]:
    """Gaps matching the filters (None = any), newest start first, at most ``limit``.

    Returns:
        Records ``exchange, symbol, start_ms, end_ms, cause, state, detail, detected_ms,
        updated_ms`` (times UTC epoch ms).
    """
    return await conn.fetch(_LIST, exchange, symbol, state, limit)


async def open_gaps(conn: asyncpg.Connection, detected_before_ms: int, limit: int
                    ) -> Sequence[asyncpg.Record]:
    """``open`` gaps detected at or before ``detected_before_ms``, oldest start first (the
    :func:`list_gaps` record shape)."""
    return await conn.fetch(_OPEN, _ts(detected_before_ms), limit)


async def set_state(conn: asyncpg.Connection, exchange: str, symbol: str, start_ms: int,
                    state: str, detail: str | None) -> None:
    """Set the state (and detail) of the gap ``(exchange, symbol, start_ms)``.

    Raises:
        ValueError: ``state`` is not one of :data:`STATES`.
        asyncpg.PostgresError / OSError: the database failed.
    """
    if state not in STATES:
        raise ValueError(f"unknown gap state {state!r}")
    await conn.execute(_SET_STATE, exchange, symbol, start_ms, state, detail)


async def reset_repairing(conn: asyncpg.Connection) -> int:
    """Reopen gaps left ``repairing`` by a worker that stopped mid-repair.

    Returns:
        int: gaps reopened.
    """
    status = await conn.execute(_RESET_REPAIRING)
    return int(status.rsplit(" ", 1)[1])


async def count_by_state(conn: asyncpg.Connection) -> dict[str, int]:
    """Number of gaps per state (states without gaps are absent)."""
    return {r["state"]: int(r["n"]) for r in await conn.fetch(_COUNT)}


async def outage_intervals(conn: asyncpg.Connection, after_ms: int
                           ) -> list[tuple[str, int, int]]:
    """``(exchange, start_ms, end_ms)`` of the recorded feed-outage gaps ending after
    ``after_ms`` (one row per distinct interval and exchange)."""
    rows = await conn.fetch(_OUTAGES, after_ms)
    return [(r["exchange"], int(r["start_ms"]), int(r["end_ms"])) for r in rows]


async def missing_minutes(conn: asyncpg.Connection, start_ms: int, end_ms: int,
                          limit: int = 10_000) -> list[tuple[str, str, int, int]]:
    """Holes in the bars of the pairs active in ``[start_ms, end_ms)``.

    A pair is active when it has a bar in the horizon; a hole is a run of minutes between
    two of its bars without a row. Whether a hole is a gap or a quiet market is decided by
    the caller (:func:`feeds.history.gaps.select_scan_holes`).

    Args:
        conn: connection.
        start_ms, end_ms: the scan horizon (keep it bounded, e.g. the last 24 h).
        limit: at most this many holes.

    Returns:
        ``(exchange, symbol, hole_start_ms, hole_end_ms)``, minute-aligned, sorted.
    """
    rows = await conn.fetch(_HOLES, _ts(start_ms), _ts(end_ms), limit)
    return [(r["exchange"], r["symbol"], int(r["start_ms"]), int(r["end_ms"])) for r in rows]


async def missing_sealed_minutes(conn: asyncpg.Connection, exchange: str, symbol: str,
                                 start_ms: int, end_ms: int) -> int:
    """Minutes of ``[start_ms, end_ms)`` (minute-aligned) without a bar of the pair; 0 for
    an empty range."""
    if end_ms <= start_ms:
        return 0
    return int(await conn.fetchval(_MISSING_IN_RANGE, exchange, symbol, _ts(start_ms),
                                   _ts(end_ms)))


# ---- retention (agents/retention.py; appended)

__all__ += ["delete_ended_before"]

#: Gaps whose range ended at or before $1, unless a repair is running on them.
_DELETE_ENDED_BEFORE = "DELETE FROM gaps WHERE end_ms <= $1 AND state <> 'repairing'"


async def delete_ended_before(conn: asyncpg.Connection, cutoff_ms: int) -> int:
    """Delete the gaps whose range ended at or before ``cutoff_ms`` (UTC epoch ms), in any
    state but ``repairing`` (``open`` ones too: minutes that old are past the retention,
    and with ``history.source = "none"`` open gaps are never resolved).

    Returns:
        int: gaps deleted.

    Raises:
        asyncpg.PostgresError / OSError: the database failed.
    """
    status = await conn.execute(_DELETE_ENDED_BEFORE, cutoff_ms)
    return int(status.rsplit(" ", 1)[1])
