"""Price statistics from per-second aggregates equal brute force over the ticks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import QueryError
from core.models import Tick
from query.price_stats import (
    combine,
    parse_period_s,
    per_second,
    seconds_in_period,
    select,
    stats,
)

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
    ticks = [Tick(ex, "X", p, 0.0, NOW_MS + dt, None, "test") for ex, dt, p in raw]
    half = len(ticks) // 2
    a, b = per_second(ticks[:half]), per_second(ticks[half:])
    merged = dict(a)
    for k, v in b.items():
        merged[k] = combine(merged[k], v) if k in merged else v
    whole = per_second(ticks)
    assert set(merged) == set(whole)
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
