"""Market replay simulator: recorded trades or stored 1-minute bars into the ``ticks``
topic, in event-time order, paced, controllable while it runs.

**Sources.** Trade files (:func:`feeds.replay.csv_trades.read_trades`) are merged by ``ts_ms``
(ties keep file order, then row order); stored bars (:func:`load_bar_source`) become
deterministic ticks (:mod:`feeds.replay.bar_ticks`) that rebuild the same bars.

**Namespace.** With ``namespace`` ``"replay"`` (the default, ``replay.namespace``) every
tick's exchange becomes ``replay.<exchange>`` and its ``source`` ``replay``, so replayed
bars live under their own exchange names and never overwrite live or historical ones;
``""`` keeps the real names (loading history). ``rebase_now`` defaults to ``""``.

**Batches.** One message per ``exchange:symbol`` holding a JSON array of its ticks. All
buffers are flushed together whenever the oldest buffered tick is ``batch_span_ms`` older
than the newest one, a buffer holds ``batch_max`` ticks, or the pacing clock makes the
replay wait; so ticks of different keys never reach a partition more than
``batch_span_ms`` out of order, which must stay below the worker's grace period.

**Pacing** (``speed``): 0 = as fast as possible; ``s`` > 0 = event time advances ``s``
times as fast as wall time (a flush is published when the simulated clock reaches its
first tick). The pacing anchor is reset at the start of each pass, on resume, seek and
speed change. ``rebase_now`` rewrites timestamps to the publishing clock:
``ts' = anchor_wall_ms + (ts_ms - anchor_ts_ms) / s`` (``s = 1`` when speed is 0), with
``anchor_wall_ms`` = now but never before the last re-based tick, so replayed trades look
live and never go back in time (at speed 0 re-based ticks run ahead of the wall clock and
meet the worker's ``window.max_future_ms`` check).

**Control** (:mod:`stores.replay_control`): pause (publishing stops after the flush in
flight), resume, seek (jump forward or back in the merged sequence, by ``ts_ms``; going
back without ``rebase_now`` re-publishes ticks whose windows may already be closed: the
worker dead-letters them as ``late``), speed, stop; via Redis commands (the ``/replay/...``
views) or SIGUSR1 (pause) / SIGUSR2 (resume). The state, with the **simulated clock**
``clock_ms``, is written to Redis 5x/s.

**Progress**: every ``progress_interval_s`` a line (rate, simulated time, done %, ETA).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import heapq
import io
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from redis.exceptions import RedisError

from core.admin import ensure_topics
from core.config import Settings
from core.errors import ReplayError
from core.models import Tick, tick_to_json
from core.state import StateHolder
from core.timeutil import MINUTE_MS, now_ms
from feeds.replay.bar_ticks import bar_tick_count, bar_to_ticks
from feeds.replay.csv_trades import read_trades
from sql.bars_1m import fetch_bars
from stores.keys import replay_control_key
from stores.replay_control import (
    FINAL_TTL_MS,
    STATE_INTERVAL_S,
    pop_commands,
    read_state,
    write_state,
)

__all__ = [
    "BarSource",
    "FileSource",
    "ReplayController",
    "ReplayStats",
    "TickSource",
    "batch_ticks",
    "format_replay_progress",
    "load_bar_source",
    "merge_by_time",
    "namespaced",
    "replay",
    "replay_source",
    "resolve_namespace",
]

log = logging.getLogger(__name__)

_NS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_BARS_PAGE = 5_000


@dataclass
class ReplayStats:
    """Counts of one replay run.

    Attributes:
        ticks: ticks published.
        messages: ``ticks`` messages published.
        loops: passes completed.
        seconds: wall time of the run.
        state: how it ended: ``finished`` or ``stopped``.
        clock_ms: the simulated clock at the end (UTC epoch ms).
    """

    ticks: int = 0
    messages: int = 0
    loops: int = 0
    seconds: float = 0.0
    state: str = "finished"
    clock_ms: int = 0


def merge_by_time(sources: Sequence[Iterable[Tick]]) -> Iterator[Tick]:
    """Merge per-file tick streams by ``ts_ms`` (stable: ties keep source order)."""
    return heapq.merge(*sources, key=lambda t: t.ts_ms)


def batch_ticks(
    ticks: Iterable[Tick], batch_max: int = 1000, batch_span_ms: int = 1000
) -> Iterator[list[tuple[str, list[Tick]]]]:
    """Group a time-ordered tick stream into flushes of per-key batches.

    Yields:
        list of ``(key, ticks)``: one flush; publish its batches in order before the next.
    """
    buffers: dict[str, list[Tick]] = {}
    oldest = None
    count = 0
    for t in ticks:
        if oldest is not None and (t.ts_ms - oldest >= batch_span_ms or count >= batch_max):
            yield list(buffers.items())
            buffers = {}
            oldest = None
            count = 0
        buffers.setdefault(f"{t.exchange}:{t.symbol}", []).append(t)
        if oldest is None:
            oldest = t.ts_ms
        count += 1
    if buffers:
        yield list(buffers.items())


def resolve_namespace(namespace: str | None, rebase_now: bool, default: str) -> str:
    """The namespace a replay uses.

    Args:
        namespace: the one asked for (``--namespace``); None = not given.
        rebase_now: a live-like feed (then the default is the real names, ``""``).
        default: ``settings.replay.namespace``.

    Returns:
        str: ``""`` (real exchange names) or a name of letters, digits, ``_`` and ``-``.

    Raises:
        ReplayError: invalid namespace.
    """
    ns = ("" if rebase_now else default) if namespace is None else namespace
    if ns and (len(ns) > 20 or not set(ns) <= _NS_CHARS):
        raise ReplayError(f"invalid namespace {ns[:30]!r}: up to 20 letters, digits, _ or -")
    return ns


def namespaced(exchange: str, namespace: str) -> str:
    """``<namespace>.<exchange>``, or ``exchange`` itself when ``namespace`` is empty."""
    return f"{namespace}.{exchange}" if namespace else exchange


def format_replay_progress(state: dict[str, Any]) -> str:
    """One terminal progress line from a replay state (:mod:`stores.replay_control`).

    Example: ``replay running x60 2024-08-08T23:56:12Z 41.2% 12000/29123 ticks
    5400 ticks/s ETA 31 s``.
    """
    total = max(int(state["total"]), 1)
    pct = 100.0 * int(state["position"]) / total
    eta = state.get("eta_s")
    speed = float(state["speed"])
    clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(state["clock_ms"]) / 1000))
    return (f"replay {state['state']} {'max' if speed == 0 else f'x{speed:g}'} {clock} "
            f"{pct:.1f}% {state['position']}/{state['total']} ticks "
            f"{float(state['rate']):.0f} ticks/s ETA "
            f"{'-' if eta is None else f'{float(eta):.0f} s'}")


# ---- sources ----------------------------------------------------------------------------


class TickSource(Protocol):
    """A replayable, seekable time-ordered tick sequence.

    Attributes:
        first_ts_ms, last_ts_ms: event-time range (UTC epoch ms) of the sequence.
        total: number of ticks in the sequence.
        description: JSON-able description for the replay state (``source``).
    """

    first_ts_ms: int
    last_ts_ms: int
    total: int
    description: dict[str, Any]

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """``(position, ticks)``: the ticks with ``ts_ms >= from_ts_ms`` in order, and how
        many ticks of the sequence come before them."""
        ...


def _count_rows(path: Path) -> int:
    n = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            n += chunk.count(b"\n")
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                n += 1
    return max(n - 1, 0)  # header


def _last_ts_ms(path: Path) -> int:
    """``ts_ms`` of the file's last row (read from the end)."""
    with path.open("rb") as fh:
        header = fh.readline().decode("utf-8")
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65_536))
        tail = fh.read().decode("utf-8", errors="replace").strip().splitlines()
    rows = list(csv.DictReader(io.StringIO(header + tail[-1] + "\n")))
    try:
        return int(rows[0]["ts_ms"])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ReplayError(f"{path}: cannot read the last row's ts_ms ({exc})") from exc


