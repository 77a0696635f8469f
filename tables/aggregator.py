"""Applies tick batches and idle checks to per-key window state (no Faust, no I/O).

:class:`WindowAggregator` works on any ``MutableMapping[str, KeyState]``: the Faust
table of :mod:`tables.bars` in the worker, a plain ``dict`` in unit tests. The caller
decides when to persist: it publishes the closed bars first and then writes back every
state named in :attr:`BatchResult.dirty` (``store[key] = state``), so a crash in between
re-emits the same bars (idempotent downstream) instead of losing them.

Watermarks are kept per partition *and event-time domain*: :func:`clock_of` of the
exchange name — ``""`` for real exchanges, the namespace for replayed ones
(``replay.binance`` → ``replay``). A historical replay sharing a partition with a live
feed thus keeps its own event time instead of being dropped as late.

Exactly-once state on an at-least-once broker: each key remembers the last source offset
applied to it (``off``) in the same changelog record as its windows; a message
re-delivered after a crash is skipped for keys that already applied it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from app.models import Tick
from tables.window import (
    WINDOW_MS,
    KeyState,
    apply_tick,
    closable_by_idle,
    closable_by_watermark,
    finalize_bar,
    new_key_state,
)

__all__ = ["BatchResult", "WindowAggregator", "clock_of"]


def clock_of(exchange: str) -> str:
    """Event-time domain of an exchange name: the part before its last ``.`` (a replay
    namespace, e.g. ``replay.binance`` → ``replay``), ``""`` when there is none."""
    return exchange.rpartition(".")[0]


def _key_clock(key: str) -> str:
    return clock_of(key.partition(":")[0])


@dataclass
class BatchResult:
    """What one message did.

    Attributes:
        applied: ticks counted into windows.
        duplicates: ticks skipped because their key already applied this offset.
        late: ticks whose window had already closed.
        closed: closed bars (see :func:`tables.window.finalize_bar`), oldest first per key.
        latest: ``key -> (price, ts_ms)``, the newest applied trade per key.
        applied_ticks: the ticks counted into windows, in order.
        dirty: keys whose state changed and must be written back.
    """

    applied: int = 0
    duplicates: int = 0
    late: list[Tick] = field(default_factory=list)
    closed: list[dict[str, Any]] = field(default_factory=list)
    latest: dict[str, tuple[float, int]] = field(default_factory=dict)
    applied_ticks: list[Tick] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)


def _idle_pred(b: int, *, seen: int, now: int, idle: int, grace: int, size: int) -> bool:
    return closable_by_idle(b, seen, now, idle, grace, size)


class WindowAggregator:
    """Event-time tumbling windows with a watermark per partition and event-time domain
    (:func:`clock_of`), and idle close.

    Args:
        store: ``"exchange:symbol" -> KeyState`` mapping (see :mod:`tables.window`).
        grace_ms: watermark lag behind the highest ``ts_ms`` seen on a partition.
        idle_timeout_ms: wall-clock idleness after which a key's finished windows close.
        size_ms: window length (60000).
    """

    def __init__(
        self,
        store: MutableMapping[str, KeyState],
        grace_ms: int,
        idle_timeout_ms: int,
        size_ms: int = WINDOW_MS,
    ) -> None:
        self.store = store
        self.grace_ms = grace_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.size_ms = size_ms
        #: (partition, clock) -> highest ts_ms seen
        self._max_ts: dict[tuple[int, str], int] = {}
        #: partition -> clock -> keys
        self._keys: dict[int, dict[str, set[str]]] = {}
        self._scanned_bucket: dict[tuple[int, str], int] = {}

    def reset(self) -> None:
        """Forget cached per-partition indexes (call on every rebalance)."""
        self._max_ts.clear()
        self._keys.clear()
        self._scanned_bucket.clear()

    def _index(self, partition: int) -> dict[str, set[str]]:
        by_clock = self._keys.get(partition)
        if by_clock is None:
            by_clock = {}
            for k, st in self.store.items():
                if st.get("p") == partition:
                    c = _key_clock(k)
                    by_clock.setdefault(c, set()).add(k)
                    mk = (partition, c)
                    self._max_ts[mk] = max(self._max_ts.get(mk, -1), st.get("max_ts", -1))
            self._keys[partition] = by_clock
        return by_clock

    def watermark(self, partition: int, clock: str | None = None) -> int:
        """Current watermark of ``partition`` in UTC epoch ms (``-grace-1`` if empty):
        of one event-time domain (``clock``, see :func:`clock_of`), or with None the
        highest of its domains."""
        by_clock = self._index(partition)
        if clock is None:
            mx = max((self._max_ts.get((partition, c), -1) for c in by_clock), default=-1)
        else:
            mx = self._max_ts.get((partition, clock), -1)
        return mx - self.grace_ms

    def process_ticks(
        self, partition: int, offset: int, ticks: list[Tick], wall_ms: int
    ) -> BatchResult:
        """Apply one message's ticks (in message order) and close what the watermark passed.

        Args:
            partition: source partition of the message.
            offset: source offset of the message.
            ticks: validated ticks, any keys, in arrival order.
            wall_ms: processing wall clock, UTC epoch ms.

        Returns:
            BatchResult: counts, late ticks, closed bars, latest prices, dirty keys.
        """
        res = BatchResult()
        by_clock = self._index(partition)
        grace = self.grace_ms
        size = self.size_ms
        states: dict[str, KeyState | None] = {}
        key_clock: dict[str, str] = {}
        mxs: dict[str, int] = {}
        clock: str | None = None
        mx = -1
        for t in ticks:
            key = f"{t.exchange}:{t.symbol}"
            if key in states:
                st = states[key]
                kc = key_clock[key]
            else:
                st = self.store.get(key)
                if st is None:
                    st = new_key_state(partition)
                elif st.get("p") == partition and st["off"] >= offset:
                    st = None  # this key already applied this message (re-delivery)
                else:
                    st["p"] = partition
                states[key] = st
                kc = key_clock[key] = _key_clock(key)
            if st is None:
                res.duplicates += 1
                continue
            if kc != clock:  # ticks of one message are mostly of one key: rare switch
                if clock is not None:
                    mxs[clock] = mx
                clock = kc
                mx = mxs.get(kc, self._max_ts.get((partition, kc), -1))
            ts = t.ts_ms
            b = ts - ts % size
            if b + size <= mx - grace or b <= st["closed"]:
                res.late.append(t)
                continue
            apply_tick(st["bars"], t.price, t.qty, ts, wall_ms, size)
            res.applied += 1
            res.applied_ticks.append(t)
            if ts > mx:
                mx = ts
            if ts > st["max_ts"]:
                st["max_ts"] = ts
            prev = res.latest.get(key)
            if prev is None or ts >= prev[1]:
                res.latest[key] = (t.price, ts)
        if clock is not None:
            mxs[clock] = mx
        for key, st in states.items():
            if st is None:
                continue
            st["off"] = offset
            st["seen_ms"] = wall_ms
            if key not in self.store:
                self.store[key] = st
            by_clock.setdefault(key_clock[key], set()).add(key)
            res.dirty.add(key)
        for c, c_mx in mxs.items():
            self._max_ts[(partition, c)] = c_mx
            wm = c_mx - grace
            wm_bucket = wm - wm % size
            if self._scanned_bucket.get((partition, c)) == wm_bucket:
                continue
            self._scanned_bucket[(partition, c)] = wm_bucket
            for key in by_clock.get(c, ()):
                st = self.store.get(key)
                if st is not None and self._close(
                        key, st, res, partial(closable_by_watermark, wm_ms=wm, size_ms=size)):
                    res.dirty.add(key)
        return res

    def _idle_candidates(
        self, partition: int, now_wall_ms: int
    ) -> Iterator[tuple[str, KeyState, Callable[[int], bool]]]:
        """Keys of ``partition`` with open windows, each with its idle-close predicate."""
        for key in (k for keys in self._index(partition).values() for k in keys):
            st = self.store.get(key)
            if st is None or not st["bars"]:
                continue
            yield key, st, partial(
                _idle_pred, seen=st["seen_ms"], now=now_wall_ms,
                idle=self.idle_timeout_ms, grace=self.grace_ms, size=self.size_ms,
            )

    def has_idle_work(self, partition: int, now_wall_ms: int) -> bool:
        """Whether :meth:`process_idle` at ``now_wall_ms`` would close anything (read-only;
        lets the worker skip idle-check messages for partitions with nothing to close)."""
        return any(pred(bar["b"]) for _, st, pred in self._idle_candidates(partition, now_wall_ms)
                   for bar in st["bars"].values())

    def process_idle(self, partition: int, now_wall_ms: int) -> BatchResult:
        """Close finished windows of keys on ``partition`` that have gone idle.

        Args:
            partition: the partition the idle-check control message arrived on.
            now_wall_ms: the control message's wall clock, UTC epoch ms.

        Returns:
            BatchResult: only ``closed`` and ``dirty`` are filled.
        """
        res = BatchResult()
        for key, st, pred in list(self._idle_candidates(partition, now_wall_ms)):
            if self._close(key, st, res, pred):
                res.dirty.add(key)
        return res

    def _close(self, key: str, st: KeyState, res: BatchResult,
               pred: Callable[[int], bool]) -> bool:
        bars = st["bars"]
        if not bars:
            return False
        done = sorted(b for b in (bar["b"] for bar in bars.values()) if pred(b))
        if not done:
            return False
        exchange, symbol = key.split(":", 1)
        for b in done:
            bar = bars.pop(str(b))
            res.closed.append(finalize_bar(exchange, symbol, bar, self.size_ms))
        st["closed"] = max(st["closed"], done[-1])
        return True
