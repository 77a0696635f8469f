"""The bar shape, the consolidation rule and series building (:mod:`query.series`).

The bar shape (:mod:`core.models`) is checked against the SQL generated from it. The
consolidation rule has one copy, :data:`sql.bars_1m.CONSOLIDATE_SQL`, and one test,
:func:`test_consolidation_rule`: it runs on the local TimescaleDB (a temporary
``bars_1m``, see ``tests/unit/bars_db.py``; the database must be running) against
:func:`_reference`, the rule written out plainly. The series tests use the same private
table with in-memory stand-ins for the Redis stores.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any, cast

import asyncpg
import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.models import (
    BAR_ALIASES,
    BAR_FIELDS,
    BAR_VALUES,
    CLOSED_BAR_FIELDS,
    closed_bar,
    iso_ms,
    ohlcv_bar,
)
from core.timeutil import MINUTE_MS
from query.series import (
    INTERVALS_MS,
    SeriesBuilder,
    canonical_pair,
    fill_previous,
    rows_to_bars,
)
from sql.bars_1m import BAR_JSON_SQL, fetch_rollup, fetch_rollup_json, fetch_rollup_live
from tests.unit.bars_db import dec_text, minute_bar, store, temp_bars_1m

MIN = MINUTE_MS
T0 = 1_723_075_200_000  # 2024-08-08T00:00:00Z, a day boundary
SYM = "TESTSYM"
HOUR = INTERVALS_MS["1h"]


# ---- the bar shape -----------------------------------------------------------------------


def test_bar_builders_follow_the_field_tuples() -> None:
    values = {f: float(i) for i, f in enumerate(BAR_VALUES)}
    bar = ohlcv_bar("ex", "S", T0, values, True)
    assert tuple(bar) == BAR_FIELDS
    assert bar["time"] == iso_ms(T0) == "2024-08-08T00:00:00.000Z"
    assert all(bar[alias] == bar[field] for alias, field in BAR_ALIASES.items())
    msg = closed_bar("ex", "S", T0, T0 + MIN, open=1.0, high=3.0, low=0.5, close=2.0,
                     volume="4", quote_volume="0", trade_count=5, avg_price=1.5, vwap=None,
                     open_ts_ms=T0,
                     close_ts_ms=T0 + 1)
    assert tuple(msg) == CLOSED_BAR_FIELDS
    assert all(msg[alias] == msg[field] for alias, field in BAR_ALIASES.items())
    # a live bar (closed-bar message + "closed") makes an /ohlcv bar
    assert tuple(ohlcv_bar(None, "S", T0, msg, False)) == BAR_FIELDS


def test_postgresql_bar_json_is_generated_from_the_shape() -> None:
    assert tuple(re.findall(r"(?:\(|, )'(\w+)', ", BAR_JSON_SQL)) == BAR_FIELDS
    assert "'min_price', low" in BAR_JSON_SQL and "'max_price', high" in BAR_JSON_SQL


def test_iso_ms() -> None:
    assert iso_ms(1_723_161_300_123) == "2024-08-08T23:55:00.123Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"


# ---- pure helpers -------------------------------------------------------------------------


def _bar(m: int, c: float, closed: bool = True) -> dict[str, Any]:
    return ohlcv_bar("x", SYM, m * MIN, {"open": c, "high": c, "low": c, "close": c,
                                          "volume": "1", "quote_volume": str(c),
                                          "trade_count": 3, "avg_price": c,
                                          "vwap": str(c)}, closed)


def test_fill_previous_flat_bars() -> None:
    out = fill_previous([_bar(1, 10.0), _bar(4, 12.0)], MIN, 6 * MIN)
    assert [b["bucket_start_ms"] // MIN for b in out] == [1, 2, 3, 4, 5]
    assert [(b["open"], b["close"], b["trade_count"], b["volume"]) for b in out] == [
        (10.0, 10.0, 3, "1"), (10.0, 10.0, 0, "0"), (10.0, 10.0, 0, "0"),
        (12.0, 12.0, 3, "1"), (12.0, 12.0, 0, "0")]
    flat = out[1]
    assert tuple(flat) == BAR_FIELDS and flat["time"] == iso_ms(2 * MIN)
    assert (flat["avg_price"], flat["vwap"], flat["min_price"], flat["max_price"]) == (
        None, None, 10.0, 10.0)
    assert fill_previous([], MIN, 10**9) == []


def test_rows_to_bars_closed_flag() -> None:
    row = {"b": datetime.fromtimestamp(T0 / 1000, tz=UTC),
           **{f: 1.0 for f in BAR_VALUES}}
    assert rows_to_bars([row], SYM, None, MIN, T0 + MIN)[0]["closed"] is True
    assert rows_to_bars([row], SYM, None, MIN, T0 + MIN - 1)[0]["closed"] is False
    assert rows_to_bars([{**row, "closed": False}], SYM, None, MIN, T0 + HOUR)[0][
        "closed"] is False


# ---- the consolidation rule (its one test) ------------------------------------------------


def _reference(bars: list[dict[str, Any]]) -> dict[str, Any]:
    """The consolidation rule, plainly: open of the earliest trade, close of the latest,
    high max, low min, volume and trade count summed, average price count-weighted, quote
    volume summed (None when a bar has none), VWAP = quote volume / volume over the bars
    that have a quote volume, rounded half-up to 16 places; decimals as served."""
    n = sum(b["trade_count"] for b in bars)
    with_quote = [b for b in bars if b["quote_volume"] is not None]
    with localcontext() as ctx:
        ctx.prec = 80  # the sums exact
        v = sum(Decimal(b["volume"]) for b in with_quote)
        q = sum(Decimal(b["quote_volume"]) for b in with_quote)
        volume = sum(Decimal(b["volume"]) for b in bars)
        vwap = (q / v).quantize(Decimal("1e-16"), ROUND_HALF_UP) if v else None
    return {
        "open": min(bars, key=lambda b: b["open_ts_ms"])["open"],
        "high": max(b["high"] for b in bars),
        "low": min(b["low"] for b in bars),
        "close": max(bars, key=lambda b: b["close_ts_ms"])["close"],
        "volume": dec_text(volume),
        "quote_volume": dec_text(q) if len(with_quote) == len(bars) else None,
        "trade_count": n,
        "avg_price": sum(b["avg_price"] * b["trade_count"] for b in bars) / n if n else None,
        "vwap": None if vwap is None else dec_text(vwap),
        "open_ts_ms": min(b["open_ts_ms"] for b in bars),
        "close_ts_ms": max(b["close_ts_ms"] for b in bars),
    }


def _check(row: Any, bars: list[dict[str, Any]]) -> None:
    want = _reference(bars)
    for field, value in want.items():
        if isinstance(value, float):
            assert row[field] == pytest.approx(value, rel=1e-12), field
        else:
            assert row[field] == value, field  # decimals exactly, as text


#: two exchanges, three minutes; ex2's minute 1 is a fetched (REST) bar without VWAP
#: but with volume, minute 2 of ex1 has no trade count (fetched) and opens earliest in
#: its minute though it is not the first exchange
STORED = [
    minute_bar("ex1", SYM, T0, open=10.0, high=12.0, low=9.0, close=11.0, volume=2.0,
               trade_count=4, avg_price=10.5, vwap=10.6, open_ts_ms=T0 + 5_000,
               close_ts_ms=T0 + 50_000),
    minute_bar("ex2", SYM, T0, open=10.2, high=12.5, low=9.5, close=11.2, volume=3.0,
               trade_count=6, avg_price=10.8, vwap=10.9, open_ts_ms=T0 + 1_000,
               close_ts_ms=T0 + 55_000),
    minute_bar("ex1", SYM, T0 + MIN, open=11.0, high=11.5, low=10.5, close=11.1,
               volume=1.5, trade_count=3, avg_price=11.0, vwap=11.05,
               open_ts_ms=T0 + MIN + 2_000, close_ts_ms=T0 + MIN + 59_000),
    minute_bar("ex2", SYM, T0 + MIN, open=11.3, high=11.9, low=10.9, close=11.4,
               volume=7.0, trade_count=9, avg_price=11.3, vwap=None,
               open_ts_ms=T0 + MIN + 3_000, close_ts_ms=T0 + MIN + 58_000),
    minute_bar("ex1", SYM, T0 + 2 * MIN, open=11.1, high=11.2, low=10.8, close=10.9,
               volume=0.5, trade_count=0, avg_price=11.0, vwap=11.0,
               open_ts_ms=T0 + 2 * MIN, close_ts_ms=T0 + 2 * MIN + 59_999),
]
#: live bars: ex1 minute 1 is stored already (the stored row wins), minute 3 is open
LIVE = [
    {**minute_bar("ex1", SYM, T0 + MIN, open=99.0, high=99.0, low=1.0, close=99.0,
                  trade_count=100), "closed": True},
    {**minute_bar("ex2", SYM, T0 + 2 * MIN, open=10.7, high=13.0, low=10.0, close=12.9,
                  volume=4.0, trade_count=8, avg_price=11.9, vwap=12.1,
                  open_ts_ms=T0 + 2 * MIN + 10_000, close_ts_ms=T0 + 2 * MIN + 40_000),
     "closed": True},
    {**minute_bar("ex1", SYM, T0 + 3 * MIN, open=12.0, high=12.2, low=11.8, close=12.1,
                  volume=1.0, trade_count=2, avg_price=12.0, vwap=12.05,
                  open_ts_ms=T0 + 3 * MIN + 1_000, close_ts_ms=T0 + 3 * MIN + 2_000),
     "closed": False},
]


async def test_consolidation_rule() -> None:
    async with temp_bars_1m() as conn:
        await store(conn, STORED)
        end = T0 + 4 * MIN
        # stored bars: per minute across exchanges, per hour, per exchange
        rows = await fetch_rollup(conn, SYM, None, T0, end, MIN, 100)
        assert [int(r["b"].timestamp() * 1000) for r in rows] == [T0, T0 + MIN, T0 + 2 * MIN]
        for r, m in zip(rows, range(3), strict=True):
            _check(r, [b for b in STORED if b["bucket_start_ms"] == T0 + m * MIN])
        (hour,) = await fetch_rollup(conn, SYM, None, T0, end, HOUR, 100)
        _check(hour, STORED)
        (ex2,) = await fetch_rollup(conn, SYM, "ex2", T0, end, HOUR, 100)
        _check(ex2, [b for b in STORED if b["exchange"] == "ex2"])
        # stored plus live: a live minute that is stored counts once, from the database
        counted = [*STORED, LIVE[1], LIVE[2]]
        (hour,) = await fetch_rollup_live(conn, SYM, None, T0, end, HOUR, 100, LIVE)
        _check(hour, counted)
        assert (hour["closed"], hour["live_minutes"]) == (False, 2)
        rows = await fetch_rollup_live(conn, SYM, None, T0, end, MIN, 100, LIVE)
        assert [(r["closed"], r["live_minutes"]) for r in rows] == [
            (True, 0), (True, 0), (True, 1), (False, 1)]
        for r, m in zip(rows, range(4), strict=True):
            _check(r, [b for b in counted if b["bucket_start_ms"] == T0 + m * MIN])
        # the JSON serialised by PostgreSQL equals the bars built in Python
        for exchange in (None, "ex1"):
            for iv in (MIN, HOUR):
                blob = await fetch_rollup_json(conn, SYM, exchange, T0, end, iv, 100)
                rows = await fetch_rollup(conn, SYM, exchange, T0, end, iv, 100)
                assert orjson.loads(blob) == rows_to_bars(rows, SYM, exchange, iv, 2 * end)
        assert await fetch_rollup_json(conn, "NOPE", None, T0, end, MIN, 100) == b"[]"


# ---- series building ----------------------------------------------------------------------


class _Pool:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    def request(self) -> _Acquired:
        return _Acquired(self.conn)


class _Acquired:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> asyncpg.Connection:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


class _LiveBars:
    """In-memory :meth:`stores.latest.LatestPrices.live_bars`."""

    def __init__(self, bars: list[dict[str, Any]], fail: bool = False) -> None:
        self.bars = bars
        self.fail = fail
        self.calls = 0

    async def live_bars(self, symbol: str, exchange: str | None, start_ms: int, end_ms: int
                        ) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail:
            raise RedisConnectionError("down")
        return [b for b in self.bars if b["symbol"] == symbol
                and (exchange is None or b["exchange"] == exchange)
                and start_ms <= b["bucket_start_ms"] < end_ms]


class _Cache:
    """In-memory :class:`stores.ohlcv_cache.OhlcvCache`."""

    prefix = "t"

    def __init__(self) -> None:
        self.entries: dict[str, tuple[dict[str, Any] | None, bytes]] = {}
        self.hits = 0

    async def generation(self, symbol: str) -> int | None:
        return 0

    async def get(self, key: str) -> tuple[dict[str, Any] | None, bytes] | None:
        hit = self.entries.get(key)
        self.hits += hit is not None
        return hit

    async def put(self, key: str, last_bar: dict[str, Any] | None, blob: bytes) -> None:
        self.entries[key] = (last_bar, blob)


#: the wall clock of the series tests: 30 minutes and 10 s into the day, so with a grace
#: of 5 s the live window starts at minute 25 (sealed: minutes 0..24)
NOW = T0 + 30 * MIN + 10_000


def _series_data() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stored minutes 0..27 of ex1 and 10..26 of ex2; live minutes 26..30 of ex1 (26 and
    27 stored meanwhile; 30 open) and 29 of ex2."""
    stored = [minute_bar("ex1", SYM, T0 + m * MIN, close=100.0 + m) for m in range(28)]
    stored += [minute_bar("ex2", SYM, T0 + m * MIN, close=200.0 + m) for m in range(10, 27)]
    live = [{**minute_bar("ex1", SYM, T0 + m * MIN, close=300.0 + m), "closed": m < 30}
            for m in range(26, 31)]
    live.append({**minute_bar("ex2", SYM, T0 + 29 * MIN, close=400.0), "closed": True})
    return stored, live


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    async with temp_bars_1m() as conn:
        stored, _ = _series_data()
        await store(conn, stored)
        yield conn


