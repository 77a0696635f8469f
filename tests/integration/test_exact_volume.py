"""Volumes exact to the last decimal, end to end: real Binance and Kraken trades replayed
through the worker give bars whose volume (and Binance's quote volume) equal the
exchanges' own klines as decimal strings, in TimescaleDB, on the bars topic, in ``/ohlcv``
and ``/udf/history``, and rollups across minutes and exchanges stay exact."""

from __future__ import annotations

import csv
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import orjson
import pytest

from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)

pytestmark = pytest.mark.integration

#: (exchange, symbol, trades file, klines file or None)
FILES = [
    ("binance", "BTCUSDT", "binance_spot_btcusdt_2020-09-27_trades.csv",
     "binance_spot_btcusdt_2020-09-27_klines_1m.csv"),
    ("binance-usdm", "BTCUSDT", "binance_usdm_btcusdt_2024-08-08T2354_trades.csv",
     "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"),
    ("binance", "BTCUSDT", "binance_spot_btcusdt_2024-08-08T2354_trades.csv", None),
    ("kraken", "XBTUSDT", "kraken_spot_xbtusdt_2025-11-10_trades.csv",
     "kraken_spot_xbtusdt_2025-11-10_ohlc_1m.csv"),
]
HOUR = 3_600_000


def served(d: Decimal) -> str:
    """A decimal as the API serves it: plain, no trailing zeros."""
    with localcontext() as ctx:
        ctx.prec = 100
        return format(d.normalize(), "f") if d else "0"


def trades_of(name: str) -> list[dict[str, Any]]:
    with (SAMPLE / "trades" / name).open() as fh:
        return [{"ts": int(r["ts_ms"]), "price": Decimal(r["price"]), "qty": Decimal(r["qty"])}
                for r in csv.DictReader(fh)]


def sums(trades: list[dict[str, Any]]) -> dict[str, str | None]:
    """Volume, quote volume and VWAP (half-up at 16 places) of ``trades``, by Decimal."""
    with localcontext() as ctx:
        ctx.prec = 100
        v = sum((t["qty"] for t in trades), Decimal(0))
        q = sum((t["price"] * t["qty"] for t in trades), Decimal(0))
        vwap = (q / v).quantize(Decimal("1e-16"), ROUND_HALF_UP) if v else None
    return {"volume": served(v), "quote_volume": served(q),
            "vwap": None if vwap is None else served(vwap)}


async def test_volumes_equal_the_exchanges_klines_to_the_last_decimal(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", *(str(SAMPLE / "trades" / f)
                                                for _, _, f, _ in FILES))
    db_bars: dict[tuple[str, str], dict[int, Any]] = {}
    for exchange, symbol, trades_file, _ in FILES:
        minutes = {t["ts"] // 60_000 * 60_000 for t in trades_of(trades_file)}
        db_bars[(exchange, symbol)] = await stack.wait_for_bars(exchange, symbol, minutes)

    published = [orjson.loads(v) for _, v in await stack.read_topic(stack.settings.topics.bars)]
    topic = {(b["exchange"], b["symbol"], b["bucket_start_ms"]): b for b in published}
    for exchange, symbol, trades_file, klines_file in FILES:
        if klines_file is None:
            continue
        klines = load_klines(klines_file)
        minutes, _ = complete_minutes(trades_file, klines)
        assert len(minutes) == {"binance": 2, "binance-usdm": 5, "kraken": 273}[exchange]
        # 1) TimescaleDB (NUMERIC) and 2) the bars topic (decimal strings)
        assert_bars_equal_klines(db_bars[(exchange, symbol)], klines, minutes)
        assert_bars_equal_klines({m: topic[(exchange, symbol, m)] for m in minutes},
                                 klines, minutes)
        # 3) /ohlcv and /udf/history serve the kline's own decimal, trimmed
        lo, hi = min(minutes), max(minutes) + 60_000
        status, body = await stack.http(f"/ohlcv?symbol={symbol}&exchange={exchange}"
                                        f"&interval=1m&start={lo}&end={hi}")
        assert status == 200, body
        bars = {b["bucket_start_ms"]: b for b in body["bars"]}
        status, udf = await stack.http(f"/udf/history?symbol={exchange}:{symbol}"
                                       f"&resolution=1&from={lo // 1000}&to={hi // 1000 - 1}")
        assert status == 200 and udf["s"] == "ok", udf
        udf_v = dict(zip((t * 1000 for t in udf["t"]), udf["v"], strict=True))
        for m in minutes:
            want = served(klines[m]["volume"])
            assert bars[m]["volume"] == udf_v[m] == topic[(exchange, symbol, m)]["volume"] \
                == want, (exchange, m)
            if klines[m]["quote_volume"] is not None:
                assert bars[m]["quote_volume"] == served(klines[m]["quote_volume"])

    # 4) rollups: an hour of one exchange, and hours consolidated across exchanges
    kraken = trades_of("kraken_spot_xbtusdt_2025-11-10_trades.csv")
    lo = kraken[0]["ts"] - kraken[0]["ts"] % HOUR
    status, body = await stack.http(f"/ohlcv?symbol=XBTUSDT&exchange=kraken&interval=1h"
                                    f"&start={lo}&end={kraken[-1]['ts'] + 1}")
    assert status == 200, body
    assert len(body["bars"]) >= 7
    for b in body["bars"]:
        mine = [t for t in kraken if b["bucket_start_ms"] <= t["ts"] < b["bucket_start_ms"] + HOUR]
        assert {f: b[f] for f in ("volume", "quote_volume", "vwap")} == sums(mine), b
    both = (trades_of("binance_usdm_btcusdt_2024-08-08T2354_trades.csv")
            + trades_of("binance_spot_btcusdt_2024-08-08T2354_trades.csv"))
    status, body = await stack.http("/ohlcv?symbol=BTCUSDT&interval=1h"
                                    "&start=2024-08-08T23:00:00Z&end=2024-08-09T01:00:00Z")
    assert status == 200, body
    assert [b["bucket_start_ms"] for b in body["bars"]] == [1723158000000, 1723161600000]
    for b in body["bars"]:
        mine = [t for t in both if b["bucket_start_ms"] <= t["ts"] < b["bucket_start_ms"] + HOUR]
        assert {f: b[f] for f in ("volume", "quote_volume", "vwap")} == sums(mine), b
    w.assert_alive()
