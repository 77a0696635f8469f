"""The run path of the aggregator (tables.window.apply_run) against the per-tick path.

``WindowAggregator(runs=True)`` applies consecutive ticks of one key and window at once;
``runs=False`` applies them one by one with ``apply_tick``. On random streams both must
give the same results and the same states, bit for bit (floats compared by ``repr``).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.models import Tick, TickList, decode_ticks_payload, encode_ticks, parse_ticks
from tables.aggregator import BatchResult, WindowAggregator
from tables.window import apply_run, apply_tick

T0 = 1_723_161_240_000  # a minute boundary
KEYS = [("binance", "BTCUSDT"), ("binance", "ETHUSDT"), ("kraken", "XBTUSDT")]
PRICES = st.sampled_from([61837.63, 61837.64, 61800.0, 0.1, 0.3, 2.5e-05, 123456.789])
QTYS = st.sampled_from([0.0, 0.02, 0.00021, 1.5, 3.0, 1e-09, 0.1234567891])


@st.composite
def streams(draw: st.DrawFn) -> list[list[Tick]]:
    """Messages of runs: each run is one key, ids mostly consecutive (sometimes a gap, a
    repeat, a non-canonical id or none), times mostly increasing within ±a few seconds,
    sometimes exactly onto the next window's start."""
    next_id = {k: draw(st.integers(1, 10**6)) for k in KEYS}
    now = {k: T0 + draw(st.integers(0, 50_000)) for k in KEYS}
    messages = []
    for _ in range(draw(st.integers(1, 8))):
        ticks: list[Tick] = []
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.sampled_from(KEYS))
            ids = draw(st.sampled_from(["seq", "seq", "seq", "none", "mixed"]))
            for _ in range(draw(st.integers(1, 30))):
                step = draw(st.sampled_from([0, 0, 1, 7, 900, 4_000, -300, -30_000, None]))
                if step is None:  # exactly the next window's start
                    now[key] += 60_000 - now[key] % 60_000
                else:
                    now[key] += step
                if ids == "none":
                    tid = None
                else:
                    step = draw(st.sampled_from([1] * 12 + [0, 2, -3]))
                    next_id[key] += step
                    tid = str(next_id[key])
                    if ids == "mixed" and draw(st.integers(0, 5)) == 0:
                        tid = draw(st.sampled_from([None, "0" + tid, "x" + tid]))
                ticks.append(Tick(key[0], key[1], draw(PRICES), draw(QTYS), now[key], tid,
                                  "test"))
        messages.append(ticks)
    return messages


def _result(res: BatchResult) -> dict[str, Any]:
    return {
        "applied": res.applied, "duplicates": res.duplicates, "late": repr(res.late),
        "closed": repr(res.closed), "corrected": repr(res.corrected),
        "corrections": res.corrections, "duplicate_trades": res.duplicate_trades,
        "latest": repr(sorted(res.latest.items())), "applied_ticks": repr(res.applied_ticks),
        "dirty": sorted(res.dirty), "invalid": repr([(t, e.reason) for t, e in res.invalid]),
    }


@settings(max_examples=300, deadline=None)
@given(streams(), st.sampled_from(["dead_letter", "correct"]), st.sampled_from([0, 5_000]))
def test_run_path_gives_what_the_per_tick_path_gives(
        messages: list[list[Tick]], policy: str, grace_ms: int) -> None:
    aggs = [WindowAggregator({}, grace_ms=grace_ms, idle_timeout_ms=1_000, late_policy=policy,
                             runs=runs) for runs in (True, False)]
    wall = T0
    for off, ticks in enumerate(messages):
        wall += 1_000
        got, want = (a.process_ticks(0, off, ticks, wall) for a in aggs)
        assert _result(got) == _result(want)
        assert repr(aggs[0].store) == repr(aggs[1].store)
    wall += 10**9
    got, want = (a.process_idle(0, wall) for a in aggs)
    assert _result(got) == _result(want)


def _one_key_messages(messages: list[list[Tick]]) -> list[list[Tick]]:
    """Each message cut where the key changes: messages of one key each, as a columnar
    batch would give them."""
    out: list[list[Tick]] = []
    for ticks in messages:
        cut: list[list[Tick]] = []
        for t in ticks:
            if cut and cut[-1][-1].key == t.key:
                cut[-1].append(t)
            else:
                cut.append([t])
        out += cut
    return out


