"""Harness shared by the integration tests and the benchmarks.

One place for what both need to run real ``faust -A app worker`` processes against the
shared local services (Apache Kafka, TimescaleDB, Redis, started by
``scripts/services.sh up``) without touching anybody else's data:

* :class:`Worker`: a worker subprocess with its log in a file, readiness waits, resource
  figures, SIGTERM / SIGKILL.
* :func:`free_port`, :func:`free_port_run`: free TCP ports on 127.0.0.1.
* :class:`Isolation`: the names of one isolated run (Faust app id, topic prefix, Redis key
  prefix, database, web port), the ``MARKETFLOW_*`` environment that applies them, the
  database's creation and the cleanup of everything the run left.
* :func:`delete_topics`, :func:`delete_redis_keys`, :func:`create_database`,
  :func:`drop_database`, :func:`sql_exec`, :func:`dsn_with_db`: the single steps.

It imports no product code, so it keeps working while the product's packages move. The
benchmarks (``python bench/<script>.py``) put the repository root on ``sys.path`` to
import it as ``tests.support.harness``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse, urlunparse

import aiohttp
import asyncpg
import psutil
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code

__all__ = [
    "READY_MARKERS",
    "REPO",
    "Isolation",
    "Worker",
    "WorkerError",
    "create_database",
    "delete_redis_keys",
    "delete_topics",
    "drop_database",
    "dsn_with_db",
    "free_port",
    "free_port_run",
    "sql_exec",
]

REPO = Path(__file__).resolve().parents[2]
"""The repository root: the workers' working directory (``marketflow.toml`` is read there)."""

READY_MARKERS = (b" OK ^", b"Worker]: Ready")
"""Faust's ready report in a worker log: the spinner's ``OK ^`` (log level ``warn`` and
above, output not a terminal) or the ``[^Worker]: Ready`` log line (``info`` and below)."""


# ----------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port number (the OS's choice for a bind to port 0).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports on 127.0.0.1.

    Args:
        count: how many consecutive ports are needed (1 or more).

    Returns:
        The first port of the run.

    Raises:
        AssertionError: no such run found in 100 attempts.
    """
    for _ in range(100):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            for i in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        return base
    raise AssertionError(f"no run of {count} free ports")


# ----------------------------------------------------------------------------- services


def dsn_with_db(dsn: str, db: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) naming database ``db`` instead of its own.

    Args:
        dsn: the server's DSN; user, password, host, port and query are kept.
        db: the database name.

    Returns:
        The new DSN.
    """
    return urlunparse(urlparse(dsn)._replace(path="/" + db))


