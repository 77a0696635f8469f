"""The chart page (``/``) and the TradingView datafeed module in a real browser.

One worker for the module, fed by one market replay of the shipped 2024-08-08 trades
(namespace ``replay``, so the exchanges are ``replay.binance`` and
``replay.binance-usdm``), and headless Chromium (``tests/support/browser.py``). The
replay holds 343 s of trades; to keep some of them for every test it runs only while a
test needs it moving (the ``paused_between_tests`` fixture pauses it after each test).
The window idle timeout is long, so a paused replay does not close its open minute.

Timing checks are deadlines only (a loaded 2-core machine): nothing asserts how fast.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.async_api import Browser, Page, WebSocketRoute

from tests.integration.conftest import (
    BASE_DSN,
    REPO,
    SAMPLE,
    TOPICS,
    Stack,
    _settings_with,
    until,
)
from tests.integration.test_replay_simulator import ReplayProc
from tests.support.browser import WatchedPage, chromium, watched_page
from tests.support.harness import Isolation

pytestmark = pytest.mark.integration

SPEED = 10  # the 343 s of trades last ~34 s of running replay
FILES = ["binance_usdm_btcusdt_2024-08-08T2354_trades.csv",
         "binance_usdm_ethusdt_2024-08-08T2354_trades.csv",
         "binance_spot_btcusdt_2024-08-08T2354_trades.csv",
         "binance_spot_ethusdt_2024-08-08T2354_trades.csv"]
USDM = "replay.binance-usdm"
INTERVAL_MS = {"1m": 60_000, "5m": 300_000}
SCREENSHOT = REPO / "var" / "screenshots" / "chart.png"
LIVE_DEADLINE_MS = 2_000  # a live tick reaches the chart within this
LOAD_TIMEOUT_MS = 20_000


@dataclass
class Env:
    """The module's deployment: stack, its worker's replay, the browser."""

    stack: Stack
    replay: ReplayProc
    browser: Browser

    async def replay_command(self, command: str) -> int:
        """POST ``/replay/<command>``; the status (409 = already in that state)."""
        code, _ = await self.stack.post(f"/replay/{command}")
        return code

    async def replay_status(self) -> dict[str, Any]:
        """``GET /replay/status`` (asserted 200)."""
        code, body = await self.stack.http("/replay/status")
        assert code == 200, body
        return dict(body)

    async def run_replay(self) -> None:
        """Resume the replay if paused and wait until it runs."""
        await self.replay_command("resume")
        await until(lambda: self._state_is("running"), 10, "replay running")

    async def _state_is(self, state: str) -> bool:
        return (await self.replay_status())["state"] == state


async def _closed_bars(stack: Stack, n: int) -> bool:
    """Whether ``/ohlcv`` has ``n`` closed 1-minute BTCUSDT bars of the replay."""
    code, body = await stack.http(f"/ohlcv?symbol=BTCUSDT&exchange={USDM}"
                                  "&start=2024-08-08T23:50:00Z&end=2024-08-09T00:10:00Z")
    return code == 200 and sum(b["closed"] for b in body["bars"]) >= n


@pytest.fixture(scope="module")
async def env(services: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """A worker, a replay that made two closed minutes (then paused), and Chromium."""
    iso = Isolation.new("it", BASE_DSN)
    await iso.create_database()
    environ = {**iso.env(TOPICS, partitions=2),
               "MARKETFLOW_WINDOW__GRACE_MS": "5000",
               "MARKETFLOW_WINDOW__IDLE_TIMEOUT_S": "600",  # a paused replay keeps its minute
               "MARKETFLOW_SINK__FLUSH_INTERVAL_S": "0.5",
               # the page must load without a console error; with the default 0.1 s, a
               # worker loop busy with the replay (2 cores, Chromium starting) once let three
               # Redis calls time out, the breaker opened and /health answered 503. The
               # timeouts themselves are tested in test_hung_redis.py.
               "MARKETFLOW_REDIS__REQUEST_TIMEOUT_S": "1",
               "MARKETFLOW_LOG__FORMAT": "json"}
    stack = Stack(iso.name, environ, _settings_with(environ), iso.dsn,
                  tmp_path_factory.mktemp("chart"))
    replay: ReplayProc | None = None
    try:
        worker = stack.worker().start()
        await worker.wait_ready()
        replay = await ReplayProc(stack, "--speed", str(SPEED), "--progress-s", "0",
                                  *(str(SAMPLE / "trades" / f) for f in FILES)).start()
        await until(lambda: _closed_bars(stack, 2), 90, "two closed minutes replayed")
        async with chromium() as browser:
            e = Env(stack, replay, browser)
            await e.replay_command("pause")
            yield e
    finally:
        if replay is not None:
            replay.kill()
        for w in stack.workers:
            if w.proc is not None:
                w.stop(timeout=20)
        await iso.cleanup(stack.settings.redis.url.get_secret_value())


@pytest.fixture(autouse=True)
async def paused_between_tests(env: Env) -> AsyncIterator[None]:
    """Pause the replay after each test (keeps trades for the next; 409 = paused)."""
    yield
    await env.replay_command("pause")


# ---- page helpers ------------------------------------------------------------------------


@asynccontextmanager
async def chart_page(env: Env, symbol: str = "BTCUSDT", exchange: str = USDM,
                     interval: str = "1m") -> AsyncIterator[WatchedPage]:
    """The chart page on a series, once its first history load is drawn.

    Args:
        env: the module's deployment.
        symbol: ``?symbol=``.
        exchange: ``?exchange=`` ("" = consolidated).
        interval: ``?interval=``.

    Yields:
        The watched page; on a clean exit it must have recorded no problem.
    """
    base = env.stack.base_url
    async with watched_page(env.browser, base) as wp:
        q = urlencode({"symbol": symbol, "exchange": exchange, "interval": interval})
        await wp.page.goto(f"{base}/?{q}")
        await wait_loaded(wp.page, 1)
        yield wp
        assert wp.problems() == []


async def wait_loaded(page: Page, loads: int) -> None:
    """Wait until the page finished ``loads`` history loads and draws candles."""
    await page.wait_for_function(
        "n => window.marketflowChart && marketflowChart.state().loads >= n"
        " && !marketflowChart.state().loading && marketflowChart.bars().length > 0",
        arg=loads, timeout=LOAD_TIMEOUT_MS)


# Page predicates are written as functions ("() => ..."): Playwright polls a bare
# expression with eval(), which the page's Content-Security-Policy (rightly) refuses.


async def chart_state(page: Page) -> dict[str, Any]:
    """The page's ``marketflowChart.state()``."""
    return dict(await page.evaluate("marketflowChart.state()"))


