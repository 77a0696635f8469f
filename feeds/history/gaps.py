"""Gap detection and repair: feed outages and missing minutes of active pairs, backfilled
from the REST history source.

* **Outages** (:class:`OutageRecorder`, pure): every live feed's :class:`StateHolder`
  reports its transitions (``StateHolder.on_change``, set by :class:`IngestManager` from
  :attr:`IngestManager.on_feed_state`). A feed that was ``connected`` and goes
  ``reconnecting`` at ``t0`` is down until it is ``connected`` again (or ``stopped``) at
  ``t1``; ``t0`` is moved back to the last message received in the connection when there
  was one (a silent feed is dropped only after ``feeds.idle_timeout_s``). The outage
  becomes one gap per pair of the feed (``feeds.pairs`` for an exchange program, the
  subscriptions for CryptoCompare) over whole minutes ``[floor_minute(t0),
  ceil_minute(t1))``, cause ``feed_outage``.
* **Scan** (every ``history.gap_scan_interval_s``, 0 = off): holes between consecutive
  bars of each pair with bars in the last :data:`SCAN_HORIZON_MS`
  (:func:`sql.gaps.missing_minutes`). Quiet markets legitimately have minutes without
  trades, so a hole is recorded (cause ``scan``) only when it overlaps a recorded feed
  outage of its exchange or is at least :data:`SCAN_MIN_MINUTES` long
  (:func:`select_scan_holes`), and only when no known gap of the pair overlaps it.
* **Repair** (when ``history.source`` is not ``none``): an ``open`` gap detected at least
  :func:`settle_ms` ago (so the minutes before the outage's end are sealed in the
  database) goes ``repairing``, is fetched with :func:`feeds.history.backfill.run_backfill`
  (``overwrite_own=False``: only minutes without a bar of our own are filled) and becomes
  ``repaired`` when no sealed minute of it lacks a bar any more, else ``unrepairable``
  (the source has no bars for them, or failed for good: ``detail`` says which). Every
  committed page invalidates the ``/ohlcv`` cache of the symbol. A still-open last minute
  may be filled by the source first; our own bar replaces it when it closes (bars built
  from ticks always win).

Only the consumer-group leader records, scans and repairs (feeds run there only); it
publishes its status to Redis (``<p>:gaps``, TTL 10 s) for ``GET /health``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from mode import Service
from redis.exceptions import RedisError

from core.config import FeedsSection, Settings
from core.errors import HistoryError
from core.metrics import GAP_ERRORS, GAP_REPAIRS, GAPS_RECORDED
from core.state import StateHolder
from core.timeutil import (
    MINUTE_MS,
    ceil_minute,
    floor_minute,
    now_ms,
    settle_ms,
    stored_end_ms,
)
from feeds.history.backfill import run_backfill
from feeds.history.rest import make_history_client
from sql import gaps as gaps_sql
from stores.keys import gap_status_key
from tables.aggregator import clock_of

__all__ = [
    "GAPS_RECORDED",
    "GAP_ERRORS",
    "GAP_REPAIRS",
    "SCAN_HORIZON_MS",
    "SCAN_MIN_MINUTES",
    "GapRange",
    "GapService",
    "Outage",
    "OutageRecorder",
    "ScanHole",
    "feed_pairs",
    "outage_gaps",
    "read_gap_status",
    "select_scan_holes",
]

log = logging.getLogger(__name__)

#: the scan looks at bars of the last 24 h only (bounded cost)
SCAN_HORIZON_MS = 24 * 3_600_000
#: a hole outside any recorded feed outage is a gap only from this many minutes on;
#: shorter ones are taken for a quiet market (minutes without trades have no bar)
SCAN_MIN_MINUTES = 10
#: time after a bar's window end (plus ``window.grace_ms``) by which it is in the database
#: (sink flush, idle close)
#: open gaps repaired per pass
_REPAIR_BATCH = 20
_STATUS_TTL_MS = 10_000
_LOOP_S = 1.0



# ------------------------------------------------------------------------------ pure logic

@dataclass(frozen=True)
class Outage:
    """A feed outage: the feed delivered nothing in ``[start_ms, end_ms)`` (UTC epoch ms)."""

    feed: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class GapRange:
    """Minutes ``[start_ms, end_ms)`` (minute-aligned, UTC epoch ms) of one pair."""

    exchange: str
    symbol: str
    start_ms: int
    end_ms: int

    @property
    def minutes(self) -> int:
        """Number of minutes."""
        return (self.end_ms - self.start_ms) // MINUTE_MS


@dataclass(frozen=True)
class ScanHole:
    """A hole kept by :func:`select_scan_holes`; ``reason`` is ``feed_outage`` (it overlaps
    one) or ``long`` (at least the minimum length)."""

    gap: GapRange
    reason: str


class OutageRecorder:
    """State machine turning feed state transitions into outages (pure, no I/O).

    Per feed: ``connected`` -> ``reconnecting`` at ``t0`` opens an outage, the next
    ``connected`` (or ``stopped``) at ``t1`` closes it. ``starting`` -> ``reconnecting``
    (never connected since the recorder started) is not an outage: nothing was being
    received. ``t0`` is the last message of the connection when there was one.
    """

    def __init__(self) -> None:
        self._connected_since: dict[str, int] = {}
        self._down_since: dict[str, int] = {}

    def observe(self, feed: str, state: str, at_ms: int,
                last_message_ms: int | None = None) -> Outage | None:
        """Feed one transition.

        Args:
            feed: feed name.
            state: the new state (``starting`` | ``connected`` | ``reconnecting`` |
                ``stopped``).
            at_ms: when it changed, UTC epoch ms.
            last_message_ms: the feed's last message, UTC epoch ms (None: none yet).

        Returns:
            The outage this transition ends, else None.
        """
        if state == "reconnecting":
            since = self._connected_since.pop(feed, None)
            if since is not None and feed not in self._down_since:
                t0 = at_ms
                if last_message_ms is not None and since <= last_message_ms < at_ms:
                    t0 = last_message_ms
                self._down_since[feed] = t0
            return None
        if state in ("connected", "stopped"):
            if state == "connected":
                self._connected_since[feed] = at_ms
            else:
                self._connected_since.pop(feed, None)
            t0_or_none = self._down_since.pop(feed, None)
            if t0_or_none is not None and at_ms > t0_or_none:
                return Outage(feed, t0_or_none, at_ms)
        return None

    def down(self) -> dict[str, int]:
        """Feeds currently down: name -> outage start (UTC epoch ms)."""
        return dict(self._down_since)


def feed_pairs(kind: str, name: str, feeds: FeedsSection) -> list[tuple[str, str]]:
    """The ``(exchange, symbol)`` pairs a feed delivers: ``feeds.pairs`` on the exchange
    ``name`` for an exchange program, the subscriptions ``0~Market~FSYM~TSYM`` for
    CryptoCompare (``(market.lower(), FSYM+TSYM)``), none for the test generator."""
    if kind == "marketflow_tcp":
        return [(name, p.upper()) for p in feeds.pairs]
    if kind == "cryptocompare":
        out = []
        for sub in feeds.cryptocompare.subs:
            parts = sub.split("~")
            if len(parts) == 4 and parts[0] == "0":
                out.append((parts[1].lower(), (parts[2] + parts[3]).upper()))
        return out
    return []


def outage_gaps(outage: Outage, pairs: Iterable[tuple[str, str]]) -> list[GapRange]:
    """One gap per pair over the whole minutes touched by the outage:
    ``[floor_minute(start_ms), ceil_minute(end_ms))`` (empty when the outage is empty)."""
    start, end = floor_minute(outage.start_ms), ceil_minute(outage.end_ms)
    if end <= start:
        return []
    return [GapRange(ex, sym, start, end) for ex, sym in pairs]


def select_scan_holes(holes: Iterable[tuple[str, str, int, int]],
                      outages: Iterable[tuple[str, int, int]],
                      min_minutes: int = SCAN_MIN_MINUTES) -> list[ScanHole]:
    """The scan rule: which holes between stored bars are gaps.

    Args:
        holes: ``(exchange, symbol, start_ms, end_ms)`` runs of minutes without a bar
            between two bars of the pair (:func:`sql.gaps.missing_minutes`).
        outages: ``(exchange, start_ms, end_ms)`` recorded feed outages.
        min_minutes: holes at least this long are gaps even without an outage.

    Returns:
        The holes that overlap a recorded outage of the same exchange (reason
        ``feed_outage``) or last at least ``min_minutes`` (reason ``long``), in input order;
        shorter holes outside outages are a quiet market and dropped, and so are holes of
        replay namespaces (``replay.binance``, see :func:`tables.aggregator.clock_of`).
    """
    by_exchange: dict[str, list[tuple[int, int]]] = {}
    for ex, start, end in outages:
        by_exchange.setdefault(ex, []).append((start, end))
    out = []
    for ex, sym, start, end in holes:
        if clock_of(ex):  # a replay namespace: its data is a simulation, not a feed
            continue
        gap = GapRange(ex, sym, start, end)
        if any(s < end and start < e for s, e in by_exchange.get(ex, ())):
            out.append(ScanHole(gap, "feed_outage"))
        elif gap.minutes >= min_minutes:
            out.append(ScanHole(gap, "long"))
    return out


# ------------------------------------------------------------------------------ status



async def read_gap_status(client: Any, prefix: str) -> dict[str, Any] | None:
    """The gap job's status published by the leader, None when no worker runs it.

    Raises:
        redis.exceptions.RedisError: Redis unreachable.
    """
    raw = await client.get(gap_status_key(prefix))
    return orjson.loads(raw) if raw else None


# ------------------------------------------------------------------------------ service

Invalidate = Callable[[Iterable[str]], Awaitable[None]]


class GapService(Service):
    """Records outages, scans for missing minutes and repairs gaps (leader only).

    Args:
        settings: the worker's settings (``history``, ``feeds``, ``window``, ``redis``).
        database: the :class:`sql.pool.Database` service (its ``pool()``).
        is_leader: ``() -> bool``.
        redis_client: ``redis.asyncio`` client for the status key.
        invalidate: ``async (symbols) -> None``, the ``/ohlcv`` cache invalidation.

    Attributes:
        job_state: ``idle`` | ``scanning`` | ``repairing`` | ``error`` (last pass failed on
            the database; retried every second).
        last_scan_ms: end of the last scan, UTC epoch ms (None before the first).
        counts: gaps by state after the last pass.
    """

    def __init__(self, settings: Settings, database: Any,
                 is_leader: Callable[[], bool], redis_client: Any, invalidate: Invalidate,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.database = database
        self.is_leader = is_leader
        self.redis = redis_client
        self.invalidate = invalidate
        self.recorder = OutageRecorder()
        self.job_state = "idle"
        self.last_scan_ms: int | None = None
        self.last_error: str | None = None
        self.counts: dict[str, int] = {}
        self._pending: list[tuple[GapRange, str | None]] = []
        self._next_scan_s = 0.0
        self._leading = False
        self._client: Any = None

    # -- outage recording (called synchronously by StateHolder.set_state) -----------------

    def on_feed_state(self, st: StateHolder, previous: str) -> None:
        """Record a feed transition; a finished outage is queued for the database."""
        outage = self.recorder.observe(st.name, st.state, st.since_ms, st.last_message_ms)
        if outage is None:
            return
        gaps = outage_gaps(outage, feed_pairs(st.kind, st.name, self.settings.feeds))
        log.warning("gaps: feed %s was down %d..%d (%.1f s): %d gap(s) recorded", st.name,
                    outage.start_ms, outage.end_ms, (outage.end_ms - outage.start_ms) / 1000,
                    len(gaps), extra={"exchange": st.name, "start_ms": outage.start_ms,
                                      "end_ms": outage.end_ms})
        detail = f"feed {st.name} down: {st.last_error}" if st.last_error else None
        self._pending.extend((g, detail) for g in gaps)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """JSON-able status for ``/health``: ``state`` (idle | scanning | repairing |
        error), ``last_scan_ms``, ``open`` (gaps open or being repaired), ``counts`` by
        state, ``source``, ``last_error``, ``updated_ms``."""
        return {"state": self.job_state, "last_scan_ms": self.last_scan_ms,
                "open": self.counts.get("open", 0) + self.counts.get("repairing", 0),
                "counts": dict(self.counts), "source": self.settings.history.source,
                "last_error": self.last_error, "updated_ms": now_ms()}

    @Service.task
    async def _publish(self) -> None:
        key = gap_status_key(self.settings.redis.key_prefix)
        while not self.should_stop:
            if self.is_leader():
                try:
                    await self.redis.set(key, orjson.dumps(self.status()), px=_STATUS_TTL_MS)
                except (RedisError, OSError) as exc:
                    GAP_ERRORS.labels("status").inc()
                    log.warning("gaps: cannot publish status: %s", exc)
            await self.sleep(_LOOP_S)

    # -- main loop ------------------------------------------------------------------------

    @Service.task
    async def _run(self) -> None:
        while not self.should_stop:
            await self.sleep(_LOOP_S)
            if not self.is_leader():
                self._leading, self.job_state = False, "idle"
                continue
            try:
                await self.run_once(now_ms())
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                GAP_ERRORS.labels("database").inc()
                self._leading = False  # reopen gaps a failed pass left repairing
                self.job_state, self.last_error = "error", f"{type(exc).__name__}: {exc}"[:300]
                log.warning("gaps: database error (retrying): %s", exc)

    async def run_once(self, now: int) -> None:
        """One pass: store queued outages, scan when due, repair eligible gaps.

        Raises:
            asyncpg.PostgresError / OSError: the database failed (queued outages are kept).
        """
        pool = await self.database.pool()
        async with pool.acquire() as conn:
            if not self._leading:
                n = await gaps_sql.reset_repairing(conn)
                if n:
                    log.info("gaps: reopened %d gap(s) left repairing", n)
                self._leading = True
            await self._store_pending(conn)
            interval_s = self.settings.history.gap_scan_interval_s
            if interval_s > 0 and time.monotonic() >= self._next_scan_s:
                self._next_scan_s = time.monotonic() + interval_s
                await self._scan(conn, now)
            self.counts = await gaps_sql.count_by_state(conn)
            todo: Sequence[asyncpg.Record] = []
            if self.settings.history.source != "none":
                todo = await gaps_sql.open_gaps(
                    conn, now - settle_ms(self.settings.window.grace_ms), _REPAIR_BATCH)
        for gap in todo:
            if self.should_stop:
                break
            await self._repair(pool, gap)
        if todo:
            async with pool.acquire() as conn:
                self.counts = await gaps_sql.count_by_state(conn)
        self.job_state = "idle"

    async def _store_pending(self, conn: asyncpg.Connection) -> None:
        while self._pending:
            gap, detail = self._pending[0]
            await gaps_sql.record_gap(conn, gap.exchange, gap.symbol, gap.start_ms,
                                      gap.end_ms, "feed_outage", detail)
            GAPS_RECORDED.labels("feed_outage").inc()
            self._pending.pop(0)

    async def _scan(self, conn: asyncpg.Connection, now: int) -> None:
        self.job_state = "scanning"
        horizon = now - SCAN_HORIZON_MS
        holes = await gaps_sql.missing_minutes(conn, horizon, now)
        outages = await gaps_sql.outage_intervals(conn, horizon)
        found = 0
        for hole in select_scan_holes(holes, outages):
            g = hole.gap
            detail = (f"{g.minutes} minute(s) without bars"
                      + (" during a feed outage" if hole.reason == "feed_outage" else ""))
            if await gaps_sql.record_scan_gap(conn, g.exchange, g.symbol, g.start_ms,
                                              g.end_ms, detail):
                found += 1
                GAPS_RECORDED.labels("scan").inc()
                log.warning("gaps: scan found %s %s [%d, %d): %s", g.exchange, g.symbol,
                            g.start_ms, g.end_ms, detail,
                            extra={"exchange": g.exchange, "symbol": g.symbol})
        self.last_scan_ms = now
        log.debug("gaps: scan: %d hole(s), %d new gap(s)", len(holes), found)

    # -- repair ---------------------------------------------------------------------------

    def _history_client(self) -> Any:
        if self._client is None:
            self._client = make_history_client(self.settings.history)
        return self._client

    async def _set(self, pool: asyncpg.Pool, gap: asyncpg.Record, state: str,
                   detail: str | None) -> None:
        async with pool.acquire() as conn:
            await gaps_sql.set_state(conn, gap["exchange"], gap["symbol"], gap["start_ms"],
                                     state, detail)
        log.info("gaps: %s %s [%d, %d) -> %s%s", gap["exchange"], gap["symbol"],
                 gap["start_ms"], gap["end_ms"], state, f": {detail}" if detail else "",
                 extra={"exchange": gap["exchange"], "symbol": gap["symbol"],
                        "gap_state": state})

    async def _missing(self, pool: asyncpg.Pool, gap: asyncpg.Record) -> int:
        end = min(int(gap["end_ms"]),
                  stored_end_ms(now_ms(), self.settings.window.grace_ms))
        async with pool.acquire() as conn:
            return await gaps_sql.missing_sealed_minutes(
                conn, gap["exchange"], gap["symbol"], int(gap["start_ms"]), end)

    async def _repair(self, pool: asyncpg.Pool, gap: asyncpg.Record) -> None:
        """open -> repairing -> repaired | unrepairable (back to open on a database error).

        Raises:
            asyncpg.PostgresError / OSError: the database failed before the repair started.
        """
        client = self._history_client()
        if client is None:
            return
        exchange, symbol = gap["exchange"], gap["symbol"]
        start, end = int(gap["start_ms"]), int(gap["end_ms"])
        self.job_state = "repairing"
        before = await self._missing(pool, gap)
        await self._set(pool, gap, "repairing", None)

        async def on_written(bars: list[dict[str, Any]]) -> None:
            await self.invalidate({symbol})

        try:
            await run_backfill(pool, client, exchange, symbol, start, end,
                               overwrite_own=False, on_written=on_written, force=True)
            after = await self._missing(pool, gap)
        except HistoryError as exc:
            GAP_REPAIRS.labels("unrepairable").inc()
            await self._set(pool, gap, "unrepairable", f"{client.source}: {exc}"[:500])
            return
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            GAP_ERRORS.labels("repair").inc()
            self.last_error = f"repair {exchange} {symbol}: {type(exc).__name__}: {exc}"[:300]
            log.warning("gaps: repair of %s %s [%d, %d) failed (retried): %s", exchange,
                        symbol, start, end, exc)
            await self._set(pool, gap, "open", f"repair failed, retried: {exc}"[:500])
            return
        filled = max(0, before - after)
        if after == 0:
            GAP_REPAIRS.labels("repaired").inc()
            await self._set(pool, gap, "repaired",
                            f"{filled} minute(s) filled from {client.source}")
        else:
            GAP_REPAIRS.labels("unrepairable").inc()
            await self._set(pool, gap, "unrepairable",
                            f"{client.source} has no bars for {after} minute(s) "
                            f"({filled} filled)")

    async def on_stop(self) -> None:
        """Close the history client."""
        if self._client is not None:
            await self._client.close()
            self._client = None
