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
from faust.types import TP, EventT, StreamT

from app import settings
from app.faust_app import app
from app.services import latest_prices
from app.topics import bars_topic, dead_letter_topic, ticks_topic
from core.errors import InvalidTick
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
from query.price_stats import per_second
from tables.aggregator import BatchResult, WindowAggregator
from tables.bars import window_state
from tables.window import finalize_bar

__all__ = ["LAG_INTERVAL_S", "SkippedMessages", "aggregate_ticks", "aggregator", "consumer_lag",
           "idle_check", "skipped"]

log = logging.getLogger(__name__)

#: The table's raw store: changelog records are written explicitly (see module docstring).
store = window_state.data
aggregator = WindowAggregator(
    store,  # a faust StoreT is a MutableMapping
    grace_ms=settings.window.grace_ms,
    idle_timeout_ms=int(settings.window.idle_timeout_s * 1000),
    size_ms=settings.window.size_ms,
    late_policy=settings.window.late_policy,
    correction_horizon_ms=settings.window.correction_horizon_ms,
    # exactly_once: an idle check is readable only once its transaction commits
    stall_after_ms=int(settings.window.idle_timeout_s * 1000) + (
        int(app.conf.broker_commit_interval * 1000)
        if settings.app.processing_guarantee == "exactly_once" else 0),
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _dead_letter(
    key: bytes | None, payload: Any, reason: str, detail: str, event: EventT, wall_ms: int
) -> Any:
    DEAD_LETTERED.labels(reason).inc()
    return await dead_letter_topic.send(
        key=key,
        value=dead_letter_message(payload, reason, detail, event.message.partition,
                                  event.message.offset, wall_ms),
    )


async def _publish_closed(res: BatchResult, trigger: str) -> list[Any]:
    futs = []
    for bar in (*res.closed, *res.corrected):
        key = f"{bar['exchange']}:{bar['symbol']}".encode()
        futs.append(await bars_topic.send(key=key, value=orjson.dumps(bar)))
    if res.closed:
        BARS_CLOSED.labels(trigger).inc(len(res.closed))
    if res.corrected:
        BARS_CLOSED.labels("correction").inc(len(res.corrected))
    return futs


#: partition -> when a stalled idle check was last logged (at most one line per interval)
_stall_logged_ms: dict[int, int] = {}
_STALL_LOG_INTERVAL_MS = 10_000


async def handle_event(event: EventT) -> list[Any]:
    """Process one ``ticks`` message (see module docstring). Never raises on bad input.

    Returns:
        The changelog send futures that must complete before the message is acked.
    """
    msg = event.message
    wall_ms = _now_ms()
    pending: list[Any] = []
    try:
        payload = decode_ticks_payload(event.value)
    except InvalidTick as exc:
        pending.append(await _dead_letter(event.key, event.value, exc.reason, exc.detail,
                                          event, wall_ms))
        await asyncio.gather(*pending)
        return []
    if isinstance(payload, dict):  # control message
        if payload.get("control") != CONTROL_IDLE_CHECK or not isinstance(
            payload.get("wall_ms"), int
        ):
            pending.append(await _dead_letter(event.key, payload, "bad_control",
                                              "unknown control object", event, wall_ms))
            await asyncio.gather(*pending)
            return []
        res = aggregator.process_idle(msg.partition, payload["wall_ms"], wall_ms)
        if res.idle_clocks_restarted and wall_ms - _stall_logged_ms.get(msg.partition, 0) > (
                _STALL_LOG_INTERVAL_MS):
            _stall_logged_ms[msg.partition] = wall_ms
            log.warning("partition %d: idle check delivered %.1f s after it was written "
                        "(broker or consumer stalled): idle clocks of %d keys restarted",
                        msg.partition, (wall_ms - payload["wall_ms"]) / 1000,
                        res.idle_clocks_restarted, extra={"partition": msg.partition})
        trigger = "idle"
    else:
        TICKS_IN.inc(len(payload))
        ticks: list[Tick] = []
        max_future_ms = settings.window.max_future_ms
        for obj in payload:
            try:
                ticks.append(parse_tick(obj, wall_ms, max_future_ms))
            except InvalidTick as exc:
                pending.append(await _dead_letter(event.key, obj, exc.reason, exc.detail,
                                                  event, wall_ms))
        res = aggregator.process_ticks(msg.partition, msg.offset, ticks, wall_ms)
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
            pending.append(await _dead_letter(
                t.key.encode(), tick_to_json(t), "late", aggregator.late_detail(t),
                event, wall_ms))
        if res.latest:
            latest_prices.update(res.latest)
            latest_prices.update_seconds(per_second(res.applied_ticks))
        WATERMARK_MS.labels(str(msg.partition)).set(aggregator.watermark(msg.partition))
        trigger = "watermark"
    live = [{**bar, "closed": True} for bar in (*res.closed, *res.corrected)]
    for key in res.dirty:
        exchange, symbol = key.split(":", 1)
        live += [{**finalize_bar(exchange, symbol, bar, settings.window.size_ms), "closed": False}
                 for bar in store[key]["bars"].values()]
    if live:
        latest_prices.update_bars(live)
    pending.extend(await _publish_closed(res, trigger))
    if pending:
        await asyncio.gather(*pending)  # broker acks before the state moves on
    # Snapshot now (bytes): the dicts keep changing while the producer buffer drains.
    return [window_state.send_changelog(msg.partition, key, orjson.dumps(store[key]),
                                        value_serializer="raw")
            for key in res.dirty]


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

    def __init__(self, bootstrap_servers: list[str], topic: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None

    async def fetch(self, partition: int, start: int, end: int) -> list[_FetchedEvent]:
        """Records of ``partition`` with ``start <= offset < end``, in offset order."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                isolation_level="read_committed", auto_offset_reset="earliest")
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


skipped = SkippedMessages(settings.broker.bootstrap_servers, settings.topics.ticks)
app.before_stop(skipped.close)
#: partition -> offset of the last ``ticks`` message handled in this assignment
_last_offset: dict[int, int] = {}


async def _handle_gap(p: int, start: int, end: int,
                      queue: asyncio.Queue[_AckItem]) -> None:
    """Handle the messages ``start..end-1`` of partition ``p`` the stream skipped."""
    events = await skipped.fetch(p, start, end)
    if events:
        SKIPPED_RECOVERED.inc(len(events))
        log.warning("partition %d: the stream skipped offsets %d..%d; %d message(s) read "
                    "back and handled", p, start, end - 1, len(events),
                    extra={"partition": p, "offset_from": start, "offset_to": end - 1})
    for ev in events:
        await queue.put((None, await handle_event(cast(EventT, ev))))
    await queue.put((_Gap(p, start, end - 1), []))


@dataclass(frozen=True)
class _Gap:
    """Offsets ``first..last`` of a ``ticks`` partition handled outside the stream."""

    partition: int
    first: int
    last: int


_AckItem = tuple["EventT | _Gap | None", list[Any]]


async def _ack_in_order(stream: StreamT, queue: asyncio.Queue[_AckItem]) -> None:
    while True:
        event, futs = await queue.get()
        if futs:
            await asyncio.gather(*futs)  # a failed changelog write raises: never acked
        if isinstance(event, _Gap):  # read-back messages durable: commits may pass them
            await cast(Any, app.consumer)._add_gap(
                TP(settings.topics.ticks, event.partition), event.first, event.last)
        elif event is not None:  # None: a read-back message, not tracked by Faust
            await stream.ack(event)


@app.agent(ticks_topic)
async def aggregate_ticks(stream: StreamT) -> None:
    """Consume ``ticks`` and maintain the windows; one event per message (a tick batch).

    Acks are manual: :func:`_ack_in_order` acks each message once its changelog writes
    are durable, in arrival order (a bounded queue: back-pressure if the broker lags).
    A jump in a partition's offsets is filled first (:class:`SkippedMessages`; at least
    once only: with ``exactly_once`` transaction markers make jumps normal).
    """
    manual = cast(faust.Stream, stream).noack()
    # with transactions, commit markers leave offset gaps of their own in ``ticks``
    check_gaps = settings.app.processing_guarantee == "at_least_once"
    queue: asyncio.Queue[_AckItem] = asyncio.Queue(maxsize=10_000)
    acker = asyncio.ensure_future(_ack_in_order(manual, queue))
    try:
        async for event in manual.events():
            if acker.done():
                acker.result()  # re-raise the changelog failure: crash, do not ack
            if check_gaps:
                p, off = event.message.partition, event.message.offset
                last = _last_offset.get(p)
                if last is not None and off > last + 1:
                    await _handle_gap(p, last + 1, off, queue)
                if last is None or off > last:
                    _last_offset[p] = off
            await queue.put((event, await handle_event(event)))
    finally:
        acker.cancel()


@app.timer(interval=settings.window.idle_check_interval_s)
async def idle_check() -> None:
    """Write an idle-check control message into each ``ticks`` partition this worker owns
    that has a window to close by idleness; the agent handles it in stream order (tables
    are only writable from there)."""
    now_ms = _now_ms()
    value = control_message(now_ms)
    for tp in app.assignor.assigned_actives():
        if tp.topic == settings.topics.ticks and aggregator.has_idle_work(tp.partition, now_ms):
            await ticks_topic.send(value=value, partition=tp.partition)


@app.on_partitions_revoked.connect
def _on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    aggregator.reset()
    _last_offset.clear()


@app.on_partitions_assigned.connect
def _on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    aggregator.reset()
    _last_offset.clear()


# ---- consumer lag (marketflow_consumer_lag{topic,partition}, see core/metrics.py)

#: interval of the consumer-lag gauge update, seconds
LAG_INTERVAL_S = 5.0
_lag_labelled: set[tuple[str, str]] = set()


@app.timer(interval=LAG_INTERVAL_S)
async def consumer_lag() -> None:
    """Set ``marketflow_consumer_lag{topic,partition}`` for the ``ticks`` partitions this
    worker owns: the broker's high watermark (next offset to be written, as of the last
    fetch response; asked from the broker when none yet) minus the committed offset (next
    offset to read; the consumer position before the first commit). Label sets of
    partitions no longer assigned are removed."""
    consumer = app.consumer
    tps = [tp for tp in app.assignor.assigned_actives() if tp.topic == settings.topics.ticks]
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
    for labels in _lag_labelled - seen:
        CONSUMER_LAG.remove(*labels)
    _lag_labelled.clear()
    _lag_labelled.update(seen)
