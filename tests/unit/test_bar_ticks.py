"""Stored bars -> deterministic ticks -> the window rules rebuild the same bar."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ReplayError
from feeds.replay.bar_ticks import bar_price_path, bar_to_ticks, split_volume
from tables.window import apply_tick, finalize_bar

B = 1_723_161_300_000  # a minute boundary


def rebuild(ticks: list) -> dict:
    bars: dict = {}
    for t in ticks:
        apply_tick(bars, t.price, t.qty, t.ts_ms, 0)
    assert len(bars) == 1, "all ticks in the bar's own minute"
    return finalize_bar("x", "y", next(iter(bars.values())))


#: prices as exchanges quote them: decimals of up to 8 places, 1e-8 .. 1e9
prices = st.integers(min_value=0, max_value=8).flatmap(
    lambda places: st.integers(min_value=1, max_value=10**9 * 10**places).map(
        lambda n: float(Decimal(n).scaleb(-places))))
#: bar volumes as stored: decimals of up to 12 places and 15 significant digits
volumes = st.one_of(
    st.just(Decimal(0)),
    st.integers(min_value=0, max_value=12).flatmap(
        lambda places: st.integers(min_value=1, max_value=10**15 - 1).map(
            lambda n: Decimal(n).scaleb(-places))))


@st.composite
def bars(draw: st.DrawFn) -> tuple[float, float, float, float, Decimal, int]:
    ps = sorted(draw(st.lists(prices, min_size=4, max_size=4)))
    low, high = ps[0], ps[3]
    open_, close = draw(st.permutations([ps[1], ps[2]]))
    if draw(st.booleans()):
        open_ = draw(st.sampled_from([low, high, open_]))
    if draw(st.booleans()):
        close = draw(st.sampled_from([low, high, close, open_]))
    count = draw(st.integers(min_value=0, max_value=3000))
    return open_, high, low, close, draw(volumes), count


@settings(max_examples=400, deadline=None)
@given(bars())
def test_rebuilt_bar_equals_the_stored_one(bar: tuple) -> None:
    open_, high, low, close, volume, count = bar
    ticks = bar_to_ticks("replay.binance", "BTCUSDT", B, open_, high, low, close, volume,
                         count)
    got = rebuild(ticks)
    assert (got["open"], got["high"], got["low"], got["close"]) == (open_, high, low, close)
    assert Decimal(got["volume"]) == volume  # exact, not approximately
    if count >= 4:
        assert got["trade_count"] == count
    assert got["trade_count"] == len(ticks) >= max(count, 1)
    assert got["open_ts_ms"] == B and got["close_ts_ms"] == (B + 59_999 if len(ticks) > 1
                                                              else B)
    assert all(t.source == "replay" and t.exchange == "replay.binance" for t in ticks)
    assert [t.ts_ms for t in ticks] == sorted(t.ts_ms for t in ticks)
    if volume > 0:
        assert all(t.qty > 0 for t in ticks)  # no qty 0: VWAP stays a real average
        assert got["vwap"] is not None
        assert low * (1 - 1e-9) <= float(got["vwap"]) <= high * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(volumes, st.integers(min_value=1, max_value=200_000))
def test_volume_split_sums_exactly_as_decimals(volume: Decimal, n: int) -> None:
    for given_as in (volume, str(volume), float(volume)):
        qtys = split_volume(given_as, n)
        assert len(qtys) == n
        # each quantity is read as its shortest decimal, as the aggregator does
        assert sum(Decimal(repr(q)) for q in qtys) == volume
        if volume:
            assert all(q > 0 for q in qtys)


def test_volume_split_refuses_what_it_cannot_split_exactly() -> None:
    with pytest.raises(ReplayError):
        split_volume("0.000000000000000001", 2)  # 18 places already: no smaller unit
    with pytest.raises(ReplayError):
        split_volume("-1", 2)
    with pytest.raises(ReplayError):
        split_volume("NaN", 2)
    with pytest.raises(ReplayError):
        split_volume(1.5, 0)


def test_real_bar_counts_every_trade_with_fillers_at_the_close() -> None:
    # up candle: open, low, high, then fillers at the close price, close last
    assert bar_price_path(10.0, 12.0, 9.0, 11.0, 6) == [10.0, 9.0, 12.0, 11.0, 11.0, 11.0]
    # down candle: high first
    assert bar_price_path(10.0, 12.0, 9.0, 9.5, 4) == [10.0, 12.0, 9.0, 9.5]
    # extremes equal to open/close are not repeated; count respected
    assert bar_price_path(9.0, 12.0, 9.0, 12.0, 2) == [9.0, 12.0]
    assert bar_price_path(5.0, 5.0, 5.0, 5.0, 1) == [5.0]


def test_more_trades_than_milliseconds_keeps_open_and_close() -> None:
    ticks = bar_to_ticks("e", "s", B, 10.0, 12.0, 9.0, 11.0, 3.5, 90_000)
    got = rebuild(ticks)
    assert (got["open"], got["high"], got["low"], got["close"], got["trade_count"],
            got["volume"]) == (10.0, 12.0, 9.0, 11.0, 90_000, "3.5")


@pytest.mark.parametrize("bad", [
    (10.0, 9.0, 8.0, 11.0),   # close above high
    (0.0, 1.0, 0.0, 1.0),     # price 0
    (math.nan, 1.0, 1.0, 1.0),
])
def test_inconsistent_bars_are_refused(bad: tuple) -> None:
    with pytest.raises(ReplayError):
        bar_to_ticks("e", "s", B, *bad, 1.0, 4)


def test_bucket_must_be_a_minute_boundary() -> None:
    with pytest.raises(ReplayError):
        bar_to_ticks("e", "s", B + 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1)
