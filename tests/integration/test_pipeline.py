"""End to end on real trades: replay -> Kafka -> worker -> TimescaleDB / Redis / topics
-> HTTP views, with malformed ticks mixed in."""

from __future__ import annotations

import orjson
import pytest

from tests.integration.conftest import (
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)

pytestmark = pytest.mark.integration

SPOT_2020 = "binance_spot_btcusdt_2020-09-27_trades.csv"
USDM_2024 = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"

BAD_MESSAGES: list[tuple[bytes | None, bytes, str]] = [
    (b"binance:BTCUSDT", b"{not json", "invalid_json"),
    (b"binance:BTCUSDT", b"", "empty"),
    (b"binance:BTCUSDT", b'"just a string"', "not_object"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT", "price": -5.0,
                         "ts_ms": 1601215500001}), "bad_price"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT", "price": 0,
                         "ts_ms": 1601215500001}), "bad_price"),
    (None, b'{"exchange":"binance","symbol":"BTCUSDT","price":NaN,"ts_ms":1601215500001}',
     "invalid_json"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT",
                         "ts_ms": 1601215500001}), "missing_field"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT", "price": "10680.1",
                         "ts_ms": 1601215500001}), "bad_type"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT", "price": 10680.1,
                         "ts_ms": 1601215500}), "ts_too_old"),
    (None, orjson.dumps({"exchange": "binance", "symbol": "BTCUSDT", "price": 10680.1,
                         "ts_ms": 9_999_999_999_999}), "ts_in_future"),
]


