"""A throw-away PostgreSQL 15 + TimescaleDB cluster of a test's own (:class:`PrivatePostgres`),
for database-fault tests that must not touch the shared cluster of ``scripts/services.sh``.

It is set up the way ``scripts/services.sh`` sets up the shared one (see its ``postgres``
functions): the binaries of ``/usr/lib/postgresql/15/bin``, ``initdb`` run as the
``postgres`` system user through ``runuser -u postgres --`` (initdb refuses root), the
directories made reachable for ``postgres``, ``shared_preload_libraries = 'timescaledb'``,
trust on the unix socket and scram-sha-256 on TCP, listening on 127.0.0.1 only; here on a
free port, with everything (data, socket, log) in a temporary directory that
:meth:`PrivatePostgres.stop` deletes.

The server itself is started as a direct child of the test process (``postgres -D``, with
the ``postgres`` user's uid/gid) instead of through ``pg_ctl start``: ``pg_ctl`` leaves the
postmaster orphaned, and a postmaster SIGKILLed by :meth:`PrivatePostgres.kill` would then
stay a zombie unless the machine's PID 1 reaps it, and a zombie's pid in ``postmaster.pid``
makes the restart refuse to start ("lock file already exists"). As our child it is reaped
by us, so :meth:`PrivatePostgres.restart` works after a kill on any machine.

Faults:

* :meth:`PrivatePostgres.pause`: SIGSTOP the postmaster and every backend / auxiliary
  process, so the port still accepts TCP connections (the kernel completes the handshake)
  but nothing answers, and queries on existing connections hang: a hung database.
* :meth:`PrivatePostgres.resume`: SIGCONT them all.
* :meth:`PrivatePostgres.kill`: SIGKILL them all; the port refuses connections.
* :meth:`PrivatePostgres.restart`: start again on the same port and data directory after a
  kill (PostgreSQL runs crash recovery; committed rows survive).

Usage::

    pg = PrivatePostgres()
    try:
        await pg.start()          # initdb, server, role and database: pg.dsn
        pg.pause(); pg.resume()
        pg.kill(); await pg.restart()
    finally:
        pg.stop()                 # always: stops the server, deletes the directory

Must run as root (like ``scripts/services.sh``): it starts processes as ``postgres``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import asyncpg
import psutil

from tests.support.harness import free_port

__all__ = ["PGBIN", "PrivatePostgres", "PrivatePostgresError"]

PG_MAJOR = 15
#: the PostgreSQL binaries (``$PGBIN`` of ``scripts/services.sh``)
PGBIN = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
_SHAREDIR = Path(f"/usr/share/postgresql/{PG_MAJOR}")
_SYSTEM_USER = "postgres"


class PrivatePostgresError(AssertionError):
    """The private cluster could not be set up, started or stopped as asked (an
    ``AssertionError``, so it reads as a failed check; the message ends with the tail of
    the server log)."""


class PrivatePostgres:
    """A PostgreSQL 15 + TimescaleDB cluster in a temporary directory on a free port.

    Args:
        user: the application role (LOGIN SUPERUSER: the worker's migrations create the
            ``timescaledb`` extension, which needs a superuser; harmless in a throw-away
            cluster).
        password: its password (TCP connections use scram-sha-256).
        dbname: the database, owned by ``user``, with the ``timescaledb`` extension.
        base_dir: where the temporary directory is created (default: the system's temp
            directory); it must be reachable by the ``postgres`` user, or be made so.
        start_timeout_s: how long a start (or restart after a kill) may take.

    Attributes:
        port: the TCP port on 127.0.0.1 (fixed for the cluster's life, also across
            :meth:`restart`).
        root: the temporary directory (``None`` before :meth:`start` / after
            :meth:`stop`): ``data/`` (PGDATA), ``run/`` (unix socket), ``postgres.log``.
        paused: whether :meth:`pause` is in effect.
    """

    def __init__(self, *, user: str = "marketflow", password: str = "marketflow",
                 dbname: str = "marketflow", base_dir: Path | None = None,
                 start_timeout_s: float = 60.0) -> None:
        self.user = user
        self.password = password
        self.dbname = dbname
        self.base_dir = base_dir
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------ paths, DSNs

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        """The unix socket directory (``unix_socket_directories``)."""
        return self._root / "run"

    @property
    def log_path(self) -> Path:
        """The server log (its stderr)."""
        return self._root / "postgres.log"

    @property
    def dsn(self) -> str:
        """``postgresql://user:password@127.0.0.1:port/dbname`` (TCP, scram)."""
        return (f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{self.dbname}")

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise PrivatePostgresError("private postgres: not started")
        return self.root

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log (``""`` if there is none)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, PrivatePostgresError):
            return ""
        return "\n".join(text[-lines:])

    def _fail(self, what: str) -> PrivatePostgresError:
        log = self.log_path if self.root is not None else "server log"
        return PrivatePostgresError(
            f"private postgres on port {self.port}: {what}\n--- {log} ---\n{self.log_tail()}")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the cluster (initdb), start the server and create the role and the
        database with the ``timescaledb`` extension.

        Raises:
            PrivatePostgresError: a step failed (the directory is removed again).
        """
        if self.root is not None:
            raise PrivatePostgresError("private postgres: already started")
        if not (PGBIN / "postgres").is_file():
            raise PrivatePostgresError(f"no PostgreSQL {PG_MAJOR} in {PGBIN}: run "
                                       "scripts/services.sh up")
        if not (_SHAREDIR / "extension" / "timescaledb.control").is_file():
            raise PrivatePostgresError("timescaledb is not installed for PostgreSQL "
                                       f"{PG_MAJOR}: run scripts/services.sh up")
        pw = pwd.getpwnam(_SYSTEM_USER)
        base = self.base_dir or Path(tempfile.gettempdir())
        await _ensure_traversable(base)
        self.root = Path(tempfile.mkdtemp(prefix="mf-pg-", dir=base))
        try:
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)
            self.socket_dir.mkdir(mode=0o755)
            os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)
            await _as_postgres(
                str(PGBIN / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "--encoding=UTF8", "--locale=C.UTF-8", "--auth-local=trust",
                "--auth-host=scram-sha-256", "--no-sync", "--no-instructions")
            with (self.data_dir / "postgresql.conf").open("a") as fh:
                fh.write(
                    "\n# tests/support/private_pg.py\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    "shared_preload_libraries = 'timescaledb'\n"
                    "timescaledb.telemetry_level = off\n"
                    # throw-away data: no fsync (a killed server loses nothing the OS
                    # has; only an OS crash could), small memory
                    "fsync = off\n"
                    "shared_buffers = 32MB\n"
                    "max_connections = 60\n")
            await self._spawn()
            admin = await self._admin("postgres")
            try:
                await admin.execute(
                    f"CREATE ROLE {self.user} LOGIN SUPERUSER PASSWORD '{self.password}'")
                await admin.execute(f'CREATE DATABASE "{self.dbname}" OWNER {self.user}')
            finally:
                await admin.close()
            db = await self._admin(self.dbname)
            try:
                await db.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            finally:
                await db.close()
            conn = await asyncpg.connect(self.dsn, timeout=10)  # TCP + scram, as the app
            await conn.close()
        except BaseException:
            self.stop()
            raise

    async def restart(self) -> None:
        """Start the server again on the same port and data directory (after
        :meth:`kill`); PostgreSQL recovers from its WAL.

        Raises:
            PrivatePostgresError: it is still running, or did not come up in time.
        """
        if self.running:
            raise PrivatePostgresError("private postgres: restart while still running")
        await self._spawn()

    def pause(self) -> None:
        """SIGSTOP the postmaster, then every process of the cluster (backends, the
        checkpointer, WAL writer, ...), and wait until all are stopped: connections are
        still accepted by the kernel, but nothing answers; queries in flight hang."""
        pm = self._postmaster_pid()
        os.kill(pm, signal.SIGSTOP)  # first: a stopped postmaster forks no new backend
        self.paused = True
        stopped = {pm}
        while True:  # a backend forked just before the postmaster stopped: catch it too
            new = set(self._children(pm)) - stopped
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= new
        deadline = time.monotonic() + 10
        for pid in stopped:
            while _state(pid) not in ("T", "t", "Z", None):
                if time.monotonic() > deadline:
                    raise self._fail(f"process {pid} not stopped after SIGSTOP")
                time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT every process of the cluster (after :meth:`pause`)."""
        pm = self._postmaster_pid()
        for pid in [*self._children(pm), pm]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the cluster; return once all are
        gone and the port refuses connections.

        Raises:
            PrivatePostgresError: a process survived, or the port still accepts.
        """
        assert self.proc is not None and self.proc.poll() is None, "not running"
        pm = self.proc.pid
        pids = [pm, *self._children(pm)]  # listed first: they are reparented once pm dies
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.paused = False
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise self._fail(f"postmaster {pm} survived SIGKILL") from None
        deadline = time.monotonic() + 10
        for pid in pids[1:]:
            while _state(pid) not in ("Z", None):
                if time.monotonic() > deadline:
                    raise self._fail(f"process {pid} survived SIGKILL")
                time.sleep(0.01)
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise self._fail("port still accepts connections after SIGKILL")
        self._close_log()

    def stop(self) -> None:
        """Stop the server (SIGCONT if paused, then a fast shutdown; SIGKILL after 15 s)
        and delete the temporary directory. Idempotent; safe after any failure."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                pm = self.proc.pid
                kids = self._children(pm)
                for pid in [*kids, pm]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                self.proc.send_signal(signal.SIGINT)  # fast shutdown: frees shared memory
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    for pid in [pm, *kids]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.paused = False
        finally:
            self._close_log()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            self.proc = None

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive (also while paused)."""
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The postmaster's pid and those of all its descendants (for checks)."""
        pm = self._postmaster_pid()
        return [pm, *self._children(pm)]

    # ------------------------------------------------------------------ internals

    async def _spawn(self) -> None:
        """Start ``postgres -D`` as our child (uid/gid ``postgres``) and wait until it
        accepts connections on the unix socket and on TCP."""
        pw = pwd.getpwnam(_SYSTEM_USER)
        self._close_log()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(PGBIN / "postgres"), "-D", str(self.data_dir)],
            cwd="/", user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": pw.pw_dir},
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)  # a terminal's Ctrl-C does not reach it
        deadline = time.monotonic() + self.start_timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"postgres exited with {self.proc.returncode} at start")
            try:
                conn = await self._admin("postgres", timeout=2)
                await conn.close()
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    return
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                last = exc  # starting up / recovering: CannotConnectNowError, ENOENT, ...
            await asyncio.sleep(0.1)
        raise self._fail(f"not accepting connections after {self.start_timeout_s:g} s "
                         f"(last: {last!r})")

    async def _admin(self, dbname: str, timeout: float = 10) -> asyncpg.Connection:
        """A superuser connection over the unix socket (trusted)."""
        return await asyncpg.connect(host=str(self.socket_dir), port=self.port,
                                     user="postgres", database=dbname, timeout=timeout)

    def _postmaster_pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise self._fail("not running")
        return self.proc.pid

    @staticmethod
    def _children(pid: int) -> list[int]:
        """Every descendant of ``pid`` (PostgreSQL's are all direct children)."""
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _state(pid: int) -> str | None:
    """The state letter of ``/proc/<pid>/stat`` (``T`` stopped, ``Z`` zombie, ...);
    ``None`` when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def _as_postgres(*cmd: str) -> str:
    """Run ``cmd`` as the ``postgres`` user (``runuser -u postgres --``, from ``/``) and
    return its output.

    Raises:
        PrivatePostgresError: it failed (the message holds its output).
    """
    proc = await asyncio.create_subprocess_exec(
        "runuser", "-u", _SYSTEM_USER, "--", *cmd, cwd="/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise PrivatePostgresError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    return text


async def _ensure_traversable(path: Path) -> None:
    """Walk from ``/`` down to ``path`` and add ``o+x`` where the ``postgres`` user could
    not pass (``ensure_traversable_for_postgres`` of ``scripts/services.sh``)."""
    d = Path("/")
    for part in path.resolve().parts[1:]:
        d = d / part
        proc = await asyncio.create_subprocess_exec(
            "runuser", "-u", _SYSTEM_USER, "--", "test", "-x", str(d), cwd="/")
        if await proc.wait() != 0:
            os.chmod(d, os.stat(d).st_mode | 0o001)
