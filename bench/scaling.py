#!/usr/bin/env python
"""Scaling benchmark: the same pre-produced ticks on a topic of ``--partitions``
partitions, consumed by 1 worker and then by 2 (``--workers``), each in a fresh isolated
run. The workers start first; when all are ready and their group has settled, the ticks
are produced. Prints per run the throughput (producing started -> last bar in
TimescaleDB), each worker's share and CPU, and whether the bars equal the pure
aggregator's.

Not a test: it prints figures. See ``bench/README.md`` ("Scaling benchmark"). Needs the
local services (``scripts/services.sh up``)::

    .venv/bin/python bench/scaling.py [--ticks 2000000] [--partitions 4] [--workers 1,2]

The ticks are ``bench/run.py``'s (the real sample, cycled and shifted in time); with
``--copies k`` each cycle's symbols get a suffix ``0..k-1`` (``BTCUSDT0``...), so the
sample's 4 keys become ``4 k`` keys and spread over the partitions (4 keys hash to fewer
than 4 partitions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import time
from typing import Any

import aiohttp
import asyncpg
import psutil
import run as single  # bench/run.py: input, expected bars, comparison
from common import FAUST, MINUTE, BenchRun, run_main, say

from core.admin import ensure_topics
from feeds.replay.simulator import batch_ticks
from tests.support.harness import Worker, free_port


def make_input(args: argparse.Namespace) -> tuple[list[tuple[str, list[Any]]], int, int, int]:
    """The messages (key, ticks) and the run's bar range: (messages, lo_ms, hi_ms, keys)."""
    sample = single.load_sample()
    ticks, _, _ = single.make_ticks(sample, args.ticks)
    if args.copies > 1:
        span = len(sample)
        ticks = [t._replace(symbol=f"{t.symbol}{(i // span) % args.copies}")
                 for i, t in enumerate(ticks)]
    messages = [m for flush in batch_ticks(iter(ticks), args.batch_max, args.batch_span_ms)
                for m in flush]
    lo_ms = ticks[0].ts_ms - ticks[0].ts_ms % MINUTE
    hi_ms = ticks[-1].ts_ms - ticks[-1].ts_ms % MINUTE + MINUTE
    return messages, lo_ms, hi_ms, len({(t.exchange, t.symbol) for t in ticks})


async def one_run(n_workers: int, args: argparse.Namespace,
                  messages: list[tuple[str, list[Any]]], expected: dict[tuple, dict],
                  lo_ms: int, hi_ms: int) -> dict[str, Any]:
    bench = BenchRun(args.partitions, {
        "MARKETFLOW_WINDOW__GRACE_MS": str(args.grace_ms),
        "MARKETFLOW_WINDOW__IDLE_TIMEOUT_S": "1",
        "MARKETFLOW_WINDOW__IDLE_CHECK_INTERVAL_S": "0.5",
    })
    res: dict[str, Any] = {"workers": n_workers}
    workers = [bench.worker]
    for i in range(1, n_workers):
        port = free_port()
        env = {**bench.env, "MARKETFLOW_WEB__PORT": str(port),
               "MARKETFLOW_APP__DATADIR": str(bench.workdir / f"faust-{i + 1}")}
        workers.append(Worker(env, bench.workdir / f"worker-{i + 1}.log", web_port=port,
                              loglevel="warn", command=(str(FAUST),),
                              new_session=False, tail_lines=40))
    say(f"\n[{n_workers} worker(s)] {bench.describe()}")
    http = aiohttp.ClientSession()
    db: asyncpg.Connection | None = None
    try:
        await bench.create_database()
        await ensure_topics(bench.settings)
        db = await asyncpg.connect(bench.dsn)
        t_launch = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            await w.wait_healthy(http, 120)
        while not all(w.ready_in_log() for w in workers):
            for w in workers:
                w.check_alive()
            if time.monotonic() - t_launch > 180:
                raise RuntimeError("the workers did not all log Faust's ready line in 180 s")
            await asyncio.sleep(0.2)
        say(f"  {n_workers} worker(s) ready {time.monotonic() - t_launch:.2f} s after launch; "
            f"settling {args.settle_s:g} s (the group's rebalances) before producing")
        await asyncio.sleep(args.settle_s)
        cpu0 = [w.cpu_s() for w in workers]
        sys0 = psutil.cpu_times()
        t_produce = time.monotonic()
        _, per_part, prod_s = await single.produce(bench.settings, messages)
        say(f"  produced {args.ticks:,} ticks in {prod_s:.2f} s; ticks per partition "
            f"{dict(sorted(per_part.items()))}")
        deadline = t_produce + max(240.0, args.ticks / 1000)
        while True:
            for w in workers:
                w.check_alive()
            cnt = await single.count_bars(db, lo_ms, hi_ms)
            if cnt >= len(expected):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {cnt}/{len(expected)} bars in time")
            await asyncio.sleep(0.2)
        t_last = time.monotonic()
        cpu1 = [w.cpu_s() for w in workers]
        sys1 = psutil.cpu_times()
        busy = (sum(sys1) - sys1.idle - sum(sys0) + sys0.idle) / (t_last - t_produce)
        counts = []
        for w in workers:
            m = await w.metrics(http)
            counts.append(m.get("marketflow_ticks_in_total", 0.0))
        rows = await db.fetch(single.BAR_SQL, lo_ms, hi_ms)
        bad = single.compare(expected, rows)
        res.update(
            elapsed_s=t_last - t_produce, rate=args.ticks / (t_last - t_produce),
            produce_s=prod_s, busy=busy,
            cpu=[100 * (b - a) / (t_last - t_produce) for a, b in zip(cpu0, cpu1, strict=True)],
            ticks_in=counts, bars=len(rows), mismatches=len(bad),
            per_partition=dict(sorted(per_part.items())))
        say(f"  last bar in TimescaleDB {res['elapsed_s']:.2f} s after producing started "
            f"-> {res['rate']:,.0f} ticks/s; the machine's busy CPUs meanwhile {busy:.2f} of "
            f"{os.cpu_count()}")
        say("  per worker: ticks_in " + ", ".join(f"{c:,.0f}" for c in counts)
            + "; CPU produce -> last bar " + ", ".join(f"{c:.0f}%" for c in res["cpu"])
            + " of one core")
        say(f"  correctness: {'OK' if not bad else 'MISMATCH'}: {len(rows)} bars, "
            f"{len(expected)} expected, {len(bad)} mismatches")
        for line in bad[:5]:
            say(f"    {line}")
        return res
    finally:
        if db is not None:
            await db.close()
        await http.close()
        for w in workers[1:]:
            if w.proc is not None and not w.ended_on_purpose:
                say(f"  extra worker: {w.terminate(15)}")
        await bench.cleanup(keep_log=False)
        shutil.rmtree(bench.workdir, ignore_errors=True)


