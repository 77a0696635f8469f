"""WindowAggregator against a reference written only with the pure helpers of tables.window.

:meth:`tables.aggregator.WindowAggregator.process_ticks` inlines the bucket, watermark and
lateness rules in its per-tick loop and skips close scans while the watermark stays in
one bucket. :class:`Reference` states the same rules the slow way: one tick at a time,
every decision made by a helper of :mod:`tables.window` (:func:`bucket_start_ms`,
:func:`watermark_ms`, :func:`is_late`, :func:`correctable`, :func:`new_trade_ids` and
:func:`add_trade_id` for duplicate trades, :func:`apply_tick` for the OHLCV,
:func:`closable_by_watermark`, :func:`closable_by_idle`, :func:`finalize_bar`,
:func:`new_key_state`). Hypothesis drives
both with random streams (several exchanges, symbols and partitions; out-of-order, late
and duplicate ticks; re-delivered messages; idle gaps, stalled idle checks; restarts from
the JSON changelog, also switching ``dead_letter`` to ``correct``) and compares every
outcome: which ticks are applied, late (dead-lettered), corrections or duplicates, which
windows close and when, the bars, the watermarks and the stored state.

What is not a window rule is restated plainly: the per-key offset de-duplication, the
stalled-idle-check restart and when a key starts retaining closed windows (``kf``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.models import Tick
from tables.aggregator import BatchResult, WindowAggregator
from tables.window import (
    KeyState,
    add_trade_id,
    apply_tick,
    bucket_start_ms,
    closable_by_idle,
    closable_by_watermark,
    correctable,
    finalize_bar,
    is_late,
    new_key_state,
    new_trade_ids,
    watermark_ms,
)

T0 = 1_723_161_300_000  # a minute boundary
EXCHANGES = ("a", "b", "replay.a")  # "b" lags "a"; "replay.a" is far behind the wall clock
SYMBOLS = ("X", "Y")
KEYS = tuple(f"{e}:{s}" for e in EXCHANGES for s in SYMBOLS)


@dataclass(frozen=True)
class Params:
    """One scenario's configuration (all ms)."""

    size_ms: int
    grace_ms: int
    idle_timeout_ms: int
    stall_after_ms: int
    horizon_ms: int
    policy: str


@dataclass
class Outcome:
    """The observable part of a :class:`BatchResult` (bars sorted by key and bucket)."""

    applied: int = 0
    duplicates: int = 0
    late: list[Tick] = field(default_factory=list)
    closed: list[dict[str, Any]] = field(default_factory=list)
    corrected: list[dict[str, Any]] = field(default_factory=list)
    corrections: int = 0
    duplicate_trades: int = 0
    latest: dict[str, tuple[float, int]] = field(default_factory=dict)
    applied_ticks: list[Tick] = field(default_factory=list)
    idle_clocks_restarted: int = 0

    def sort(self) -> Outcome:
        def by(b: dict[str, Any]) -> tuple[str, str, int]:
            return b["exchange"], b["symbol"], b["bucket_start_ms"]

        self.closed.sort(key=by)
        self.corrected.sort(key=by)
        return self


def observed(res: BatchResult) -> Outcome:
    return Outcome(res.applied, res.duplicates, list(res.late), list(res.closed),
                   list(res.corrected), res.corrections, res.duplicate_trades,
                   dict(res.latest), list(res.applied_ticks),
                   res.idle_clocks_restarted).sort()


