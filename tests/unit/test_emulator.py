"""The exchange emulator (feeds.emulator): pure formatting/walk parts, and the real TCP
server in-process and as a subprocess (no mocks)."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from core.config import DEFAULT_PAIRS
from feeds.emulator.server import (
    BAD_KINDS,
    EmulatorConfig,
    EmulatorServer,
    LineMaker,
    RandomWalk,
    format_line,
    format_price,
    parse_args,
    round_price,
    trades_schedule,
)
from feeds.live.generator import START_PRICES

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_FILE = ROOT / "data" / "sample" / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"
KEYS = ["symbol", "price", "timestamp"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def max_decimals(price: float) -> int:
    return 2 if price >= 1000 else 3 if price >= 1 else 6


def decimals_of(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def price_text(line: bytes) -> str:
    return line.split(b'"price":', 1)[1].split(b",", 1)[0].decode()


def classify(line: bytes) -> str:
    """Which of BAD_KINDS a line is, or ``good``."""
    if line == b"\n":
        return "empty"
    try:
        obj = json.loads(line)
    except ValueError:
        return "not_json"
    if "price" not in obj:
        return "missing_price"
    if obj["price"] <= 0:
        return "negative_price"
    if obj["symbol"] not in DEFAULT_PAIRS:
        return "unknown_symbol"
    return "good"


@asynccontextmanager
async def emulator(**kw: object) -> AsyncIterator[EmulatorServer]:
    cfg = EmulatorConfig(host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]
    async with EmulatorServer(cfg) as srv:
        yield srv


async def read_lines(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> list[bytes]:
    async def go() -> list[bytes]:
        out = []
        for _ in range(n):
            line = await reader.readline()
            assert line.endswith(b"\n"), f"connection closed after {len(out)} lines"
            out.append(line)
        return out

    return await asyncio.wait_for(go(), timeout)


async def wait_until(cond, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------- pure parts


def test_format_line_is_go_compact_with_key_order() -> None:
    assert format_line("BTCUSDT", 96391.79, 1744631432487) == (
        b'{"symbol":"BTCUSDT","price":96391.79,"timestamp":1744631432487}\n'
    )
    # Go writes integral floats without ".0"
    assert format_line("ETHUSDT", 3300.0, 1) == b'{"symbol":"ETHUSDT","price":3300,"timestamp":1}\n'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (96391.79, "96391.79"),
        (96000.0, "96000"),
        (0.32, "0.32"),
        (0.000015, "0.000015"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (1.25e-10, "1.25e-10"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e22, "1.5e+22"),
        (5.5, "5.5"),
        (-1.5, "-1.5"),
        (0.0, "0"),
        (1e16, "10000000000000000"),
    ],
)
def test_format_price_matches_go_encoding_json(value: float, text: str) -> None:
    assert format_price(value) == text
    assert float(text) == value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_format_price_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError):
        format_price(bad)


def test_round_price_by_magnitude() -> None:
    assert round_price(96391.78912) == 96391.79
    assert round_price(1000.0049) == 1000.0
    assert round_price(189.12345) == 189.123
    assert round_price(5.51249) == 5.512
    assert round_price(0.321234567) == 0.321235
    assert round_price(0.9999999) == 1.0


def test_random_walk_is_positive_rounded_reproducible() -> None:
    a = RandomWalk(DEFAULT_PAIRS, seed=7, step_s=0.5)
    b = RandomWalk(DEFAULT_PAIRS, seed=7, step_s=0.5)
    for _ in range(2000):
        for sym in DEFAULT_PAIRS:
            p = a.next(sym)
            assert p == b.next(sym)
            assert p > 0
            assert decimals_of(format_price(p)) <= max_decimals(p)
    # stays in a realistic band around its start price after 1000 s of walking
    for sym in DEFAULT_PAIRS:
        assert 0.5 < a.next(sym) / START_PRICES[sym] < 2
    assert RandomWalk(["BTCUSDT"], seed=1).next("BTCUSDT") != RandomWalk(
        ["BTCUSDT"], seed=2).next("BTCUSDT")


def test_random_walk_unknown_start_price_and_tiny_prices() -> None:
    w = RandomWalk(["ABCUSDT", "TINY"], seed=3, start_prices={"TINY": 2e-6},
                   vol_per_sqrt_s=0.5)
    assert 1 <= w.next("ABCUSDT") < 200
    for _ in range(1000):
        assert w.next("TINY") > 0


def test_line_maker_bad_cycle_keeps_good_stream() -> None:
    m = LineMaker(bad_every=3)
    lines = [ln for i in range(20) for ln in m.make("BTCUSDT", 100.0 + i, 1_700_000_000_000)]
    kinds = [classify(ln) for ln in lines]
    assert [i + 1 for i, k in enumerate(kinds) if k != "good"] == list(range(3, len(lines) + 1, 3))
    assert [k for k in kinds if k != "good"][:5] == list(BAD_KINDS)
    good = [json.loads(ln)["price"] for ln, k in zip(lines, kinds, strict=True) if k == "good"]
    assert good == [100.0 + i for i in range(20)]  # nothing lost to the bad lines
    assert lines[2] == b"not json at all\n"
    # line 6 is emitted with tick 4 (100 + 4), whose good line follows it
    assert json.loads(lines[5]) == {"symbol": "BTCUSDT", "price": -104.0,
                                    "timestamp": 1_700_000_000_000}
    assert json.loads(lines[8])["symbol"] == "XYZUSDT"
    assert list(json.loads(lines[11])) == ["symbol", "timestamp"]
    assert lines[14] == b"\n"
    every = LineMaker(bad_every=1)
    assert all(classify(every.make("BTCUSDT", 1.0, 1)[0]) != "good" for _ in range(10))
    assert LineMaker().make("BTCUSDT", 1.0, 1) == [format_line("BTCUSDT", 1.0, 1)]


def test_trades_schedule_follows_file_and_loops() -> None:
    with SAMPLE_FILE.open() as fh:
        rows = list(csv.DictReader(fh))
    got = list(trades_schedule([SAMPLE_FILE], speed=2.0, passes=2))
    assert len(got) == 2 * len(rows)
    first = int(rows[0]["ts_ms"])
    for (off, sym, price), row in zip(got, rows, strict=False):
        assert sym == row["symbol"]
        assert price == float(row["price"])
        assert off == pytest.approx((int(row["ts_ms"]) - first) / 2000)
    offs = [g[0] for g in got]
    assert offs == sorted(offs)
    assert got[len(rows)][0] == pytest.approx(got[len(rows) - 1][0] + 0.5)  # PASS_GAP_S / 2


def test_trades_schedule_merges_files_by_time() -> None:
    sample = ROOT / "data" / "sample" / "trades"
    files = [sample / "binance_spot_btcusdt_2024-08-08T2354_trades.csv",
             sample / "binance_spot_ethusdt_2024-08-08T2354_trades.csv"]
    got = list(trades_schedule(files, passes=1))
    assert {g[1] for g in got} == {"BTCUSDT", "ETHUSDT"}
    offs = [g[0] for g in got]
    assert offs == sorted(offs)


def test_parse_args_defaults_and_options() -> None:
    cfg, level = parse_args([])
    assert (cfg.host, cfg.port, cfg.rate, cfg.bad_every, cfg.trades) == (
        "127.0.0.1", 40101, 2.0, 0, [])
    assert cfg.pairs == DEFAULT_PAIRS
    assert level == "INFO"
    cfg, _ = parse_args(["--pairs", "BTCUSDT, ETHUSDT", "--rate", "1000", "--trades", "a.csv,b.csv",
                         "--trades", "c.csv", "--speed", "10", "--bad-every", "5",
                         "--name", "exchange2", "--port", "40102", "--seed", "42"])
    assert cfg.pairs == ["BTCUSDT", "ETHUSDT"]
    assert [p.name for p in cfg.trades] == ["a.csv", "b.csv", "c.csv"]
    assert (cfg.rate, cfg.speed, cfg.bad_every, cfg.name, cfg.port, cfg.seed) == (
        1000.0, 10.0, 5, "exchange2", 40102, 42)


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--rate", "-1"], ["--port", "70000"],
                                  ["--bad-every", "-2"], ["--pairs", ","], ["--speed", "nan"]])
def test_parse_args_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--pairs", "--rate", "--trades", "--speed", "--bad-every", "--port", "--seed"):
        assert opt in out


# --------------------------------------------------------------------- real server


async def test_two_clients_get_identical_valid_lines() -> None:
    async with emulator(rate=50.0, seed=1, wait_clients=2) as srv:
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
        a, b = await asyncio.gather(read_lines(r1, 100), read_lines(r2, 100))
        assert a == b
        t = now_ms()
        for line in a:
            obj = json.loads(line)
            assert list(obj) == KEYS
            assert obj["symbol"] in DEFAULT_PAIRS
            assert isinstance(obj["timestamp"], int)
            assert abs(obj["timestamp"] - t) < 5_000
            assert obj["price"] > 0
            assert decimals_of(price_text(line)) <= max_decimals(obj["price"])
            # compact, exactly what the Go exchanges would send
            assert line == format_line(obj["symbol"], obj["price"], obj["timestamp"])
        assert [json.loads(x)["symbol"] for x in a[:10]] == DEFAULT_PAIRS * 2  # interleaved
        for w in (w1, w2):
            w.close()


async def test_rate_is_roughly_honoured() -> None:
    async with emulator(rate=20.0, pairs=["BTCUSDT", "ETHUSDT"], wait_clients=1) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await read_lines(reader, 1)
        counts: Counter[str] = Counter()
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            counts[json.loads(line)["symbol"]] += 1
        writer.close()
    for sym in ("BTCUSDT", "ETHUSDT"):
        assert 12 <= counts[sym] <= 28, counts


async def test_high_rate_bursts() -> None:
    async with emulator(rate=1000.0, wait_clients=1) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        t0 = time.monotonic()
        lines = await read_lines(reader, 2500, timeout=10)
        elapsed = time.monotonic() - t0
        writer.close()
    assert all(classify(ln) == "good" for ln in lines)
    assert 0.2 < elapsed < 2.0  # 5000 lines/s nominal


async def test_bad_every_cycle_over_tcp() -> None:
    async with emulator(rate=100.0, bad_every=4, wait_clients=1) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        lines = await read_lines(reader, 60)
        writer.close()
    kinds = [classify(ln) for ln in lines]
    bad_positions = [i + 1 for i, k in enumerate(kinds) if k != "good"]
    assert bad_positions == list(range(4, 61, 4))
    assert [k for k in kinds if k != "good"] == list(BAD_KINDS) * 3


async def test_trades_mode_serves_file_in_order_restamped() -> None:
    with SAMPLE_FILE.open() as fh:
        rows = list(csv.DictReader(fh))
    async with emulator(trades=[SAMPLE_FILE], speed=1000.0, wait_clients=1) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        lines = await read_lines(reader, len(rows) + 20, timeout=10)
        writer.close()
    t = now_ms()
    objs = [json.loads(ln) for ln in lines]
    expected = rows + rows[:20]  # loops forever
    assert [(o["symbol"], o["price"]) for o in objs] == [
        (r["symbol"], float(r["price"])) for r in expected]
    for o in objs:
        assert list(o) == KEYS
        assert abs(o["timestamp"] - t) < 5_000  # re-stamped to now, not 2020
    stamps = [o["timestamp"] for o in objs]
    assert stamps == sorted(stamps)
    # pacing: 211.7 s of trades at x1000 is ~0.21 s on the wall clock
    assert 100 <= stamps[len(rows) - 1] - stamps[0] <= 1500


async def test_disconnecting_client_does_not_break_others() -> None:
    async with emulator(rate=100.0, wait_clients=3) as srv:
        conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
        for r, _ in conns:
            await read_lines(r, 5)
        conns[0][1].close()  # orderly close
        conns[1][1].transport.abort()  # reset
        await wait_until(lambda: srv.client_count == 1)
        sent = srv.lines_sent
        more = await read_lines(conns[2][0], 50)
        assert all(classify(ln) == "good" for ln in more)
        assert srv.lines_sent > sent
        # new clients are still welcome
        r4, w4 = await asyncio.open_connection("127.0.0.1", srv.port)
        await read_lines(r4, 5)
        w4.close()
        conns[2][1].close()


async def test_slow_client_is_dropped_and_others_keep_up() -> None:
    limit = 64 * 1024
    async with emulator(rate=1.0, pairs=["BTCUSDT"], max_client_buffer=limit) as srv:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", srv.port))
        fast_r, fast_w = await asyncio.open_connection("127.0.0.1", srv.port)
        await wait_until(lambda: srv.client_count == 2)
        chunk = b"x" * 16383 + b"\n"
        sent = 0
        received = 0

        async def drain() -> None:
            nonlocal received
            while srv.dropped_slow == 0 or received < sent:
                data = await fast_r.read(1 << 20)
                assert data, "fast client was disconnected"
                received += len(data)

        drainer = asyncio.create_task(drain())
        # until the slow client's kernel buffers are full and its transport buffer passes
        # the limit (a few MB on Linux); the reader keeps up all along
        while srv.dropped_slow == 0 and sent < 256 * 1024 * 1024:
            assert srv.broadcast(chunk) >= 1
            sent += len(chunk)
            await asyncio.sleep(0.001)
        await asyncio.wait_for(drainer, 10)
        assert srv.dropped_slow == 1
        assert srv.client_count == 1
        assert received == sent
        fast_w.close()
        slow.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_subprocess_cli_listens_serves_and_exits_on_sigterm() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feeds.emulator", "--port", str(port), "--rate", "50",
        "--name", "exchange9", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert first == f"emulator exchange9 listening on 127.0.0.1:{port}\n".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = await read_lines(reader, 20)
        assert all(list(json.loads(ln)) == KEYS for ln in lines)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 5)
        assert rc == 0
        assert time.monotonic() - t0 < 5
        assert await asyncio.wait_for(reader.read(), 5) is not None  # closed by the server
        writer.close()
        assert await proc.stdout.read() == b""  # exactly one stdout line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_subprocess_bad_trades_file_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feeds.emulator", "--port", "0", "--trades", str(bad),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1
    assert out == b""
    assert b"not a trades file" in err
