"""Event-time tumbling 1-minute windows: pure functions, no Faust, no I/O.

A window (bucket) is the half-open interval ``[bucket_start_ms, bucket_start_ms +
size_ms)`` in UTC epoch milliseconds, keyed by ``bucket_start_ms``.

Per-key state (one per ``exchange:symbol``, stored in the Faust table of
:mod:`tables.bars`) is a plain JSON-able dict so it travels through the changelog
unchanged::

    {"p": 0,                  # source partition the key lives on
     "off": 1234,             # last source offset applied to this key (dedup on replay)
     "max_ts": 1723161255342, # highest tick ts_ms seen for the key
     "seen_ms": 1732170000000,# wall clock of the last applied tick batch
     "closed": 1723161180000, # bucket_start_ms of the newest closed window, or -1
     "bars": {"1723161240000": <bar>, ...},   # open windows, key = str(bucket_start_ms)
     # only with window.late_policy = "correct":
     "done": {"1723161180000": <bar>, ...},   # recently closed windows kept for corrections
     "kf": 1723161120000}     # "kept from": every closed window >= kf is in "done" (or was
                              # empty); closed windows before kf may have been dropped

An open bar is a dict (short keys keep the changelog small)::

    {"b": bucket_start_ms, "o": open, "o_ts": ts_ms of open, "h": high, "l": low,
     "c": close, "c_ts": ts_ms of close, "n": trade count, "ps": sum price,
     "e": 8,                  # decimal scale of the exact sums (core/decimals.py)
     "v": 420100000,          # sum qty * 10**e, an exact integer
     "pq": 2834...,           # sum price * qty * 10**(2*e), an exact integer
     "first_ms": wall ms of first tick,
     "ids": {"r": [lo, hi, ...], "s": {"<id>": 1, ...}}}  # trade ids seen (when ticks carry
                                                           # them), see add_trade_id

Volume and quote volume are exact: each tick's ``qty`` and ``price`` are taken as the
decimals they were parsed from (:mod:`core.decimals`) and summed as integers, so a minute's
volume equals the exchange's kline to the last decimal. In the changelog ``v`` and ``pq``
are decimal strings of those integers (:func:`encode_state`): JSON readers, Faust's
included, turn integers beyond 64 bits into floats. :func:`restore_state` turns them back
(and converts a state written before the exact sums, with float ``v``/``pq``).

Trade-id dedupe memory: ids are kept per *open* window only and dropped with the bar when
it closes (under the ``correct`` late policy they stay with the retained closed bar until it
leaves the correction horizon). Canonical decimal ids (Binance, most exchanges: increasing
integers) are stored as inclusive ranges, so a minute of consecutive ids costs two ints;
other ids cost one dict entry each.

Rules:

* open = first trade by event time, ties broken by arrival order (earliest wins);
  close = last trade by event time, ties broken by arrival order (latest wins);
* a tick is *late* when its window already closed (:func:`is_late`): ``bucket end <=
  watermark`` where ``watermark = max ts_ms seen on the partition for the key's exchange -
  grace_ms`` (:func:`watermark_ms`), or its bucket is at or before the key's newest closed
  bucket;
* a window closes when the watermark reaches its end (:func:`closable_by_watermark`), or
  when its key has been idle for ``idle_timeout_ms`` (wall clock) and the wall clock is
  past ``end + grace_ms`` (:func:`closable_by_idle`);
* late policy ``correct``: a closed window stays in ``done`` while
  ``end + horizon_ms > watermark`` (:func:`correctable`); a late tick for such a window is
  applied to it and the bar is re-emitted as a correction; older ones are pruned;
* a tick whose ``trade_id`` was already applied to its window is skipped (a duplicate).

These functions are the definition of the rules. :class:`tables.aggregator.WindowAggregator`
calls them outside its per-tick loop and inlines :func:`bucket_start_ms`,
:func:`watermark_ms` and :func:`is_late` inside it (for throughput);
``tests/unit/test_window_rules.py`` checks the aggregator against a reference built from
these functions alone. Consecutive ticks of one key and window (a message holds runs of
one key) go into their bar at once with :func:`apply_run`, which gives the bar that
:func:`apply_tick` gives tick by tick (``tests/unit/test_aggregator_runs.py``).
"""

from __future__ import annotations

from bisect import bisect_right
from operator import mul
from typing import Any

