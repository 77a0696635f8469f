#!/usr/bin/env python
"""marketflow benchmark: throughput, correctness, memory and latency of one worker.

Not a test: it prints figures. See ``bench/README.md``. Run from anywhere::

    .venv/bin/python bench/run.py [--ticks 200000] [--latency-seconds 75]

Needs the local services (``scripts/services.sh up``). Every run is isolated: its own
app id, topics, Redis key prefix, web port, data dir and database ``bench_<rand>``, all
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # the worker and load_settings() read marketflow.toml from the repo root

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from common import MINUTE, BenchRun, now_ms, pct, profile_tops, run_main, say  # noqa: E402  (bench/common.py)

from core.admin import ensure_topics  # noqa: E402
from core.config import Settings  # noqa: E402
from core.kafka_security import client_security  # noqa: E402
from core.models import Tick, decode_ticks_payload, encode_ticks, parse_ticks  # noqa: E402
from feeds.replay.simulator import batch_ticks  # noqa: E402
from feeds.replay.sources import merge_by_time  # noqa: E402
from feeds.replay.trade_files import read_trades  # noqa: E402
from tables.aggregator import WindowAggregator  # noqa: E402
from tables.window import finalize_bar  # noqa: E402

SAMPLE_GLOB = "binance_*_2024-08-08T2354_trades.csv"
SAMPLE_DIR = REPO / "data" / "sample" / "trades"


# ----------------------------------------------------------------------------- input data


def load_sample() -> list[Tick]:
    files = sorted(SAMPLE_DIR.glob(SAMPLE_GLOB))
    if len(files) != 4:
        raise SystemExit(f"expected 4 sample files {SAMPLE_DIR}/{SAMPLE_GLOB}, found {len(files)}")
    return list(merge_by_time([read_trades(f) for f in files]))


def compress_time(sample: list[Tick], factor: int) -> list[Tick]:
    """The sample with its event times ``factor`` times closer together (from its first
    minute's start): the same trades as a market ``factor`` times as busy, so a flush of
    ``--batch-span-ms`` holds ``factor`` times as many ticks per message."""
    t0 = sample[0].ts_ms - sample[0].ts_ms % MINUTE
    return [t._replace(ts_ms=t0 + (t.ts_ms - t0) // factor) for t in sample]


def make_ticks(sample: list[Tick], n: int) -> tuple[list[Tick], int, int]:
    """``n`` ticks cycling the sample, each cycle shifted later by the sample's span
    rounded up to whole minutes plus one minute. Returns (ticks, shift_ms, cycles)."""
    span = sample[-1].ts_ms - sample[0].ts_ms
    shift = math.ceil(span / MINUTE) * MINUTE + MINUTE
    out: list[Tick] = []
    cycle = 0
    while len(out) < n:
        d = cycle * shift
        out.extend(t._replace(ts_ms=t.ts_ms + d) for t in sample[: n - len(out)])
        cycle += 1
    return out, shift, cycle


def expected_bars(messages: list[tuple[str, list[Tick]]], grace_ms: int) -> dict[tuple, dict]:
    """Bars the pure aggregator builds from the messages (one partition, all closed)."""
    agg = WindowAggregator({}, grace_ms=grace_ms, idle_timeout_ms=1)
    wall = now_ms()
    closed: list[dict] = []
    late = 0
    for off, (_key, batch) in enumerate(messages):
        res = agg.process_ticks(0, off, batch, wall)
        late += len(res.late)
        closed.extend(res.closed)
    closed.extend(agg.process_idle(0, wall + 10**12).closed)
    if late:
        raise SystemExit(f"bench input error: the pure aggregator found {late} late ticks")
    return {(b["exchange"], b["symbol"], b["bucket_start_ms"]): b for b in closed}


# ----------------------------------------------------------------------------- broker


async def produce(settings: Settings, messages: list[tuple[str, list[Tick]]]) -> tuple[
        dict[int, int], dict[int, int], float]:
    """Publish the messages; returns (last offset per partition, ticks per partition, s)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker.bootstrap_servers,
        linger_ms=5, max_batch_size=1 << 20, max_request_size=8 << 20, acks="all",
        enable_idempotence=True, **client_security(settings.broker),
    )
    await producer.start()
    topic = settings.topics.ticks
    last: dict[int, int] = {}
    per_part: dict[int, int] = defaultdict(int)
    t0 = time.monotonic()
    try:
        futs = []
        for key, batch in messages:
            value = encode_ticks(batch)
            futs.append((len(batch), await producer.send(topic, value=value, key=key.encode())))
            if len(futs) >= 500:
                await _collect(futs, last, per_part)
        await _collect(futs, last, per_part)
    finally:
        await producer.stop()
    return last, dict(per_part), time.monotonic() - t0


async def _collect(futs: list, last: dict[int, int], per_part: dict[int, int]) -> None:
    for n, fut in futs:
        md = await fut
        last[md.partition] = max(last.get(md.partition, -1), md.offset)
        per_part[md.partition] += n
    futs.clear()


# ----------------------------------------------------------------------------- worker


