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
* volume: every tick but the last gets ``part`` = the largest power of two not above
  ``volume / n`` (at least ``ulp(volume)``), the last one the remainder. Every partial sum
  ``i * part`` is a multiple of ``ulp(volume)`` below ``volume`` and hence exact, so is the
  remainder, and the left-to-right float sum the aggregator computes is exactly
  ``volume``, with every quantity > 0 (VWAP stays defined and close to the bar's prices).
"""

from __future__ import annotations

import math

from core.errors import ReplayError
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


def split_volume(volume: float, n: int) -> list[float]:
    """Split ``volume`` into ``n`` quantities whose left-to-right float sum is exactly
    ``volume`` (see the module docstring).

    Args:
        volume: base units, finite and >= 0.
        n: number of ticks, >= 1.

    Returns:
        list[float]: ``n`` quantities, all > 0 when ``volume`` > 0 (all 0 when it is 0).

    Raises:
        ReplayError: ``n`` < 1, ``volume`` negative or not finite, or ``n`` too large
            for an exact split of ``volume`` (more than ``volume / ulp(volume)`` ticks).
    """
    if n < 1:
        raise ReplayError(f"cannot split volume over {n} ticks")
    if not math.isfinite(volume) or volume < 0:
        raise ReplayError(f"bar volume must be finite and >= 0: {volume}")
    if volume == 0.0 or n == 1:
        return [volume] * n if volume == 0.0 else [volume]
    share = volume / n
    # largest power of two <= share (frexp: share = m * 2**e, 0.5 <= m < 1)
    part = math.ldexp(1.0, math.frexp(share)[1] - 1) if share > 0 else 0.0
    part = max(part, math.ulp(volume))
    head = part * (n - 1)
    if not head < volume:
        raise ReplayError(f"volume {volume} cannot be split exactly over {n} ticks")
    return [part] * (n - 1) + [volume - head]


def bar_to_ticks(exchange: str, symbol: str, bucket_start_ms: int, open_: float, high: float,
                 low: float, close: float, volume: float, trade_count: int,
                 source: str = "replay") -> list[Tick]:
    """Deterministic ticks that rebuild one stored 1-minute bar (module docstring).

    Args:
        exchange: the ticks' exchange (already namespaced by the caller when wanted).
        symbol: the pair, e.g. ``BTCUSDT``.
        bucket_start_ms: the bar's window start, UTC epoch ms (multiple of 60 000).
        open_, high, low, close: prices, quote per base unit.
        volume: base units.
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
