"""Messages a Faust stream skipped, found and read back.

:class:`OffsetGuard` sees every event an agent receives and says which offsets of its
partition are missing before it: a jump between consecutive events, or, for the first
event of an assignment, offsets between where the group's stream starts and that event.
Skipped records with no event after them are found by a periodic check
(:meth:`OffsetGuard.stalled_ranges`).
:class:`SkippedMessages` reads those offsets back from the broker. The bar agent
(:mod:`agents.bars`) and the sink (:mod:`agents.sink`) both use them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, KafkaTimeoutError
from faust.types import TP

from core.config import BrokerSection
from core.kafka_security import client_security
from core.metrics import SKIPPED_RECOVERED

__all__ = ["STALL_CHECK_INTERVAL_S", "FetchedEvent", "OffsetGuard", "SkippedMessages"]

log = logging.getLogger(__name__)

#: interval of the agents' periodic :meth:`OffsetGuard.stalled_ranges` check, seconds
STALL_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class FetchedEvent:
    """A record read back by :class:`SkippedMessages`, shaped like the part of a Faust event
    the agents use (``key``, ``value``, ``message.topic/partition/offset``); Faust never
    tracked it, so it is acknowledged with :meth:`OffsetGuard.ack`, not by the stream."""

    key: bytes | None
    value: bytes
    message: _Message


class SkippedMessages:
    """Reads back messages of ``topic`` an agent's stream never delivered.

    Seen here (a worker starting while the replay published): four consecutive messages of
    a partition never reached the agent and their ticks were missing from the bars, with
    no seek back to re-deliver them. The likely path (not reproduced on purpose): Faust's
    stream silently skips a message that reaches it while its flow control is suspended,
    or that was fetched under an older consumer generation than the app's current one
    (``faust/streams.py``: "Skipping message ... generation_id ... flow_control.is_active");
    its offset still counts as read, so it is not fetched again. The
    agent therefore checks that the offsets it receives on a partition are consecutive,
    and that the first one of each assignment is where the group's stream starts
    (:meth:`start_offset`; seen: a worker taking over a SIGKILLed worker's partition lost
    about 70 s of its ticks, with no jump after the first message it received); on a jump
    it reads the missing offsets itself with this plain consumer
    (``read_committed``: transaction markers, which also leave offset gaps, have no
    record) and handles them before the message after the gap. They were never tracked by
    Faust, so their offsets are then marked as a consumer gap (Faust's ``_add_gap``, the
    mechanism it uses for offsets without records) to let commits move past them.

    Raises (from :meth:`fetch`):
        aiokafka.errors.KafkaError: the broker failed; the agent crashes rather than lose
            the messages.
    """

    TIMEOUT_S = 30.0
    #: bound of :meth:`start_offset`, seconds
    START_TIMEOUT_S = 10.0

    def __init__(self, broker: BrokerSection, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def _plain_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.broker.bootstrap_servers, enable_auto_commit=False,
                isolation_level="read_committed", auto_offset_reset="earliest",
                **client_security(self.broker))
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def start_offset(self, partition: int, group_id: str) -> int:
        """The offset a consumer of group ``group_id`` starts ``partition`` at when it is
        assigned: the group's committed offset (the next offset to read, as Faust commits
        it), or the partition's log start when the group has committed none or retention
        deleted the committed one (the worker resets to ``earliest``,
        ``app/faust_app.py``). Retriable broker errors are retried, for
        ``START_TIMEOUT_S`` in all.

        Raises:
            aiokafka.errors.KafkaError: the broker refused the request.
            TimeoutError: no answer within ``START_TIMEOUT_S`` (the broker is down).
        """
        tp = TopicPartition(self.topic, partition)
        async with asyncio.timeout(self.START_TIMEOUT_S):  # the broker may be down
            if self._admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap_servers,
                                            **client_security(self.broker))
                await admin.start()
                self._admin = admin
            while True:
                try:
                    got = await self._admin.list_consumer_group_offsets(group_id,
                                                                        partitions=[tp])
                    break
                except KafkaError as exc:
                    if not getattr(exc, "retriable", False):
                        raise
                    await asyncio.sleep(0.5)
            log_start = (await (await self._plain_consumer()).beginning_offsets([tp]))[tp]
        meta = got.get(tp)
        return max(meta.offset if meta is not None else -1, log_start)

    async def fetch(self, partition: int, start: int, end: int) -> list[FetchedEvent]:
        """Records of ``partition`` with ``start <= offset < end``, in offset order."""
        cons = await self._plain_consumer()
        tp = TopicPartition(self.topic, partition)
        cons.assign([tp])
        cons.seek(tp, start)
        out: list[FetchedEvent] = []
        deadline = time.monotonic() + self.TIMEOUT_S
        while await cons.position(tp) < end:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"{self.topic}[{partition}] offsets {start}..{end - 1} not readable "
                    f"within {self.TIMEOUT_S:g} s")
            got = await cons.getmany(tp, timeout_ms=1000, max_records=end - start)
            out += [FetchedEvent(r.key, r.value, _Message(self.topic, partition, r.offset))
                    for r in got.get(tp, ()) if r.offset < end]
        return out

    async def close(self) -> None:
        """Stop the consumer and the admin client (idempotent)."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