class Reference:
    """The window rules, tick by tick, with the helpers of :mod:`tables.window` only.

    State per key has the :func:`new_key_state` schema, so it compares with the
    aggregator's store. Closing happens at the end of a message (as documented for
    ``process_ticks``), with every key of the clock scanned every time.
    """

    def __init__(self, p: Params) -> None:
        self.p = p
        self.retain = p.policy == "correct"
        self.states: dict[str, KeyState] = {}
        self.max_ts: dict[tuple[int, str], int] = {}  # (partition, exchange) -> max ts_ms

    def wm(self, partition: int, exchange: str) -> int:
        return watermark_ms(self.max_ts.get((partition, exchange), -1), self.p.grace_ms)

    def keys_of(self, partition: int, exchange: str | None = None) -> list[str]:
        return [k for k, s in self.states.items() if s["p"] == partition
                and (exchange is None or k.partition(":")[0] == exchange)]

    def process_ticks(self, partition: int, offset: int, ticks: list[Tick],
                      wall_ms: int) -> Outcome:
        p, out = self.p, Outcome()
        touched: dict[str, KeyState | None] = {}
        corrected: dict[tuple[str, int], dict[str, Any]] = {}
        for t in ticks:
            key = t.key
            if key not in touched:
                old = self.states.get(key)
                if old is None:
                    touched[key] = new_key_state(partition, self.retain)
                elif old["off"] >= offset:  # offset de-duplication, not a window rule
                    touched[key] = None
                else:
                    if self.retain and "kf" not in old:  # corrections start after the
                        old["done"] = {}                 # newest window closed before
                        old["kf"] = old["closed"] + p.size_ms if old["closed"] >= 0 else -1
                    touched[key] = old
            s = touched[key]
            if s is None:
                out.duplicates += 1
                continue
            wm = self.wm(partition, t.exchange)
            b = bucket_start_ms(t.ts_ms, p.size_ms)
            if is_late(b, wm, s["closed"], p.size_ms):
                if not (self.retain and correctable(b, wm, p.horizon_ms, p.size_ms)):
                    out.late.append(t)
                    continue
                if str(b) not in s["bars"]:  # else: still open, applied below
                    if str(b) not in s["done"] and b < s["kf"]:
                        out.late.append(t)  # closed before the key retained windows
                    elif self._apply(s["done"], t, wall_ms):
                        out.corrections += 1
                        corrected[(key, b)] = s["done"][str(b)]
                    else:
                        out.duplicate_trades += 1
                    continue
            if not self._apply(s["bars"], t, wall_ms):
                out.duplicate_trades += 1
                continue
            out.applied += 1
            out.applied_ticks.append(t)
            mk = (partition, t.exchange)
            self.max_ts[mk] = max(self.max_ts.get(mk, -1), t.ts_ms)
            s["max_ts"] = max(s["max_ts"], t.ts_ms)
            if key not in out.latest or t.ts_ms >= out.latest[key][1]:
                out.latest[key] = (t.price, t.ts_ms)
        for (key, _b), bar in corrected.items():
            ex, sym = key.split(":", 1)
            out.corrected.append({**finalize_bar(ex, sym, bar, p.size_ms), "correction": True})
        clocks = set()
        for key, s in touched.items():
            if s is not None:
                s["off"], s["seen_ms"] = offset, wall_ms
                self.states[key] = s
                clocks.add(key.partition(":")[0])
        for c in sorted(clocks):
            wm = self.wm(partition, c)
            for key in self.keys_of(partition, c):
                s = self.states[key]
                self._close(key, [bar["b"] for bar in s["bars"].values()
                                  if closable_by_watermark(bar["b"], wm, p.size_ms)], out)
                self._prune(s, wm)
        return out.sort()

    def _apply(self, bars: dict[str, Any], t: Tick, wall_ms: int) -> bool:
        """Apply ``t`` to its window in ``bars`` unless its trade id is already there: the
        id set lives and dies with the bar (closed and dropped, retained, pruned)."""
        sb = str(bucket_start_ms(t.ts_ms, self.p.size_ms))
        ids = bars[sb].get("ids") if sb in bars else None
        if t.trade_id is not None:
            if ids is None:
                ids = new_trade_ids()
            if not add_trade_id(ids, t.trade_id):
                return False  # a duplicate trade
        apply_tick(bars, t.price, t.qty, t.ts_ms, wall_ms, self.p.size_ms)  # no trade id
        if ids is not None:
            bars[sb]["ids"] = ids
        return True

    def idle_work(self, partition: int, now_wall_ms: int) -> bool:
        return any(self._idle_closable(self.states[k], now_wall_ms)
                   for k in self.keys_of(partition))

    def process_idle(self, partition: int, now_wall_ms: int,
                     received_wall_ms: int | None) -> Outcome:
        p, out = self.p, Outcome()
        with_bars = [k for k in self.keys_of(partition) if self.states[k]["bars"]]
        if received_wall_ms is not None and received_wall_ms - now_wall_ms >= p.stall_after_ms:
            for k in with_bars:  # a stalled check: restart the idle clocks, close nothing
                if self.states[k]["seen_ms"] < received_wall_ms:
                    self.states[k]["seen_ms"] = received_wall_ms
                    out.idle_clocks_restarted += 1
            return out
        for k in with_bars:
            s = self.states[k]
            self._close(k, self._idle_closable(s, now_wall_ms), out)
            self._prune(s, self.wm(partition, k.partition(":")[0]))
        return out.sort()

    def _idle_closable(self, s: KeyState, now_wall_ms: int) -> list[int]:
        p = self.p
        return [bar["b"] for bar in s["bars"].values() if closable_by_idle(
            bar["b"], s["seen_ms"], now_wall_ms, p.idle_timeout_ms, p.grace_ms, p.size_ms)]

    def _close(self, key: str, buckets: list[int], out: Outcome) -> None:
        s = self.states[key]
        ex, sym = key.split(":", 1)
        for b in sorted(buckets):
            bar = s["bars"].pop(str(b))
            out.closed.append(finalize_bar(ex, sym, bar, self.p.size_ms))
            if self.retain and "done" in s:
                s["done"][str(b)] = bar
            s["closed"] = max(s["closed"], b)

    def _prune(self, s: KeyState, wm: int) -> None:
        if "done" in s:
            s["done"] = {k: bar for k, bar in s["done"].items()
                         if correctable(bar["b"], wm, self.p.horizon_ms, self.p.size_ms)}