class FileSource:
    """Trades CSV files merged by ``ts_ms``, exchanges renamed into ``namespace``.

    Raises:
        ReplayError: no files, a missing/empty/malformed file.
    """

    def __init__(self, files: Sequence[str | Path], namespace: str = "") -> None:
        if not files:
            raise ReplayError("no input files")
        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise ReplayError(f"{f}: no such file")
        self.namespace = namespace
        firsts = []
        for f in self.files:
            first = next(read_trades(f), None)
            if first is None:
                raise ReplayError(f"{f}: no trades")
            firsts.append(first.ts_ms)
        self.first_ts_ms = min(firsts)
        self.last_ts_ms = max(max(_last_ts_ms(f) for f in self.files), self.first_ts_ms)
        self.total = sum(_count_rows(f) for f in self.files)
        self.description: dict[str, Any] = {"files": [str(f) for f in self.files]}

    def _stream(self) -> Iterator[Tick]:
        merged = merge_by_time([read_trades(f) for f in self.files])
        if not self.namespace:
            return merged
        ns = self.namespace
        return (t._replace(exchange=f"{ns}.{t.exchange}") for t in merged)

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """See :class:`TickSource` (skipping reads the files from the start)."""
        stream = self._stream()
        skipped = 0
        for t in stream:
            if t.ts_ms >= from_ts_ms:
                return skipped, _chain_one(t, stream)
            skipped += 1
        return skipped, iter(())


