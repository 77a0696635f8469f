"""Fan-in of every feed's output to the ``ticks`` topic (:class:`TickPublisher`).

:class:`TickPublisher` batches the feeds' ticks per ``exchange:symbol`` and sends one
message per key, a columnar batch (:func:`core.models.encode_ticks`; Faust's per-event
cost caps an agent at ~11k events/s). Its buffer is bounded: when the broker is slow,
``publish`` waits for the sends, which stops the feeds reading, so TCP/websocket
back-pressure reaches the exchanges and memory stays bounded.

When to flush is adaptive (:func:`next_flush_s`, run by
:meth:`feeds.live.manager.IngestManager`): a tick that finds the publisher idle goes out at
once; under load each flush is followed by a pause that keeps the message rate under
``feeds.max_messages_per_s`` (at most ``feeds.publish_interval_ms``), and the ticks that
arrive meanwhile form the next batch. Quiet feeds get no batching delay, busy ones get
messages of many ticks.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiokafka.errors import KafkaError

from core.errors import MarketflowError, PublishError
from core.metrics import DEAD_LETTERED
from core.models import Tick, dead_letter_message, encode_ticks
from core.timeutil import now_ms

__all__ = ["Send", "TickPublisher", "next_flush_s"]

log = logging.getLogger(__name__)

#: ``async (key, value) -> future``: produce one record
Send = Callable[[bytes | None, bytes], Awaitable[Any]]


def next_flush_s(flush_started_s: float, messages: int, max_messages_per_s: float,
                 max_interval_s: float) -> float:
    """Earliest time of the next flush (same clock as ``flush_started_s``, seconds).

    Args:
        flush_started_s: when the last flush started.
        messages: messages that flush sent (0: nothing, the next tick goes out at once).
        max_messages_per_s: the message rate to stay under (``feeds.max_messages_per_s``).
        max_interval_s: the longest pause (``feeds.publish_interval_ms``).

    Returns:
        float: ``flush_started_s + min(messages / max_messages_per_s, max_interval_s)``.
    """
    return flush_started_s + min(messages / max_messages_per_s, max_interval_s)


class TickPublisher:
    """Per-key batching of feed output into ``ticks`` messages (see module docstring).

    Args:
        send_tick: ``async (key, value) -> future``: produce to ``ticks``.
        send_dead: ``async (key, value) -> future``: produce to the dead-letter topic.
        max_pending: ticks buffered before ``publish`` flushes (and waits) itself.
        max_span_ms: most event time (``ts_ms``) one message spans.

    A flush sends each key's ticks in arrival order, cut into messages spanning at most
    ``max_span_ms`` of event time, and interleaves the keys' messages by their first
    ``ts_ms``. In normal operation that is one message per key; after a broker outage the
    backlog of every key goes out in event-time order, so the partition's watermark
    advances with it and no buffered tick of another key falls behind it (late).
    """

    def __init__(self, send_tick: Send, send_dead: Send, max_pending: int = 20_000,
                 max_span_ms: int = 50) -> None:
        self.send_tick = send_tick
        self.send_dead = send_dead
        self.max_pending = max_pending
        self.max_span_ms = max_span_ms
        self._buf: dict[str, list[Tick]] = {}
        self._n = 0
        self._lock = asyncio.Lock()
        self._has_ticks = asyncio.Event()
        #: messages the last flush handed to the producer
        self.last_messages = 0

    @property
    def pending(self) -> int:
        """Ticks buffered and not yet handed to the producer."""
        return self._n

    async def publish(self, ticks: list[Tick]) -> None:
        """Buffer ticks; flushes when ``max_pending`` are waiting."""
        buf = self._buf
        for t in ticks:
            buf.setdefault(f"{t.exchange}:{t.symbol}", []).append(t)
        self._n += len(ticks)
        if self._n:
            self._has_ticks.set()
        if self._n >= self.max_pending:
            await self.flush()

    async def wait_for_ticks(self) -> None:
        """Return once ticks are buffered (at once when some are)."""
        if not self._n:
            self._has_ticks.clear()
            await self._has_ticks.wait()

    async def dead_letter(self, payload: Any, reason: str, detail: str,
                          key: str | None = None) -> None:
        """Dead-letter a rejected feed input (counted by reason)."""
        DEAD_LETTERED.labels(reason).inc()
        await self.send_dead(key.encode() if key else None,
                             dead_letter_message(payload, reason, detail, None, None, now_ms()))

    def _messages(self, buf: dict[str, list[Tick]]) -> Iterator[tuple[bytes, list[Tick]]]:
        """``(key, ticks)`` messages of ``buf`` in the order described in the class."""
        span = self.max_span_ms

        def cut(key: str, ticks: list[Tick]) -> Iterator[tuple[int, bytes, list[Tick]]]:
            k = key.encode()
            start = 0
            first = ticks[0].ts_ms
            for i, t in enumerate(ticks):
                if abs(t.ts_ms - first) >= span:
                    yield first, k, ticks[start:i]
                    start, first = i, t.ts_ms
            yield first, k, ticks[start:]

        if all(t[-1].ts_ms - t[0].ts_ms < span for t in buf.values()):  # the usual case
            return ((k.encode(), t) for k, t in buf.items())
        merged = heapq.merge(*(cut(k, t) for k, t in buf.items()), key=lambda m: m[0])
        return ((k, t) for _, k, t in merged)

    async def flush(self) -> int:
        """Send everything buffered and wait for the broker's acks.

        A message whose send fails or is not acked stays buffered (ahead of ticks that
        arrived meanwhile, so each key keeps its order) and goes out with the next flush;
        messages acked before the failure are not sent again.

        Returns:
            int: ticks sent.

        Raises:
            PublishError: some messages were not acked (their ticks are buffered again).
        """
        async with self._lock:
            if not self._buf:
                self.last_messages = 0
                return 0
            buf = self._buf
            self._buf, self._n = {}, 0
            msgs = list(self._messages(buf))
            self.last_messages = len(msgs)
            futs: list[Any] = []
            error: BaseException | None = None
            try:
                for key, ticks in msgs:
                    futs.append(await self.send_tick(key, encode_ticks(ticks)))
            except (KafkaError, OSError, TimeoutError, MarketflowError) as exc:
                # the rest is buffered again below, and reported
                error = exc
            except BaseException:  # cancelled: nothing confirmed is lost either
                self._restore(msgs[len(futs):])
                raise
            try:
                results = await asyncio.gather(*futs, return_exceptions=True)
            except BaseException:
                self._restore(msgs)  # cancelled while waiting: resend (at least once)
                raise
            failed = [m for m, r in zip(msgs[:len(futs)], results, strict=True)
                      if isinstance(r, BaseException)]
            failed += msgs[len(futs):]
            if not failed:
                return sum(len(t) for _, t in msgs)
            self._restore(failed)
            first = error or next(r for r in results if isinstance(r, BaseException))
            raise PublishError(
                f"{len(failed)} of {len(msgs)} ticks messages not acked "
                f"({type(first).__name__}: {first}); kept for the next flush") from first

    def _restore(self, msgs: list[tuple[bytes, list[Tick]]]) -> None:
        """Put unsent messages' ticks back in front of each key's buffer."""
        buf = self._buf
        for key, ticks in reversed(msgs):
            k = key.decode()
            buf[k] = ticks + buf.get(k, [])
            self._n += len(ticks)
