"""Retention (``agents/retention.py``) on a real TimescaleDB and Redis: old ``bars_1m``
chunks are dropped and recent bars stay, old gaps and finished backfill jobs are deleted
and recent or unfinished ones stay, the ``/ohlcv`` cache of the dropped symbols is
invalidated, the counters move; once by calling the job directly, once through a worker's
leader timer."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from agents.retention import DAY_MS, RetentionJob
from core.config import RetentionSection
from sql import backfill_jobs as jobs_sql
from sql import gaps as gaps_sql
from sql.bars_1m import upsert_fetched_bars
from sql.pool import Database
from stores.keys import bar_key, ohlcv_entry_key, ohlcv_gen_key, seconds_key
from stores.live_bars import OPEN_BAR_TTL_MS, LiveBarStore
from stores.ohlcv_cache import OhlcvCache
from stores.stats import SECONDS_TTL_MS, SecondStatsStore
from tests.integration.conftest import Stack, until

pytestmark = pytest.mark.integration

MIN = 60_000
HOUR = 60 * MIN
BARS_DAYS, GAPS_DAYS, JOBS_DAYS = 2, 2, 3
#: bar ages, ms before now: well past the horizon, just past it (the bar's chunk may or may
#: not lie wholly before the cutoff, depending on the time of day), just inside, recent
AGES_MS = (5 * DAY_MS, 3 * DAY_MS + 2 * HOUR, BARS_DAYS * DAY_MS + HOUR,
           BARS_DAYS * DAY_MS - HOUR, 10 * MIN)
#: exchanges and symbols of the old bars; RECENT_ONLY has recent bars only
PAIRS = (("exchange1", "BTCUSDT"), ("exchange2", "BTCUSDT"), ("exchange1", "ETHUSDT"))
RECENT_ONLY = ("exchange1", "SOLUSDT")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _bar(exchange: str, symbol: str, start_ms: int) -> dict[str, Any]:
    return {"exchange": exchange, "symbol": symbol, "bucket_start_ms": start_ms,
            "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 3.0,
            "trade_count": 4, "avg_price": 1.2, "vwap": 1.1, "open_ts_ms": start_ms,
            "close_ts_ms": start_ms + 59_999}


def _chunk_end_ms(start_ms: int) -> int:
    """End of the 1-day chunk holding ``start_ms`` (chunks are aligned to UTC midnight)."""
    return start_ms // DAY_MS * DAY_MS + DAY_MS


async def _seed(conn: asyncpg.Connection, now: int, *, slack_ms: int = 0,
                repairing: bool = True) -> dict[str, Any]:
    """Bars, gaps and backfill jobs spanning old and recent times; what retention at
    ``now`` must drop and keep.

    Args:
        conn: the stack's database.
        now: the run's time, UTC epoch ms.
        slack_ms: the run happens up to this long after ``now``: bars whose chunk ends in
            ``(cutoff, cutoff + slack_ms]`` (only around UTC midnight) are left out.
        repairing: also seed a gap in state ``repairing`` (a worker that becomes the leader
            reopens those, so the worker test leaves it out).
    """
    cutoff = now - BARS_DAYS * DAY_MS
    bars = [_bar(ex, sym, (now - age) // MIN * MIN) for ex, sym in PAIRS for age in AGES_MS]
    # adjacent minutes: the gap scan of a worker finds no hole in them
    bars += [_bar(*RECENT_ONLY, (now - age) // MIN * MIN) for age in (11 * MIN, 10 * MIN)]
    bars = [b for b in bars
            if not cutoff < _chunk_end_ms(b["bucket_start_ms"]) <= cutoff + slack_ms]
    await upsert_fetched_bars(conn, bars, "test", overwrite_own=True)
    gone = {(b["exchange"], b["symbol"], b["bucket_start_ms"]) for b in bars
            if _chunk_end_ms(b["bucket_start_ms"]) <= cutoff}
    kept = {(b["exchange"], b["symbol"], b["bucket_start_ms"]) for b in bars} - gone

    g_cut = now - GAPS_DAYS * DAY_MS
    gaps = {  # start_ms -> (end_ms, final state, deleted?)
        g_cut - 5 * DAY_MS: (g_cut - 4 * DAY_MS, "repaired", True),
        g_cut - 3 * DAY_MS: (g_cut - 3 * DAY_MS + 10 * MIN, "unrepairable", True),
        g_cut - 2 * DAY_MS: (g_cut - 2 * DAY_MS + 10 * MIN, "open", True),
        g_cut - DAY_MS: (g_cut - DAY_MS + 10 * MIN, "repairing", False),  # repair running
        g_cut - HOUR: (g_cut + 15 * MIN, "open", False),  # ends after the cutoff
        now - 2 * HOUR: (now - HOUR, "repaired", False),
    }
    if not repairing:
        del gaps[g_cut - DAY_MS]
    for start, (end, state, _) in gaps.items():
        assert await gaps_sql.record_gap(conn, "exchange1", "BTCUSDT", start, end,
                                         "feed_outage")
        if state != "open":
            await gaps_sql.set_state(conn, "exchange1", "BTCUSDT", start, state, None)

    jobs = {  # job id -> (state, age in days, deleted?)
        "old-done": ("done", JOBS_DAYS + 1, True),
        "old-error": ("error", JOBS_DAYS + 2, True),
        "old-pending": ("pending", JOBS_DAYS + 3, False),
        "old-fetching": ("fetching", JOBS_DAYS + 3, False),
        "recent-done": ("done", JOBS_DAYS - 1, False),
    }
    for job_id, (state, age_days, _) in jobs.items():
        await jobs_sql.create_job(conn, job_id, "cryptocompare", "exchange1", "BTCUSDT",
                                  now - 10 * DAY_MS, now - 9 * DAY_MS)
        if state != "pending":
            await jobs_sql.set_state(conn, job_id, state, "boom" if state == "error" else None)
        # test setup only: age the row (the product never writes updated_at itself)
        await conn.execute("UPDATE backfill_jobs SET updated_at = now() - $2::interval "
                           "WHERE job_id = $1", job_id, timedelta(days=age_days))
    return {"cutoff": cutoff, "gone": gone, "kept": kept,
            "old_days": {b // DAY_MS for _, _, b in gone},
            "gone_symbols": {s for _, s, _ in gone},
            "gaps_gone": {s for s, (_, _, d) in gaps.items() if d},
            "gaps_kept": {s for s, (_, _, d) in gaps.items() if not d},
            "jobs_gone": {j for j, (_, _, d) in jobs.items() if d},
            "jobs_kept": {j for j, (_, _, d) in jobs.items() if not d}}


async def _bar_keys(conn: asyncpg.Connection) -> set[tuple[str, str, int]]:
    rows = await conn.fetch("SELECT exchange, symbol, "
                            "(extract(epoch FROM bucket_start) * 1000)::bigint AS b FROM bars_1m")
    return {(r["exchange"], r["symbol"], int(r["b"])) for r in rows}


async def _chunk_ends(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch(
        "SELECT (extract(epoch FROM range_end) * 1000)::bigint AS e "
        "FROM timescaledb_information.chunks WHERE hypertable_name = 'bars_1m'")
    return sorted(int(r["e"]) for r in rows)


async def _assert_retained(conn: asyncpg.Connection, want: dict[str, Any]) -> None:
    """Exactly the expected bars, gaps and jobs are left."""
    assert await _bar_keys(conn) == want["kept"]
    ends = await _chunk_ends(conn)
    assert ends and all(e > want["cutoff"] for e in ends), (ends, want["cutoff"])
    gaps = {int(r["start_ms"]) for r in await gaps_sql.list_gaps(conn, None, None, None, 100)}
    assert gaps == want["gaps_kept"]
    jobs = {r["job_id"] for r in await conn.fetch("SELECT job_id FROM backfill_jobs")}
    assert jobs == want["jobs_kept"]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_cleanup_drops_old_chunks_and_rows_and_keeps_recent_data(stack: Stack) -> None:
    database = Database(stack.dsn, pool_max=2)  # migrates on first use
    r = stack.redis()
    try:
        pool = await database.pool()
        now = _now_ms()
        async with pool.acquire() as conn:
            want = await _seed(conn, now)
            assert want["gone"] and want["old_days"], "the seed has nothing to drop"
            old_chunks = sum(1 for e in await _chunk_ends(conn) if e <= want["cutoff"])
        assert old_chunks == len(want["old_days"])

        # a cached sealed range of a symbol whose old bars are about to be dropped
        cache = OhlcvCache(r, stack.name, ttl_s=600, max_bytes=1 << 20)
        gen = await cache.generation("BTCUSDT")
        assert gen == 0
        entry = ohlcv_entry_key(stack.name, "BTCUSDT", gen, None, "1m", "none",
                                now - 6 * DAY_MS, now - DAY_MS)
        await cache.put(entry, None, b'[{"bucket_start_ms": 1}]')
        assert await cache.get(entry) is not None

        before = {t: _sample("marketflow_retention_deleted_total", table=t)
                  for t in ("bars_1m", "gaps", "backfill_jobs")}
        chunks_before = _sample("marketflow_retention_chunks_dropped_total")
        runs_ok = _sample("marketflow_retention_runs_total", result="ok")
        job = RetentionJob(RetentionSection(bars_1m_days=BARS_DAYS, gaps_days=GAPS_DAYS,
                                            backfill_jobs_days=JOBS_DAYS),
                           database, cache.invalidate)
        report = await job.run_once(now)

        assert report.ok, report.errors
        assert report.cutoffs.bars_1m_ms == want["cutoff"]
        assert report.chunks == old_chunks
        assert report.deleted == {"bars_1m": len(want["gone"]),
                                  "gaps": len(want["gaps_gone"]),
                                  "backfill_jobs": len(want["jobs_gone"])}
        assert report.symbols == want["gone_symbols"] == {"BTCUSDT", "ETHUSDT"}
        async with pool.acquire() as conn:
            await _assert_retained(conn, want)
        for table, n in report.deleted.items():
            assert _sample("marketflow_retention_deleted_total", table=table) == (
                before[table] + n)
        assert _sample("marketflow_retention_chunks_dropped_total") == (
            chunks_before + old_chunks)
        assert _sample("marketflow_retention_runs_total", result="ok") == runs_ok + 1

        # the dropped symbols' cache generation moved on: the cached range is unreachable
        assert await cache.generation("BTCUSDT") == 1
        assert await cache.generation("ETHUSDT") == 1
        assert await cache.generation("SOLUSDT") == 0  # nothing of it was dropped
        assert await r.exists(ohlcv_gen_key(stack.name, "SOLUSDT")) == 0

        # a second run finds nothing more to delete
        again = await job.run_once(_now_ms())
        assert again.ok and again.chunks == 0
        assert again.deleted == {"bars_1m": 0, "gaps": 0, "backfill_jobs": 0}
        assert await cache.generation("BTCUSDT") == 1
        async with pool.acquire() as conn:
            await _assert_retained(conn, want)
    finally:
        await r.aclose()
        await database.on_stop()


async def test_a_failing_step_is_reported_and_counted_and_the_others_still_run(
        stack: Stack) -> None:
    database = Database(stack.dsn, pool_max=2)
    r = stack.redis()
    try:
        pool = await database.pool()
        now = _now_ms()
        async with pool.acquire() as conn:
            want = await _seed(conn, now)
            # test setup only: the backfill_jobs step will fail (no such table)
            await conn.execute("ALTER TABLE backfill_jobs RENAME TO backfill_jobs_away")
        errors = _sample("marketflow_retention_runs_total", result="error")
        job = RetentionJob(RetentionSection(bars_1m_days=BARS_DAYS, gaps_days=GAPS_DAYS,
                                            backfill_jobs_days=JOBS_DAYS),
                           database, OhlcvCache(r, stack.name, 600, 1 << 20).invalidate)
        report = await job.run_once(now)
        assert set(report.errors) == {"backfill_jobs"}, report.errors
        assert report.errors["backfill_jobs"].startswith("UndefinedTableError"), report.errors
        assert "backfill_jobs: failed" in report.summary()
        assert _sample("marketflow_retention_runs_total", result="error") == errors + 1
        async with pool.acquire() as conn:
            assert await _bar_keys(conn) == want["kept"]
            gaps = {int(g["start_ms"]) for g in await gaps_sql.list_gaps(conn, None, None,
                                                                        None, 100)}
            assert gaps == want["gaps_kept"]
    finally:
        await r.aclose()
        await database.on_stop()


async def test_redis_keys_of_old_minutes_expire_long_before_the_horizon(stack: Stack) -> None:
    """The per-minute Redis keys of a minute older than the shortest horizon (1 day) are
    written with a TTL (minutes), so none outlives the data retention drops."""
    r = stack.redis()
    try:
        old_minute_ms = (_now_ms() - 3 * DAY_MS) // MIN * MIN
        live, stats = LiveBarStore(r, stack.name), SecondStatsStore(r, stack.name)
        bar = {**_bar("exchange1", "BTCUSDT", old_minute_ms), "closed": False}
        async with r.pipeline(transaction=False) as pipe:
            live.queue_bars(pipe, [bar])
            await stats.queue_seconds(  # (exchange:symbol, second, source offset)
                pipe, {("exchange1:BTCUSDT", old_minute_ms // 1000, 0): [1.0, 2.0, 3.0, 2.0]})
            await pipe.execute()
        for key, ttl_ms in (
                (bar_key(stack.name, "exchange1", "BTCUSDT", old_minute_ms), OPEN_BAR_TTL_MS),
                (seconds_key(stack.name, "exchange1", "BTCUSDT", old_minute_ms // MIN),
                 SECONDS_TTL_MS)):
            pttl = await r.pttl(key)
            assert 0 < pttl <= ttl_ms < DAY_MS, (key, pttl)
    finally:
        await r.aclose()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def test_the_leader_timer_of_a_worker_runs_the_cleanup(stack: Stack) -> None:
    database = Database(stack.dsn, pool_max=1)
    try:
        pool = await database.pool()
        now = _now_ms()
        async with pool.acquire() as conn:
            want = await _seed(conn, now, slack_ms=15 * MIN, repairing=False)
        w = stack.worker(MARKETFLOW_RETENTION__BARS_1M_DAYS=str(BARS_DAYS),
                         MARKETFLOW_RETENTION__GAPS_DAYS=str(GAPS_DAYS),
                         MARKETFLOW_RETENTION__BACKFILL_JOBS_DAYS=str(JOBS_DAYS),
                         MARKETFLOW_RETENTION__INTERVAL_S="1").start()
        await w.wait_ready()

        async def old_bars_gone() -> bool:
            w.assert_alive()
            async with pool.acquire() as conn:
                return not (await _bar_keys(conn) & want["gone"])

        await until(old_bars_gone, 60, "the worker's retention run", step=0.5)

        async def counted() -> str | None:
            status, text = await stack.http("/metrics")
            assert status == 200
            return text if _metric(text, 'marketflow_retention_runs_total{result="ok"}') >= 1 \
                else None

        text = await until(counted, 30, "a counted retention run", step=0.5)
        async with pool.acquire() as conn:
            await _assert_retained(conn, want)
        # every later run (each second) deletes nothing: the totals are the first run's
        assert _metric(text, "marketflow_retention_chunks_dropped_total") == len(
            want["old_days"])
        for table, n in (("bars_1m", len(want["gone"])), ("gaps", len(want["gaps_gone"])),
                         ("backfill_jobs", len(want["jobs_gone"]))):
            assert _metric(text, f'marketflow_retention_deleted_total{{table="{table}"}}') == n
        assert _metric(text, 'marketflow_retention_runs_total{result="error"}') == 0
        r = stack.redis()
        try:
            for symbol in want["gone_symbols"]:
                assert int(await r.get(ohlcv_gen_key(stack.name, symbol)) or 0) >= 1, symbol
        finally:
            await r.aclose()
        # the old range answers no bar (nothing stored, nothing cached)
        status, body = await stack.http(
            f"/ohlcv?symbol=ETHUSDT&exchange=exchange1&start={now - 6 * DAY_MS}"
            f"&end={want['cutoff'] - DAY_MS}")
        assert status == 200 and body["bars"] == [], body
        log = w.tail(400)
        assert re.search(r"retention: bars_1m: \d+ chunk\(s\) dropped", log), log[-3000:]
        assert w.stop() == 0, w.tail()
    finally:
        await database.on_stop()
