"""Readers of recorded trade files, in the formats users already have, with pyarrow.

Every format is read in record batches by pyarrow's CSV or Parquet reader and normalised
to one column set, :class:`TradeColumns` (``exchange, symbol, trade_id, ts_ms, price,
qty``); :func:`read_trades` turns those into :class:`core.models.Tick` values. Formats
(``docs/formats.md``; samples and their provenance: ``data/sample/README.md``):

``marketflow-csv`` (``docs/formats.md#trades-csv``), a header naming at least
``exchange,symbol,trade_id,ts_ms,price,qty``::

    exchange,market,symbol,trade_id,ts_ms,price,qty,is_buyer_maker,...
    binance,spot,BTCUSDT,3735683259,1723161255342,61837.63000000,0.02000000,True,...

``binance-trades`` (``docs/formats.md#binance-trade-dumps``), Binance's public trade
dumps as published: ``<SYMBOL>-trades-<date>.zip`` holding one CSV, or that CSV unzipped.
Spot files have no header, futures files have ``id,price,qty,quote_qty,time,
is_buyer_maker``; ``time`` is epoch milliseconds, or microseconds (spot files from
2025-01-01); the exchange is not in the file (argument, default ``binance``), the symbol
is the file name's first part::

    3735683259,61837.63000000,0.02000000,1236.75260000,1723161255342,True,True

``tardis-trades`` (``docs/formats.md#tardis-trades-csv``), tardis.dev ``trades`` CSV,
usually gzipped (``.csv.gz``); ``timestamp`` is the exchange's time in epoch
microseconds (``local_timestamp``, the receive time, is not used)::

    exchange,symbol,timestamp,local_timestamp,id,side,price,amount
    binance,BTCUSDT,1723161255342000,1723161254087896,3735683259,sell,61837.63,0.02

``parquet``: a Parquet file with the marketflow CSV's columns (``price``/``qty`` as
doubles or decimal strings).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from core.errors import ReplayError
from core.models import Tick

__all__ = ["FORMATS", "REQUIRED_COLUMNS", "TradeColumns", "chunk_ticks", "detect_format",
           "read_columns", "read_trades", "scan"]

#: the formats :func:`detect_format` recognises
FORMATS = ("marketflow-csv", "binance-trades", "tardis-trades", "parquet")
#: the columns a marketflow trades CSV (or Parquet file) must have
REQUIRED_COLUMNS = ("exchange", "symbol", "trade_id", "ts_ms", "price", "qty")
_TARDIS_COLUMNS = ("exchange", "symbol", "timestamp", "id", "price", "amount")
_BINANCE_HEADER = ("id", "price", "qty", "time")
#: epoch values at or above this are microseconds (1e14 ms is the year 5138)
_US_THRESHOLD = 10**14
_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class TradeColumns:
    """One batch of trades as parallel columns, in file order.

    Attributes:
        exchange, symbol: per trade.
        trade_id: exchange trade id as text, or None.
        ts_ms: exchange trade time, UTC epoch ms.
        price: quote currency per base unit.
        qty: base units (0.0 when the file has none).
        source: the ticks' ``source`` field, shared by the batch.
    """

    exchange: list[str]
    symbol: list[str]
    trade_id: list[str | None]
    ts_ms: list[int]
    price: list[float]
    qty: list[float]
    source: str = "replay"

    def __len__(self) -> int:
        return len(self.ts_ms)

    def slice(self, start: int, stop: int) -> TradeColumns:
        """Rows ``[start, stop)`` (list slices, like ``list[start:stop]``)."""
        return TradeColumns(self.exchange[start:stop], self.symbol[start:stop],
                            self.trade_id[start:stop], self.ts_ms[start:stop],
                            self.price[start:stop], self.qty[start:stop], self.source)

    def take(self, rows: list[int]) -> TradeColumns:
        """The rows at the indices ``rows``, in that order."""
        return TradeColumns([self.exchange[k] for k in rows], [self.symbol[k] for k in rows],
                            [self.trade_id[k] for k in rows], [self.ts_ms[k] for k in rows],
                            [self.price[k] for k in rows], [self.qty[k] for k in rows],
                            self.source)

    @staticmethod
    def concat(parts: Sequence[TradeColumns]) -> TradeColumns:
        """The rows of ``parts`` one after the other (the first part's ``source``)."""
        def cat(get: Callable[[TradeColumns], list[Any]]) -> list[Any]:
            return list(chain.from_iterable(map(get, parts)))
        return TradeColumns(cat(attrgetter("exchange")), cat(attrgetter("symbol")),
                            cat(attrgetter("trade_id")), cat(attrgetter("ts_ms")),
                            cat(attrgetter("price")), cat(attrgetter("qty")), parts[0].source)

    def ticks(self) -> Iterator[Tick]:
        """The rows as :class:`core.models.Tick` values, in order."""
        return map(Tick, self.exchange, self.symbol, self.price, self.qty, self.ts_ms,
                   self.trade_id, repeat(self.source, len(self.ts_ms)))


def chunk_ticks(ticks: Iterable[Tick], size: int = 8192) -> Iterator[TradeColumns]:
    """Ticks as :class:`TradeColumns` of at most ``size`` rows, in order; a chunk ends
    where the ``source`` changes (``recv_ms`` is not kept)."""
    rows: list[Tick] = []
    for t in ticks:
        if rows and (len(rows) >= size or t.source != rows[0].source):
            yield _from_ticks(rows)
            rows = []
        rows.append(t)
    if rows:
        yield _from_ticks(rows)


def _from_ticks(rows: list[Tick]) -> TradeColumns:
    return TradeColumns([t.exchange for t in rows], [t.symbol for t in rows],
                        [t.trade_id for t in rows], [t.ts_ms for t in rows],
                        [t.price for t in rows], [t.qty for t in rows], rows[0].source)


def _head(path: Path) -> bytes:
    """The first bytes of the file's (or zip member's) text."""
    if path.suffix == ".zip":
        with _zip_member(path) as fh:
            return fh.read(4096)
    with pa.input_stream(str(path), compression="detect") as s:
        return bytes(s.read(4096))


def _zip_member(path: Path) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ReplayError(f"{path}: {exc}") from exc
    names = [n for n in zf.namelist() if n.endswith(".csv")]
    if len(names) != 1:
        raise ReplayError(f"{path}: expected one .csv inside the zip, found {names}")
    return zf.open(names[0])


def detect_format(path: str | Path) -> str:
    """The file's format (one of :data:`FORMATS`), from its name and first line.

    Raises:
        ReplayError: unreadable file, or a first line no format matches.
    """
    p = Path(path)
    if p.suffix == ".parquet":
        return "parquet"
    try:
        head = _head(p)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReplayError(f"{p}: {exc}") from exc
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
    cols = tuple(c.strip() for c in first.split(","))
    if all(c in cols for c in _TARDIS_COLUMNS) and "local_timestamp" in cols:
        return "tardis-trades"
    if all(c in cols for c in REQUIRED_COLUMNS):
        return "marketflow-csv"
    if p.suffix == ".zip" or (cols[:2] == ("id", "price")) or (
            len(cols) >= 6 and cols[0].isdigit()):
        return "binance-trades"
    if "exchange" in cols or "symbol" in cols:  # looks like ours, with columns missing
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        raise ReplayError(f"{p}: missing column(s) {missing}")
    raise ReplayError(f"{p}: not a trades file of a known format ({', '.join(FORMATS)}); "
                      f"first line {first[:80]!r}")


def _csv_batches(source: Any, names: list[str] | None, types: dict[str, pa.DataType],
                 include: list[str], p: Path) -> Iterator[pa.RecordBatch]:
    read = pa_csv.ReadOptions(block_size=_BLOCK_BYTES, column_names=names)
    convert = pa_csv.ConvertOptions(column_types=types, include_columns=include,
                                    strings_can_be_null=True)
    try:
        reader = pa_csv.open_csv(source, read_options=read, convert_options=convert)
        yield from reader
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReplayError(f"{p}: {exc}") from exc


def _ms(ts: pa.Array) -> pa.Array:
    """Epoch ms from epoch ms or µs (decided per batch by magnitude)."""
    top = pc.max(ts).as_py()
    if top is not None and top >= _US_THRESHOLD:
        return pc.divide(ts, 1000)
    return ts


#: one record batch as read, with its column names: ``(batch, exchange, symbol, trade_id,
#: ts_ms (array), price, qty, path)``
_Raw = tuple[pa.RecordBatch, str, str, str, pa.Array, str, str, Path]


def _check(batch: pa.RecordBatch, ex: str, sym: str, ts: pa.Array, price: str,
           p: Path) -> None:
    for name in (ex, sym, price):
        if batch.column(name).null_count:
            raise ReplayError(f"{p}: a row without {name!r}")
    if ts.null_count:
        raise ReplayError(f"{p}: a row without its trade time")


def _columns(batch: pa.RecordBatch, ex: str, sym: str, tid: str, ts: pa.Array,
             price: str, qty: str, p: Path) -> TradeColumns:
    _check(batch, ex, sym, ts, price, p)
    return TradeColumns(
        exchange=_names(batch.column(ex)), symbol=_names(batch.column(sym)),
        trade_id=batch.column(tid).to_pylist(), ts_ms=ts.to_pylist(),
        price=_doubles(batch.column(price), p).to_pylist(),
        qty=pc.fill_null(_doubles(batch.column(qty), p), 0.0).to_pylist())


def _doubles(col: pa.Array, p: Path) -> pa.Array:
    if pa.types.is_floating(col.type):
        return col
    try:
        return pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ReplayError(f"{p}: {exc}") from exc


def _const(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def _names(col: pa.Array) -> list[str]:
    """A name column as a list; one value repeated when the batch has one (the usual
    case: a file per symbol), so its rows share one string."""
    if len(col) and len(pc.unique(col)) == 1:
        return [col[0].as_py()] * len(col)
    return col.to_pylist()


def read_columns(path: str | Path, *, exchange: str | None = None,
                 symbol: str | None = None) -> Iterator[TradeColumns]:
    """The file's trades in batches of normalised columns, in file order.

    Args:
        path: a file in one of :data:`FORMATS` (:func:`detect_format`).
        exchange: the exchange of files that carry none (Binance dumps; default
            ``binance``); files with an exchange column keep theirs.
        symbol: the symbol of files that carry none (Binance dumps; default: the file name
            up to its first ``-``).

    Raises:
        ReplayError: unreadable file, missing columns, or a value that does not parse.
    """
    for raw in _raw_batches(Path(path), exchange, symbol):
        yield _columns(*raw)


def _raw_batches(p: Path, exchange: str | None, symbol: str | None) -> Iterator[_Raw]:
    fmt = detect_format(p)
    if fmt == "parquet":
        yield from _parquet(p)
        return
    if fmt == "marketflow-csv":
        types = {"exchange": pa.string(), "symbol": pa.string(), "trade_id": pa.string(),
                 "ts_ms": pa.int64(), "price": pa.float64(), "qty": pa.float64()}
        with pa.input_stream(str(p), compression="detect") as s:
            for b in _csv_batches(s, None, types, list(REQUIRED_COLUMNS), p):
                yield (b, "exchange", "symbol", "trade_id", _ms(b.column("ts_ms")),
                               "price", "qty", p)
        return
    if fmt == "tardis-trades":
        types = {"exchange": pa.string(), "symbol": pa.string(), "id": pa.string(),
                 "timestamp": pa.int64(), "price": pa.float64(), "amount": pa.float64()}
        with pa.input_stream(str(p), compression="detect") as s:
            for b in _csv_batches(s, None, types, list(_TARDIS_COLUMNS), p):
                yield (b, "exchange", "symbol", "id", _ms(b.column("timestamp")),
                               "price", "amount", p)
        return
    ex = exchange or "binance"
    sym = symbol or p.name.split("-", 1)[0].split(".", 1)[0]
    header = _head(p).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    names = None if header.startswith("id,") else [
        "id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "is_best_match"][
        :header.count(",") + 1]
    types = {"id": pa.string(), "price": pa.float64(), "qty": pa.float64(),
             "time": pa.int64()}
    opened = _zip_member(p) if p.suffix == ".zip" else pa.input_stream(str(p))
    with opened as s:
        for b in _csv_batches(s, names, types, list(_BINANCE_HEADER), p):
            n = b.num_rows
            b = b.append_column("exchange", _const(ex, n)).append_column(
                "symbol", _const(sym, n))
            yield (b, "exchange", "symbol", "id", _ms(b.column("time")), "price",
                           "qty", p)


def _parquet(p: Path) -> Iterator[_Raw]:
    try:
        f = pq.ParquetFile(p)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReplayError(f"{p}: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in f.schema_arrow.names]
    if missing:
        raise ReplayError(f"{p}: missing column(s) {missing}")
    for b in f.iter_batches(batch_size=65_536, columns=list(REQUIRED_COLUMNS)):
        tid = b.column("trade_id")
        if not pa.types.is_string(tid.type):
            b = b.set_column(b.schema.get_field_index("trade_id"), "trade_id",
                             pc.cast(tid, pa.string()))
        yield (b, "exchange", "symbol", "trade_id",
                       _ms(pc.cast(b.column("ts_ms"), pa.int64())), "price", "qty", p)


def read_trades(path: str | Path, source: str = "replay", *, exchange: str | None = None,
                symbol: str | None = None) -> Iterator[Tick]:
    """Yield the file's trades as ticks, in file (exchange) order.

    Args:
        path: a trades file in one of :data:`FORMATS`.
        source: the ticks' ``source`` field.
        exchange, symbol: see :func:`read_columns`.

    Raises:
        ReplayError: see :func:`read_columns`.
    """
    for c in read_columns(path, exchange=exchange, symbol=symbol):
        c = replace(c, source=source)
        yield from c.ticks()


@dataclass(frozen=True)
class Scan:
    """What one pass over a trades file found.

    Attributes:
        rows: number of trades.
        first_ts_ms, last_ts_ms: ``ts_ms`` of the first and the last trade (file order).
    """

    rows: int
    first_ts_ms: int
    last_ts_ms: int


def scan(path: str | Path, *, exchange: str | None = None,
         symbol: str | None = None) -> Scan:
    """Count the file's trades and find its first and last ``ts_ms``.

    Raises:
        ReplayError: see :func:`read_columns`, or a file without trades.
    """
    rows, first, last = 0, None, None
    for b, ex, sym, _tid, ts, price, _qty, p in _raw_batches(Path(path), exchange, symbol):
        _check(b, ex, sym, ts, price, p)
        if len(ts):
            first = ts[0].as_py() if first is None else first
            last = ts[-1].as_py()
            rows += len(ts)
    if first is None or last is None:
        raise ReplayError(f"{path}: no trades")
    return Scan(rows, first, last)
