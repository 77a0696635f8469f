"""The market replay simulator end to end: namespaced replays rebuild the exchange's bars,
HTTP and signal control, the simulated clock, replay from stored bars."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from tests.integration.conftest import (
    REPO,
    SAMPLE,
    Stack,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)

pytestmark = pytest.mark.integration

SPOT = "binance_spot_btcusdt_2020-09-27_trades.csv"
SPOT_KLINES = "binance_spot_btcusdt_2020-09-27_klines_1m.csv"
USDM = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
USDM_KLINES = "binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv"
USDM_FIRST_MS = 1723161256322


class ReplayProc:
    """A ``faust -A app replay`` subprocess with its output in a file."""

    def __init__(self, stack: Stack, *args: str) -> None:
        self.stack = stack
        self.args = args
        self.log = stack.tmp / f"replay-{time.monotonic_ns()}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> ReplayProc:
        with self.log.open("wb") as fh:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "faust", "-A", "app", "replay", *self.args, cwd=REPO,
                env={**os.environ, **self.stack.env}, stdout=fh, stderr=fh)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.returncode is None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def until(pred: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await pred()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def status(stack: Stack) -> dict[str, Any] | None:
    code, body = await stack.http("/replay/status")
    if code == 404:
        return None
    assert code == 200, body
    return dict(body)


async def wait_state(stack: Stack, state: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        s = await status(stack)
        return s if s is not None and s["state"] == state else None
    return dict(await until(check, timeout, f"replay state {state}"))


async def udf_time_s(stack: Stack) -> int:
    code, body = await stack.http("/udf/time")
    assert code == 200
    return int(body)


async def status_written_after(stack: Stack, updated_ms: int, timeout: float = 10
                               ) -> dict[str, Any]:
    """The first replay state written (``updated_ms``, the replay's wall clock) at or after
    ``updated_ms``: a state the replay computed that late, not one read again."""
    async def check() -> dict[str, Any] | None:
        s = await status(stack)
        return s if s is not None and s["updated_ms"] >= updated_ms else None
    return dict(await until(check, timeout, f"a replay state written after {updated_ms}"))


async def settled_status(stack: Stack, first: dict[str, Any], timeout: float = 20
                         ) -> dict[str, Any]:
    """A paused replay's state once its ``published`` count stood still over 1 s of
    consecutive states (the flush in flight at the pause has gone out); AssertionError
    when it still grows after ``timeout`` s (publishing did not stop)."""
    deadline = time.monotonic() + timeout
    prev = first
    while True:
        cur = await status_written_after(stack, prev["updated_ms"] + 1_000)
        if cur["published"] == prev["published"]:
            return cur
        assert time.monotonic() < deadline, f"still publishing while paused: {prev} {cur}"
        prev = cur


async def _klines_rebuilt(stack: Stack, ns: str) -> None:
    for trades, klines_file, exchange in ((SPOT, SPOT_KLINES, "binance"),
                                          (USDM, USDM_KLINES, "binance-usdm")):
        klines = load_klines(klines_file)
        minutes, rows = complete_minutes(trades, klines)
        all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
        bars = await stack.wait_for_bars(f"{ns}.{exchange}", "BTCUSDT", all_minutes, 45)
        assert_bars_equal_klines(bars, klines, minutes)
        assert sum(b["trade_count"] for b in bars.values()) == len(rows)
    conn = await stack.db()
    try:
        exchanges = {r["exchange"] for r in await conn.fetch(
            "SELECT DISTINCT exchange FROM bars_1m")}
    finally:
        await conn.close()
    # isolation: nothing was written under the real exchange names
    assert exchanges == {f"{ns}.binance", f"{ns}.binance-usdm"}


async def test_trades_at_1000x_rebuild_the_klines_in_the_namespace(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    for f in (SPOT, USDM):  # one at a time: 2020 and 2024 are years apart in event time
        t = time.monotonic()
        out = await stack.replay_cli("--speed", "1000", str(SAMPLE / "trades" / f))
        assert "into namespace 'replay'" in out and "finished" in out, out
        if f == USDM:  # 343 s of trades at x1000: paced, not instantaneous
            assert time.monotonic() - t >= 0.3
    await _klines_rebuilt(stack, "replay")


async def test_trades_at_max_speed_rebuild_the_klines_in_the_namespace(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    out = await stack.replay_cli("--speed", "0", "--namespace", "fast",
                                 *(str(SAMPLE / "trades" / f) for f in (SPOT, USDM)))
    assert "replayed 22313 ticks" in out and "into namespace 'fast'" in out, out
    await _klines_rebuilt(stack, "fast")


async def test_http_control_and_simulated_clock(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    assert (await stack.http("/replay/status"))[0] == 404
    assert (await stack.post("/replay/pause"))[0] == 404
    rp = await ReplayProc(stack, "--speed", "10", "--progress-s", "0.5",
                          str(SAMPLE / "trades" / USDM)).start()
    try:
        s = await wait_state(stack, "running")
        assert s["namespace"] == "replay" and s["total"] == 21313 and s["speed"] == 10
        assert s["source"]["files"][0].endswith(USDM)
        # running at x10: the clock moves ~10 s per wall second. Measured between two
        # states the replay wrote >= 3 s apart (its own updated_ms, so a slow test or HTTP
        # round trip does not count): 10 x that elapsed time, give or take 15 s of clock
        # (1.5 s of a flush being due but not yet acknowledged at either state); x1 or
        # x20 would be off by more than that.
        await until(lambda: _clock_past(stack, USDM_FIRST_MS + 2_000), 10, "clock moves")
        s0 = await status(stack) or {}
        s1 = await status_written_after(stack, s0["updated_ms"] + 3_000)
        elapsed_ms = s1["updated_ms"] - s0["updated_ms"]
        moved_ms = s1["clock_ms"] - s0["clock_ms"]
        assert abs(moved_ms - 10 * elapsed_ms) <= 15_000, (elapsed_ms, moved_ms, s0, s1)
        # /udf/time follows the simulated clock: read between two states, it lies between
        # their clocks (the clock only moves forward while running), whatever the delays
        before = await status(stack) or {}
        udf_s = await udf_time_s(stack)
        after = await status(stack) or {}
        assert before["clock_ms"] // 1000 <= udf_s <= after["clock_ms"] // 1000, (
            before, udf_s, after)
        assert abs(time.time() - after["clock_ms"] / 1000) > 86_400  # not the wall clock

        code, body = await stack.post("/replay/pause")
        assert code == 200 and body["state"] == "paused" and body["applied"], body
        assert (await stack.post("/replay/pause"))[0] == 409
        # publishing stops after the flush in flight (at most --batch-max 1000 ticks) and
        # the clock stands still where the pause froze it
        p1 = await settled_status(stack, body)
        p0 = body["clock_ms"]
        assert p1["state"] == "paused" and p1["clock_ms"] == p0, (body, p1)
        assert 0 <= p1["published"] - body["published"] <= 1000, (body, p1)
        assert await udf_time_s(stack) == p0 // 1000
        # price statistics on the replayed exchange follow the replay clock
        code, st = await stack.http("/prices/highest/replay.binance-usdm/BTCUSDT?period=30s")
        assert code == 200, st
        assert st["to"] == p0 // 1000 * 1000 + 999 and st["count"] > 0, (p0, st)

        # seek forward while paused: the clock jumps there and stays
        target = USDM_FIRST_MS + 240_000
        code, body = await stack.post(f"/replay/seek?to={target}")
        assert code == 200 and body["clock_ms"] == target, body
        assert (await stack.post("/replay/seek?to=yesterday"))[0] == 400
        assert (await stack.post("/replay/speed?x=-3"))[0] == 400
        assert (await stack.post("/replay/rewind"))[0] == 400
        later = await status_written_after(stack, body["updated_ms"] + 500)
        assert later["clock_ms"] == target, later
        code, body = await stack.post("/replay/resume")
        assert code == 200 and body["state"] == "running", body
        assert (await stack.post("/replay/resume"))[0] == 409
        await until(lambda: _clock_past(stack, target + 3_000), 10, "clock after seek")
        s2 = await status(stack) or {}
        _, rows = complete_minutes(USDM, {})
        skipped = sum(1 for r in rows if int(r["ts_ms"]) < target)
        assert skipped > 10_000 and s2["position"] >= skipped  # jumped over them
        # seek back: the clock jumps back
        code, body = await stack.post(f"/replay/seek?to={USDM_FIRST_MS + 10_000}")
        assert code == 200 and body["clock_ms"] < target, body
        code, body = await stack.post("/replay/speed?x=2")
        assert code == 200 and body["speed"] == 2, body

        code, body = await stack.post("/replay/stop")
        assert code == 200, body
        assert await rp.wait(20) == 0, rp.output()
        out = rp.output()
        assert "stopped at" in out and "ticks/s" in out and "ETA" in out, out
        s3 = await status(stack) or {}
        assert s3["state"] == "stopped" and not s3["active"]
        assert (await stack.post("/replay/pause"))[0] == 409
        # a stopped replay no longer drives /udf/time: the wall clock, read between two
        # wall-clock readings of ours (same host clock, whole seconds)
        wall_before = int(time.time())
        udf_s = await udf_time_s(stack)
        wall_after = int(time.time())
        assert wall_before <= udf_s <= wall_after, (wall_before, udf_s, wall_after)
    finally:
        rp.kill()


async def _clock_past(stack: Stack, ms: int) -> bool:
    s = await status(stack)
    return s is not None and s["clock_ms"] > ms


async def test_signals_pause_and_resume(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    rp = await ReplayProc(stack, "--speed", "20", str(SAMPLE / "trades" / USDM)).start()
    try:
        await wait_state(stack, "running")
        rp.signal(signal.SIGUSR1)
        s = await wait_state(stack, "paused", 5)
        await asyncio.sleep(1.0)
        s2 = await status(stack) or {}
        assert s2["state"] == "paused" and s2["clock_ms"] == (await status(stack) or {})[
            "clock_ms"]
        assert s2["clock_ms"] - s["clock_ms"] < 2_000  # at most the flush in flight
        assert await udf_time_s(stack) == s2["clock_ms"] // 1000
        rp.signal(signal.SIGUSR2)
        await wait_state(stack, "running", 5)
        await until(lambda: _clock_past(stack, s2["clock_ms"] + 5_000), 10, "clock resumes")
        assert (await stack.post("/replay/stop"))[0] == 200
        assert await rp.wait(20) == 0, rp.output()
    finally:
        rp.kill()


async def test_replay_from_stored_bars_rebuilds_them_in_the_namespace(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    path = SAMPLE / "trades" / USDM
    await stack.replay_cli("--namespace", "", str(path))  # load history under real names
    _, rows = complete_minutes(USDM, load_klines(USDM_KLINES))
    all_minutes = {int(r["ts_ms"]) // 60_000 * 60_000 for r in rows}
    source = await stack.wait_for_bars("binance-usdm", "BTCUSDT", all_minutes, 45)
    await asyncio.sleep(1.5)  # let the sink settle: no late rewrite may follow
    before = {m: dict(r) for m, r in (await stack.bars("binance-usdm", "BTCUSDT")).items()}
    # The worker's watermark is per partition: the source ticks already moved it to the
    # end of the file on their partition, so replayed ticks of the same minutes must go to
    # the other one (with 2 partitions, "binance-usdm:BTCUSDT" -> 1, "sim.…" -> 0).
    p = DefaultPartitioner()
    assert p(b"binance-usdm:BTCUSDT", [0, 1], [0, 1]) != p(b"sim.binance-usdm:BTCUSDT",
                                                          [0, 1], [0, 1])
    out = await stack.replay_cli("--namespace", "sim",
                                 "--bars", "--exchange", "binance-usdm", "--symbol", "BTCUSDT",
                                 "--from", "2024-08-08T23:54:00Z",
                                 "--to", "2024-08-09T00:00:00Z")
    assert "into namespace 'sim'" in out, out
    rebuilt = await stack.wait_for_bars("sim.binance-usdm", "BTCUSDT", all_minutes, 45)
    assert set(rebuilt) == set(source) == all_minutes
    for m in sorted(all_minutes):
        fields = ("open", "high", "low", "close", "volume", "trade_count")
        assert tuple(rebuilt[m][f] for f in fields) == tuple(source[m][f] for f in fields), m
    await asyncio.sleep(1.0)
    after = {m: dict(r) for m, r in (await stack.bars("binance-usdm", "BTCUSDT")).items()}
    assert after == before  # the source bars are untouched (updated_at included)
    assert Path(path).is_file()
