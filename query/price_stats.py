"""Price statistics over a period: per-second tick aggregates (pure functions).

The bar agent folds every applied tick into per-second buckets
``(exchange:symbol, second) -> [min, max, sum, count]`` (second = ``ts_ms // 1000``, event
time). Highest / lowest / average over a period are computed from those buckets:

* ``period <= RECENT_S`` (15 minutes): exact to the second — the ticks with
  ``ts_ms`` in ``[(now_s - period_s) * 1000, (now_s + 1) * 1000)`` where
  ``now_s = now_ms // 1000``;
* longer periods: exact to the minute at the start — 1-minute bars for the minutes before
  the per-second coverage plus the per-second buckets after it (no gap, no overlap).

Average is the mean of tick prices (sum / count), not a mean of sub-period means.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from functools import reduce
from itertools import islice, repeat
from operator import add, le

from core.errors import QueryError
from core.models import Tick

__all__ = ["MAX_PERIOD_S", "PERIODS_EXAMPLES", "RECENT_S", "SecondAgg", "combine",
           "parse_period_s", "per_second", "per_second_columns", "seconds_in_period",
           "select", "stats"]

#: how far back the per-second state reaches (seconds)
RECENT_S = 15 * 60
#: longest accepted period (seconds)
MAX_PERIOD_S = 31 * 86_400
PERIODS_EXAMPLES = ("1s", "3s", "5s", "10s", "30s", "1m", "3m", "5m", "15m", "1h", "24h", "7d")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_PERIOD_RE = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")

SecondAgg = list[float]  # [min, max, sum, count]


def parse_period_s(text: str) -> int:
    """``"5m"`` -> 300. Accepts ``<n>s|m|h|d``, 1 s .. 31 days.

    Raises:
        QueryError: malformed or out of range.
    """
    m = _PERIOD_RE.match(text.strip())
    if not m:
        raise QueryError(f"invalid period {text[:20]!r}: use e.g. {', '.join(PERIODS_EXAMPLES)}",
                         "period")
    s = int(m.group(1)) * _UNITS[m.group(2)]
    if s > MAX_PERIOD_S:
        raise QueryError("period too long: at most 31d", "period")
    return s


def per_second(ticks: Iterable[Tick]) -> dict[tuple[str, int], SecondAgg]:
    """Fold ticks into ``(exchange:symbol, second) -> [min, max, sum, count]``."""
    out: dict[tuple[str, int], SecondAgg] = {}
    exchange: str | None = None
    symbol: str | None = None
    key = ""
    for t in ticks:
        if t.symbol != symbol or t.exchange != exchange:  # ticks come in runs of one key
            exchange, symbol = t.exchange, t.symbol
            key = f"{exchange}:{symbol}"
        k = (key, t.ts_ms // 1000)
        a = out.get(k)
        p = t.price
        if a is None:
            out[k] = [p, p, p, 1.0]
        else:
            if p < a[0]:
                a[0] = p
            if p > a[1]:
                a[1] = p
            a[2] += p
            a[3] += 1.0
    return out


def per_second_columns(key: str, tss: list[int], prices: list[float]
                       ) -> dict[tuple[str, int], SecondAgg]:
    """:func:`per_second` of ticks of one key given as columns (``exchange:symbol``, their
    ``ts_ms`` and prices, in order): the same result. Times in order (the usual case) are
    cut into seconds by bisection and folded with C-level ``min``/``max`` and an in-order
    ``reduce(add)`` (the float sum of :func:`per_second` bit for bit; ``sum`` compensates
    on CPython >= 3.12); else tick by tick.
    """
    n = len(tss)
    if not all(map(le, tss, islice(tss, 1, None))):  # rare: tick by tick
        exchange, symbol = key.split(":", 1)
        return per_second(map(Tick, repeat(exchange, n), repeat(symbol, n), prices,
                              repeat(0.0, n), tss, repeat(None, n), repeat("live", n)))
    out: dict[tuple[str, int], SecondAgg] = {}
    i = 0
    while i < n:
        sec = tss[i] // 1000
        j = bisect_left(tss, (sec + 1) * 1000, i + 1)
        part = prices[i:j]
        out[(key, sec)] = [min(part), max(part), reduce(add, part), float(j - i)]
        i = j
    return out


def combine(a: SecondAgg, b: SecondAgg) -> SecondAgg:
    """Merge two aggregates (either may come first)."""
    return [min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2], a[3] + b[3]]


def stats(aggs: Iterable[SecondAgg]) -> tuple[float, float, float, int] | None:
    """``(highest, lowest, average, count)`` of the aggregates, None when empty."""
    lo = hi = None
    total = 0.0
    n = 0.0
    for a in aggs:
        if a[3] <= 0:
            continue
        lo = a[0] if lo is None else min(lo, a[0])
        hi = a[1] if hi is None else max(hi, a[1])
        total += a[2]
        n += a[3]
    if n == 0 or lo is None or hi is None:
        return None
    return hi, lo, total / n, int(n)


def seconds_in_period(now_ms: int, period_s: int) -> tuple[int, int]:
    """``[first_s, last_s]`` (inclusive) of the per-second buckets a period covers."""
    now_s = now_ms // 1000
    return now_s - period_s, now_s


def select(buckets: Mapping[int, SecondAgg], first_s: int, last_s: int) -> list[SecondAgg]:
    """The aggregates of seconds ``first_s..last_s`` (inclusive)."""
    return [a for s, a in buckets.items() if first_s <= s <= last_s]
