"""Integration harness: real Apache Kafka broker, TimescaleDB and Redis (started by
``scripts/services.sh up``), real ``faust -A app worker`` subprocesses.

Each test gets its own topics, Faust app id, Redis key prefix, database and web port, so
tests never see each other's data on the shared services. The worker process, the free
ports, the isolation and its cleanup are ``tests/support/harness.py``, shared with the
benchmarks; this file adapts them to the tests (fixtures, :class:`Stack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import signal
import socket
import sys
import time
from collections import ChainMap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.config import Settings, load_settings
from core.kafka_security import client_security
from tests.support import harness
from tests.support.harness import REPO, Isolation
from tests.support.harness import free_port as _free_port
from tests.support.harness import free_port_run as _free_port_run

SAMPLE = REPO / "data" / "sample"
BASE_DSN = os.environ.get(
    "MF_TEST_PG_DSN", "postgresql://marketflow:marketflow@127.0.0.1:15432/marketflow")

pytestmark = pytest.mark.integration


def _settings_with(env: dict[str, str]) -> Settings:
    old = dict(os.environ)
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(old)


@dataclass
class Stack:
    """One isolated deployment on the shared services."""

    name: str
    env: dict[str, str]
    settings: Settings
    dsn: str
    tmp: Path
    workers: list[Worker] = field(default_factory=list)
    emus: list[Emulator] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web.port}"

    async def emulators(self, n: int, *args: str) -> list[Emulator]:
        """Start ``n`` exchange emulators ``exchange1..n`` and point the feeds at them."""
        emus = [await Emulator(f"exchange{i + 1}", _free_port(), *args,
                               log=self.tmp / f"emulator{len(self.emus) + i + 1}.log").start()
                for i in range(n)]
        self.emus += emus
        self.env["MARKETFLOW_FEEDS__EXCHANGES"] = orjson.dumps(
            [{"name": e.name, "host": "127.0.0.1", "port": e.port} for e in emus]).decode()
        return emus

    async def post(self, path: str, port: int | None = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{port or self.settings.web.port}{path}"
        async with aiohttp.ClientSession() as s, s.post(url) as r:
            return r.status, orjson.loads(await r.read())

    def worker(self, **extra_env: str) -> Worker:
        w = Worker(self, len(self.workers), extra_env)
        self.workers.append(w)
        return w

    async def replay_cli(self, *args: str, timeout: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "faust", "-A", "app", "replay", *args, cwd=REPO,
            env={**os.environ, **self.env}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    async def produce_raw(self, items: list[tuple[bytes | None, bytes]],
                          topic: str | None = None) -> None:
        """Send ``(key, value)`` records to ``topic`` (default: the ticks topic)."""
        prod = AIOKafkaProducer(bootstrap_servers=self.settings.broker.bootstrap_servers,
                                **client_security(self.settings.broker))
        await prod.start()
        try:
            for key, value in items:
                await prod.send_and_wait(topic or self.settings.topics.ticks, value=value,
                                         key=key)
        finally:
            await prod.stop()

    async def partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic`` as the broker describes them (none if it is absent)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.broker.bootstrap_servers,
                                    **client_security(self.settings.broker))
        await admin.start()
        try:
            meta = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return [TopicPartition(topic, p["partition"])
                for t in meta if t["topic"] == topic and not t["error_code"]
                for p in sorted(t["partitions"], key=lambda p: p["partition"])]

    async def read_topic(self, topic: str, idle_s: float = 2.0,
                         committed: bool = False) -> list[tuple[bytes, bytes]]:
        """Every message in ``topic`` produced before this call: a partition is done once
        it returns a record stamped after the call, or nothing for ``idle_s``. With
        ``committed``, only records of committed transactions (``read_committed``)."""
        start_ms = int(time.time() * 1000)
        cons = AIOKafkaConsumer(bootstrap_servers=self.settings.broker.bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed" if committed
                                else "read_uncommitted",
                                **client_security(self.settings.broker))
        await cons.start()
        try:
            tps = await self.partitions(topic)
            cons.assign(tps)
            await cons.seek_to_beginning(*tps)
            out: list[tuple[bytes, bytes]] = []
            pending = set(tps)
            while pending:
                got = await cons.getmany(*pending, timeout_ms=int(idle_s * 1000),
                                         max_records=10_000)
                if not got:
                    return out
                for tp, recs in got.items():
                    for r in recs:
                        if r.timestamp > start_ms:
                            pending.discard(tp)
                            break
                        out.append((r.key, r.value))
            return out
        finally:
            await cons.stop()

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    async def bars(self, exchange: str, symbol: str) -> dict[int, asyncpg.Record]:
        conn = await self.db()
        try:
            rows = await conn.fetch(
                "SELECT *, (extract(epoch from bucket_start) * 1000)::bigint AS start_ms "
                "FROM bars_1m WHERE exchange = $1 AND symbol = $2 ORDER BY bucket_start",
                exchange, symbol)
        finally:
            await conn.close()
        return {r["start_ms"]: r for r in rows}

    async def wait_for_bars(self, exchange: str, symbol: str, starts: set[int],
                            timeout: float = 90) -> dict[int, asyncpg.Record]:
        deadline = time.monotonic() + timeout
        got: dict[int, asyncpg.Record] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                got = await self.bars(exchange, symbol)
            if starts <= set(got):
                return got
            for w in self.workers:
                w.assert_alive()
            await asyncio.sleep(0.5)
        raise AssertionError(f"bars missing after {timeout}s: {sorted(starts - set(got))}")

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.settings.redis.url.get_secret_value(),
                                       decode_responses=True)

    async def http(self, path: str, port: int | None = None,
                   token: str | None = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{port or self.settings.web.port}{path}"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
            body = await r.read()
            try:
                return r.status, orjson.loads(body)
            except orjson.JSONDecodeError:
                return r.status, body.decode(errors="replace")


class Emulator:
    """A ``python -m feeds.emulator`` subprocess (a marketflow exchange program)."""

    def __init__(self, name: str, port: int, *args: str, log: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.args = args
        self.log = log  # its stderr (logging), appended; None: discarded
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Emulator:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feeds.emulator", "--name", self.name, "--port",
            str(self.port), *self.args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=self.log.open("ab") if self.log else asyncio.subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert b"listening" in line, line
        return self

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await asyncio.wait_for(self.proc.wait(), 10)


class Worker(harness.Worker):
    """A ``faust -A app worker`` subprocess of a stack (:class:`harness.Worker` at log
    level info, log ``worker<index>.log``, data dir ``faust<index>`` in the stack's tmp;
    environment ``stack.env`` as of :meth:`start`, overlaid with ``extra_env``)."""

    def __init__(self, stack: Stack, index: int, extra_env: dict[str, str]) -> None:
        self.stack = stack
        self.extra_env = {**extra_env,
                          "MARKETFLOW_APP__DATADIR": str(stack.tmp / f"faust{index}")}
        super().__init__(ChainMap(self.extra_env, stack.env),
                         stack.tmp / f"worker{index}.log", web_port=None)

    def tail(self, n: int = 60) -> str:
        return self.log_tail(n)

    def assert_alive(self) -> None:
        self.check_alive()

    async def wait_ready(self, timeout: float = 60) -> None:
        await self.until_ready(timeout)

    async def wait_exit(self, timeout: float = 60) -> int | None:
        """Wait for a worker expected to stop by itself (a configuration error); its
        exit code, None if it still runs after ``timeout`` s."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.ended_on_purpose = True
        return self.proc.returncode

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (SIGKILL after ``timeout`` s); the exit code."""
        assert self.proc is not None
        self.terminate(timeout)
        return int(self.proc.returncode)


class PrivateKafka:
    """Apache Kafka node(s) of our own for broker-fault tests, started by
    ``scripts/services.sh`` (the same installation and settings as the shared broker) with
    a state directory under ``tmp`` and free ports; the shared broker is never touched.

    Args:
        tmp: state directory (log dirs, pid files, logs).
        nodes: 1 (single KRaft node) or 3 (a cluster: replication 3, min ISR 2).
        sasl_password: with a password (single node only), ``MF_KAFKA_SASL=1``: a
            SASL_SSL listener on :attr:`sasl_port` (user ``marketflow`` with this
            password) and an SSL listener requiring client certificates on
            :attr:`ssl_port`, certificates of a CA in ``tmp/tls``.
    """

    def __init__(self, tmp: Path, nodes: int = 1, sasl_password: str | None = None) -> None:
        self.tmp = tmp
        self.nodes = nodes
        self.port = _free_port_run(nodes)
        self.env = {**os.environ, "MF_VAR_DIR": str(tmp), "MF_BROKER_PORT": str(self.port),
                    "MF_CONTROLLER_PORT": str(_free_port_run(nodes)),
                    "MF_KAFKA_NODES": str(nodes), "MF_KAFKA_HEAP": "512m",
                    "MF_CACHE_DIR": os.environ.get("MF_CACHE_DIR", str(REPO / "var" / "cache"))}
        self.sasl_port = self.ssl_port = 0
        if sasl_password is not None:
            self.sasl_port = _free_port_run(2)
            self.ssl_port = self.sasl_port + 1
            self.env.update(MF_KAFKA_SASL="1", MF_KAFKA_SASL_PASSWORD=sasl_password,
                            MF_KAFKA_SASL_PORT=str(self.sasl_port),
                            MF_KAFKA_SSL_PORT=str(self.ssl_port))
        self.tls_dir = tmp / "tls"

    @property
    def url(self) -> str:
        """``kafka://`` URL listing every node."""
        return "kafka://" + ";".join(f"127.0.0.1:{self.port + i}" for i in range(self.nodes))

    async def _services(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "services.sh"), *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    async def up(self) -> str:
        """Start every node that is not running (idempotent); their output."""
        return await self._services("up", "broker")

    async def down(self) -> str:
        """Stop every node (SIGTERM: controlled shutdown)."""
        return await self._services("down", "broker")

    def pid(self, node: int = 1) -> int:
        """Pid of node ``node`` (the pid files ``scripts/services.sh`` writes)."""
        tag = "" if self.nodes == 1 else "-cluster"
        return int((self.tmp / "run" / f"kafka{tag}-{node}.pid").read_text().split()[0])

    def kill_all(self) -> None:
        """SIGKILL every node still running (teardown: the data is thrown away)."""
        for node in range(1, self.nodes + 1):
            with contextlib.suppress(OSError, ValueError, AssertionError):
                self.kill(node)

    def kill(self, node: int = 1) -> None:
        """SIGKILL node ``node`` (1-based) and wait until it is gone."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise AssertionError(f"kafka node {node} (pid {pid}) survived SIGKILL")


@pytest.fixture
async def private_kafka(tmp_path: Path) -> AsyncIterator[PrivateKafka]:
    """A single-node Kafka of the test's own (see :class:`PrivateKafka`)."""
    k = PrivateKafka(tmp_path / "kafka")
    await k.up()
    try:
        yield k
    finally:
        k.kill_all()