async def ohlcv_mismatches(env: Env, page: Page) -> list[str]:
    """Differences between the drawn candles and ``/ohlcv`` over the same range.

    Every drawn bucket must be an ``/ohlcv`` bucket and vice versa; closed buckets must
    have the same open, high, low, close and volume (the open ones may be older or newer
    by an update).
    """
    st = await chart_state(page)
    bars = await page.evaluate("marketflowChart.bars()")
    vols = {v["time"]: v["value"] for v in await page.evaluate("marketflowChart.volumes()")}
    iv = INTERVAL_MS[st["interval"]]
    q = urlencode({"symbol": st["symbol"], "exchange": st["exchange"] or "",
                   "interval": st["interval"], "start": bars[0]["time"] * 1000,
                   "end": bars[-1]["time"] * 1000 + iv})
    code, body = await env.stack.http(f"/ohlcv?{q}")
    assert code == 200, body
    want = {b["bucket_start_ms"] // 1000: b for b in body["bars"]}
    drawn = {b["time"]: b for b in bars}
    out = []
    if sorted(drawn) != sorted(want):
        out.append(f"buckets: drawn {sorted(drawn)} != /ohlcv {sorted(want)}")
    for t, w in sorted(want.items()):
        d = drawn.get(t)
        if d is None or not w["closed"]:
            continue
        got = (d["open"], d["high"], d["low"], d["close"])
        exp = (w["open"], w["high"], w["low"], w["close"])
        if got != exp:
            out.append(f"bucket {t}: drawn {got} != /ohlcv {exp}")
        if vols.get(t) != float(w["volume"]):  # the page parses the exact decimal string
            out.append(f"bucket {t}: volume {vols.get(t)} != /ohlcv {w['volume']}")
    return out


async def settled_mismatches(env: Env, page: Page, timeout: float = 5) -> list[str]:
    """:func:`ohlcv_mismatches` once it is empty, or as it still is after ``timeout`` s
    (the chart may lag a frame behind; with the replay paused nothing moves)."""
    deadline = time.monotonic() + timeout
    while (problems := await ohlcv_mismatches(env, page)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return [f"{await series_name(page)}: {p}" for p in problems]


async def series_name(page: Page) -> str:
    """``SYMBOL exchange interval`` of the drawn series, for messages."""
    st = await chart_state(page)
    return f"{st['symbol']} {st['exchange'] or 'consolidated'} {st['interval']}"


# ---- tests ---------------------------------------------------------------------------------


async def test_page_loads_clean_with_health_and_attribution(env: Env) -> None:
    async with chart_page(env) as wp:
        page = wp.page
        await page.wait_for_function(
            "() => document.getElementById('health').classList.contains('ok')", timeout=15_000)
        assert await page.is_hidden("#banner")
        assert await page.locator("#replay-panel").is_visible()  # a (paused) replay
        st = await chart_state(page)
        assert st["symbol"] == "BTCUSDT" and st["exchange"] == USDM and st["interval"] == "1m"
        # "now" follows the replay clock: 2024 candles, not today's
        assert abs(st["nowMs"] - (await env.replay_status())["clock_ms"]) < 120_000
        assert st["replay"]["state"] == "paused"
        # the pickers come from /udf/search
        values = "os => os.map(o => o.value)"
        exchanges = await page.eval_on_selector_all("#exchange option", values)
        assert exchanges == ["", "replay.binance", USDM]
        assert await page.eval_on_selector_all("#symbol option", values) == ["BTCUSDT",
                                                                            "ETHUSDT"]
        # attribution: the NOTICE's text and a link to tradingview.com, and the chart's logo
        notice = (REPO / "views/static/vendor/lightweight-charts.NOTICE").read_text().split()
        footer = (await page.inner_text("footer")).split()
        assert " ".join(notice) in " ".join(footer)
        assert await page.locator("footer a[href='https://www.tradingview.com/']").count() == 1
        assert await page.locator("#chart a#tv-attr-logo").count() == 1
        await asyncio.sleep(1.0)  # late errors (a failed asset, a stream error) show up too


async def test_banner_when_the_worker_is_unreachable(env: Env) -> None:
    base = env.stack.base_url
    async with watched_page(env.browser, base) as wp:
        await wp.page.goto(f"{base}/?symbol=BTCUSDT&exchange={USDM}")
        await wait_loaded(wp.page, 1)
        await wp.page.route("**/health", lambda route: route.abort())  # the worker "is gone"
        await wp.page.wait_for_function(
            "() => document.getElementById('health').classList.contains('down')", timeout=15_000)
        assert "unreachable" in await wp.page.inner_text("#banner")
        assert await wp.page.is_visible("#banner")


async def test_stream_reconnects_and_resubscribes(env: Env) -> None:
    base = env.stack.base_url
    sockets: list[WebSocketRoute] = []

    def through(ws: WebSocketRoute) -> None:  # pass every socket through to the worker
        ws.connect_to_server()
        sockets.append(ws)

    async with watched_page(env.browser, base) as wp:
        page = wp.page
        await page.route_web_socket("**/stream", through)
        await page.goto(f"{base}/?symbol=BTCUSDT&exchange={USDM}")
        await wait_loaded(page, 1)
        await page.wait_for_function("() => marketflowChart.state().lastFrameMs !== null",
                                     timeout=10_000)
        st = await chart_state(page)
        await sockets[0].close(code=4000, reason="test: connection dropped")
        await page.wait_for_function(
            "() => document.getElementById('banner').textContent.includes('disconnected')",
            timeout=5_000)
        # reconnected with backoff, subscribed again: a fresh bars snapshot, banner gone
        await page.wait_for_function("t => marketflowChart.state().lastFrameMs > t",
                                     arg=st["lastFrameMs"], timeout=15_000)
        await page.wait_for_function("() => document.getElementById('banner').hidden",
                                     timeout=5_000)
        assert len(sockets) == 2
        assert (await chart_state(page))["loads"] == st["loads"]  # no reload needed
        assert await page.evaluate("marketflowChart.bars()")
        assert wp.problems() == []


async def test_token_goes_in_the_first_frame_and_the_headers(env: Env) -> None:
    base = env.stack.base_url
    frames: list[str] = []
    auth_headers: set[str | None] = set()

    def spy(ws: WebSocketRoute) -> None:  # record the page's frames, pass them on
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            frames.append(str(message))
            server.send(message)
        ws.on_message(to_server)

    async with watched_page(env.browser, base) as wp:
        page = wp.page
        page.on("request", lambda r: auth_headers.add(r.headers.get("authorization"))
                if "/ohlcv" in r.url or "/health" in r.url else None)
        await page.route_web_socket("**/stream", spy)
        await page.goto(f"{base}/?symbol=BTCUSDT&exchange={USDM}&token=tok-123")
        await wait_loaded(page, 1)
        assert json.loads(frames[0]) == {"op": "auth", "token": "tok-123"}
        assert {json.loads(f)["op"] for f in frames[1:]} == {"subscribe"}
        assert auth_headers == {"Bearer tok-123"}
        assert wp.problems() == []


async def test_drawn_candles_equal_ohlcv(env: Env) -> None:
    async with chart_page(env) as wp:
        assert len(await wp.page.evaluate("marketflowChart.bars()")) >= 2
        mismatches = await settled_mismatches(env, wp.page)
        assert mismatches == [], "\n".join(mismatches)


async def test_live_ticks_reach_the_chart(env: Env) -> None:
    async with chart_page(env) as wp:
        page = wp.page
        await env.run_replay()
        # the open candle changes and a bar frame arrives, within the deadline
        before = await page.evaluate("JSON.stringify(marketflowChart.bars().at(-1))")
        await page.wait_for_function(
            "b => JSON.stringify(marketflowChart.bars().at(-1)) !== b"
            " && marketflowChart.state().lastFrameMs > Date.now() - 1000",
            arg=before, timeout=LIVE_DEADLINE_MS)
        # and again (not a single late frame)
        st = await chart_state(page)
        await page.wait_for_function("t => marketflowChart.state().lastFrameMs > t",
                                     arg=st["lastFrameMs"], timeout=LIVE_DEADLINE_MS)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOT))  # var/ is git-ignored
        assert SCREENSHOT.stat().st_size > 10_000


