"""Replay control: transitions, parameters, the controller's clock, seekable sources."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.errors import ReplayError
from feeds.replay.controller import ReplayController
from feeds.replay.simulator import format_replay_progress, resolve_namespace
from feeds.replay.sources import BarSource, FileSource, _Bar
from stores.replay_control import check_transition, parse_speed

SPOT = (Path(__file__).resolve().parents[2] / "data" / "sample" / "trades"
        / "binance_spot_btcusdt_2020-09-27_trades.csv")


def test_transitions() -> None:
    assert check_transition(None, "pause") == (404, "no replay is running")
    assert check_transition({"state": "running"}, "pause") is None
    assert check_transition({"state": "paused"}, "pause")[0] == 409  # type: ignore[index]
    assert check_transition({"state": "running"}, "resume")[0] == 409  # type: ignore[index]
    assert check_transition({"state": "paused"}, "seek") is None
    assert check_transition({"state": "finished"}, "stop")[0] == 409  # type: ignore[index]
    with pytest.raises(ValueError):
        check_transition({"state": "running"}, "rewind")


@pytest.mark.parametrize("text", [None, "", "abc", "-1", "nan", "inf", "1e9"])
def test_bad_speeds(text: str | None) -> None:
    with pytest.raises(ValueError):
        parse_speed(text)


def test_speeds() -> None:
    assert [parse_speed(x) for x in ("0", "1", "60", "1000")] == [0, 1, 60, 1000]


def test_namespace_defaults() -> None:
    assert resolve_namespace(None, False, "replay") == "replay"
    assert resolve_namespace(None, True, "replay") == ""
    assert resolve_namespace("sim", True, "replay") == "sim"
    assert resolve_namespace("", False, "replay") == ""
    with pytest.raises(ReplayError):
        resolve_namespace("a:b", False, "replay")


def test_file_source_namespaces_and_seeks() -> None:
    src = FileSource([SPOT], "replay")
    assert src.total == 1000
    pos, it = src.ticks(src.first_ts_ms)
    ticks = list(it)
    assert pos == 0 and len(ticks) == 1000
    assert {t.exchange for t in ticks} == {"replay.binance"}
    assert src.last_ts_ms == ticks[-1].ts_ms
    mid = ticks[500].ts_ms
    pos, it = src.ticks(mid)
    rest = list(it)
    assert pos + len(rest) == 1000 and rest[0].ts_ms == mid
    assert all(t.ts_ms < mid for t in ticks[:pos])


def test_bar_source_seek_position() -> None:
    b0 = 1_723_161_300_000
    bars = [_Bar(b0 + i * 60_000, 10.0, 12.0, 9.0, 11.0, 2.0, 5) for i in range(3)]
    src = BarSource("binance", "BTCUSDT", bars, "replay", b0, b0 + 180_000)
    assert src.total == 15 and src.last_ts_ms == b0 + 179_999
    pos, it = src.ticks(b0 + 60_000)
    assert pos == 5 and len(list(it)) == 10
    pos, it = src.ticks(b0 + 90_000)
    rest = list(it)
    assert pos + len(rest) == 15 and all(t.ts_ms >= b0 + 90_000 for t in rest)
    assert {t.exchange for t in rest} == {"replay.binance"}
    with pytest.raises(ReplayError):
        BarSource("binance", "BTCUSDT", [], "replay", b0, b0 + 1)


async def test_controller_clock_pause_seek_speed() -> None:
    src = FileSource([SPOT], "replay")
    ctl = ReplayController(src, speed=1000, rebase_now=False, namespace="replay")
    ctl.anchor(src.first_ts_ms)
    ctl.next_src_ms = src.last_ts_ms
    time.sleep(0.05)
    running = ctl.clock_ms()
    assert running >= src.first_ts_ms + 40_000  # ~1000x wall time
    assert ctl.pause() is None and ctl.state == "paused"
    frozen = ctl.clock_ms()
    time.sleep(0.02)
    assert ctl.clock_ms() == frozen
    assert ctl.pause() is not None  # already paused
    assert ctl.seek(src.first_ts_ms + 5) is None
    assert ctl.clock_ms() == src.first_ts_ms + 5
    assert ctl.apply({"id": 7, "cmd": "speed", "speed": 0}) is None and ctl.speed == 0
    assert ctl.apply({"id": 8, "cmd": "bogus"}) is not None and ctl.ack == 8
    assert ctl.resume() is None and ctl.state == "running"
    snap = ctl.snapshot()
    assert snap["namespace"] == "replay" and snap["total"] == 1000
    assert "replay running max" in format_replay_progress(snap)


def test_rebase_never_goes_back() -> None:
    src = FileSource([SPOT], "")
    ctl = ReplayController(src, speed=0, rebase_now=True, namespace="")
    ctl.last_out_ms = time.time_ns() // 1_000_000 + 60_000
    ctl.anchor(src.first_ts_ms)
    assert ctl.to_output_ms(src.first_ts_ms) == ctl.last_out_ms + 1
