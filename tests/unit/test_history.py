"""REST history adapters: pure parsers, symbol split, and the clients against the local
fake server (:mod:`tests.support.history_server`) speaking both documented formats."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from core.config import HistorySection
from core.errors import HistoryError
from feeds.history.rest import (
    BarPage,
    CoinDeskHistory,
    CryptoCompareHistory,
    HistoryClient,
    RateLimiter,
    make_history_client,
    parse_coindesk,
    parse_cryptocompare,
    split_symbol,
)
from tests.support.history_server import CC_PATH, CD_PATH, HistoryServer, make_bars

KEY = "hist-s3cret-key-42"
T0 = 1_723_075_200  # 2024-08-08T00:00:00Z, seconds
M = 60_000

# docs/formats.md#cryptocompare-histominute (v2 envelope, one zero-filled and one real point)
CC_DOC: dict[str, Any] = {
    "Response": "Success", "Message": "", "HasWarning": False, "Type": 100, "RateLimit": {},
    "Data": {"Aggregated": False, "TimeFrom": T0 - 60, "TimeTo": T0, "Data": [
        {"time": T0, "high": 61010.0, "low": 60990.0, "open": 61000.0, "volumefrom": 12.5,
         "volumeto": 762526.25, "close": 61005.0, "conversionType": "direct",
         "conversionSymbol": ""},
        {"time": T0 - 60, "high": 0, "low": 0, "open": 0, "volumefrom": 0, "volumeto": 0,
         "close": 0, "conversionType": "direct", "conversionSymbol": ""}]}}

# docs/formats.md#coindesk-historical-minutes (upper-case records, Data/Err envelope)
CD_DOC: dict[str, Any] = {"Data": [
    {"UNIT": "MINUTE", "TIMESTAMP": T0, "TYPE": "267", "MARKET": "binance",
     "INSTRUMENT": "BTC-USDT", "OPEN": 61000.0, "HIGH": 61010.0, "LOW": 60990.0,
     "CLOSE": 61005.0, "VOLUME": 12.5, "QUOTE_VOLUME": 762526.25, "TOTAL_TRADES": 321},
    {"UNIT": "MINUTE", "TIMESTAMP": T0 - 120, "TYPE": "267", "MARKET": "binance",
     "INSTRUMENT": "BTC-USDT", "OPEN": 10.0, "HIGH": 12.0, "LOW": 9.0, "CLOSE": 11.0,
     "VOLUME": 0.0}], "Err": {}}


def settings(url: str, **kw: Any) -> HistorySection:
    base: dict[str, Any] = dict(cryptocompare_url=url, coindesk_url=url, api_key=KEY,
                                requests_per_s=1000, max_retries=3, backoff_initial_s=0.02,
                                backoff_max_s=0.1, timeout_s=2.0)
    base.update(kw)
    return HistorySection(**base)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def collect(client: HistoryClient, exchange: str, symbol: str, start_ms: int,
                  end_ms: int) -> list[list[dict[str, Any]]]:
    try:
        return [p async for p in client.fetch_minutes(exchange, symbol, start_ms, end_ms)]
    finally:
        await client.close()


# --------------------------------------------------------------------------- pure


def test_cryptocompare_documented_response() -> None:
    bars, earliest = parse_cryptocompare(CC_DOC, "binance", "BTCUSDT")
    assert earliest == (T0 - 60) * 1000  # zero points count for paging
    assert bars == [{
        "exchange": "binance", "symbol": "BTCUSDT", "bucket_start_ms": T0 * 1000,
        "open": 61000.0, "high": 61010.0, "low": 60990.0, "close": 61005.0, "volume": "12.5",
        "quote_volume": "762526.25",
        "trade_count": 0, "avg_price": (61000.0 + 61010.0 + 60990.0 + 61005.0) / 4,
        "vwap": "61002.1", "open_ts_ms": T0 * 1000,
        "close_ts_ms": T0 * 1000 + 59_999}]


def test_cryptocompare_error_envelopes() -> None:
    body = {"Response": "Error", "Message": "cccagg_or_exchange market does not exist "
            "for this coin pair (BTC-XYZ)", "Data": {}}
    with pytest.raises(HistoryError, match="does not exist") as ei:
        parse_cryptocompare(body, "binance", "BTCXYZ")
    assert ei.value.status is None
    body = {"Response": "Error", "Message": "You are over your rate limit please upgrade",
            "Data": {}}
    with pytest.raises(HistoryError) as ei:
        parse_cryptocompare(body, "binance", "BTCUSDT")
    assert ei.value.status == 429
    with pytest.raises(HistoryError, match="shape"):
        parse_cryptocompare({"Response": "Success", "Data": []}, "b", "BTCUSDT")
    bad = {**CC_DOC, "Data": {"Data": [{**CC_DOC["Data"]["Data"][0], "open": "x"}]}}
    with pytest.raises(HistoryError, match="malformed"):
        parse_cryptocompare(bad, "b", "BTCUSDT")


def test_coindesk_documented_response() -> None:
    bars, earliest = parse_coindesk(CD_DOC, "binance", "BTCUSDT")
    assert earliest == (T0 - 120) * 1000
    assert [b["bucket_start_ms"] for b in bars] == [(T0 - 120) * 1000, T0 * 1000]  # oldest 1st
    old, new = bars
    assert new["trade_count"] == 321 and new["vwap"] == "61002.1"  # 762526.25 / 12.5
    assert (new["volume"], new["quote_volume"]) == ("12.5", "762526.25")
    assert new["close_ts_ms"] == T0 * 1000 + 59_999 and new["open_ts_ms"] == T0 * 1000
    # no QUOTE_VOLUME / TOTAL_TRADES, zero volume: vwap None, count 0
    assert old["trade_count"] == 0 and old["vwap"] is None and old["avg_price"] == 10.5
    with pytest.raises(HistoryError, match="instrument not found"):
        parse_coindesk({"Data": [], "Err": {"type": 1, "message": "instrument not found"}},
                       "binance", "BTCUSDT")
    with pytest.raises(HistoryError, match="shape"):
        parse_coindesk({"Err": {}}, "binance", "BTCUSDT")


@pytest.mark.parametrize(("symbol", "want"), [
    ("BTCUSDT", ("BTC", "USDT")), ("ethbtc", ("ETH", "BTC")), ("BTCFDUSD", ("BTC", "FDUSD")),
    ("DOGEUSD", ("DOGE", "USD")), ("SOLUSDC", ("SOL", "USDC")), ("BTCEUR", ("BTC", "EUR")),
])
def test_split_symbol(symbol: str, want: tuple[str, str]) -> None:
    assert split_symbol(symbol) == want


@pytest.mark.parametrize("symbol", ["BTCXYZ", "USDT", ""])
def test_split_symbol_unknown(symbol: str) -> None:
    with pytest.raises(HistoryError):
        split_symbol(symbol)


def test_make_history_client() -> None:
    assert make_history_client(HistorySection()) is None
    assert isinstance(make_history_client(HistorySection(source="cryptocompare")),
                      CryptoCompareHistory)
    assert isinstance(make_history_client(HistorySection(source="coindesk")), CoinDeskHistory)


async def test_rate_limiter_spacing_and_defer() -> None:
    lim = RateLimiter(20)
    t = []
    for _ in range(5):
        await lim.acquire()
        t.append(time.monotonic())
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(t)), t
    lim.defer(0.2)
    t0 = time.monotonic()
    await lim.acquire()
    assert time.monotonic() - t0 >= 0.19


# --------------------------------------------------------------------------- paging


async def test_cryptocompare_paging_backwards() -> None:
    series = make_bars(T0, 4500, skip=range(100, 110))  # 10 empty minutes (zero-filled)
    async with HistoryServer({("binance", "BTC", "USDT"): series}, api_key=KEY) as srv:
        start_ms, end_ms = T0 * 1000 + 30 * M + 5, T0 * 1000 + 4400 * M - 1
        pages = await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                              start_ms, end_ms)
        reqs = srv.data_requests(CC_PATH)
    want = sorted(t * 1000 for t in series if start_ms <= t * 1000 < end_ms)
    got = [b["bucket_start_ms"] for p in reversed(pages) for b in p]
    assert got == want  # complete, no duplicates, zero points skipped, range respected
    assert want[0] == T0 * 1000 + 31 * M and want[-1] == T0 * 1000 + 4399 * M
    for p in pages:  # oldest first within a page, newest page first
        starts = [b["bucket_start_ms"] for b in p]
        assert starts == sorted(starts)
        assert isinstance(p, BarPage) and p.requests == 1 and p.from_ms <= starts[0]
    assert pages[0][0]["bucket_start_ms"] > pages[1][-1]["bucket_start_ms"]
    # 4369 minutes: 2001 + 2001 + 367 (limit+1 points per request)
    assert [r.params["limit"] for r in reqs] == ["2000", "2000", "366"]
    to = [int(r.params["toTs"]) for r in reqs]
    assert to[0] == T0 + 4399 * 60
    assert to[1] == to[0] - 2001 * 60 and to[2] == to[1] - 2001 * 60  # earliest - 60
    assert all(r.params["fsym"] == "BTC" and r.params["tsym"] == "USDT"
               and r.params["e"] == "binance" for r in reqs)
    assert all(r.authorization == f"Apikey {KEY}" for r in reqs)
    assert all("api_key" not in r.params for r in reqs)
    b = pages[-1][0]
    assert b["exchange"] == "binance" and b["symbol"] == "BTCUSDT"
    assert b["trade_count"] == 0 and float(b["vwap"]) == pytest.approx(b["open"] + 0.5)


async def test_coindesk_paging_backwards_fill_false() -> None:
    series = make_bars(T0, 2600, skip=range(2000, 2050))
    async with HistoryServer({("Binance", "ETH", "BTC"): series}, api_key=KEY) as srv:
        h = settings(srv.url, exchange_map={"bnc": "Binance"})
        pages = await collect(CoinDeskHistory(h), "bnc", "ETHBTC", T0 * 1000, (T0 + 2600 * 60)
                              * 1000)
        reqs = srv.data_requests(CD_PATH)
    got = [b["bucket_start_ms"] for p in reversed(pages) for b in p]
    assert got == sorted(t * 1000 for t in series)
    assert [r.params["limit"] for r in reqs] == ["2000", "600"]
    assert [int(r.params["to_ts"]) for r in reqs] == [T0 + 2599 * 60, T0 + 599 * 60]
    assert all(r.params["fill"] == "false" and r.params["instrument"] == "ETH-BTC"
               and r.params["market"] == "Binance" for r in reqs)
    assert pages[0][0]["exchange"] == "bnc" and pages[0][0]["symbol"] == "ETHBTC"
    assert pages[-1][0]["trade_count"] == 10


async def test_empty_page_stops() -> None:
    series = make_bars(T0, 5000)
    async with HistoryServer({("binance", "BTC", "USDT"): series}) as srv:
        srv.add_fault("empty", skip=1)
        pages = await collect(CoinDeskHistory(settings(srv.url, api_key="")), "binance",
                              "BTCUSDT", T0 * 1000, (T0 + 5000 * 60) * 1000)
        assert len(srv.requests) == 2
    assert len(pages) == 1 and len(pages[0]) == 2000


async def test_all_zero_history_stops_at_start() -> None:
    # CryptoCompare zero-fills minutes before the pair's history: paging ends at start_ms
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0 + 3000 * 60, 10)}) as srv:
        pages = await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                              T0 * 1000, (T0 + 3010 * 60) * 1000)
        assert len(srv.requests) == 2
    assert [len(p) for p in pages] == [10]


# --------------------------------------------------------------------------- faults


async def test_429_honours_retry_after() -> None:
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 10)}, api_key=KEY) as srv:
        srv.add_fault("429", times=1, retry_after="1")
        before = metric("marketflow_history_retries_total", source="coindesk",
                        reason="rate_limited")
        pages = await collect(CoinDeskHistory(settings(srv.url, backoff_initial_s=0.01)),
                              "binance", "BTCUSDT", T0 * 1000, (T0 + 600) * 1000)
        r = srv.requests
    assert [x.status for x in r] == [429, 200] and len(pages[0]) == 10
    assert r[1].t_s - r[0].t_s >= 0.95  # Retry-After: 1 beats the 0.01 s backoff
    assert metric("marketflow_history_retries_total", source="coindesk",
                  reason="rate_limited") == before + 1


async def test_429_without_retry_after_backs_off_exponentially() -> None:
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 10)}) as srv:
        srv.add_fault("429", times=3)
        h = settings(srv.url, backoff_initial_s=0.1, backoff_max_s=0.3, max_retries=3)
        await collect(CryptoCompareHistory(h), "binance", "BTCUSDT", T0 * 1000,
                      (T0 + 600) * 1000)
        r = srv.requests
    gaps = [b.t_s - a.t_s for a, b in itertools.pairwise(r)]
    assert [x.status for x in r] == [429, 429, 429, 200]
    # 0.1, 0.2, 0.3 (capped), each +-20 % jitter
    assert 0.08 <= gaps[0] < 0.2 and 0.16 <= gaps[1] < 0.3 and 0.24 <= gaps[2] < 0.45, gaps


async def test_5xx_retried_then_gives_up() -> None:
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 10)}) as srv:
        srv.add_fault("500", times=2)
        pages = await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                              T0 * 1000, (T0 + 600) * 1000)
        assert [x.status for x in srv.requests] == [500, 500, 200]
        assert pages[0].requests == 3  # type: ignore[attr-defined]
        srv.requests.clear()
        srv.add_fault("500", times=-1)
        with pytest.raises(HistoryError, match="giving up after 4 attempt") as ei:
            await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                          T0 * 1000, (T0 + 600) * 1000)
        assert ei.value.status == 500 and len(srv.requests) == 4  # max_retries=3


async def test_timeout_and_dropped_connection_retried() -> None:
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 10)}) as srv:
        srv.add_fault("slow", delay_s=1.0)
        srv.add_fault("drop")
        before = metric("marketflow_history_retries_total", source="coindesk",
                        reason="timeout")
        t0 = time.monotonic()
        pages = await collect(CoinDeskHistory(settings(srv.url, timeout_s=0.2)), "binance",
                              "BTCUSDT", T0 * 1000, (T0 + 600) * 1000)
        assert time.monotonic() - t0 < 0.9  # did not wait for the slow answer
        assert [x.fault for x in srv.requests] == ["slow", "drop", None]
        assert len(pages[0]) == 10
        assert metric("marketflow_history_retries_total", source="coindesk",
                      reason="timeout") == before + 1
        srv.add_fault("slow", times=-1, delay_s=0.5)
        with pytest.raises(HistoryError, match="timeout"):
            await collect(CoinDeskHistory(settings(srv.url, timeout_s=0.1, max_retries=1)),
                          "binance", "BTCUSDT", T0 * 1000, (T0 + 600) * 1000)


async def test_4xx_and_error_envelopes_fail_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 10)}, api_key=KEY) as srv:
        # 401: key missing
        with pytest.raises(HistoryError, match="401") as ei:
            await collect(CoinDeskHistory(settings(srv.url, api_key="")), "binance", "BTCUSDT",
                          T0 * 1000, (T0 + 600) * 1000)
        assert ei.value.status == 401 and len(srv.requests) == 1
        # unknown pair: CryptoCompare error envelope with HTTP 200
        srv.requests.clear()
        with pytest.raises(HistoryError, match="does not exist for this coin pair"):
            await collect(CryptoCompareHistory(settings(srv.url)), "binance", "ETHUSDT",
                          T0 * 1000, (T0 + 600) * 1000)
        assert len(srv.requests) == 1
        # CoinDesk 404 with Err.message
        srv.requests.clear()
        with pytest.raises(HistoryError, match="not found") as ei:
            await collect(CoinDeskHistory(settings(srv.url)), "binance", "ETHUSDT",
                          T0 * 1000, (T0 + 600) * 1000)
        assert ei.value.status == 404 and len(srv.requests) == 1
        # a 500 (logged retry) then an error envelope: no retry of the envelope
        srv.requests.clear()
        srv.add_fault("500")
        srv.add_fault("error", message="market closed for maintenance")
        with pytest.raises(HistoryError, match="market closed for maintenance"):
            await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                          T0 * 1000, (T0 + 600) * 1000)
        assert len(srv.requests) == 2
        # ... but CryptoCompare's "rate limit" envelope is retried
        srv.requests.clear()
        srv.add_fault("rate_limit_envelope", times=2)
        pages = await collect(CryptoCompareHistory(settings(srv.url)), "binance", "BTCUSDT",
                              T0 * 1000, (T0 + 600) * 1000)
        assert len(srv.requests) == 3 and len(pages[0]) == 10
    assert "retry" in caplog.text and KEY not in caplog.text


async def test_client_rate_cap() -> None:
    async with HistoryServer({("binance", "BTC", "USDT"): make_bars(T0, 300)}) as srv:
        h = settings(srv.url, requests_per_s=10)
        client = CryptoCompareHistory(h)
        client._limit_for = lambda minutes: max(1, min(49, minutes - 1))  # type: ignore
        pages = await collect(client, "binance", "BTCUSDT", T0 * 1000, (T0 + 300 * 60) * 1000)
        r = srv.requests
    assert len(r) == 6 and sum(len(p) for p in pages) == 300
    gaps = [b.t_s - a.t_s for a, b in itertools.pairwise(r)]
    assert min(gaps) >= 0.09, gaps  # 10 requests/s
