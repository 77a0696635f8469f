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

import faust
from faust.types import TableT

__all__ = ["WINDOW_TABLE", "declare_window_table"]

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
