#!/usr/bin/env python3
"""Write the real sample trades of ``data/sample/trades/`` in the other formats the replay
reads, under ``data/sample/formats/`` (``data/sample/README.md#formats``).

Run from the repository root: ``.venv/bin/python scripts/format_samples.py``. The output
is deterministic (fixed zip times, gzip mtime 0), so re-running changes nothing.

* Binance trade dumps (``docs/formats.md#binance-trade-dumps``): spot, no header, trade
  time in ms and, as Binance writes spot files from 2025-01-01, in µs; USD-M futures, with
  header. Spot rows keep the source's own ``quote_qty`` and ``is_best_match``; the USD-M
  source has no ``quote_qty``, so it is ``price * qty`` computed exactly in decimal.
* tardis.dev ``trades`` CSV, gzipped (``docs/formats.md#tardis-trades-csv``): exchange
  ``binance-futures`` (tardis' name for USD-M), ``timestamp`` the trade time in µs,
  ``local_timestamp`` the capture's own receive time (``local_ts_ns`` / 1000), ``side`` the
  taker's side (``sell`` when the buyer was the maker).
* Parquet with the marketflow CSV's columns, price and qty as the exchange's decimal
  strings.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TRADES = ROOT / "data" / "sample" / "trades"
OUT = ROOT / "data" / "sample" / "formats"
SPOT = TRADES / "binance_spot_btcusdt_2020-09-27_trades.csv"
USDM = TRADES / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
_ZIP_TIME = (2026, 12, 2, 0, 0, 0)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def csv_text(header: list[str] | None, body: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def write_zip(path: Path, member: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = zipfile.ZipInfo(member, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(info, text)


def main() -> None:
    spot = rows(SPOT)
    for unit, scale in (("", 1), ("-microseconds", 1000)):
        body = [[r["trade_id"], r["price"], r["qty"], r["quote_qty"],
                 str(int(r["ts_ms"]) * scale), r["is_buyer_maker"], r["is_best_match"]]
                for r in spot]
        name = f"BTCUSDT-trades-2020-09-27{unit}"
        write_zip(OUT / "binance-spot" / f"{name}.zip", f"{name}.csv", csv_text(None, body))

    usdm = rows(USDM)
    body = [[r["trade_id"], r["price"], r["qty"],
             str(Decimal(r["price"]) * Decimal(r["qty"])), r["ts_ms"],
             r["is_buyer_maker"].lower()] for r in usdm]
    name = "BTCUSDT-trades-2024-08-08"
    write_zip(OUT / "binance-um" / f"{name}.zip", f"{name}.csv",
              csv_text(["id", "price", "qty", "quote_qty", "time", "is_buyer_maker"], body))

    body = [["binance-futures", r["symbol"], str(int(r["ts_ms"]) * 1000),
             str(int(r["local_ts_ns"]) // 1000), r["trade_id"],
             "sell" if r["is_buyer_maker"] == "True" else "buy", r["price"], r["qty"]]
            for r in usdm]
    text = csv_text(["exchange", "symbol", "timestamp", "local_timestamp", "id", "side",
                     "price", "amount"], body)
    tardis = OUT / "tardis" / "binance-futures_trades_2024-08-08_BTCUSDT.csv.gz"
    tardis.parent.mkdir(parents=True, exist_ok=True)
    tardis.write_bytes(gzip.compress(text.encode(), mtime=0))

    cols = ("exchange", "market", "symbol", "trade_id", "ts_ms", "price", "qty",
            "is_buyer_maker")
    table = pa.table({
        **{c: pa.array([r[c] for r in usdm], pa.string()) for c in cols},
        "ts_ms": pa.array([int(r["ts_ms"]) for r in usdm], pa.int64()),
        "is_buyer_maker": pa.array([r["is_buyer_maker"] == "True" for r in usdm]),
    })
    parquet = OUT / "parquet" / "binance_usdm_btcusdt_2024-08-08T2354_trades.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.select(list(cols)), parquet, compression="zstd")
    for p in sorted(OUT.rglob("*.*")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
