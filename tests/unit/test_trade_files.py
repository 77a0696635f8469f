"""Trade files in the formats users have (``feeds/replay/trade_files.py``), read from the
real samples under ``data/sample/formats/``: each gives the same trades as the marketflow
CSV it was written from, and the bars built from them equal the exchange's own klines."""

from __future__ import annotations

import csv
import gzip
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ReplayError
from feeds.replay.sources import FileSource
from feeds.replay.trade_files import detect_format, read_trades, scan
from tables.window import apply_tick, finalize_bar

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
FORMATS = SAMPLE / "formats"
SPOT = SAMPLE / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"
USDM = SAMPLE / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
SPOT_KLINES = SAMPLE / "klines" / "binance_spot_btcusdt_2020-09-27_klines_1m.csv"
USDM_KLINES = SAMPLE / "klines" / "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"

CASES = [  # file, format, the CSV it holds, its klines, the exchange it reads as
    ("binance-spot/BTCUSDT-trades-2020-09-27.zip", "binance-trades", SPOT, SPOT_KLINES,
     "binance"),
    ("binance-spot/BTCUSDT-trades-2020-09-27-microseconds.zip", "binance-trades", SPOT,
     SPOT_KLINES, "binance"),
    ("binance-um/BTCUSDT-trades-2024-08-08.zip", "binance-trades", USDM, USDM_KLINES,
     "binance"),
    ("tardis/binance-futures_trades_2024-08-08_BTCUSDT.csv.gz", "tardis-trades", USDM,
     USDM_KLINES, "binance-futures"),
    ("parquet/binance_usdm_btcusdt_2024-08-08T2354_trades.parquet", "parquet", USDM,
     USDM_KLINES, "binance-usdm"),
]


def fields(ticks: Any) -> list[tuple[Any, ...]]:
    return [(t.symbol, t.price, t.qty, t.ts_ms, t.trade_id) for t in ticks]


@pytest.mark.parametrize(("name", "fmt", "csv_file", "klines_file", "exchange"), CASES)
def test_a_sample_gives_the_trades_of_its_source_csv(
        name: str, fmt: str, csv_file: Path, klines_file: Path, exchange: str) -> None:
    path = FORMATS / name
    assert detect_format(path) == fmt
    got = list(read_trades(path, source="replay"))
    want = list(read_trades(csv_file, source="replay"))
    assert len(got) == len(want) > 0
    assert fields(got) == fields(want)
    assert {t.exchange for t in got} == {exchange} and {t.source for t in got} == {"replay"}
    s = scan(path)
    assert (s.rows, s.first_ts_ms, s.last_ts_ms) == (len(want), want[0].ts_ms,
                                                     want[-1].ts_ms)


def klines(path: Path) -> dict[int, dict[str, str]]:
    with path.open() as fh:
        return {int(r["open_time"]): r for r in csv.DictReader(fh)}


@pytest.mark.parametrize(("name", "fmt", "csv_file", "klines_file", "exchange"), CASES)
def test_bars_from_a_sample_equal_the_exchange_klines(
        name: str, fmt: str, csv_file: Path, klines_file: Path, exchange: str) -> None:
    bars: dict[str, Any] = {}
    for t in read_trades(FORMATS / name):
        apply_tick(bars, t.price, t.qty, t.ts_ms, 0, trade_id=t.trade_id)
    k = klines(klines_file)
    done = [finalize_bar(exchange, "BTCUSDT", b) for b in bars.values()]
    complete = [b for b in done if b["bucket_start_ms"] in k
                and b["trade_count"] == int(k[b["bucket_start_ms"]]["count"])]
    assert len(complete) == (2 if csv_file == SPOT else 5)  # 14:05-06; 23:55-59
    for b in complete:
        row = k[b["bucket_start_ms"]]
        assert (b["open"], b["high"], b["low"], b["close"]) == tuple(
            float(row[c]) for c in ("open", "high", "low", "close"))
        assert Decimal(b["volume"]) == Decimal(row["volume"])  # exactly


def test_binance_dump_exchange_and_symbol_can_be_given(tmp_path: Path) -> None:
    path = FORMATS / "binance-um" / "BTCUSDT-trades-2024-08-08.zip"
    ticks = list(read_trades(path, exchange="binance-um", symbol="BTC-PERP"))
    assert {(t.exchange, t.symbol) for t in ticks} == {("binance-um", "BTC-PERP")}
    src = FileSource([path], "ns", exchange="binance-um")
    n, it = src.ticks(0)
    first = next(it)
    assert n == 0 and (first.exchange, first.symbol) == ("ns.binance-um", "BTCUSDT")
    assert src.total == len(ticks)


def test_unzipped_binance_csv_reads_like_the_zip(tmp_path: Path) -> None:
    zipped = FORMATS / "binance-spot" / "BTCUSDT-trades-2020-09-27.zip"
    plain = tmp_path / "BTCUSDT-trades-2020-09-27.csv"
    with zipfile.ZipFile(zipped) as zf:
        plain.write_bytes(zf.read("BTCUSDT-trades-2020-09-27.csv"))
    assert detect_format(plain) == "binance-trades"
    assert fields(read_trades(plain)) == fields(read_trades(zipped))


def test_bad_files_raise_replay_errors(tmp_path: Path) -> None:
    two = tmp_path / "BTCUSDT-trades-x.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("a.csv", "1,2,3,4,5,True\n")
        zf.writestr("b.csv", "1,2,3,4,5,True\n")
    with pytest.raises(ReplayError, match=r"one \.csv inside"):
        list(read_trades(two))
    other = tmp_path / "x.csv"
    other.write_text("when,what\n1,2\n")
    with pytest.raises(ReplayError, match="not a trades file"):
        detect_format(other)
    bad_ts = tmp_path / "t.csv.gz"
    bad_ts.write_bytes(gzip.compress(
        b"exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
        b"binance,BTCUSDT,soon,1,1,buy,1.0,1.0\n"))
    with pytest.raises(ReplayError, match="soon"):
        list(read_trades(bad_ts))
    no_price = tmp_path / "p.parquet"
    pq.write_table(pa.table({"exchange": ["b"], "symbol": ["S"], "trade_id": ["1"],
                             "ts_ms": [1_700_000_000_000], "qty": [1.0]}), no_price)
    with pytest.raises(ReplayError, match="missing column"):
        list(read_trades(no_price))
    empty = tmp_path / "e.csv"
    empty.write_text("exchange,symbol,trade_id,ts_ms,price,qty\n")
    with pytest.raises(ReplayError, match="no trades"):
        scan(empty)
    gap = tmp_path / "g.csv"
    gap.write_text("exchange,symbol,trade_id,ts_ms,price,qty\nb,S,1,1700000000000,,1\n")
    with pytest.raises(ReplayError, match="without 'price'"):
        list(read_trades(gap))