@pytest.fixture
async def kafka_cluster(tmp_path: Path) -> AsyncIterator[PrivateKafka]:
    """A 3-node Kafka cluster of the test's own (see :class:`PrivateKafka`)."""
    k = PrivateKafka(tmp_path / "kafka3", nodes=3)
    await k.up()
    try:
        yield k
    finally:
        k.kill_all()


def _check_services() -> None:
    s = load_settings()
    redis_url = s.redis.url.get_secret_value()
    for name, host, port in [("broker", *s.broker.bootstrap_servers[0].rsplit(":", 1)),
                             ("redis", "127.0.0.1", redis_url.rsplit(":", 1)[1].split("/")[0]),
                             ("postgres", "127.0.0.1", BASE_DSN.rsplit(":", 1)[1].split("/")[0])]:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError as exc:
            pytest.fail(f"{name} not reachable on {host}:{port} ({exc}); "
                        "start the services with scripts/services.sh up")


@pytest.fixture(scope="session")
def services() -> None:
    _check_services()


TOPICS = {  # environment variable -> topic name suffix (the topics are <name>-<suffix>)
    "MARKETFLOW_TOPICS__TICKS": "ticks",
    "MARKETFLOW_TOPICS__BARS": "bars",
    "MARKETFLOW_TOPICS__DEAD_LETTER": "dlq",
    "MARKETFLOW_TOPICS__HISTORY_REQUESTS": "history",
    "MARKETFLOW_HISTORY__TOPIC_PREFIX": "backfill",
}


