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
     "bars": {"1723161240000": <bar>, ...}}   # open windows, key = str(bucket_start_ms)

An open bar is a dict (short keys keep the changelog small)::

    {"b": bucket_start_ms, "o": open, "o_ts": ts_ms of open, "h": high, "l": low,
     "c": close, "c_ts": ts_ms of close, "v": sum qty, "n": trade count,
     "ps": sum price, "pq": sum price*qty, "first_ms": wall ms of first tick}

Rules:

* open = first trade by event time, ties broken by arrival order (earliest wins);
  close = last trade by event time, ties broken by arrival order (latest wins);
* a tick is *late* when its window already closed: ``bucket end <= watermark`` where
  ``watermark = max ts_ms seen on the partition - grace_ms``, or its bucket is at or
  before the key's newest closed bucket;
* a window closes when the watermark reaches its end, or when its key has been idle for
  ``idle_timeout_ms`` (wall clock) and the wall clock is past ``end + grace_ms``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "WINDOW_MS",
    "apply_tick",
    "bucket_start_ms",
    "closable_by_idle",
    "closable_by_watermark",
    "finalize_bar",
    "is_late",
    "new_key_state",
    "watermark_ms",
]

WINDOW_MS = 60_000

Bar = dict[str, Any]
KeyState = dict[str, Any]


def bucket_start_ms(ts_ms: int, size_ms: int = WINDOW_MS) -> int:
    """Start of the tumbling window containing ``ts_ms`` (floor to ``size_ms``).

    Args:
        ts_ms: UTC epoch milliseconds (>= 0).
        size_ms: window length in ms.

    Returns:
        int: ``ts_ms - ts_ms % size_ms``; ``ts_ms`` itself when it is a boundary
        (windows are half-open ``[start, start + size)``).
    """
    return ts_ms - ts_ms % size_ms


def watermark_ms(max_ts_ms: int, grace_ms: int) -> int:
    """Event-time watermark: highest ``ts_ms`` seen minus the grace period."""
    return max_ts_ms - grace_ms


def is_late(bucket_ms: int, wm_ms: int, closed_bucket_ms: int, size_ms: int = WINDOW_MS) -> bool:
    """Whether a tick of window ``bucket_ms`` arrives after that window closed.

    Args:
        bucket_ms: the tick's window start.
        wm_ms: partition watermark before this tick.
        closed_bucket_ms: the key's newest closed window start (-1 if none).
        size_ms: window length.
    """
    return bucket_ms + size_ms <= wm_ms or bucket_ms <= closed_bucket_ms


def closable_by_watermark(bucket_ms: int, wm_ms: int, size_ms: int = WINDOW_MS) -> bool:
    """A window closes once the watermark reaches its (exclusive) end."""
    return bucket_ms + size_ms <= wm_ms


def closable_by_idle(
    bucket_ms: int,
    last_seen_wall_ms: int,
    now_wall_ms: int,
    idle_timeout_ms: int,
    grace_ms: int,
    size_ms: int = WINDOW_MS,
) -> bool:
    """Idle close: the key saw no tick for ``idle_timeout_ms`` and wall time is past
    ``end + grace_ms`` (so a live window is never closed before its minute is over)."""
    return (
        now_wall_ms - last_seen_wall_ms >= idle_timeout_ms
        and bucket_ms + size_ms + grace_ms <= now_wall_ms
    )


def new_key_state(partition: int) -> KeyState:
    """Empty state for a key first seen on ``partition``."""
    return {"p": partition, "off": -1, "max_ts": -1, "seen_ms": 0, "closed": -1, "bars": {}}


def apply_tick(
    bars: dict[str, Bar], price: float, qty: float, ts_ms: int, wall_ms: int,
    size_ms: int = WINDOW_MS,
) -> None:
    """Add one trade to its open window in ``bars`` (created when missing).

    Args:
        bars: open windows of one key, ``str(bucket_start_ms) -> bar`` (mutated).
        price: quote currency per base unit.
        qty: base units (0 when unknown).
        ts_ms: event time, UTC epoch ms.
        wall_ms: arrival wall clock, UTC epoch ms (recorded for the first tick only).
        size_ms: window length.
    """
    b = ts_ms - ts_ms % size_ms
    k = str(b)
    bar = bars.get(k)
    if bar is None:
        bars[k] = {
            "b": b, "o": price, "o_ts": ts_ms, "h": price, "l": price, "c": price,
            "c_ts": ts_ms, "v": qty, "n": 1, "ps": price, "pq": price * qty,
            "first_ms": wall_ms,
        }
        return
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
    bar["v"] += qty
    bar["n"] += 1
    bar["ps"] += price
    bar["pq"] += price * qty


def finalize_bar(exchange: str, symbol: str, bar: Bar, size_ms: int = WINDOW_MS) -> dict[str, Any]:
    """The closed-bar message (topic value, DB row source) for an open bar.

    Returns:
        dict: the closed-bars schema (README "Topics")::

            {"exchange", "symbol", "bucket_start_ms", "bucket_end_ms", "open", "high",
             "low", "close", "volume", "trade_count", "avg_price", "min_price",
             "max_price", "vwap" (null when no qty), "open_ts_ms", "close_ts_ms"}
    """
    n = bar["n"]
    v = bar["v"]
    return {
        "exchange": exchange,
        "symbol": symbol,
        "bucket_start_ms": bar["b"],
        "bucket_end_ms": bar["b"] + size_ms,
        "open": bar["o"],
        "high": bar["h"],
        "low": bar["l"],
        "close": bar["c"],
        "volume": v,
        "trade_count": n,
        "avg_price": bar["ps"] / n,
        "min_price": bar["l"],
        "max_price": bar["h"],
        "vwap": (bar["pq"] / v) if v > 0 else None,
        "open_ts_ms": bar["o_ts"],
        "close_ts_ms": bar["c_ts"],
    }
