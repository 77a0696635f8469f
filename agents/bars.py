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
from typing import Any, cast

import faust
import orjson
from aiokafka.errors import KafkaError
from faust.exceptions import ConsumerNotStarted
from faust.types import EventT, StreamT, TableT

from agents.skipped import (
    STALL_CHECK_INTERVAL_S,
    FetchedEvent,
    OffsetGuard,
    SkippedMessages,
)
from core.config import Settings
from core.errors import InvalidTick
from core.metrics import (
    BARS_CLOSED,
    CONSUMER_LAG,
    CORRECTIONS,
    DEAD_LETTERED,
    DUPLICATE_TICKS,
    DUPLICATE_TRADES,
    LATE_TICKS,
    TICKS_APPLIED,
    TICKS_IN,
    WATERMARK_MS,
)
from core.models import (
    CONTROL_IDLE_CHECK,
    TickList,
    control_message,
    dead_letter_message,
    decode_ticks_payload,
    parse_ticks,
    tick_to_json,
)
from core.timeutil import now_ms
from core.topics import Topics
from query.price_stats import per_second, per_second_columns
from stores.buffer import RedisWriteBuffer
from tables.aggregator import BatchResult, WindowAggregator
from tables.window import encode_state, finalize_bar

__all__ = ["LAG_INTERVAL_S", "BarAggregation"]

log = logging.getLogger(__name__)

#: interval of the consumer-lag gauge update, seconds
LAG_INTERVAL_S = 5.0
_STALL_LOG_INTERVAL_MS = 10_000


_AckItem = tuple["EventT | FetchedEvent", list[Any]]


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
        self.guard = OffsetGuard(app, self.skipped, settings.app.id, agent="bars")
        self._ack_queue: asyncio.Queue[_AckItem] | None = None
        #: partition -> when a stalled idle check was last logged (one line per interval)
        self._stall_logged_ms: dict[int, int] = {}
        self._lag_labelled: set[tuple[str, str]] = set()

    def register(self) -> None:
        """Register the agent (name ``agents.bars.aggregate_ticks``), the idle-check,
        consumer-lag and skipped-tail (:meth:`stall_check`) timers, the partition hooks and
        the read-back consumer's shutdown."""
        app = self.app
        app.agent(self.topics.ticks, name="agents.bars.aggregate_ticks")(self.aggregate_ticks)
        app.timer(interval=self.settings.window.idle_check_interval_s)(self.idle_check)
        app.timer(interval=LAG_INTERVAL_S)(self.consumer_lag)
        app.timer(interval=STALL_CHECK_INTERVAL_S)(self.stall_check)
        app.on_partitions_revoked.connect(self._on_partitions_changed)
        app.on_partitions_assigned.connect(self._on_partitions_changed)
        cast(Any, app).before_stop(self.skipped.close)

    def _on_partitions_changed(self, sender: Any, /, *args: Any, signal: Any,
                               **kwargs: Any) -> None:
        self.aggregator.reset()
        self.guard.reset()

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
        if isinstance(payload, dict) and "control" in payload:  # control message
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
            ticks, rejected = parse_ticks(payload, wall_ms, self.settings.window.max_future_ms)
            TICKS_IN.inc(len(ticks) + len(rejected))  # a malformed columnar batch counts once
            for obj, err in rejected:
                pending.append(await self._dead_letter(event.key, obj, err.reason, err.detail,
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
            for t, err in res.invalid:
                pending.append(await self._dead_letter(
                    t.key.encode(), tick_to_json(t), err.reason, err.detail, event, wall_ms))
            if res.latest:
                self.redis_writes.update(res.latest)
                if type(ticks) is TickList and res.applied == len(ticks):  # all of it
                    seconds = per_second_columns(ticks[0].key, ticks.ts_ms, ticks.price)
                else:
                    seconds = per_second(res.applied_ticks)
                self.redis_writes.update_seconds(seconds, msg.offset)
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
        return [self.table.send_changelog(msg.partition, key, encode_state(self.store[key]),
                                            value_serializer="raw")
                for key in res.dirty]

    async def _handle_gap(self, p: int, start: int, end: int,
                          queue: asyncio.Queue[_AckItem]) -> None:
        """Handle the messages ``start..end-1`` of partition ``p`` the stream skipped."""
        for ev in await self.guard.read_back(p, start, end):
            await queue.put((ev, await self.handle_event(cast(EventT, ev))))

    async def _ack_in_order(self, stream: StreamT, queue: asyncio.Queue[_AckItem]) -> None:
        while True:
            event, futs = await queue.get()
            if futs:
                await asyncio.gather(*futs)  # a failed changelog write raises: never acked
            if isinstance(event, FetchedEvent):  # read back: not tracked by Faust
                await self.guard.ack(event)
            else:
                await stream.ack(event)

    async def aggregate_ticks(self, stream: StreamT) -> None:
        """Consume ``ticks`` and maintain the windows; one event per message (a tick batch).

        Acks are manual: :func:`_ack_in_order` acks each message once its changelog writes
        are durable, in arrival order (a bounded queue: back-pressure if the broker lags).
        A jump in a partition's offsets, or a first message of an assignment past the
        offset the group starts at, is filled first (:class:`SkippedMessages`), with
        either processing guarantee: transaction markers (``ticks`` has none of the
        worker's own, see :meth:`idle_check`; a transactional producer upstream adds some)
        read back as no records, so they only cost the read.
        """
        manual = cast(faust.Stream, stream).noack()
        queue: asyncio.Queue[_AckItem] = asyncio.Queue(maxsize=10_000)
        acker = asyncio.ensure_future(self._ack_in_order(manual, queue))
        try:
            self._ack_queue = queue
            async for event in manual.events():
                if acker.done():
                    acker.result()  # re-raise the changelog failure: crash, do not ack
                async with self.guard.lock:
                    p = event.message.partition
                    missing = await self.guard.missing_before(p, event.message.offset)
                    if missing is not None:
                        await self._handle_gap(p, *missing, queue)
                    await queue.put((event, await self.handle_event(event)))
        finally:
            self._ack_queue = None
            acker.cancel()

    async def stall_check(self) -> None:
        """Handle ``ticks`` records the stream skipped with no message after them
        (:meth:`agents.skipped.OffsetGuard.stalled_ranges`), while the agent waits."""
        queue = self._ack_queue
        if queue is None or self.guard.lock.locked():
            return
        async with self.guard.lock:
            for p, start, end in await self.guard.stalled_ranges():
                await self._handle_gap(p, start, end, queue)

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