import orjson

from core.decimals import (
    DEFAULT_SCALE,
    format_scaled,
    scaled,
    scaled_all,
    to_scaled,
    vwap_string,
)
from core.models import Tick, closed_bar
from core.timeutil import MINUTE_MS

__all__ = [
    "add_trade_id",
    "apply_run",
    "apply_run_columns",
    "apply_tick",
    "bucket_start_ms",
    "closable_by_idle",
    "closable_by_watermark",
    "correctable",
    "encode_state",
    "exact_amounts",
    "finalize_bar",
    "is_late",
    "new_key_state",
    "new_trade_ids",
    "restore_state",
    "watermark_ms",
]


Bar = dict[str, Any]
KeyState = dict[str, Any]


def bucket_start_ms(ts_ms: int, size_ms: int = MINUTE_MS) -> int:
    """Start of the tumbling window containing ``ts_ms`` (floor to ``size_ms``).

    Args:
        ts_ms: UTC epoch milliseconds (a negative watermark floors the same way).
        size_ms: window length in ms.

    Returns:
        int: ``ts_ms - ts_ms % size_ms``; ``ts_ms`` itself when it is a boundary
        (windows are half-open ``[start, start + size)``).
    """
    return ts_ms - ts_ms % size_ms


def watermark_ms(max_ts_ms: int, grace_ms: int) -> int:
    """Event-time watermark of one clock (partition and exchange).

    Args:
        max_ts_ms: highest tick ``ts_ms`` applied on the clock, UTC epoch ms (-1 if none).
        grace_ms: how long (event time) a window waits for out-of-order ticks.

    Returns:
        int: ``max_ts_ms - grace_ms``, UTC epoch ms.
    """
    return max_ts_ms - grace_ms


def is_late(bucket_ms: int, wm_ms: int, closed_bucket_ms: int, size_ms: int = MINUTE_MS) -> bool:
    """Whether a tick of window ``bucket_ms`` arrives after that window closed.

    Args:
        bucket_ms: the tick's window start, UTC epoch ms.
        wm_ms: watermark of the key's partition and exchange before this tick
            (:func:`watermark_ms`), UTC epoch ms.
        closed_bucket_ms: the key's newest closed window start (-1 if none).
        size_ms: window length in ms.

    Returns:
        bool: ``bucket_ms + size_ms <= wm_ms or bucket_ms <= closed_bucket_ms``.
    """
    return bucket_ms + size_ms <= wm_ms or bucket_ms <= closed_bucket_ms


def closable_by_watermark(bucket_ms: int, wm_ms: int, size_ms: int = MINUTE_MS) -> bool:
    """Whether the watermark closes a window: it reached the window's (exclusive) end.

    Args:
        bucket_ms: the window start, UTC epoch ms.
        wm_ms: watermark of the key's partition and exchange, UTC epoch ms.
        size_ms: window length in ms.

    Returns:
        bool: ``bucket_ms + size_ms <= wm_ms``.
    """
    return bucket_ms + size_ms <= wm_ms


def closable_by_idle(
    bucket_ms: int,
    last_seen_wall_ms: int,
    now_wall_ms: int,
    idle_timeout_ms: int,
    grace_ms: int,
    size_ms: int = MINUTE_MS,
) -> bool:
    """Whether idleness closes a window: the key saw no tick batch for
    ``idle_timeout_ms`` and wall time is past ``end + grace_ms`` (so a live window is
    never closed before its minute is over).

    Args:
        bucket_ms: the window start, UTC epoch ms.
        last_seen_wall_ms: wall clock of the key's last applied tick batch (``seen_ms``).
        now_wall_ms: wall clock of the idle check, UTC epoch ms.
        idle_timeout_ms: ``window.idle_timeout_s`` in ms.
        grace_ms: the watermark's grace period.
        size_ms: window length in ms.

    Returns:
        bool: idle for ``idle_timeout_ms`` and ``bucket_ms + size_ms + grace_ms <=
        now_wall_ms``.
    """
    return (
        now_wall_ms - last_seen_wall_ms >= idle_timeout_ms
        and bucket_ms + size_ms + grace_ms <= now_wall_ms
    )


