"""CLI commands for historical data: ``faust -A app backfill`` (see :mod:`feeds.backfill`)."""

from __future__ import annotations

__all__: list[str] = []