def _chain_one(first: Tick, rest: Iterator[Tick]) -> Iterator[Tick]:
    yield first
    yield from rest


@dataclass
class _Bar:
    bucket_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: int
    n_ticks: int = 0


@dataclass
class BarSource:
    """Stored 1-minute bars of one exchange/symbol as ticks (:mod:`feeds.replay.bar_ticks`).

    Attributes:
        exchange: the bars' exchange (as stored); the ticks get
            ``namespaced(exchange, namespace)``.
        symbol: the pair.
        bars: the bars, oldest first.
        namespace: see :func:`namespaced`.
        from_ms, to_ms: the requested range (bars starting in ``[from_ms, to_ms)``).
    """

    exchange: str
    symbol: str
    bars: list[_Bar]
    namespace: str
    from_ms: int
    to_ms: int
    description: dict[str, Any] = field(init=False)
    first_ts_ms: int = field(init=False)
    last_ts_ms: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.bars:
            raise ReplayError(f"no stored bars for {self.exchange}:{self.symbol} in the range")
        for b in self.bars:
            b.n_ticks = bar_tick_count(b.open, b.high, b.low, b.close, b.trade_count)
        self.first_ts_ms = self.bars[0].bucket_ms
        self.last_ts_ms = self.bars[-1].bucket_ms + MINUTE_MS - 1
        self.total = sum(b.n_ticks for b in self.bars)
        self.description = {"bars": {"exchange": self.exchange, "symbol": self.symbol,
                                     "from_ms": self.from_ms, "to_ms": self.to_ms,
                                     "count": len(self.bars)}}

    def ticks(self, from_ts_ms: int) -> tuple[int, Iterator[Tick]]:
        """See :class:`TickSource`; whole bars before ``from_ts_ms`` are skipped by count."""
        pos = 0
        start = 0
        while start < len(self.bars) and self.bars[start].bucket_ms + MINUTE_MS <= from_ts_ms:
            pos += self.bars[start].n_ticks
            start += 1
        head: list[Tick] = []
        if start < len(self.bars):
            head = self._bar_ticks(self.bars[start])
            keep = [t for t in head if t.ts_ms >= from_ts_ms]
            pos += len(head) - len(keep)
            head = keep
        return pos, self._iter(head, start + 1)

    def _bar_ticks(self, b: _Bar) -> list[Tick]:
        return bar_to_ticks(namespaced(self.exchange, self.namespace), self.symbol,
                            b.bucket_ms, b.open, b.high, b.low, b.close, b.volume,
                            b.trade_count)

    def _iter(self, head: list[Tick], start: int) -> Iterator[Tick]:
        yield from head
        for b in self.bars[start:]:
            yield from self._bar_ticks(b)


