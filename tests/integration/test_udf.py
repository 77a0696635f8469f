"""TradingView UDF endpoints (``/udf/...``) through a real worker on replayed Binance
trades: configuration, symbol info and search, history against ``/ohlcv``, ``countback``,
``no_data``/``nextTime``, paging past the bar cap, every 400 case and the server time."""

from __future__ import annotations

import csv
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from query.series import MAX_BARS
from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration

FILES = ["binance_spot_btcusdt_2024-08-08T2354_trades.csv",
         "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"]
RESOLUTION_INTERVAL = {"1": "1m", "5": "5m", "60": "1h", "1D": "1d"}
# (ticker, /ohlcv exchange parameter)
SERIES = [("BTCUSDT", None), ("binance:BTCUSDT", "binance"),
          ("binance-usdm:BTCUSDT", "binance-usdm")]
RESOLUTIONS = ["1", "5", "15", "30", "60", "240", "1D"]


def _s(iso: str) -> int:
    """Unix seconds of a UTC ISO-8601 time."""
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())


def _minutes(exchange: str) -> set[int]:
    """1-minute bucket starts (ms) of the trades of one exchange in the sample files."""
    out: set[int] = set()
    for f in FILES:
        with (SAMPLE / "trades" / f).open() as fh:
            out |= {int(r["ts_ms"]) // 60_000 * 60_000 for r in csv.DictReader(fh)
                    if r["exchange"] == exchange}
    return out


async def _udf(stack: Stack, path: str, **params: Any) -> tuple[int, Any]:
    return await stack.http(f"/udf/{path}?{urlencode(params)}")


async def _history(stack: Stack, **params: Any) -> tuple[int, Any]:
    return await _udf(stack, "history", **params)


def _assert_error(status: int, body: Any, want_status: int, context: Any) -> None:
    assert status == want_status, (context, status, body)
    assert body["s"] == "error" and isinstance(body["errmsg"], str) and body["errmsg"], \
        (context, body)
    assert set(body) == {"s", "errmsg"}, (context, body)


