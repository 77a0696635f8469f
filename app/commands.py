"""CLI commands on the Faust app: ``faust -A app replay|migrate|create-topics|backfill``
(:func:`register_commands`)."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import asyncpg
import faust
from faust.cli import argument, option

from core.admin import ensure_topics
from core.config import Settings
from core.errors import HistoryError, QueryError, ReplayError
from core.models import iso_ms
from feeds.history.backfill import BackfillProgress, run_backfill
from feeds.history.rest import make_history_client, split_symbol
from feeds.replay.simulator import replay_source, resolve_namespace
from feeds.replay.sources import FileSource, TickSource, load_bar_source
from sql.migrate import apply_migrations
from stores.connection import connect
from stores.ohlcv_cache import OhlcvCache
from views.params import parse_name, parse_time_ms

__all__ = ["format_backfill_progress", "register_commands"]

log = logging.getLogger(__name__)


def format_backfill_progress(p: Any) -> str:
    """One terminal line for a :class:`feeds.history.backfill.BackfillProgress`."""
    pos = "start" if p.next_to_ms is None else iso_ms(p.next_to_ms)
    eta = "?" if p.eta_s is None else f"{p.eta_s:.0f}s"
    return (f"[{p.source} {p.exchange} {p.symbol}] page {p.pages}: {p.bars_written} bars, "
            f"{p.requests} requests, {p.bars_per_s:.0f} bars/s, at {pos}, "
            f"{100 * p.fraction:.1f}% done, ETA {eta}")


def register_commands(app: faust.App, settings: Settings) -> None:
    """Register ``replay``, ``migrate``, ``create-topics`` and ``backfill`` on ``app``."""

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
        option("--exchange", type=str, default=None,
               help="exchange of the stored bars (--bars), or of trade files that carry "
                    "none (Binance dumps; default binance)"),
        option("--symbol", type=str, default=None,
               help="symbol of the stored bars (--bars), or of trade files that carry none "
                    "(Binance dumps; default: the file name up to its first -)"),
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
        """Market replay simulator: trade files (marketflow CSV, Binance trade dumps zipped
        or not, tardis.dev trades CSV, Parquet: docs/formats.md#trade-files) or stored
        1-minute bars (``--bars``) into the ticks topic; controllable over HTTP
        (``/replay/...``) and by signals (SIGUSR1 pause, SIGUSR2 resume) while it runs.

        Exits 0 when the replay finished or was stopped, 2 on bad arguments or input.
        """
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
                source = FileSource(files, ns, exchange=exchange, symbol=symbol)
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
        conn = await asyncpg.connect(settings.database.dsn.get_secret_value())
        try:
            applied = await apply_migrations(conn)
        finally:
            await conn.close()
        self.say(f"applied: {', '.join(applied)}" if applied else "schema up to date")


    @app.command(name="create-topics")
    async def create_topics(self: Any) -> None:
        """Create the ticks, closed-bars and dead-letter topics with their partition counts."""
        await ensure_topics(settings)
        self.say(f"topics ready: {settings.topics.ticks}, {settings.topics.bars}, "
                 f"{settings.topics.dead_letter} ({settings.topics.partitions} partitions)")

    @app.command(
        option("--symbol", "symbols", multiple=True, required=True,
               help="our symbol, e.g. BTCUSDT (repeatable)"),
        option("--exchange", "exchanges", multiple=True, required=True,
               help="our exchange name, e.g. binance (repeatable; history.exchange_map "
                    "maps it to the source's name)"),
        option("--from", "from_", required=True,
               help="range start, inclusive: ISO-8601 (UTC when naive) or epoch ms"),
        option("--to", "to", required=True, help="range end, exclusive: ISO-8601 or epoch ms"),
        option("--source", type=str, default=None,
               help="cryptocompare or coindesk (default: history.source)"),
        option("--overwrite-own", is_flag=True, default=None,
               help="replace bars built from our own ticks (default: history.overwrite_own)"),
        option("--force", is_flag=True, default=False, help="run finished jobs again"),
    )
    async def backfill(self: Any, symbols: tuple[str, ...], exchanges: tuple[str, ...],
                       from_: str, to: str, source: str | None, overwrite_own: bool | None,
                       force: bool) -> None:
        """Fetch historical 1-minute bars from a REST source into bars_1m (resumable)."""
        def fail(msg: str) -> NoReturn:
            self.say(f"backfill: {msg}", err=True)
            raise SystemExit(2)

        try:
            start_ms = parse_time_ms(from_, "--from")
            end_ms = parse_time_ms(to, "--to")
            for name in (*symbols, *exchanges):
                parse_name(name, "name")
            for sym in symbols:
                split_symbol(sym)
        except (QueryError, HistoryError) as exc:
            fail(str(exc))
        if start_ms >= end_ms:
            fail("--from must be before --to")
        if source is not None and source not in ("cryptocompare", "coindesk"):
            fail(f"--source must be cryptocompare or coindesk, not {source!r}")
        h = settings.history.model_copy(update={"source": source} if source else {})
        client = make_history_client(h)
        if client is None:
            fail("no history source: set history.source (MARKETFLOW_HISTORY__SOURCE) "
                 "or pass --source")
        assert client is not None
        overwrite = h.overwrite_own if overwrite_own is None else overwrite_own
        cache = OhlcvCache(connect(settings.redis.url.get_secret_value()),
                           settings.redis.key_prefix, settings.web.ohlcv_cache_ttl_s,
                           settings.web.ohlcv_cache_max_bytes)
        failed: list[str] = []
        pool: asyncpg.Pool | None = None
        try:
            pool = await asyncpg.create_pool(settings.database.dsn.get_secret_value(),
                                             min_size=1, max_size=2)
            if settings.database.migrate_on_start:
                async with pool.acquire() as conn:
                    await apply_migrations(conn)
            for exchange in exchanges:
                for symbol in symbols:
                    async def invalidate(bars: list[dict[str, Any]], sym: str = symbol) -> None:
                        await cache.invalidate({sym})

                    def show(p: BackfillProgress) -> None:
                        if p.skipped:
                            self.say(f"[{p.source} {p.exchange} {p.symbol}] already done "
                                     f"({p.total_bars_written} bars); --force to run again")
                        elif p.state == "fetching":
                            self.say(format_backfill_progress(p))

                    self.say(f"[{client.source} {exchange} {symbol}] backfill "
                             f"{from_} .. {to} (overwrite_own={overwrite})")
                    try:
                        prog = await run_backfill(pool, client, exchange, symbol, start_ms,
                                                  end_ms, overwrite_own=overwrite,
                                                  on_written=invalidate, progress=show,
                                                  force=force)
                    except HistoryError as exc:
                        failed.append(f"{exchange} {symbol}: {exc}")
                        self.say(f"[{client.source} {exchange} {symbol}] FAILED: {exc} "
                                 "(re-run to resume)", err=True)
                        continue
                    if not prog.skipped:
                        self.say(f"[{client.source} {exchange} {symbol}] done: "
                                 f"{prog.bars_written} bars in {prog.pages} pages, "
                                 f"{prog.requests} requests, {prog.elapsed_s:.1f} s")
        except (OSError, asyncpg.PostgresError) as exc:
            self.say(f"backfill: database error: {exc}", err=True)
            raise SystemExit(1) from None
        finally:
            await client.close()
            await cache.redis.aclose()
            if pool is not None:
                await pool.close()
        if failed:
            self.say(f"backfill: {len(failed)} job(s) failed: " + "; ".join(failed), err=True)
            raise SystemExit(1)