# ------------------------------------------------------------------------------ streams


@dataclass(frozen=True)
class Scenario:
    params: Params
    keys: list[str]  # the keys in play (few keys: dense interactions per key)
    partition_of: dict[str, int]
    skew_ms: dict[str, int]  # event time minus wall clock, per exchange
    events: list[tuple[Any, ...]]


@st.composite
def scenarios(draw: st.DrawFn, focused: bool = False) -> Scenario:
    """A random stream. ``focused``: one or two keys of one exchange on one partition, a
    longer stream, more idle checks, and a restart that switches ``dead_letter`` to
    ``correct``, so that chains such as idle close -> tick into that window, or switch ->
    late tick into the first retained window, are reached in a few percent of examples."""
    size = draw(st.sampled_from((1_000, 60_000)))
    g = size // 8  # time grid: boundaries (end == watermark, ...) are hit often
    idle = draw(st.integers(1, 16)) * g
    params = Params(
        size_ms=size,
        grace_ms=draw(st.integers(0, 24)) * g,
        idle_timeout_ms=idle,
        stall_after_ms=idle + draw(st.sampled_from((0, g))),
        horizon_ms=draw(st.integers(0, 240 if focused else 40)) * g
        + draw(st.sampled_from((0, 1))),
        policy="dead_letter" if focused else draw(st.sampled_from(("dead_letter", "correct"))),
    )
    if focused:
        ex = draw(st.sampled_from(EXCHANGES))
        keys = [f"{ex}:{sym}" for sym in draw(st.sampled_from((SYMBOLS[:1], SYMBOLS)))]
        partition_of = dict.fromkeys(keys, 0)
    else:
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=len(KEYS),
                             unique=True))
        partition_of = {k: draw(st.integers(0, 1)) for k in keys}
    skew = {"a": 0, "b": -draw(st.integers(0, 24)) * g,
            "replay.a": -draw(st.integers(0, 2_000)) * g}
    jitter = st.sampled_from((0, 0, 1, g - 1))
    tick = st.tuples(
        st.integers(0, 5),                    # which key of the message's partition
        st.sampled_from(("wall", "wall", "watermark", "closed", "kept_from")
                        + (("closed", "kept_from") if focused else ())),
        st.integers(-24, 16), jitter,         # ts_ms = anchor + offset (see tick_ts)
        st.sampled_from((1.0, 2.0, 3.5, 100.0)),
        st.sampled_from((0.0, 0.5, 1.0, 2.0)),
        st.one_of(st.none(), st.integers(0, 12).map(str), st.sampled_from(("x", "007"))),
    )
    gap = st.one_of(st.integers(0, 12).map(lambda n: n * g),      # wall clock advance
                    st.integers(1, 8 if focused else 40).map(lambda n: n * size))  # idle gap
    msg = st.tuples(st.just("ticks"), gap, st.integers(0, 5), st.booleans(),
                    st.lists(tick, min_size=1, max_size=10))
    idle_check = st.tuples(st.just("idle"), gap, st.integers(0, 0 if focused else 1),
                           st.sampled_from(("none", "prompt", "stalled")), jitter)
    ev = st.one_of(
        msg, msg, msg, msg, idle_check, *([idle_check] if focused else []),
        st.tuples(st.just("redeliver"), gap, st.integers(0, 1_000)),
        st.tuples(st.just("restart"), gap, st.just(False) if focused else st.booleans()),
    )
    events = draw(st.lists(ev, min_size=8 if focused else 1, max_size=40 if focused else 30))
    if focused:
        events.insert(draw(st.integers(0, len(events))), ("restart", 0, True))
    return Scenario(params, keys, partition_of, skew, events)


