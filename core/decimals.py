"""Exact decimal arithmetic for trade sizes and prices: scaled integers, no float drift.

A tick's ``price`` and ``qty`` arrive as JSON numbers, i.e. IEEE doubles. The exchange
sent them as decimal strings (``"0.04201000"``); a double keeps such a string exactly as
long as it has at most 15 significant digits, and ``repr`` gives it back. Summing the
doubles drifts (``0.04201000`` becomes ``0.042010000000000006``), so sums are kept as
Python integers at a decimal *scale* ``e`` (the value times ``10**e``):

* ``qty`` and ``price`` of one bar share the scale ``e`` (:data:`DEFAULT_SCALE`, raised
  per bar when a value has more decimal places, up to :data:`MAX_SCALE`);
* volume = sum of qty at scale ``e``; quote volume = sum of price * qty at scale ``2e``;
* VWAP = quote volume / volume, rounded half-up to :data:`VWAP_PLACES` decimal places.

:func:`scaled` is the per-tick fast path (two float operations and a compare);
:func:`exact_places` the slow path for values with more places.
Served values are decimal strings (:func:`format_scaled`): plain notation, no exponent,
no trailing zeros (``"0.04201"``, ``"400.944"``, ``"0"``), the form PostgreSQL's
``trim_scale(numeric)::text`` gives for the same value.
"""

from __future__ import annotations

from decimal import Decimal
from itertools import repeat
from operator import mul, truediv

from core.errors import InvalidTick

__all__ = ["DEFAULT_SCALE", "FAST_LIMIT", "MAX_SCALE", "VWAP_PLACES", "decimal_string",
           "exact_places", "format_scaled", "ratio_string", "scaled", "scaled_all", "to_scaled",
           "vwap_string"]

#: Decimal places every bar starts with (Binance, Kraken and Coinbase quote sizes and
#: prices with at most 8).
DEFAULT_SCALE = 8
#: Largest scale a bar may need; a value with more decimal places is an invalid tick.
MAX_SCALE = 18
#: Decimal places of a served VWAP (quote volume / volume, rounded half-up).
VWAP_PLACES = 16
#: Scaled values at or above this take the slow path: below it the double nearest to
#: ``n / 10**e`` identifies ``n`` uniquely (see :func:`scaled`).
FAST_LIMIT = 2**50

_POW10 = [10**i for i in range(max(MAX_SCALE, VWAP_PLACES) + 1)]
_FPOW10 = [float(10**i) for i in range(MAX_SCALE + 1)]


def scaled(x: float, e: int) -> int | None:
    """``x`` as an integer at scale ``10**e``, when that is exact.

    Args:
        x: a finite value >= 0 (a tick's price or qty).
        e: the scale, 0 .. :data:`MAX_SCALE`.

    Returns:
        ``n`` with ``n / 10**e`` the decimal that ``x`` was parsed from, or None when
        ``x`` has more than ``e`` decimal places or ``n >= FAST_LIMIT`` (use
        :func:`exact_places`). ``n / 10**e`` as a double is correctly rounded, so
        ``float(n) / 10**e == x`` holds exactly when the decimal ``n / 10**e`` parses to
        ``x``; below :data:`FAST_LIMIT` no other ``e``-place decimal does.
    """
    s = _FPOW10[e]
    xs = x * s
    if not xs < FAST_LIMIT:  # also inf, for a huge x
        return None
    n = round(xs)
    return n if n / s == x else None


def scaled_all(xs: list[float], e: int) -> list[int] | None:
    """:func:`scaled` of every value, or None when any one is not exact at ``e`` places.

    Args:
        xs: finite values >= 0.
        e: the scale, 0 .. :data:`MAX_SCALE`.

    Returns:
        ``[scaled(x, e) for x in xs]`` when none of them is None, else None. Each
        distinct value is scaled once when values repeat (as trade prices and sizes do).
    """
    if not xs:
        return []
    distinct = set(xs)
    if 2 * len(distinct) > len(xs):
        return _scaled_each(xs, e)
    # trades repeat prices and sizes: scale each distinct value once, then look them up
    values = list(distinct)
    ns = _scaled_each(values, e)
    if ns is None:
        return None
    return list(map(dict(zip(values, ns, strict=True)).__getitem__, xs))