@pytest.fixture
async def stack(services: None, tmp_path: Path) -> AsyncIterator[Stack]:
    iso = Isolation.new("it", BASE_DSN)
    await iso.create_database()
    env = {
        **iso.env(TOPICS, partitions=2),
        "MARKETFLOW_WINDOW__GRACE_MS": "5000",
        "MARKETFLOW_WINDOW__IDLE_TIMEOUT_S": "2",
        "MARKETFLOW_WINDOW__IDLE_CHECK_INTERVAL_S": "0.5",
        "MARKETFLOW_SINK__FLUSH_INTERVAL_S": "0.5",
        "MARKETFLOW_FEEDS__IDLE_TIMEOUT_S": "3",
        "MARKETFLOW_FEEDS__BACKOFF_INITIAL_S": "0.2",
        "MARKETFLOW_FEEDS__BACKOFF_MAX_S": "1",
        "MARKETFLOW_LOG__FORMAT": "json",
    }
    st = Stack(iso.name, env, _settings_with(env), iso.dsn, tmp_path)
    try:
        yield st
    finally:
        for w in st.workers:
            if w.proc is not None:
                w.stop(timeout=20)
        for e in st.emus:
            await e.stop()
        # the Redis of st.settings: a test may have pointed the stack at another one
        await iso.cleanup(st.settings.redis.url.get_secret_value())