async def load_bar_source(settings: Settings, exchange: str, symbol: str, from_ms: int,
                          to_ms: int, namespace: str) -> BarSource:
    """Read the 1-minute bars of ``exchange``/``symbol`` starting in ``[from_ms, to_ms)``
    from TimescaleDB (read-only).

    Raises:
        ReplayError: empty range or no bars there, or a bar that cannot become ticks.
        asyncpg.PostgresError, OSError: the database failed.
    """
    import asyncpg

    if to_ms <= from_ms:
        raise ReplayError("--to must be after --from")
    if namespace and exchange.startswith(f"{namespace}."):
        raise ReplayError(f"{exchange} is already in the {namespace!r} namespace")
    conn = await asyncpg.connect(settings.database.dsn)
    bars: list[_Bar] = []
    try:
        lo = from_ms
        while True:
            rows = await fetch_bars(conn, symbol, exchange, lo, to_ms, _BARS_PAGE)
            for r in rows:
                bars.append(_Bar(int(r["bucket_start"].timestamp() * 1000), float(r["open"]),
                                 float(r["high"]), float(r["low"]), float(r["close"]),
                                 float(r["volume"]), int(r["trade_count"])))
            if len(rows) < _BARS_PAGE:
                break
            lo = bars[-1].bucket_ms + MINUTE_MS
    finally:
        await conn.close()
    return BarSource(exchange, symbol, bars, namespace, from_ms, to_ms)


# ---- control ----------------------------------------------------------------------------