class PySpy:
    """``py-spy record`` of the worker (non-blocking sampling) while it consumes."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = REPO / ".venv" / "bin" / "py-spy"
        if not exe.exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [str(exe), "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
             "--format", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def report(self, top: int = 15) -> str:
        """Top functions by self and by inclusive samples, from the collapsed stacks."""
        try:
            total, by_self, by_incl = profile_tops(self.out, top)
        except OSError as exc:
            return f"  py-spy: no profile ({exc})"
        if not total:
            return "  py-spy: no samples"
        out = [f"  py-spy profile ({total} samples while consuming, {self.out}):",
               "    self%  function"]
        out += [f"    {100 * n / total:5.1f}  {f}" for f, n in by_self]
        out.append("    incl%  function")
        out += [f"    {100 * n / total:5.1f}  {f}" for f, n in by_incl]
        return "\n".join(out)


# ----------------------------------------------------------------------------- DB


BAR_SQL = """
SELECT exchange, symbol, (extract(epoch FROM bucket_start) * 1000)::bigint AS b,
       open, high, low, close, trim_scale(volume)::text AS volume,
       trim_scale(quote_volume)::text AS quote_volume, trim_scale(vwap)::text AS vwap,
       trade_count, open_ts_ms, close_ts_ms,
       (extract(epoch FROM inserted_at) * 1000)::float8 AS ins_ms
FROM bars_1m WHERE bucket_start >= to_timestamp($1 / 1000.0)
  AND bucket_start < to_timestamp($2 / 1000.0)
