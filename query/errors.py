"""The error of the query layer."""

from __future__ import annotations

from core.errors import MarketflowError

__all__ = ["StorageUnavailable"]


class StorageUnavailable(MarketflowError):
    """The database or Redis did not answer, so the query cannot be answered.

    The message names what failed and how, e.g. ``database unavailable: OSError``; the
    views answer 503 with it as is.
    """