def tick_ts(ref: Reference, part: int, key: str, anchor: str, dt: int, jitter: int,
            wall: int, skew_ms: int) -> int:
    """Event time of a generated tick: near the wall clock (shifted by the exchange's
    skew), near the clock's watermark (aligned so that window end == watermark occurs),
    near the key's newest closed window or near its first retained window (``kf``); the
    last three fall back to the wall clock. The offset is ``dt`` grid steps, a third of
    that near the key's windows (the windows next to it)."""
    p = ref.p
    base = wall + skew_ms
    mx = ref.max_ts.get((part, key.partition(":")[0]), -1)
    if anchor == "watermark" and mx >= 0:
        base = bucket_start_ms(watermark_ms(mx, p.grace_ms), p.size_ms) + p.grace_ms
    elif anchor == "closed" and key in ref.states and ref.states[key]["closed"] >= 0:
        base, dt = ref.states[key]["closed"], dt // 3
    elif anchor == "kept_from" and key in ref.states and ref.states[key].get("kf", -1) >= 0:
        base, dt = ref.states[key]["kf"], dt // 3
    return base + dt * (p.size_ms // 8) + jitter


def make_agg(store: dict[str, KeyState], p: Params, policy: str) -> WindowAggregator:
    return WindowAggregator(store, grace_ms=p.grace_ms, idle_timeout_ms=p.idle_timeout_ms,
                            size_ms=p.size_ms, late_policy=policy,
                            correction_horizon_ms=p.horizon_ms,
                            stall_after_ms=p.stall_after_ms)


def comparable(s: KeyState, wm: int, p: Params) -> KeyState:
    """``s`` without retained windows that left the horizon: the aggregator prunes them
    at its next close scan, the reference at every one (neither corrects them)."""
    s = copy.deepcopy(s)
    if "done" in s:
        s["done"] = {k: bar for k, bar in s["done"].items()
                     if correctable(bar["b"], wm, p.horizon_ms, p.size_ms)}
    return s


def check_result(res: BatchResult, want: Outcome, before: dict[str, KeyState],
                 agg: WindowAggregator, p: Params) -> None:
    got = observed(res)
    assert got == want
    for t in res.late:
        assert f"window {bucket_start_ms(t.ts_ms, p.size_ms)} already closed" in (
            agg.late_detail(t))
    per_key: dict[tuple[str, str], list[int]] = {}
    for bar in res.closed:  # oldest first per key
        per_key.setdefault((bar["exchange"], bar["symbol"]), []).append(bar["bucket_start_ms"])
    assert all(bs == sorted(set(bs)) for bs in per_key.values())
    assert len({(b["exchange"], b["symbol"], b["bucket_start_ms"])
                for b in res.corrected}) == len(res.corrected)
    for key, s in agg.store.items():  # every changed state is named in dirty
        if key not in res.dirty:
            assert before.get(key) == s, key
    for name, n in (("late", len(got.late)), ("closed", len(got.closed)),
                    ("corrections", got.corrections), ("duplicates", got.duplicates),
                    ("duplicate trades", got.duplicate_trades),
                    ("idle clocks restarted", got.idle_clocks_restarted)):
        if n:
            event(name)


def check_state(agg: WindowAggregator, ref: Reference, p: Params) -> None:
    assert set(agg.store) == set(ref.states)
    for key, s in ref.states.items():
        wm = ref.wm(s["p"], key.partition(":")[0])
        assert comparable(agg.store[key], wm, p) == comparable(s, wm, p), key
        # the aggregator prunes at close scans (when the watermark enters a new bucket):
        # what it retains is correctable at least at the start of the watermark's bucket
        assert all(correctable(bar["b"], bucket_start_ms(wm, p.size_ms), p.horizon_ms,
                               p.size_ms) for bar in agg.store[key].get("done", {}).values())
    for part in (0, 1):
        exchanges = {k.partition(":")[0] for k in ref.keys_of(part)}
        for ex in exchanges:
            assert agg.watermark(part, ex) == ref.wm(part, ex)
        assert agg.watermark(part) == watermark_ms(
            max((ref.max_ts.get((part, ex), -1) for ex in exchanges), default=-1), p.grace_ms)


def run(sc: Scenario) -> None:
    """Feed the scenario to a WindowAggregator and the Reference; compare after each event."""
    p = sc.params
    policy = p.policy
    agg, ref = make_agg({}, p, policy), Reference(p)
    wall = T0
    offsets = {0: 0, 1: 0}
    sent: list[tuple[int, int, list[Tick]]] = []
    for ev in sc.events:
        kind, gap = ev[0], ev[1]
        wall += gap
        before = copy.deepcopy(dict(agg.store))
        if kind == "ticks":
            _, _, first, mixed, specs = ev
            main = sc.keys[first % len(sc.keys)]
            part = sc.partition_of[main]
            keys = [k for k in sc.keys if sc.partition_of[k] == part]
            ticks = []
            for i, anchor, dt, jit, price, qty, trade_id in specs:
                key = keys[i % len(keys)] if mixed else main
                ex, sym = key.split(":")
                ts = tick_ts(ref, part, key, anchor, dt, jit, wall, sc.skew_ms[ex])
                ticks.append(Tick(ex, sym, price, qty, ts, trade_id, "test"))
            off = offsets[part]
            offsets[part] += 1
            sent.append((part, off, ticks))
            res = agg.process_ticks(part, off, ticks, wall)
            check_result(res, ref.process_ticks(part, off, ticks, wall), before, agg, p)
        elif kind == "redeliver" and sent:  # at-least-once: an old message again
            part, off, ticks = sent[ev[2] % len(sent)]
            res = agg.process_ticks(part, off, ticks, wall)
            check_result(res, ref.process_ticks(part, off, ticks, wall), before, agg, p)
        elif kind == "idle":
            _, _, part, delivery, jit = ev
            received = {"none": None, "prompt": wall + jit,
                        "stalled": wall + p.stall_after_ms + jit}[delivery]
            assert agg.has_idle_work(part, wall) == ref.idle_work(part, wall)
            res = agg.process_idle(part, wall, received)
            check_result(res, ref.process_idle(part, wall, received), before, agg, p)
        elif kind == "restart":  # recover from the changelog (JSON), maybe start correcting
            if ev[2] and policy == "dead_letter":
                policy = "correct"
                ref.retain = True
                event("policy switched to correct")
            agg = make_agg(json.loads(json.dumps(agg.store)), p, policy)
        check_state(agg, ref, p)


RULES = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(RULES, max_examples=500)
@given(scenarios())
def test_aggregator_decides_as_the_pure_helpers(sc: Scenario) -> None:
    run(sc)


@settings(RULES, max_examples=400)
@given(scenarios(focused=True))
def test_one_key_through_idle_closes_and_a_policy_switch(sc: Scenario) -> None:
    run(sc)

