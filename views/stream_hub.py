"""The stream hub behind ``GET /stream`` (``docs/stream.md``): one per worker, shared by
all its sockets.

* **Input.** One Redis subscription to the channel :mod:`stores.stream_channel`, on which
  every worker publishes the live 1-minute bars and latest prices it writes; so a socket
  on any worker gets every symbol. The replay state is polled from Redis
  (:mod:`stores.replay_control`) while someone subscribes to it.
* **Bars.** One :class:`BarFeed` per distinct (symbol, exchange or consolidated, interval)
  that some socket subscribes to. The hub keeps the live 1-minute bars of the subscribed
  symbols (a newer state of a bar, by trade count then ``closed``, wins); a feed computes
  its dirty buckets from them and TimescaleDB (:mod:`query.live_series`; a 1-minute
  series of one exchange is the live bar itself), at most ``stream.max_updates_per_s``
  times a second, and hands the bars that changed to its subscriptions. A bucket is over
  when event time passed its end (a later minute of the series was seen, or its last
  minute closed), or when the series got no live bar for ``window.idle_timeout_s`` + 1 s
  (the event clock of a finished replay stops); it is closed when over and none of its
  minutes is open.
* **Sockets.** Each :class:`Connection` has an :class:`Outbox` that coalesces pending
  frames per (subscription, bucket / price item / replay): a slow reader gets the newest
  state, never a growing queue. The outbox holds at most ``stream.max_queued_frames``
  entries; beyond, or when one send blocks longer than 10 s (:data:`views.stream.SEND_TIMEOUT_S`,
  checked each second by the hub's watchdog), the
  socket is closed with code 4008 (``slow consumer``). Frames of a subscription are
  numbered (``seq``) when they are sent, so the numbers have no gaps. While a socket has
  nothing pending, its frames of one loop turn skip the outbox and go out in one
  transport write (:class:`WriteBatcher`).
* **Throttle.** Sockets are dealt in turn into :data:`PHASES` groups
  (:attr:`Connection.phase`); group ``p``'s rounds of 1/``max_updates_per_s`` s start
  ``p``/:data:`PHASES` of a round after the worker's (:meth:`StreamHub.round_no`). An
  item (price item, or bucket of a bar series) goes to a group at most once per round
  of the group (:class:`Audience`): at once when the group has not had it in the
  current round, else at the group's next round start, with the newest state. So a
  socket still gets each item at most ``max_updates_per_s`` times a second and a
  change waits at most one round, but the held-back items leave in :data:`PHASES`
  bursts spread over the round, one per group, instead of one burst for all sockets
  that stalls the event loop (and the agent sharing it) and the clients alike.
  A rollup series, computed at most once per round, is sent to every group at once
  (:meth:`Audience.send_now`).
* **Snapshot then updates.** A feed (or price item) is registered before its snapshot is
  read, so a change published meanwhile is held; the snapshot is taken from the hub's
  state, and a subscription is sent a bar only when it differs from what it last got.
  After the Redis subscription was lost, every subscription gets a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from mode import Service
from redis.exceptions import RedisError

from core.config import Settings
from core.errors import MarketflowError, StorageUnavailable
from core.metrics import (
    STREAM_CONNECTIONS,
    STREAM_DISCONNECTS,
    STREAM_FRAMES,
    STREAM_SUBSCRIPTIONS,
)
from core.timeutil import MINUTE_MS, floor_minute, live_window_ms
from query.live_series import bucket_bars, minute_bar
from query.series import INTERVALS_MS, Bar
from sql.pool import Database
from stores.keys import stream_channel
from stores.latest import LatestPriceStore
from stores.live_bars import LiveBarStore
from stores.rate_limit import SLOT_RENEW_S, StreamSlots
from stores.replay_control import STATE_INTERVAL_S, read_state, status_body
from stores.stream_channel import StreamChange, decode_change
from views.stream_protocol import PriceItem, Subscribe, error_frame

__all__ = ["CLOSE_SLOW", "PHASES", "Audience", "BarFeed", "BarUpdate", "Connection", "Outbox",
           "StreamHub", "Subscription", "WriteBatcher", "close_stalled", "ws_text_frame"]

log = logging.getLogger(__name__)

#: close code for a client that does not keep up
CLOSE_SLOW = 4008
#: the start of each subscription frame, by type
_FRAME_HEAD = {kind: b'{"type":"' + kind.encode() + b'","id":'
               for kind in ("snapshot", "bar", "price", "replay")}
#: most buckets a subscription remembers (what it was sent, which it was sent closed)
_SUB_MEMORY = 64
_RETRY_S = 1.0
#: sockets written per event-loop callback when the batched frames are flushed
_FLUSH_SLICE = 100
#: socket groups (phases) per throttle round (module docstring, "Throttle")
PHASES = 10


@dataclass(frozen=True)
class BarUpdate:
    """A bar as the hub pushes it: serialised once, shared by every subscription.

    Attributes:
        bucket_ms: bucket start, UTC epoch ms.
        closed: the bar's ``closed``.
        data: the bar as JSON.
        bar: the bar.
    """

    bucket_ms: int
    closed: bool
    data: bytes
    bar: Bar


@dataclass(eq=False)
class Subscription:
    """One subscription of a socket.

    Attributes:
        request: what the client asked for.
        seq: number of the last frame sent (0 before the snapshot).
        snapshotted: the snapshot is queued; updates may follow.
        sent: bucket -> JSON of the bar last sent (dedupe), at most 64 buckets.
        closed_sent: buckets already sent with ``closed: true``.
        first_bucket_ms: the snapshot's first bucket (older buckets are corrections).
        feed: the bar feed, for a bars subscription.
    """

    request: Subscribe
    seq: int = 0
    snapshotted: bool = False
    sent: dict[int, bytes] = field(default_factory=dict)
    closed_sent: set[int] = field(default_factory=set)
    first_bucket_ms: int | None = None
    feed: BarFeed | None = None
    #: the client's id, and as JSON (for the frame header)
    sub_id: str = field(init=False)
    id_json: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.sub_id = self.request.sub_id
        self.id_json = orjson.dumps(self.sub_id)


class Outbox:
    """Pending frames of one socket, coalesced by key (a newer item for a key replaces the
    pending one and keeps its place), at most ``max_items`` keys.

    Args:
        max_items: most pending keys.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: dict[Hashable, Any] = {}
        #: the waiting :meth:`get`'s future (a bare future: cheaper than an Event, and
        #: this is on the path of every frame)
        self._waiter: asyncio.Future[None] | None = None
        #: set when a put found the outbox full
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put(self, key: Hashable, item: Any) -> bool:
        """Queue ``item`` under ``key``. Returns False (and sets :attr:`overflowed`) when
        ``key`` is new and the outbox is full."""
        items = self._items
        if key not in items and len(items) >= self.max_items:
            self.overflowed = True
            self._wake()
            return False
        items[key] = item
        self._wake()
        return True

    def discard(self, prefix: str) -> None:
        """Drop the pending items whose key is a tuple starting with ``prefix``."""
        for k in [k for k in self._items if isinstance(k, tuple) and k[0] == prefix]:
            del self._items[k]

    async def get(self) -> tuple[Hashable, Any]:
        """The oldest pending ``(key, item)``, waiting for one.

        Raises:
            MarketflowError: the outbox overflowed (the caller closes the socket).
        """
        while not self._items or self.overflowed:
            if self.overflowed:
                raise MarketflowError("outbox overflowed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        key = next(iter(self._items))
        return key, self._items.pop(key)


def ws_text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked WebSocket text frame carrying ``payload`` (a server's
    frame: RFC 6455 section 5.2, FIN set, opcode 0x1, 7-, 16- or 64-bit length)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


class WriteBatcher:
    """Gathers the frames that sockets get during one turn of the event loop and writes
    each socket's frames with one transport write on the next turn.

    One price or bar update goes to every socket of a phase group that watches it, and
    the throttle lets a group's held-back items out at the same round boundary
    (:meth:`StreamHub._ticker`), so a socket gets its prices and bars together: one write
    (one system call) for all of them instead of one per frame. The flush writes
    :data:`_FLUSH_SLICE` sockets per callback, so the agent sharing the loop runs in
    between.
    """

    def __init__(self) -> None:
        self._pending: dict[Connection, None] = {}  # insertion-ordered set
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        """Flush ``conn``'s batch on the next turn of the loop."""
        self._pending[conn] = None
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write up to :data:`_FLUSH_SLICE` pending sockets; schedule the rest."""
        self._scheduled = False
        for _ in range(min(_FLUSH_SLICE, len(self._pending))):
            conn = next(iter(self._pending))
            del self._pending[conn]
            conn.flush_batch()
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)


class Connection:
    """One ``/stream`` socket: its subscriptions, its outbox and the task that writes it.

    Args:
        ws: the prepared WebSocket.
        client_id: the access guard's client id (for logs), or the peer address.
        max_queued: the outbox bound (``stream.max_queued_frames``).
        send_timeout_s: longest a single send may block.
        transport: the socket's transport (``request.transport``). With it (and
            ``batcher``), while nothing is pending and the transport's buffer is empty, a
            frame is framed here and written by ``batcher`` with the socket's other frames
            of this loop turn (no task wake-up per frame); otherwise it goes through the
            outbox and the writer task (aiohttp's writer, which waits for the socket).
            The view's sockets never use per-message deflate, so frames are plain.
        batcher: the hub's :class:`WriteBatcher`.
    """

    _ids = itertools.count(1)

    def __init__(self, ws: web.WebSocketResponse, client_id: str, max_queued: int,
                 send_timeout_s: float, transport: asyncio.BaseTransport | None = None,
                 batcher: WriteBatcher | None = None) -> None:
        self.ws = ws
        #: the socket's transport: a frame is written at once when its buffer is empty
        self.transport = cast(asyncio.WriteTransport | None, transport)
        self.client_id = client_id
        self.conn_id = next(self._ids)
        #: the socket's throttle group (module docstring, "Throttle")
        self.phase = self.conn_id % PHASES
        #: unique across the cluster (the member of its client slots in Redis)
        self.socket_uid = uuid.uuid4().hex
        self.subs: dict[str, Subscription] = {}
        self.outbox = Outbox(max_queued)
        self.send_timeout_s = send_timeout_s
        self.close_reason: str | None = None
        self._control = itertools.count()
        self.frames_sent = 0
        #: when the send in progress started (monotonic s), None between sends
        self.send_started_s: float | None = None
        #: the writer task (set by the view)
        self.writer_task: asyncio.Future[None] | None = None
        #: frames sent by type since the hub last added them to the metric
        self.frame_counts: dict[str, int] = {}
        #: the writer waits for the outbox (then a frame may be written at once)
        self._writer_idle = False
        self.batcher = batcher
        #: framed frames (bytes) waiting for the batcher's write
        self._batch: list[bytes] = []

    # -- queueing (called by the hub and the view; never blocks) -----------------------

    def control(self, frame: dict[str, Any]) -> None:
        """Queue a frame that belongs to no subscription (welcome, error, pong, ...)."""
        self.flush_batch()  # frames already framed go first
        self.outbox.put(("", next(self._control)), ("control", None, frame))

    def push(self, sub: Subscription, kind: str, item: Hashable, payload: Any) -> None:
        """Queue a subscription's frame (``kind`` ``snapshot``/``bar``/``price``/
        ``replay``), coalesced per (subscription, kind, item)."""
        if self.subs.get(sub.sub_id) is not sub:
            return  # unsubscribed meanwhile
        if self._batch or (self._writer_idle and not self.outbox and self._writable()):
            data = self._frame(kind, sub, payload)
            if data is not None:
                if not self._batch:
                    cast(WriteBatcher, self.batcher).add(self)
                self._batch.append(ws_text_frame(data))
            return
        self.outbox.put((sub.sub_id, kind, item), (kind, sub, payload))

    def _writable(self) -> bool:
        """Whether a frame can skip the outbox: batching on, the socket open and its
        transport's buffer empty (the client keeps up)."""
        transport = self.transport
        return (self.batcher is not None and transport is not None and not self.ws.closed
                and not transport.is_closing() and not transport.get_write_buffer_size())

    def flush_batch(self) -> None:
        """Write the batched frames with one transport write (called by the batcher, and
        before anything goes through the outbox so that frames stay in order). Frames of
        a socket that is closing meanwhile are dropped with it."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        transport = self.transport
        if transport is None or transport.is_closing() or self.ws.closed:
            log.debug("stream: socket %d closed with %d frame(s) unsent", self.conn_id,
                      len(batch))
            return
        transport.write(b"".join(batch))
        self.frames_sent += len(batch)

    # -- writing ------------------------------------------------------------------------

    def _frame(self, kind: str, sub: Subscription | None, payload: Any) -> bytes | None:
        """Serialise one pending item (None: nothing to send any more)."""
        if sub is None:
            kind = str(payload.get("type", "control"))
            self.frame_counts[kind] = self.frame_counts.get(kind, 0) + 1
            return orjson.dumps(payload)
        if self.subs.get(sub.sub_id) is not sub:
            return None
        if kind == "bar":
            upd: BarUpdate = payload
            if sub.sent.get(upd.bucket_ms) == upd.data:
                return None
            data = upd.data
            if upd.closed:
                old = sub.first_bucket_ms is not None and upd.bucket_ms < sub.first_bucket_ms
                if upd.bucket_ms in sub.closed_sent or old or upd.bar.get("correction"):
                    data = orjson.dumps({**upd.bar, "correction": True})
                _remember(sub.closed_sent, upd.bucket_ms)
            sub.sent[upd.bucket_ms] = upd.data
            if len(sub.sent) > _SUB_MEMORY:
                del sub.sent[min(sub.sent)]
            body = b'"bar":' + data
        elif kind == "snapshot":
            body = payload[1:-1]  # a JSON object without its braces
        elif kind == "price":
            body = b'"price":' + payload
        else:  # replay
            body = b'"replay":' + payload
        sub.seq += 1
        self.frame_counts[kind] = self.frame_counts.get(kind, 0) + 1
        return (_FRAME_HEAD[kind] + sub.id_json + b',"seq":' + str(sub.seq).encode() + b","
                + body + b"}")

    async def writer(self) -> None:
        """Send pending frames until the socket closes; closes it (4008) when the client
        falls too far behind (a send blocked too long is stopped by :func:`close_stalled`)."""
        ws = self.ws
        try:
            while not ws.closed:
                try:
                    self._writer_idle = not self.outbox
                    _, (kind, sub, payload) = await self.outbox.get()
                    self._writer_idle = False
                except MarketflowError:
                    await self.close(CLOSE_SLOW, "slow consumer", "slow_consumer")
                    return
                data = self._frame(kind, sub, payload)
                if data is None:
                    continue
                # no timeout task per send (that cost a third of the fan-out's CPU): the
                # hub's watchdog (StreamHub._watchdog) closes a socket whose send blocks
                self.send_started_s = time.monotonic()
                await ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                self.send_started_s = None
                self.frames_sent += 1
        except (ConnectionError, RuntimeError) as exc:  # peer gone, or closing meanwhile
            log.debug("stream: socket %d write ended: %s", self.conn_id, exc)
        except Exception:
            log.exception("stream: socket %d writer failed; closing it", self.conn_id)
            await self.close(1011, "internal error", "writer_error")

    async def close(self, code: int, message: str, reason: str) -> None:
        """Close the socket with ``code``/``message``, counting ``reason``."""
        if self.close_reason is None:
            self.close_reason = reason
            STREAM_DISCONNECTS.labels(reason).inc()
            log.info("stream: closing socket %d (%s): %s", self.conn_id, self.client_id,
                     reason)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message.encode()), 2.0)
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("stream: socket %d close: %s", self.conn_id, exc)


def close_stalled(connections: Iterable[Connection], now_s: float) -> list[asyncio.Future[None]]:
    """Stop the writers of the sockets whose current send started more than their send
    timeout before ``now_s`` (monotonic s), and start closing them (code 4008, reason
    ``send_timeout``). Returns the closing tasks."""
    tasks: list[asyncio.Future[None]] = []
    for conn in list(connections):
        started = conn.send_started_s
        if started is not None and now_s - started > conn.send_timeout_s:
            if conn.writer_task is not None:
                conn.writer_task.cancel()
            conn.send_started_s = None
            tasks.append(asyncio.ensure_future(
                conn.close(CLOSE_SLOW, "slow consumer", "send_timeout")))
    return tasks


def _fan_out(subs: dict[Subscription, Connection], kind: str, item: Hashable,
             payload: Any) -> None:
    """Push one update to every snapshotted subscription of ``subs`` (the writes happen
    on the next loop turn, batched per socket by :class:`WriteBatcher`)."""
    for sub, conn in list(subs.items()):
        if sub.snapshotted:
            conn.push(sub, kind, item, payload)


def _remember(s: set[int], bucket_ms: int) -> None:
    s.add(bucket_ms)
    if len(s) > _SUB_MEMORY:
        s.discard(min(s))


def _replay_key(state: dict[str, Any] | None) -> Any:
    """What makes a replay state change worth a frame at once (not only the clock)."""
    if state is None:
        return None
    return state.get("session"), state.get("state"), state.get("speed"), state.get("ack")


def _version(bar: dict[str, Any]) -> tuple[int, bool]:
    return int(bar.get("trade_count") or 0), bool(bar.get("closed"))


def _frontier(bar: dict[str, Any]) -> int:
    """How far event time is known to have reached from a live 1-minute bar (ms)."""
    start = int(bar["bucket_start_ms"])
    return start + MINUTE_MS if bar.get("closed") else start


class Audience:
    """The subscriptions to one price item or bar series, by phase group
    (:attr:`Connection.phase`), and the group throttle (module docstring, "Throttle").

    :meth:`publish` hands an update of an item (a price item key, or a bucket start) to
    each group that has not had one in its current round (:meth:`StreamHub.round_no` of
    the group), and keeps it, coalesced per item, for the others until
    :meth:`flush` at their next round start (:meth:`StreamHub._ticker`).

    Args:
        hub: the hub (rounds, and the groups due at each round start).
        kind: the frame type of the updates (``price`` or ``bar``).
    """

    __slots__ = ("_pending", "_round", "groups", "hub", "kind")

    def __init__(self, hub: StreamHub, kind: str) -> None:
        self.hub = hub
        self.kind = kind
        #: phase -> subscriptions of that group
        self.groups: dict[int, dict[Subscription, Connection]] = {}
        #: phase -> the group's round in which it was last sent an update
        self._round: dict[int, int] = {}
        #: phase -> item -> the newest update held back for that group
        self._pending: dict[int, dict[Hashable, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def add(self, sub: Subscription, conn: Connection) -> None:
        """Add ``conn``'s subscription ``sub`` to its group."""
        self.groups.setdefault(conn.phase, {})[sub] = conn

    def remove(self, sub: Subscription, conn: Connection) -> None:
        """Drop ``sub`` (a no-op when it is not here); an empty group is forgotten."""
        group = self.groups.get(conn.phase)
        if group is None:
            return
        group.pop(sub, None)
        if not group:
            del self.groups[conn.phase]
            self._round.pop(conn.phase, None)
            self._pending.pop(conn.phase, None)

    def items(self) -> list[tuple[Subscription, Connection]]:
        """Every (subscription, connection), all groups."""
        return [pair for group in self.groups.values() for pair in group.items()]

    def publish(self, item: Hashable, payload: Any) -> None:
        """A newer state of ``item``: sent now to the groups that had no update in their
        current round (with anything still held for them first), held for the others."""
        hub = self.hub
        for phase, subs in self.groups.items():
            r = hub.round_no(phase)
            if self._round.get(phase) != r:
                self._round[phase] = r
                pending = self._pending.pop(phase, None)
                if pending:
                    pending.pop(item, None)
                    for held, data in pending.items():
                        _fan_out(subs, self.kind, held, data)
                _fan_out(subs, self.kind, item, payload)
            else:
                self._pending.setdefault(phase, {})[item] = payload
                hub.due(phase, self)

    def send_now(self, item: Hashable, payload: Any) -> None:
        """Send ``item``'s newer state to every group at once, bypassing the group
        throttle (for a series that is computed at most once per round anyway: held for a
        group, each state would wait for that group's round start)."""
        for phase, subs in self.groups.items():
            pending = self._pending.get(phase)
            if pending:
                pending.pop(item, None)
            _fan_out(subs, self.kind, item, payload)

    def flush(self, phase: int) -> None:
        """Group ``phase``'s round started: send what was held back for it."""
        pending = self._pending.pop(phase, None)
        subs = self.groups.get(phase)
        if not pending or not subs:
            return
        self._round[phase] = self.hub.round_no(phase)
        for item, data in pending.items():
            _fan_out(subs, self.kind, item, data)


