"""Market replay simulator: recorded trades or stored 1-minute bars into the ``ticks``
topic, in event-time order, paced, controllable while it runs.

**Sources.** Trade files (:func:`feeds.replay.trade_files.read_columns`) are merged by
``ts_ms`` in column batches (:func:`feeds.replay.sources.merge_columns`; ties keep file
order, then row order); stored bars (:func:`load_bar_source`) become deterministic ticks
(:mod:`feeds.replay.bar_ticks`) that rebuild the same bars.

**Namespace.** With ``namespace`` ``"replay"`` (the default, ``replay.namespace``) every
tick's exchange becomes ``replay.<exchange>`` and its ``source`` ``replay``, so replayed
bars live under their own exchange names and never overwrite live or historical ones;
``""`` keeps the real names (loading history). ``rebase_now`` defaults to ``""``.

**Batches.** One message per ``exchange:symbol`` holding a columnar batch of its ticks
(:func:`core.models.encode_columns`), cut from the column batches by bisection
(:func:`batch_columns`), with no object per tick on the way. All buffers are flushed
together whenever the oldest buffered tick is ``batch_span_ms`` older
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
import logging
import signal
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from redis.exceptions import RedisError

from core.admin import ensure_topics
from core.config import Settings
from core.errors import ReplayError
from core.kafka_security import client_security
from core.models import Tick, TickColumns, encode_columns
from feeds.replay.controller import ReplayController
from feeds.replay.sources import (
    FileSource,
    TickSource,
)
from feeds.replay.trade_files import TradeColumns, chunk_ticks
from stores.keys import replay_control_key
from stores.replay_control import (
    FINAL_TTL_MS,
    STATE_INTERVAL_S,
    pop_commands,
    read_state,
    write_state,
)

__all__ = [
    "MAX_TICKS_IN_FLIGHT",
    "ReplayStats",
    "batch_columns",
    "batch_ticks",
    "format_replay_progress",
    "replay",
    "replay_source",
    "resolve_namespace",
]

log = logging.getLogger(__name__)

#: ticks awaiting broker acks at once in a full-speed replay (paced replays: one flush)
MAX_TICKS_IN_FLIGHT = 100_000

_NS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


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


def batch_columns(
    chunks: Iterable[TradeColumns], batch_max: int = 1000, batch_span_ms: int = 1000
) -> Iterator[list[TickColumns]]:
    """Group a time-ordered stream of column batches into flushes of per-key batches.

    A flush starts at its oldest tick and ends before the first tick ``batch_span_ms`` or
    more younger than it, or after ``batch_max`` ticks; its ticks are grouped per
    ``exchange:symbol`` in order of first appearance, each group in stream order. The
    cuts are found by bisection and slicing, so a flush of one key costs no per-tick
    Python work.

    Args:
        chunks: time-ordered batches (:meth:`feeds.replay.sources.TickSource.chunks`).
        batch_max: most ticks per flush (>= 1).
        batch_span_ms: event-time span of one flush (ms, >= 1).

    Yields:
        list of :class:`core.models.TickColumns`: one flush; publish its batches in order
        before the next.
    """
    carry: TradeColumns | None = None
    for chunk in chunks:
        if not len(chunk):
            continue
        c = chunk if carry is None else TradeColumns.concat([carry, chunk])
        carry = None
        ts = c.ts_ms
        n = len(ts)
        i = 0
        while i < n:
            end = bisect_left(ts, ts[i] + batch_span_ms, i + 1)
            if end - i > batch_max:
                end = i + batch_max
            elif end == n:  # the flush may go on in the next chunk
                carry = c.slice(i, n) if i else c
                break
            yield _by_key(c, i, end)
            i = end
    if carry is not None:  # at most batch_max rows
        yield _by_key(carry, 0, len(carry))


def _by_key(c: TradeColumns, i: int, j: int) -> list[TickColumns]:
    """Rows ``[i, j)`` of ``c`` as one batch per key, keys in order of first row."""
    ex, sym = c.exchange[i:j], c.symbol[i:j]
    n = j - i
    if ex.count(ex[0]) == n and sym.count(sym[0]) == n:
        return [TickColumns(ex[0], sym[0], c.source, c.price[i:j], c.qty[i:j], c.ts_ms[i:j],
                            c.trade_id[i:j])]
    rows: dict[tuple[str, str], list[int]] = {}
    for k, key in enumerate(zip(ex, sym, strict=True), i):
        rows.setdefault(key, []).append(k)
    price, qty, ts, ids = c.price, c.qty, c.ts_ms, c.trade_id
    return [TickColumns(e, s, c.source, [price[k] for k in ks], [qty[k] for k in ks],
                        [ts[k] for k in ks], [ids[k] for k in ks])
            for (e, s), ks in rows.items()]


def batch_ticks(
    ticks: Iterable[Tick], batch_max: int = 1000, batch_span_ms: int = 1000
) -> Iterator[list[tuple[str, list[Tick]]]]:
    """:func:`batch_columns` of a time-ordered tick stream, as ``(key, ticks)`` lists
    (``recv_ms`` is not kept).

    Yields:
        list of ``(key, ticks)``: one flush; publish its batches in order before the next.
    """
    for flush in batch_columns(chunk_ticks(ticks), batch_max, batch_span_ms):
        yield [(b.key, b.ticks()) for b in flush]


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


# ---- the run ----------------------------------------------------------------------------


class _Publisher:
    """Publishes flushes (separated for the run loop's readability).

    At full speed (``ctl.speed == 0``) flushes are sent while fewer than
    :data:`MAX_TICKS_IN_FLIGHT` ticks await their broker acks, so the producer fills
    large requests; paced replays wait for each flush's acks before the next. Order is
    kept either way (one producer, idempotent: the broker keeps each partition's order
    across in-flight requests). A flush counts as published (``position``, ``published``,
    ``last_src_ms``) once acked; :meth:`drain` waits for them all.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, ctl: ReplayController,
                 stats: ReplayStats) -> None:
        self.producer = producer
        self.topic = topic
        self.ctl = ctl
        self.stats = stats
        self._in_flight: deque[tuple[asyncio.Future[Any], int, int]] = deque()
        self._in_flight_ticks = 0

    async def publish(self, flush: list[TickColumns]) -> None:
        ctl = self.ctl
        futs = []
        n = 0
        last_src = ctl.last_src_ms
        send = self.producer.send
        for batch in flush:
            last_src = max(last_src, batch.ts_ms[-1])
            key = batch.key.encode()
            if ctl.rebase_now:
                batch = replace(batch, ts_ms=list(map(ctl.to_output_ms, batch.ts_ms)))
            ctl.last_out_ms = max(ctl.last_out_ms, batch.ts_ms[-1])
            futs.append(await send(self.topic, value=encode_columns(batch), key=key))
            self.stats.messages += 1
            n += len(batch)
        self._in_flight.append((asyncio.gather(*futs), n, last_src))
        self._in_flight_ticks += n
        if ctl.speed == 0:
            while self._in_flight_ticks >= MAX_TICKS_IN_FLIGHT:
                await self._settle_oldest()
        else:
            await self.drain()

    async def drain(self) -> None:
        """Wait for the acks of every flush sent."""
        while self._in_flight:
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        fut, n, last_src = self._in_flight[0]
        await fut
        self._in_flight.popleft()
        self._in_flight_ticks -= n
        ctl = self.ctl
        self.stats.ticks += n
        ctl.published += n
        ctl.position += n
        ctl.last_src_ms = max(ctl.last_src_ms, last_src)


