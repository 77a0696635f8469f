"""Applies tick batches and idle checks to per-key window state (no Faust, no I/O).

:class:`WindowAggregator` works on any ``MutableMapping[str, KeyState]``: the Faust
table of :mod:`tables.bars` in the worker, a plain ``dict`` in unit tests. The caller
decides when to persist: it publishes the closed bars first and then writes back every
state named in :attr:`BatchResult.dirty` (``store[key] = state``), so a crash in between
re-emits the same bars (idempotent downstream) instead of losing them.

Watermarks are kept per partition *and exchange*: each exchange name (a real exchange,
or a replay namespace's ``replay.binance``) is its own event-time clock. An exchange whose
ticks arrive later than another's on the same partition — a clock that disagrees, a
connection that drains its backlog after a broker outage, a historical replay beside a
live feed — is then not dropped as late because of the other's progress. A quiet
exchange's last windows close by idleness (below).

Exactly-once state on an at-least-once broker: each key remembers the last source offset
applied to it (``off``) in the same changelog record as its windows; a message
re-delivered after a crash is skipped for keys that already applied it.

Late ticks (their window already closed) follow ``late_policy``:

* ``"dead_letter"`` (default): reported in :attr:`BatchResult.late` (the worker
  dead-letters them with reason ``late``);
* ``"correct"``: closed windows stay in the key state (``done``) while they are within
  ``correction_horizon_ms`` of the watermark (pruned by it, so at most
  ``(horizon + size + grace) / size + 1`` retained bars per key); a late tick for such a
  window is applied to it and the corrected bar is re-emitted once per message in
  :attr:`BatchResult.corrected` with ``"correction": true``. A late tick older than the
  horizon (or for a window closed before corrections were enabled for the key) is reported
  in :attr:`BatchResult.late` as with ``"dead_letter"``.

Duplicate trades (same exchange, symbol and ``trade_id`` in the same window) are skipped
and counted in :attr:`BatchResult.duplicate_trades` (see :func:`tables.window.add_trade_id`).

The window rules are the pure helpers of :mod:`tables.window`. The per-batch and per-key
paths call them (:func:`~tables.window.watermark_ms`, :func:`~tables.window.bucket_start_ms`,
:func:`~tables.window.closable_by_watermark`, :func:`~tables.window.closable_by_idle`,
:func:`~tables.window.correctable`, :func:`~tables.window.apply_tick`); the per-tick loop of
:meth:`WindowAggregator.process_ticks` inlines the bucket, watermark and lateness
expressions (a function call per tick costs throughput), each marked with the helper it
mirrors. ``tests/unit/test_window_rules.py`` checks the aggregator against a tick-by-tick
reference built only from those helpers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from operator import le
from typing import Any

from core.errors import ConfigError, InvalidTick
from core.models import Tick, TickList
from core.timeutil import MINUTE_MS
from tables.window import (
    Bar,
    KeyState,
    apply_run,
    apply_run_columns,
    apply_tick,
    bucket_start_ms,
    closable_by_idle,
    closable_by_watermark,
    correctable,
    finalize_bar,
    new_key_state,
    restore_state,
    watermark_ms,
)

__all__ = ["LATE_POLICIES", "BatchResult", "WindowAggregator", "clock_of"]

#: Accepted values of ``late_policy`` (``window.late_policy``).
LATE_POLICIES = ("dead_letter", "correct")


def clock_of(exchange: str) -> str:
    """Replay namespace of an exchange name: the part before its last ``.``
    (``replay.binance`` → ``replay``), ``""`` for a real exchange."""
    return exchange.rpartition(".")[0]


def _key_clock(key: str) -> str:
    """The event-time clock (watermark) a key belongs to: its exchange."""
    return key.partition(":")[0]


@dataclass
class BatchResult:
    """What one message did.

    Attributes:
        applied: ticks counted into windows.
        duplicates: ticks skipped because their key already applied this offset.
        late: ticks whose window had already closed and that were not applied as a
            correction (to be dead-lettered with reason ``late``).
        closed: closed bars (see :func:`tables.window.finalize_bar`), oldest first per key.
        corrected: closed bars changed by late ticks (policy ``correct``), each once per
            message, with ``"correction": True``; publish them like ``closed``.
        corrections: late ticks applied to a retained closed bar.
        duplicate_trades: ticks skipped because their window already has their trade id.
        latest: ``key -> (price, ts_ms)``, the newest applied trade per key.
        applied_ticks: the ticks counted into windows, in order.
        dirty: keys whose state changed and must be written back.
        invalid: ticks that passed validation but cannot be summed exactly (a price or
            qty with more than 18 decimal places, :func:`tables.window.exact_amounts`),
            with the error (to be dead-lettered with its reason).
    """

    applied: int = 0
    duplicates: int = 0
    late: list[Tick] = field(default_factory=list)
    closed: list[dict[str, Any]] = field(default_factory=list)
    corrected: list[dict[str, Any]] = field(default_factory=list)
    corrections: int = 0
    duplicate_trades: int = 0
    latest: dict[str, tuple[float, int]] = field(default_factory=dict)
    applied_ticks: list[Tick] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    #: keys whose idle clock a stalled idle check restarted (:meth:`process_idle`)
    idle_clocks_restarted: int = 0
    invalid: list[tuple[Tick, InvalidTick]] = field(default_factory=list)


class WindowAggregator:
    """Event-time tumbling windows with a watermark per partition and exchange, and idle
    close.

    Args:
        store: ``"exchange:symbol" -> KeyState`` mapping (see :mod:`tables.window`).
        grace_ms: watermark lag behind the highest ``ts_ms`` seen on a partition.
        idle_timeout_ms: wall-clock idleness after which a key's finished windows close.
        size_ms: window length (60000).
        late_policy: ``"dead_letter"`` or ``"correct"`` (module docstring).
        correction_horizon_ms: with ``"correct"``, how long (event time, behind the
            watermark) a closed window accepts corrections.
        stall_after_ms: an idle check delivered this late says the pipeline stalled
            (:meth:`process_idle`); default ``idle_timeout_ms``. With transactions add the
            commit interval: an idle check becomes readable only when its transaction
            commits.
        runs: apply consecutive ticks of one key and window together (same bars as one
            at a time; ``False`` only for tests and benchmarks).

    Raises:
        ConfigError: unknown ``late_policy`` or negative ``correction_horizon_ms``.
    """

    def __init__(
        self,
        store: MutableMapping[str, KeyState],
        grace_ms: int,
        idle_timeout_ms: int,
        size_ms: int = MINUTE_MS,
        late_policy: str = "dead_letter",
        correction_horizon_ms: int = 600_000,
        stall_after_ms: int | None = None,
        runs: bool = True,
    ) -> None:
        if late_policy not in LATE_POLICIES:
            raise ConfigError(f"late_policy must be one of {LATE_POLICIES}, got {late_policy!r}")
        if correction_horizon_ms < 0:
            raise ConfigError("correction_horizon_ms must be >= 0")
        self.store = store
        self.grace_ms = grace_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.stall_after_ms = idle_timeout_ms if stall_after_ms is None else stall_after_ms
        self.size_ms = size_ms
        self.late_policy = late_policy
        self.correction_horizon_ms = correction_horizon_ms
        self._retain = late_policy == "correct"
        #: apply runs of ticks of one key and window at once (:func:`tables.window.apply_run`);
        #: False gives the per-tick path only (the reference of the property tests)
        self.runs = runs
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
        """Current watermark of ``partition`` (:func:`tables.window.watermark_ms`).

        Args:
            partition: source partition.
            clock: an exchange name (its own event-time clock), or None for the highest
                watermark of the partition's exchanges.

        Returns:
            int: UTC epoch ms, ``-grace_ms - 1`` when nothing was seen.
        """
        by_clock = self._index(partition)
        if clock is None:
            mx = max((self._max_ts.get((partition, c), -1) for c in by_clock), default=-1)
        else:
            mx = self._max_ts.get((partition, clock), -1)
        return watermark_ms(mx, self.grace_ms)

    def late_detail(self, t: Tick) -> str:
        """Dead-letter ``detail`` of a late tick reported in :attr:`BatchResult.late`."""
        b = bucket_start_ms(t.ts_ms, self.size_ms)
        if self._retain:
            return (f"window {b} already closed, beyond the correction horizon "
                    f"({self.correction_horizon_ms} ms) or closed before corrections began")
        return f"window {b} already closed"

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
        retain = self._retain
        horizon = self.correction_horizon_ms
        corr: dict[tuple[str, int], Bar] | None = None
        states: dict[str, KeyState | None] = {}
        key_clock: dict[str, str] = {}
        mxs: dict[str, int] = {}
        clock: str | None = None
        mx = -1
        runs = self.runs
        n_ticks = len(ticks)
        no_run_before = 0
        # a valid columnar batch (one key) keeps its columns: runs are cut by bisection
        # when its times are in order, and applied from column slices
        cols = ticks if runs and type(ticks) is TickList else None
        in_order = cols is not None and all(map(le, cols.ts_ms, islice(cols.ts_ms, 1, None)))
        i = 0
        while i < n_ticks:
            t = ticks[i]
            i += 1
            key = f"{t.exchange}:{t.symbol}"
            if key in states:
                st = states[key]
                kc = key_clock[key]
            else:
                st = self.store.get(key)
                if st is None:
                    st = new_key_state(partition, retain)
                elif st.get("p") == partition and st["off"] >= offset:
                    st = None  # this key already applied this message (re-delivery)
                else:
                    restore_state(st)  # as read from the changelog: exact sums as ints
                    st["p"] = partition
                    if retain and "kf" not in st:  # corrections start after the newest
                        st["done"] = {}            # closed window of an older state
                        st["kf"] = st["closed"] + size if st["closed"] >= 0 else -1
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
            b = ts - ts % size  # bucket_start_ms(ts, size)
            # is_late(b, watermark_ms(mx, grace), st["closed"], size), inlined (per tick)
            if b + size <= mx - grace or b <= st["closed"]:
                if not retain or not correctable(b, mx - grace, horizon, size):
                    res.late.append(t)
                    continue
                sb = str(b)
                if sb not in st["bars"]:
                    done = st["done"]
                    if sb not in done and b < st["kf"]:
                        res.late.append(t)  # closed before corrections began for the key
                    else:
                        try:
                            added = apply_tick(done, t.price, t.qty, ts, wall_ms, size,
                                               t.trade_id)
                        except InvalidTick as exc:
                            res.invalid.append((t, exc))
                            continue
                        if added:
                            res.corrections += 1
                            if corr is None:
                                corr = {}
                            corr[(key, b)] = done[sb]
                        else:
                            res.duplicate_trades += 1
                    continue
                # else: still open in the state (the watermark passed it within this
                # message and closes it below): applied like any other tick
            elif runs and i < n_ticks and i >= no_run_before and str(b) in st["bars"]:
                # The ticks that follow with this key and window form a run, applied at
                # once to the window's bar (apply_run; a new bar is opened by its first
                # tick below, and the run starts at the next one). None of them is late:
                # the watermark only moves within the window, at most to its end minus
                # the grace.
                end = b + size
                if in_order:
                    assert cols is not None
                    j = bisect_left(cols.ts_ms, end, i)  # one key; ts_ms >= b from i on
                else:
                    j = i
                    exchange = t.exchange
                    symbol = t.symbol
                    while j < n_ticks:
                        u = ticks[j]
                        if (not b <= u.ts_ms < end or u.symbol != symbol
                                or u.exchange != exchange):
                            break
                        j += 1
                if j > i:
                    run = ticks[i - 1:j]
                    if cols is None:
                        newest = apply_run(st["bars"][str(b)], run)
                    else:
                        ids = cols.trade_id
                        newest = apply_run_columns(
                            st["bars"][str(b)], cols.price[i - 1:j], cols.qty[i - 1:j],
                            cols.ts_ms[i - 1:j], None if ids is None else ids[i - 1:j])
                    if newest is None:
                        no_run_before = j  # tick by tick up to the run's end (no rescans)
                    else:
                        i = j
                        res.applied += len(run)
                        res.applied_ticks += run
                        top = newest[1]
                        if top > mx:
                            mx = top
                        if top > st["max_ts"]:
                            st["max_ts"] = top
                        prev = res.latest.get(key)
                        if prev is None or top >= prev[1]:
                            res.latest[key] = newest
                        continue
            try:
                added = apply_tick(st["bars"], t.price, t.qty, ts, wall_ms, size, t.trade_id)
            except InvalidTick as exc:
                res.invalid.append((t, exc))
                continue
            if not added:
                res.duplicate_trades += 1
                continue
            res.applied += 1
            res.applied_ticks.append(t)
            if ts > mx:  # the clock's max ts_ms, the input of watermark_ms
                mx = ts
            if ts > st["max_ts"]:
                st["max_ts"] = ts
            prev = res.latest.get(key)
            if prev is None or ts >= prev[1]:
                res.latest[key] = (t.price, ts)
        if clock is not None:
            mxs[clock] = mx
        if corr is not None:
            for (key, _b), bar in corr.items():
                exchange, symbol = key.split(":", 1)
                res.corrected.append(
                    {**finalize_bar(exchange, symbol, bar, size), "correction": True})
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
            wm = watermark_ms(c_mx, grace)
            # closable_by_watermark(b, wm) can only turn true when wm enters a new bucket
            # (window ends are bucket boundaries), so a scan at an unchanged bucket would
            # close nothing; pruning (correctable) then waits for the next scan, which is
            # harmless: the late path above checks correctable itself
            wm_bucket = bucket_start_ms(wm, size)
            if self._scanned_bucket.get((partition, c)) == wm_bucket:
                continue
            self._scanned_bucket[(partition, c)] = wm_bucket
            for key in by_clock.get(c, ()):
                st = self.store.get(key)
                if st is None:
                    continue
                closed = self._close(
                    key, st, res, partial(closable_by_watermark, wm_ms=wm, size_ms=size), wm)
                if closed or (st.get("done") and self._prune(st, wm)):
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
                closable_by_idle, last_seen_wall_ms=st["seen_ms"], now_wall_ms=now_wall_ms,
                idle_timeout_ms=self.idle_timeout_ms, grace_ms=self.grace_ms,
                size_ms=self.size_ms,
            )

    def has_idle_work(self, partition: int, now_wall_ms: int) -> bool:
        """Whether :meth:`process_idle` at ``now_wall_ms`` would close anything (read-only;
        lets the worker skip idle-check messages for partitions with nothing to close)."""
        return any(pred(bar["b"]) for _, st, pred in self._idle_candidates(partition, now_wall_ms)
                   for bar in st["bars"].values())

    def process_idle(self, partition: int, now_wall_ms: int,
                     received_wall_ms: int | None = None) -> BatchResult:
        """Close finished windows of keys on ``partition`` that have gone idle.

        An idle check that reaches the agent ``stall_after_ms`` (by default
        ``idle_timeout_ms``) or more after it was written says the pipeline itself
        stalled (broker unreachable, consumer behind):
        ticks written during the stall may still be on their way, behind it in the
        partition. Such a check closes nothing; it restarts the idle clock of every key of
        the partition with open windows at ``received_wall_ms`` instead (``seen_ms``), so
        a key is only closed after ``idle_timeout_ms`` of silence with the pipeline up.

        Args:
            partition: the partition the idle-check control message arrived on.
            now_wall_ms: the control message's wall clock (when it was written), UTC
                epoch ms.
            received_wall_ms: the agent's wall clock when handling it, UTC epoch ms
                (None: not checked for a stall).

        Returns:
            BatchResult: only ``closed``, ``dirty`` and ``idle_clocks_restarted`` are
            filled.
        """
        res = BatchResult()
        if (received_wall_ms is not None
                and received_wall_ms - now_wall_ms >= self.stall_after_ms):
            for key, st, _ in list(self._idle_candidates(partition, received_wall_ms)):
                if st["seen_ms"] < received_wall_ms:
                    st["seen_ms"] = received_wall_ms
                    res.dirty.add(key)
            res.idle_clocks_restarted = len(res.dirty)
            return res
        for key, st, pred in list(self._idle_candidates(partition, now_wall_ms)):
            wm = watermark_ms(self._max_ts.get((partition, _key_clock(key)), -1), self.grace_ms)
            if self._close(key, st, res, pred, wm):
                res.dirty.add(key)
        return res

    def _close(self, key: str, st: KeyState, res: BatchResult,
               pred: Callable[[int], bool], wm_ms: int) -> bool:
        bars = st["bars"]
        if not bars:
            return False
        done = sorted(b for b in (bar["b"] for bar in bars.values()) if pred(b))
        if not done:
            return False
        exchange, symbol = key.split(":", 1)
        kept = st.get("done") if self._retain else None
        if kept is None and "kf" in st:  # policy is dead_letter now: retained bars go
            del st["kf"]
            st.pop("done", None)
        for b in done:
            bar = bars.pop(str(b))
            res.closed.append(finalize_bar(exchange, symbol, bar, self.size_ms))
            if kept is not None:
                kept[str(b)] = bar
        st["closed"] = max(st["closed"], done[-1])
        if kept is not None:
            self._prune(st, wm_ms)
        return True

    def _prune(self, st: KeyState, wm_ms: int) -> bool:
        """Drop retained closed bars of ``st`` that left the correction horizon at
        watermark ``wm_ms``; True when any was dropped."""
        kept: dict[str, Bar] = st["done"]
        old = [k for k, bar in kept.items()
               if not correctable(bar["b"], wm_ms, self.correction_horizon_ms, self.size_ms)]
        for k in old:
            del kept[k]
        return bool(old)
