"""Helpers shared by ``bench/run.py`` and ``bench/api.py`` (not a script).

The scripts are run as ``python bench/<script>.py``, so this directory is on ``sys.path``
and they import this module as ``common``. It puts the repository root on ``sys.path``
too, for the ``app`` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import psutil  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.errors import for_code  # noqa: E402

from core.config import Settings  # noqa: E402

FAUST = REPO / ".venv" / "bin" / "faust"
MINUTE = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dsn_with_db(dsn: str, db: str) -> str:
    return urlunparse(urlparse(dsn)._replace(path="/" + db))


async def sql_exec(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def delete_topics(settings: Settings, prefix: str) -> str:
    """Delete every topic whose name starts with ``prefix`` (the run's topics and Faust's
    changelog / assignor topics).

    Raises:
        aiokafka.errors.KafkaError: the broker refused to delete a topic (the error of the
            first refused one; the message lists all of them).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker.bootstrap_servers)
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


class Worker:
    """One ``faust -A app worker`` subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, web_port: int,
                 loglevel: str = "warn") -> None:
        self.loglevel = loglevel
        self.env = env
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{web_port}"
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    def start(self) -> int:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(FAUST), "-A", "app", "worker", "-l", self.loglevel],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.proc.pid)
        return self.proc.pid

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def ready_in_log(self) -> bool:
        """Faust's ready report: the spinner's 'OK ^' (log level warn) or 'Ready' (info)."""
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return False
        return b" OK ^" in text or b"Worker]: Ready" in text

    def mem(self) -> dict[str, int]:
        """VmHWM / VmRSS in kB from /proc/<pid>/status."""
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
        return out

    def cpu_s(self) -> float:
        assert self.ps is not None
        t = self.ps.cpu_times()
        return t.user + t.system

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout_s: float) -> float:
        """Monotonic time of the first ``GET /health`` answering 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                async with http.get(self.base + "/health",
                                    timeout=aiohttp.ClientTimeout(total=3)) as r:
                    if r.status == 200:
                        return time.monotonic()
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"worker not healthy after {timeout_s}s:\n{self.log_tail()}")

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float) -> None:
        """Until ``GET /health`` answered 200 and Faust's ready report is in the log."""
        deadline = time.monotonic() + timeout_s
        await self.wait_healthy(http, timeout_s)
        while time.monotonic() < deadline:
            self.check_alive()
            if self.ready_in_log():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout_s}s:\n{self.log_tail()}")

    async def metrics(self, http: aiohttp.ClientSession,
                      timeout_s: float = 3) -> dict[str, float]:
        """The ``marketflow_*`` samples of ``GET /metrics``."""
        async with http.get(self.base + "/metrics",
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("marketflow_"):
                name, _, val = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(val)
        return out

    def stop(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            return "not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
            how = f"SIGTERM, exit {self.proc.returncode}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            how = "SIGKILL after 15 s"
        self._log.close()
        return how
