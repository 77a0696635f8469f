"""The replay CLI on the real samples in every trade-file format (``data/sample/formats/``):
a Binance spot dump with µs times, a tardis.dev gzipped CSV and a Parquet file in one
replay, a Binance USD-M dump under ``--exchange`` in another; every bar a worker stores
from them equals the exchange's kline."""

from __future__ import annotations

import pytest

from tests.integration.conftest import (
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)

pytestmark = pytest.mark.integration

FORMATS = SAMPLE / "formats"
SPOT = ("binance_spot_btcusdt_2020-09-27_trades.csv",
        "binance_spot_btcusdt_2020-09-27_klines_1m.csv")
USDM = ("binance_usdm_btcusdt_2024-08-08T2354_trades.csv",
        "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv")


async def test_every_trade_file_format_replays_into_bars_equal_to_the_klines(
        stack: Stack) -> None:
    worker = stack.worker().start()
    await worker.wait_ready()
    out = await stack.replay_cli(
        "--namespace", "",
        str(FORMATS / "binance-spot" / "BTCUSDT-trades-2020-09-27-microseconds.zip"),
        str(FORMATS / "tardis" / "binance-futures_trades_2024-08-08_BTCUSDT.csv.gz"),
        str(FORMATS / "parquet" / "binance_usdm_btcusdt_2024-08-08T2354_trades.parquet"))
    assert "replayed 43626 ticks" in out, out  # 1,000 + 2 x 21,313
    out = await stack.replay_cli(
        "--namespace", "", "--exchange", "binance-um",
        str(FORMATS / "binance-um" / "BTCUSDT-trades-2024-08-08.zip"))
    assert "replayed 21313 ticks" in out, out
    for exchange, (trades, klines_file) in [("binance", SPOT), ("binance-futures", USDM),
                                            ("binance-usdm", USDM), ("binance-um", USDM)]:
        klines = load_klines(klines_file)
        minutes, rows = complete_minutes(trades, klines)
        all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
        bars = await stack.wait_for_bars(exchange, "BTCUSDT", all_minutes)
        assert set(bars) == all_minutes, exchange
        assert_bars_equal_klines(bars, klines, minutes)
        assert sum(b["trade_count"] for b in bars.values()) == len(rows), exchange
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    worker.assert_alive()