class ReplayController:
    """State, simulated clock and commands of one replay (no I/O; driven by
    :func:`replay_source`, commanded by Redis and signals).

    Clocks: *source* time is the input's own ``ts_ms``; *output* time is what the pipeline
    sees (source time re-based when ``rebase_now``). ``clock_ms()`` is output time.
    """

    @property
    def state(self) -> str:
        """The replay's state (see :attr:`status`)."""
        return self.status.state

    @state.setter
    def state(self, value: str) -> None:
        self.status.set_state(value)

    def __init__(self, source: TickSource, speed: float, rebase_now: bool,
                 namespace: str) -> None:
        if speed < 0:
            raise ReplayError("speed must be >= 0")
        self.source = source
        self.session = uuid.uuid4().hex[:8]
        #: the replay's state (``running`` | ``paused`` | ``stopped`` | ``finished``),
        #: transitions logged
        self.status = StateHolder("replay", "replay", "running")
        self.speed = speed
        self.rebase_now = rebase_now
        self.namespace = namespace
        self.started_ms = now_ms()
        self.position = 0
        self.published = 0
        self.loops = 0
        self.ack = 0
        self.seek_to: int | None = None
        self.stop_requested = False
        self.closing = False  # set when the run ends: helper loops exit
        self.wake = asyncio.Event()
        self.last_src_ms = source.first_ts_ms  # source ts of the last published tick
        self.next_src_ms: int | None = None  # source ts of the flush waiting to go
        self._frozen_src_ms = source.first_ts_ms
        self._anchor_src_ms = source.first_ts_ms
        self._anchor_mono = time.monotonic()
        self._rb_wall_ms = 0
        self._rb_src_ms = source.first_ts_ms
        self.last_out_ms = 0  # highest output ts published
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0

    # -- clocks ----------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Source ms per output ms when re-basing (the speed, 1 at max speed)."""
        return self.speed if self.speed > 0 else 1.0

    def source_clock_ms(self) -> int:
        """The simulated clock in source time."""
        if self.seek_to is not None:
            return self.seek_to
        if self.state != "running":
            return self._frozen_src_ms
        if self.speed > 0 and self.next_src_ms is not None:
            est = self._anchor_src_ms + (time.monotonic() - self._anchor_mono) * self.speed * 1000
            return max(self.last_src_ms, min(int(est), self.next_src_ms))
        return self.last_src_ms

    def to_output_ms(self, src_ms: int) -> int:
        """Output time of source time ``src_ms`` (identity without re-basing)."""
        if not self.rebase_now:
            return src_ms
        return self._rb_wall_ms + int((src_ms - self._rb_src_ms) / self.scale)

    def clock_ms(self) -> int:
        """The simulated clock (output time, UTC epoch ms)."""
        return self.to_output_ms(self.source_clock_ms())

    def anchor(self, src_ms: int) -> None:
        """Restart pacing and re-basing at source time ``src_ms`` (now)."""
        self._anchor_src_ms = src_ms
        self._anchor_mono = time.monotonic()
        self._rb_src_ms = src_ms
        self._rb_wall_ms = max(now_ms(), self.last_out_ms + 1)

    def due_in_s(self, src_ms: int) -> float:
        """Seconds until the simulated clock reaches ``src_ms`` (<= 0: due; 0 at max
        speed)."""
        if self.speed <= 0:
            return 0.0
        due = self._anchor_mono + (src_ms - self._anchor_src_ms) / (self.speed * 1000)
        return due - time.monotonic()

    # -- commands ---------------------------------------------------------------------

    def pause(self) -> str | None:
        """Stop publishing after the flush in flight; returns an error text or None."""
        if self.state != "running":
            return f"cannot pause: {self.state}"
        self._frozen_src_ms = self.source_clock_ms()
        self.state = "paused"
        self.wake.set()
        return None

    def resume(self) -> str | None:
        """Continue publishing from the frozen clock; returns an error text or None."""
        if self.state != "paused":
            return f"cannot resume: {self.state}"
        self.state = "running"
        if self.seek_to is None:
            self.anchor(self._frozen_src_ms)
        self.wake.set()
        return None

    def seek(self, to_ms: int) -> str | None:
        """Jump to source time ``to_ms`` (forward or back); returns an error text or None."""
        if self.state not in ("running", "paused"):
            return f"cannot seek: {self.state}"
        self.seek_to = int(to_ms)
        self._frozen_src_ms = int(to_ms)
        self.wake.set()
        return None

    def set_speed(self, speed: float) -> str | None:
        """Change the speed factor (0 = max); returns an error text or None."""
        if speed < 0:
            return "speed must be >= 0"
        if self.state not in ("running", "paused"):
            return f"cannot change speed: {self.state}"
        src = self.source_clock_ms()
        self.speed = float(speed)
        self.anchor(src)
        self.wake.set()
        return None

    def stop(self) -> str | None:
        """End the replay after the flush in flight; returns an error text or None."""
        if self.state not in ("running", "paused"):
            return f"cannot stop: {self.state}"
        self.stop_requested = True
        self._frozen_src_ms = self.source_clock_ms()
        self.wake.set()
        return None

    def apply(self, command: dict[str, Any]) -> str | None:
        """Apply one Redis command object (:mod:`stores.replay_control`); returns an error
        text or None. Records its ``id`` as acknowledged either way."""
        cmd = command.get("cmd")
        cid = command.get("id")
        if isinstance(cid, int):
            self.ack = max(self.ack, cid)
        if cmd == "pause":
            return self.pause()
        if cmd == "resume":
            return self.resume()
        if cmd == "stop":
            return self.stop()
        if cmd == "seek":
            to_ms = command.get("to_ms")
            if isinstance(to_ms, bool) or not isinstance(to_ms, int):
                return f"seek needs an integer to_ms, got {to_ms!r}"
            return self.seek(to_ms)
        if cmd == "speed":
            speed = command.get("speed")
            if isinstance(speed, bool) or not isinstance(speed, (int, float)):
                return f"speed needs a number, got {speed!r}"
            return self.set_speed(float(speed))
        return f"unknown command {str(cmd)[:40]!r}"

    # -- state ------------------------------------------------------------------------

    def update_rate(self) -> None:
        """Recompute ``rate`` (ticks/s) since the previous call."""
        now = time.monotonic()
        t0, n0 = self._rate_mark
        if now - t0 >= 0.5:
            self.rate = (self.published - n0) / (now - t0)
            self._rate_mark = (now, self.published)

    def snapshot(self) -> dict[str, Any]:
        """The replay state (the ``<prefix>:replay:state`` schema)."""
        src = self.source_clock_ms()
        eta: float | None = None
        if self.state == "running":
            if self.speed > 0:
                eta = max(0.0, (self.source.last_ts_ms - src) / (self.speed * 1000))
            elif self.rate > 0:
                eta = max(0, self.source.total - self.position) / self.rate
        return {
            "session": self.session, "pid": os.getpid(), "state": self.state,
            "speed": self.speed, "clock_ms": self.to_output_ms(src), "source_clock_ms": src,
            "first_ts_ms": self.source.first_ts_ms, "last_ts_ms": self.source.last_ts_ms,
            "position": self.position, "total": self.source.total,
            "rate": round(self.rate, 1), "eta_s": None if eta is None else round(eta, 1),
            "published": self.published, "loops": self.loops, "namespace": self.namespace,
            "rebase_now": self.rebase_now, "source": self.source.description,
            "started_ms": self.started_ms, "updated_ms": now_ms(), "ack": self.ack,
        }