class BarFeed:
    """The bars of one series for every subscription to it (module docstring).

    Args:
        hub: the hub (live-bar cache, stores, settings).
        symbol: the symbol.
        exchange: one exchange, None = consolidated.
        interval: an interval name of :data:`query.series.INTERVALS_MS`.
    """

    def __init__(self, hub: StreamHub, symbol: str, exchange: str | None,
                 interval: str) -> None:
        self.hub = hub
        self.symbol = symbol
        self.exchange = exchange
        self.interval = interval
        self.interval_ms = INTERVALS_MS[interval]
        self.subs = Audience(hub, "bar")
        #: a 1-minute series of one exchange is computed from memory alone, at most once
        #: per phase slot; other series query TimescaleDB, at most once per round
        self.cheap = interval == "1m" and exchange is not None
        self.bars: dict[int, BarUpdate] = {}
        self.frontier_ms: int | None = None
        self.first_bucket_ms: int | None = None
        self.dirty: set[int] = set()
        self.reload = True
        self.wake = asyncio.Event()
        self.wake.set()
        self.task: asyncio.Task[None] | None = None
        #: when the series last got a live bar (monotonic s)
        self.last_live_s = time.monotonic()

    @property
    def key(self) -> tuple[str, str | None, str]:
        """``(symbol, exchange, interval)``."""
        return self.symbol, self.exchange, self.interval

    def matches(self, bar: dict[str, Any]) -> bool:
        """Whether a live bar of this feed's symbol belongs to the series."""
        return self.exchange is None or bar["exchange"] == self.exchange

    def on_live_bar(self, bar: dict[str, Any]) -> None:
        """A newer live 1-minute bar of the series arrived: its bucket is dirty, and
        buckets that event time has now passed are re-checked for closing."""
        iv = self.interval_ms
        start = int(bar["bucket_start_ms"])
        f = _frontier(bar)
        if self.frontier_ms is None or f > self.frontier_ms:
            self.frontier_ms = f
            self.dirty.update(b for b, u in self.bars.items() if not u.closed and b + iv <= f)
        self.dirty.add(start - start % iv)
        self.last_live_s = time.monotonic()
        self.wake.set()

    def _closed(self, bar: Bar) -> bool:
        end = int(bar["bucket_start_ms"]) + self.interval_ms
        over = (self.frontier_ms is not None and end <= self.frontier_ms) or (
            time.monotonic() - self.last_live_s >= self.hub.idle_s)
        return bool(bar["closed"]) and over

    async def _compute(self, buckets: set[int]) -> list[Bar]:
        """The bars of ``buckets`` from the live cache and TimescaleDB.

        Raises:
            StorageUnavailable: the database failed.
        """
        cache = self.hub.live.get(self.symbol, {})
        if self.interval_ms == MINUTE_MS and self.exchange is not None:
            return [minute_bar(cache[(self.exchange, b)]) for b in sorted(buckets)
                    if (self.exchange, b) in cache]
        lo, hi = min(buckets), max(buckets) + self.interval_ms
        live = [b for (ex, start), b in cache.items()
                if lo <= start < hi and (self.exchange is None or ex == self.exchange)]
        bars = await bucket_bars(self.hub.database, self.symbol, self.exchange, lo, hi,
                                 self.interval_ms, live)
        for bar in bars:
            bar["closed"] = self._closed(bar)
        return [b for b in bars if b["bucket_start_ms"] in buckets]

    async def _load(self) -> None:
        """(Re)build the feed's state from Redis and TimescaleDB, then send a snapshot to
        every subscription.

        Raises:
            StorageUnavailable: the database failed.
            redis.exceptions.RedisError, OSError: Redis failed.
        """
        hub = self.hub
        iv = self.interval_ms
        latest = await hub.latest.get(self.symbol, self.exchange)
        cache = hub.live.setdefault(self.symbol, {})
        seen = [b for (ex, _), b in cache.items() if self.exchange in (None, ex)]
        newest = max(([latest["ts_ms"]] if latest else [])
                     + [int(b["bucket_start_ms"]) for b in seen], default=None)
        self.bars.clear()
        self.dirty.clear()
        if newest is None:
            self.first_bucket_ms = None
        else:
            window = live_window_ms(hub.grace_ms)
            lo = newest - window
            lo -= lo % iv
            hi = floor_minute(newest) + 2 * MINUTE_MS
            hi += -hi % iv
            live_lo = max(lo, floor_minute(newest) - window)
            for bar in await hub.live_bars.live_bars(self.symbol, self.exchange, live_lo, hi):
                hub.merge_live(bar)
            for bar in cache.values():
                if self.matches(bar):
                    f = _frontier(bar)
                    self.frontier_ms = f if self.frontier_ms is None else max(
                        self.frontier_ms, f)
            if latest:
                self.frontier_ms = max(self.frontier_ms or 0, floor_minute(latest["ts_ms"]))
            self.first_bucket_ms = lo
            for bar in await self._compute(set(range(lo, hi, iv))):
                self._store(bar)
        self.reload = False
        for sub, conn in self.subs.items():
            self.send_snapshot(sub, conn)

    def _store(self, bar: Bar) -> BarUpdate | None:
        """Remember ``bar``; returns the update when it differs from the last one."""
        data = orjson.dumps(bar)
        b = int(bar["bucket_start_ms"])
        prev = self.bars.get(b)
        if prev is not None and prev.data == data:
            return None
        upd = BarUpdate(b, bool(bar["closed"]), data, bar)
        self.bars[b] = upd
        return upd

    def _prune(self) -> None:
        if self.frontier_ms is None:
            return
        keep_from = self.frontier_ms - self.hub.horizon_ms - self.interval_ms
        for b in [b for b in self.bars if b < keep_from]:
            del self.bars[b]

    def send_snapshot(self, sub: Subscription, conn: Connection) -> None:
        """Queue the snapshot of the feed's current bars for ``sub``."""
        sub.snapshotted = True
        sub.first_bucket_ms = self.first_bucket_ms
        bars = [self.bars[b].bar for b in sorted(self.bars)]
        for b in sorted(self.bars):
            upd = self.bars[b]
            sub.sent[b] = upd.data
            if upd.closed:
                _remember(sub.closed_sent, b)
        req = sub.request
        conn.push(sub, "snapshot", "", orjson.dumps(
            {"channel": "bars", "symbol": req.symbol, "exchange": req.exchange,
             "interval": req.interval, "bars": bars}))

    async def run(self) -> None:
        """The feed's loop: load, then compute dirty buckets and push what changed: for a
        :attr:`cheap` series at most once per phase slot, through the groups' throttle
        (:meth:`Audience.publish`); for a rollup at most once per round
        (:meth:`StreamHub.next_slot` with one slot per round), to every group at once
        (:meth:`Audience.send_now`).
        A feed computes at once when it has not in the current slot or round, else at the
        next one's start; storage failures are retried every second (logged once per
        outage)."""
        hub = self.hub
        failing = False
        pushed_round = -1
        slots = PHASES if self.cheap else 1
        while True:
            if not self.wake.is_set():  # (no task hop when a change is already waiting)
                try:
                    async with asyncio.timeout(hub.idle_s):  # (wait_for can drop a cancel)
                        await self.wake.wait()
                except TimeoutError:  # idle: open buckets whose minutes all closed close now
                    self.dirty.update(b for b, u in self.bars.items() if not u.closed)
            if hub.slot_no(slots) == pushed_round:
                await hub.next_slot(slots)
            self.wake.clear()
            try:
                if self.reload:
                    await self._load()
                    continue
                dirty, self.dirty = self.dirty, set()
                if not dirty:
                    continue
                try:
                    bars = await self._compute(dirty)
                except BaseException:
                    self.dirty |= dirty
                    raise
                for bar in bars:
                    upd = self._store(bar)
                    if upd is not None:
                        if self.cheap:
                            self.subs.publish(upd.bucket_ms, upd)
                        else:
                            self.subs.send_now(upd.bucket_ms, upd)
                        pushed_round = hub.slot_no(slots)
                self._prune()
                hub.prune_live(self.symbol)
                failing = False
            except (StorageUnavailable, RedisError, OSError) as exc:
                if not failing:
                    log.warning("stream: bars of %s/%s/%s unavailable (%s); retrying",
                                self.symbol, self.exchange or "*", self.interval, exc)
                failing = True
                await asyncio.sleep(_RETRY_S)
                self.wake.set()


