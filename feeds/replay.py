"""Replay recorded trades into the ``ticks`` topic in event-time order.

Files are merged by ``ts_ms`` (ties keep file order, then row order). Ticks travel in
batches: one message per ``exchange:symbol`` holding a JSON array of its ticks. All
buffers are flushed together whenever the oldest buffered tick is ``batch_span_ms``
older than the newest one, a buffer holds ``batch_max`` ticks, or the pacing clock makes
the replay wait; so ticks of different keys never reach a partition more than
``batch_span_ms`` out of order, which must stay below the worker's grace period.

Pacing (``speed``): 0 = as fast as possible; ``s`` > 0 = a tick is published
``(ts_ms - first_ts_ms) / s`` after the start. ``rebase_now`` rewrites timestamps to the
publishing clock: ``ts' = start_wall_ms + (ts_ms - first_ts_ms) / s`` (``s = 1`` when
speed is 0), so replayed trades look live; each pass re-bases again, never earlier than
the previous pass's last tick (at speed 0 re-based ticks run ahead of the wall clock and
meet the worker's ``window.max_future_ms`` check).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from app.admin import ensure_topics
from app.config import Settings
from app.errors import ReplayError
from app.models import Tick, tick_to_json
from feeds.csv_trades import read_trades

__all__ = ["ReplayStats", "batch_ticks", "merge_by_time", "replay"]

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    """Counts of one replay run."""

    ticks: int = 0
    messages: int = 0
    loops: int = 0
    seconds: float = 0.0


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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def replay(
    settings: Settings,
    files: Sequence[str | Path],
    speed: float = 0.0,
    rebase_now: bool = False,
    loop: bool = False,
    batch_max: int = 1000,
    batch_span_ms: int = 1000,
    max_loops: int | None = None,
) -> ReplayStats:
    """Publish the trades of ``files`` to ``settings.topics.ticks``.

    Args:
        settings: broker and topic settings.
        files: trades CSV files.
        speed: 0 = as fast as possible, 1 = real time, 60 = a minute per second.
        rebase_now: re-stamp ticks onto the publishing clock (see module docstring).
        loop: replay again and again (requires ``rebase_now``: the same timestamps a
            second time would only be late ticks).
        batch_max: most ticks per flush.
        batch_span_ms: event-time span of one flush (keep below the worker's grace).
        max_loops: stop after this many loops (``None``: forever when ``loop``).

    Returns:
        ReplayStats: what was published.

    Raises:
        ReplayError: bad arguments or input files.
        aiokafka.errors.KafkaError: the broker failed.
    """
    if speed < 0:
        raise ReplayError("speed must be >= 0")
    if loop and not rebase_now:
        raise ReplayError("--repeat needs --rebase-now (replayed timestamps would all be late)")
    if not files:
        raise ReplayError("no input files")
    for f in files:
        if not Path(f).is_file():
            raise ReplayError(f"{f}: no such file")
    first_ts = min(next(read_trades(f)).ts_ms for f in files)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker.bootstrap_servers,
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
        acks="all",
    )
    await producer.start()
    stats = ReplayStats()
    t_start = time.monotonic()
    topic = settings.topics.ticks
    last_ts = 0
    try:
        while True:
            # each pass re-bases onto now, never before the previous pass's last tick
            start_wall = max(_now_ms(), last_ts + 1)
            scale = speed if speed > 0 else 1.0
            stream = merge_by_time([read_trades(f) for f in files])
            for flush in batch_ticks(stream, batch_max, batch_span_ms):
                if speed > 0:
                    due_ms = start_wall + (flush[0][1][0].ts_ms - first_ts) / speed
                    wait_s = (due_ms - _now_ms()) / 1000
                    if wait_s > 0:
                        await asyncio.sleep(wait_s)
                futs = []
                for key, batch in flush:
                    if rebase_now:
                        batch = [t._replace(ts_ms=start_wall + int((t.ts_ms - first_ts) / scale))
                                 for t in batch]
                    last_ts = max(last_ts, batch[-1].ts_ms)
                    value = orjson.dumps([tick_to_json(t) for t in batch])
                    futs.append(await producer.send(topic, value=value, key=key.encode()))
                    stats.messages += 1
                    stats.ticks += len(batch)
                await asyncio.gather(*futs)
            stats.loops += 1
            if not loop or (max_loops is not None and stats.loops >= max_loops):
                break
    finally:
        await producer.stop()
        stats.seconds = time.monotonic() - t_start
    return stats
