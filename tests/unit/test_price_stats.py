"""Price statistics from per-second aggregates equal brute force over the ticks, and the
price queries (:class:`query.prices.PriceQueries`: Redis first, the stored bars as the
fallback) over in-memory Redis stand-ins and a private ``bars_1m``
(``tests/unit/bars_db.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from core.errors import QueryError, StorageUnavailable
from core.models import Tick
from query.price_stats import (
    combine,
    parse_period_s,
    per_second,
    per_second_columns,
    seconds_in_period,
    select,
    stats,
)
from query.prices import PriceQueries
from tests.unit.bars_db import minute_bar, store, temp_bars_1m

NOW_MS = 1_732_170_000_500

ticks_st = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), st.integers(-400_000, 0),
              st.floats(0.001, 1e6, allow_nan=False, allow_infinity=False)),
    max_size=200)


@settings(max_examples=300, deadline=None)
@given(ticks_st, st.sampled_from([1, 3, 5, 10, 30, 60, 180, 300]),
       st.sampled_from([None, "a", "b"]))
def test_stats_equal_brute_force(raw: list[tuple[str, int, float]], period_s: int,
                                 exchange: str | None) -> None:
    ticks = [Tick(ex, "BTCUSDT", p, 0.0, NOW_MS + dt, None, "test") for ex, dt, p in raw]
    buckets = per_second(ticks)
    first_s, last_s = seconds_in_period(NOW_MS, period_s)
    aggs = [a for (key, s), a in buckets.items()
            if first_s <= s <= last_s and (exchange is None or key == f"{exchange}:BTCUSDT")]
    got = stats(aggs)
    lo_ms, hi_ms = first_s * 1000, last_s * 1000 + 999  # the documented bounds
    prices = [t.price for t in ticks if lo_ms <= t.ts_ms <= hi_ms
              and (exchange is None or t.exchange == exchange)]
    if not prices:
        assert got is None
        return
    assert got is not None
    high, low, avg, n = got
    assert (high, low, n) == (max(prices), min(prices), len(prices))
    assert avg == pytest.approx(sum(prices) / len(prices), rel=1e-12)


@given(ticks_st)
def test_combine_is_associative_with_per_second(raw: list[tuple[str, int, float]]) -> None:
    ticks = [Tick(ex, "X" if p < 500 else "Y", p, 0.0, NOW_MS + dt, None, "test")
             for ex, dt, p in raw]
    half = len(ticks) // 2
    a, b = per_second(ticks[:half]), per_second(ticks[half:])
    merged = dict(a)
    for k, v in b.items():
        merged[k] = combine(merged[k], v) if k in merged else v
    whole = per_second(ticks)
    assert set(merged) == set(whole)
    counts: dict[tuple[str, int], float] = {}
    for t in ticks:  # brute force: the key and second of every tick
        k = (f"{t.exchange}:{t.symbol}", t.ts_ms // 1000)
        counts[k] = counts.get(k, 0.0) + 1
    assert {k: v[3] for k, v in whole.items()} == counts
    for k in whole:
        assert merged[k][:2] == whole[k][:2] and merged[k][3] == whole[k][3]
        assert merged[k][2] == pytest.approx(whole[k][2], rel=1e-12)


def test_periods() -> None:
    assert [parse_period_s(p) for p in ("1s", "3s", "5s", "10s", "30s", "1m", "3m", "5m",
                                        "15m", "1h", "24h", "7d")] == [
        1, 3, 5, 10, 30, 60, 180, 300, 900, 3600, 86_400, 604_800]
    for bad in ("", "0s", "5", "5x", "-1m", "1.5m", "32d", "m"):
        with pytest.raises(QueryError):
            parse_period_s(bad)
    assert select({1: [1, 1, 1, 1], 5: [2, 2, 2, 1]}, 2, 5) == [[2, 2, 2, 1]]


# ---- PriceQueries ------------------------------------------------------------------------

MIN_MS = 60_000
#: start of NOW_MS's minute (the stored bars lie 20 and 60 minutes before it)
T_NOW_MIN = NOW_MS - NOW_MS % MIN_MS


class _Latest:
    """In-memory latest prices and per-second aggregates (or a Redis outage)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seconds_asked: list[tuple[int, int]] = []

    async def get(self, symbol: str, exchange: str | None = None) -> dict[str, Any] | None:
        if self.fail:
            raise RedisConnectionError("down")
        if symbol != "BTCUSDT":
            return None
        return {"price": 5.0, "ts_ms": NOW_MS - 10, "exchange": exchange or "ex1"}

    async def seconds(self, symbol: str, exchange: str | None, first_s: int, last_s: int
                      ) -> list[list[float]] | None:
        if self.fail:
            raise RedisConnectionError("down")
        self.seconds_asked.append((first_s, last_s))
        if symbol != "BTCUSDT":
            return None
        return [[4.0, 6.0, 10.0, 2.0]]  # two ticks, 4 and 6, in the last second


