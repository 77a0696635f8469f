"""core.decimals: scaled-integer sums equal decimal arithmetic on the exchanges' strings."""

from __future__ import annotations

import csv
from decimal import Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.decimals import (
    DEFAULT_SCALE,
    MAX_SCALE,
    VWAP_PLACES,
    exact_places,
    format_scaled,
    scaled,
    scaled_all,
    to_scaled,
    vwap_string,
)
from core.errors import InvalidTick

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
TRADES = "binance_spot_btcusdt_2020-09-27_trades.csv"
KLINES = "binance_spot_btcusdt_2020-09-27_klines_1m.csv"


@st.composite
def decimal_strings(draw: st.DrawFn, max_places: int = 8) -> str:
    """Exchange-style decimal strings: at most 15 significant digits."""
    places = draw(st.integers(0, max_places))
    digits = draw(st.integers(1, 15))
    n = draw(st.integers(0, 10**digits - 1))
    s = str(n).rjust(places + 1, "0")
    return f"{s[:-places]}.{s[-places:]}" if places else s


@given(decimal_strings())
def test_scaled_recovers_the_exchange_decimal(s: str) -> None:
    want = int(Decimal(s).scaleb(DEFAULT_SCALE))
    n, e = to_scaled(float(s), DEFAULT_SCALE)
    assert Decimal(n).scaleb(-e) == Decimal(s)
    if want < 2**50:
        assert scaled(float(s), DEFAULT_SCALE) == want


@given(decimal_strings(max_places=MAX_SCALE))
def test_more_places_raise_the_scale(s: str) -> None:
    n, e = to_scaled(float(s), DEFAULT_SCALE)
    assert e >= DEFAULT_SCALE
    assert Decimal(n).scaleb(-e) == Decimal(s)


@given(st.lists(decimal_strings(), min_size=1, max_size=200))
def test_sums_are_exact(values: list[str]) -> None:
    total = 0
    for s in values:
        n, e = to_scaled(float(s), DEFAULT_SCALE)
        assert e == DEFAULT_SCALE
        total += n
    assert Decimal(format_scaled(total, DEFAULT_SCALE)) == sum(map(Decimal, values))


def test_binance_minutes_equal_the_klines_to_the_last_decimal() -> None:
    """Volume and quote volume of the real sample minutes, summed from the trades' floats
    at scale 8, equal the kline's decimal strings exactly; the float sums do not."""
    trades = list(csv.DictReader((SAMPLE / "trades" / TRADES).open()))
    klines = {int(k["open_time"]): k for k in csv.DictReader((SAMPLE / "klines" / KLINES).open())}
    sums: dict[int, list[int]] = {}
    floats: dict[int, float] = {}
    for t in trades:
        m = int(t["ts_ms"]) // 60_000 * 60_000
        p, _ = to_scaled(float(t["price"]), 8)
        q, _ = to_scaled(float(t["qty"]), 8)
        acc = sums.setdefault(m, [0, 0])
        acc[0] += q
        acc[1] += p * q
        floats[m] = floats.get(m, 0.0) + float(t["qty"])
    complete = sorted(sums)[1:-1]  # the first and last minutes are partial
    assert len(complete) == 2
    drift = 0
    for m in complete:
        k = klines[m]
        assert Decimal(format_scaled(sums[m][0], 8)) == Decimal(k["volume"]), m
        assert Decimal(format_scaled(sums[m][1], 16)) == Decimal(k["quote_volume"]), m
        drift += str(floats[m]) != format_scaled(sums[m][0], 8)
    assert drift, "the float sums happen to be exact here: the test shows nothing"


@pytest.mark.parametrize(("n", "e", "want"), [
    (0, 8, "0"), (4201000, 8, "0.04201"), (40094400000000, 8, "400944"),
    (40094400000, 8, "400.944"), (5, 0, "5"), (1, 16, "0.0000000000000001"),
    (-150, 2, "-1.5"),
])
def test_format_scaled(n: int, e: int, want: str) -> None:
    assert format_scaled(n, e) == want


@given(st.lists(st.tuples(decimal_strings(), decimal_strings()), min_size=1, max_size=50))
def test_vwap_is_the_exact_ratio_rounded_half_up(trades: list[tuple[str, str]]) -> None:
    quote = volume = 0
    for price, qty in trades:
        p, _ = to_scaled(float(price), 8)
        q, _ = to_scaled(float(qty), 8)
        quote += p * q
        volume += q
    got = vwap_string(quote, volume, 8)
    with localcontext() as ctx:
        ctx.prec = 200  # the reference exact: the default 28 digits round big VWAPs
        dv = sum((Decimal(q) for _, q in trades), Decimal(0))
        if dv == 0:
            assert got is None
            return
        dq = sum((Decimal(p) * Decimal(q) for p, q in trades), Decimal(0))
        assert got is not None and Decimal(got) == _half_up(dq, dv)


def _half_up(num: Decimal, den: Decimal) -> Decimal:
    """num / den (num with at most 16 places, den 8) rounded half-up to VWAP_PLACES, in
    integers: no context precision involved."""
    a = int(num.scaleb(16))  # num = a / 10**16
    b = int(den.scaleb(8))   # den = b / 10**8; num / den * 10**P = a * 10**P / (b * 10**8)
    top, bottom = a * 10**VWAP_PLACES, b * 10**8
    return Decimal((2 * top + bottom) // (2 * bottom)).scaleb(-VWAP_PLACES)


def test_too_many_places_is_an_invalid_tick() -> None:
    with pytest.raises(InvalidTick) as err:
        exact_places(1e-25)
    assert err.value.reason == "bad_decimal"


def test_huge_values_take_the_exact_slow_path() -> None:
    assert scaled(1e300, DEFAULT_SCALE) is None
    assert scaled(1.7e308, DEFAULT_SCALE) is None  # x * 10**8 overflows to inf
    assert exact_places(1e300) == (10**300, 0)
    assert to_scaled(1e300, DEFAULT_SCALE) == (10**308, DEFAULT_SCALE)


@given(st.lists(st.one_of(decimal_strings(max_places=10).map(float),
                          st.floats(0, 1e300), st.sampled_from([2.0**60, 1e-300, 0.0])))
       .flatmap(lambda xs: st.lists(st.sampled_from(xs), max_size=60) if xs else st.just(xs))
       | st.lists(st.one_of(decimal_strings(max_places=10).map(float), st.floats(0, 1e300))),
       st.integers(0, 18))
def test_scaled_all_is_scaled_of_each(xs: list[float], e: int) -> None:
    """The column form gives scaled() of every value, or None when one of them is None
    (lists with repeats take the distinct-value path, lists without the direct one)."""
    each = [scaled(x, e) for x in xs]
    want = None if any(n is None for n in each) else each
    assert scaled_all(xs, e) == want
