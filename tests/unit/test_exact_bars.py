"""Exact volume, quote volume and VWAP in the windows (:mod:`tables.window`,
:mod:`tables.aggregator`): decimal sums to the last place, through the changelog too."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from core.models import Tick
from tables.aggregator import WindowAggregator
from tables.window import apply_tick, encode_state, finalize_bar, restore_state

MIN = 60_000
T0 = 1_723_161_300_000


def dec(places_max: int, digits_max: int) -> st.SearchStrategy[str]:
    """Decimal strings as exchanges send them: up to ``places_max`` places and
    ``digits_max`` significant digits, > 0."""
    return st.integers(min_value=0, max_value=places_max).flatmap(
        lambda places: st.integers(min_value=1, max_value=10**digits_max - 1).map(
            lambda n: str(Decimal(n).scaleb(-places))))


def expected(trades: list[tuple[str, str]]) -> tuple[str, str, str | None]:
    """(volume, quote volume, vwap) of ``trades`` (price, qty strings) by Decimal, at a
    precision (100 digits) where the sums are exact."""
    with localcontext() as ctx:
        ctx.prec = 100
        v = sum((Decimal(q) for _, q in trades), Decimal(0))
        pq = sum((Decimal(p) * Decimal(q) for p, q in trades), Decimal(0))
        vwap = (pq / v).quantize(Decimal("1e-16"), ROUND_HALF_UP) if v else None
    return (plain(v), plain(pq), None if vwap is None else plain(vwap))


def plain(d: Decimal) -> str:
    """``d`` plain, without trailing zeros (normalize rounds to the context precision)."""
    with localcontext() as ctx:
        ctx.prec = 100
        return format(d.normalize(), "f") if d else "0"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(dec(8, 15), dec(12, 15)), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=7))
def test_bar_sums_are_the_decimal_sums(trades: list[tuple[str, str]], batch: int) -> None:
    agg = WindowAggregator({}, grace_ms=1_000, idle_timeout_ms=1)
    ticks = [Tick("ex", "S", float(p), float(q), T0 + i, None, "test")
             for i, (p, q) in enumerate(trades)]
    for off, i in enumerate(range(0, len(ticks), batch)):
        agg.process_ticks(0, off, ticks[i:i + batch], 1)
    (bar,) = agg.process_idle(0, T0 + 10 * MIN).closed
    assert (bar["volume"], bar["quote_volume"], bar["vwap"]) == expected(trades)


def test_a_tick_with_more_places_rescales_the_bar() -> None:
    bars: dict[str, Any] = {}
    apply_tick(bars, 61000.5, 0.00000001, T0, 0)           # scale 8
    apply_tick(bars, 61000.25, 0.000000000123, T0 + 1, 0)  # needs 12
    apply_tick(bars, 0.0000000000001, 3.0, T0 + 2, 0)      # a price of 13 places
    bar = finalize_bar("ex", "S", bars[str(T0)])
    assert bars[str(T0)]["e"] == 13
    assert (bar["volume"], bar["quote_volume"], bar["vwap"]) == expected(
        [("61000.5", "0.00000001"), ("61000.25", "0.000000000123"),
         ("0.0000000000001", "3")])


def test_a_value_beyond_18_places_is_reported_and_changes_nothing() -> None:
    agg = WindowAggregator({}, grace_ms=1_000, idle_timeout_ms=1)
    bad = Tick("ex", "S", 100.0, 1e-20, T0 + 1, "2", "test")
    res = agg.process_ticks(0, 0, [Tick("ex", "S", 100.0, 1.5, T0, "1", "test"), bad,
                                   Tick("ex", "S", 101.0, 0.5, T0 + 2, "3", "test")], 1)
    assert [(t, e.reason) for t, e in res.invalid] == [(bad, "bad_decimal")]
    assert res.applied == 2
    bar = agg.store["ex:S"]["bars"][str(T0)]
    assert bar["n"] == 2 and bar["ids"]["r"] == [1, 1, 3, 3]  # the bad id not recorded
    # a new bar's first tick too
    res = agg.process_ticks(0, 1, [Tick("ex", "S", 1e-19, 1.0, T0 + MIN, None, "test")], 1)
    assert len(res.invalid) == 1 and str(T0 + MIN) not in agg.store["ex:S"]["bars"]


def test_sums_beyond_64_bits_survive_the_changelog() -> None:
    store: dict[str, Any] = {}
    agg = WindowAggregator(store, grace_ms=1_000, idle_timeout_ms=1)
    trades = [("105433.6", "12345.12345678"), ("105410.1", "0.00005")]
    agg.process_ticks(0, 0, [Tick("ex", "S", float(p), float(q), T0 + i, None, "test")
                             for i, (p, q) in enumerate(trades)], 1)
    assert store["ex:S"]["bars"][str(T0)]["pq"] > 2**64
    record = encode_state(store["ex:S"])
    back = {"ex:S": orjson.loads(record)}  # as Faust reads the changelog (orjson)
    assert isinstance(back["ex:S"]["bars"][str(T0)]["pq"], str)
    more = ("105400.9", "1.1")
    b = WindowAggregator(back, grace_ms=1_000, idle_timeout_ms=1)
    b.process_ticks(0, 1, [Tick("ex", "S", float(more[0]), float(more[1]), T0 + 5, None,
                                "test")], 1)
    (bar,) = b.process_idle(0, T0 + 10 * MIN).closed
    assert (bar["volume"], bar["quote_volume"], bar["vwap"]) == expected([*trades, more])


def test_a_state_from_before_the_exact_sums_is_converted() -> None:
    old = {"p": 0, "off": 3, "max_ts": T0, "seen_ms": 1, "closed": -1, "bars": {str(T0): {
        "b": T0, "o": 10.0, "o_ts": T0, "h": 10.0, "l": 10.0, "c": 10.0, "c_ts": T0,
        "v": 0.30000000000000004, "n": 3, "ps": 30.0, "pq": 3.0000000000000004,
        "first_ms": 1}}}
    restore_state(old)
    bar = old["bars"][str(T0)]
    assert (bar["e"], bar["v"]) == (8, 30_000_000)
    assert abs(bar["pq"] - 3 * 10**16) <= 8  # the float sum's own error, at scale 16
    assert finalize_bar("ex", "S", bar)["volume"] == "0.3"