def correctable(bucket_ms: int, wm_ms: int, horizon_ms: int, size_ms: int = MINUTE_MS) -> bool:
    """Whether a closed window is still within the correction horizon.

    Args:
        bucket_ms: the window start, UTC epoch ms.
        wm_ms: current watermark of the key's partition and exchange.
        horizon_ms: ``window.correction_horizon_ms``.
        size_ms: window length in ms.

    Returns:
        bool: ``bucket_ms + size_ms + horizon_ms > wm_ms``.
    """
    return bucket_ms + size_ms + horizon_ms > wm_ms


def new_key_state(partition: int, retain: bool = False) -> KeyState:
    """Empty state for a key first seen on ``partition``; ``retain`` (late policy
    ``correct``) adds the retained closed windows ``done`` and ``kf = -1``."""
    st: KeyState = {"p": partition, "off": -1, "max_ts": -1, "seen_ms": 0, "closed": -1,
                    "bars": {}}
    if retain:
        st["done"] = {}
        st["kf"] = -1
    return st


def new_trade_ids() -> dict[str, Any]:
    """Empty trade-id set of a bar (JSON-able, see :func:`add_trade_id`)."""
    return {"r": [], "s": {}}


def add_trade_id(ids: dict[str, Any], trade_id: str) -> bool:
    """Record ``trade_id`` in a bar's id set.

    Canonical decimal ids below 10**18 (no sign, no leading zero) go to ``ids["r"]``, a
    sorted flat list ``[lo0, hi0, lo1, hi1, ...]`` of disjoint, non-adjacent inclusive
    ranges (consecutive ids extend the last range in O(1)); any other id is a key of
    ``ids["s"]``. The ids ``"7"`` and ``"007"`` are distinct, as strings.

    Args:
        ids: the set (mutated), from :func:`new_trade_ids` or the changelog.
        trade_id: the exchange trade id as a string.

    Returns:
        bool: True when it was new (now recorded), False when already present.
    """
    if trade_id.isascii() and trade_id.isdecimal() and len(trade_id) < 19 and (
            trade_id[0] != "0" or len(trade_id) == 1):
        n = int(trade_id)
        r: list[int] = ids["r"]
        if r:
            hi = r[-1]
            if n == hi + 1:
                r[-1] = n
                return True
            if r[-2] <= n <= hi:
                return False
        i = bisect_right(r, n)
        if i % 2 == 1 or (i > 0 and r[i - 1] == n):
            return False  # inside [r[i-1], r[i]] or equal to a range end
        left = i > 0 and r[i - 1] == n - 1
        right = i < len(r) and r[i] == n + 1
        if left and right:
            del r[i - 1:i + 1]
        elif left:
            r[i - 1] = n
        elif right:
            r[i] = n
        else:
            r[i:i] = [n, n]
        return True
    s: dict[str, int] = ids["s"]
    if trade_id in s:
        return False
    s[trade_id] = 1
    return True


def exact_amounts(price: float, qty: float, e: int) -> tuple[int, int, int]:
    """``price`` and ``qty`` as integers at one decimal scale (:mod:`core.decimals`).

    Args:
        price: quote currency per base unit, finite, > 0.
        qty: base units, finite, >= 0.
        e: the bar's current scale.

    Returns:
        ``(price_n, qty_n, e2)``: ``price == price_n / 10**e2``, ``qty == qty_n / 10**e2``
        as decimals, ``e2 >= e`` (larger when a value has more decimal places).

    Raises:
        InvalidTick: ``bad_decimal``, a value with more than
            :data:`core.decimals.MAX_SCALE` decimal places.
    """
    qn = scaled(qty, e)
    pn = scaled(price, e)
    if qn is not None and pn is not None:
        return pn, qn, e
    qn, eq = to_scaled(qty, e)
    pn, ep = to_scaled(price, e)
    e2 = max(eq, ep)
    return pn * 10 ** (e2 - ep), qn * 10 ** (e2 - eq), e2