async def sql_exec(dsn: str, sql: str) -> None:
    """Run one SQL statement on a connection of its own (e.g. ``CREATE DATABASE``).

    Args:
        dsn: where to connect.
        sql: the statement.

    Raises:
        asyncpg.PostgresError: the server refused the statement.
        OSError: the server is not reachable.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(admin_dsn: str, dbname: str) -> None:
    """``CREATE DATABASE "<dbname>"`` on the server of ``admin_dsn``.

    Args:
        admin_dsn: a DSN of the server with the right to create databases.
        dbname: the new database (it must not exist).
    """
    await sql_exec(admin_dsn, f'CREATE DATABASE "{dbname}"')


async def drop_database(admin_dsn: str, dbname: str) -> None:
    """``DROP DATABASE IF EXISTS "<dbname>" WITH (FORCE)`` (ends its open connections).

    Args:
        admin_dsn: a DSN of the server, not of ``dbname``.
        dbname: the database to drop.
    """
    await sql_exec(admin_dsn, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


async def delete_redis_keys(url: str, prefix: str, batch_size: int = 1000) -> int:
    """Delete every Redis key ``<prefix>:*``.

    Args:
        url: the Redis URL.
        prefix: the run's key prefix (without the trailing ``:``).
        batch_size: keys per ``SCAN`` step and per ``DEL``.

    Returns:
        How many keys were deleted.
    """
    r = aioredis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{prefix}:*", count=batch_size):
            batch.append(key)
            if len(batch) >= batch_size:
                deleted += await r.delete(*batch)
                batch.clear()
        if batch:
            deleted += await r.delete(*batch)
    finally:
        await r.aclose()
    return deleted


async def delete_topics(bootstrap_servers: str | Sequence[str], prefix: str,
                        security: Mapping[str, Any] | None = None) -> str:
    """Delete every topic whose name starts with ``prefix`` (the run's topics and Faust's
    changelog / assignor topics).

    Args:
        bootstrap_servers: the broker(s), ``host:port``.
        prefix: the run's topic prefix.
        security: aiokafka security keywords (``core.kafka_security.client_security``).

    Returns:
        What was done: ``"no topics"`` or ``"deleted <n> topics"``.

    Raises:
        aiokafka.errors.KafkaError: the broker refused to delete a topic (the error of the
            first refused one; the message lists all of them).
    """
    servers = bootstrap_servers if isinstance(bootstrap_servers, str) else list(
        bootstrap_servers)
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, **(security or {}))
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        if not names:
            return "no topics"
        resp = await admin.delete_topics(names)
        failed = [(err[0], err[1]) for err in getattr(resp, "topic_error_codes", ())
                  if err[1] != 0]
        if failed:
            raise for_code(failed[0][1])(
                f"{len(failed)}/{len(names)} topics not deleted: "
                + ", ".join(f"{name} ({for_code(code).__name__})" for name, code in failed))
        return f"deleted {len(names)} topics"
    finally:
        await admin.close()


# ----------------------------------------------------------------------------- isolation


@dataclass
class Isolation:
    """The names of one isolated run on the shared services, and its cleanup.

    ``name`` is the Faust app id (so the consumer group and the changelog topics), the
    prefix of every topic and the Redis key prefix; ``dbname`` is a database of the run's
    own on the server of ``admin_dsn``; ``web_port`` a free port for the worker's web
    server.

    Attributes:
        name: app id, topic prefix and Redis key prefix.
        dbname: the run's database.
        admin_dsn: DSN of the database server (a database other than ``dbname``).
        web_port: the worker's HTTP port (``MARKETFLOW_WEB__PORT``).
        db_created: whether :meth:`create_database` succeeded (then :meth:`cleanup` drops
            the database).
    """

    name: str
    dbname: str
    admin_dsn: str
    web_port: int = field(default_factory=free_port)
    db_created: bool = False

    @classmethod
    def new(cls, prefix: str, admin_dsn: str, *, db_prefix: str | None = None,
            token: str | None = None) -> Isolation:
        """Fresh random names: ``<prefix><token>`` and database ``<db_prefix><token>``.

        Args:
            prefix: start of ``name`` (e.g. ``"bench-"``).
            admin_dsn: DSN of the database server.
            db_prefix: start of ``dbname``; ``None``: the same as ``prefix``.
            token: the random part; ``None``: 10 random hex digits.

        Returns:
            The isolation (its database not created yet).
        """
        token = secrets.token_hex(5) if token is None else token
        db_prefix = prefix if db_prefix is None else db_prefix
        return cls(f"{prefix}{token}", f"{db_prefix}{token}", admin_dsn)

    @property
    def dsn(self) -> str:
        """DSN of the run's database (``MARKETFLOW_DATABASE__DSN``)."""
        return dsn_with_db(self.admin_dsn, self.dbname)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<web_port>``."""
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, topics: Mapping[str, str], *, partitions: int,
            replication: int | None = None, datadir: Path | None = None) -> dict[str, str]:
        """The ``MARKETFLOW_*`` environment overrides that apply the isolation.

        Args:
            topics: environment variable -> topic name suffix; each variable is set to
                ``<name>-<suffix>`` (e.g. ``{"MARKETFLOW_TOPICS__TICKS": "ticks"}``).
            partitions: ``MARKETFLOW_TOPICS__PARTITIONS``.
            replication: ``MARKETFLOW_TOPICS__REPLICATION``; ``None``: not set.
            datadir: ``MARKETFLOW_APP__DATADIR`` (Faust's data directory); ``None``: not
                set (e.g. one per worker instead).

        Returns:
            Variable -> value: app id, Redis key prefix, database DSN, web port, topics.
        """
        env = {
            "MARKETFLOW_APP__ID": self.name,
            "MARKETFLOW_REDIS__KEY_PREFIX": self.name,
            "MARKETFLOW_DATABASE__DSN": self.dsn,
            "MARKETFLOW_WEB__PORT": str(self.web_port),
            "MARKETFLOW_TOPICS__PARTITIONS": str(partitions),
        }
        env.update({var: f"{self.name}-{suffix}" for var, suffix in topics.items()})
        if replication is not None:
            env["MARKETFLOW_TOPICS__REPLICATION"] = str(replication)
        if datadir is not None:
            env["MARKETFLOW_APP__DATADIR"] = str(datadir)
        return env

    async def create_database(self) -> None:
        """Create the run's database (the worker migrates it when it starts)."""
        await create_database(self.admin_dsn, self.dbname)
        self.db_created = True

    async def cleanup(self, redis_url: str,
                      bootstrap_servers: str | Sequence[str] | None = None,
                      report: Callable[[str], object] | None = None,
                      security: Mapping[str, Any] | None = None) -> None:
        """Remove what the run left on the services; every step is tried.

        Drops the database (if :meth:`create_database` succeeded), deletes the Redis keys
        ``<name>:*`` and, with ``bootstrap_servers``, the topics ``<name>*``. Stop the
        run's workers first.

        Args:
            redis_url: the Redis the run used.
            bootstrap_servers: the broker, to delete the run's topics; ``None``: topics
                are kept.
            report: called with one line per step (what was done, or why it failed);
                then failures are only reported. ``None``: failures are raised.
            security: aiokafka security keywords for the topic deletion.

        Raises:
            Exception: with ``report=None``, the failure of a step (an ``ExceptionGroup``
                when more than one failed), after all steps were tried.
        """
        errors: list[Exception] = []

        def note(line: str) -> None:
            if report is not None:
                report(line)

        if self.db_created:
            try:
                await drop_database(self.admin_dsn, self.dbname)
                self.db_created = False
                note(f"database {self.dbname} dropped")
            except Exception as exc:  # noqa: BLE001  (reported or raised below)
                errors.append(exc)
                note(f"could not drop database {self.dbname}: {exc}")
        try:
            n = await delete_redis_keys(redis_url, self.name)
            note(f"redis: {n} keys {self.name}:* deleted")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            note(f"redis cleanup failed: {exc}")
        if bootstrap_servers is not None:
            try:
                note(f"broker: {await delete_topics(bootstrap_servers, self.name, security)}")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                note(f"broker: topic deletion failed ({type(exc).__name__}: {exc})")
        if errors and report is None:
            if len(errors) == 1:
                raise errors[0]
            raise ExceptionGroup(f"cleanup of {self.name} failed", errors)


# ----------------------------------------------------------------------------- worker


class WorkerError(AssertionError):
    """A worker exited unexpectedly or did not become healthy / ready in time.

    An ``AssertionError``, so that in a test it reads as a failed check; the message ends
    with the tail of the worker's log.
    """


class Worker:
    """One ``faust -A app worker`` subprocess with its output in a log file.

    Its environment is ``os.environ`` at :meth:`start` overlaid with ``env`` (read at
    :meth:`start`, so a live mapping such as a ``ChainMap`` picks up later changes).

    Args:
        env: environment overrides (e.g. from :meth:`Isolation.env`).
        log_path: the log file (stdout and stderr; appended to).
        web_port: the worker's HTTP port, for :attr:`base_url` and the HTTP waits.
        loglevel: Faust's ``-l`` (``crit``, ``error``, ``warn``, ``info``, ``debug``).
        command: how to run faust (``-A app worker -l <loglevel>`` follows).
        new_session: start it in a session of its own (a terminal's Ctrl-C does not
            reach it).
        tail_lines: log lines quoted in :class:`WorkerError` messages.

    Attributes:
        proc: the subprocess (``None`` before :meth:`start`).
        ended_on_purpose: set by :meth:`terminate` and :meth:`kill` (also settable by the
            caller): then an exit is no error for :meth:`check_alive`.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, *, web_port: int | None = None,
                 loglevel: str = "info",
                 command: Sequence[str] = (sys.executable, "-m", "faust"),
                 new_session: bool = True, tail_lines: int = 60) -> None:
        self.env = env
        self.log_path = log_path
        self.web_port = web_port
        self.loglevel = loglevel
        self.command = tuple(command)
        self.new_session = new_session
        self.tail_lines = tail_lines
        self.proc: subprocess.Popen[bytes] | None = None
        self.ended_on_purpose = False
        self._ps: psutil.Process | None = None
        self._log: IO[bytes] | None = None

    # -------------------------------------------------------------- process

    def start(self) -> Worker:
        """Launch the worker (returns at once; see :meth:`until_ready`).

        Returns:
            ``self``.
        """
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command, "-A", "app", "worker", "-l", self.loglevel],
            cwd=REPO, env={**os.environ, **self.env}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=self.new_session)
        self._ps = None
        return self

    @property
    def pid(self) -> int:
        """The worker's pid (started workers only)."""
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code; ``None`` while it runs or before :meth:`start`."""
        return None if self.proc is None else self.proc.poll()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<web_port>``."""
        assert self.web_port is not None, "worker without web_port"
        return f"http://127.0.0.1:{self.web_port}"

    def check_alive(self) -> None:
        """Raise unless the worker runs or was ended on purpose.

        Raises:
            WorkerError: it exited (message: exit code and log tail).
        """
        assert self.proc is not None, "worker not started"
        if self.proc.poll() is not None and not self.ended_on_purpose:
            raise WorkerError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 30) -> str:
        """SIGTERM and wait; SIGKILL if it is still running after ``timeout_s``.

        Args:
            timeout_s: how long a graceful stop may take.

        Returns:
            How it ended: ``"not running"``, ``"SIGTERM, exit <code>"`` or
            ``"SIGKILL after <timeout_s> s"``.
        """
        self.ended_on_purpose = True
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return "not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            how = f"SIGTERM, exit {self.proc.returncode}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            how = f"SIGKILL after {timeout_s:g} s"
        self._close_log()
        return how

    def kill(self) -> None:
        """SIGKILL the worker and wait (up to 10 s) until it is gone."""
        assert self.proc is not None, "worker not started"
        self.ended_on_purpose = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -------------------------------------------------------------- log

    def log_tail(self, lines: int | None = None) -> str:
        """The last lines of the log (``""`` if it cannot be read).

        Args:
            lines: how many; ``None``: ``tail_lines``.
        """
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-(self.tail_lines if lines is None else lines):])

    def ready_in_log(self) -> bool:
        """Whether Faust's ready report (:data:`READY_MARKERS`) is in the log."""
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return False
        return any(marker in text for marker in READY_MARKERS)

    # -------------------------------------------------------------- waits

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout_s: float,
                           poll_s: float = 0.05) -> float:
        """Poll ``GET /health`` until it answers 200.

        Args:
            http: the session to poll with.
            timeout_s: how long to wait.
            poll_s: pause between attempts.

        Returns:
            ``time.monotonic()`` of the first 200.

        Raises:
            WorkerError: the worker exited, or no 200 within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                async with http.get(self.base_url + "/health",
                                    timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 200:
                        return time.monotonic()
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(poll_s)
        raise WorkerError(f"worker not healthy after {timeout_s}s:\n{self.log_tail()}")

    async def until_ready(self, timeout_s: float = 60, *,
                          http: aiohttp.ClientSession | None = None,
                          poll_s: float = 0.25) -> None:
        """Wait for Faust's ready report in the log (after the group join and table
        recovery); with ``http``, first for ``GET /health`` 200 (:meth:`wait_healthy`).

        Args:
            timeout_s: how long to wait for both together.
            http: a session to poll ``/health`` with; ``None``: the log only.
            poll_s: pause between looks at the log.

        Raises:
            WorkerError: the worker exited, or was not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        if http is not None:
            await self.wait_healthy(http, timeout_s)
        while time.monotonic() < deadline:
            self.check_alive()
            if self.ready_in_log():
                return
            await asyncio.sleep(poll_s)
        raise WorkerError(f"worker not ready after {timeout_s}s:\n{self.log_tail()}")

    # -------------------------------------------------------------- figures

    async def metrics(self, http: aiohttp.ClientSession,
                      timeout_s: float = 3) -> dict[str, float]:
        """The ``marketflow_*`` samples of ``GET /metrics``.

        Args:
            http: the session to ask with.
            timeout_s: total timeout of the request.

        Returns:
            Sample (name with labels) -> value.
        """
        async with http.get(self.base_url + "/metrics",
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("marketflow_"):
                name, _, val = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(val)
        return out

    def memory_kb(self) -> dict[str, int]:
        """``VmHWM`` (peak RSS) and ``VmRSS`` in kB, from ``/proc/<pid>/status``."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
        return out

    def cpu_s(self) -> float:
        """CPU time (user + system) the worker used so far, in seconds."""
        if self._ps is None:
            self._ps = psutil.Process(self.pid)
        t = self._ps.cpu_times()
        return float(t.user + t.system)