"""


async def count_bars(conn: asyncpg.Connection, lo: int, hi: int) -> int:
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM bars_1m WHERE bucket_start >= to_timestamp($1 / 1000.0)"
            " AND bucket_start < to_timestamp($2 / 1000.0)", lo, hi)
    except asyncpg.UndefinedTableError:  # the worker has not migrated yet
        return 0


def compare(expected: dict[tuple, dict], rows: list[asyncpg.Record]) -> list[str]:
    """Mismatch descriptions (empty = identical)."""
    got = {(r["exchange"], r["symbol"], r["b"]): r for r in rows}
    bad: list[str] = []
    for k in sorted(set(expected) - set(got)):
        bad.append(f"missing in DB: {k}")
    for k in sorted(set(got) - set(expected)):
        bad.append(f"unexpected in DB: {k}")
    for k in sorted(set(expected) & set(got)):
        e, r = expected[k], got[k]
        diffs = [f for f in ("open", "high", "low", "close", "volume", "quote_volume", "vwap",
                             "trade_count", "open_ts_ms", "close_ts_ms") if e[f] != r[f]]
        if diffs:
            bad.append(f"{k}: " + ", ".join(f"{f} exp {e[f]!r} got {r[f]!r}" for f in diffs))
    return bad


# ----------------------------------------------------------------------------- latency


class RedisWatcher:
    """Records ``now - ts_ms`` each time a ``<prefix>:latest:<exchange>:<symbol>`` hash
    changes (keyspace notifications; falls back to polling every 2 ms)."""

    def __init__(self, url: str, prefix: str, keys: list[str], min_ts: int) -> None:
        self.url = url
        self.prefix = prefix
        self.keys = [f"{prefix}:latest:{k}" for k in keys]
        self.min_ts = min_ts
        self.samples: list[float] = []
        self.mode = "?"
        self._last: dict[str, int] = {}
        self._old_flags: str | None = None
        self._stop = asyncio.Event()

    def _record(self, key: str, ts: Any, now: float) -> None:
        if ts is None:
            return
        ts = int(ts)
        if ts >= self.min_ts and ts != self._last.get(key):
            self._last[key] = ts
            self.samples.append(now - ts)

    async def run(self) -> None:
        r = aioredis.Redis.from_url(self.url, decode_responses=True)
        try:
            try:
                old = str((await r.config_get("notify-keyspace-events")).get(
                    "notify-keyspace-events") or "")
                self._old_flags = old
                flags = old
                if "A" not in flags and "h" not in flags:
                    flags += "h"
                if "K" not in flags:
                    flags += "K"
                await r.config_set("notify-keyspace-events", flags)
            except aioredis.RedisError:
                self._old_flags = None
            if self._old_flags is not None:
                await self._notify(r)
            else:
                await self._poll(r)
        finally:
            if self._old_flags is not None:
                with contextlib.suppress(aioredis.RedisError):
                    await r.config_set("notify-keyspace-events", self._old_flags)
            await r.aclose()

    async def _notify(self, r: aioredis.Redis) -> None:
        self.mode = "keyspace notifications"
        db = r.connection_pool.connection_kwargs.get("db", 0)
        ps = r.pubsub()
        chan = f"__keyspace@{db}__:"
        await ps.psubscribe(f"{chan}{self.prefix}:latest:*:*")
        try:
            while not self._stop.is_set():
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is None or msg.get("data") != "hset":
                    continue
                key = msg["channel"][len(chan):]
                ts = await r.hget(key, "ts_ms")
                self._record(key, ts, time.time_ns() / 1e6)
        finally:
            await ps.aclose()

    async def _poll(self, r: aioredis.Redis) -> None:
        self.mode = "polling every 2 ms"
        while not self._stop.is_set():
            async with r.pipeline(transaction=False) as p:
                for k in self.keys:
                    p.hget(k, "ts_ms")
                vals = await p.execute()
            now = time.time_ns() / 1e6
            for k, v in zip(self.keys, vals, strict=True):
                self._record(k, v, now)
            await asyncio.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()


class TopicProbe:
    """A plain aiokafka consumer on ``topic`` (each of its ``topics.partitions``
    partitions, from the end) during the latency phase; :meth:`sample` turns a record's
    decoded value into a latency in ms, or None to skip it.

    Args:
        settings: the run's settings (broker and security).
        topic: the topic to read.
        min_ts: records of event time before this (ms) are skipped by :meth:`sample`.
        wait_ms: the consumer's ``fetch_max_wait_ms``.
    """

    def __init__(self, settings: Settings, topic: str, min_ts: int, wait_ms: int) -> None:
        self.settings = settings
        self.topic = topic
        self.min_ts = min_ts
        self.wait_ms = wait_ms
        self.samples: list[float] = []
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    def sample(self, value: Any, now_ms: float, record_ts_ms: int) -> float | None:
        """The latency of one record (ms), None to skip it (``record_ts_ms``: the record's
        timestamp, set by its producer when it sent it)."""
        raise NotImplementedError

    async def run(self) -> None:
        s = self.settings
        c = AIOKafkaConsumer(bootstrap_servers=s.broker.bootstrap_servers,
                             fetch_max_wait_ms=self.wait_ms, enable_auto_commit=False,
                             **client_security(s.broker))
        await c.start()
        try:
            # every topic of the run has topics.partitions partitions (core/admin.py)
            c.assign([TopicPartition(self.topic, p) for p in range(s.topics.partitions)])
            await c.seek_to_end()
            self.ready.set()
            while not self._stop.is_set():
                got = await c.getmany(timeout_ms=200)
                now = time.time_ns() / 1e6
                for recs in got.values():
                    for m in recs:
                        lat = self.sample(orjson.loads(m.value), now, m.timestamp)
                        if lat is not None:
                            self.samples.append(lat)
        finally:
            self.ready.set()
            await c.stop()

    def stop(self) -> None:
        self._stop.set()


class BrokerProbe(TopicProbe):
    """The ticks topic: ``now - ts_ms`` of each live message's first tick is the broker
    delivery floor of the tick -> Redis latency.

    It uses the ``fetch_max_wait_ms=1500`` that Faust's aiokafka driver hard-codes
    (``faust/transport/drivers/aiokafka.py``), like the worker's consumer. Kafka answers a
    fetch as soon as data arrives, so the wait only bounds fetches that find no data."""

    def __init__(self, settings: Settings, min_ts: int, wait_ms: int = 1500) -> None:
        super().__init__(settings, settings.topics.ticks, min_ts, wait_ms)

    def sample(self, value: Any, now_ms: float, record_ts_ms: int) -> float | None:
        if isinstance(value, dict) and value.get("layout") == "columns":  # encode_ticks
            first = value["ts_ms"][0] if value["ts_ms"] else 0
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            first = value[0].get("ts_ms", 0)
        else:
            return None  # a control message
        return now_ms - first if first >= self.min_ts else None


class BarsProbe(TopicProbe):
    """The closed-bars topic: for each bar (not a correction) of a minute that started at
    or after ``min_ts``, ``now - bucket end`` in ms (window end -> bar on the topic; includes
    the grace)."""

    def __init__(self, settings: Settings, min_ts: int) -> None:
        super().__init__(settings, settings.topics.bars, min_ts, 100)
        #: per bar: window end -> the worker's send (the record's timestamp), ms
        self.sent: list[float] = []

    def sample(self, value: Any, now_ms: float, record_ts_ms: int) -> float | None:
        if (isinstance(value, dict) and not value.get("correction")
                and value.get("bucket_start_ms", 0) >= self.min_ts):
            end_ms = value["bucket_start_ms"] + MINUTE
            self.sent.append(record_ts_ms - end_ms)
            return now_ms - end_ms
        return None


async def publish_live(settings: Settings, sample: list[Tick], seconds: float, rate: int,
                       interval_ms: int) -> tuple[int, int, int, int, list[dict], float]:
    """Paced live-stamped ticks (the sample's prices and sizes, now as their time, new
    trade ids). Returns (ticks, messages, first_ts, last_ts, every bar
    the pure aggregator builds from the same ticks (open ones finalized), ticks/s)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker.bootstrap_servers,
                                linger_ms=0, acks="all", enable_idempotence=True,
                                **client_security(settings.broker))
    await producer.start()
    agg = WindowAggregator({}, grace_ms=settings.window.grace_ms, idle_timeout_ms=1)
    bars: list[dict] = []
    topic = settings.topics.ticks
    per_batch = rate * interval_ms / 1000
    i = n = msgs = 0
    next_id: dict[str, int] = {}
    acc = 0.0
    first_ts = last_ts = 0
    t0 = time.monotonic()
    k = 0
    try:
        while True:
            due = t0 + k * interval_ms / 1000
            if due - t0 >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            k += 1
            acc += per_batch
            cnt = int(acc)
            acc -= cnt
            ts = now_ms()
            first_ts = first_ts or ts
            last_ts = ts
            by_key: dict[str, list[Tick]] = {}
            for _ in range(cnt):
                t = sample[i % len(sample)]
                i += 1
                key = f"{t.exchange}:{t.symbol}"
                # a fresh trade id per tick (consecutive per key, like an exchange's): a
                # re-sent sample id would be a duplicate trade in its window, skipped and
                # not moving the watermark, once the sample has cycled within a minute
                tid = next_id[key] = next_id.get(key, 0) + 1
                by_key.setdefault(key, []).append(
                    t._replace(ts_ms=ts, source="live", trade_id=str(tid)))
            futs = []
            for key, batch in by_key.items():
                value = encode_ticks(batch)
                futs.append(await producer.send(topic, value=value, key=key.encode()))
                bars.extend(agg.process_ticks(0, msgs, batch, ts).closed)
                msgs += 1
                n += len(batch)
            await asyncio.gather(*futs)
        elapsed = time.monotonic() - t0
    finally:
        await producer.stop()
    for key, st in agg.store.items():
        ex, sym = key.split(":", 1)
        bars.extend(finalize_bar(ex, sym, bar) for bar in st["bars"].values())
    return n, msgs, first_ts, last_ts, bars, n / elapsed


