"""Reader of recorded exchange trades in the marketflow trades-CSV format.

Format (``docs/formats.md#trades-csv``; the files' provenance: ``data/sample/README.md``):
header ``exchange,market,symbol,trade_id,ts_ms,price,qty,is_buyer_maker[,extra...]``;
``ts_ms`` is the exchange's trade time (UTC epoch ms); ``price``/``qty`` are the exchange's
decimal strings (quote per base unit; base units). Sample row (Binance spot ``@trade``)::

    binance,spot,BTCUSDT,3735683259,1723161255342,61837.63000000,0.02000000,True,...
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from core.errors import ReplayError
from core.models import Tick

__all__ = ["REQUIRED_COLUMNS", "read_trades"]

REQUIRED_COLUMNS = ("exchange", "symbol", "trade_id", "ts_ms", "price", "qty")


def read_trades(path: str | Path, source: str = "replay") -> Iterator[Tick]:
    """Yield the file's trades as ticks, in file (exchange) order.

    Args:
        path: CSV file.
        source: the ticks' ``source`` field.

    Raises:
        ReplayError: unreadable file, missing columns, or a malformed row (with its line).
    """
    p = Path(path)
    try:
        fh = p.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"{p}: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReplayError(f"{p}: missing column(s) {missing}")
        for row in reader:
            try:
                yield Tick(
                    exchange=row["exchange"],
                    symbol=row["symbol"],
                    price=float(row["price"]),
                    qty=float(row["qty"]) if row["qty"] else 0.0,
                    ts_ms=int(row["ts_ms"]),
                    trade_id=row["trade_id"] or None,
                    source=source,
                )
            except (TypeError, ValueError) as exc:
                raise ReplayError(f"{p}:{reader.line_num}: {exc}") from exc
