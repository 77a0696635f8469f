"""Gap detection and repair through the real worker: a feed outage creates a gap per pair
that is detected (``GET /gaps``) and repaired from a local CryptoCompare-format REST
server; plus the gap queries on a real database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from core.config import DEFAULT_PAIRS
from sql import gaps as gaps_sql
from sql.bars_1m import upsert_bars
from sql.migrate import apply_migrations
from tests.integration.conftest import Stack, until
from tests.support.history_server import HistoryServer, make_bars

pytestmark = pytest.mark.integration

MIN = 60_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _sleep_until_ms(t_ms: int) -> None:
    await asyncio.sleep(max(0.0, (t_ms - _now_ms()) / 1000))


async def test_feed_outage_creates_a_gap_that_is_detected_and_repaired(stack: Stack) -> None:
    start_s = _now_ms() // 1000 // 60 * 60 - 600
    async with HistoryServer() as hs:
        # the source knows exchange2's pairs from 10 minutes ago to 30 minutes ahead
        for p in DEFAULT_PAIRS:
            hs.bars[("exchange2", p[:-4], p[-4:])] = make_bars(start_s, 40, price=1000.0)
        emus = await stack.emulators(3, "--rate", "2")
        w = stack.worker(MARKETFLOW_HISTORY__SOURCE="cryptocompare",
                         MARKETFLOW_HISTORY__CRYPTOCOMPARE_URL=hs.url,
                         MARKETFLOW_HISTORY__GAP_SCAN_INTERVAL_S="1",
                         MARKETFLOW_HISTORY__REQUESTS_PER_S="50",
                         MARKETFLOW_HISTORY__ON_DEMAND="false").start()
        await w.wait_ready()
        assert (await stack.post("/mode/live"))[0] == 200
        r = stack.redis()
        keys = [f"{stack.name}:latest:exchange2:{p}" for p in DEFAULT_PAIRS]

        async def exchange2_prices() -> bool:
            return all(await asyncio.gather(*(r.exists(k) for k in keys)))

        await until(exchange2_prices, 30, "exchange2 prices in Redis", step=0.5)
        await r.aclose()
        # start the outage at least 10 s into a minute (so that minute has bars of ours)
        if _now_ms() % MIN < 10_000:
            await _sleep_until_ms(_now_ms() // MIN * MIN + 10_500)
        t0 = _now_ms()
        await emus[1].stop()
        first_minute = t0 // MIN * MIN           # partly ours: must stay untouched
        missed = first_minute + MIN              # missed entirely: must be repaired
        await _sleep_until_ms(missed + MIN + 2_000)
        w.assert_alive()
        before = {p: await stack.bars("exchange2", p) for p in DEFAULT_PAIRS}
        t1 = _now_ms()
        await emus[1].start()

        # detected: one feed_outage gap per pair of exchange2, [floor(t0), ceil(t1))
        async def gaps_of_exchange2() -> list[dict[str, Any]] | None:
            status, body = await stack.http("/gaps?exchange=exchange2")
            assert status == 200, body
            return body["gaps"] if len(body["gaps"]) == len(DEFAULT_PAIRS) else None

        gaps = await until(gaps_of_exchange2, 20, "5 gaps of exchange2", step=0.5)
        assert {g["symbol"] for g in gaps} == set(DEFAULT_PAIRS)
        for g in gaps:
            assert g["cause"] == "feed_outage", g
            assert g["start_ms"] == first_minute and g["end_ms"] == missed + 2 * MIN, (g, t1)
            assert g["minutes"] == 3 and g["start"].endswith(":00.000Z"), g
            assert g["state"] in ("open", "repairing", "repaired"), g

        # repaired from the REST source
        async def all_repaired() -> list[dict[str, Any]] | None:
            _, body = await stack.http("/gaps?exchange=exchange2&state=repaired")
            return body["gaps"] if len(body["gaps"]) == len(DEFAULT_PAIRS) else None

        repaired = await until(all_repaired, 45, "5 repaired gaps", step=0.5)
        assert all("filled from cryptocompare" in g["detail"] for g in repaired), repaired
        assert hs.data_requests(), "the REST source was never asked"

    # the missed minute now has the source's bar; the minutes we built are untouched
    source_bars = make_bars(start_s, 40, price=1000.0)
    for p in DEFAULT_PAIRS:
        after = await stack.bars("exchange2", p)
        assert missed not in before[p], p
        got = after[missed]
        want = source_bars[missed // 1000]
        assert got["source"] == "cryptocompare", (p, dict(got))
        assert (got["open"], got["high"], got["low"], got["close"], got["volume"]) == (
            want["open"], want["high"], want["low"], want["close"], want["volume"]), p
        assert first_minute in before[p], f"{p}: no bar of ours in the outage's first minute"
        for m, old in before[p].items():
            new = after[m]
            assert new["source"] == "ticks", (p, m, dict(new))
            assert (new["open"], new["high"], new["low"], new["close"],
                    new["trade_count"]) == (old["open"], old["high"], old["low"],
                                            old["close"], old["trade_count"]), (p, m)
    conn = await stack.db()
    try:
        others = await conn.fetchval(
            "SELECT count(*) FROM bars_1m WHERE source <> 'ticks' AND exchange <> 'exchange2'")
    finally:
        await conn.close()
    assert others == 0

    # the other exchanges had no gap; the scan recorded nothing for this outage
    _, body = await stack.http("/gaps")
    assert {(g["exchange"], g["cause"]) for g in body["gaps"]} == {("exchange2", "feed_outage")}

    async def health_gaps() -> dict[str, Any] | None:
        status, health = await stack.http("/health")
        assert status == 200, health
        gs = health["gaps"]
        return gs if gs and gs["counts"] == {"repaired": len(DEFAULT_PAIRS)} else None

    gs = await until(health_gaps, 10, "the gap job's status in /health", step=0.5)
    assert gs["source"] == "cryptocompare" and gs["state"] in ("idle", "scanning"), gs
    assert gs["last_scan_ms"] is not None and gs["open"] == 0, gs
    status, body = await stack.http("/gaps?state=fixed")
    assert status == 400 and body["error"]["param"] == "state", body
    assert w.stop() == 0, w.tail()


def _bar(exchange: str, symbol: str, start_ms: int) -> dict[str, Any]:
    return {"exchange": exchange, "symbol": symbol, "bucket_start_ms": start_ms,
            "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 1.0,
            "trade_count": 1, "avg_price": 1.0, "vwap": 1.0, "open_ts_ms": start_ms,
            "close_ts_ms": start_ms + 59_999}


async def test_gap_queries(stack: Stack) -> None:
    m0 = _now_ms() // MIN * MIN - 60 * MIN
    conn = await stack.db()
    try:
        await apply_migrations(conn)
        # A: bars at minutes 0, 1, 4, 20 (holes [2, 4) and [5, 20)); B: 0..3 (none);
        # C: only one bar (no hole); D: outside the horizon
        minutes = {("x", "A"): [0, 1, 4, 20], ("x", "B"): [0, 1, 2, 3], ("y", "C"): [7]}
        await upsert_bars(conn, [_bar(ex, sym, m0 + i * MIN)
                                 for (ex, sym), ms in minutes.items() for i in ms])
        await upsert_bars(conn, [_bar("x", "D", m0 - 3 * 24 * 60 * MIN),
                                 _bar("x", "D", m0 - 3 * 24 * 60 * MIN + 5 * MIN)])
        holes = await gaps_sql.missing_minutes(conn, m0 - 60 * MIN, m0 + 60 * MIN)
        assert holes == [("x", "A", m0 + 2 * MIN, m0 + 4 * MIN),
                         ("x", "A", m0 + 5 * MIN, m0 + 20 * MIN)]
        assert await gaps_sql.missing_sealed_minutes(conn, "x", "A", m0, m0 + 6 * MIN) == 3

        # outage gap: recorded, extended on the same start, never duplicated
        assert await gaps_sql.record_gap(conn, "x", "A", m0 + MIN, m0 + 3 * MIN,
                                         "feed_outage", "EOF")
        assert await gaps_sql.record_gap(conn, "x", "A", m0 + MIN, m0 + 5 * MIN,
                                         "feed_outage", None)
        # scan gaps overlapping a known gap are not recorded; others are
        assert not await gaps_sql.record_scan_gap(conn, "x", "A", m0 + 2 * MIN, m0 + 4 * MIN)
        assert await gaps_sql.record_scan_gap(conn, "x", "A", m0 + 5 * MIN, m0 + 20 * MIN,
                                              "15 minute(s) without bars")
        rows = await gaps_sql.list_gaps(conn, "x", "A", None, 10)
        assert [(g["start_ms"] - m0, g["end_ms"] - m0, g["cause"], g["state"]) for g in rows] \
            == [(5 * MIN, 20 * MIN, "scan", "open"), (MIN, 5 * MIN, "feed_outage", "open")]
        assert await gaps_sql.outage_intervals(conn, m0) == [("x", m0 + MIN, m0 + 5 * MIN)]

        # state transitions; a repairing gap is neither reopened nor listed as open
        await gaps_sql.set_state(conn, "x", "A", m0 + MIN, "repairing", None)
        assert not await gaps_sql.record_gap(conn, "x", "A", m0 + MIN, m0 + 6 * MIN,
                                             "feed_outage")
        assert [g["cause"] for g in await gaps_sql.open_gaps(conn, _now_ms() + 1, 10)] == [
            "scan"]
        assert await gaps_sql.count_by_state(conn) == {"open": 1, "repairing": 1}
        assert await gaps_sql.reset_repairing(conn) == 1
        await gaps_sql.set_state(conn, "x", "A", m0 + 5 * MIN, "unrepairable", "no data")
        assert await gaps_sql.count_by_state(conn) == {"open": 1, "unrepairable": 1}
        assert [g["state"] for g in await gaps_sql.list_gaps(conn, None, None,
                                                               "unrepairable", 10)] == [
            "unrepairable"]
        with pytest.raises(ValueError):
            await gaps_sql.set_state(conn, "x", "A", m0, "fixed", None)
        with pytest.raises(ValueError):
            await gaps_sql.record_gap(conn, "x", "A", m0, m0, "scan")
    finally:
        await conn.close()