class StreamHub(Service):
    """The worker's stream hub (module docstring).

    Args:
        settings: the worker's settings (``stream``, ``redis.key_prefix``,
            ``window.grace_ms``, ``window.correction_horizon_ms``).
        redis: the shared Redis connection (pub/sub, replay state).
        database: the TimescaleDB pool service.
        latest: latest prices in Redis (snapshots).
        live_bars: live 1-minute bars in Redis (snapshots).
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis, database: Database,
                 latest: LatestPriceStore, live_bars: LiveBarStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.stream = settings.stream
        self.redis = redis
        self.prefix = settings.redis.key_prefix
        self.channel = stream_channel(self.prefix)
        self.database = database
        self.latest = latest
        self.live_bars = live_bars
        self.grace_ms = settings.window.grace_ms
        #: how long buckets are remembered behind event time (late corrections)
        self.horizon_ms = max(live_window_ms(self.grace_ms),
                              settings.window.correction_horizon_ms + self.grace_ms)
        self.min_interval_s = 1.0 / self.stream.max_updates_per_s
        #: frames written to each socket in one loop turn go out in one write
        self.batcher = WriteBatcher()
        #: a series without live bars this long (s) closes its buckets whose minutes all
        #: closed, like the window's idle close (the event clock of a replay stops at its end)
        self.idle_s = settings.window.idle_timeout_s + 1.0
        self.connections: set[Connection] = set()
        self.feeds: dict[tuple[str, str | None, str], BarFeed] = {}
        #: symbol -> (exchange, bucket_start_ms) -> live 1-minute bar (subscribed symbols)
        self.live: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        self._feeds_of: dict[str, set[BarFeed]] = {}
        #: price item key -> subscriptions; newest price per watched item
        self._price_subs: dict[str, Audience] = {}
        self._price_last: dict[str, dict[str, Any]] = {}
        #: phase -> the audiences holding updates back for that group
        self._due: list[set[Audience]] = [set() for _ in range(PHASES)]
        self._replay_subs: dict[Subscription, Connection] = {}
        self._replay_last: bytes | None = None
        self._replay_key: Any = None
        self._replay_sent_at = 0.0
        self._channel_up = False
        self._channel_error: str | None = None
        self._messages = 0
        self._background: set[asyncio.Future[None]] = set()
        self._sub_counts: dict[str, int] = {}
        #: snapshot reads from Redis at a time (a burst of subscriptions queues here)
        self._snapshot_reads = asyncio.Semaphore(8)
        #: per-client socket slots across the cluster (``stream.max_connections_per_client``;
        #: set by the composition root), and the ones this worker holds
        self.slots: StreamSlots | None = None
        self._slotted: dict[Connection, tuple[str, str]] = {}
        self._slots_down = False
        #: per-client subscription slots (``stream.max_subscriptions_per_client``), and
        #: the ones this worker holds, by (socket, subscription id)
        self.sub_slots: StreamSlots | None = None
        self._sub_slotted: dict[tuple[Connection, str], tuple[str, str]] = {}

    # -- sockets -------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Whether the worker has ``stream.max_connections`` sockets."""
        return len(self.connections) >= self.stream.max_connections

    def add(self, conn: Connection) -> None:
        """Register a socket."""
        self.connections.add(conn)
        STREAM_CONNECTIONS.set(len(self.connections))

    def remove(self, conn: Connection) -> None:
        """Forget a socket and all its subscriptions (and free its client slot)."""
        for sub_id in list(conn.subs):
            self.unsubscribe(conn, sub_id)
        self.connections.discard(conn)
        STREAM_CONNECTIONS.set(len(self.connections))
        held = self._slotted.pop(conn, None)
        if held is not None and self.slots is not None:
            self._release_soon(self.slots, *held)

    async def admit_client(self, conn: Connection) -> bool:
        """Whether ``conn``'s client may open one more socket
        (``stream.max_connections_per_client``): a slot in Redis shared by the cluster, or
        while Redis fails, this worker's own sockets of the client. ``conn`` is already
        registered (:meth:`add`)."""
        limit = self.stream.max_connections_per_client
        if limit <= 0:
            return True
        if self.slots is not None:
            slot = uuid.uuid4().hex
            ok = await self._take_slot(self.slots, conn, slot)
            if ok:
                self._slotted[conn] = (conn.client_id, slot)
            if ok is not None:
                return ok
        mine = sum(1 for c in self.connections if c is not conn and c.client_id == conn.client_id)
        return mine < limit

    async def admit_subscription(self, conn: Connection, sub_id: str) -> bool:
        """Whether ``conn``'s client may hold one more subscription
        (``stream.max_subscriptions_per_client``): a slot in Redis shared by the cluster,
        or while Redis fails, this worker's own subscriptions of the client. The slot is
        kept until :meth:`unsubscribe`."""
        limit = self.stream.max_subscriptions_per_client
        if limit <= 0:
            return True
        if self.sub_slots is not None:
            slot = f"{conn.socket_uid}/{sub_id}"
            ok = await self._take_slot(self.sub_slots, conn, slot)
            if ok:
                self._sub_slotted[(conn, sub_id)] = (conn.client_id, slot)
            if ok is not None:
                return ok
        mine = sum(len(c.subs) for c in self.connections if c.client_id == conn.client_id)
        return mine < limit

    async def _take_slot(self, slots: StreamSlots, conn: Connection, slot: str) -> bool | None:
        """Take ``slot`` for ``conn``'s client in ``slots``: whether it was granted (False
        also when ``conn`` closed meanwhile, the slot then given back), None when Redis
        failed (the caller counts this worker's own; logged once per outage)."""
        try:
            ok = await slots.acquire(conn.client_id, slot)
        except (RedisError, OSError) as exc:
            if not self._slots_down:
                self._slots_down = True
                log.warning("stream: client slots unavailable (%s); counted per worker "
                            "until Redis returns", type(exc).__name__)
            return None
        self._slots_down = False
        if ok and conn not in self.connections:
            await self._release(conn.client_id, slot, slots)
            return False
        return ok

    def _release_soon(self, slots: StreamSlots, client_id: str, slot: str) -> None:
        task = asyncio.ensure_future(self._release(client_id, slot, slots))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, client_id: str, slot: str,
                       slots: StreamSlots | None = None) -> None:
        try:
            await cast(StreamSlots, slots or self.slots).release(client_id, slot)
        except (RedisError, OSError) as exc:  # it expires by itself (SLOT_TTL_S)
            log.info("stream: client slot not released (%s); it expires", type(exc).__name__)

    @Service.timer(SLOT_RENEW_S)
    async def _renew_slots(self) -> None:
        """Renew the client slots this worker holds (a dead worker's expire)."""
        for slots, held in ((self.slots, list(self._slotted.values())),
                            (self.sub_slots, list(self._sub_slotted.values()))):
            if slots is None or not held:
                continue
            try:
                await slots.renew(held)
            except (RedisError, OSError) as exc:
                log.warning("stream: client slots not renewed (%s)", type(exc).__name__)

    async def subscribe(self, conn: Connection, req: Subscribe) -> Subscription:
        """Add a subscription and queue its snapshot (for prices and the replay, read from
        Redis now; for bars when the feed is loaded).

        Raises:
            StorageUnavailable: Redis failed while reading a snapshot (the subscription is
                not kept).
        """
        sub = Subscription(req)
        conn.subs[req.sub_id] = sub
        self._count_sub(req.channel, 1)
        try:
            if req.channel == "bars":
                self._subscribe_bars(conn, sub)
            elif req.channel == "prices":
                await self._subscribe_prices(conn, sub)
            else:
                await self._subscribe_replay(conn, sub)
        except (RedisError, OSError) as exc:
            self.unsubscribe(conn, req.sub_id)
            raise StorageUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
        return sub

    def unsubscribe(self, conn: Connection, sub_id: str) -> bool:
        """End a subscription (its pending frames are dropped). Returns whether it
        existed."""
        sub = conn.subs.pop(sub_id, None)
        held = self._sub_slotted.pop((conn, sub_id), None)
        if held is not None and self.sub_slots is not None:
            self._release_soon(self.sub_slots, *held)
        if sub is None:
            return False
        conn.outbox.discard(sub_id)
        feed = sub.feed
        if feed is not None:
            feed.subs.remove(sub, conn)
            if not feed.subs:
                self._drop_feed(feed)
        for item in sub.request.items:
            subs = self._price_subs.get(item.key)
            if subs is not None:
                subs.remove(sub, conn)
                if not subs:
                    del self._price_subs[item.key]
                    self._price_last.pop(item.key, None)
        self._replay_subs.pop(sub, None)
        if not self._replay_subs:
            self._replay_last = None
        self._count_sub(sub.request.channel, -1)
        return True

    def _count_sub(self, channel: str, delta: int) -> None:
        n = self._sub_counts.get(channel, 0) + delta
        self._sub_counts[channel] = n
        STREAM_SUBSCRIPTIONS.labels(channel).set(n)

    # -- bars ----------------------------------------------------------------------------

    def _subscribe_bars(self, conn: Connection, sub: Subscription) -> None:
        req = sub.request
        key = (req.symbol, req.exchange, req.interval)
        feed = self.feeds.get(key)
        if feed is None:
            feed = BarFeed(self, *key)
            self.feeds[key] = feed
            self._feeds_of.setdefault(req.symbol, set()).add(feed)
            self.live.setdefault(req.symbol, {})
            feed.task = asyncio.ensure_future(self._run_feed(feed))
        feed.subs.add(sub, conn)
        sub.feed = feed
        if not feed.reload:
            feed.send_snapshot(sub, conn)

    async def _run_feed(self, feed: BarFeed) -> None:
        while True:
            try:
                await feed.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stream: feed %s failed; restarting it", feed.key)
                feed.reload = True
                await asyncio.sleep(_RETRY_S)

    def _drop_feed(self, feed: BarFeed) -> None:
        self.feeds.pop(feed.key, None)
        if feed.task is not None:
            feed.task.cancel()
        feeds = self._feeds_of.get(feed.symbol)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._feeds_of[feed.symbol]
                self.live.pop(feed.symbol, None)

    def merge_live(self, bar: dict[str, Any]) -> bool:
        """Keep a live 1-minute bar of a subscribed symbol when it is newer than the one
        held (trade count, then ``closed``). Returns whether it was kept."""
        cache = self.live.get(bar["symbol"])
        if cache is None:
            return False
        k = (bar["exchange"], int(bar["bucket_start_ms"]))
        cur = cache.get(k)
        if cur is not None and _version(cur) > _version(bar):
            return False
        if cur is not None and _version(cur) == _version(bar) and not bar.get("correction"):
            return False
        cache[k] = bar
        return True

    def prune_live(self, symbol: str) -> None:
        """Forget live bars of ``symbol`` older than the correction horizon."""
        cache = self.live.get(symbol)
        if not cache or len(cache) < 64:
            return
        newest = max(start for _, start in cache)
        for k in [k for k in cache if k[1] < newest - self.horizon_ms]:
            del cache[k]

    # -- prices --------------------------------------------------------------------------

    async def _subscribe_prices(self, conn: Connection, sub: Subscription) -> None:
        items: tuple[PriceItem, ...] = sub.request.items
        for item in items:  # watched before the read: changes meanwhile are kept
            aud = self._price_subs.get(item.key)
            if aud is None:
                aud = self._price_subs[item.key] = Audience(self, "price")
            aud.add(sub, conn)
        missing = [i for i in items if i.key not in self._price_last]
        async with self._snapshot_reads:
            got = [await self.latest.get(i.symbol, i.exchange) for i in missing]
        for item, p in zip(missing, got, strict=True):
            if p is not None:
                self._set_price(item.key, item.symbol, p["exchange"], p["price"], p["ts_ms"])
        if conn.subs.get(sub.sub_id) is not sub:
            return
        sub.snapshotted = True
        prices = [self._price_last[i.key] for i in items if i.key in self._price_last]
        conn.push(sub, "snapshot", "", orjson.dumps({"channel": "prices", "prices": prices}))

    def _set_price(self, key: str, symbol: str, exchange: str, price: float,
                   ts_ms: int) -> bool:
        last = self._price_last.get(key)
        if last is not None and ts_ms < last["ts_ms"]:
            return False
        self._price_last[key] = {"item": key, "symbol": symbol, "exchange": exchange,
                                 "price": price, "ts_ms": ts_ms}
        return True


    # -- replay --------------------------------------------------------------------------

    async def _subscribe_replay(self, conn: Connection, sub: Subscription) -> None:
        """The snapshot is the state the poller last pushed (so the next push is a change
        for every subscription alike); the first subscription reads it from Redis."""
        if not self._replay_subs or self._replay_last is None:
            state = await read_state(self.redis, self.prefix)
            self._replay_last = orjson.dumps(status_body(state) if state else None)
            self._replay_key = _replay_key(state)
            self._replay_sent_at = time.monotonic()
        self._replay_subs[sub] = conn
        sub.snapshotted = True
        conn.push(sub, "snapshot", "",
                  b'{"channel":"replay","replay":' + self._replay_last + b"}")

    # -- channel input -------------------------------------------------------------------

    def on_change(self, change: StreamChange) -> None:
        """Apply one channel message: newer live bars mark their feeds' buckets dirty;
        newer prices of watched items go to their audiences (:class:`Audience`)."""
        self._messages += 1
        for bar in change.bars:
            if bar.get("symbol") in self.live and self.merge_live(bar):
                for feed in self._feeds_of.get(bar["symbol"], ()):
                    if feed.matches(bar):
                        feed.on_live_bar(bar)
        if not self._price_subs:
            return
        subs = self._price_subs
        for exchange, symbol, price, ts_ms in change.prices:
            for key in (f"{exchange}:{symbol}", symbol):
                aud = subs.get(key)
                if aud is not None and self._set_price(key, symbol, exchange, price, ts_ms):
                    aud.publish(key, orjson.dumps(self._price_last[key]))

    def round_no(self, phase: int = 0) -> int:
        """The current throttle round of group ``phase`` (whose rounds start
        ``phase``/:data:`PHASES` of a round after group 0's): the loop clock in units of
        1/``max_updates_per_s`` s. A group gets each item at most once per round."""
        t = asyncio.get_running_loop().time() - phase * self.min_interval_s / PHASES
        return int(t // self.min_interval_s)

    def slot_no(self, per_round: int = PHASES) -> int:
        """The loop clock in units of 1/(``per_round`` x ``max_updates_per_s``) s: with the
        default, the phase slot (slot ``n`` starts a round of group ``n % PHASES``)."""
        return int(asyncio.get_running_loop().time() * per_round // self.min_interval_s)

    async def next_slot(self, per_round: int = PHASES) -> None:
        """Sleep until the next :meth:`slot_no` of ``per_round`` starts."""
        length_s = self.min_interval_s / per_round
        t = asyncio.get_running_loop().time()
        # + 2 ms: uvloop keeps timers and its clock in whole milliseconds, so a timer may
        # fire up to a millisecond early, and slot_no() must read the new slot by then
        await asyncio.sleep((self.slot_no(per_round) + 1) * length_s - t + 0.002)

    def due(self, phase: int, audience: Audience) -> None:
        """``audience`` holds updates back for group ``phase`` (:meth:`_ticker` flushes
        them at the group's next round start)."""
        self._due[phase].add(audience)

    def _resnapshot(self) -> None:
        """After the channel was lost: every feed reloads and re-sends its snapshot; price
        and replay subscriptions are re-read."""
        for feed in self.feeds.values():
            feed.reload = True
            feed.wake.set()
        self._price_last.clear()
        for conn in list(self.connections):
            for sub in list(conn.subs.values()):
                if sub.request.channel in ("prices", "replay"):
                    task = asyncio.ensure_future(self._resubscribe(conn, sub))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _resubscribe(self, conn: Connection, sub: Subscription) -> None:
        try:
            if sub.request.channel == "prices":
                await self._subscribe_prices(conn, sub)
            else:
                await self._subscribe_replay(conn, sub)
        except (RedisError, OSError) as exc:
            conn.control(error_frame("unavailable", f"snapshot failed ({type(exc).__name__}):"
                                     " subscribe again", sub.sub_id))

    @Service.task
    async def _reader(self) -> None:
        """Read the channel; reconnect with backoff when Redis fails."""
        delay = 0.1
        connected_before = False
        while not self.should_stop:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                if connected_before:
                    log.warning("stream: channel %s subscribed again; re-sending snapshots",
                                self.channel)
                    self._resnapshot()
                connected_before = True
                self._channel_up, self._channel_error, delay = True, None, 0.1
                while not self.should_stop:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        change = decode_change(msg["data"])
                    except MarketflowError as exc:
                        log.warning("stream: %s", exc)
                        continue
                    self.on_change(change)
            except (RedisError, OSError, TimeoutError) as exc:
                if self._channel_up:
                    log.warning("stream: channel %s lost (%s: %s); reconnecting", self.channel,
                                type(exc).__name__, exc)
                self._channel_up = False
                self._channel_error = f"{type(exc).__name__}: {exc}"[:200]
                await self.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError) as exc:
                    log.debug("stream: pubsub close: %s", exc)

    @Service.task
    async def _ticker(self) -> None:
        """At each phase slot, the round of one group starts: send it what the audiences
        held back for it (slots the loop was too busy to see are caught up, in order)."""
        last = self.slot_no()
        while not self.should_stop:
            await self.next_slot()
            now = self.slot_no()
            for slot in range(max(last + 1, now - PHASES + 1), now + 1):
                phase = slot % PHASES
                due, self._due[phase] = self._due[phase], set()
                for audience in due:
                    audience.flush(phase)
            last = now

    @Service.task
    async def _replay_poll(self) -> None:
        """While someone subscribes to the replay: read its state 5 times a second and push
        it when it changed (state, speed, session or a command applied: at once; only the
        clock or progress: at most ``max_updates_per_s``)."""
        failing = False
        while not self.should_stop:
            await self.sleep(STATE_INTERVAL_S)
            if not self._replay_subs:
                continue
            try:
                state = await read_state(self.redis, self.prefix)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("stream: replay state unavailable (%s)", exc)
                failing = True
                continue
            failing = False
            body = status_body(state) if state else None
            data = orjson.dumps(body)
            if data == self._replay_last:
                continue
            key = _replay_key(state)
            now = time.monotonic()
            if key == self._replay_key and now - self._replay_sent_at < self.min_interval_s:
                continue
            self._replay_last, self._replay_key, self._replay_sent_at = data, key, now
            for sub, conn in list(self._replay_subs.items()):
                conn.push(sub, "replay", "", data)

    @Service.timer(1.0)
    async def _watchdog(self) -> None:
        """Add the sockets' frame counts to ``marketflow_stream_frames_total``; close the
        sockets whose current send has blocked longer than the send timeout (a client that
        stopped reading: code 4008, reason ``send_timeout``)."""
        for conn in self.connections:
            if conn.frame_counts:
                counts, conn.frame_counts = conn.frame_counts, {}
                for kind, n in counts.items():
                    STREAM_FRAMES.labels(kind).inc(n)
        for task in close_stalled(self.connections, time.monotonic()):
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``/health``: ``{"channel": "up"|"down", "channel_error", "connections",
        "subscriptions", "feeds", "messages"}``."""
        return {"channel": "up" if self._channel_up else "down",
                "channel_error": self._channel_error,
                "connections": len(self.connections),
                "subscriptions": sum(len(c.subs) for c in self.connections),
                "feeds": len(self.feeds), "messages": self._messages}

    async def on_stop(self) -> None:
        """Cancel the feeds and close every socket (code 1001, going away)."""
        for feed in list(self.feeds.values()):
            self._drop_feed(feed)
        await asyncio.gather(*(c.close(1001, "worker stopping", "shutdown")
                               for c in list(self.connections)))
