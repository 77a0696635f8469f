#!/usr/bin/env python
"""HTTP API benchmark: one isolated worker, realistic bars in TimescaleDB, the pipeline
ingesting test-mode ticks, and HTTP load from a second process (``wrk``, or a built-in
aiohttp load generator in a subprocess when ``wrk`` is not installed).

Measurement script, not a test: it prints req/s, latency percentiles and errors per
endpoint, the stream's lag while under load, and a summary table. Exit 0 when every phase
ran (whatever the figures), 1 on a setup failure.

    scripts/services.sh up
    apt-get install -y wrk            # optional (Debian package); else the aiohttp fallback
    .venv/bin/python bench/api.py     # ~1.5 min

Isolation is the one of ``bench/run.py``: a random ``bench-<rand>`` app id / topics / Redis
prefix, a ``bench_<rand>`` database, a free web port, a temporary data dir; all removed at
the end (also after an error, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from common import MINUTE, BenchRun, now_ms, pct, run_main, say  # noqa: E402  (bench/common.py)

from tests.support.harness import Worker  # noqa: E402

DAY = 86_400_000
GEN_EXCHANGES = ["exchange1", "exchange2", "exchange3"]  # the test generator's exchanges


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- bars


BAR_COLUMNS = ["exchange", "symbol", "bucket_start", "open", "high", "low", "close", "volume",
               "trade_count", "avg_price", "vwap", "open_ts_ms", "close_ts_ms", "quote_volume"]
START_PRICE = {"BTCUSDT": 60_000.0, "ETHUSDT": 2_600.0, "SOLUSDT": 150.0, "TONUSDT": 6.5,
               "DOGEUSDT": 0.11}


def synthetic_bars(exchange: str, symbol: str, lo_ms: int, hi_ms: int, rng: random.Random):
    """Plausible 1-minute bars in ``[lo_ms, hi_ms)``: geometric random walk (~0.05 %/min),
    high/low around open/close, trade counts 20..400, volume ~ trades."""
    p = START_PRICE.get(symbol, 100.0) * (1 + rng.uniform(-0.01, 0.01))
    for b in range(lo_ms, hi_ms, MINUTE):
        o = p
        c = o * math.exp(rng.gauss(0, 0.0005))
        h = max(o, c) * (1 + abs(rng.gauss(0, 0.0002)))
        low = min(o, c) * (1 - abs(rng.gauss(0, 0.0002)))
        n = rng.randint(20, 400)
        vol = Decimal(repr(round(n * rng.uniform(0.001, 0.05) * 60_000
                                 / START_PRICE.get(symbol, 100.0), 8)))
        avg = (o + c + h + low) / 4
        vwap = Decimal(repr(round(avg * (1 + rng.gauss(0, 0.00005)), 4)))
        yield (exchange, symbol, datetime.fromtimestamp(b / 1000, UTC), o, h, low, c, vol, n,
               avg, vwap, b + rng.randint(0, 2_000), b + MINUTE - rng.randint(1, 2_000),
               vol * vwap)
        p = c


# ----------------------------------------------------------------------------- load


def _dur_ms(s: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        raise ValueError(s)
    v = float(m[1])
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60_000}[m[2]]


async def run_wrk(url: str, seconds: float, conns: int, threads: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
        url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    r: dict[str, Any] = {"raw": out, "errors": 0, "non2xx": 0, "sock": 0}
    for line in out.splitlines():
        line = line.strip()
        if m := re.match(r"(50|75|90|99)%\s+(\S+)", line):
            r[f"p{m[1]}"] = _dur_ms(m[2])
        elif line.startswith("Latency") and "Distribution" not in line:
            r["avg"], r["max"] = _dur_ms(line.split()[1]), _dur_ms(line.split()[3])
        elif m := re.match(r"(\d+) requests in ([\d.]+\w+)", line):
            r["n"] = int(m[1])
        elif line.startswith("Requests/sec:"):
            r["rps"] = float(line.split()[1])
        elif line.startswith("Non-2xx"):
            r["non2xx"] = int(line.split()[-1])
        elif line.startswith("Socket errors:"):
            r["sock"] = sum(int(x) for x in re.findall(r"\d+", line))
    if "rps" not in r:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    r["errors"] = r["non2xx"] + r["sock"]
    return r


# the fallback load generator, run as `python bench/api.py --_loadgen URL SECONDS CONNS`
async def _loadgen(url: str, seconds: float, conns: int) -> None:
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    async with s.get(url) as r:
                        await r.read()
                        if r.status >= 400:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat.append((time.perf_counter() - t0) * 1000)
        t = time.monotonic()
        await asyncio.gather(*(one() for _ in range(conns)))
        el = time.monotonic() - t
    print(f"RESULT {len(lat) / el} {pct(lat, 50)} {pct(lat, 75)} {pct(lat, 90)} {pct(lat, 99)} "
          f"{max(lat)} {errors} {len(lat)}")


async def run_pyload(url: str, seconds: float, conns: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--_loadgen", url, str(seconds), str(conns),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise RuntimeError(f"load generator failed:\n{out}")
    rps, p50, p75, p90, p99, mx, err, n = m[1].split()
    return {"rps": float(rps), "p50": float(p50), "p75": float(p75), "p90": float(p90),
            "p99": float(p99), "max": float(mx), "errors": int(err), "n": int(n), "raw": out}


# ----------------------------------------------------------------------------- lag sampling


class LagSampler:
    """While running: every ``interval`` s, the worker's ``/metrics`` (watermark + grace vs
    wall clock at response, ``marketflow_ticks_in_total``), the Redis latest BTCUSDT
    ``ts_ms`` vs wall clock (freshness of what /prices/latest serves, not delayed by the
    HTTP queue), and active connections of the bench database in pg_stat_activity."""

    def __init__(self, worker: Worker, http: aiohttp.ClientSession, r: aioredis.Redis,
                 latest_key: str, grace_ms: int, db: asyncpg.Connection, dbname: str,
                 interval: float = 0.25) -> None:
        self.worker, self.http, self.r, self.key = worker, http, r, latest_key
        self.grace, self.db, self.dbname, self.interval = grace_ms, db, dbname, interval
        self.wm_lag: list[float] = []
        self.metrics_rt: list[float] = []
        self.redis_lag: list[float] = []
        self.pg_active: list[int] = []
        self.ticks0 = self.ticks1 = 0.0
        self.t0 = self.t1 = 0.0
        self._stop = asyncio.Event()

    async def _ticks(self) -> float:
        return (await self.worker.metrics(self.http, 10)).get("marketflow_ticks_in_total",
                                                              0.0)

    async def run(self) -> None:
        self.ticks0, self.t0 = await self._ticks(), time.monotonic()
        while not self._stop.is_set():
            t_send = now_ms()
            with contextlib.suppress(Exception):
                m = await self.worker.metrics(self.http, 10)
                t_recv = now_ms()
                wms = [v for k, v in m.items() if k.startswith("marketflow_watermark_ms")]
                if wms:
                    self.wm_lag.append(t_recv - (max(wms) + self.grace))
                    self.metrics_rt.append(t_recv - t_send)
            with contextlib.suppress(Exception):
                ts = await self.r.hget(self.key, "ts_ms")
                if ts is not None:
                    self.redis_lag.append(now_ms() - float(ts))
            with contextlib.suppress(Exception):
                self.pg_active.append(await self.db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND "
                    "state = 'active' AND pid <> pg_backend_pid()", self.dbname))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
        self.ticks1, self.t1 = await self._ticks(), time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    @property
    def ingest_rate(self) -> float:
        return (self.ticks1 - self.ticks0) / max(1e-9, self.t1 - self.t0)

    def line(self) -> str:
        parts = []
        if self.wm_lag:
            parts.append(f"watermark lag max {max(self.wm_lag):,.0f} ms / p50 "
                         f"{pct(self.wm_lag, 50):,.0f} ms (n={len(self.wm_lag)}; /metrics "
                         f"answered in p50 {pct(self.metrics_rt, 50):.0f} ms, max "
                         f"{max(self.metrics_rt):.0f} ms)")
        if self.redis_lag:
            parts.append(f"Redis latest BTCUSDT age max {max(self.redis_lag):,.0f} ms / p50 "
                         f"{pct(self.redis_lag, 50):,.0f} ms")
        parts.append(f"ticks_in {self.ingest_rate:,.0f}/s")
        if self.pg_active:
            parts.append(f"active DB conns max {max(self.pg_active)}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    grace_ms = 5000
    overrides = {
        "MARKETFLOW_WINDOW__GRACE_MS": str(grace_ms),
        "MARKETFLOW_FEEDS__GENERATOR__RATE_PER_S": str(args.rate),
        "MARKETFLOW_FEEDS__EXCHANGES": "[]",
    }
    if args.pool_max:
        overrides["MARKETFLOW_DATABASE__POOL_MAX"] = str(args.pool_max)
    bench = BenchRun(args.partitions, overrides)
    name, dbname, settings, worker = bench.name, bench.dbname, bench.settings, bench.worker
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    loadgen = (f"wrk -t{args.threads} -c{args.connections} (Debian wrk)" if use_wrk
               else f"aiohttp subprocess, {args.connections} connections")
    machine = (f"{os.cpu_count()} CPUs (nproc), {platform.python_implementation()} "
               f"{platform.python_version()}, {platform.platform()}")
    say(f"marketflow API bench {name}: {args.seconds:g} s per endpoint, load {loadgen}, "
        f"pipeline ingesting {args.rate:,} test ticks/s, {args.partitions} partitions, "
        f"DB pool_max {settings.database.pool_max}")
    say(f"machine: {machine}")
    say(bench.describe())

    http: aiohttp.ClientSession | None = None
    db: asyncpg.Connection | None = None
    r: aioredis.Redis | None = None
    results: list[tuple[str, dict[str, Any], LagSampler]] = []
    ok = True
    try:
        # -------------------------------------------------------------- 1. worker
        say("\n[1] worker")
        await bench.create_database()
        http = aiohttp.ClientSession()
        r = aioredis.Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
        t = time.monotonic()
        pid = worker.start().pid
        await worker.until_ready(120, http=http, poll_s=0.1)
        say(f"  pid {pid}: /health 200 and Faust ready {time.monotonic() - t:.1f} s after launch "
            f"(bars_1m migrated)")
        db = await asyncpg.connect(bench.dsn)
        async with http.post(worker.base_url + "/mode/test") as resp:
            say(f"  POST /mode/test -> {resp.status} {await resp.text()}")
            if resp.status != 200:
                raise RuntimeError("could not switch to test mode")
        latest_key = f"{name}:latest:BTCUSDT"

        # -------------------------------------------------------------- 2. data
        now = now_ms()
        today = now - now % DAY
        day_lo, day_hi = today - DAY, today                   # yesterday, 1440 bars
        lo30 = today - args.days * DAY                        # 30 days up to midnight
        ex = GEN_EXCHANGES[0]
        keys = [(e, s) for e in GEN_EXCHANGES for s in START_PRICE] if args.all_keys else [
            (ex, "BTCUSDT")]
        say(f"\n[2] load {args.days} days of 1-minute bars ({iso(lo30)} .. {iso(today)}) for "
            f"{len(keys)} exchange:symbol key(s) into {dbname}.bars_1m with COPY, while the "
            f"pipeline ingests")
        await asyncio.sleep(2.0)  # ticks flowing before the load starts
        sampler = LagSampler(worker, http, r, latest_key, grace_ms, db, dbname)
        st = asyncio.create_task(sampler.run())
        rng = random.Random(42)
        load_conn = await asyncpg.connect(bench.dsn)
        n_rows = 0
        t = time.monotonic()
        try:
            for e, s in keys:
                rows = list(synthetic_bars(e, s, lo30, today, rng))
                await load_conn.copy_records_to_table("bars_1m", records=rows,
                                                      columns=BAR_COLUMNS)
                n_rows += len(rows)
            await load_conn.execute("ANALYZE bars_1m")
        finally:
            await load_conn.close()
        load_s = time.monotonic() - t
        sampler.stop()
        await st
        say(f"  {n_rows:,} rows in {load_s:.2f} s ({n_rows / load_s:,.0f} rows/s)")
        say(f"  during the load: {sampler.line()}")
        results.append(("(data load)", {}, sampler))

        # -------------------------------------------------------------- 3. checks
        say("\n[3] endpoints (one request each, checked before the load)")
        q1m = (f"/ohlcv?symbol=BTCUSDT&exchange={ex}&interval=1m&start={iso(day_lo)}"
               f"&end={iso(day_hi)}")
        q1h = (f"/ohlcv?symbol=BTCUSDT&exchange={ex}&interval=1h&start={iso(lo30)}"
               f"&end={iso(today)}")
        endpoints = [
            ("latest", "/prices/latest/BTCUSDT", None),
            ("average 5m", "/prices/average/BTCUSDT?period=5m", None),
            ("ohlcv 1m x 1 day", q1m, 1440),
            (f"ohlcv 1h x {args.days} days", q1h, args.days * 24),
        ]
        deadline = time.monotonic() + 30
        for _label, path, want in endpoints:
            while True:
                t0 = time.perf_counter()
                async with http.get(worker.base_url + path) as resp:
                    body = await resp.json()
                    status = resp.status
                ms = (time.perf_counter() - t0) * 1000
                if status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)  # latest/average: first ticks not in Redis yet
            nbars = len(body.get("bars", [])) if isinstance(body, dict) else 0
            extra = (f"{nbars} bars (want {want})" if want is not None else
                     f"price {body.get('price')}, count {body.get('count', '-')}")
            say(f"  {status} {ms:6.1f} ms  {path}  -> {extra}")
            if status != 200 or (want is not None and nbars != want):
                ok = False
        if not ok:
            raise RuntimeError("an endpoint did not answer as expected")

        # -------------------------------------------------------------- 4. load
        say(f"\n[4] HTTP load, {args.seconds:g} s per endpoint ({loadgen}), pipeline "
            f"ingesting")
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        for label, path, _ in endpoints:
            if only and label not in only:
                continue
            url = worker.base_url + path
            if args.warmup > 0:
                await (run_wrk(url, args.warmup, args.connections, args.threads) if use_wrk
                       else run_pyload(url, args.warmup, args.connections))
            sampler = LagSampler(worker, http, r, latest_key, grace_ms, db, dbname)
            st = asyncio.create_task(sampler.run())
            await asyncio.sleep(0.3)
            spy = None
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                out = Path(args.profile) / (re.sub(r"\W+", "_", label) + ".txt")
                pid = worker.proc.pid if worker.proc else 0
                spy = subprocess.Popen(
                    [str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p", str(pid),
                     "-d", str(int(args.seconds)), "-r", "200", "-f", "raw", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu0, t0 = worker.cpu_s(), time.monotonic()
            res = await (run_wrk(url, args.seconds, args.connections, args.threads) if use_wrk
                         else run_pyload(url, args.seconds, args.connections))
            res["cpu"] = 100 * (worker.cpu_s() - cpu0) / (time.monotonic() - t0)
            if spy is not None:
                spy.wait(timeout=60)
            sampler.stop()
            await st
            results.append((label, res, sampler))
            say(f"  {label:<22} {res['rps']:>9,.0f} req/s  p50 {res['p50']:7.2f} ms  p99 "
                f"{res['p99']:7.2f} ms  max {res['max']:8.1f} ms  errors {res['errors']}"
                f"  ({res['n']:,} requests; worker CPU {res['cpu']:.0f}% of one core)")
            say(f"  {'':<22} {sampler.line()}")
            if args.verbose:
                say(res["raw"])
    except Exception as exc:  # noqa: BLE001
        ok = False
        say(f"\nFAILED: {type(exc).__name__}: {exc}")
    finally:
        # -------------------------------------------------------------- 5. cleanup
        say("\n[5] cleanup")
        if db is not None:
            with contextlib.suppress(Exception):
                await db.close()
        if http is not None:
            await http.close()
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()
        await bench.cleanup(args.keep_log)

    # ------------------------------------------------------------------ summary
    say("\nSUMMARY")
    say(f"  machine: {machine}")
    say(f"  load: {loadgen}, {args.seconds:g} s per endpoint on loopback; worker: 1 process, "
        f"DB pool_max {settings.database.pool_max}, ingesting {args.rate:,} test ticks/s")
    hdr = (f"  {'endpoint':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
           f"{'errors':>6} {'wCPU%':>6} {'wm lag max':>10} {'redis age max':>13} "
           f"{'ticks_in/s':>10}")
    say(hdr)
    for label, res, smp in results:
        wm = f"{max(smp.wm_lag):,.0f} ms" if smp.wm_lag else "-"
        ra = f"{max(smp.redis_lag):,.0f} ms" if smp.redis_lag else "-"
        if res:
            say(f"  {label:<22} {res['rps']:>9,.0f} {res['p50']:>8.2f} {res['p99']:>8.2f} "
                f"{res['max']:>8.1f} {res['errors']:>6} {res['cpu']:>6.0f} {wm:>10} {ra:>13} "
                f"{smp.ingest_rate:>10,.0f}")
        else:
            say(f"  {label:<22} {'':>9} {'':>8} {'':>8} {'':>8} {'':>6} {'':>6} {wm:>10} "
                f"{ra:>13} {smp.ingest_rate:>10,.0f}")
    by = {label: res for label, res, _ in results if res}
    if "latest" in by:
        lt = by["latest"]
        met = lt["rps"] >= 5000 and lt["p99"] < 10
        say(f"  target latest >= 5,000 req/s and p99 < 10 ms: "
            f"{'MET' if met else 'NOT MET'} ({lt['rps']:,.0f} req/s, p99 {lt['p99']:.2f} ms)")
    if "ohlcv 1m x 1 day" in by:
        d = by["ohlcv 1m x 1 day"]
        say(f"  target ohlcv 1 day of 1m bars p99 < 50 ms: "
            f"{'MET' if d['p99'] < 50 else 'NOT MET'} (p99 {d['p99']:.2f} ms at "
            f"{args.connections} connections, {d['rps']:,.0f} req/s)")
    say("  (wm lag = wall clock at /metrics response - (max partition watermark + grace); it "
        "includes the /metrics response time under load. redis age = now - ts_ms of "
        "<prefix>:latest:BTCUSDT read directly from Redis.)")
    return 0 if ok else 1


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--_loadgen":
        asyncio.run(_loadgen(sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10, help="load per endpoint")
    ap.add_argument("--warmup", type=float, default=1, help="unmeasured load before each")
    ap.add_argument("--connections", type=int, default=16, help="concurrent connections")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--rate", type=int, default=2000, help="test-mode generator ticks/s")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--days", type=int, default=30, help="days of 1-minute bars to load")
    ap.add_argument("--all-keys", action=argparse.BooleanOptionalAction, default=True,
                    help="load bars for all 3 generator exchanges x 5 pairs (else only "
                         "exchange1:BTCUSDT)")
    ap.add_argument("--pool-max", type=int, default=0,
                    help="override database.pool_max (0 = the configured value)")
    ap.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator")
    ap.add_argument("--keep-log", action="store_true")
    ap.add_argument("--only", default="",
                    help="comma-separated endpoint labels to load (e.g. latest,ohlcv 1m x 1 day)")
    ap.add_argument("--profile", default="",
                    help="directory: py-spy collapsed-stack profile of the worker per endpoint")
    ap.add_argument("--verbose", action="store_true", help="print the raw wrk output")
    args = ap.parse_args()
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