def apply_tick(
    bars: dict[str, Bar], price: float, qty: float, ts_ms: int, wall_ms: int,
    size_ms: int = MINUTE_MS, trade_id: str | None = None,
) -> bool:
    """Add one trade to its window in ``bars`` (created when missing).

    Args:
        bars: windows of one key, ``str(bucket_start_ms) -> bar`` (mutated): the open
            ones, or the retained closed ones (``done``) for a correction.
        price: quote currency per base unit.
        qty: base units (0 when unknown).
        ts_ms: event time, UTC epoch ms.
        wall_ms: arrival wall clock, UTC epoch ms (recorded for the first tick only).
        size_ms: window length.
        trade_id: exchange trade id, or None when the feed has none (no dedupe).

    Returns:
        bool: True when applied; False when ``trade_id`` was already applied to this
        window (a duplicate trade: the bar is unchanged).

    Raises:
        InvalidTick: ``bad_decimal`` (:func:`exact_amounts`); nothing was changed.
    """
    b = ts_ms - ts_ms % size_ms
    k = str(b)
    bar = bars.get(k)
    if bar is None:
        if qty:
            pn, qn, e = exact_amounts(price, qty, DEFAULT_SCALE)
            pq = pn * qn
        else:
            qn = pq = 0
            e = DEFAULT_SCALE
        bar = bars[k] = {
            "b": b, "o": price, "o_ts": ts_ms, "h": price, "l": price, "c": price,
            "c_ts": ts_ms, "n": 1, "ps": price, "e": e, "v": qn, "pq": pq,
            "first_ms": wall_ms,
        }
        if trade_id is not None:
            new_ids = bar["ids"] = new_trade_ids()
            add_trade_id(new_ids, trade_id)
        return True
    if qty:
        e = bar["e"]
        pn, qn, e2 = exact_amounts(price, qty, e)
    if trade_id is not None:
        ids: dict[str, Any] | None = bar.get("ids")
        if ids is None:
            ids = bar["ids"] = new_trade_ids()
        if not add_trade_id(ids, trade_id):
            return False
    if ts_ms < bar["o_ts"]:
        bar["o"] = price
        bar["o_ts"] = ts_ms
    if ts_ms >= bar["c_ts"]:
        bar["c"] = price
        bar["c_ts"] = ts_ms
    if price > bar["h"]:
        bar["h"] = price
    if price < bar["l"]:
        bar["l"] = price
    bar["n"] += 1
    bar["ps"] += price
    if qty:
        if e2 != e:  # this tick has more decimal places: rescale the sums
            bar["v"] *= 10 ** (e2 - e)
            bar["pq"] *= 10 ** (2 * (e2 - e))
            bar["e"] = e2
        bar["v"] += qn
        bar["pq"] += pn * qn
    return True


def apply_run(bar: Bar, run: list[Tick]) -> tuple[float, int] | None:
    """Add a run of ticks to the existing bar of their window at once: the same bar as
    :func:`apply_tick` for each tick in order, with C-level ``min``/``max``/``sum`` over
    the run instead of a call per tick.

    Args:
        bar: the window's bar, already holding at least one tick (mutated only when True
            is returned).
        run: ticks of the bar's key and window (``ts_ms`` in ``[b, b + size_ms)``), in
            arrival order, none late.

    Returns:
        ``(price, ts_ms)`` of the run's newest trade (the last of those with the highest
        ``ts_ms``) when applied. None, with nothing changed, when the run needs the
        per-tick path: its trade ids are not all None and not the consecutive canonical
        ids right after the bar's newest id range (a gap, a repeat, a first id, another
        form), or a price or qty has more decimal places than the bar's scale.
    """
    ids = [t.trade_id for t in run]
    return apply_run_columns(bar, [t.price for t in run], [t.qty for t in run],
                             [t.ts_ms for t in run],
                             None if all(i is None for i in ids) else ids)