async def test_udf(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", *(str(SAMPLE / "trades" / f) for f in FILES))
    spot, usdm = _minutes("binance"), _minutes("binance-usdm")
    await stack.wait_for_bars("binance", "BTCUSDT", spot)
    await stack.wait_for_bars("binance-usdm", "BTCUSDT", usdm)
    last_spot_s = max(spot) // 1000
    assert last_spot_s == _s("2024-08-09T00:05:00")
    assert max(usdm) // 1000 == _s("2024-08-08T23:59:00")

    await _config(stack)
    await _symbols(stack)
    await _search(stack)
    await _history_equals_ohlcv(stack, spot, usdm)
    await _countback(stack, spot)
    await _no_data(stack, last_spot_s)
    await _bad_requests(stack)
    await _paging_past_the_cap(stack, spot)
    await _time(stack)


async def _config(stack: Stack) -> None:
    status, body = await stack.http("/udf/config")
    assert status == 200, body
    assert body == {
        "supported_resolutions": RESOLUTIONS,
        "supports_search": True,
        "supports_group_request": False,
        "supports_marks": False,
        "supports_timescale_marks": False,
        "supports_time": True,
        "exchanges": [{"value": "", "name": "All Exchanges", "desc": ""},
                      {"value": "binance", "name": "binance", "desc": "binance"},
                      {"value": "binance-usdm", "name": "binance-usdm",
                       "desc": "binance-usdm"}],
        "symbols_types": [{"name": "crypto", "value": "crypto"}],
    }


async def _symbols(stack: Stack) -> None:
    common = {"name": "BTCUSDT", "type": "crypto", "session": "24x7",
              "timezone": "Etc/UTC", "minmov": 1, "has_intraday": True, "has_daily": True,
              "supported_resolutions": RESOLUTIONS, "volume_precision": 8,
              "data_status": "streaming"}
    # spot prices have 2 decimals (61837.63), USD-M futures 1 (61800.3)
    for ticker, exchange, pricescale in [("BTCUSDT", "", 100),
                                         ("binance:BTCUSDT", "binance", 100),
                                         ("binance-usdm:BTCUSDT", "binance-usdm", 10),
                                         ("BINANCE-USDM:btcusdt", "binance-usdm", 10)]:
        status, body = await _udf(stack, "symbols", symbol=ticker)
        assert status == 200, (ticker, body)
        assert {k: body[k] for k in common} == common, ticker
        assert body["ticker"] == ticker
        assert body["exchange"] == body["listed_exchange"] == exchange
        assert body["pricescale"] == pricescale, ticker
        assert isinstance(body["description"], str) and body["description"]
    for ticker in ("NOPEUSDT", "binance:NOPEUSDT", "kraken:BTCUSDT"):
        status, body = await _udf(stack, "symbols", symbol=ticker)
        _assert_error(status, body, 404, ticker)
        assert body["errmsg"].startswith("unknown symbol")
    for ticker in ("", "bad name", "binance:", ":BTCUSDT", "a:b:c"):
        status, body = await _udf(stack, "symbols", symbol=ticker)
        _assert_error(status, body, 400, ticker)


async def _search(stack: Stack) -> None:
    def entry(exchange: str) -> dict[str, Any]:
        return {"symbol": "BTCUSDT", "full_name": f"{exchange}:BTCUSDT",
                "exchange": exchange, "ticker": f"{exchange}:BTCUSDT", "type": "crypto"}

    both = [entry("binance"), entry("binance-usdm")]
    for params in ({"query": "btc"}, {"query": "BTCusdt", "type": "crypto", "exchange": ""},
                   {"query": ""}, {"query": "usdt", "limit": "100"}, {"limit": "1000"}):
        status, body = await _udf(stack, "search", **params)
        assert status == 200, (params, body)
        assert [{k: e[k] for k in both[0]} for e in body] == both, params
        assert all(isinstance(e["description"], str) for e in body)
    status, body = await _udf(stack, "search", query="btc", exchange="binance-usdm")
    assert status == 200 and [e["ticker"] for e in body] == ["binance-usdm:BTCUSDT"], body
    status, body = await _udf(stack, "search", query="btc", limit="1")
    assert status == 200 and [e["ticker"] for e in body] == ["binance:BTCUSDT"], body
    for params in ({"query": "eth"}, {"query": "btc", "type": "stock"},
                   {"query": "btc", "exchange": "kraken"}):
        status, body = await _udf(stack, "search", **params)
        assert (status, body) == (200, []), params
    for params in ({"query": "btc", "limit": "x"}, {"query": "btc", "limit": "0"},
                   {"query": "btc", "exchange": "bad name"}, {"query": "x" * 65}):
        status, body = await _udf(stack, "search", **params)
        _assert_error(status, body, 400, params)


async def _history_equals_ohlcv(stack: Stack, spot: set[int], usdm: set[int]) -> None:
    from_s, to_s = _s("2024-08-08T00:00:00"), _s("2024-08-09T03:59:59")
    for resolution, interval in RESOLUTION_INTERVAL.items():
        for ticker, exchange in SERIES:
            status, body = await _history(stack, symbol=ticker, resolution=resolution,
                                          **{"from": from_s, "to": to_s})
            assert status == 200, body
            q = f"/ohlcv?symbol=BTCUSDT&interval={interval}&start={from_s * 1000}" \
                f"&end={(to_s + 1) * 1000}" + (f"&exchange={exchange}" if exchange else "")
            status, ohlcv = await stack.http(q)
            assert status == 200, ohlcv
            bars = ohlcv["bars"]
            assert bars, (resolution, ticker)
            assert body == {"s": "ok",
                            "t": [b["bucket_start_ms"] // 1000 for b in bars],
                            "o": [b["open"] for b in bars], "h": [b["high"] for b in bars],
                            "l": [b["low"] for b in bars], "c": [b["close"] for b in bars],
                            "v": [b["volume"] for b in bars]}, (resolution, ticker)
            if resolution == "1":
                want = {"binance": spot, "binance-usdm": usdm, None: spot | usdm}[exchange]
                assert body["t"] == sorted(m // 1000 for m in want), ticker
    # a name spelled in another case finds the stored series
    status, upper = await _history(stack, symbol="BINANCE:btcusdt", resolution="1",
                                   **{"from": from_s, "to": to_s})
    status2, exact = await _history(stack, symbol="binance:BTCUSDT", resolution="1",
                                    **{"from": from_s, "to": to_s})
    assert status == status2 == 200 and upper == exact
    # from and to are both included, and a bucket starting before from is not returned
    status, body = await _history(stack, symbol="binance:BTCUSDT", resolution="1",
                                  **{"from": _s("2024-08-08T23:55:00"),
                                     "to": _s("2024-08-08T23:57:00")})
    assert status == 200 and body["t"] == [_s("2024-08-08T23:55:00"),
                                           _s("2024-08-08T23:56:00"),
                                           _s("2024-08-08T23:57:00")], body
    status, body = await _history(stack, symbol="binance:BTCUSDT", resolution="1",
                                  **{"from": _s("2024-08-08T23:54:30"),
                                     "to": _s("2024-08-08T23:55:59")})
    assert status == 200 and body["t"] == [_s("2024-08-08T23:55:00")], body
    status, body = await _history(stack, symbol="BTCUSDT", resolution="60",
                                  **{"from": _s("2024-08-08T23:30:00"),
                                     "to": _s("2024-08-09T05:00:00")})
    assert status == 200 and body["t"] == [_s("2024-08-09T00:00:00")], body


async def _countback(stack: Stack, spot: set[int]) -> None:
    full_from, full_to = _s("2024-08-08T00:00:00"), _s("2024-08-09T23:59:59")
    for resolution in ("1", "5", "60", "1D"):
        for ticker, _ in SERIES:
            status, full = await _history(stack, symbol=ticker, resolution=resolution,
                                          **{"from": full_from, "to": full_to})
            assert status == 200, full
            n_bars = len(full["t"])
            for n in (1, 3, n_bars, n_bars + 50):
                # to long after the data: the bars are found back over the gap; from is
                # ignored (the chart sends from close to to)
                for to in (full["t"][-1], full["t"][-1] + 59, _s("2024-08-09T06:00:00"),
                           _s("2024-08-20T00:00:00")):
                    status, body = await _history(stack, symbol=ticker,
                                                  resolution=resolution, countback=n,
                                                  **{"from": to, "to": to})
                    assert status == 200, body
                    k = min(n, n_bars)
                    assert body == {"s": "ok", **{f: full[f][-k:] for f in "tohlcv"}}, \
                        (resolution, ticker, n, to)
    # the N bars ending at an earlier to
    spot_s = sorted(m // 1000 for m in spot)
    status, body = await _history(stack, symbol="binance:BTCUSDT", resolution="1",
                                  countback=4, **{"from": spot_s[5], "to": spot_s[5]})
    assert status == 200 and body["t"] == spot_s[2:6], body
    # before all data: nothing, and no nextTime
    status, body = await _history(stack, symbol="BTCUSDT", resolution="1", countback=10,
                                  **{"from": _s("2024-08-08T23:00:00"),
                                     "to": _s("2024-08-08T23:53:59")})
    assert (status, body) == (200, {"s": "no_data"})


async def _no_data(stack: Stack, last_spot_s: int) -> None:
    later = {"from": _s("2024-08-10T00:00:00"), "to": _s("2024-08-10T06:00:00")}
    for ticker, resolution, next_time in [
            ("binance:BTCUSDT", "1", last_spot_s),
            ("BTCUSDT", "1", last_spot_s),
            ("binance-usdm:BTCUSDT", "1", _s("2024-08-08T23:59:00")),
            ("binance:BTCUSDT", "5", _s("2024-08-09T00:05:00")),
            ("binance-usdm:BTCUSDT", "5", _s("2024-08-08T23:55:00")),
            ("BTCUSDT", "60", _s("2024-08-09T00:00:00")),
            ("binance-usdm:BTCUSDT", "60", _s("2024-08-08T23:00:00")),
            ("BTCUSDT", "1D", _s("2024-08-09T00:00:00")),
            ("binance-usdm:BTCUSDT", "1D", _s("2024-08-08T00:00:00"))]:
        status, body = await _history(stack, symbol=ticker, resolution=resolution, **later)
        assert (status, body) == (200, {"s": "no_data", "nextTime": next_time}), \
            (ticker, resolution)
    # usdm stops at 23:59 while spot goes on: the newest usdm bar before from
    status, body = await _history(stack, symbol="binance-usdm:BTCUSDT", resolution="1",
                                  **{"from": _s("2024-08-09T00:00:00"),
                                     "to": _s("2024-08-09T00:05:00")})
    assert (status, body) == (200, {"s": "no_data", "nextTime": _s("2024-08-08T23:59:00")})
    earlier = {"from": _s("2024-08-01T00:00:00"), "to": _s("2024-08-02T00:00:00")}
    for ticker, _ in SERIES:
        for resolution in RESOLUTIONS:
            status, body = await _history(stack, symbol=ticker, resolution=resolution,
                                          **earlier)
            assert (status, body) == (200, {"s": "no_data"}), (ticker, resolution)
    for ticker in ("NOPEUSDT", "kraken:BTCUSDT"):
        status, body = await _history(stack, symbol=ticker, resolution="1", **later)
        _assert_error(status, body, 404, ticker)
        assert body["errmsg"].startswith("unknown symbol")


async def _bad_requests(stack: Stack) -> None:
    base: dict[str, Any] = {"symbol": "BTCUSDT", "resolution": "1",
                            "from": _s("2024-08-08T23:00:00"), "to": _s("2024-08-09T01:00:00")}
    status, body = await _history(stack, **base)
    assert status == 200 and body["s"] == "ok"
    end = _s("2024-08-09T00:05:00")
    status, body = await _history(stack, **{**base, "from": end - (MAX_BARS - 1) * 60,
                                            "to": end})
    assert status == 200 and len(body["t"]) == 12, body  # exactly MAX_BARS buckets
    cases: list[dict[str, Any]] = [
        {"from": None}, {"to": None}, {"from": ""}, {"to": ""},
        {"from": "abc"}, {"to": "1.5"}, {"from": "1723161600000.0"}, {"from": "-1"},
        {"to": "99999999999"},
        {"from": base["to"] + 1},  # from > to
        {"resolution": "7"}, {"resolution": "1W"}, {"resolution": None},
        {"countback": "0"}, {"countback": "x"}, {"countback": "-3"},
        {"symbol": None}, {"symbol": "bad name"}, {"symbol": "a:b:c"},
    ]
    for case in cases:
        params = {k: v for k, v in {**base, **case}.items() if v is not None}
        status, body = await _history(stack, **params)
        _assert_error(status, body, 400, case)


async def _paging_past_the_cap(stack: Stack, spot: set[int]) -> None:
    """A chart asking for more than MAX_BARS buckets gets the newest MAX_BARS and pages
    back until ``no_data``: every stored minute exactly once, and the paging ends."""
    end = _s("2024-08-09T00:05:00")
    wide = {"symbol": "binance:BTCUSDT", "resolution": "1"}
    # one bucket too many: the oldest bucket of the range is left out
    status, body = await _history(stack, **wide, **{"from": end - MAX_BARS * 60, "to": end})
    assert status == 200 and body["s"] == "ok", body
    assert body["t"] == sorted(t // 1000 for t in spot), body["t"]
    # countback above the cap, and a range of decades: the newest bars, then pages back
    status, body = await _history(stack, **wide, countback=MAX_BARS + 1,
                                  **{"from": 0, "to": end})
    assert status == 200 and body["t"] == sorted(t // 1000 for t in spot), body
    got: list[int] = []
    to_s, pages = end, 0
    while True:
        pages += 1
        assert pages <= 5, got  # paging back must end
        status, body = await _history(stack, **wide, **{"from": 0, "to": to_s})
        assert status == 200, body
        if body["s"] == "no_data":
            assert "nextTime" not in body, body  # nothing older: the chart stops
            break
        assert len(body["t"]) <= MAX_BARS and body["t"] == sorted(body["t"]), body
        assert max(body["t"]) <= to_s and min(body["t"]) > to_s - MAX_BARS * 60, body
        got = body["t"] + got
        to_s = min(body["t"]) - 1
    assert got == sorted(t // 1000 for t in spot)
    assert pages == 2  # the sample fits in one page, then no_data


async def _time(stack: Stack) -> None:
    """``/udf/time`` is the server's wall clock in whole seconds: between two readings of
    ours (same host clock), however long the request took."""
    before = int(time.time())
    async with aiohttp.ClientSession() as s, s.get(f"{stack.base_url}/udf/time") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    after = int(time.time())
    assert text.isdigit(), text
    assert before <= int(text) <= after, (before, text, after)
