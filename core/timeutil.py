"""Time units and the boundaries built from them (pure, UTC epoch milliseconds).

Windows are half-open ``[start, end)``, keyed by their start. A minute is *sealed* for
``/ohlcv`` when no live bar can still change it (:func:`sealed_end_ms`), and *stored* when its
row in ``bars_1m`` is final (:func:`stored_end_ms`).
"""

from __future__ import annotations

import time

__all__ = ["MINUTE_MS", "SEAL_MARGIN_MS", "STORE_MARGIN_MS", "ceil_minute", "floor_minute",
           "live_window_ms", "now_ms", "sealed_end_ms", "settle_ms", "stale_write_ms",
           "stored_end_ms"]

#: one minute, the bar size
MINUTE_MS = 60_000
#: seal boundary a reader may have used (clock skew between workers, slow readers)
SEAL_MARGIN_MS = 2 * MINUTE_MS
#: a window's row is final this long after its window end plus the grace period
STORE_MARGIN_MS = 5_000
_MIN_LIVE_WINDOW_MS = 5 * MINUTE_MS


def now_ms() -> int:
    """Wall clock, UTC epoch milliseconds."""
    return time.time_ns() // 1_000_000


def floor_minute(ms: int) -> int:
    """Start of the UTC minute holding ``ms`` (epoch ms)."""
    return ms // MINUTE_MS * MINUTE_MS


def ceil_minute(ms: int) -> int:
    """Smallest minute boundary ``>= ms`` (epoch ms)."""
    return -(-ms // MINUTE_MS) * MINUTE_MS


def live_window_ms(grace_ms: int) -> int:
    """How far back (ms, from the current minute's start) ``/ohlcv`` merges live bars
    from Redis: minutes this recent may not be in TimescaleDB yet. At least 5 minutes, and
    ``grace_ms`` + 4 minutes (a bar is written about 1 minute + grace after its start)."""
    return max(_MIN_LIVE_WINDOW_MS, grace_ms + 4 * MINUTE_MS)


def stale_write_ms(grace_ms: int) -> int:
    """Age (ms, wall clock at commit minus ``bucket_start_ms``) from which a written bar
    invalidates the symbol's cached ranges: the live window minus :data:`SEAL_MARGIN_MS`."""
    return live_window_ms(grace_ms) - SEAL_MARGIN_MS


def sealed_end_ms(now: int, grace_ms: int, interval_ms: int) -> int:
    """First bucket start (UTC epoch ms, a multiple of ``interval_ms``) that is not sealed.

    Buckets ``[b, b + interval_ms)`` with ``b + interval_ms <= live_from`` (where
    ``live_from`` is the current minute's start minus :func:`live_window_ms`) are sealed,
    i.e. those with ``b < sealed_end_ms``.
    """
    live_from = floor_minute(now) - live_window_ms(grace_ms)
    return live_from - live_from % interval_ms


def stored_end_ms(now: int, grace_ms: int, margin_ms: int = STORE_MARGIN_MS) -> int:
    """Every minute starting before this boundary (epoch ms) is final in the database:
    its window ended at least ``grace_ms + margin_ms`` ago."""
    return floor_minute(now - grace_ms - margin_ms)


def settle_ms(grace_ms: int) -> int:
    """How long after its detection a gap waits before its repair (ms): the minutes up to
    the detection are then sealed."""
    return grace_ms + STORE_MARGIN_MS