# ----------------------------------------------------------------------------- baseline


async def baseline(settings: Settings, group: str, last: dict[int, int], n_ticks: int,
                   timeout_s: float) -> tuple[float, int, int]:
    """Plain aiokafka consumer over the pre-produced messages (offsets <= ``last``):
    decode_ticks_payload + parse_ticks + WindowAggregator on a dict (the worker's pure
    steps). Returns (seconds, ticks, bars)."""
    topic = settings.topics.ticks
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker.bootstrap_servers, group_id=group,
        auto_offset_reset="earliest", enable_auto_commit=False,
        fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
        **client_security(settings.broker),
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in sorted(last)]
    consumer.assign(tps)
    agg = WindowAggregator({}, grace_ms=settings.window.grace_ms, idle_timeout_ms=1)
    max_future = settings.window.max_future_ms
    seen = bars = 0
    done: set[int] = set()
    try:
        t0 = time.monotonic()
        while len(done) < len(tps):
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"baseline: only {seen}/{n_ticks} ticks after {timeout_s}s")
            got = await consumer.getmany(timeout_ms=200, max_records=100_000)
            wall = now_ms()
            for tp, recs in got.items():
                p = tp.partition
                for m in recs:
                    if m.offset > last[p]:
                        break
                    payload = decode_ticks_payload(m.value)
                    if isinstance(payload, dict) and "control" in payload:  # the worker's
                        continue
                    ticks, rejected = parse_ticks(payload, wall, max_future)
                    if rejected:
                        raise RuntimeError(f"baseline: invalid ticks {rejected[:3]!r}")
                    res = agg.process_ticks(p, m.offset, ticks, wall)
                    bars += len(res.closed)
                    seen += len(ticks)
                if recs and recs[-1].offset >= last[p] and p not in done:
                    done.add(p)
                    consumer.pause(tp)
        secs = time.monotonic() - t0
        bars += sum(len(agg.process_idle(p, wall + 10**12).closed) for p in last)
    finally:
        await consumer.stop()
    return secs, seen, bars


# ----------------------------------------------------------------------------- main


PEER_VENV = REPO / "var" / "peers-venv"
PEER_REQUIREMENTS = REPO / "bench" / "peers" / "requirements.txt"


def ensure_peer_venv() -> Path:
    """The peers' virtualenv (``var/peers-venv``) with ``bench/peers/requirements.txt``
    installed (once per content of that file); its python.

    Raises:
        subprocess.CalledProcessError: venv creation or pip failed.
    """
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".requirements"
    wanted = PEER_REQUIREMENTS.read_text()
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    say(f"  installing {wanted.strip()} into {PEER_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(PEER_REQUIREMENTS)],
                   check=True)
    marker.write_text(wanted)
    return python


