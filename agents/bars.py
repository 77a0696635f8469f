"""Tick batches -> tumbling 1-minute bars, in event time.

Per ``ticks`` message: decode and validate (bad ticks -> dead-letter topic with a
reason), apply the good ones to the key's open windows (:class:`WindowAggregator`),
queue the newest price per key for Redis, publish every bar the watermark (or an
idle check) closed to the closed-bars topic and wait for the broker's ack, and only then
write snapshots of the changed window states to the table's changelog.

Late ticks follow ``window.late_policy``: dead-lettered with reason ``late``
(``dead_letter``, default), or applied to the retained closed bar, which is re-published
to the closed-bars topic with ``"correction": true`` (the sink upserts it, the live-bar
mirror is updated) and counted in ``marketflow_corrections_total`` (``correct``; beyond
``window.correction_horizon_ms`` they are dead-lettered with reason ``late``). Ticks that
repeat a trade id already in their window are skipped and counted in
``marketflow_duplicate_trades_total``.

The source message is acknowledged (its offset becomes committable) only after those
changelog records are acknowledged by the broker, strictly in offset order. Faust's own
table writes are fire-and-forget, so with them a crash could leave the committed offset
ahead of the durable state and lose ticks; here a crash anywhere re-runs the message:
states carry the last applied offset, so ticks are not counted twice, and a bar may be
published twice with identical values (idempotent upserts downstream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from faust.exceptions import ConsumerNotStarted
from faust.types import TP, EventT, StreamT, TableT

from core.config import BrokerSection, Settings
from core.errors import InvalidTick
from core.kafka_security import client_security
from core.metrics import (
    BARS_CLOSED,
    CONSUMER_LAG,
    CORRECTIONS,
    DEAD_LETTERED,
    DUPLICATE_TICKS,
    DUPLICATE_TRADES,
    LATE_TICKS,
    SKIPPED_RECOVERED,
    TICKS_APPLIED,
    TICKS_IN,
    WATERMARK_MS,
)
from core.models import (
    CONTROL_IDLE_CHECK,
    Tick,
    control_message,
    dead_letter_message,
    decode_ticks_payload,
    parse_tick,
    tick_to_json,
)
from core.timeutil import now_ms
from core.topics import Topics
from query.price_stats import per_second
from stores.buffer import RedisWriteBuffer
from tables.aggregator import BatchResult, WindowAggregator
from tables.window import finalize_bar

__all__ = ["LAG_INTERVAL_S", "BarAggregation", "SkippedMessages"]

log = logging.getLogger(__name__)

#: interval of the consumer-lag gauge update, seconds
LAG_INTERVAL_S = 5.0
_STALL_LOG_INTERVAL_MS = 10_000


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class _FetchedEvent:
    """A ``ticks`` record read by :class:`SkippedMessages`, shaped like the part of a Faust
    event :func:`handle_event` uses."""

    key: bytes | None
    value: bytes
    message: _Message


class SkippedMessages:
    """Reads back ``ticks`` messages the agent's stream never delivered.

    Seen here (a worker starting while the replay published): four consecutive messages of
    a partition never reached the agent and their ticks were missing from the bars, with
    no seek back to re-deliver them. The likely path (not reproduced on purpose): Faust's
    stream silently skips a message that reaches it while its flow control is suspended
    (``faust/streams.py``: "Skipping message ... flow_control.is_active"). The
    agent therefore checks that the offsets it receives on a partition are consecutive;
    on a jump it reads the missing offsets itself with this plain consumer
    (``read_committed``: transaction markers, which also leave offset gaps, have no
    record) and handles them before the message after the gap. They were never tracked by
    Faust, so their offsets are then marked as a consumer gap (Faust's ``_add_gap``, the
    mechanism it uses for offsets without records) to let commits move past them.

    Raises (from :meth:`fetch`):
        aiokafka.errors.KafkaError: the broker failed; the agent crashes rather than lose
            the messages.
    """

    TIMEOUT_S = 30.0

    def __init__(self, broker: BrokerSection, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None

    async def fetch(self, partition: int, start: int, end: int) -> list[_FetchedEvent]:
        """Records of ``partition`` with ``start <= offset < end``, in offset order."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.broker.bootstrap_servers, enable_auto_commit=False,
                isolation_level="read_committed", auto_offset_reset="earliest",
                **client_security(self.broker))
            await self._consumer.start()
        cons = self._consumer
        tp = TopicPartition(self.topic, partition)
        cons.assign([tp])
        cons.seek(tp, start)
        out: list[_FetchedEvent] = []
        deadline = time.monotonic() + self.TIMEOUT_S
        while await cons.position(tp) < end:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"{self.topic}[{partition}] offsets {start}..{end - 1} not readable "
                    f"within {self.TIMEOUT_S:g} s")
            got = await cons.getmany(tp, timeout_ms=1000, max_records=end - start)
            out += [_FetchedEvent(r.key, r.value, _Message(self.topic, partition, r.offset))
                    for r in got.get(tp, ()) if r.offset < end]
        return out

    async def close(self) -> None:
        """Stop the consumer (idempotent)."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


@dataclass(frozen=True)
class _Gap:
    """Offsets ``first..last`` of a ``ticks`` partition handled outside the stream."""

    partition: int
    first: int
    last: int


_AckItem = tuple["EventT | _Gap | None", list[Any]]




class BarAggregation:
    """The bar agent, its timers and its partition hooks, registered on an app by
    :meth:`register` (module docstring).

    Args:
        app: the Faust app.
        settings: the worker's settings (``window``, ``topics``, ``broker``,
            ``app.processing_guarantee``).
        topics: the declared topics.
        table: the window table (:func:`tables.bars.declare_window_table`); its raw store
            holds the key states, changelog records are written explicitly.
        redis_writes: where latest prices, per-second statistics and live bars go.
    """

    def __init__(self, app: faust.App, settings: Settings, topics: Topics, table: TableT,
                 redis_writes: RedisWriteBuffer) -> None:
        self.app = app
        self.settings = settings
        self.topics = topics
        self.table = table
        self.redis_writes = redis_writes
        self.store: Any = table.data  # a faust StoreT is a MutableMapping
        w = settings.window
        self.aggregator = WindowAggregator(
            self.store,
            grace_ms=w.grace_ms,
            idle_timeout_ms=int(w.idle_timeout_s * 1000),
            size_ms=w.size_ms,
            late_policy=w.late_policy,
            correction_horizon_ms=w.correction_horizon_ms,
        )
        self.skipped = SkippedMessages(settings.broker, settings.topics.ticks)
        #: partition -> offset of the last ``ticks`` message handled in this assignment
        self._last_offset: dict[int, int] = {}
        #: partition -> when a stalled idle check was last logged (one line per interval)
        self._stall_logged_ms: dict[int, int] = {}
        self._lag_labelled: set[tuple[str, str]] = set()

    def register(self) -> None:
        """Register the agent (name ``agents.bars.aggregate_ticks``), the idle-check and
        consumer-lag timers, the partition hooks and the read-back consumer's shutdown."""
        app = self.app
        app.agent(self.topics.ticks, name="agents.bars.aggregate_ticks")(self.aggregate_ticks)
        app.timer(interval=self.settings.window.idle_check_interval_s)(self.idle_check)
        app.timer(interval=LAG_INTERVAL_S)(self.consumer_lag)
        app.on_partitions_revoked.connect(self._on_partitions_changed)
        app.on_partitions_assigned.connect(self._on_partitions_changed)
        cast(Any, app).before_stop(self.skipped.close)

    def _on_partitions_changed(self, sender: Any, /, *args: Any, signal: Any,
                               **kwargs: Any) -> None:
        self.aggregator.reset()
        self._last_offset.clear()

    async def _dead_letter(self,
        key: bytes | None, payload: Any, reason: str, detail: str, event: EventT, wall_ms: int
    ) -> Any:
        DEAD_LETTERED.labels(reason).inc()
        return await self.topics.dead_letter.send(
            key=key,
            value=dead_letter_message(payload, reason, detail, event.message.partition,
                                      event.message.offset, wall_ms),
        )

    async def _publish_closed(self, res: BatchResult, trigger: str) -> list[Any]:
        futs = []
        for bar in (*res.closed, *res.corrected):
            key = f"{bar['exchange']}:{bar['symbol']}".encode()
            futs.append(await self.topics.bars.send(key=key, value=orjson.dumps(bar)))
        if res.closed:
            BARS_CLOSED.labels(trigger).inc(len(res.closed))
        if res.corrected:
            BARS_CLOSED.labels("correction").inc(len(res.corrected))
        return futs

    async def handle_event(self, event: EventT) -> list[Any]:
        """Process one ``ticks`` message (see module docstring). Never raises on bad input.

        Returns:
            The changelog send futures that must complete before the message is acked.
        """
        msg = event.message
        wall_ms = now_ms()
        pending: list[Any] = []
        try:
            payload = decode_ticks_payload(event.value)
        except InvalidTick as exc:
            pending.append(await self._dead_letter(event.key, event.value, exc.reason, exc.detail,
                                              event, wall_ms))
            await asyncio.gather(*pending)
            return []
        if isinstance(payload, dict):  # control message
            if payload.get("control") != CONTROL_IDLE_CHECK or not isinstance(
                payload.get("wall_ms"), int
            ):
                pending.append(await self._dead_letter(event.key, payload, "bad_control",
                                                  "unknown control object", event, wall_ms))
                await asyncio.gather(*pending)
                return []
            res = self.aggregator.process_idle(msg.partition, payload["wall_ms"], wall_ms)
            last_logged_ms = self._stall_logged_ms.get(msg.partition, 0)
            if res.idle_clocks_restarted and wall_ms - last_logged_ms > _STALL_LOG_INTERVAL_MS:
                self._stall_logged_ms[msg.partition] = wall_ms
                log.warning("partition %d: idle check delivered %.1f s after it was written "
                            "(broker or consumer stalled): idle clocks of %d keys restarted",
                            msg.partition, (wall_ms - payload["wall_ms"]) / 1000,
                            res.idle_clocks_restarted, extra={"partition": msg.partition})
            trigger = "idle"
        else:
            TICKS_IN.inc(len(payload))
            ticks: list[Tick] = []
            max_future_ms = self.settings.window.max_future_ms
            for obj in payload:
                try:
                    ticks.append(parse_tick(obj, wall_ms, max_future_ms))
                except InvalidTick as exc:
                    pending.append(await self._dead_letter(event.key, obj, exc.reason, exc.detail,
                                                      event, wall_ms))
            res = self.aggregator.process_ticks(msg.partition, msg.offset, ticks, wall_ms)
            TICKS_APPLIED.inc(res.applied)
            if res.duplicates:
                DUPLICATE_TICKS.inc(res.duplicates)
            if res.duplicate_trades:
                DUPLICATE_TRADES.inc(res.duplicate_trades)
            if res.corrections:
                LATE_TICKS.inc(res.corrections)
                CORRECTIONS.inc(res.corrections)
            for t in res.late:
                LATE_TICKS.inc()
                pending.append(await self._dead_letter(
                    t.key.encode(), tick_to_json(t), "late", self.aggregator.late_detail(t),
                    event, wall_ms))
            if res.latest:
                self.redis_writes.update(res.latest)
                self.redis_writes.update_seconds(per_second(res.applied_ticks), msg.offset)
            WATERMARK_MS.labels(str(msg.partition)).set(self.aggregator.watermark(msg.partition))
            trigger = "watermark"
        live = [{**bar, "closed": True} for bar in (*res.closed, *res.corrected)]
        size_ms = self.settings.window.size_ms
        for key in res.dirty:
            exchange, symbol = key.split(":", 1)
            live += [{**finalize_bar(exchange, symbol, bar, size_ms), "closed": False}
                     for bar in self.store[key]["bars"].values()]
        if live:
            self.redis_writes.update_bars(live)
        pending.extend(await self._publish_closed(res, trigger))
        if pending:
            await asyncio.gather(*pending)  # broker acks before the state moves on
        # Snapshot now (bytes): the dicts keep changing while the producer buffer drains.
        return [self.table.send_changelog(msg.partition, key, orjson.dumps(self.store[key]),
                                            value_serializer="raw")
                for key in res.dirty]

    async def _handle_gap(self, p: int, start: int, end: int,
                          queue: asyncio.Queue[_AckItem]) -> None:
        """Handle the messages ``start..end-1`` of partition ``p`` the stream self.skipped."""
        events = await self.skipped.fetch(p, start, end)
        if events:
            SKIPPED_RECOVERED.inc(len(events))
            log.warning("partition %d: the stream self.skipped offsets %d..%d; %d message(s) read "
                        "back and handled", p, start, end - 1, len(events),
                        extra={"partition": p, "offset_from": start, "offset_to": end - 1})
        for ev in events:
            await queue.put((None, await self.handle_event(cast(EventT, ev))))
        await queue.put((_Gap(p, start, end - 1), []))

    async def _ack_in_order(self, stream: StreamT, queue: asyncio.Queue[_AckItem]) -> None:
        while True:
            event, futs = await queue.get()
            if futs:
                await asyncio.gather(*futs)  # a failed changelog write raises: never acked
            if isinstance(event, _Gap):  # read-back messages durable: commits may pass them
                await cast(Any, self.app.consumer)._add_gap(
                    TP(self.settings.topics.ticks, event.partition), event.first, event.last)
            elif event is not None:  # None: a read-back message, not tracked by Faust
                await stream.ack(event)

    async def aggregate_ticks(self, stream: StreamT) -> None:
        """Consume ``ticks`` and maintain the windows; one event per message (a tick batch).

        Acks are manual: :func:`_ack_in_order` acks each message once its changelog writes
        are durable, in arrival order (a bounded queue: back-pressure if the broker lags).
        A jump in a partition's offsets is filled first (:class:`SkippedMessages`), with
        either processing guarantee: transaction markers (``ticks`` has none of the
        worker's own, see :meth:`idle_check`; a transactional producer upstream adds some)
        read back as no records, so they only cost the read.
        """
        manual = cast(faust.Stream, stream).noack()
        queue: asyncio.Queue[_AckItem] = asyncio.Queue(maxsize=10_000)
        acker = asyncio.ensure_future(self._ack_in_order(manual, queue))
        try:
            async for event in manual.events():
                if acker.done():
                    acker.result()  # re-raise the changelog failure: crash, do not ack
                p, off = event.message.partition, event.message.offset
                last = self._last_offset.get(p)
                if last is not None and off > last + 1:
                    await self._handle_gap(p, last + 1, off, queue)
                if last is None or off > last:
                    self._last_offset[p] = off
                await queue.put((event, await self.handle_event(event)))
        finally:
            acker.cancel()

    async def idle_check(self) -> None:
        """Write an idle-check control message into each ``ticks`` partition this worker owns
        that has a window to close by idleness; the agent handles it in stream order (tables
        are only writable from there).

        The check is written by the app's plain producer, outside any transaction. With
        ``exactly_once`` every ``topic.send`` joins the open transaction of its partition,
        and Faust commits a transaction only together with newly acked offsets: a check
        sent once the partition has gone quiet would stay unreadable (``read_committed``)
        until the next tick arrived, and the last minute of a replay would never close.
        The check is only a trigger, so a crash after writing it loses nothing.
        """
        wall_ms = now_ms()
        value = control_message(wall_ms)
        ticks = self.settings.topics.ticks
        producer = self.app.producer
        for tp in self.app.assignor.assigned_actives():
            if tp.topic == ticks and self.aggregator.has_idle_work(tp.partition, wall_ms):
                await producer.send(ticks, None, value, tp.partition, None, None)

    async def consumer_lag(self) -> None:
        """Set ``marketflow_consumer_lag{topic,partition}`` for the ``ticks`` partitions this
        worker owns: the broker's high watermark (next offset to be written, as of the last
        fetch response; asked from the broker when none yet) minus the committed offset (next
        offset to read; the consumer position before the first commit). Label sets of
        partitions no longer assigned are removed."""
        consumer = self.app.consumer
        ticks = self.settings.topics.ticks
        tps = [tp for tp in self.app.assignor.assigned_actives() if tp.topic == ticks]
        committed_map = getattr(consumer, "_committed_offset", {})
        try:
            highs = {tp: consumer.highwater(tp) for tp in tps}
            missing = [tp for tp, h in highs.items() if h is None]
            if missing:
                highs.update(await consumer.highwaters(*missing))
            seen: set[tuple[str, str]] = set()
            for tp in tps:
                high = highs.get(tp)
                committed = committed_map.get(tp)
                if committed is None:
                    committed = await consumer.position(tp)
                if high is None or committed is None:
                    continue
                labels = (tp.topic, str(tp.partition))
                CONSUMER_LAG.labels(*labels).set(max(0, int(high) - int(committed)))
                seen.add(labels)
        except (KafkaError, ConsumerNotStarted, OSError, TimeoutError) as exc:
            log.warning("consumer lag: offsets unavailable (%s: %s)", type(exc).__name__, exc)
            return
        for labels in self._lag_labelled - seen:
            CONSUMER_LAG.remove(*labels)
        self._lag_labelled.clear()
        self._lag_labelled.update(seen)