async def test_real_trades_end_to_end(stack: Stack) -> None:
    worker = stack.worker().start()
    await worker.wait_ready()

    # bad input first, and one array mixing bad ticks with a good one; then real trades
    await stack.produce_raw([(k, v) for k, v, _ in BAD_MESSAGES[:5]])
    mixed = [{"exchange": "binance", "symbol": "BTCUSDT", "price": 1.0, "qty": -1.0,
              "ts_ms": 1601215500001},
             5,
             {"exchange": "binance", "symbol": "ETHUSDT", "price": 354.1, "qty": 2.0,
              "ts_ms": 1601215500001, "source": "test"}]
    await stack.produce_raw([(b"binance:BTCUSDT", orjson.dumps(mixed))])
    out = await stack.replay_cli("--namespace", "", str(stack_sample(SPOT_2020)),
                                 str(stack_sample(USDM_2024)))
    assert "replayed 22313 ticks" in out
    await stack.produce_raw([(k, v) for k, v, _ in BAD_MESSAGES[5:]])

    # 1) every complete minute in TimescaleDB equals the exchange's kline
    checks = []
    for exchange, trades, klines_file in [
        ("binance", SPOT_2020, "binance_spot_btcusdt_2020-09-27_klines_1m.csv"),
        ("binance-usdm", USDM_2024, "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"),
    ]:
        klines = load_klines(klines_file)
        minutes, rows = complete_minutes(trades, klines)
        all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
        bars = await stack.wait_for_bars(exchange, "BTCUSDT", all_minutes)
        assert set(bars) == all_minutes  # partial first/last minutes too, nothing else
        assert_bars_equal_klines(bars, klines, minutes)
        assert sum(b["trade_count"] for b in bars.values()) == len(rows)
        checks.append((exchange, rows, bars, minutes))
    assert len(checks[0][3]) == 2 and len(checks[1][3]) == 5  # 14:05-14:06, 23:55-23:59

    # 2) the same bars arrive on the closed-bars topic
    published = [orjson.loads(v) for _, v in await stack.read_topic(stack.settings.topics.bars)]
    for exchange, _, bars, _ in checks:
        mine = {b["bucket_start_ms"]: b for b in published
                if b["exchange"] == exchange and b["symbol"] == "BTCUSDT"}
        assert set(mine) == set(bars)
        for m, row in bars.items():
            assert (mine[m]["open"], mine[m]["close"], mine[m]["trade_count"]) == (
                row["open"], row["close"], row["trade_count"])

    # 3) Redis holds the last trade's price per exchange and across exchanges
    r = stack.redis()
    try:
        for exchange, rows, _, _ in checks:
            h = await r.hgetall(f"{stack.name}:latest:{exchange}:BTCUSDT")
            assert float(h["price"]) == float(rows[-1]["price"])
            assert int(h["ts_ms"]) == int(rows[-1]["ts_ms"])
            assert await r.ttl(f"{stack.name}:latest:{exchange}:BTCUSDT") > 0
        newest = max((rows[-1] for _, rows, _, _ in checks), key=lambda x: int(x["ts_ms"]))
        h = await r.hgetall(f"{stack.name}:latest:BTCUSDT")
        assert (float(h["price"]), h["exchange"]) == (float(newest["price"]),
                                                      newest["exchange"])
    finally:
        await r.aclose()

    # 4) the HTTP views return them
    status, body = await stack.http("/prices/latest/BTCUSDT")
    assert status == 200 and body["price"] == float(newest["price"])
    assert body["timestamp"] == int(newest["ts_ms"]) and body["time"].endswith("Z")
    spot_rows = checks[0][1]
    status, body = await stack.http("/prices/latest/binance/BTCUSDT")
    assert status == 200 and body["price"] == float(spot_rows[-1]["price"])
    assert body["exchange"] == "binance"
    status, body = await stack.http(
        "/ohlcv?symbol=BTCUSDT&exchange=binance-usdm"
        "&start=2024-08-08T23:55:00Z&end=1723161600000")
    assert status == 200
    usdm_bars = checks[1][2]
    assert [b["bucket_start_ms"] for b in body["bars"]] == sorted(
        m for m in usdm_bars if 1723161300000 <= m < 1723161600000)
    for b in body["bars"]:
        row = usdm_bars[b["bucket_start_ms"]]
        assert (b["open"], b["high"], b["low"], b["close"], b["trade_count"]) == (
            row["open"], row["high"], row["low"], row["close"], row["trade_count"])
    status, body = await stack.http("/ohlcv?symbol=BTCUSDT&start=2020-09-27T14:00:00Z"
                                    "&end=2020-09-27T15:00:00Z")
    assert status == 200 and len(body["bars"]) == len(checks[0][2])
    for path, want in [("/prices/latest/NOSUCH", 404), ("/prices/latest/kraken/BTCUSDT", 404),
                       ("/ohlcv?symbol=NOSUCH", 404), ("/ohlcv?symbol=BTCUSDT&start=yesterday",
                                                       400),
                       ("/ohlcv", 400), ("/ohlcv?symbol=BTCUSDT&start=0&end=9999999999999",
                                         400),
                       ("/prices/latest/%3Cscript%3E", 400)]:
        status, body = await stack.http(path)
        assert status == want, (path, status, body)
        assert isinstance(body, dict) and body["error"], (path, body)
    status, body = await stack.http("/health")
    assert status == 200
    assert {k: body[k] for k in ("status", "broker", "database", "redis", "details")} == {
        "status": "ok", "broker": "up", "database": "up", "redis": "up", "details": {}}
    assert body["mode"] == "off" and body["ingest"] is None

    # 5) malformed ticks are in the dead-letter topic with their reasons; worker still up
    dead = [orjson.loads(v) for _, v in
            await stack.read_topic(stack.settings.topics.dead_letter)]
    reasons = sorted(d["reason"] for d in dead)
    expected = sorted([why for _, _, why in BAD_MESSAGES] + ["bad_qty", "not_object"])
    assert reasons == expected, reasons
    assert all("payload" in d and d["detail"] is not None for d in dead)
    worker.assert_alive()
    status, metrics = await stack.http("/metrics")
    assert status == 200
    assert 'marketflow_dead_lettered_ticks_total{reason="bad_price"} 2.0' in metrics

    # 6) the marketflow field names
    conn = await stack.db()
    try:
        rec = await conn.fetchrow(
            "SELECT * FROM prices WHERE exchange = 'binance-usdm' AND pair_name = 'BTCUSDT' "
            "AND timestamp = to_timestamp(1723161300)")
    finally:
        await conn.close()
    assert list(rec.keys()) == ["pair_name", "exchange", "timestamp", "average_price",
                                "min_price", "max_price"]
    row = usdm_bars[1723161300000]
    assert (rec["min_price"], rec["max_price"]) == (row["low"], row["high"])
    assert rec["average_price"] == pytest.approx(row["avg_price"], rel=1e-12)
    eth = await stack.wait_for_bars("binance", "ETHUSDT", {1601215500000})
    assert eth[1601215500000]["trade_count"] == 1  # the good tick of the mixed batch
    assert worker.stop() == 0, worker.tail()


def stack_sample(name: str) -> object:
    from tests.integration.conftest import SAMPLE

    return SAMPLE / "trades" / name


async def test_restart_keeps_serving(stack: Stack) -> None:
    """A stopped and restarted worker recovers its state and keeps answering."""
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", str(stack_sample(SPOT_2020)))
    await stack.wait_for_bars("binance", "BTCUSDT", {1601215500000, 1601215560000})
    assert w.stop() == 0, w.tail()
    w2 = stack.worker().start()
    await w2.wait_ready()
    status, body = await stack.http("/prices/latest/binance/BTCUSDT")
    assert status == 200 and body["price"] == 10684.23