def _columns(ticks: list[Tick]) -> TickList:
    """What parse_ticks returns for a valid columnar batch of these ticks."""
    out = TickList(ticks)
    out.price, out.qty = [t.price for t in ticks], [t.qty for t in ticks]
    out.ts_ms = [t.ts_ms for t in ticks]
    ids = [t.trade_id for t in ticks]
    out.trade_id = None if all(i is None for i in ids) else ids
    return out


@settings(max_examples=300, deadline=None)
@given(streams(), st.sampled_from(["dead_letter", "correct"]), st.sampled_from([0, 5_000]))
def test_column_runs_give_what_the_per_tick_path_gives(
        messages: list[list[Tick]], policy: str, grace_ms: int) -> None:
    """Messages of one key with their columns (TickList: runs cut by bisection when in
    time order, applied from column slices) against plain tick lists, tick by tick."""
    aggs = [WindowAggregator({}, grace_ms=grace_ms, idle_timeout_ms=1_000, late_policy=policy,
                             runs=runs) for runs in (True, False)]
    wall = T0
    for off, ticks in enumerate(_one_key_messages(messages)):
        wall += 1_000
        got = aggs[0].process_ticks(0, off, _columns(ticks), wall)
        want = aggs[1].process_ticks(0, off, ticks, wall)
        assert _result(got) == _result(want)
        assert repr(aggs[0].store) == repr(aggs[1].store)


def test_parse_ticks_keeps_the_columns_of_a_valid_batch() -> None:
    ticks = [Tick("binance", "BTCUSDT", 100.0 + i, 0.5, T0 + i, str(7 + i), "replay")
             for i in range(3)]
    payload = decode_ticks_payload(encode_ticks(ticks))
    got, rejected = parse_ticks(payload, T0, 10**12)
    assert type(got) is TickList and got == ticks and not rejected
    assert (got.price, got.qty, got.ts_ms, got.trade_id) == (
        [100.0, 101.0, 102.0], [0.5] * 3, [T0, T0 + 1, T0 + 2], ["7", "8", "9"])
    bad = decode_ticks_payload(encode_ticks([*ticks, ticks[0]._replace(price=-1.0)]))
    got, rejected = parse_ticks(bad, T0, 10**12)
    assert type(got) is not TickList and got == ticks and len(rejected) == 1


def _bar_of(ticks: list[Tick]) -> dict[str, Any]:
    bars: dict[str, Any] = {}
    for t in ticks:
        apply_tick(bars, t.price, t.qty, t.ts_ms, T0, trade_id=t.trade_id)
    (bar,) = bars.values()
    return bar


def _ticks(ids: list[str | None], qty: float = 0.5) -> list[Tick]:
    return [Tick("binance", "BTCUSDT", 100.0 + i, qty, T0 + 10 * i, tid, "test")
            for i, tid in enumerate(ids)]


def test_apply_run_takes_the_next_consecutive_ids_and_leaves_others_alone() -> None:
    """Consecutive ids after the bar's last range (or no ids) go in at once; a repeat, a
    gap, a non-canonical id, a mix or more places than the bar's scale leave the bar
    unchanged."""
    first = _ticks(["7"])
    run = _ticks(["7", "8", "9", "10"])[1:]
    bar = _bar_of(first)
    assert apply_run(bar, run) == (103.0, T0 + 30)  # the newest trade of the run
    assert bar == _bar_of(first + run) and bar["ids"]["r"] == [7, 10]
    for ids in (["10", "11"], ["12"], ["11", "13"], ["011"], ["11", None]):
        bar = _bar_of(_ticks(["7", "8", "9", "10"]))
        before = copy.deepcopy(bar)
        assert apply_run(bar, _ticks(ids)) is None, ids
        assert bar == before
    bar = _bar_of(first)
    assert apply_run(bar, _ticks([None, None])) is not None  # no id: no dedupe, as apply_tick
    assert bar == _bar_of(first + _ticks([None, None]))
    bar = _bar_of(_ticks([None]))
    before = copy.deepcopy(bar)
    assert apply_run(bar, _ticks([None], qty=1e-09)) is None  # 9 places: a rescale, per tick
    assert bar == before
