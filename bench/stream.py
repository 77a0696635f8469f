#!/usr/bin/env python
"""WebSocket stream benchmark: N concurrent ``GET /stream`` clients on one isolated worker
while it ingests a steady flow of live-stamped ticks.

Measurement script, not a test: for a 0-client baseline phase and then each N of
``--clients`` (same worker, in turn) it prints tick -> client latency (price and bar
frames), frames pushed per second, the worker's CPU and RSS, the clients' own CPU, and the
ticks the worker applied per second next to the 0-client phase. Exit 0 when every phase
ran (whatever the figures), 1 otherwise.

    scripts/services.sh up
    .venv/bin/python bench/stream.py                    # phases 0, 100, 1000 clients x 30 s

The clients run in a second process (``python bench/stream.py --_clients CONFIG``, on
uvloop like the worker: one aiohttp session, ``TCPConnector(limit=0)``, one reader task
per socket), so the publisher in this process keeps its pace. Isolation is the one of
``bench/run.py``: a random ``bench-<rand>`` app id / topics / Redis prefix, a
``bench_<rand>`` database, a free web port, a temporary data dir; all removed at the end
(also after an error, Ctrl-C or SIGTERM). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # the worker and load_settings() read marketflow.toml from the repo root

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from common import BenchRun, now_ms, pct, profile_tops, run_main, say  # noqa: E402  (bench/common.py)

from core.kafka_security import client_security  # noqa: E402

SUB_1M = "b"      # subscription id: bars 1m of the client's exchange:symbol
SUB_5M = "c"      # subscription id: consolidated 5m bars (every --consolidated-every client)
SUB_PRICES = "p"  # subscription id: prices
FIVE_MIN = 300_000
MINUTE_MS = 60_000


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def raise_nofile(need: int) -> str:
    """Raise the soft ``RLIMIT_NOFILE`` to ``need`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return f"{soft} -> {new} (hard {hard})"
    return f"{soft} (hard {hard}, enough)"


def qs(xs: list[float]) -> dict[str, float] | None:
    """p50 / p99 / max / n of ``xs`` (None when empty)."""
    if not xs:
        return None
    return {"p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs), "n": len(xs)}


# ----------------------------------------------------------------------------- clients
# (run in the child process: python bench/stream.py --_clients '<json config>')


class _Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.frames: dict[str, int] = defaultdict(int)
        self.lat: dict[str, list[float]] = {"price": [], "bar_1m": [], "bar_5m": []}
        self.closed_delay: list[float] = []
        self.gaps = 0
        self.dup_closed = 0
        self.corrections = 0
        self.errors: list[str] = []
        self.closes: dict[str, int] = defaultdict(int)
        self.closes_measuring = 0
        self.loop_lag: list[float] = []
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.closing = False  # set before the clients close their own sockets
        self.bad_frames = 0
        #: open bar frames: (sub id, exchange, symbol, bucket_start_ms, trade_count, recv ms)
        self.bars: list[tuple[str, str | None, str, int, int, float]] = []


class _Client:
    __slots__ = ("closed_seen", "frames", "idx", "pending", "seq", "ws")

    def __init__(self, idx: int, ws: aiohttp.ClientWebSocketResponse, subs: list[str]) -> None:
        self.idx = idx
        self.ws = ws
        self.seq: dict[str, int] = {}
        self.pending = set(subs)  # subscriptions whose snapshot has not arrived
        self.frames = 0
        self.closed_seen: set[tuple[str, int]] = set()


async def _read(c: _Client, st: _Stats, n_total: int) -> None:
    ws = c.ws
    text = aiohttp.WSMsgType.TEXT
    while True:
        msg = await ws.receive()
        if msg.type != text:
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                if not st.closing:
                    st.closes[f"{ws.close_code} {msg.extra or ''}".strip()] += 1
                if st.measuring:
                    st.closes_measuring += 1
                return
            continue
        now = time.time_ns() / 1e6
        try:
            _frame(c, st, n_total, msg.data, now)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            st.bad_frames += 1
            if len(st.errors) < 20:
                st.errors.append(f"client {c.idx}: unexpected frame ({type(exc).__name__}: "
                                 f"{exc}): {msg.data[:300]}")


def _frame(c: _Client, st: _Stats, n_total: int, data: str, now: float) -> None:
    d = orjson.loads(data)
    typ = d["type"]
    sid = d.get("id")
    seq = d.get("seq")
    if seq is not None:
        if seq != c.seq.get(sid, 0) + 1:
            st.gaps += 1
        c.seq[sid] = seq
    if typ == "snapshot":
        if c.pending:
            c.pending.discard(sid)
            if not c.pending:
                st.ready += 1
                if st.ready >= n_total:
                    st.all_ready.set()
    elif typ == "error" and len(st.errors) < 20:
        st.errors.append(f"client {c.idx}: {data[:300]}")
    if not st.measuring:
        return
    c.frames += 1
    st.frames[typ] += 1
    if typ == "price":
        st.lat["price"].append(now - d["price"]["ts_ms"])
    elif typ == "bar":
        bar = d["bar"]
        b = bar["bucket_start_ms"]
        if bar["closed"]:
            st.closed_delay.append(now - (b + (FIVE_MIN if sid == SUB_5M else MINUTE_MS)))
            if bar.get("correction"):
                st.corrections += 1
            else:
                k = (sid, b)
                if k in c.closed_seen:
                    st.dup_closed += 1
                c.closed_seen.add(k)
        else:
            # docs/stream.md promises close_ts_ms; when it is there, use it directly
            if "close_ts_ms" in bar:
                st.lat["bar_5m" if sid == SUB_5M else "bar_1m"].append(
                    now - bar["close_ts_ms"])
            # else (and also) the publisher matches trade_count to its publish log
            st.bars.append((sid, bar["exchange"], bar["symbol"], b, bar["trade_count"], now))


async def _loop_lag(st: _Stats) -> None:
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.01)
        if st.measuring:
            st.loop_lag.append((time.monotonic() - t - 0.01) * 1000)


def _subs_of(i: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Subscribe frames of client ``i``: bars 1m of key ``i % len(keys)``, prices of the
    published items, and every ``consolidated_every``-th client consolidated 5m bars."""
    exchange, symbol = cfg["keys"][i % len(cfg["keys"])]
    out: list[dict[str, Any]] = [
        {"op": "subscribe", "id": SUB_1M, "channel": "bars", "symbol": symbol,
         "exchange": exchange, "interval": "1m"},
        {"op": "subscribe", "id": SUB_PRICES, "channel": "prices",
         "symbols": cfg["price_items"]},
    ]
    every = cfg["consolidated_every"]
    if every > 0 and i % every == 0:
        syms = cfg["symbols"]
        out.append({"op": "subscribe", "id": SUB_5M, "channel": "bars",
                    "symbol": syms[(i // every) % len(syms)], "exchange": None,
                    "interval": "5m"})
    return out


async def clients_main(cfg: dict[str, Any]) -> None:
    """Open ``n`` sockets in waves, subscribe, report READY; measure between GO and STOP
    (commands on stdin); print RESULT (JSON); close everything."""
    n: int = cfg["n"]
    raise_nofile(n + 512)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    st = _Stats()
    lag_task = asyncio.ensure_future(_loop_lag(st))
    clients: list[_Client] = []
    readers: list[asyncio.Task[None]] = []
    failed: list[str] = []
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(connector=conn)
    compress = 15 if cfg["compress"] else 0

    async def open_one(i: int) -> None:
        try:
            ws = await session.ws_connect(cfg["url"], autoping=True, heartbeat=None,
                                          max_msg_size=0, compress=compress,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failed.append(f"client {i}: {type(exc).__name__}: {exc}"[:200])
            return
        frames = _subs_of(i, cfg)
        c = _Client(i, ws, [f["id"] for f in frames])
        clients.append(c)
        readers.append(asyncio.ensure_future(_read(c, st, n)))
        for f in frames:
            await ws.send_str(orjson.dumps(f).decode())

    t0 = time.monotonic()
    wave = cfg["wave"]
    for lo in range(0, n, wave):
        await asyncio.gather(*(open_one(i) for i in range(lo, min(n, lo + wave))))
    t_open = time.monotonic() - t0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(st.all_ready.wait(), 30 + n * 0.05)
    t_ready = time.monotonic() - t0
    print("READY " + orjson.dumps({"open_s": t_open, "ready_s": t_ready,
                                   "connected": len(clients), "snapshotted": st.ready,
                                   "failed": failed[:5], "n_failed": len(failed)}).decode(),
          flush=True)
    proc = psutil.Process()
    cpu0 = cpu1 = 0.0
    tm0 = tm1 = 0.0
    while True:
        line = (await stdin.readline()).decode().strip()
        if line == "GO":
            for c in clients:
                c.frames = 0
            # the harness's own collections (its latency lists grow by a million items a
            # phase) would stall its loop and show up as frame latency: none while measuring
            gc.collect()
            gc.freeze()
            gc.disable()
            ct = proc.cpu_times()
            cpu0, tm0 = ct.user + ct.system, time.monotonic()
            st.measuring = True
        elif line in ("STOP", ""):
            st.measuring = False
            ct = proc.cpu_times()
            cpu1, tm1 = ct.user + ct.system, time.monotonic()
            gc.enable()
            break
    secs = max(1e-9, tm1 - tm0)
    per_client = [c.frames / secs for c in clients] or [0.0]
    result = {
        "seconds": secs, "cpu_pct": 100 * (cpu1 - cpu0) / secs,
        "frames": dict(st.frames), "frames_total": sum(st.frames.values()),
        "per_client": {"min": min(per_client), "p50": pct(per_client, 50),
                       "max": max(per_client)},
        "lat": {k: qs(v) for k, v in st.lat.items()},
        "closed_delay": qs(st.closed_delay),
        "bad_frames": st.bad_frames, "bar_frames_open": len(st.bars),
        "gaps": st.gaps, "dup_closed": st.dup_closed, "corrections": st.corrections,
        "errors": st.errors, "closes": dict(st.closes), "closes_measuring": st.closes_measuring,
        "loop_lag": qs(st.loop_lag),
    }
    Path(cfg["bars_file"]).write_bytes(orjson.dumps(st.bars))
    print("RESULT " + orjson.dumps(result).decode(), flush=True)
    lag_task.cancel()
    st.closing = True
    for lo in range(0, len(clients), 200):
        await asyncio.gather(*(c.ws.close() for c in clients[lo:lo + 200]),
                             return_exceptions=True)
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await session.close()


# ----------------------------------------------------------------------------- publisher


class LivePublisher:
    """``bench/run.py``'s ``publish_live``, running until stopped: ``rate`` ticks/s cycled
    from the sample, in batches every ``interval_ms`` (one message per key, JSON array),
    each tick stamped ``ts_ms`` = wall clock at publish, ``source`` ``live``. Trade ids are
    consecutive per key (the worker dedupes trade ids per window, and the sample is cycled
    several times a minute at 5,000 ticks/s). :attr:`sent` counts acknowledged ticks."""

    def __init__(self, settings: Any, sample: list[Any], rate: int,
                 interval_ms: int = 20) -> None:
        self.settings = settings
        self.sample = sample
        self.rate = rate
        self.interval_ms = interval_ms
        self.sent = 0
        self.messages = 0
        self.behind_max_s = 0.0
        #: publish log for matching bar frames: (key, 1m bucket) or (symbol, 5m bucket) ->
        #: (cumulative ticks of that bucket after each batch, the batch's ts_ms)
        self.log: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        self._stop = asyncio.Event()
        self._ids: dict[str, itertools.count[int]] = defaultdict(lambda: itertools.count(1))

    def stop(self) -> None:
        self._stop.set()

    def _note(self, key: str, symbol: str, ts: int, n: int) -> None:
        for k in ((key, ts - ts % MINUTE_MS), (symbol, ts - ts % FIVE_MIN)):
            cums, stamps = self.log.setdefault(k, ([], []))
            cums.append((cums[-1] if cums else 0) + n)
            stamps.append(ts)

    def bar_latency(self, rows: list[list[Any]]) -> dict[str, Any]:
        """Tick -> bar frame latency without ``close_ts_ms``: an open bar frame with
        ``trade_count`` n holds the bucket's first n ticks (ticks of a key are applied in
        order), so its newest tick is the one of the first batch whose cumulative count
        reaches n, and that batch's ``ts_ms`` is the bar's close_ts_ms. Exact for a
        1-minute bar of one exchange (n is then always a batch boundary: ``inexact``
        counts the frames where it is not); for a consolidated bar (the sum over
        exchanges, which the worker may apply at different points) the first batch where
        the symbol's sum reaches n is the oldest the newest tick can be, so the figure is
        an upper bound."""
        lat: dict[str, list[float]] = {"bar_1m": [], "bar_5m": []}
        unmatched = inexact = 0
        for sid, ex, sym, b, n, recv in rows:
            five = sid == SUB_5M
            ent = self.log.get((sym, b) if five else (f"{ex}:{sym}", b))
            i = bisect_left(ent[0], n) if ent else 0
            if ent is None or i >= len(ent[0]):
                unmatched += 1
                continue
            if not five and ent[0][i] != n:
                inexact += 1
            lat["bar_5m" if five else "bar_1m"].append(recv - ent[1][i])
        return {"bar_1m": qs(lat["bar_1m"]), "bar_5m": qs(lat["bar_5m"]),
                "unmatched": unmatched, "inexact_1m": inexact}

    async def run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.broker.bootstrap_servers,
                                    linger_ms=0, acks="all", enable_idempotence=True,
                                    **client_security(self.settings.broker))
        await producer.start()
        topic = self.settings.topics.ticks
        per_batch = self.rate * self.interval_ms / 1000
        sample = self.sample
        i = k = 0
        acc = 0.0
        t0 = time.monotonic()
        try:
            while not self._stop.is_set():
                due = t0 + k * self.interval_ms / 1000
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.behind_max_s = max(self.behind_max_s, -delay)
                k += 1
                acc += per_batch
                cnt = int(acc)
                acc -= cnt
                ts = now_ms()
                by_key: dict[str, list[dict[str, Any]]] = {}
                for _ in range(cnt):
                    t = sample[i % len(sample)]
                    i += 1
                    key = f"{t.exchange}:{t.symbol}"
                    by_key.setdefault(key, []).append(
                        {"exchange": t.exchange, "symbol": t.symbol, "price": t.price,
                         "qty": t.qty, "ts_ms": ts, "source": "live",
                         "trade_id": str(next(self._ids[key]))})
                for key, batch in by_key.items():
                    self._note(key, batch[0]["symbol"], ts, len(batch))
                futs = [await producer.send(topic, value=orjson.dumps(batch), key=key.encode())
                        for key, batch in by_key.items()]
                await asyncio.gather(*futs)
                self.sent += cnt
                self.messages += len(futs)
        finally:
            await producer.stop()


# ----------------------------------------------------------------------------- phases


class Sampler:
    """During a phase: the worker's RSS every 0.25 s and ``/metrics`` every second (lag =
    ticks acknowledged by the broker - ``marketflow_ticks_in_total``)."""

    def __init__(self, bench: BenchRun, http: aiohttp.ClientSession,
                 pub: LivePublisher, trace: bool = False) -> None:
        self.bench, self.http, self.pub = bench, http, pub
        #: print each lag sample with the wall time (``--lag-trace``)
        self.trace = trace
        self.rss_kb: list[int] = []
        self.lag: list[float] = []
        self.metrics_rt: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        worker = self.bench.worker
        last_m = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.rss_kb.append(worker.memory_kb()["VmRSS"])
            if time.monotonic() - last_m >= 1.0:
                last_m = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    sent = self.pub.sent
                    m = await worker.metrics(self.http, 10)
                    self.metrics_rt.append((time.monotonic() - last_m) * 1000)
                    self.lag.append(sent - m.get("marketflow_ticks_in_total", 0.0))
                    if self.trace:
                        say(f"    lag {time.strftime('%H:%M:%S')} {self.lag[-1]:,.0f} ticks")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.25)

    def stop(self) -> None:
        self._stop.set()


class Profile:
    """``py-spy record`` of the worker for one phase (``--profile DIR``; py-spy from PATH or
    ``.venv/bin``), summarised as the top functions by self and inclusive samples."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        exe = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format",
             "raw", "--duration", str(max(1, int(seconds))), "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def report(self, top: int = 12) -> list[str]:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            total, by_self, by_incl = profile_tops(self.out, top)
        except OSError as exc:
            return [f"py-spy: no profile ({exc})"]
        if not total:
            return ["py-spy: no samples"]
        out = [f"py-spy profile of the worker ({total} samples, {self.out}): self%"]
        out += [f"  {100 * k / total:5.1f}  {f}" for f, k in by_self]
        out.append("incl%")
        out += [f"  {100 * k / total:5.1f}  {f}" for f, k in by_incl]
        return out


def frames_metric(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("marketflow_stream_frames_total"))


def busy_cpus(t0: Any, t1: Any) -> float:
    """Machine-wide busy CPUs between two ``psutil.cpu_times()``."""
    idle = (t1.idle + getattr(t1, "iowait", 0)) - (t0.idle + getattr(t0, "iowait", 0))
    total = sum(t1) - sum(t0)
    n = psutil.cpu_count() or 1
    return n * (1 - idle / total) if total > 0 else 0.0


class Log:
    """New lines of the worker log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos += len(data)
        except OSError:
            return []
        return [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]


async def phase(n: int, args: argparse.Namespace, bench: BenchRun,
                http: aiohttp.ClientSession, pub: LivePublisher, watcher: Any,
                wlog: Log, cfg: dict[str, Any]) -> dict[str, Any]:
    worker = bench.worker
    res: dict[str, Any] = {"n": n}
    proc: asyncio.subprocess.Process | None = None
    child: psutil.Process | None = None
    other: list[str] = []

    async def child_line(prefix: str, timeout_s: float) -> dict[str, Any]:
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"clients: no {prefix} in {timeout_s:g} s; output: "
                                   + " | ".join(other[-10:]))
            raw = await asyncio.wait_for(proc.stdout.readline(), left)
            if not raw:
                raise RuntimeError(f"clients exited ({await proc.wait()}) before {prefix}: "
                                   + " | ".join(other[-20:]))
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(prefix + " "):
                return dict(orjson.loads(line[len(prefix) + 1:]))
            other.append(line)

    def send(cmd: str) -> None:
        assert proc is not None and proc.stdin is not None
        proc.stdin.write(cmd.encode() + b"\n")

    bars_file = bench.workdir / f"bar-frames-{n}.json"
    try:
        if n > 0:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--_clients",
                orjson.dumps({**cfg, "n": n, "bars_file": str(bars_file)}).decode(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, limit=1 << 24)
            child = psutil.Process(proc.pid)
            ready = await child_line("READY", 90 + n * 0.1)
            res["ready"] = ready
            say(f"  {ready['connected']}/{n} sockets open in {ready['open_s']:.2f} s "
                f"({cfg['wave']} at a time), all snapshots after {ready['ready_s']:.2f} s "
                f"({ready['snapshotted']} clients snapshotted); failed {ready['n_failed']}"
                + (f": {ready['failed']}" if ready["failed"] else ""))
            await asyncio.sleep(2.0)  # let the snapshot burst drain
        m0 = await worker.metrics(http, 10)
        res["lag_start"] = pub.sent - m0.get("marketflow_ticks_in_total", 0)
        pub0, w0, tm0 = pub.sent, watcher_len(watcher), time.monotonic()
        cpu_w0 = worker.cpu_s()
        me = psutil.Process()
        ct = me.cpu_times()
        cpu_me0 = ct.user + ct.system
        cpu_c0 = sum(child.cpu_times()[:2]) if child is not None else 0.0
        sys0 = psutil.cpu_times()
        if proc is not None:
            send("GO")
        sampler = Sampler(bench, http, pub, args.lag_trace)
        stask = asyncio.create_task(sampler.run())
        prof = None
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            prof = Profile(worker.pid, Path(args.profile) / f"worker-{n}-clients.txt",
                           args.seconds)
        await asyncio.sleep(args.seconds)
        if proc is not None:
            send("STOP")
        tm1 = time.monotonic()
        cpu_w1 = worker.cpu_s()
        cpu_c1 = sum(child.cpu_times()[:2]) if child is not None else 0.0
        ct = me.cpu_times()
        cpu_me1 = ct.user + ct.system
        sys1 = psutil.cpu_times()
        pub1, w1 = pub.sent, watcher_len(watcher)
        m1 = await worker.metrics(http, 10)
        sampler.stop()
        await stask
        dt = tm1 - tm0
        res["seconds"] = dt
        res["pub_rate"] = (pub1 - pub0) / dt
        res["applied_rate"] = (m1.get("marketflow_ticks_applied_total", 0)
                               - m0.get("marketflow_ticks_applied_total", 0)) / dt
        res["in_rate"] = (m1.get("marketflow_ticks_in_total", 0)
                          - m0.get("marketflow_ticks_in_total", 0)) / dt
        res["lag_end"] = pub1 - m1.get("marketflow_ticks_in_total", 0)
        res["lag_max"] = max(sampler.lag, default=res["lag_end"])
        res["metrics_rt_max"] = max(sampler.metrics_rt, default=0.0)
        res["worker_cpu"] = 100 * (cpu_w1 - cpu_w0) / dt
        res["bench_cpu"] = 100 * (cpu_me1 - cpu_me0) / dt
        res["machine_busy"] = busy_cpus(sys0, sys1)
        res["rss_max_mb"] = max(sampler.rss_kb, default=0) / 1024
        res["hwm_mb"] = worker.memory_kb()["VmHWM"] / 1024
        res["server_frames"] = frames_metric(m1) - frames_metric(m0)
        res["redis_lat"] = qs(watcher.samples[w0:w1])
        res["dup_trades"] = (m1.get("marketflow_duplicate_trades_total", 0)
                             - m0.get("marketflow_duplicate_trades_total", 0))
        res["late"] = (m1.get("marketflow_late_ticks_total", 0)
                       - m0.get("marketflow_late_ticks_total", 0))
        disc0 = {k: v for k, v in m0.items() if k.startswith("marketflow_stream_disconnects")}
        res["disconnects"] = {k: v - disc0.get(k, 0) for k, v in m1.items()
                              if k.startswith("marketflow_stream_disconnects")
                              and v - disc0.get(k, 0) > 0}
        if proc is not None:
            cr = await child_line("RESULT", 120)
            res["client_cpu"] = 100 * (cpu_c1 - cpu_c0) / dt
            res["client"] = cr
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                res["bar_lat"] = pub.bar_latency(orjson.loads(bars_file.read_bytes()))
                bars_file.unlink()
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                other.append("(clients killed after 120 s closing)")
            if proc.stdout is not None:
                other += (await proc.stdout.read()).decode(errors="replace").splitlines()
            res["child_exit"] = proc.returncode
            res["child_output"] = [ln for ln in other if ln.strip()][-10:]
        # sockets gone on the worker side?
        t_close = time.monotonic()
        conns = -1
        while time.monotonic() - t_close < 15:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with http.get(worker.base_url + "/health",
                                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.json()
                    conns = int(body.get("stream", {}).get("connections", -1))
                    res["hub"] = body.get("stream")
            if conns == 0:
                break
            await asyncio.sleep(0.5)
        res["conns_after"] = conns
        res["log"] = wlog.new_lines()
        if prof is not None:
            res["profile"] = prof.report()
        return res
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def drain(worker: Any, http: aiohttp.ClientSession, pub: LivePublisher, rate: int,
                timeout_s: float = 180) -> str:
    """Wait until the worker caught up with the publisher (lag below half a second of
    ticks, twice in a row), so that a phase does not start with the previous one's
    backlog."""
    t0 = time.monotonic()
    ok = 0
    lag = float("nan")
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            sent = pub.sent
            lag = sent - (await worker.metrics(http, 10)).get("marketflow_ticks_in_total", 0)
            ok = ok + 1 if lag <= rate / 2 else 0
            if ok >= 2:
                return (f"caught up before the phase (lag {lag:,.0f} ticks, waited "
                        f"{time.monotonic() - t0:.1f} s)")
        await asyncio.sleep(0.5)
    return f"NOT caught up after {timeout_s:g} s (lag {lag:,.0f} ticks); measuring anyway"


def watcher_len(watcher: Any) -> int:
    return len(watcher.samples)


def pp(q: dict[str, float] | None) -> str:
    return f"{q['p50']:.0f}/{q['p99']:.0f}" if q else "-"


def fmt_q(q: dict[str, float] | None) -> str:
    if not q:
        return "-"
    return f"p50 {q['p50']:.1f} / p99 {q['p99']:.1f} / max {q['max']:.0f} ms (n={q['n']:,})"


def report(res: dict[str, Any], base: dict[str, Any] | None) -> None:
    n = res["n"]
    ratio = res["applied_rate"] / base["applied_rate"] if base and base["applied_rate"] else 1
    say(f"  ingest: published {res['pub_rate']:,.0f} ticks/s, worker ticks_in "
        f"{res['in_rate']:,.0f}/s, applied {res['applied_rate']:,.0f}/s"
        + (f" ({ratio:.3f} of the 0-client phase)" if base else "")
        + f"; lag (acked - ticks_in) start {res['lag_start']:,.0f}, end {res['lag_end']:,.0f}, "
          f"max {res['lag_max']:,.0f} ticks; late {res['late']:.0f}, duplicate trades "
          f"{res['dup_trades']:.0f}")
    say(f"  worker: CPU {res['worker_cpu']:.0f}% of one core, RSS max {res['rss_max_mb']:.1f} "
        f"MiB (VmHWM {res['hwm_mb']:.1f} MiB); /metrics answered in max "
        f"{res['metrics_rt_max']:.0f} ms")
    say(f"  tick -> Redis latest (keyspace notifications, this process): "
        f"{fmt_q(res['redis_lat'])}")
    say(f"  machine: {res['machine_busy']:.2f} of {psutil.cpu_count()} CPUs busy; this process "
        f"(publisher, /metrics, Redis watcher) CPU {res['bench_cpu']:.0f}%")
    c = res.get("client")
    if c:
        secs = c["seconds"]
        tot = c["frames_total"]
        say(f"  clients: CPU {res['client_cpu']:.0f}% of one core (child process); event loop "
            f"lag {fmt_q(c['loop_lag'])}")
        say(f"  frames received {tot:,} in {secs:.1f} s = {tot / secs:,.0f}/s "
            f"({tot / secs / n:.1f} per client per s; per client min "
            f"{c['per_client']['min']:.1f} / p50 {c['per_client']['p50']:.1f} / max "
            f"{c['per_client']['max']:.1f}); by type {dict(sorted(c['frames'].items()))}; "
            f"worker counted {res['server_frames']:,.0f} frames sent")
        say(f"  tick -> price frame (receive - price.ts_ms): {fmt_q(c['lat']['price'])}")
        bl = res.get("bar_lat") or {}
        for k, label in (("bar_1m", "1m bar of one exchange"),
                         ("bar_5m", "5m consolidated bar (upper bound)")):
            if c["lat"][k]:
                say(f"  tick -> open {label} frame (receive - close_ts_ms): "
                    f"{fmt_q(c['lat'][k])}")
            say(f"  tick -> open {label} frame (receive - ts_ms of its newest tick, matched "
                f"by trade_count): {fmt_q(bl.get(k))}")
        if bl.get("unmatched") or bl.get("inexact_1m"):
            say(f"  bar frames not matched to the publish log: {bl.get('unmatched')}, 1m "
                f"counts not at a batch boundary: {bl.get('inexact_1m')}")
        say(f"  closed bars: {fmt_q(c['closed_delay'])} after the bucket end (includes the "
            f"grace); duplicate closed {c['dup_closed']}, corrections {c['corrections']}")
        say(f"  protocol: seq gaps {c['gaps']}, error/unexpected frames {len(c['errors'])} "
            f"(unparsed {c['bad_frames']})"
            + (f" {c['errors'][:3]}" if c["errors"] else "")
            + f", sockets closed by the server while measuring {c['closes_measuring']}; "
              f"close codes {c['closes']}")
        if res["disconnects"]:
            say(f"  worker disconnect counters: {res['disconnects']}")
        if res.get("child_exit"):
            say(f"  clients process exit {res['child_exit']}: {res['child_output']}")
    say(f"  worker sockets after the clients left: {res['conns_after']} (hub {res.get('hub')})")
    for ln in res.get("profile", []):
        say(f"  {ln}")
    if res["log"]:
        say(f"  worker log: {len(res['log'])} new line(s), first ones:")
        for ln in res["log"][:8]:
            say(f"    {ln[:400]}")


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    from run import RedisWatcher, load_sample  # bench/run.py (imported here: it is heavy)

    from core.admin import ensure_topics

    counts = [int(x) for x in args.clients.split(",") if x.strip()]
    nofile = raise_nofile(max([0, *counts]) + 1024)  # the worker inherits it
    bench = BenchRun(args.partitions, {})
    name, settings, worker = bench.name, bench.settings, bench.worker
    machine = (f"{os.cpu_count()} CPUs (nproc), {platform.processor() or platform.machine()}, "
               f"{platform.python_implementation()} {platform.python_version()}, "
               f"{platform.platform()}")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine = machine.replace(platform.processor() or platform.machine(),
                                          line.split(":", 1)[1].strip(), 1)
                break
    say(f"marketflow stream bench {name}: phases 0,{','.join(map(str, counts))} clients x "
        f"{args.seconds:g} s, {args.rate:,} live ticks/s, {args.partitions} partitions, "
        f"stream.max_updates_per_s {settings.stream.max_updates_per_s:g}, max_connections "
        f"{settings.stream.max_connections}, grace {settings.window.grace_ms} ms")
    say(f"machine: {machine}")
    load_start = loadavg()
    say(f"load average at start: {load_start}; RLIMIT_NOFILE {nofile}")
    say(bench.describe())

    sample = load_sample()
    keys = sorted({(t.exchange, t.symbol) for t in sample})
    symbols = sorted({s for _, s in keys})
    price_items = symbols if args.price_items == "symbols" else [f"{e}:{s}" for e, s in keys]
    cfg = {"url": f"ws://127.0.0.1:{bench.web_port}/stream", "keys": keys,
           "symbols": symbols, "price_items": price_items, "wave": args.wave,
           "consolidated_every": args.consolidated_every, "compress": args.compress}
    say(f"each client: bars 1m of one of {[f'{e}:{s}' for e, s in keys]} (client i: key i % "
        f"{len(keys)}), prices {price_items}; every {args.consolidated_every}th also "
        f"consolidated 5m bars of {' / '.join(symbols)} (alternating)"
        + ("; clients offer permessage-deflate" if args.compress else ""))

    results: list[dict[str, Any]] = []
    ok = True
    http: aiohttp.ClientSession | None = None
    pub: LivePublisher | None = None
    ptask: asyncio.Task[None] | None = None
    watcher: Any = None
    wtask: asyncio.Task[None] | None = None
    try:
        await bench.create_database()
        await ensure_topics(settings)
        http = aiohttp.ClientSession()
        t = time.monotonic()
        pid = worker.start().pid
        await worker.until_ready(120, http=http, poll_s=0.1)
        say(f"\nworker pid {pid}: /health 200 and Faust ready {time.monotonic() - t:.1f} s "
            f"after launch")
        wlog = Log(worker.log_path)
        start_ms = now_ms()
        watcher = RedisWatcher(settings.redis.url.get_secret_value(), name,
                               [f"{e}:{s}" for e, s in keys], start_ms)
        wtask = asyncio.create_task(watcher.run())
        pub = LivePublisher(settings, sample, args.rate)
        ptask = asyncio.create_task(pub.run())
        await asyncio.sleep(args.warmup)
        m = await worker.metrics(http, 10)
        say(f"warm-up {args.warmup:g} s: {pub.sent:,} ticks published, ticks_in "
            f"{m.get('marketflow_ticks_in_total', 0):,.0f}")
        wlog.new_lines()  # startup lines are not a phase's
        for n in [0, *counts]:
            if ptask.done():
                ptask.result()
                raise RuntimeError("publisher stopped")
            worker.check_alive()
            say(f"\n[{n} clients] {args.seconds:g} s (load average {loadavg()})")
            say(f"  {await drain(worker, http, pub, args.rate)}")
            res = await phase(n, args, bench, http, pub, watcher, wlog, cfg)
            results.append(res)
            report(res, results[0] if n else None)
        say(f"\npublisher: {pub.sent:,} ticks in {pub.messages:,} messages; most behind "
            f"schedule {pub.behind_max_s * 1000:.0f} ms")
    except Exception as exc:  # noqa: BLE001  (reported; cleanup follows)
        ok = False
        say(f"\nFAILED: {type(exc).__name__}: {exc}")
        if worker.proc is not None:
            say(f"worker log tail:\n{worker.log_tail(20)}")
    finally:
        say("\ncleanup")
        if pub is not None:
            pub.stop()
        if ptask is not None:
            with contextlib.suppress(Exception):
                await ptask
        if watcher is not None:
            watcher.stop()
        if wtask is not None:
            with contextlib.suppress(Exception):
                await wtask
        if http is not None:
            await http.close()
        await bench.cleanup(args.keep_log)
    load_end = loadavg()

    # ------------------------------------------------------------------ summary
    say("\nSUMMARY")
    say(f"  machine: {machine}")
    say(f"  load average: start {load_start}, end {load_end}")
    say(f"  worker: 1 process, {args.partitions} partitions, {args.rate:,} live ticks/s "
        f"published; {args.seconds:g} s per phase; clients in one child process (aiohttp)")
    if results:
        base = results[0]
        say(f"  {'clients':>7} {'pub/s':>7} {'applied/s':>9} {'ratio':>6} {'lag max':>8} "
            f"{'wCPU%':>6} {'wRSS MB':>8} {'cCPU%':>6} {'busy':>5} {'frames/s':>9} "
            f"{'f/cl/s':>7} {'redis p50/p99':>14}")
        for r in results:
            c = r.get("client")
            fr = c["frames_total"] / c["seconds"] if c else 0.0
            rl = r["redis_lat"]
            rls = f"{rl['p50']:.0f}/{rl['p99']:.0f}" if rl else "-"
            say(f"  {r['n']:>7} {r['pub_rate']:>7,.0f} {r['applied_rate']:>9,.0f} "
                f"{r['applied_rate'] / base['applied_rate'] if base['applied_rate'] else 0:>6.3f} "
                f"{r['lag_max']:>8,.0f} {r['worker_cpu']:>6.0f} {r['rss_max_mb']:>8.1f} "
                f"{r.get('client_cpu', 0):>6.0f} {r['machine_busy']:>5.2f} {fr:>9,.0f} "
                f"{fr / r['n'] if r['n'] else 0:>7.1f} "
                f"{rls:>14}")
        say(f"  {'clients':>7} {'ready s':>7} {'price p50/p99 ms':>18} "
            f"{'bar1m p50/p99 ms':>18} {'bar5m p50/p99 ms':>18} {'closed p50 s':>12} "
            f"{'gaps':>5} {'errors':>6} {'closed':>6}")
        for r in results:
            c = r.get("client")
            if not c:
                continue
            cd = c["closed_delay"]
            cds = f"{cd['p50'] / 1000:.1f}" if cd else "-"
            bl = r.get("bar_lat") or {}
            say(f"  {r['n']:>7} {r['ready']['ready_s']:>7.1f} {pp(c['lat']['price']):>18} "
                f"{pp(bl.get('bar_1m')):>18} "
                f"{pp(bl.get('bar_5m')):>18} "
                f"{cds:>12} {c['gaps']:>5} "
                f"{len(c['errors']):>6} {c['closes_measuring']:>6}")
        say("  (ratio = applied/s / applied/s of the 0-client phase; lag = ticks acked by the "
            "broker - worker ticks_in, sampled every 1 s; wCPU/cCPU = worker / clients process "
            "CPU, % of one core; busy = busy CPUs of the machine; ready = sockets opened "
            "and all snapshots received; closed = sockets closed by the server while "
            "measuring)")
        for r in results:
            c = r.get("client")
            if not c:
                continue
            bl = r.get("bar_lat") or {}
            p99s = [q["p99"] for q in (c["lat"]["price"], bl.get("bar_1m"), bl.get("bar_5m"))
                    if q]
            worst = max(p99s) if p99s else float("nan")
            ratio = r["applied_rate"] / base["applied_rate"] if base["applied_rate"] else 0
            say(f"  target at {r['n']} clients: p99 < 100 ms "
                f"{'MET' if p99s and worst < 100 else 'NOT MET'} (worst p99 {worst:.0f} ms); "
                f"ingest within 10% {'MET' if ratio >= 0.9 else 'NOT MET'} (ratio "
                f"{ratio:.3f}, lag max {r['lag_max']:,.0f} ticks)")
    return 0 if ok and len(results) == len(counts) + 1 else 1


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--_clients":
        uvloop.run(clients_main(orjson.loads(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="100,1000",
                    help="comma-separated client counts, run in turn after a 0-client phase")
    ap.add_argument("--seconds", type=float, default=30, help="measured seconds per phase")
    ap.add_argument("--rate", type=int, default=5000, help="live ticks per second")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=5, help="publishing before the phases")
    ap.add_argument("--wave", type=int, default=50, help="sockets opened at a time")
    ap.add_argument("--consolidated-every", type=int, default=4,
                    help="every k-th client also subscribes consolidated 5m bars (0 = none)")
    ap.add_argument("--price-items", choices=["symbols", "keys"], default="symbols",
                    help="prices subscription: the symbols (newest across exchanges) or every "
                         "exchange:SYMBOL key")
    ap.add_argument("--compress", action="store_true",
                    help="clients offer permessage-deflate (as browsers do)")
    ap.add_argument("--keep-log", action="store_true", help="keep the worker log in /tmp")
    ap.add_argument("--lag-trace", action="store_true",
                    help="print the worker's lag every second, with the wall time (to line "
                         "stalls up with minute boundaries or other logs)")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="py-spy record the worker in every phase (DIR/worker-<n>-clients.txt; "
                         "py-spy from PATH or .venv/bin); for diagnosis, not the figures")
    args = ap.parse_args()
    counts = [x for x in args.clients.split(",") if x.strip()]
    if not all(x.strip().isdigit() and int(x) > 0 for x in counts):
        ap.error("--clients: comma-separated positive integers")
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
