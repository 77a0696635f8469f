"""The Faust table of open 1-minute windows, one entry per ``exchange:symbol``.

Values follow :mod:`tables.window`'s key-state schema. The table is changelog-backed:
after a crash or rebalance the worker that owns a partition recovers its open windows
(and the last applied offset per key, for de-duplication) from the changelog topic
``<app id>-window-state-changelog``.

Windows are tumbling and keyed by bucket start inside each entry; they are closed by
:class:`tables.aggregator.WindowAggregator` from the event-time watermark and an idle
check, not by Faust's wall-clock ``on_window_close``/``table_cleanup_interval``.
"""

from __future__ import annotations

from app import settings
from app.faust_app import app

__all__ = ["window_state"]

window_state = app.Table(
    "window-state",
    default=None,
    partitions=settings.topics.partitions,
    key_type=str,
    help="Open 1-minute windows per exchange:symbol (event time).",
)
