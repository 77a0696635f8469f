"""``faust -A app backfill`` against the local fake history server and a real TimescaleDB:
paging, pacing, retries, idempotency, resume after a failure, conflict policy."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from decimal import Decimal
from typing import Any

import pytest

from sql.bars_1m import upsert_bars
from tests.integration.conftest import REPO, Stack
from tests.support.history_server import CC_PATH, CD_PATH, HistoryServer, make_bars

pytestmark = pytest.mark.integration

KEY = "it-history-key"
T0 = 1_723_075_200  # 2024-08-08T00:00:00Z
M = 60_000


def history_env(srv: HistoryServer, source: str, **kw: str) -> dict[str, str]:
    env = {"MARKETFLOW_HISTORY__SOURCE": source,
           "MARKETFLOW_HISTORY__CRYPTOCOMPARE_URL": srv.url,
           "MARKETFLOW_HISTORY__COINDESK_URL": srv.url,
           "MARKETFLOW_HISTORY__API_KEY": KEY,
           "MARKETFLOW_HISTORY__REQUESTS_PER_S": "50",
           "MARKETFLOW_HISTORY__MAX_RETRIES": "2",
           "MARKETFLOW_HISTORY__BACKOFF_INITIAL_S": "0.05",
           "MARKETFLOW_HISTORY__BACKOFF_MAX_S": "0.2",
           "MARKETFLOW_HISTORY__TIMEOUT_S": "2"}
    env.update({f"MARKETFLOW_HISTORY__{k.upper()}": v for k, v in kw.items()})
    return env


async def backfill(stack: Stack, env: dict[str, str], *args: str,
                   timeout: float = 90) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faust", "-A", "app", "backfill", *args, cwd=REPO,
        env={**os.environ, **stack.env, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def rng(start_min: int, end_min: int) -> list[str]:
    return ["--from", str((T0 + start_min * 60) * 1000), "--to", str((T0 + end_min * 60) * 1000)]


async def job(stack: Stack) -> Any:
    conn = await stack.db()
    try:
        rows = await conn.fetch("SELECT * FROM backfill_jobs")
    finally:
        await conn.close()
    assert len(rows) == 1
    return rows[0]


def values(bars: dict[int, Any]) -> dict[int, tuple[Any, ...]]:
    return {k: (r["open"], r["high"], r["low"], r["close"], r["volume"], r["trade_count"],
                r["vwap"], r["source"], r["close_ts_ms"]) for k, r in bars.items()}


async def test_backfill_pages_paced_retried_idempotent(stack: Stack) -> None:
    series = make_bars(T0, 4500, skip=range(50, 60))
    async with HistoryServer({("binance", "BTC", "USDT"): series}, api_key=KEY) as srv:
        env = history_env(srv, "cryptocompare", requests_per_s="4")
        srv.add_fault("500", skip=1)  # the second page needs one retry
        args = ["--symbol", "BTCUSDT", "--exchange", "binance", *rng(0, 4500)]
        rc, out = await backfill(stack, env, *args)
        assert rc == 0, out
        reqs = list(srv.requests)
        assert [r.status for r in reqs] == [200, 500, 200, 200]
        assert [r.params["limit"] for r in reqs] == ["2000", "2000", "2000", "497"]
        gaps = [b.t_s - a.t_s for a, b in itertools.pairwise(reqs)]
        assert min(gaps) >= 0.24, gaps  # requests_per_s = 4
        assert "page 3" in out and "bars/s" in out and "ETA" in out and "4490 bars" in out
        assert KEY not in out

        bars = await stack.bars("binance", "BTCUSDT")
        assert set(bars) == {t * 1000 for t in series}
        b = bars[T0 * 1000]
        assert (b["open"], b["close"], b["volume"], b["source"]) == (100.0, 101.0, 2.0,
                                                                     "cryptocompare")
        assert b["vwap"] == Decimal("100.5") and b["close_ts_ms"] == T0 * 1000 + 59_999
        j = await job(stack)
        assert (j["state"], j["next_to_ms"], j["bars_written"], j["requests"]) == \
            ("done", None, 4490, 4)
        # the /ohlcv cache of the symbol was invalidated (generation bumped per page)
        r = stack.redis()
        try:
            assert int(await r.get(f"{stack.name}:ohlcv:gen:BTCUSDT") or 0) == 3
        finally:
            await r.aclose()

        # re-run: a finished job is a no-op
        srv.requests.clear()
        rc, out = await backfill(stack, env, *args)
        assert rc == 0 and "already done" in out, out
        assert srv.requests == []
        # forced: fetched again, same rows
        rc, out = await backfill(stack, env, *args, "--force")
        assert rc == 0, out
        assert len(srv.requests) == 3
        again = await stack.bars("binance", "BTCUSDT")
        assert values(again) == values(bars)
        assert (await job(stack))["state"] == "done"


async def test_backfill_resumes_after_failure(stack: Stack) -> None:
    series = make_bars(T0, 6000)
    async with HistoryServer({("binance", "SOL", "USDC"): series}, api_key=KEY) as srv:
        env = history_env(srv, "coindesk", max_retries="1")
        srv.add_fault("500", times=-1, skip=2)  # page 3 fails beyond the retry budget
        args = ["--symbol", "SOLUSDC", "--exchange", "binance", *rng(0, 6000)]
        rc, out = await backfill(stack, env, *args)
        assert rc == 1, out
        assert "giving up after 2 attempt(s)" in out and "FAILED" in out
        first = list(srv.requests)
        assert [r.status for r in first] == [200, 200, 500, 500]
        j = await job(stack)
        assert j["state"] == "error" and "giving up" in j["last_error"]
        assert j["next_to_ms"] == (T0 + 2000 * 60) * 1000 and j["bars_written"] == 4000
        assert j["requests"] == 4
        assert len(await stack.bars("binance", "SOLUSDC")) == 4000

        srv.faults.clear()
        srv.requests.clear()
        rc, out = await backfill(stack, env, *args)
        assert rc == 0, out
        second = list(srv.requests)
        assert [r.status for r in second] == [200]
        assert int(second[0].params["to_ts"]) == T0 + 1999 * 60  # continues below next_to_ms
        done_pages = {r.params["to_ts"] for r in first if r.status == 200}
        assert done_pages.isdisjoint(r.params["to_ts"] for r in second)  # no page twice
        assert all(r.params["fill"] == "false" for r in first + second)
        bars = await stack.bars("binance", "SOLUSDC")
        assert set(bars) == {t * 1000 for t in series}
        j = await job(stack)
        assert (j["state"], j["bars_written"], j["requests"], j["last_error"]) == \
            ("done", 6000, 5, None)


async def test_conflict_policy_keeps_own_bars_unless_overwrite(stack: Stack) -> None:
    series = make_bars(T0, 30)
    own_start = (T0 + 10 * 60) * 1000
    async with HistoryServer({("binance", "ETH", "USDT"): series}, api_key=KEY) as srv:
        env = history_env(srv, "cryptocompare")
        # schema first (the command migrates too, but the own bar must exist before it)
        rc, out = await backfill(stack, env, "--symbol", "ETHUSDT", "--exchange", "binance",
                                 *rng(-10, -5))
        assert rc == 0, out
        conn = await stack.db()
        try:
            await upsert_bars(conn, [{
                "exchange": "binance", "symbol": "ETHUSDT", "bucket_start_ms": own_start,
                "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 5.0,
                "trade_count": 7, "avg_price": 1.0, "vwap": 1.0, "open_ts_ms": own_start + 5,
                "close_ts_ms": own_start + 50_000}])
        finally:
            await conn.close()
        args = ["--symbol", "ETHUSDT", "--exchange", "binance", *rng(0, 30)]
        rc, out = await backfill(stack, env, *args)
        assert rc == 0, out
        bars = await stack.bars("binance", "ETHUSDT")
        assert len(bars) == 30
        own = bars[own_start]
        assert (own["source"], own["open"], own["trade_count"]) == ("ticks", 1.0, 7)
        assert bars[own_start + M]["source"] == "cryptocompare"

        rc, out = await backfill(stack, env, *args, "--overwrite-own", "--force")
        assert rc == 0, out
        own = (await stack.bars("binance", "ETHUSDT"))[own_start]
        assert (own["source"], own["open"], own["trade_count"]) == ("cryptocompare", 110.0, 0)
        assert own["close_ts_ms"] == own_start + 59_999
    assert CC_PATH != CD_PATH


async def test_bad_arguments_exit_2(stack: Stack) -> None:
    async with HistoryServer() as srv:
        env = history_env(srv, "none")
        base = ["--symbol", "BTCUSDT", "--exchange", "binance"]
        for args, msg in [
            ([*base, *rng(0, 10)], "no history source"),
            ([*base, *rng(0, 10), "--source", "bogus"], "--source"),
            ([*base, "--from", "yesterday", "--to", "1723075200000", "--source", "coindesk"],
             "invalid --from"),
            ([*base, *rng(10, 0), "--source", "coindesk"], "before --to"),
            (["--symbol", "BTCXYZ", "--exchange", "binance", *rng(0, 10)], "cannot split"),
        ]:
            rc, out = await backfill(stack, env, *args)
            assert rc == 2 and msg in out, (args, out)
        assert srv.requests == []