class _Redis:
    """The replay state key only."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state

    async def get(self, key: str) -> bytes | None:
        return orjson.dumps(self.state) if self.state else None


class _Pool:
    """Stands in for :class:`sql.pool.Database` (``request()``: a connection, or OSError
    when the database is down)."""

    def __init__(self, conn: asyncpg.Connection | None) -> None:
        self.conn = conn

    def request(self) -> _Pool:
        return self

    async def __aenter__(self) -> asyncpg.Connection:
        if self.conn is None:
            raise OSError("database down")
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


def _queries(conn: asyncpg.Connection | None, latest: _Latest,
             redis: _Redis | None = None) -> PriceQueries:
    return PriceQueries(cast(Any, _Pool(conn)), cast(Any, latest), cast(Any, latest),
                        cast(Any, redis or _Redis()), "t")


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    async with temp_bars_1m() as conn:
        await store(conn, [
            minute_bar("ex1", "BTCUSDT", T_NOW_MIN - 20 * MIN_MS, high=9.0, low=1.0,
                       avg_price=3.0, trade_count=3, close=2.5),
            minute_bar("ex2", "BTCUSDT", T_NOW_MIN - 60 * MIN_MS, high=8.0, low=2.0,
                       avg_price=5.0, trade_count=1, close=7.5)])
        yield conn


async def test_latest_from_redis_then_the_database(db: asyncpg.Connection) -> None:
    got = await _queries(db, _Latest()).latest("BTCUSDT", "ex2")
    assert got is not None and (got.exchange, got.price, got.source, got.degraded) == (
        "ex2", 5.0, "redis", False)
    got = await _queries(db, _Latest(fail=True)).latest("BTCUSDT", None)
    assert got is not None and (got.exchange, got.price, got.source, got.degraded) == (
        "ex1", 2.5, "database", True)
    assert await _queries(db, _Latest(fail=True)).latest("NOPE", None) is None
    with pytest.raises(StorageUnavailable,
                       match=r"^redis and database unavailable: ConnectionError, OSError$"):
        await _queries(None, _Latest(fail=True)).latest("BTCUSDT", None)


async def test_period_stats_redis_minutes_and_fallback(db: asyncpg.Connection) -> None:
    short = await _queries(db, _Latest()).period_stats("BTCUSDT", None, 60, NOW_MS)
    assert (short.known, short.highest, short.lowest, short.average, short.count,
            short.granularity, short.degraded) == (True, 6.0, 4.0, 5.0, 2, "second", False)
    assert (short.first_s, short.last_s) == seconds_in_period(NOW_MS, 60)
    # a day: the stored bars before the per-second coverage plus the seconds after it
    day = await _queries(db, _Latest()).period_stats("BTCUSDT", None, 86_400, NOW_MS)
    assert (day.highest, day.lowest, day.count, day.granularity) == (9.0, 1.0, 2 + 3 + 1,
                                                                     "minute")
    assert day.average == pytest.approx((10.0 + 9.0 + 5.0) / 6)
    assert day.first_s % 60 == 0
    # Redis down: the stored bars alone
    down = await _queries(db, _Latest(fail=True)).period_stats("BTCUSDT", "ex1", 3600, NOW_MS)
    assert (down.highest, down.lowest, down.count, down.granularity, down.degraded) == (
        9.0, 1.0, 3, "minute", True)
    quiet = await _queries(db, _Latest(fail=True)).period_stats("BTCUSDT", "ex1", 60, NOW_MS)
    assert (quiet.known, quiet.highest, quiet.count) == (True, None, 0)
    unknown = await _queries(db, _Latest()).period_stats("NOPE", None, 86_400, NOW_MS)
    assert unknown.known is False
    with pytest.raises(StorageUnavailable, match=r"^database unavailable: OSError$"):
        await _queries(None, _Latest()).period_stats("BTCUSDT", None, 86_400, NOW_MS)
    with pytest.raises(StorageUnavailable, match=r"^redis and database unavailable: OSError$"):
        await _queries(None, _Latest(fail=True)).period_stats("BTCUSDT", None, 60, NOW_MS)


async def test_period_stats_follow_a_replay_clock(db: asyncpg.Connection) -> None:
    replay_ms = NOW_MS - 86_400_000
    latest = _Latest()
    redis = _Redis({"state": "running", "namespace": "replay", "clock_ms": replay_ms})
    got = await _queries(db, latest, redis).period_stats("BTCUSDT", "replay.ex1", 60, NOW_MS,
                                                         replayed=True)
    assert (got.first_s, got.last_s) == seconds_in_period(replay_ms, 60)
    got = await _queries(db, latest, redis).period_stats("BTCUSDT", "ex1", 60, NOW_MS)
    assert (got.first_s, got.last_s) == seconds_in_period(NOW_MS, 60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 0, 1, 250, 999, 1000, 3500, -700]),
                          st.floats(0.001, 1e6, allow_nan=False, allow_infinity=False)),
                min_size=1, max_size=300))
def test_per_second_columns_equals_per_second(raw: list[tuple[int, float]]) -> None:
    """Bit for bit (reprs), in order and out of order."""
    ts = NOW_MS
    ticks = []
    for step, p in raw:
        ts += step
        ticks.append(Tick("ex", "BTCUSDT", p, 0.0, ts, None, "test"))
    got = per_second_columns("ex:BTCUSDT", [t.ts_ms for t in ticks], [t.price for t in ticks])
    assert repr(got) == repr(per_second(ticks))