async def until(pred: Any, timeout: float, what: str, step: float = 0.25) -> Any:
    """Poll ``await pred()`` every ``step`` s until it is truthy (returned) or ``timeout``
    s passed (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await pred()
        if got:
            return got
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def load_klines(name: str) -> dict[int, dict[str, Any]]:
    """1m klines by open time (ms): Binance's columns (``open_time`` ms, ``quote_volume``)
    or Kraken's OHLC (``open_time_s``, no quote volume). Prices as floats, ``volume`` and
    ``quote_volume`` as the exchange's exact decimals (``Decimal``; None when absent)."""
    with (SAMPLE / "klines" / name).open() as fh:
        out = {}
        for r in csv.DictReader(fh):
            start = int(r["open_time"]) if "open_time" in r else int(r["open_time_s"]) * 1000
            qv = r.get("quote_volume")
            out[start] = {"open": float(r["open"]), "high": float(r["high"]),
                          "low": float(r["low"]), "close": float(r["close"]),
                          "volume": Decimal(r["volume"]),
                          "quote_volume": None if qv is None else Decimal(qv),
                          "count": int(r["count"])}
        return out


def complete_minutes(trades_file: str, klines: dict[int, dict[str, Any]]
                     ) -> tuple[set[int], list[dict[str, str]]]:
    """Minutes the trades file covers completely: those whose number of trades in the file
    equals the exchange kline's trade count (the file's partial first/last minutes fail)."""
    with (SAMPLE / "trades" / trades_file).open() as fh:
        rows = list(csv.DictReader(fh))
    per_minute: dict[int, int] = {}
    for r in rows:
        m = int(r["ts_ms"]) // 60_000 * 60_000
        per_minute[m] = per_minute.get(m, 0) + 1
    return {m for m, n in per_minute.items() if m in klines and klines[m]["count"] == n}, rows


def assert_bars_equal_klines(bars: dict[int, Any], klines: dict[int, dict[str, Any]],
                             minutes: set[int]) -> None:
    """Every minute of ``minutes`` in ``bars`` (database rows, or served bars whose
    decimals are strings) equals the exchange's kline: prices and count exactly, volume
    and (where the kline has it) quote volume to the last decimal."""
    assert minutes, "no complete minute to compare"
    for m in sorted(minutes):
        b, k = bars[m], klines[m]
        got = (b["open"], b["high"], b["low"], b["close"], b["trade_count"])
        want = (k["open"], k["high"], k["low"], k["close"], k["count"])
        assert got == want, f"minute {m}: bar {got} != kline {want}"
        assert Decimal(str(b["volume"])) == k["volume"], (m, b["volume"], k)
        if k["quote_volume"] is not None:
            assert Decimal(str(b["quote_volume"])) == k["quote_volume"], (
                m, b["quote_volume"], k)


@pytest.fixture
def sample() -> Iterator[Path]:
    yield SAMPLE
