"""Replay sources: recorded trade files and stored 1-minute bars, as one event-time ordered
tick sequence each (:class:`TickSource`); see :mod:`feeds.replay.simulator` for how they
are published.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from core.config import Settings
from core.errors import ReplayError
from core.models import Tick
from core.timeutil import MINUTE_MS
from feeds.replay.bar_ticks import bar_tick_count, bar_to_ticks
from feeds.replay.trade_files import TradeColumns, chunk_ticks, read_columns, scan
from sql.bars_1m import fetch_bars

__all__ = ["BarSource", "FileSource", "TickSource", "load_bar_source", "merge_by_time",
           "merge_columns", "namespaced"]

_BARS_PAGE = 5_000


def merge_by_time(sources: Sequence[Iterable[Tick]]) -> Iterator[Tick]:
    """Merge per-file tick streams by ``ts_ms`` (stable: ties keep source order)."""
    return heapq.merge(*sources, key=lambda t: t.ts_ms)


def merge_columns(sources: Sequence[Iterable[TradeColumns]]) -> Iterator[TradeColumns]:
    """Merge per-file column batches by ``ts_ms``, like :func:`merge_by_time` merges ticks
    (stable: ties keep source order, then row order); each source must be time-ordered.

    Rows older than every source's buffered newest row are emitted, sorted by a stable
    sort of their concatenation (C-level, near linear on sorted runs); a source is read on
    when its buffer holds no row newer than that bound. One source passes through as is.

    Yields:
        TradeColumns: the merged rows in batches, each time-ordered, in order.
    """
    if len(sources) == 1:
        yield from (c for c in sources[0] if len(c))
        return
    iters = [iter(s) for s in sources]
    bufs: list[TradeColumns | None] = [None] * len(iters)
    done = [False] * len(iters)

    def refill(i: int) -> None:
        for c in iters[i]:
            if len(c):
                old = bufs[i]
                bufs[i] = c if old is None else TradeColumns.concat([old, c])
                return
        done[i] = True

    for i in range(len(iters)):
        refill(i)
    while True:
        for i, b in enumerate(bufs):  # no source may hold only rows at the bound
            while not done[i] and (b is None or b.ts_ms[0] == b.ts_ms[-1]):
                refill(i)
                b = bufs[i]
        if all(b is None for b in bufs):
            return
        open_ = [b.ts_ms[-1] for i, b in enumerate(bufs) if b is not None and not done[i]]
        bound = min(open_) if open_ else None
        parts: list[TradeColumns] = []
        for i, b in enumerate(bufs):
            if b is None:
                continue
            cut = len(b) if bound is None else bisect_left(b.ts_ms, bound)
            if cut:
                parts.append(b.slice(0, cut))
                bufs[i] = b.slice(cut, len(b)) if cut < len(b) else None
        if not parts:
            continue
        if len(parts) == 1:
            yield parts[0]
            continue
        whole = TradeColumns.concat(parts)
        yield whole.take(sorted(range(len(whole)), key=whole.ts_ms.__getitem__))


def namespaced(exchange: str, namespace: str) -> str:
    """``<namespace>.<exchange>``, or ``exchange`` itself when ``namespace`` is empty."""
    return f"{namespace}.{exchange}" if namespace else exchange


class TickSource(Protocol):
    """A replayable, seekable time-ordered tick sequence.

    Attributes:
        first_ts_ms, last_ts_ms: event-time range (UTC epoch ms) of the sequence.
        total: number of ticks in the sequence.
        description: JSON-able description for the replay state (``source``).
    """

    first_ts_ms: int
    last_ts_ms: int
    total: int
    description: dict[str, Any]

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """``(position, ticks)``: the ticks with ``ts_ms >= from_ts_ms`` in order, and how
        many ticks of the sequence come before them."""
        ...

    def chunks(self, from_ts_ms: int) -> tuple[int, Iterator[TradeColumns]]:
        """:meth:`ticks` as column batches (what the replay publishes from)."""
        ...


class FileSource:
    """Trade files (any format of :mod:`feeds.replay.trade_files`) merged by ``ts_ms``,
    exchanges renamed into ``namespace``.

    Args:
        files: the trade files.
        namespace: exchange prefix (``""``: the files' own names).
        exchange, symbol: for files that carry none (Binance dumps), see
            :func:`feeds.replay.trade_files.read_columns`.

    Raises:
        ReplayError: no files, a missing/empty/malformed file.
    """

    def __init__(self, files: Sequence[str | Path], namespace: str = "", *,
                 exchange: str | None = None, symbol: str | None = None) -> None:
        if not files:
            raise ReplayError("no input files")
        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise ReplayError(f"{f}: no such file")
        self.namespace = namespace
        self.exchange = exchange
        self.symbol = symbol
        scans = [scan(f, exchange=exchange, symbol=symbol) for f in self.files]
        self.first_ts_ms = min(s.first_ts_ms for s in scans)
        self.last_ts_ms = max(max(s.last_ts_ms for s in scans), self.first_ts_ms)
        self.total = sum(s.rows for s in scans)
        self.description: dict[str, Any] = {"files": [str(f) for f in self.files]}

    def chunks(self, from_ts_ms: int) -> tuple[int, Iterator[TradeColumns]]:
        """See :class:`TickSource` (skipping reads the files from the start)."""
        merged = merge_columns([read_columns(f, exchange=self.exchange, symbol=self.symbol)
                                for f in self.files])
        ns = self.namespace
        skipped = 0
        for c in merged:
            if c.ts_ms[-1] < from_ts_ms:
                skipped += len(c)
                continue
            cut = bisect_left(c.ts_ms, from_ts_ms)
            skipped += cut
            rest = chain([c.slice(cut, len(c)) if cut else c], merged)
            return skipped, (_renamed(x, ns) for x in rest) if ns else rest
        return skipped, iter(())

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """See :class:`TickSource`."""
        pos, chunks = self.chunks(from_ts_ms)
        return pos, chain.from_iterable(c.ticks() for c in chunks)


def _renamed(c: TradeColumns, namespace: str) -> TradeColumns:
    names = {e: namespaced(e, namespace) for e in set(c.exchange)}
    return replace(c, exchange=list(map(names.__getitem__, c.exchange)))


@dataclass
class _Bar:
    bucket_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: Decimal  # exact, as stored
    trade_count: int
    n_ticks: int = 0


@dataclass
class BarSource:
    """Stored 1-minute bars of one exchange/symbol as ticks (:mod:`feeds.replay.bar_ticks`).

    Attributes:
        exchange: the bars' exchange (as stored); the ticks get
            ``namespaced(exchange, namespace)``.
        symbol: the pair.
        bars: the bars, oldest first.
        namespace: see :func:`namespaced`.
        from_ms, to_ms: the requested range (bars starting in ``[from_ms, to_ms)``).
    """

    exchange: str
    symbol: str
    bars: list[_Bar]
    namespace: str
    from_ms: int
    to_ms: int
    description: dict[str, Any] = field(init=False)
    first_ts_ms: int = field(init=False)
    last_ts_ms: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.bars:
            raise ReplayError(f"no stored bars for {self.exchange}:{self.symbol} in the range")
        for b in self.bars:
            b.n_ticks = bar_tick_count(b.open, b.high, b.low, b.close, b.trade_count)
        self.first_ts_ms = self.bars[0].bucket_ms
        self.last_ts_ms = self.bars[-1].bucket_ms + MINUTE_MS - 1
        self.total = sum(b.n_ticks for b in self.bars)
        self.description = {"bars": {"exchange": self.exchange, "symbol": self.symbol,
                                     "from_ms": self.from_ms, "to_ms": self.to_ms,
                                     "count": len(self.bars)}}

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """See :class:`TickSource`; whole bars before ``from_ts_ms`` are skipped by count."""
        pos = 0
        start = 0
        while start < len(self.bars) and self.bars[start].bucket_ms + MINUTE_MS <= from_ts_ms:
            pos += self.bars[start].n_ticks
            start += 1
        head: list[Tick] = []
        if start < len(self.bars):
            head = self._bar_ticks(self.bars[start])
            keep = [t for t in head if t.ts_ms >= from_ts_ms]
            pos += len(head) - len(keep)
            head = keep
        return pos, self._iter(head, start + 1)

    def chunks(self, from_ts_ms: int) -> tuple[int, Iterator[TradeColumns]]:
        """See :class:`TickSource`."""
        pos, ticks = self.ticks(from_ts_ms)
        return pos, chunk_ticks(ticks)

    def _bar_ticks(self, b: _Bar) -> list[Tick]:
        return bar_to_ticks(namespaced(self.exchange, self.namespace), self.symbol,
                            b.bucket_ms, b.open, b.high, b.low, b.close, b.volume,
                            b.trade_count)

    def _iter(self, head: list[Tick], start: int) -> Iterator[Tick]:
        yield from head
        for b in self.bars[start:]:
            yield from self._bar_ticks(b)


async def load_bar_source(settings: Settings, exchange: str, symbol: str, from_ms: int,
                          to_ms: int, namespace: str) -> BarSource:
    """Read the 1-minute bars of ``exchange``/``symbol`` starting in ``[from_ms, to_ms)``
    from TimescaleDB (read-only).

    Raises:
        ReplayError: empty range or no bars there, or a bar that cannot become ticks.
        asyncpg.PostgresError, OSError: the database failed.
    """
    import asyncpg

    if to_ms <= from_ms:
        raise ReplayError("--to must be after --from")
    if namespace and exchange.startswith(f"{namespace}."):
        raise ReplayError(f"{exchange} is already in the {namespace!r} namespace")
    conn = await asyncpg.connect(settings.database.dsn.get_secret_value())
    bars: list[_Bar] = []
    try:
        lo = from_ms
        while True:
            rows = await fetch_bars(conn, symbol, exchange, lo, to_ms, _BARS_PAGE)
            for r in rows:
                bars.append(_Bar(int(r["bucket_start"].timestamp() * 1000), float(r["open"]),
                                 float(r["high"]), float(r["low"]), float(r["close"]),
                                 Decimal(r["volume"]), int(r["trade_count"])))
            if len(rows) < _BARS_PAGE:
                break
            lo = bars[-1].bucket_ms + MINUTE_MS
    finally:
        await conn.close()
    return BarSource(exchange, symbol, bars, namespace, from_ms, to_ms)


