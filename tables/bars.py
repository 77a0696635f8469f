"""The Faust table of open 1-minute windows, one entry per ``exchange:symbol``
(:func:`declare_window_table`).

Values follow :mod:`tables.window`'s key-state schema. The table is changelog-backed:
after a crash or rebalance the worker that owns a partition recovers its open windows
(and the last applied offset per key, for de-duplication) from the changelog topic
``<app id>-window-state-changelog``.

Windows are tumbling and keyed by bucket start inside each entry; they are closed by
:class:`tables.aggregator.WindowAggregator` from the event-time watermark and an idle
check, not by Faust's wall-clock ``on_window_close``/``table_cleanup_interval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.types import TableT

from core.timeutil import MINUTE_MS
from tables.window import finalize_bar

__all__ = ["WINDOW_TABLE", "declare_window_table", "open_bars"]

#: the table's name (its changelog topic is ``<app id>-window-state-changelog``)
WINDOW_TABLE = "window-state"


def declare_window_table(app: faust.App, partitions: int) -> TableT:
    """Declare the window table on ``app``, co-partitioned with ``ticks`` (``partitions``
    must equal the ``ticks`` topic's partition count)."""
    return app.Table(
        WINDOW_TABLE,
        default=None,
        partitions=partitions,
        key_type=str,
        help="Open 1-minute windows per exchange:symbol (event time).",
    )


def open_bars(store: Mapping[str, Any], symbol: str, exchange: str | None, start_ms: int,
              end_ms: int) -> list[dict[str, Any]]:
    """The open 1-minute bars this worker holds in its window state for ``symbol`` (on
    ``exchange``, or every exchange) with start in ``[start_ms, end_ms)``, as live bars
    (:func:`tables.window.finalize_bar` plus ``"closed": false``).

    The request path's stand-in for the live bars in Redis while Redis is down: only the
    keys of partitions this worker owns are in its store, so other keys' open minutes
    are missing (the answer says ``degraded``).

    Args:
        store: the window table (``"exchange:symbol" -> key state``, :mod:`tables.window`).
        symbol: the symbol.
        exchange: one exchange, None for all.
        start_ms: range start, UTC epoch ms.
        end_ms: range end (exclusive), UTC epoch ms.
    """
    if exchange is not None:
        keys = [f"{exchange}:{symbol}"]
    else:
        keys = [k for k in list(store.keys()) if k.rpartition(":")[2] == symbol]
    out: list[dict[str, Any]] = []
    for key in keys:
        st = store.get(key)
        if not st:
            continue
        ex = key.rpartition(":")[0]
        for bar in list(st.get("bars", {}).values()):
            if start_ms <= bar["b"] < end_ms:
                out.append({**finalize_bar(ex, symbol, bar, MINUTE_MS), "closed": False})
    return out