def _scaled_each(xs: list[float], e: int) -> list[int] | None:
    s = _FPOW10[e]
    products = list(map(mul, xs, repeat(s)))
    if not max(products) < FAST_LIMIT:  # also inf, for a huge x
        return None
    ns = list(map(round, products))
    # the check of scaled(), n / 10**e == x, for every value at once
    return ns if list(map(truediv, ns, repeat(s))) == xs else None


def exact_places(x: float) -> tuple[int, int]:
    """The shortest decimal of ``x`` (``repr``) as ``(n, places)``: ``x == n / 10**places``.

    Raises:
        InvalidTick: ``bad_decimal`` when it needs more than :data:`MAX_SCALE` places.
    """
    d = Decimal(repr(x))
    _, digits, exp = d.as_tuple()
    assert isinstance(exp, int)  # finite: callers validated x
    n = int("".join(map(str, digits)) or "0")
    if exp >= 0:
        return n * 10**exp, 0
    if -exp > MAX_SCALE:
        raise InvalidTick("bad_decimal",
                          f"{x!r} has {-exp} decimal places (at most {MAX_SCALE})")
    return n, -exp


def to_scaled(x: float, e: int) -> tuple[int, int]:
    """``x`` at scale ``e``, or at the larger scale it needs: ``(n, e')`` with
    ``e' >= e`` and ``x == n / 10**e'``.

    Raises:
        InvalidTick: ``bad_decimal`` (see :func:`exact_places`).
    """
    n = scaled(x, e)
    if n is not None:
        return n, e
    m, places = exact_places(x)
    if places <= e:
        return m * _POW10[e - places], e
    return m, places


def format_scaled(n: int, e: int) -> str:
    """The decimal string of ``n / 10**e``: plain, no trailing zeros (``"0.04201"``)."""
    if e == 0 or n == 0:
        return str(n)
    sign = "-" if n < 0 else ""
    s = str(abs(n)).rjust(e + 1, "0")
    whole, frac = s[:-e], s[-e:].rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def ratio_string(num_n: int, num_e: int, den_n: int, den_e: int) -> str | None:
    """``(num_n / 10**num_e) / (den_n / 10**den_e)`` rounded half-up to
    :data:`VWAP_PLACES` places, as :func:`format_scaled` writes it; None when the
    denominator is <= 0. Both values >= 0; exact (integer arithmetic)."""
    if den_n <= 0:
        return None
    num = num_n * 10 ** (VWAP_PLACES + den_e)
    den = den_n * 10**num_e
    return format_scaled((2 * num + den) // (2 * den), VWAP_PLACES)


def vwap_string(quote_n: int, volume_n: int, e: int) -> str | None:
    """VWAP of a bar from its exact sums, None when the volume is 0.

    Args:
        quote_n: quote volume at scale ``2e``.
        volume_n: volume at scale ``e``.
        e: the bar's scale.

    Returns:
        ``quote / volume`` rounded half-up to :data:`VWAP_PLACES` places, as
        :func:`format_scaled` writes it (``sql/bars_1m.py`` rounds rollups the same way).
    """
    return ratio_string(quote_n, 2 * e, volume_n, e)


def decimal_string(x: float) -> str:
    """The decimal ``x`` was parsed from (its ``repr``), as :func:`format_scaled` writes
    it (``12.5`` -> ``"12.5"``, ``1e-07`` -> ``"0.0000001"``).

    Raises:
        InvalidTick: ``bad_decimal``, more than :data:`MAX_SCALE` places.
    """
    return format_scaled(*exact_places(x))
