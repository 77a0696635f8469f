"""Faults (issue 6 items 2, 3b, 7): a TimescaleDB outage, a worker SIGKILLed while another
takes over its partitions, and a graceful SIGTERM under load. Each test replays real trades
and checks every bar is stored exactly once with the values of a clean computation."""

from __future__ import annotations

import asyncio
import csv
import math
import re
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaConsumer

from tables.window import apply_tick, finalize_bar
from tests.integration.conftest import BASE_DSN, SAMPLE, Stack, _free_port
from tests.support.harness import REPO

__all__: list[str] = []

pytestmark = pytest.mark.integration

FILES = ("binance_usdm_btcusdt_2024-08-08T2354_trades.csv",
         "binance_usdm_ethusdt_2024-08-08T2354_trades.csv",
         "binance_spot_btcusdt_2024-08-08T2354_trades.csv",
         "binance_spot_ethusdt_2024-08-08T2354_trades.csv")
_EXACT = ("open", "high", "low", "close", "trade_count", "open_ts_ms", "close_ts_ms")
_DECIMAL = ("volume", "quote_volume", "vwap")
_CLOSE = ("avg_price",)


def _dec(x: str | None) -> Decimal | None:
    return None if x is None else Decimal(x)


def clean_bars(files: tuple[str, ...]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every bar of ``files`` by ``(exchange, symbol, bucket_start_ms)``, computed with the
    pure window functions in file order (no broker, no worker)."""
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    for name in files:
        with (SAMPLE / "trades" / name).open() as fh:
            for r in csv.DictReader(fh):
                bars = open_.setdefault((r["exchange"], r["symbol"]), {})
                apply_tick(bars, float(r["price"]), float(r["qty"]), int(r["ts_ms"]), 0)
    return {(ex, sym, int(b["b"])): finalize_bar(ex, sym, b)
            for (ex, sym), bars in open_.items() for b in bars.values()}


async def stored_rows(stack: Stack) -> list[asyncpg.Record]:
    """Every ``bars_1m`` row of the stack's database."""
    conn = await stack.db()
    try:
        return list(await conn.fetch(
            "SELECT *, (extract(epoch from bucket_start) * 1000)::bigint AS start_ms "
            "FROM bars_1m ORDER BY exchange, symbol, bucket_start"))
    finally:
        await conn.close()


async def wait_all_bars(stack: Stack, want: dict[tuple[str, str, int], Any],
                        timeout_s: float = 60) -> list[asyncpg.Record]:
    """Wait until every key of ``want`` has a row (workers must stay alive)."""
    deadline = time.monotonic() + timeout_s
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        try:
            rows = await stored_rows(stack)
        except (OSError, asyncpg.PostgresError):
            rows = []
        if set(want) <= {(r["exchange"], r["symbol"], r["start_ms"]) for r in rows}:
            return rows
        for w in stack.workers:
            w.assert_alive()
        await asyncio.sleep(0.5)
    got = {(r["exchange"], r["symbol"], r["start_ms"]) for r in rows}
    missing = set(want) - got
    published = {(b["exchange"], b["symbol"], b["bucket_start_ms"]) for b in
                 (orjson.loads(v) for _, v in await stack.read_topic(
                     stack.settings.topics.bars, idle_s=1.0))}
    dead = Counter(orjson.loads(v)["reason"] for _, v in await stack.read_topic(
        stack.settings.topics.dead_letter, idle_s=1.0))
    raise AssertionError(
        f"bars missing after {timeout_s}s: {sorted(missing)}; of them published to the bars "
        f"topic: {sorted(missing & published)}; dead letters: {dict(dead)}")


def assert_exactly_once_and_clean(rows: list[asyncpg.Record],
                                  want: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    """One row per bar, no extra bar, every value equal to the clean computation."""
    keys = [(r["exchange"], r["symbol"], r["start_ms"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == set(want)
    wrong = [(k, f, r[f], want[k][f]) for r, k in zip(rows, keys, strict=True)
             for f in (*_EXACT, *_DECIMAL, *_CLOSE)
             if not (r[f] == want[k][f] if f in _EXACT
                     else r[f] == _dec(want[k][f]) if f in _DECIMAL
                     else math.isclose(r[f], want[k][f], rel_tol=1e-9))]
    assert not wrong, f"{len(wrong)} wrong values (bar, field, stored, clean): {wrong}"


async def updated_at(stack: Stack) -> dict[tuple[str, str, int], Any]:
    return {(r["exchange"], r["symbol"], r["start_ms"]): r["updated_at"]
            for r in await stored_rows(stack)}


async def assert_no_rewrites(stack: Stack, settle_s: float = 3.0) -> None:
    """No bar is written again after all are stored (``updated_at`` does not move)."""
    before = await updated_at(stack)
    await asyncio.sleep(settle_s)
    assert await updated_at(stack) == before


async def metric(stack: Stack, port: int, name: str, labels: str = "") -> float:
    """A sample of the worker's ``/metrics`` (0 when absent)."""
    status, body = await stack.http("/metrics", port=port)
    assert status == 200
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def committed(stack: Stack, topic: str) -> dict[int, int]:
    """Offsets committed by the app's consumer group on ``topic``, by partition."""
    cons = AIOKafkaConsumer(bootstrap_servers=stack.settings.broker.bootstrap_servers,
                            group_id=stack.settings.app.id, enable_auto_commit=False)
    await cons.start()
    try:
        return {tp.partition: (await cons.committed(tp)) or 0
                for tp in await stack.partitions(topic)}
    finally:
        await cons.stop()


async def set_db_connections(stack: Stack, allow: bool) -> None:
    """Make the stack's database (only) unreachable, or reachable again."""
    admin = await asyncpg.connect(BASE_DSN)
    try:
        await admin.execute(
            f'ALTER DATABASE "{stack.name}" WITH ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1", stack.name)
    finally:
        await admin.close()


def replay_args(*extra: str) -> list[str]:
    return ["--namespace", "", *extra, *(str(SAMPLE / "trades" / f) for f in FILES)]


async def test_db_outage_keeps_bars_bounded_and_writes_each_once(stack: Stack) -> None:
    """TimescaleDB refuses connections while all trades are replayed: the worker lives, the
    sink retries, holds at most 2 x batch_size bars (the rest wait in the broker) and its
    RSS stays bounded; once the database is back every bar is written exactly once."""
    batch = 3
    want = clean_bars(FILES)
    assert len(want) > 4 * batch  # enough bars to hit the bound
    w = stack.worker(MARKETFLOW_SINK__BATCH_SIZE=str(batch),
                     MARKETFLOW_SINK__RETRY_MAX_S="1").start()
    await w.wait_ready()
    port = stack.settings.web.port
    assert w.proc is not None
    proc = psutil.Process(w.proc.pid)
    await set_db_connections(stack, allow=False)
    try:
        rss0 = proc.memory_info().rss
        retries0 = await metric(stack, port, "marketflow_sink_retries_total",
                                '{sink="timescaledb"}')
        await stack.replay_cli(*replay_args())
        # every bar closes (last ones by idle timeout) and is published to the bars topic
        deadline = time.monotonic() + 30
        while len(await stack.read_topic(stack.settings.topics.bars, idle_s=1.0)) < len(want):
            assert time.monotonic() < deadline, "bars not all published during the outage"
        rss_samples: list[int] = []
        held: list[float] = []
        for _ in range(12):  # ~6 s of the outage with every bar waiting
            w.assert_alive()
            rss_samples.append(proc.memory_info().rss)
            held.append(await metric(stack, port, "marketflow_sink_pending_bars"))
            await asyncio.sleep(0.5)
        retries1 = await metric(stack, port, "marketflow_sink_retries_total",
                                '{sink="timescaledb"}')
        assert retries1 > retries0 + 3, (retries0, retries1)
        assert 0 < max(held) <= 2 * batch, held  # bounded, and back-pressure engaged
        assert max(rss_samples) - rss0 < 64 * 2**20, (rss0, rss_samples)
        assert await stored_rows_unreachable(stack)
    finally:
        await set_db_connections(stack, allow=True)
    rows = await wait_all_bars(stack, want, timeout_s=40)
    assert_exactly_once_and_clean(rows, want)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w.assert_alive()


async def stored_rows_unreachable(stack: Stack) -> bool:
    """True when the stack's database refuses connections."""
    try:
        await (await stack.db()).close()
    except asyncpg.PostgresError:
        return True
    return False


async def test_sigkill_one_of_two_workers_other_takes_over(stack: Stack) -> None:
    """Two workers share the partitions; one is SIGKILLed mid-replay; the survivor takes its
    partitions over (after the 6 s session timeout) and every bar is stored once, equal to
    the clean computation."""
    want = clean_bars(FILES)
    w1 = stack.worker().start()
    await w1.wait_ready()
    w2 = stack.worker(MARKETFLOW_WEB__PORT=str(_free_port())).start()
    await w2.wait_ready()
    await asyncio.sleep(2)  # w2 is ready once the rebalance with w1 is done; settle
    replay = asyncio.create_task(stack.replay_cli(
        *replay_args("--speed", "30", "--batch-span-ms", "200")))
    await asyncio.sleep(6)
    assert not replay.done()
    # both partitions carry keys, so the killed worker owned live work
    ticks = await stack.read_topic(stack.settings.topics.ticks, idle_s=1.0)
    assert len({k for k, _ in ticks}) >= 2
    w1.kill()
    before = await stored_rows(stack)
    await replay
    rows = await wait_all_bars(stack, want, timeout_s=60)
    assert len(before) < len(want)  # the kill really was mid-replay
    assert_exactly_once_and_clean(rows, want)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w2.assert_alive()


async def test_records_skipped_after_each_assignment_are_read_back(stack: Stack) -> None:
    """Faust's streams skip the first 3 records of every ``ticks`` and closed-bars partition
    after each assignment (injected: ``tests/support/skip_first/sitecustomize.py``) while a
    second worker joins mid-replay and leaves again: both agents read the skipped records
    back, and every bar is stored once, equal to the clean computation."""
    want = clean_bars(FILES)
    topics = (stack.settings.topics.ticks, stack.settings.topics.bars)
    inject = {"PYTHONPATH": str(REPO / "tests" / "support" / "skip_first"),
              "MF_TEST_SKIP_FIRST": "3", "MF_TEST_SKIP_TOPICS": ",".join(topics)}
    recovered = '{agent="%s"}'
    w1 = stack.worker(**inject).start()
    await w1.wait_ready()
    replay = asyncio.create_task(stack.replay_cli(
        *replay_args("--speed", "30", "--batch-span-ms", "200")))
    await asyncio.sleep(4)
    w2_port = _free_port()
    w2 = stack.worker(MARKETFLOW_WEB__PORT=str(w2_port), **inject).start()
    await w2.wait_ready()  # ready: the rebalance that gave w2 its partitions is done
    await asyncio.sleep(3)
    recovered_w2 = await metric(stack, w2_port, "marketflow_skipped_messages_recovered_total",
                                recovered % "bars")
    assert not replay.done()  # both rebalances fall inside the replay
    assert w2.stop() == 0
    await replay
    rows = await wait_all_bars(stack, want, timeout_s=60)
    assert_exactly_once_and_clean(rows, want)
    skips = [(m[1], int(m[2]), int(m[3])) for w in (w1, w2) for m in re.finditer(
        r"injected skip (\S+)\[(\d+)\]@(\d+)", w.log_path.read_text())]
    # skips after a rebalance, mid-stream, on both topics
    assert {t for t, _, off in skips if off > 0} == set(topics), skips
    port = stack.settings.web.port
    recovered_w1 = {agent: await metric(stack, port, "marketflow_skipped_messages_recovered_total",
                                        recovered % agent) for agent in ("bars", "sink")}
    assert recovered_w2 > 0 and min(recovered_w1.values()) > 0, (recovered_w1, recovered_w2)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w1.assert_alive()


async def test_sigterm_under_load_flushes_commits_and_restart_continues(stack: Stack) -> None:
    """SIGTERM while the replay publishes: the worker exits 0 within 30 s having written its
    pending bars and committed the offsets of what it wrote; a new worker continues and
    every bar is stored once, equal to the clean computation."""
    want = clean_bars(FILES)
    w1 = stack.worker().start()
    await w1.wait_ready()
    replay = asyncio.create_task(stack.replay_cli(
        *replay_args("--speed", "30", "--batch-span-ms", "200")))
    await asyncio.sleep(6)
    assert not replay.done()
    t0 = time.monotonic()
    rc = await asyncio.to_thread(w1.stop, 30)
    exit_s = time.monotonic() - t0
    assert rc == 0 and exit_s < 30, f"rc={rc} after {exit_s:.1f}s:\n{w1.tail(80)}"
    assert not replay.done()  # it stopped under load
    rows_at_stop = await stored_rows(stack)
    bars_committed = await committed(stack, stack.settings.topics.bars)
    ticks_committed = await committed(stack, stack.settings.topics.ticks)
    assert sum(ticks_committed.values()) > 0
    # every acknowledged bar is in the database, and what was written was committed
    assert sum(bars_committed.values()) == len(rows_at_stop) > 0, (
        bars_committed, len(rows_at_stop))
    w2 = stack.worker().start()
    await w2.wait_ready()
    await replay
    rows = await wait_all_bars(stack, want, timeout_s=60)
    assert_exactly_once_and_clean(rows, want)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    print(f"SIGTERM exit after {exit_s:.2f}s, {len(rows_at_stop)} bars written before")