async def run(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.workers.split(",")]
    say(f"marketflow scaling bench: {args.ticks:,} ticks, {args.partitions} partitions, "
        f"workers {counts}, copies {args.copies}")
    machine = (f"{os.cpu_count()} CPUs (os.cpu_count), {platform.machine()}, "
               f"{platform.python_implementation()} {platform.python_version()}, "
               f"{platform.platform()}")
    say(f"machine: {machine}")
    messages, lo_ms, hi_ms, n_keys = make_input(args)
    expected = single.expected_bars(messages, args.grace_ms)
    sizes = [len(b) for _, b in messages]
    say(f"input: {len(messages):,} messages, {n_keys} keys, ticks/message mean "
        f"{statistics.mean(sizes):.0f}; expected bars (pure aggregator) {len(expected)}")
    results = []
    env0 = dict(os.environ)
    for n in counts:
        try:
            results.append(await one_run(n, args, messages, expected, lo_ms, hi_ms))
        finally:  # BenchRun applies its isolation to os.environ; the next run starts clean
            os.environ.clear()
            os.environ.update(env0)
    say("\nSUMMARY")
    say(f"  machine: {machine}")
    say(f"  {args.ticks:,} ticks, {n_keys} keys, {args.partitions} partitions")
    say(f"  {'workers':>7} {'produce->last bar':>18} {'ticks/s':>9} {'CPU % per worker':>18} "
        f"{'ticks_in per worker':>24} {'busy CPUs':>9} correct")
    base = results[0]["rate"] if results else 0.0
    for r in results:
        say(f"  {r['workers']:>7} {r['elapsed_s']:>17.2f}s {r['rate']:>9,.0f} "
            f"{'/'.join(f'{c:.0f}' for c in r['cpu']):>18} "
            f"{'/'.join(f'{c:,.0f}' for c in r['ticks_in']):>24} {r['busy']:>9.2f} "
            f"{'OK' if not r['mismatches'] else str(r['mismatches']) + ' mismatches'}")
    if len(results) > 1 and base:
        say("  speed-up vs the first row: "
            + ", ".join(f"{r['workers']} workers {r['rate'] / base:.2f}x" for r in results[1:]))
    return 0 if all(not r["mismatches"] for r in results) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=2_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, in turn")
    ap.add_argument("--copies", type=int, default=4,
                    help="symbol copies per cycle (keys = 4 x copies); 1 = the sample's keys")
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="wait after all workers are ready, before producing")
    ap.add_argument("--batch-span-ms", type=int, default=5000, help="as for bench/run.py")
    ap.add_argument("--batch-max", type=int, default=2000, help="as for bench/run.py")
    ap.add_argument("--grace-ms", type=int, default=10_000, help="as for bench/run.py")
    return run_main(lambda: run(ap.parse_args()))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