async def peer_quix(settings: Settings, name: str, last: dict[int, int], grace_ms: int,
                    state_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``bench/peers/quix_ohlcv.py`` (Quix Streams, same windows) over the same
    pre-produced messages, in its own consumer group; its figures, plus ``quix_version``.
    Its changelog topics (named after its group) are deleted afterwards.

    Raises:
        RuntimeError: the application failed or printed no figures.
    """
    python = ensure_peer_venv()
    group = f"{name}-quix"
    proc = await asyncio.create_subprocess_exec(
        str(python), "-W", "ignore", str(REPO / "bench" / "peers" / "quix_ohlcv.py"),
        ",".join(settings.broker.bootstrap_servers), settings.topics.ticks, group,
        str(grace_ms), orjson.dumps({str(p): o for p, o in last.items()}).decode(),
        str(state_dir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker.bootstrap_servers,
                                    **client_security(settings.broker))
        await admin.start()
        try:
            mine = [t for t in await admin.list_topics() if group in t]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"quix peer failed (exit {proc.returncode}): "
                           f"{err.decode()[-2000:]}")
    fig: dict[str, Any] = orjson.loads(lines[-1])
    version = subprocess.run([str(python), "-c", "import quixstreams; "
                              "print(quixstreams.__version__)"], capture_output=True,
                             text=True, check=True)
    fig["quix_version"] = version.stdout.strip()
    return fig


async def run(args: argparse.Namespace) -> int:
    bench = BenchRun(args.partitions, {
        "MARKETFLOW_APP__PROCESSING_GUARANTEE": args.guarantee,
        "MARKETFLOW_WINDOW__GRACE_MS": str(args.grace_ms),
        "MARKETFLOW_WINDOW__IDLE_TIMEOUT_S": "1",
        "MARKETFLOW_WINDOW__IDLE_CHECK_INTERVAL_S": "0.5",
    }, loglevel=args.worker_loglevel)
    name, settings, worker = bench.name, bench.settings, bench.worker
    fig: dict[str, Any] = {}

    say(f"marketflow bench {name}: {args.ticks:,} ticks, {args.partitions} partitions, "
        f"processing guarantee {settings.app.processing_guarantee}, batch span "
        f"{args.batch_span_ms} ms / max {args.batch_max} ticks, grace {args.grace_ms} ms, "
        f"idle timeout 1 s (check every 0.5 s), sample event time compressed "
        f"{args.time_compress}x")
    say(f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.platform()}")
    say(bench.describe())

    cleanup: list[str] = []
    try:
        # -------------------------------------------------------------- 1. input
        say("\n[1] pre-produce")
        sample = load_sample()
        if args.time_compress > 1:
            sample = compress_time(sample, args.time_compress)
        ticks, shift, cycles = make_ticks(sample, args.ticks)
        messages = [m for flush in batch_ticks(iter(ticks), args.batch_max, args.batch_span_ms)
                    for m in flush]
        sizes = [len(b) for _, b in messages]
        expected = expected_bars(messages, args.grace_ms)
        lo_ms = ticks[0].ts_ms - ticks[0].ts_ms % MINUTE
        hi_ms = ticks[-1].ts_ms - ticks[-1].ts_ms % MINUTE + MINUTE
        say(f"  sample: {len(sample):,} trades, {len({t.key for t in sample})} keys, "
            f"span {(sample[-1].ts_ms - sample[0].ts_ms) / 1000:.1f} s; cycles {cycles} "
            f"shifted by {shift // MINUTE} min each")
        say(f"  {len(messages):,} messages, ticks/message mean {statistics.mean(sizes):.0f} "
            f"min {min(sizes)} max {max(sizes)}; expected bars (pure aggregator): "
            f"{len(expected)}")
        fig["messages"] = len(messages)
        fig["ticks_per_msg"] = statistics.mean(sizes)

        await bench.create_database()

        # the run's topics with explicit partition counts (--partitions) and replication 1
        # before anything publishes, so the broker's auto-creation never picks them
        await ensure_topics(settings)
        last_off, per_part, prod_s = await produce(settings, messages)
        say(f"  produced in {prod_s:.2f} s ({args.ticks / prod_s:,.0f} ticks/s); ticks per "
            f"partition {dict(sorted(per_part.items()))}, last offsets "
            f"{dict(sorted(last_off.items()))}")

        # -------------------------------------------------------------- 2. throughput
        say("\n[2] throughput (worker started after the ticks were produced)")
        db = await asyncpg.connect(bench.dsn)
        http = aiohttp.ClientSession()
        cleanup.append("http")
        t_launch = time.monotonic()
        pid = worker.start().pid
        t_health = await worker.wait_healthy(http, 120)
        cpu_health = worker.cpu_s()
        cpu_first = cpu_consumed = 0.0
        spy = PySpy(pid, Path(args.profile)) if args.profile else None
        say(f"  worker pid {pid}: GET /health 200 {t_health - t_launch:.2f} s "
            f"after launch")

        # Poll every 0.1 s: worker log for Faust's ready line, /metrics for the tick
        # counter (until all ticks are counted), bars_1m count every 0.2 s.
        t_ready_log = t_first_tick = t_consumed = t_last_bar = None
        n_at_ready = 0.0
        n_in = 0.0
        deadline = t_health + max(180.0, args.ticks / 1000)
        cnt = 0
        it = 0
        while True:
            worker.check_alive()
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"only {cnt}/{len(expected)} bars in the DB in time:\n"
                                   f"{worker.log_tail()}")
            if t_consumed is None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    n_in = (await worker.metrics(http)).get("marketflow_ticks_in_total", 0)
                    now = time.monotonic()
                    if n_in > 0 and t_first_tick is None:
                        t_first_tick = now
                        cpu_first = worker.cpu_s()
                    if n_in >= args.ticks:
                        t_consumed = now
                        cpu_consumed = worker.cpu_s()
                        if spy is not None:
                            spy.stop()
            if t_ready_log is None and worker.ready_in_log():
                t_ready_log = time.monotonic()
                n_at_ready = n_in
            if it % 2 == 0:
                cnt = await count_bars(db, lo_ms, hi_ms)
                if cnt >= len(expected):
                    t_last_bar = time.monotonic()
                    break
            it += 1
            await asyncio.sleep(0.1)
        cpu_done = worker.cpu_s()
        mem1 = worker.memory_kb()
        m = await worker.metrics(http)
        t_ready = t_ready_log if t_ready_log is not None else t_health
        fig["health_s"] = t_health - t_launch
        fig["ready_s"] = t_ready - t_launch
        if t_ready_log is not None:
            say(f"  Faust ready line ('OK ^' at -l warn, 'Worker]: Ready' at -l info) seen "
                f"{t_ready_log - t_launch:.2f} s after launch ({n_at_ready:,.0f} ticks counted "
                f"by then)")
        else:
            say("  Faust ready line not seen in the log; using GET /health as ready")
        fig["e2e_s"] = t_last_bar - t_ready
        fig["sustained"] = args.ticks / (t_last_bar - t_ready)
        fig["sustained_health"] = args.ticks / (t_last_bar - t_health)
        say(f"  last expected bar in TimescaleDB {t_last_bar - t_ready:.2f} s after ready -> "
            f"sustained {fig['sustained']:,.0f} ticks/s (from /health 200: "
            f"{t_last_bar - t_health:.2f} s -> {fig['sustained_health']:,.0f} ticks/s)")
        if t_consumed is not None:
            fig["consume_ready"] = args.ticks / (t_consumed - t_ready)
            say(f"  all ticks counted (marketflow_ticks_in_total, polled every 0.1 s) "
                f"{t_consumed - t_ready:.2f} s after ready -> {fig['consume_ready']:,.0f} "
                f"ticks/s")
            if t_first_tick is not None and t_consumed > t_first_tick:
                fig["consume_active"] = args.ticks / (t_consumed - t_first_tick)
                say(f"  first tick counted {t_first_tick - t_ready:+.2f} s from ready; first->"
                    f"last counted {t_consumed - t_first_tick:.2f} s -> "
                    f"{fig['consume_active']:,.0f} ticks/s")
            say(f"  last tick counted -> last bar in DB: {t_last_bar - t_consumed:.2f} s "
                f"(idle close of the final windows + sink flush)")
        cpu_pct = 100 * (cpu_done - cpu_health) / (t_last_bar - t_health)
        fig["cpu_pct"] = f"{cpu_pct:.0f}% of one core (/health -> last bar)"
        say(f"  worker CPU /health->last bar: {cpu_done - cpu_health:.2f} s = {cpu_pct:.0f}% of "
            f"one core")
        if t_consumed is not None and t_first_tick is not None and t_consumed > t_first_tick:
            busy = 100 * (cpu_consumed - cpu_first) / (t_consumed - t_first_tick)
            fig["cpu_pct"] = f"{busy:.0f}% of one core while consuming, " + fig["cpu_pct"]
            say(f"  worker CPU first->last tick counted: {cpu_consumed - cpu_first:.2f} s = "
                f"{busy:.0f}% of one core (user+system)")
        if spy is not None:
            spy.stop()
            say(spy.report())
        late = m.get("marketflow_late_ticks_total", 0)
        dead = sum(v for k, v in m.items() if k.startswith("marketflow_dead_lettered_ticks_total"))
        say(f"  worker counters: ticks_in {m.get('marketflow_ticks_in_total', 0):,.0f}, applied "
            f"{m.get('marketflow_ticks_applied_total', 0):,.0f}, late {late:.0f}, dead-lettered "
            f"{dead:.0f}, duplicates {m.get('marketflow_duplicate_ticks_total', 0):.0f}, bars "
            f"written {m.get('marketflow_bars_written_total', 0):.0f}")

        # -------------------------------------------------------------- 3. correctness
        say("\n[3] correctness (DB bars vs pure WindowAggregator over the same ticks)")
        rows = await db.fetch(BAR_SQL, lo_ms, hi_ms)
        bad = compare(expected, rows)
        fig["correct"] = f"OK ({len(rows)} bars)" if not bad else f"{len(bad)} mismatches"
        say(f"  {'OK' if not bad else 'MISMATCH'}: {len(rows)} bars in DB, {len(expected)} "
            f"expected, {len(bad)} mismatches (all exact: OHLC, volume, quote volume, "
            f"VWAP, trade_count, open/close ts)")
        for line in bad[:10]:
            say(f"    {line}")

        # -------------------------------------------------------------- 4. memory
        say("\n[4] worker memory")
        fig["hwm_thr_mb"] = mem1["VmHWM"] / 1024
        say(f"  after throughput phase: VmHWM {mem1['VmHWM'] / 1024:.1f} MiB, VmRSS "
            f"{mem1['VmRSS'] / 1024:.1f} MiB")

        # -------------------------------------------------------------- 5. latency
        if args.latency_seconds > 0:
            say(f"\n[5] latency ({args.latency_seconds:g} s of live-stamped ticks at "
                f"{args.latency_rate:,}/s in batches every {args.latency_interval_ms} ms, same "
                f"worker)")
            keys = sorted({t.key for t in sample})
            start_ms = now_ms()
            watcher = RedisWatcher(settings.redis.url.get_secret_value(), name, keys, start_ms)
            wtask = asyncio.create_task(watcher.run())
            probe = BrokerProbe(settings, start_ms)
            ptask = asyncio.create_task(probe.run())
            # the minute the first live tick falls in (the pre-produced bars are older)
            bars_probe = BarsProbe(settings, start_ms - start_ms % MINUTE)
            btask = asyncio.create_task(bars_probe.run())
            await probe.ready.wait()
            await bars_probe.ready.wait()
            await asyncio.sleep(0.5)  # subscribed before the first tick
            n_live, n_msgs, first_ts, last_ts, live_bars, achieved = await publish_live(
                settings, sample, args.latency_seconds, args.latency_rate,
                args.latency_interval_ms)
            await asyncio.sleep(2.0)  # let the last batches reach Redis
            watcher.stop()
            probe.stop()
            bars_probe.stop()
            await wtask
            await ptask
            await btask
            say(f"  published {n_live:,} ticks in {n_msgs:,} messages ({achieved:,.0f} ticks/s)")
            s = watcher.samples
            if s:
                fig["redis_lat"] = (pct(s, 50), pct(s, 99), max(s), len(s))
                say(f"  tick -> Redis latest ({watcher.mode}): p50 {pct(s, 50):.1f} ms, p99 "
                    f"{pct(s, 99):.1f} ms, max {max(s):.1f} ms, n={len(s):,} observed changes")
            else:
                say("  tick -> Redis latest: no samples observed")
            q = probe.samples
            if q:
                fig["probe_lat"] = (pct(q, 50), pct(q, 99), max(q), len(q))
                say(f"  broker floor, tick -> plain aiokafka consumer (fetch_max_wait_ms=1500 "
                    f"like Faust's): p50 {pct(q, 50):.1f} ms, p99 {pct(q, 99):.1f} ms, max "
                    f"{max(q):.1f} ms, n={len(q):,} messages")
            # bars the watermark must have closed during the phase (end + grace < last ts)
            margin = 1000
            lo_b = first_ts - first_ts % MINUTE
            want_bars = {(b["exchange"], b["symbol"], b["bucket_start_ms"]): b
                         for b in live_bars
                         if b["bucket_start_ms"] + MINUTE + args.grace_ms + margin <= last_ts}
            got: list[asyncpg.Record] = []
            t_wait = time.monotonic()
            while time.monotonic() - t_wait < 30:
                got = await db.fetch(BAR_SQL, lo_b, last_ts + MINUTE)
                have = {(r["exchange"], r["symbol"], r["b"]) for r in got}
                if set(want_bars) <= have:
                    break
                await asyncio.sleep(0.2)
            got = [r for r in got if (r["exchange"], r["symbol"], r["b"]) in want_bars]
            lat = [r["ins_ms"] - (r["b"] + MINUTE) for r in got]
            bad_live = compare(want_bars, got)
            fig["live_correct"] = "OK" if not bad_live else f"{len(bad_live)} mismatches"
            if lat:
                fig["bar_lat"] = (statistics.median(lat), max(lat), len(lat))
                say(f"  window end -> bar in DB (inserted_at - bucket end; includes the "
                    f"{args.grace_ms} ms grace and the sink's write, at once when idle, "
                    f"{settings.sink.min_flush_gap_s:g} s between batches): p50 "
                    f"{statistics.median(lat):,.0f} ms, max {max(lat):,.0f}"
                    f" ms, n={len(lat)} bars ({len(want_bars)} expected, "
                    f"{len({b[2] for b in want_bars})} minute(s) x "
                    f"{len({b[:2] for b in want_bars})} keys)")
            else:
                say("  window end -> bar in DB: no bar closed by the watermark during the phase "
                    "(use --latency-seconds >= 75)")
            bt = bars_probe.samples
            if bt:
                fig["bar_topic_lat"] = (statistics.median(bt), max(bt), len(bt))
                st = bars_probe.sent
                say(f"  window end -> bar on the closed-bars topic (plain consumer; includes "
                    f"the {args.grace_ms} ms grace): p50 {statistics.median(bt):,.0f} ms, max "
                    f"{max(bt):,.0f} ms, n={len(bt)} bars; of which window end -> the "
                    f"worker's send (record timestamp): p50 {statistics.median(st):,.0f} ms, "
                    f"max {max(st):,.0f} ms")
            say(f"  live bars vs pure aggregator: {fig['live_correct']}")
            for line in bad_live[:10]:
                say(f"    {line}")
            mem2 = worker.memory_kb()
            fig["hwm_all_mb"] = mem2["VmHWM"] / 1024
            say(f"  worker memory after latency phase: VmHWM {mem2['VmHWM'] / 1024:.1f} MiB, "
                f"VmRSS {mem2['VmRSS'] / 1024:.1f} MiB")

        await db.close()
        await http.close()
        cleanup.remove("http")

        # -------------------------------------------------------------- stop worker
        say(f"\nworker stopped ({worker.terminate(15)}) before the baseline, so it runs "
            "uncontended")

        # -------------------------------------------------------------- 6. baseline
        say("\n[6] baseline: plain aiokafka consumer (getmany) + decode_ticks_payload + "
            "parse_ticks + WindowAggregator on a dict")
        say("    (no Faust, no changelog, no closed-bars topic, no TimescaleDB/Redis writes)")
        b_s, b_n, b_bars = await baseline(settings, f"{name}-baseline", last_off, args.ticks,
                                          max(120.0, args.ticks / 500))
        fig["baseline"] = b_n / b_s
        say(f"  {b_n:,} ticks in {b_s:.2f} s -> {fig['baseline']:,.0f} ticks/s; {b_bars} bars "
            f"({'= expected' if b_bars == len(expected) else f'expected {len(expected)}'})")
        say(f"  pipeline/baseline: sustained {fig['sustained'] / fig['baseline']:.3f}" + (
            f", consume {fig['consume_ready'] / fig['baseline']:.3f}" if "consume_ready" in fig
            else ""))

        # -------------------------------------------------------------- 6b. peer
        if args.peer == "quix":
            say("\n[6b] peer: Quix Streams, tumbling 60 s OHLCV + count with the same grace, "
                "over the same messages (bench/peers/quix_ohlcv.py)")
            q = await peer_quix(settings, name, last_off, args.grace_ms,
                                bench.workdir / "quix-state", max(300.0, args.ticks / 200))
            if q["t_last"] is None or q["ticks"] != args.ticks:
                raise RuntimeError(f"quix peer did not process every tick: {q}")
            fig["quix_consumed"] = q["ticks"] / (q["t_last"] - q["t_first"])
            fig["quix_e2e"] = q["ticks"] / (q["t_last"] - q["t_launch"])
            fig["quix_version"] = q["quix_version"]
            say(f"  quixstreams {q['quix_version']}: {q['ticks']:,} ticks, {q['windows']} "
                f"closed windows emitted; first -> last message processed "
                f"{q['t_last'] - q['t_first']:.2f} s -> {fig['quix_consumed']:,.0f} ticks/s; "
                f"launch -> last {q['t_last'] - q['t_launch']:.2f} s -> "
                f"{fig['quix_e2e']:,.0f} ticks/s")
    finally:
        # -------------------------------------------------------------- 7. cleanup
        say("\n[7] cleanup")
        if "http" in cleanup:
            with contextlib.suppress(Exception):
                await http.close()
        await bench.cleanup(args.keep_log)

    # ------------------------------------------------------------------ summary
    rows_out = [
        ("machine", f"{os.cpu_count()} CPUs (nproc), Python {platform.python_version()}"),
        ("ticks pre-produced", f"{args.ticks:,} ({fig['messages']:,} messages, "
                               f"{fig['ticks_per_msg']:.0f} ticks/message mean)"),
        ("partitions", str(args.partitions)),
        ("processing guarantee", settings.app.processing_guarantee),
        ("batching", f"batch_ticks span {args.batch_span_ms} ms, max {args.batch_max} ticks; "
                     f"grace {args.grace_ms} ms; event time compressed {args.time_compress}x"),
        ("worker /health 200 / ready after launch",
         f"{fig['health_s']:.2f} s / {fig['ready_s']:.2f} s"),
        ("sustained (ready -> last bar in DB)", f"{fig['sustained']:,.0f} ticks/s "
                                                f"({fig['e2e_s']:.2f} s; from /health 200: "
                                                f"{fig['sustained_health']:,.0f} ticks/s)"),
    ]
    if "consume_ready" in fig:
        rows_out.append(("consumed (ready -> last tick counted)",
                         f"{fig['consume_ready']:,.0f} ticks/s"))
    if "consume_active" in fig:
        rows_out.append(("consumed (first -> last tick counted)",
                         f"{fig['consume_active']:,.0f} ticks/s"))
    rows_out += [
        ("worker CPU during throughput", fig["cpu_pct"]),
        ("correctness (vs pure aggregator)", fig["correct"]),
        ("worker peak RSS (VmHWM)", f"{fig['hwm_thr_mb']:.1f} MiB after throughput" + (
            f", {fig['hwm_all_mb']:.1f} MiB after latency phase" if "hwm_all_mb" in fig else "")),
    ]
    if "redis_lat" in fig:
        p50, p99, mx, n = fig["redis_lat"]
        rows_out.append(("tick -> Redis latency", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
                                                  f"max {mx:.1f} ms (n={n:,}, "
                                                  f"{args.latency_rate:,} ticks/s)"))
    if "probe_lat" in fig:
        p50, p99, mx, n = fig["probe_lat"]
        rows_out.append(("  broker floor (plain consumer)", f"p50 {p50:.1f} ms, p99 {p99:.1f} "
                                                           f"ms, max {mx:.1f} ms (n={n:,})"))
    if "bar_lat" in fig:
        p50, mx, n = fig["bar_lat"]
        rows_out.append(("window end -> bar in DB", f"p50 {p50:,.0f} ms, max {mx:,.0f} ms "
                                                    f"(n={n}; includes {args.grace_ms} ms grace)"))
    if "bar_topic_lat" in fig:
        p50, mx, n = fig["bar_topic_lat"]
        rows_out.append(("window end -> bar on topic", f"p50 {p50:,.0f} ms, max {mx:,.0f} ms "
                                                       f"(n={n}; includes {args.grace_ms} ms "
                                                       f"grace)"))
    if "live_correct" in fig:
        rows_out.append(("live bars correctness", fig["live_correct"]))
    if "quix_consumed" in fig:
        rows_out.append((f"peer Quix Streams {fig['quix_version']}",
                         f"{fig['quix_consumed']:,.0f} ticks/s consumed (first -> last "
                         f"message), {fig['quix_e2e']:,.0f} ticks/s from launch"))
        if "consume_active" in fig:
            rows_out.append(("marketflow / Quix Streams",
                             f"{fig['consume_active'] / fig['quix_consumed']:.2f}x consumed "
                             f"(first -> last tick), {fig['sustained'] / fig['quix_e2e']:.2f}x "
                             f"end to end (ours: ready -> last bar in DB; Quix: launch -> "
                             f"last message)"))
    if "baseline" in fig:
        rows_out.append(("baseline aiokafka+orjson+aggregator", f"{fig['baseline']:,.0f} ticks/s"))
        rows_out.append(("pipeline / baseline", f"{fig['sustained'] / fig['baseline']:.3f} "
                                                f"sustained" + (
            f", {fig['consume_ready'] / fig['baseline']:.3f} consumed"
            if "consume_ready" in fig else "")))
    w = max(len(k) for k, _ in rows_out)
    say("\nSUMMARY")
    for k, v in rows_out:
        say(f"  {k:<{w}}  {v}")
    ok = fig["correct"].startswith("OK") and fig.get("live_correct", "OK") == "OK"
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=200_000, help="ticks to pre-produce")
    ap.add_argument("--latency-seconds", type=float, default=75,
                    help="length of the live latency phase (0 = skip)")
    ap.add_argument("--latency-rate", type=int, default=5000, help="live ticks per second")
    ap.add_argument("--latency-interval-ms", type=int, default=20, help="live batch interval")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--batch-span-ms", type=int, default=5000)
    ap.add_argument("--batch-max", type=int, default=2000)
    ap.add_argument("--time-compress", type=int, default=1, metavar="N",
                    help="pre-produced sample's event times N times closer (a busier market: "
                         "N times the ticks per message)")
    ap.add_argument("--grace-ms", type=int, default=10_000)
    ap.add_argument("--guarantee", default="at_least_once",
                    choices=["at_least_once", "exactly_once"],
                    help="the worker's app.processing_guarantee (exactly_once: Kafka "
                         "transactions), passed as MARKETFLOW_APP__PROCESSING_GUARANTEE")
    ap.add_argument("--keep-log", action="store_true", help="keep the worker log in /tmp")
    ap.add_argument("--peer", choices=["none", "quix"], default="none",
                    help="also run a peer over the same messages: quix = Quix Streams "
                         "(bench/peers/, its own virtualenv var/peers-venv)")
    ap.add_argument("--worker-loglevel", default="warn",
                    choices=["crit", "error", "warn", "info", "debug"])
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy record the worker while it consumes the pre-produced ticks "
                         "(collapsed stacks to FILE; prints the top functions)")
    args = ap.parse_args()
    if args.ticks < 1:
        ap.error("--ticks must be >= 1")
    if args.batch_span_ms >= args.grace_ms:
        ap.error("--batch-span-ms must be below --grace-ms (else ticks arrive late)")
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