async def test_switching_symbol_exchange_and_interval_redraws(env: Env) -> None:
    async with chart_page(env) as wp:
        page = wp.page
        btc_close = (await page.evaluate("marketflowChart.bars()"))[-1]["close"]
        mismatches = []  # every step is checked; the differences are reported together
        await page.select_option("#symbol", "ETHUSDT")
        await wait_loaded(page, 2)
        st = await chart_state(page)
        assert (st["symbol"], st["exchange"], st["interval"]) == ("ETHUSDT", USDM, "1m")
        eth_close = (await page.evaluate("marketflowChart.bars()"))[-1]["close"]
        assert eth_close < btc_close / 10  # ETH ~2,700 vs BTC ~61,800: the other series
        mismatches += await settled_mismatches(env, page)

        await page.select_option("#exchange", "")  # consolidated
        await wait_loaded(page, 3)
        mismatches += await settled_mismatches(env, page)
        await page.select_option("#interval", "5m")
        await wait_loaded(page, 4)
        st = await chart_state(page)
        assert (st["symbol"], st["exchange"], st["interval"]) == ("ETHUSDT", None, "5m")
        times = [b["time"] for b in await page.evaluate("marketflowChart.bars()")]
        assert times and all(t % 300 == 0 for t in times)
        mismatches += await settled_mismatches(env, page)
        assert mismatches == [], "\n".join(mismatches)


