"""CLI commands on the Faust app: ``faust -A app replay|migrate|create-topics``."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from faust.cli import argument, option

from app import settings
from app.faust_app import app
from core.errors import QueryError, ReplayError

__all__ = ["create_topics", "migrate", "replay"]

log = logging.getLogger(__name__)


@app.command(
    argument("files", nargs=-1, required=False),
    option("--speed", type=float, default=0.0, show_default=True,
           help="0 = as fast as possible, 1 = real time, 60 = one minute per second"),
    option("--rebase-now", is_flag=True, default=False,
           help="re-stamp trades so the first one lands at now (a live-like feed)"),
    option("--repeat", is_flag=True, default=False,
           help="replay again and again (needs --rebase-now)"),
    option("--batch-max", type=int, default=1000, show_default=True,
           help="most ticks per flush"),
    option("--batch-span-ms", type=int, default=1000, show_default=True,
           help="event-time span of one flush (keep below window.grace_ms)"),
    option("--namespace", type=str, default=None,
           help='exchange prefix of the replayed ticks (<ns>.<exchange>); "" = real names; '
                "default: replay.namespace, or \"\" with --rebase-now"),
    option("--bars", is_flag=True, default=False,
           help="replay stored 1-minute bars (--exchange, --symbol, --from, --to) instead "
                "of trade files"),
    option("--exchange", type=str, default=None, help="exchange of the stored bars (--bars)"),
    option("--symbol", type=str, default=None, help="symbol of the stored bars (--bars)"),
    option("--from", "from_", type=str, default=None,
           help="first bar (--bars): ISO-8601 (UTC when naive) or epoch ms"),
    option("--to", type=str, default=None,
           help="end of the range, exclusive (--bars): ISO-8601 or epoch ms"),
    option("--progress-s", type=float, default=2.0, show_default=True,
           help="seconds between progress lines on stderr (0 = none)"),
)
async def replay(self: Any, files: tuple[str, ...], speed: float, rebase_now: bool,
                 repeat: bool, batch_max: int, batch_span_ms: int, namespace: str | None,
                 bars: bool, exchange: str | None, symbol: str | None, from_: str | None,
                 to: str | None, progress_s: float) -> None:
    """Market replay simulator: trades CSV files (shared/data/trades format) or stored
    1-minute bars (``--bars``) into the ticks topic; controllable over HTTP
    (``/replay/...``) and by signals (SIGUSR1 pause, SIGUSR2 resume) while it runs.

    Exits 0 when the replay finished or was stopped, 2 on bad arguments or input.
    """
    from feeds.replay.simulator import (
        FileSource,
        TickSource,
        load_bar_source,
        replay_source,
        resolve_namespace,
    )
    from views.params import iso_ms, parse_time_ms

    def progress(line: str) -> None:
        self.say(line, err=True)

    try:
        ns = resolve_namespace(namespace, rebase_now, settings.replay.namespace)
        source: TickSource
        if bars:
            if files:
                raise ReplayError("--bars replays stored bars: give no files")
            if not (exchange and symbol and from_ and to):
                raise ReplayError("--bars needs --exchange, --symbol, --from and --to")
            try:
                from_ms = parse_time_ms(from_, "from")
                to_ms = parse_time_ms(to, "to")
            except QueryError as exc:
                raise ReplayError(str(exc)) from exc
            source = await load_bar_source(settings, exchange, symbol, from_ms, to_ms, ns)
        else:
            if not files:
                raise ReplayError("give trade files, or --bars")
            source = FileSource(files, ns)
        stats = await replay_source(
            settings, source, speed=speed, rebase_now=rebase_now, loop=repeat,
            batch_max=batch_max, batch_span_ms=batch_span_ms, namespace=ns,
            progress=progress if progress_s > 0 else None,
            progress_interval_s=progress_s or 2.0)
    except ReplayError as exc:
        self.say(f"replay: {exc}", err=True)
        raise SystemExit(2) from None
    except (OSError, asyncpg.PostgresError) as exc:
        self.say(f"replay: cannot read stored bars: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(1) from None
    where = f" into namespace {ns!r}" if ns else ""
    self.say(f"replayed {stats.ticks} ticks in {stats.messages} messages, "
             f"{stats.loops} loop(s), {stats.seconds:.2f} s{where}; {stats.state} at "
             f"{iso_ms(stats.clock_ms)}")


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
    from core.admin import ensure_topics

    await ensure_topics(settings)
    self.say(f"topics ready: {settings.topics.ticks}, {settings.topics.bars}, "
             f"{settings.topics.dead_letter} ({settings.topics.partitions} partitions)")
