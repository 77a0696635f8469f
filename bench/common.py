"""Helpers shared by ``bench/run.py`` and ``bench/api.py`` (not a script).

The scripts are run as ``python bench/<script>.py``, so this directory is on ``sys.path``
and they import this module as ``common``. It puts the repository root on ``sys.path``
too, for the product packages and for ``tests.support.harness`` (the worker process, free
ports, isolation and cleanup the benchmarks share with the integration tests).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.config import load_settings  # noqa: E402
from core.kafka_security import client_security  # noqa: E402
from tests.support.harness import Isolation, Worker  # noqa: E402

FAUST = REPO / ".venv" / "bin" / "faust"
MINUTE = 60_000
TOPICS = {  # environment variable -> topic name suffix (the topics are bench-<rand>-<suffix>)
    "MARKETFLOW_TOPICS__TICKS": "ticks",
    "MARKETFLOW_TOPICS__BARS": "bars-1m",
    "MARKETFLOW_TOPICS__DEAD_LETTER": "dead-letter",
    "MARKETFLOW_TOPICS__HISTORY_REQUESTS": "history-requests",
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


class BenchRun:
    """One isolated bench run (``bench/README.md``, Isolation): app id / topic prefix /
    Redis key prefix ``bench-<rand>``, database ``bench_<rand>``, a free web port, the
    directory ``/tmp/marketflow-bench-<rand>`` (Faust data dir and worker log), replication
    1, and one worker (``.venv/bin/faust -A app worker -l <loglevel>``).

    The overrides (plus ``extra_env``) are applied to ``os.environ``, so that
    ``load_settings()`` in the bench and the worker see them.
    """

    def __init__(self, partitions: int, extra_env: Mapping[str, str],
                 loglevel: str = "warn") -> None:
        rand = secrets.token_hex(3)
        self.iso = Isolation.new("bench-", load_settings().database.dsn.get_secret_value(),
                                 db_prefix="bench_", token=rand)
        self.name = self.iso.name
        self.dbname = self.iso.dbname
        self.web_port = self.iso.web_port
        self.workdir = Path(f"/tmp/marketflow-{self.name}")
        self.workdir.mkdir(parents=True)
        self.env = {**self.iso.env(TOPICS, partitions=partitions, replication=1,
                                   datadir=self.workdir / "faust"), **extra_env}
        os.environ.update(self.env)
        self.settings = load_settings()
        self.worker = Worker(self.env, self.workdir / "worker.log", web_port=self.web_port,
                             loglevel=loglevel, command=(str(FAUST),), new_session=False,
                             tail_lines=40)

    @property
    def dsn(self) -> str:
        """The run's database (``MARKETFLOW_DATABASE__DSN``)."""
        return self.iso.dsn

    def describe(self) -> str:
        return (f"isolation: app id / topic prefix / redis prefix {self.name}, database "
                f"{self.dbname}, web port {self.web_port}, datadir {self.workdir}/faust")

    async def create_database(self) -> None:
        await self.iso.create_database()

    async def cleanup(self, keep_log: bool) -> None:
        """Stop the worker (unless stopped before: SIGTERM, SIGKILL after 15 s), drop the
        database, delete the Redis keys and the topics, remove the directory (with
        ``keep_log`` all but the worker log); each step printed, none raises."""
        if not self.worker.ended_on_purpose:
            say(f"  worker: {self.worker.terminate(15)}")
        await self.iso.cleanup(self.settings.redis.url.get_secret_value(),
                               self.settings.broker.bootstrap_servers,
                               report=lambda line: say("  " + line),
                               security=client_security(self.settings.broker))
        if keep_log:
            say(f"  worker log kept: {self.workdir / 'worker.log'}")
            shutil.rmtree(self.workdir / "faust", ignore_errors=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_main(run: Callable[[], Awaitable[int]]) -> int:
    """``asyncio.run(run())`` with SIGTERM treated like Ctrl-C (the bench's ``finally``
    blocks clean up); 130 after either."""

    async def _main() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run()
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    try:
        return asyncio.run(_main())
    except KeyboardInterrupt:
        print("interrupted (cleanup done)", file=sys.stderr)
        return 130


def profile_tops(path: Path, top: int) -> tuple[int, list[tuple[str, int]],
                                                list[tuple[str, int]]]:
    """Summarise a ``py-spy record --format raw`` file (collapsed stacks, one
    ``frame;frame;... count`` per line): ``(total samples, top functions by self samples,
    top 2 x top functions by inclusive samples)``; function names keep their file's base
    name.

    Raises:
        OSError: the file cannot be read.
    """
    self_n: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        cnt = int(n)
        frames = [f.split(" (", 1)[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f
                  for f in stack.split(";")]
        total += cnt
        self_n[frames[-1]] += cnt
        for f in set(frames):
            incl[f] += cnt

    def best(d: dict[str, int], k: int) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:k]
    return total, best(self_n, top), best(incl, top * 2)
