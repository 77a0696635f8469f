"""CLI commands on the Faust app: ``faust -A app replay|migrate|create-topics``."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from faust.cli import argument, option

from app import settings
from app.errors import ReplayError
from app.faust_app import app

__all__ = ["create_topics", "migrate", "replay"]

log = logging.getLogger(__name__)


@app.command(
    argument("files", nargs=-1, required=True),
    option("--speed", type=float, default=0.0, show_default=True,
           help="0 = as fast as possible, 1 = real time, 60 = one minute per second"),
    option("--rebase-now", is_flag=True, default=False,
           help="re-stamp trades so the first one lands at now"),
    option("--repeat", is_flag=True, default=False,
           help="replay again and again (needs --rebase-now)"),
    option("--batch-max", type=int, default=1000, show_default=True,
           help="most ticks per flush"),
    option("--batch-span-ms", type=int, default=1000, show_default=True,
           help="event-time span of one flush (keep below window.grace_ms)"),
)
async def replay(self: Any, files: tuple[str, ...], speed: float, rebase_now: bool,
                 repeat: bool, batch_max: int, batch_span_ms: int) -> None:
    """Replay trades CSV files (shared/data/trades format) into the ticks topic."""
    from feeds.replay import replay as run_replay

    try:
        stats = await run_replay(settings, files, speed=speed, rebase_now=rebase_now,
                                 loop=repeat, batch_max=batch_max, batch_span_ms=batch_span_ms)
    except ReplayError as exc:
        self.say(f"replay: {exc}", err=True)
        raise SystemExit(2) from None
    self.say(f"replayed {stats.ticks} ticks in {stats.messages} messages, "
             f"{stats.loops} loop(s), {stats.seconds:.2f} s")


@app.command()
async def migrate(self: Any) -> None:
    """Apply pending sql/migrations to the configured database."""
    from sql.migrate import apply_migrations

    conn = await asyncpg.connect(settings.database.dsn)
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    self.say(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@app.command(name="create-topics")
async def create_topics(self: Any) -> None:
    """Create the ticks, closed-bars and dead-letter topics with their partition counts."""
    from app.admin import ensure_topics

    await ensure_topics(settings)
    self.say(f"topics ready: {settings.topics.ticks}, {settings.topics.bars}, "
             f"{settings.topics.dead_letter} ({settings.topics.partitions} partitions)")