class OffsetGuard:
    """Per-partition offset tracking of one agent's stream, reset on every rebalance.

    Args:
        app: the Faust app (its consumer marks handled read-back offsets, and the offsets
            without a record, as a consumer gap: Faust's ``_add_gap``, the mechanism it uses
            for offsets without records, so commits move past them).
        skipped: the read-back consumer of the stream's topic.
        group_id: the app's consumer group (``app.id``).
        agent: the agent's label in ``marketflow_skipped_messages_recovered_total`` and
            in the warning logged for each read-back.
    """

    def __init__(self, app: Any, skipped: SkippedMessages, group_id: str, agent: str) -> None:
        self.app = app
        self.skipped = skipped
        self.group_id = group_id
        self.agent = agent
        #: held by the agent while it handles an event, and by :meth:`stalled_ranges`'
        #: caller while it handles what that returned
        self.lock = asyncio.Lock()
        #: partition -> offset of the last message seen in this assignment
        self._last_offset: dict[int, int] = {}
        #: partition -> last fetched offset when the assignment began
        self._fetched_at_reset: dict[int, int] = {}
        #: partition -> range suspected skipped at the previous :meth:`stalled_ranges`
        self._suspect: dict[int, tuple[int, int]] = {}

    def reset(self) -> None:
        """Forget the offsets seen (call on partitions revoked and assigned)."""
        self._last_offset.clear()
        self._suspect.clear()
        self._fetched_at_reset = self._fetched()

    def _fetched(self) -> dict[int, int]:
        offsets = getattr(self.app.consumer, "fetched_offsets", {})
        return {tp.partition: off for tp, off in list(offsets.items())
                if tp.topic == self.skipped.topic}

    async def stalled_ranges(self) -> list[tuple[int, int, int]]:
        """Ranges ``(partition, start, end)`` the stream skipped at the end of what it
        fetched, which no later event will reveal: Faust handed the records to the stream
        (``fetched_offsets`` of the consumer, ``app/faust_app.py``) but the agent never saw
        them, and two calls in a row found the same range. Call it periodically (about
        1 s apart) with :attr:`lock` held, only while the agent is not handling an event
        (the lock was free), and handle what it returns as read-back ranges. Nothing is
        reported while the app rebalances or its flow control is suspended.

        A partition whose start offset the broker does not give is left for the next call.
        """
        app = self.app
        if app.rebalancing or not app.flow_control.is_active():
            self._suspect.clear()
            return []
        topic = self.skipped.topic
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
        found: list[tuple[int, int, int]] = []
        suspect: dict[int, tuple[int, int]] = {}
        for p, fetched in self._fetched().items():
            if p not in assigned or self._fetched_at_reset.get(p) == fetched:
                continue  # nothing fetched in this assignment
            last = self._last_offset.get(p)
            if last is None:
                start = await self._start(p)
                if start is None:
                    continue  # asked again at the next check
                last = start - 1
            if fetched <= last:
                continue
            missing = (last + 1, fetched + 1)
            if self._suspect.get(p) == missing:
                found.append((p, *missing))
                self._last_offset[p] = fetched
            else:
                suspect[p] = missing
        self._suspect = suspect
        return found

    async def missing_before(self, partition: int, offset: int) -> tuple[int, int] | None:
        """The offsets ``[start, end)`` of ``partition`` the stream skipped before the
        event at ``offset``, or None. For the first event of an assignment, ``start`` is
        :meth:`SkippedMessages.start_offset`.

        A start offset the broker does not give within
        :attr:`SkippedMessages.START_TIMEOUT_S` is logged and the event taken as the start.
        """
        last = self._last_offset.get(partition)
        if last is None:
            start = await self._start(partition)
            last = offset - 1 if start is None else start - 1
        self._last_offset[partition] = max(offset, last)
        return (last + 1, offset) if offset > last + 1 else None

    async def _start(self, partition: int) -> int | None:
        """:meth:`SkippedMessages.start_offset`, or None (logged) when the broker does not
        give it: the agent goes on without checking this assignment's first message rather
        than stall while the broker is away."""
        try:
            return await self.skipped.start_offset(partition, self.group_id)
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("%s agent: start offset of %s[%d] unavailable (%s: %s); its first "
                        "message of this assignment is not checked", self.agent,
                        self.skipped.topic, partition, type(exc).__name__, exc,
                        extra={"partition": partition})
            return None

    async def read_back(self, partition: int, start: int, end: int) -> list[FetchedEvent]:
        """The records of ``partition`` in ``[start, end)``, counted and logged as
        recovered; the offsets in that range without a record (transaction markers) are
        marked as a gap at once.

        Raises:
            aiokafka.errors.KafkaError: the broker failed (:meth:`SkippedMessages.fetch`).
        """
        events = await self.skipped.fetch(partition, start, end)
        if events:
            SKIPPED_RECOVERED.labels(self.agent).inc(len(events))
            log.warning("%s agent: the stream skipped %s[%d] offsets %d..%d; %d message(s) "
                        "read back", self.agent, self.skipped.topic, partition, start,
                        end - 1, len(events),
                        extra={"partition": partition, "offset_from": start,
                               "offset_to": end - 1})
        have = {e.message.offset for e in events}
        run_start: int | None = None
        for off in range(start, end + 1):
            if off < end and off not in have:
                run_start = off if run_start is None else run_start
            elif run_start is not None:
                await self._add_gap(partition, run_start, off - 1)
                run_start = None
        return events

    async def ack(self, event: FetchedEvent) -> None:
        """Let commits move past a handled read-back record."""
        off = event.message.offset
        await self._add_gap(event.message.partition, off, off)

    async def _add_gap(self, partition: int, first: int, last: int) -> None:
        await self.app.consumer._add_gap(TP(self.skipped.topic, partition), first, last)