DATAFEED_PAGES = """
async ({ticker, resolution, countBack}) => {
  const { MarketflowDatafeed } = await import('/static/datafeed.js');
  const df = new MarketflowDatafeed();
  let inCall = true, calledSync = null;
  const config = await new Promise((resolve) => {
    df.onReady((c) => { calledSync = inCall; resolve(c); });
    inCall = false;
  });
  const info = await new Promise((res, rej) => df.resolveSymbol(ticker, res, rej));
  const serverTime = await new Promise((res) => df.getServerTime(res));
  const pages = [];
  let to = serverTime + 60, first = true;
  for (let i = 0; i < 50; i++) {
    const period = {from: to - countBack * 60, to, countBack, firstDataRequest: first};
    const [bars, meta] = await new Promise((res, rej) =>
      df.getBars(info, resolution, period, (b, m) => res([b, m]), rej));
    pages.push({to, bars, meta});
    if (meta.noData) break;
    to = bars[0].time / 1000;
    first = false;
  }
  window.__df = df;
  window.__info = info;
  return {config, calledSync, info, serverTime, pages};
}
"""


def check_pages(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pages are sorted, inside their ``to``, non-overlapping and end on noData.

    Returns:
        Every bar, oldest first.
    """
    assert pages[-1]["meta"]["noData"] and not pages[-1]["bars"], pages[-1]
    assert len(pages) >= 2
    out: list[dict[str, Any]] = []
    for p in reversed(pages[:-1]):
        times = [b["time"] for b in p["bars"]]
        assert times and times == sorted(set(times)), times
        assert times[-1] < p["to"] * 1000, (p["to"], times)  # `to` is exclusive
        assert not out or out[-1]["time"] < times[0], "pages overlap"
        out += p["bars"]
    return out


async def test_datafeed_pages_history_and_streams_bars(env: Env) -> None:
    async with chart_page(env) as wp:
        page = wp.page
        ticker = f"{USDM}:BTCUSDT"
        for count_back in (300, 1):  # one page, then one page per bar
            got = await page.evaluate(DATAFEED_PAGES, {"ticker": ticker, "resolution": "1",
                                                       "countBack": count_back})
            assert got["calledSync"] is False  # onReady answers asynchronously
            assert "1" in got["config"]["supported_resolutions"]
            assert got["info"]["ticker"] == ticker and got["info"]["exchange"] == USDM
            status = await env.replay_status()  # paused: /udf/time is its clock
            assert got["serverTime"] == status["clock_ms"] // 1000
            bars = check_pages(got["pages"])
            if count_back == 1:
                assert len(got["pages"]) >= 3
            # contiguous: together they are exactly /udf/history over the whole range
            q = urlencode({"symbol": ticker, "resolution": "1", "from": 0,
                           "to": got["serverTime"] + 59})
            code, udf = await env.stack.http(f"/udf/history?{q}")
            assert code == 200 and udf["s"] == "ok", udf
            want = [{"time": t * 1000, "open": o, "high": h, "low": lo, "close": c,
                     "volume": float(v)} for t, o, h, lo, c, v in zip(udf["t"], udf["o"], udf["h"],
                                                                 udf["l"], udf["c"], udf["v"],
                                                                 strict=True)]
            assert bars == want

        # live bars: the snapshot first, then updates while the replay runs
        await page.evaluate("""() => {
          window.__ticks = [];
          __df.subscribeBars(__info, '1', (bar) => __ticks.push(bar), 'g1',
                             () => __ticks.push('reset'));
        }""")
        await page.wait_for_function("() => __ticks.length > 0", timeout=10_000)
        snapshot = await page.evaluate("__ticks.length")
        await env.run_replay()
        await page.wait_for_function("n => __ticks.length > n + 2", arg=snapshot,
                                     timeout=10_000)
        ticks = await page.evaluate("__ticks")
        assert "reset" not in ticks
        assert all(set(t) == {"time", "open", "high", "low", "close", "volume"} for t in ticks)
        assert all(t["time"] % 60_000 == 0 for t in ticks)
        assert [t["time"] for t in ticks] == sorted(t["time"] for t in ticks)
        # unsubscribeBars stops them (a frame in flight may still land just after): the
        # count stands still while the replay keeps running (bars keep changing)
        await page.evaluate("__df.unsubscribeBars('g1')")
        await settled_value(page, "__ticks.length")
        assert (await env.replay_status())["state"] == "running"  # ticks kept coming


async def settled_value(page: Page, js: str, still_s: float = 1.5, timeout_s: float = 20
                        ) -> Any:
    """``page.evaluate(js)`` once two evaluations ``still_s`` apart returned the same value
    (frames in flight have landed and nothing moves any more).

    Raises:
        AssertionError: the value still changed after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    prev = await page.evaluate(js)
    while True:
        await asyncio.sleep(still_s)
        cur = await page.evaluate(js)
        if cur == prev:
            return cur
        assert time.monotonic() < deadline, f"{js} still changing after {timeout_s}s"
        prev = cur


def clock_text_ms(text: str) -> int:
    """``#replay-clock`` text (``2024-08-08 23:55:12 UTC``) as epoch ms."""
    dt = datetime.strptime(text, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


async def test_replay_panel_pause_resume_seek_speed_stop(env: Env) -> None:
    async with chart_page(env) as wp:
        page = wp.page
        clock = page.locator("#replay-clock")
        await page.click("#replay-resume")
        await page.wait_for_function("() => marketflowChart.state().replay?.state === 'running'",
                                     timeout=10_000)
        first = await clock.inner_text()
        await page.wait_for_function("t => document.getElementById('replay-clock')"
                                     ".textContent !== t", arg=first, timeout=5_000)

        # pause: the clock and the candles stand still (once a frame in flight landed)
        await page.click("#replay-pause")
        await page.wait_for_function("() => marketflowChart.state().replay?.state === 'paused'",
                                     timeout=10_000)
        frozen, _bars = await settled_value(
            page, "[document.getElementById('replay-clock').textContent, marketflowChart.bars()]")
        status = await env.replay_status()
        assert abs(clock_text_ms(frozen) - status["clock_ms"]) < 1_000

        # resume: it moves again
        await page.click("#replay-resume")
        await page.wait_for_function("t => document.getElementById('replay-clock')"
                                     ".textContent !== t", arg=frozen, timeout=5_000)

        # seek 40 s ahead: the clock jumps there
        before_seek = await env.replay_status()
        target = before_seek["clock_ms"] // 1000 * 1000 + 40_000
        value = datetime.fromtimestamp(target / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        await page.fill("#replay-seek-input", value)
        clicked_s = time.monotonic()
        await page.click("#replay-seek")
        await page.wait_for_function(
            "t => Math.abs(marketflowChart.state().replay.clock_ms - t) < 15000",
            arg=target, timeout=10_000)
        # the 250 ms clock display catches up: it shows the target (whole seconds), or
        # later by at most what the replay ran since the click (speed x measured time)
        await page.wait_for_function(
            "t => Date.parse(document.getElementById('replay-clock').textContent"
            ".replace(' UTC', 'Z').replace(' ', 'T')) >= t - 1000", arg=target, timeout=10_000)
        shown = clock_text_ms(await clock.inner_text())
        ran_ms = before_seek["speed"] * (time.monotonic() - clicked_s) * 1000
        assert target - 1_000 <= shown <= target + ran_ms + 1_000, (target, shown, ran_ms)

        # speed
        await page.fill("#replay-speed-input", "5")
        await page.click("#replay-speed")
        await until(lambda: _speed_is(env, 5), 10, "replay speed 5")

        # stop: the replay ends and the panel goes away
        await page.click("#replay-stop")
        await page.wait_for_selector("#replay-panel", state="hidden", timeout=15_000)
        assert await env.replay.wait(20) == 0, env.replay.output()


async def _speed_is(env: Env, speed: float) -> bool:
    """Whether the replay runs at ``speed``."""
    return (await env.replay_status())["speed"] == speed