def _builder(conn: asyncpg.Connection, live: _LiveBars, cache: _Cache,
             local_live: Any = None) -> SeriesBuilder:
    return SeriesBuilder(cast(Any, _Pool(conn)), cast(Any, live), cast(Any, cache),
                         grace_ms=5_000, max_future_ms=300_000, local_live=local_live)


async def test_ohlcv_joins_sealed_stored_and_live_minutes(db: asyncpg.Connection) -> None:
    _, live_bars = _series_data()
    live, cache = _LiveBars(live_bars), _Cache()
    builder = _builder(db, live, cache)
    series = await builder.ohlcv(SYM, "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    bars = orjson.loads(series.bars_json)
    assert series.known and series.history is None
    assert [b["bucket_start_ms"] for b in bars] == [T0 + m * MIN for m in range(31)]
    assert all(tuple(b) == BAR_FIELDS for b in bars)
    # stored minutes from the database (26, 27 too), the newer ones from the live bars
    assert [b["close"] for b in bars] == [100.0 + m for m in range(28)] + [328.0, 329.0, 330.0]
    assert [b["closed"] for b in bars] == [True] * 30 + [False]
    assert {b["exchange"] for b in bars} == {"ex1"}
    again = await builder.ohlcv(SYM, "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    assert cache.hits == 1 and again.bars_json == series.bars_json
    # consolidated, hourly: one open bucket holding every minute once
    series = await builder.ohlcv(SYM, None, T0, T0 + HOUR, "1h", "none", NOW)
    (hour,) = orjson.loads(series.bars_json)
    assert hour["exchange"] is None and hour["closed"] is False
    assert hour["trade_count"] == 28 + 17 + 3 + 1
    assert hour["close"] == 330.0 and hour["open"] == 100.0


async def test_ohlcv_fill_previous_continues_after_the_sealed_part(
        db: asyncpg.Connection) -> None:
    builder = _builder(db, _LiveBars([]), _Cache())
    series = await builder.ohlcv(SYM, "ex2", T0, T0 + 40 * MIN, "1m", "previous", NOW)
    bars = orjson.loads(series.bars_json)
    # ex2 traded in minutes 10..26: flat bars follow up to the current minute
    assert [b["bucket_start_ms"] for b in bars] == [T0 + m * MIN for m in range(10, 31)]
    assert [b["trade_count"] for b in bars] == [1] * 17 + [0] * 4
    assert {b["close"] for b in bars[17:]} == {226.0}
    assert all(tuple(b) == BAR_FIELDS for b in bars)


async def test_ohlcv_unknown_symbol_and_redis_down(db: asyncpg.Connection) -> None:
    builder = _builder(db, _LiveBars([]), _Cache())
    series = await builder.ohlcv("NOPE", None, T0, T0 + 40 * MIN, "1m", "none", NOW)
    assert (series.bars_json, series.known) == (b"[]", False)
    # Redis down: stored bars, plus the open minutes the worker's own window state holds
    # (here ex1's minute 30 only: ex2's partition is another worker's), flagged degraded
    _, live_bars = _series_data()
    asked: list[tuple[str, str | None, int, int]] = []

    def local_live(symbol: str, exchange: str | None, lo: int, hi: int) -> list[Any]:
        asked.append((symbol, exchange, lo, hi))
        return [b for b in live_bars if b["exchange"] == "ex1" and not b["closed"]
                and lo <= b["bucket_start_ms"] < hi]

    down = _builder(db, _LiveBars([], fail=True), _Cache(), local_live)
    series = await down.ohlcv(SYM, "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    bars = orjson.loads(series.bars_json)
    assert down.degraded and asked and asked[0][:2] == (SYM, "ex1")
    assert [b["close"] for b in bars] == [100.0 + m for m in range(28)] + [330.0]
    assert [b["closed"] for b in bars] == [True] * 28 + [False]
    no_state = _builder(db, _LiveBars([], fail=True), _Cache())
    series = await no_state.ohlcv(SYM, "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    assert no_state.degraded and len(orjson.loads(series.bars_json)) == 28
    # a range that ends before the live window never reads Redis
    sealed_only = _builder(db, _LiveBars([], fail=True), _Cache())
    sealed = await sealed_only.ohlcv(SYM, None, T0, T0 + 20 * MIN, "1m", "none", NOW)
    assert len(orjson.loads(sealed.bars_json)) == 20 and not sealed_only.degraded


async def test_udf_history_countback_and_no_data(db: asyncpg.Connection) -> None:
    _, live_bars = _series_data()
    builder = _builder(db, _LiveBars(live_bars), _Cache())
    to_s = (T0 + 40 * MIN) // 1000
    hb = await builder.history(db, SYM, "ex1", MIN, 0, to_s, 3, NOW)
    assert [b["close"] for b in hb.bars] == [328.0, 329.0, 330.0]
    hb = await builder.history(db, SYM, "ex2", MIN, (T0 + 27 * MIN) // 1000,
                               (T0 + 28 * MIN) // 1000, None, NOW)
    assert (hb.bars, hb.newest_before_ms, hb.known) == ([], T0 + 26 * MIN, True)
    hb = await builder.history(db, SYM, "ex2", MIN, 0, (T0 + 5 * MIN) // 1000, None, NOW)
    assert (hb.bars, hb.newest_before_ms, hb.known) == ([], None, True)
    hb = await builder.history(db, "NOPE", None, MIN, 0, to_s, None, NOW)
    assert (hb.bars, hb.known) == ([], False)
    assert await canonical_pair(db, "EX1", "testsym") == ("ex1", SYM)
    assert await canonical_pair(db, None, "testsym") == (None, SYM)
    assert await canonical_pair(db, None, "nope") is None


class _OnDemand:
    """In-memory :class:`feeds.history.on_demand.OnDemandHistory` (ask, wait)."""

    def __init__(self, final: dict[str, Any] | None, fail: bool = False) -> None:
        self.final = final
        self.fail = fail
        self.asked: list[tuple[str, str, int, int]] = []
        self.waited: list[tuple[str, float]] = []

    async def ask(self, exchange: str, symbol: str, start_ms: int, end_ms: int
                  ) -> tuple[str, dict[str, Any]]:
        if self.fail:
            raise RedisConnectionError("down")
        self.asked.append((exchange, symbol, start_ms, end_ms))
        return "req", {"request_id": "req", "state": "requested"}

    async def wait_for_request(self, req_id: str, timeout_s: float) -> dict[str, Any] | None:
        self.waited.append((req_id, timeout_s))
        return self.final


async def test_ohlcv_asks_for_missing_history(db: asyncpg.Connection) -> None:
    def builder(on_demand: _OnDemand) -> SeriesBuilder:
        return SeriesBuilder(cast(Any, _Pool(db)), cast(Any, _LiveBars([])), cast(Any, _Cache()),
                             grace_ms=5_000, max_future_ms=300_000,
                             on_demand=cast(Any, on_demand), on_demand_wait_s=1.5)

    # ex2 has bars from minute 10 on: minutes before that are asked for, then waited for
    done = {"request_id": "req", "state": "done", "bars": 3, "error": None}
    od = _OnDemand(done)
    series = await builder(od).ohlcv(SYM, "ex2", T0 - HOUR, T0 + 40 * MIN, "1m", "none", NOW)
    assert od.asked == [("ex2", SYM, T0 - HOUR, T0 + 10 * MIN)]
    assert od.waited == [("req", 1.5)] and series.history == done and series.known
    # stored bars reach back to the start (within an interval): nothing is asked
    od = _OnDemand(done)
    series = await builder(od).ohlcv(SYM, "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    assert od.asked == [] and series.history is None
    # an unknown pair: the whole sealed part is asked for; the state is handed back
    od = _OnDemand({"request_id": "req", "state": "error", "error": "boom"})
    series = await builder(od).ohlcv("NOPE", "ex1", T0, T0 + 40 * MIN, "1m", "none", NOW)
    assert od.asked == [("ex1", "NOPE", T0, T0 + 25 * MIN)]
    assert series.known is False and series.history is not None
    assert series.history["state"] == "error"
    # Redis down: no on-demand fetch, the stored bars come back, flagged degraded
    down = builder(_OnDemand(None, fail=True))
    series = await down.ohlcv(SYM, "ex2", T0 - HOUR, T0 + 40 * MIN, "1m", "none", NOW)
    assert down.degraded and series.history is None and series.known
    assert len(orjson.loads(series.bars_json)) == 17