# ---- the run ----------------------------------------------------------------------------


class _Publisher:
    """Publishes flushes (separated for the run loop's readability)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, ctl: ReplayController,
                 stats: ReplayStats) -> None:
        self.producer = producer
        self.topic = topic
        self.ctl = ctl
        self.stats = stats

    async def publish(self, flush: list[tuple[str, list[Tick]]]) -> None:
        ctl = self.ctl
        futs = []
        n = 0
        last_src = ctl.last_src_ms
        for key, batch in flush:
            last_src = max(last_src, batch[-1].ts_ms)
            if ctl.rebase_now:
                batch = [t._replace(ts_ms=ctl.to_output_ms(t.ts_ms)) for t in batch]
            ctl.last_out_ms = max(ctl.last_out_ms, batch[-1].ts_ms)
            value = orjson.dumps([tick_to_json(t) for t in batch])
            futs.append(await self.producer.send(self.topic, value=value, key=key.encode()))
            self.stats.messages += 1
            n += len(batch)
        await asyncio.gather(*futs)
        self.stats.ticks += n
        ctl.published += n
        ctl.position += n
        ctl.last_src_ms = last_src


async def _run_passes(ctl: ReplayController, pub: _Publisher, loop: bool,
                      max_loops: int | None, batch_max: int, batch_span_ms: int) -> None:
    source = ctl.source
    from_ms = source.first_ts_ms
    while True:
        ctl.position, stream = source.ticks(from_ms)
        ctl.last_src_ms = from_ms
        ctl.anchor(from_ms)
        restart: int | None = None
        for flush in batch_ticks(stream, batch_max, batch_span_ms):
            ctl.next_src_ms = flush[0][1][0].ts_ms
            while True:  # wait until this flush may go out, or a command changes course
                if ctl.stop_requested or ctl.seek_to is not None:
                    break
                if ctl.state == "paused":
                    ctl.wake.clear()
                    await ctl.wake.wait()
                    continue
                wait_s = ctl.due_in_s(ctl.next_src_ms)
                if wait_s <= 0:
                    break
                ctl.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctl.wake.wait(), wait_s)
            if ctl.stop_requested:
                return
            if ctl.seek_to is not None:
                restart = ctl.seek_to
                ctl.seek_to = None
                break
            await pub.publish(flush)
        ctl.next_src_ms = None
        if restart is not None:
            from_ms = restart
            continue
        ctl.loops += 1
        pub.stats.loops = ctl.loops
        if not loop or (max_loops is not None and ctl.loops >= max_loops):
            return
        from_ms = source.first_ts_ms
        # wait here for a seek/stop while paused at the end of a pass
        while ctl.state == "paused" and not ctl.stop_requested and ctl.seek_to is None:
            ctl.wake.clear()
            await ctl.wake.wait()
        if ctl.stop_requested:
            return
        if ctl.seek_to is not None:
            from_ms = ctl.seek_to
            ctl.seek_to = None


async def _control_loop(ctl: ReplayController, client: aioredis.Redis, prefix: str) -> None:
    """Apply Redis commands and publish the state until cancelled; Redis outages are
    logged (once per outage) and retried every second."""
    down = False
    last_write = 0.0
    while not ctl.closing:
        try:
            for cmd in await pop_commands(client, prefix, STATE_INTERVAL_S / 2):
                err = ctl.apply(cmd)
                if err:
                    log.warning("replay: command %s refused: %s", cmd.get("cmd"), err)
                else:
                    log.info("replay: %s %s", cmd.get("cmd"),
                             {k: v for k, v in cmd.items() if k not in ("cmd", "id")})
                last_write = 0.0
            if time.monotonic() - last_write >= STATE_INTERVAL_S:
                ctl.update_rate()
                await write_state(client, prefix, ctl.snapshot())
                last_write = time.monotonic()
            if down:
                log.warning("replay: redis reachable again; HTTP control restored")
                down = False
        except (RedisError, OSError) as exc:
            if not down:
                log.warning("replay: redis unavailable (%s: %s); HTTP control and the "
                            "simulated clock are unavailable until it is back",
                            type(exc).__name__, exc)
                down = True
            if not ctl.closing:
                await asyncio.sleep(1.0)


async def _progress_loop(ctl: ReplayController, say: Callable[[str], None],
                         interval_s: float) -> None:
    while not ctl.closing:
        await asyncio.sleep(interval_s)
        ctl.update_rate()
        say(format_replay_progress(ctl.snapshot()))


def _install_signals(ctl: ReplayController) -> list[int]:
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig, fn in ((signal.SIGUSR1, ctl.pause), (signal.SIGUSR2, ctl.resume)):
        def handler(fn: Callable[[], str | None] = fn, name: str = sig.name) -> None:
            err = fn()
            log.info("replay: %s -> %s", name, err or ctl.state)
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError) as exc:  # not the main thread / Windows
            log.warning("replay: no %s handler: %s", sig.name, exc)
            continue
        installed.append(sig)
    return installed


async def replay_source(
    settings: Settings,
    source: TickSource,
    speed: float = 0.0,
    rebase_now: bool = False,
    loop: bool = False,
    batch_max: int = 1000,
    batch_span_ms: int = 1000,
    max_loops: int | None = None,
    namespace: str = "",
    control: bool = True,
    signals: bool = True,
    progress: Callable[[str], None] | None = None,
    progress_interval_s: float = 2.0,
) -> ReplayStats:
    """Publish ``source`` to ``settings.topics.ticks`` under control (module docstring).

    Args:
        settings: broker, topic and Redis settings.
        source: what to replay (:class:`FileSource`, :class:`BarSource`).
        speed: 0 = as fast as possible, 1 = real time, 60 = a minute per second.
        rebase_now: re-stamp ticks onto the publishing clock.
        loop: replay again and again (requires ``rebase_now``).
        batch_max: most ticks per flush.
        batch_span_ms: event-time span of one flush (keep below the worker's grace).
        max_loops: stop after this many passes (``None``: forever when ``loop``).
        namespace: recorded in the state (the source already renamed the exchanges).
        control: publish the state to Redis and take commands from it.
        signals: SIGUSR1 pauses, SIGUSR2 resumes (main thread only).
        progress: called with a progress line every ``progress_interval_s``.
        progress_interval_s: seconds between progress lines.

    Returns:
        ReplayStats: what was published and how the replay ended.

    Raises:
        ReplayError: bad arguments.
        aiokafka.errors.KafkaError: the broker failed.
    """
    if speed < 0:
        raise ReplayError("speed must be >= 0")
    if loop and not rebase_now:
        raise ReplayError("--repeat needs --rebase-now (replayed timestamps would all be late)")
    if batch_max < 1 or batch_span_ms < 1:
        raise ReplayError("--batch-max and --batch-span-ms must be >= 1")
    ctl = ReplayController(source, speed, rebase_now, namespace)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker.bootstrap_servers,
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
        acks="all",
        enable_idempotence=True,  # a retried batch is written once (broker outages)
    )
    stats = ReplayStats()
    prefix = settings.redis.key_prefix
    client: aioredis.Redis | None = None
    tasks: list[asyncio.Task[None]] = []
    sigs: list[int] = []
    await producer.start()
    t_start = time.monotonic()
    try:
        if control:
            client = aioredis.Redis.from_url(settings.redis.url, decode_responses=True)
            try:
                other = await read_state(client, prefix)
                if other is not None and other.get("state") in ("running", "paused"):
                    log.warning("replay: another replay (session %s, pid %s) is %s; HTTP "
                                "commands go to whichever takes them first",
                                other.get("session"), other.get("pid"), other.get("state"))
                await client.delete(replay_control_key(prefix))  # no stale command
            except (RedisError, OSError) as exc:
                log.warning("replay: redis unavailable at start (%s: %s)",
                            type(exc).__name__, exc)
            tasks.append(asyncio.create_task(_control_loop(ctl, client, prefix)))
        if signals:
            sigs = _install_signals(ctl)
        if progress is not None:
            tasks.append(asyncio.create_task(
                _progress_loop(ctl, progress, progress_interval_s)))
        await _run_passes(ctl, _Publisher(producer, settings.topics.ticks, ctl, stats),
                          loop, max_loops, batch_max, batch_span_ms)
        ctl._frozen_src_ms = ctl.source_clock_ms() if ctl.stop_requested else ctl.last_src_ms
        ctl.state = "stopped" if ctl.stop_requested else "finished"
    finally:
        if ctl.state in ("running", "paused"):
            ctl._frozen_src_ms = ctl.last_src_ms
            ctl.state = "stopped"
        ctl.closing = True
        for task in tasks:
            task.cancel()
        if tasks:
            # the Redis client may turn a cancellation into a connection error: the
            # control loop then ends through ``ctl.closing``; wait a bounded time only
            _, pending = await asyncio.wait(tasks, timeout=3.0)
            if pending:
                log.warning("replay: %d helper task(s) did not stop", len(pending))
        for sig in sigs:
            asyncio.get_running_loop().remove_signal_handler(sig)
        await producer.stop()
        stats.seconds = time.monotonic() - t_start
        stats.state = ctl.state
        stats.clock_ms = ctl.clock_ms()
        if client is not None:
            try:
                ctl.update_rate()
                await write_state(client, prefix, ctl.snapshot(), ttl_ms=FINAL_TTL_MS)
            except (RedisError, OSError) as exc:
                log.warning("replay: final state not written: %s: %s", type(exc).__name__, exc)
            await client.aclose()
    return stats


async def replay(settings: Settings, files: Sequence[str | Path], *,
                 namespace: str | None = None, rebase_now: bool = False,
                 **options: Any) -> ReplayStats:
    """Replay the trades of ``files``: :func:`replay_source` over a :class:`FileSource`
    (``options`` are its keyword arguments: ``speed``, ``loop``, ``batch_max``, ...).

    Args:
        namespace: ``None`` = ``settings.replay.namespace``, or ``""`` with
            ``rebase_now``; ``""`` = real exchange names.

    Raises:
        ReplayError: bad arguments or input files.
        aiokafka.errors.KafkaError: the broker failed.
    """
    ns = resolve_namespace(namespace, rebase_now, settings.replay.namespace)
    return await replay_source(settings, FileSource(files, ns), rebase_now=rebase_now,
                               namespace=ns, **options)