async def _run_passes(ctl: ReplayController, pub: _Publisher, loop: bool,
                      max_loops: int | None, batch_max: int, batch_span_ms: int) -> None:
    source = ctl.source
    from_ms = source.first_ts_ms
    while True:
        ctl.position, stream = source.chunks(from_ms)
        ctl.last_src_ms = from_ms
        ctl.anchor(from_ms)
        restart: int | None = None
        for flush in batch_columns(stream, batch_max, batch_span_ms):
            ctl.next_src_ms = flush[0].ts_ms[0]
            while True:  # wait until this flush may go out, or a command changes course
                if ctl.stop_requested or ctl.seek_to is not None:
                    break
                if ctl.state == "paused":
                    await pub.drain()  # paused: everything before is published
                    ctl.wake.clear()
                    await ctl.wake.wait()
                    continue
                wait_s = ctl.due_in_s(ctl.next_src_ms)
                if wait_s <= 0:
                    break
                await pub.drain()
                ctl.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):  # (wait_for can drop a cancel)
                        await ctl.wake.wait()
            if ctl.stop_requested or ctl.seek_to is not None:
                await pub.drain()
            if ctl.stop_requested:
                return
            if ctl.seek_to is not None:
                restart = ctl.seek_to
                ctl.seek_to = None
                break
            await pub.publish(flush)
        await pub.drain()
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
        **client_security(settings.broker),
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
            client = aioredis.Redis.from_url(settings.redis.url.get_secret_value(),
                                             decode_responses=True)
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
