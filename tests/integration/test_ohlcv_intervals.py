"""OHLCV at every interval, per exchange and consolidated, against bars computed directly
from the replayed trades."""

from __future__ import annotations

import csv
from decimal import Decimal
from typing import Any

import pytest

from query.series import INTERVALS_MS
from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration

FILES = ["binance_spot_btcusdt_2024-08-08T2354_trades.csv",
         "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"]


def _trades() -> list[dict[str, Any]]:
    out = []
    for f in FILES:
        with (SAMPLE / "trades" / f).open() as fh:
            out += [{"exchange": r["exchange"], "ts": int(r["ts_ms"]), "price": float(r["price"]),
                     "qty": float(r["qty"]), "qty_text": r["qty"]} for r in csv.DictReader(fh)]
    return out


def _expected(trades: list[dict[str, Any]], iv: int) -> dict[int, dict[str, Any]]:
    """Per bucket: high, low, volume, count, and the allowed open/close prices (the
    earliest/latest trade; per exchange ties go to file order, across exchanges any)."""
    per: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for t in trades:  # file order within each exchange
        per.setdefault(t["ts"] - t["ts"] % iv, {}).setdefault(t["exchange"], []).append(t)
    out = {}
    for b, by_ex in per.items():
        every = [t for ts in by_ex.values() for t in ts]
        first = {ex: min(ts, key=lambda t: t["ts"]) for ex, ts in by_ex.items()}
        last = {ex: max(reversed(ts), key=lambda t: t["ts"]) for ex, ts in by_ex.items()}
        t0 = min(t["ts"] for t in first.values())
        t1 = max(t["ts"] for t in last.values())
        out[b] = {"high": max(t["price"] for t in every), "low": min(t["price"] for t in every),
                  "volume": sum(Decimal(t["qty_text"]) for t in every), "count": len(every),
                  "opens": {t["price"] for t in first.values() if t["ts"] == t0},
                  "closes": {t["price"] for t in last.values() if t["ts"] == t1}}
    return out


async def test_every_interval_per_exchange_and_consolidated(stack: Stack) -> None:
    trades = _trades()
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", *(str(SAMPLE / "trades" / f) for f in FILES))
    minutes = {t["ts"] - t["ts"] % 60_000 for t in trades if t["exchange"] == "binance"}
    await stack.wait_for_bars("binance", "BTCUSDT", minutes)
    await stack.wait_for_bars("binance-usdm", "BTCUSDT",
                              {t["ts"] - t["ts"] % 60_000 for t in trades
                               if t["exchange"] == "binance-usdm"})
    for interval, iv in INTERVALS_MS.items():
        for exchange in ("binance", "binance-usdm", None):
            mine = [t for t in trades if exchange in (None, t["exchange"])]
            want = _expected(mine, iv)
            q = (f"/ohlcv?symbol=BTCUSDT&interval={interval}&start=2024-08-08T20:00:00Z"
                 f"&end=2024-08-09T04:00:00Z" + (f"&exchange={exchange}" if exchange else ""))
            status, body = await stack.http(q)
            assert status == 200, body
            got = {b["bucket_start_ms"]: b for b in body["bars"]}
            assert set(got) == set(want), (interval, exchange)
            for b, e in want.items():
                g = got[b]
                assert g["open"] in e["opens"] and g["close"] in e["closes"], (interval, b)
                assert (g["high"], g["low"], g["trade_count"]) == (e["high"], e["low"],
                                                                   e["count"])
                assert Decimal(g["volume"]) == e["volume"]  # exactly
                assert g["closed"] is True and g["exchange"] == exchange
    status, body = await stack.http("/ohlcv?symbol=BTCUSDT&interval=1m&start=0&end=1723161600000")
    assert status == 400 and "range too large" in body["error"]["message"]
    status, body = await stack.http("/ohlcv?symbol=BTCUSDT&interval=7m")
    assert status == 400
