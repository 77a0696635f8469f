"""CLI commands for historical data: ``faust -A app backfill`` (see :mod:`feeds.history.backfill`).

Usage::

    faust -A app backfill --symbol BTCUSDT [--symbol ETHUSDT] --exchange binance \\
        [--exchange coinbase] --from 2024-08-08T00:00:00Z --to 2024-08-09T00:00:00Z \\
        [--source cryptocompare|coindesk] [--overwrite-own] [--force]

Exit status: 0 when every job finished, 1 when a job failed (the error is printed; re-run
to resume), 2 on bad arguments or configuration.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import asyncpg
from faust.cli import option

from app import settings
from app.faust_app import app
from core.errors import HistoryError, QueryError

__all__ = ["backfill", "format_progress"]

log = logging.getLogger(__name__)


def format_progress(p: Any) -> str:
    """One terminal line for a :class:`feeds.history.backfill.BackfillProgress`."""
    from views.params import iso_ms

    pos = "start" if p.next_to_ms is None else iso_ms(p.next_to_ms)
    eta = "?" if p.eta_s is None else f"{p.eta_s:.0f}s"
    return (f"[{p.source} {p.exchange} {p.symbol}] page {p.pages}: {p.bars_written} bars, "
            f"{p.requests} requests, {p.bars_per_s:.0f} bars/s, at {pos}, "
            f"{100 * p.fraction:.1f}% done, ETA {eta}")


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
    from feeds.history.backfill import BackfillProgress, run_backfill
    from feeds.history.rest import make_history_client, split_symbol
    from sql.migrate import apply_migrations
    from stores.ohlcv_cache import OhlcvCache
    from views.params import parse_name, parse_time_ms

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
    cache = OhlcvCache(settings.redis.url, settings.redis.key_prefix,
                       settings.web.ohlcv_cache_ttl_s, settings.web.ohlcv_cache_max_bytes)
    failed: list[str] = []
    pool: asyncpg.Pool | None = None
    try:
        pool = await asyncpg.create_pool(settings.database.dsn, min_size=1, max_size=2)
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
                        self.say(format_progress(p))

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
        await cache.client.aclose()
        if pool is not None:
            await pool.close()
    if failed:
        self.say(f"backfill: {len(failed)} job(s) failed: " + "; ".join(failed), err=True)
        raise SystemExit(1)
