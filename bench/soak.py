#!/usr/bin/env python
"""Soak benchmark: one worker in live mode, fed by the three exchange emulators at a
steady total rate (default 5,000 ticks/s) for ``--minutes`` (default 30); prints the
worker's RSS, lag and ingest rate over time, whether RSS stayed flat after the warm-up
(growth < 5 %) and the lag did not rise, and whether every bar in TimescaleDB equals the
pure aggregator's bar over the ticks the worker published (read back from the topic).

Not a test: it prints figures. See ``bench/README.md`` ("Soak benchmark"). Needs the local
services (``scripts/services.sh up``)::

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 5000] [--warmup-minutes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import run as single  # bench/run.py: expected bars, comparison
from aiokafka import AIOKafkaConsumer, TopicPartition
from common import MINUTE, BenchRun, now_ms, run_main, say

from core.kafka_security import client_security
from core.models import decode_ticks_payload, parse_ticks
from tables.aggregator import WindowAggregator
from tests.support.harness import free_port

PAIRS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")


def start_emulators(bench: BenchRun, per_pair_rate: float) -> tuple[list[subprocess.Popen[bytes]],
                                                                     list[dict[str, Any]]]:
    """Three ``python -m feeds.emulator`` processes on free ports (random walk over
    :data:`PAIRS` at ``per_pair_rate`` lines/s per pair); returns them and the
    ``feeds.exchanges`` entries that point at them."""
    procs: list[subprocess.Popen[bytes]] = []
    feeds: list[dict[str, Any]] = []
    for i in (1, 2, 3):
        port = free_port()
        log = bench.workdir / f"emulator-{i}.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "feeds.emulator", "--name", f"exchange{i}", "--port",
             str(port), "--pairs", ",".join(PAIRS), "--rate", f"{per_pair_rate:g}",
             "--seed", str(i)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=single.REPO))
        feeds.append({"name": f"exchange{i}", "port": port})
        deadline = time.monotonic() + 10
        while "listening" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError(f"emulator {i} did not start: {log.read_text()[-500:]}")
            time.sleep(0.1)
    return procs, feeds


async def read_back(bench: BenchRun, partitions: int) -> tuple[
        dict[int, list[tuple[str, list[Any]]]], int]:
    """Every tick message of the run's ticks topic by partition, in offset order:
    ``(partition -> [(key, ticks)], control messages skipped)``."""
    settings = bench.settings
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker.bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                                **client_security(settings.broker))
    await consumer.start()
    by_part: dict[int, list[tuple[str, list[Any]]]] = {}
    skipped = 0
    try:
        tps = [TopicPartition(settings.topics.ticks, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        by_part.update({tp.partition: [] for tp in tps})
        done = {tp.partition for tp in tps if ends[tp] == 0}
        while len(done) < len(tps):
            got = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for tp, recs in got.items():
                for m in recs:
                    payload = decode_ticks_payload(m.value)
                    if isinstance(payload, dict) and "control" in payload:
                        skipped += 1
                    else:
                        ticks, bad = parse_ticks(payload, 2**62, 0)
                        if bad:
                            raise RuntimeError(f"invalid ticks on the topic: {bad[:2]!r}")
                        by_part[tp.partition].append(((m.key or b"").decode(), ticks))
                    if m.offset + 1 >= ends[tp]:
                        done.add(tp.partition)
    finally:
        await consumer.stop()
    return by_part, skipped


def expected_bars(by_part: dict[int, list[tuple[str, list[Any]]]], grace_ms: int
                  ) -> tuple[dict[tuple, dict], int]:
    """The pure aggregator's bars over the read-back messages, each partition with its
    own watermark as in the worker, all windows closed at the end: ``(bars by
    (exchange, symbol, bucket_start_ms), late ticks)``."""
    agg = WindowAggregator({}, grace_ms=grace_ms, idle_timeout_ms=1)
    wall = now_ms()
    closed: list[dict[str, Any]] = []
    late = 0
    for p, messages in sorted(by_part.items()):
        for off, (_key, batch) in enumerate(messages):
            res = agg.process_ticks(p, off, batch, wall)
            late += len(res.late)
            closed.extend(res.closed)
        closed.extend(agg.process_idle(p, wall + 10**12).closed)
    return {(b["exchange"], b["symbol"], b["bucket_start_ms"]): b for b in closed}, late


def _mb(kb: float) -> float:
    return kb / 1024


async def run(args: argparse.Namespace) -> int:
    per_pair = args.rate / (3 * len(PAIRS))
    bench = BenchRun(args.partitions, {
        "MARKETFLOW_FEEDS__MODE": "live",
        "MARKETFLOW_WINDOW__IDLE_TIMEOUT_S": "2",
        "MARKETFLOW_WINDOW__IDLE_CHECK_INTERVAL_S": "0.5",
    })
    machine = (f"{os.cpu_count()} CPUs (os.cpu_count), {platform.machine()}, "
               f"{platform.python_implementation()} {platform.python_version()}, "
               f"{platform.platform()}")
    say(f"marketflow soak bench {bench.name}: {args.minutes:g} min, {args.rate:,} ticks/s "
        f"({per_pair:g}/s per pair, 3 emulators x {len(PAIRS)} pairs), warm-up "
        f"{args.warmup_minutes:g} min, {args.partitions} partitions")
    say(f"machine: {machine}")
    say(bench.describe())
    procs: list[subprocess.Popen[bytes]] = []
    http = aiohttp.ClientSession()
    ok = True
    try:
        procs, feeds = start_emulators(bench, per_pair)
        os.environ["MARKETFLOW_FEEDS__EXCHANGES"] = json.dumps(feeds)
        bench.env["MARKETFLOW_FEEDS__EXCHANGES"] = json.dumps(feeds)
        await bench.create_database()
        worker = bench.worker
        t0 = time.monotonic()
        worker.start()
        await worker.wait_healthy(http, 120)
        say(f"  worker healthy {time.monotonic() - t0:.1f} s after launch; emulators on "
            f"ports {[f['port'] for f in feeds]}")
        samples: list[dict[str, float]] = []
        end = time.monotonic() + args.minutes * 60
        last_print = 0.0
        prev: dict[str, float] | None = None
        while time.monotonic() < end:
            await asyncio.sleep(args.sample_s)
            worker.check_alive()
            m = await worker.metrics(http, 10)
            now = time.monotonic()
            s = {"t": now - t0, "rss_kb": float(worker.memory_kb()["VmRSS"]),
                 "cpu_s": worker.cpu_s(),
                 "ticks_in": m.get("marketflow_ticks_in_total", 0.0),
                 "applied": m.get("marketflow_ticks_applied_total", 0.0),
                 "lag": sum(v for k, v in m.items() if k.startswith("marketflow_consumer_lag")),
                 "late": m.get("marketflow_late_ticks_total", 0.0),
                 "dead": sum(v for k, v in m.items()
                             if k.startswith("marketflow_dead_lettered_ticks_total"))}
            if prev is not None:
                dt = s["t"] - prev["t"]
                s["rate"] = (s["ticks_in"] - prev["ticks_in"]) / dt
                s["cpu_pct"] = 100 * (s["cpu_s"] - prev["cpu_s"]) / dt
                samples.append(s)
            prev = s
            if now - last_print >= 60:
                last_print = now
                say(f"  t={s['t'] / 60:5.1f} min  RSS {_mb(s['rss_kb']):6.1f} MiB  ticks_in "
                    f"{s.get('rate', 0):7,.0f}/s  CPU {s.get('cpu_pct', 0):4.0f}%  lag "
                    f"{s['lag']:6,.0f} msgs behind the commit  late {s['late']:.0f}  dead "
                    f"{s['dead']:.0f}")
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        say("  emulators stopped; reading the topic back, then waiting for the last "
            "windows to close")
        db = await asyncpg.connect(bench.dsn)
        try:
            by_part, skipped = await read_back(bench, args.partitions)
            ticks = [t for msgs in by_part.values() for _, batch in msgs for t in batch]
            say(f"  topic read back: {sum(len(v) for v in by_part.values()):,} messages, "
                f"{len(ticks):,} ticks ({skipped} control messages)")
            expected, late = expected_bars(by_part, bench.settings.window.grace_ms)
            if late:
                say(f"  the pure aggregator found {late} late ticks (the worker applies its "
                    f"late policy to them too)")
            lo = min(t.ts_ms for t in ticks) // MINUTE * MINUTE
            hi = max(t.ts_ms for t in ticks) // MINUTE * MINUTE + MINUTE
            # the last minute closes when wall time passed its end + grace (a live source
            # may still send), then the idle close and the sink flush
            deadline_ms = hi + bench.settings.window.grace_ms + 30_000
            while (await single.count_bars(db, lo, hi) < len(expected)
                   and now_ms() < deadline_ms):
                await asyncio.sleep(1)
            rows = await db.fetch(single.BAR_SQL, lo, hi)
            bad = single.compare(expected, rows)
        finally:
            await db.close()
        say(f"  correctness: {'OK' if not bad else 'MISMATCH'}: {len(rows)} bars in DB, "
            f"{len(expected)} expected, {len(bad)} mismatches")
        for line in bad[:10]:
            say(f"    {line}")
        ok = not bad

        warm = [s for s in samples if s["t"] >= args.warmup_minutes * 60]
        k = max(1, len(warm) // 10)
        head = statistics.mean(s["rss_kb"] for s in warm[:k])
        tail = statistics.mean(s["rss_kb"] for s in warm[-k:])
        growth = 100 * (tail - head) / head
        lags = [s["lag"] for s in warm]
        third = max(1, len(lags) // 3)
        rates = [s["rate"] for s in warm]
        say("\nSUMMARY")
        say(f"  machine: {machine}")
        say(f"  {args.minutes:g} min at {args.rate:,} ticks/s published by 3 emulators; "
            f"{len(samples)} samples every {args.sample_s:g} s; after the {args.warmup_minutes:g}"
            f"-min warm-up:")
        say(f"  RSS: first tenth mean {_mb(head):.1f} MiB, last tenth mean {_mb(tail):.1f} "
            f"MiB, growth {growth:+.1f} % (min {_mb(min(s['rss_kb'] for s in warm)):.1f}, max "
            f"{_mb(max(s['rss_kb'] for s in warm)):.1f} MiB); target < 5 %: "
            f"{'MET' if growth < 5 else 'NOT MET'}")
        say(f"  consumer lag (marketflow_consumer_lag: messages behind the committed offset, "
            f"summed over partitions): first third mean "
            f"{statistics.mean(lags[:third]):.1f}, last third mean "
            f"{statistics.mean(lags[-third:]):.1f}, max {max(lags):.0f}")
        say(f"  ticks_in: mean {statistics.mean(rates):,.0f}/s (min {min(rates):,.0f}, max "
            f"{max(rates):,.0f}); worker CPU mean "
            f"{statistics.mean(s['cpu_pct'] for s in warm):.0f}% of one core; late "
            f"{samples[-1]['late']:.0f}, dead-lettered {samples[-1]['dead']:.0f}")
        say(f"  bars: {len(rows)} in TimescaleDB, {len(bad)} differ from the pure aggregator "
            f"over the {len(ticks):,} ticks read back")
        if args.json:
            Path(args.json).write_text(json.dumps(samples))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        await http.close()
        await bench.cleanup(keep_log=args.keep_log)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=5000, help="ticks/s over all emulators")
    ap.add_argument("--warmup-minutes", type=float, default=5.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--keep-log", action="store_true", help="keep the worker log in /tmp")
    ap.add_argument("--json", help="write the samples to this file")
    return run_main(lambda: run(ap.parse_args()))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
