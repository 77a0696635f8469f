"""Stored 1-minute bars turned into a deterministic tick sequence (pure, no I/O).

The pipeline rebuilds from these ticks a bar with the same ``open``, ``high``, ``low``,
``close``, ``volume`` and ``trade_count`` (:mod:`tables.window` rules):

* prices: ``open`` first, then the extremes in candle order (an up candle, ``close >=
  open``, goes down to ``low`` first and then up to ``high``; a down candle the other way),
  ``close`` last; an extreme equal to ``open`` or ``close`` is not repeated;
* count: exactly ``trade_count`` ticks whenever it is at least the number of distinct
  points above (always true for bars built from trades; a source without counts, i.e.
  ``trade_count`` 0, gets the minimum); the extra ticks carry the close price and come
  just before the close tick;
* times: the first tick at ``bucket_start_ms``, the last at ``bucket_start_ms + 59_999``,
  the others evenly in between (non-decreasing; ties keep sequence order, which the
  window rules resolve like the original: earliest open, latest close);
* volume: the bar's volume is taken as the exact decimal it is stored as (``v`` units at
  ``e`` decimal places, ``e`` raised until ``v >= n``); every tick but the last gets
  ``v // n`` units, the last one the remainder, so the exact decimal sum the aggregator
  computes (:mod:`core.decimals`) is the bar's volume to the last decimal, with every
  quantity > 0 (VWAP stays defined and close to the bar's prices).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from core.decimals import MAX_SCALE, exact_places
from core.errors import InvalidTick, ReplayError
from core.models import Tick
from core.timeutil import MINUTE_MS

__all__ = [ "bar_price_path", "bar_tick_count", "bar_to_ticks", "split_volume"]



def bar_price_path(open_: float, high: float, low: float, close: float,
                   trade_count: int) -> list[float]:
    """The tick prices of one bar, in publishing order.

    Args:
        open_, high, low, close: the bar's prices (quote per base unit).
        trade_count: the bar's trade count (0 = unknown: the fewest ticks are used).

    Returns:
        list[float]: ``max(trade_count, k)`` prices, ``k`` (1..4) being the number of
        points needed to reproduce open, high, low and close.

    Raises:
        ReplayError: prices not finite and > 0, or not ``low <= open, close <= high``, or
            a negative count.
    """
    prices = (open_, high, low, close)
    if not all(math.isfinite(p) and p > 0 for p in prices):
        raise ReplayError(f"bar prices must be finite and > 0: {prices}")
    if not (low <= open_ <= high and low <= close <= high):
        raise ReplayError(f"inconsistent bar: open {open_}, high {high}, low {low}, "
                          f"close {close}")
    if trade_count < 0:
        raise ReplayError(f"negative trade_count {trade_count}")
    extremes = (low, high) if close >= open_ else (high, low)
    interior: list[float] = []
    for e in extremes:
        if e != open_ and e != close and e not in interior:
            interior.append(e)
    base = [open_, *interior, close]
    if trade_count == 1 and len(base) == 2 and open_ == close:
        return [open_]
    n = max(trade_count, len(base))
    return base[:-1] + [close] * (n - len(base)) + [close]


def bar_tick_count(open_: float, high: float, low: float, close: float,
                   trade_count: int) -> int:
    """How many ticks :func:`bar_to_ticks` makes for this bar (see :func:`bar_price_path`).

    Raises:
        ReplayError: as :func:`bar_price_path`.
    """
    return len(bar_price_path(open_, high, low, close, trade_count))


#: most significant digits of a tick quantity: a decimal of up to 15 digits survives the
#: trip through a double (``repr`` gives it back), so the aggregator sums it exactly
_MAX_QTY_UNITS = 10**15


def _volume_units(volume: float | str | Decimal) -> tuple[int, int]:
    """``(v, e)`` with ``volume == v / 10**e`` exactly (a float as its ``repr``)."""
    try:
        if isinstance(volume, float):
            return exact_places(volume)
        d = Decimal(volume)
        sign, digits, exp = d.as_tuple()
    except (InvalidTick, InvalidOperation, ValueError) as exc:
        raise ReplayError(f"bar volume is not a decimal of at most {MAX_SCALE} places: "
                          f"{volume!r}") from exc
    if sign or not isinstance(exp, int) or -exp > MAX_SCALE:
        raise ReplayError(f"bar volume must be a decimal >= 0 with at most {MAX_SCALE} "
                          f"places: {volume!r}")
    v = int("".join(map(str, digits)) or "0")
    return (v * 10**exp, 0) if exp >= 0 else (v, -exp)


def split_volume(volume: float | str | Decimal, n: int) -> list[float]:
    """Split ``volume`` into ``n`` quantities whose exact decimal sum is ``volume`` (see
    the module docstring).

    Args:
        volume: base units, >= 0: a float (its shortest decimal, ``repr``), a decimal
            string or a ``Decimal`` (a stored NUMERIC).
        n: number of ticks, >= 1.

    Returns:
        list[float]: ``n`` quantities, all > 0 when ``volume`` > 0 (all 0 when it is 0),
        each with at most 15 significant digits.

    Raises:
        ReplayError: ``n`` < 1, ``volume`` negative, not a finite decimal of at most 18
            places, or too small or too large for ``n`` such quantities.
    """
    if n < 1:
        raise ReplayError(f"cannot split volume over {n} ticks")
    v, e = _volume_units(volume)
    if v == 0:
        return [0.0] * n
    while e > 0 and v % 10 == 0:  # "1.50" is 15 tenths, not 150 hundredths
        v //= 10
        e -= 1
    while v < n and e < MAX_SCALE:
        v *= 10
        e += 1
    part = v // n
    last = v - part * (n - 1)
    if part == 0 or last >= _MAX_QTY_UNITS:
        raise ReplayError(f"volume {volume} cannot be split exactly over {n} ticks")
    scale = 10**e
    return [part / scale] * (n - 1) + [last / scale]


def bar_to_ticks(exchange: str, symbol: str, bucket_start_ms: int, open_: float, high: float,
                 low: float, close: float, volume: float | str | Decimal, trade_count: int,
                 source: str = "replay") -> list[Tick]:
    """Deterministic ticks that rebuild one stored 1-minute bar (module docstring).

    Args:
        exchange: the ticks' exchange (already namespaced by the caller when wanted).
        symbol: the pair, e.g. ``BTCUSDT``.
        bucket_start_ms: the bar's window start, UTC epoch ms (multiple of 60 000).
        open_, high, low, close: prices, quote per base unit.
        volume: base units (see :func:`split_volume`).
        trade_count: trades in the bar (0 = unknown).
        source: the ticks' ``source`` field.

    Returns:
        list[Tick]: in publishing order, ``ts_ms`` in ``[bucket_start_ms,
        bucket_start_ms + 59_999]``, non-decreasing; ``trade_id`` ``"<bucket>-<i>"``.

    Raises:
        ReplayError: inconsistent bar (see :func:`bar_price_path`, :func:`split_volume`)
            or ``bucket_start_ms`` not on a minute boundary.
    """
    if bucket_start_ms % MINUTE_MS:
        raise ReplayError(f"bucket_start_ms {bucket_start_ms} is not a minute boundary")
    prices = bar_price_path(open_, high, low, close, trade_count)
    n = len(prices)
    qtys = split_volume(volume, n)
    last = MINUTE_MS - 1
    return [
        Tick(exchange, symbol, p, q,
             bucket_start_ms + (i * last // (n - 1) if n > 1 else 0),
             f"{bucket_start_ms}-{i}", source)
        for i, (p, q) in enumerate(zip(prices, qtys, strict=True))
    ]