def apply_run_columns(bar: Bar, prices: list[float], qtys: list[float], tss: list[int],
                      ids: list[str | None] | None) -> tuple[float, int] | None:
    """:func:`apply_run` of a run given as columns (``ids`` None: no tick has a trade
    id); the same result and the same bar, without a tick object.

    Args:
        bar: see :func:`apply_run`.
        prices, qtys, tss: the run's prices, sizes and ``ts_ms`` (UTC epoch ms), at least
            one each, of equal length.
        ids: the run's trade ids, or None.

    Returns:
        See :func:`apply_run`.
    """
    m = len(tss)
    first_id = None if ids is None else ids[0]
    bar_ids = bar.get("ids")
    next_id = 0
    if first_id is None:
        if ids is not None and any(i is not None for i in ids):
            return None
    else:
        assert ids is not None
        r = bar_ids["r"] if bar_ids is not None else None
        if not r:
            return None
        next_id = r[-1] + 1
        if next_id + m > 10**18 or ids != list(map(str, range(next_id, next_id + m))):
            return None
    e = bar["e"]
    qns = scaled_all(qtys, e)
    if qns is None:
        return None
    pns = scaled_all(prices, e)
    if pns is None:
        return None
    if first_id is not None:
        assert bar_ids is not None
        bar_ids["r"][-1] = next_id + m - 1
    tss = list(tss)
    lo_ts = min(tss)
    if lo_ts < bar["o_ts"]:
        bar["o"] = prices[tss.index(lo_ts)]  # the first of the earliest
        bar["o_ts"] = lo_ts
    hi_ts = max(tss)
    tss.reverse()
    newest = (prices[m - 1 - tss.index(hi_ts)], hi_ts)  # the last of the latest
    if hi_ts >= bar["c_ts"]:
        bar["c"], bar["c_ts"] = newest
    h = max(prices)
    if h > bar["h"]:
        bar["h"] = h
    lo = min(prices)
    if lo < bar["l"]:
        bar["l"] = lo
    bar["n"] += m
    ps = bar["ps"]
    for p in prices:  # in order: the float sum of apply_tick, bit for bit
        ps += p
    bar["ps"] = ps
    bar["v"] += sum(qns)
    bar["pq"] += sum(map(mul, pns, qns))
    return newest


def _bar_for_json(bar: Bar) -> Bar:
    return {**bar, "v": str(bar["v"]), "pq": str(bar["pq"])}


def encode_state(st: KeyState) -> bytes:
    """A key state as the JSON of its changelog record: the exact sums ``v`` and ``pq``
    of every bar as decimal strings of their integers (module docstring)."""
    out = {**st, "bars": {k: _bar_for_json(b) for k, b in st["bars"].items()}}
    done = st.get("done")
    if done:
        out["done"] = {k: _bar_for_json(b) for k, b in done.items()}
    return orjson.dumps(out)


def _restore_bar(bar: Bar) -> None:
    v = bar["v"]
    if type(v) is int:
        return
    if "e" not in bar:  # written before the exact sums: float sums, best effort
        bar["e"] = DEFAULT_SCALE
        bar["v"] = round(float(v) * 10**DEFAULT_SCALE)
        bar["pq"] = round(float(bar["pq"]) * 10 ** (2 * DEFAULT_SCALE))
        return
    bar["v"] = int(v)
    bar["pq"] = int(bar["pq"])


def restore_state(st: KeyState) -> KeyState:
    """Turn a key state read from the changelog (:func:`encode_state`) back into the
    in-memory form, in place (integers ``v``/``pq``; a no-op for a state already in
    it).

    Returns:
        ``st``.

    Raises:
        ValueError: a ``v``/``pq`` string that is not an integer (a corrupt record).
    """
    for bar in st["bars"].values():
        _restore_bar(bar)
    done = st.get("done")
    if done:
        for bar in done.values():
            _restore_bar(bar)
    return st


def finalize_bar(exchange: str, symbol: str, bar: Bar, size_ms: int = MINUTE_MS) -> dict[str, Any]:
    """The closed-bar message (topic value, DB row source) for an open bar.

    Args:
        exchange: exchange id.
        symbol: the exchange's pair name.
        bar: an open bar (module docstring), in memory or as read from the changelog.
        size_ms: window length.

    Returns:
        dict: the closed-bars message, :func:`core.models.closed_bar` (fields
        :data:`core.models.CLOSED_BAR_FIELDS`): ``volume``, ``quote_volume`` and ``vwap``
        are exact decimal strings (``vwap`` null when no qty).

        A re-emitted corrected bar additionally carries ``"correction": true`` (added by
        :class:`tables.aggregator.WindowAggregator`, not here).

    Raises:
        ValueError: a corrupt changelog bar (see :func:`restore_state`).
    """
    _restore_bar(bar)
    n = bar["n"]
    v = bar["v"]
    e = bar["e"]
    b = bar["b"]
    pq = bar["pq"]
    return closed_bar(exchange, symbol, b, b + size_ms, open=bar["o"], high=bar["h"],
                      low=bar["l"], close=bar["c"], volume=format_scaled(v, e),
                      quote_volume=format_scaled(pq, 2 * e), trade_count=n,
                      avg_price=bar["ps"] / n, vwap=vwap_string(pq, v, e),
                      open_ts_ms=bar["o_ts"], close_ts_ms=bar["c_ts"])
