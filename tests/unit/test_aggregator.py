"""WindowAggregator on a dict store: watermark, grace, late ticks, idle close, dedup."""

from __future__ import annotations

import json
from typing import Any

import orjson

from core.models import Tick
from tables.aggregator import WindowAggregator
from tables.window import encode_state

MIN = 60_000
T0 = 1_723_161_300_000
GRACE = 5_000


def tick(ts: int, price: float = 100.0, qty: float = 1.0, ex: str = "ex", sym: str = "BTCUSDT"
         ) -> Tick:
    return Tick(ex, sym, price, qty, ts, None, "test")


def via_changelog(store: dict[str, Any]) -> dict[str, Any]:
    """The store as a restarted worker recovers it: each state through its changelog
    record (exact sums as strings, read back by Faust's orjson)."""
    return {k: orjson.loads(encode_state(st)) for k, st in store.items()}


def agg(store: dict | None = None) -> WindowAggregator:
    return WindowAggregator({} if store is None else store, grace_ms=GRACE,
                            idle_timeout_ms=10_000)


def test_watermark_closes_after_grace_not_before() -> None:
    a = agg()
    r = a.process_ticks(0, 0, [tick(T0 + 10), tick(T0 + MIN + GRACE - 1)], wall_ms=1)
    assert r.closed == [] and r.applied == 2
    r = a.process_ticks(0, 1, [tick(T0 + MIN + GRACE)], wall_ms=2)
    assert [b["bucket_start_ms"] for b in r.closed] == [T0]
    assert r.closed[0]["trade_count"] == 1
    assert "ex:BTCUSDT" in r.dirty


def test_out_of_order_within_grace_is_counted() -> None:
    a = agg()
    a.process_ticks(0, 0, [tick(T0 + 59_000, price=1.0)], wall_ms=1)
    a.process_ticks(0, 1, [tick(T0 + MIN + 3_000, price=2.0)], wall_ms=1)
    r = a.process_ticks(0, 2, [tick(T0 + 58_000, price=3.0)], wall_ms=1)  # 5 s behind max
    assert r.late == [] and r.applied == 1
    r = a.process_ticks(0, 3, [tick(T0 + 2 * MIN + GRACE, price=4.0)], wall_ms=1)
    first = r.closed[0]
    assert first["bucket_start_ms"] == T0
    assert first["trade_count"] == 2 and first["open"] == 3.0 and first["close"] == 1.0


def test_late_tick_after_close_is_reported_not_counted() -> None:
    a = agg()
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=1)
    r = a.process_ticks(0, 1, [tick(T0 + MIN + GRACE)], wall_ms=1)
    assert len(r.closed) == 1
    late = tick(T0 + 2)
    r = a.process_ticks(0, 2, [late], wall_ms=1)
    assert r.late == [late] and r.applied == 0 and r.closed == []


def test_watermark_is_per_partition_across_keys() -> None:
    a = agg()
    a.process_ticks(0, 0, [tick(T0 + 1, sym="A")], wall_ms=1)
    a.process_ticks(1, 0, [tick(T0 + 1, sym="C")], wall_ms=1)
    r = a.process_ticks(0, 1, [tick(T0 + MIN + GRACE, sym="B")], wall_ms=1)
    assert [(b["symbol"], b["bucket_start_ms"]) for b in r.closed] == [("A", T0)]
    assert a.watermark(1) == T0 + 1 - GRACE  # partition 1 unaffected


def test_redelivered_message_is_not_counted_twice() -> None:
    store: dict = {}
    a = agg(store)
    msg = [tick(T0 + 1, price=1.0), tick(T0 + 2, price=2.0)]
    a.process_ticks(0, 7, msg, wall_ms=1)
    r = a.process_ticks(0, 7, msg, wall_ms=2)  # same offset again (at-least-once)
    assert r.duplicates == 2 and r.applied == 0
    assert store["ex:BTCUSDT"]["bars"][str(T0)]["n"] == 2


def test_recovered_state_resumes_identically() -> None:
    """State that went through JSON (the changelog) behaves like the original."""
    ticks = [tick(T0 + i * 7_000, price=100.0 + i) for i in range(30)]
    a = agg()
    whole = []
    for off, t in enumerate(ticks):
        whole += a.process_ticks(0, off, [t], wall_ms=1).closed
    store: dict = {}
    b = agg(store)
    split = []
    for off, t in enumerate(ticks[:12]):
        split += b.process_ticks(0, off, [t], wall_ms=1).closed
    c = agg(via_changelog(store))  # "restart" from the changelog copy
    for off, t in enumerate(ticks[12:], start=12):
        split += c.process_ticks(0, off, [t], wall_ms=1).closed
    c.process_ticks(0, 5, [ticks[5]], wall_ms=1)  # a re-delivered old offset
    assert split == whole and len(whole) >= 2


def test_idle_close_emits_last_bar_of_quiet_key() -> None:
    a = agg()
    wall = T0 + 10 * MIN  # replay of old data: wall clock far past the window
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=wall)
    assert not a.has_idle_work(0, wall + 5_000)
    assert a.process_idle(0, wall + 5_000).closed == []  # not idle long enough
    assert a.has_idle_work(0, wall + 10_000) and not a.has_idle_work(1, wall + 10_000)
    r = a.process_idle(0, wall + 10_000)
    assert [b["bucket_start_ms"] for b in r.closed] == [T0]
    assert a.process_idle(0, wall + 20_000).closed == []  # closed once
    assert not a.has_idle_work(0, wall + 20_000)
    assert a.process_ticks(0, 1, [tick(T0 + 3)], wall_ms=wall).late  # then late


def test_idle_close_keeps_the_live_minute_open() -> None:
    a = agg()
    a.process_ticks(0, 0, [tick(T0 + 1_000)], wall_ms=T0 + 1_000)
    # idle for 30 s but the minute is not over (wall clock T0+31s)
    assert a.process_idle(0, T0 + 31_000).closed == []
    assert len(a.process_idle(0, T0 + MIN + GRACE).closed) == 1


def test_stalled_idle_check_restarts_the_idle_clock() -> None:
    """An idle check written before a broker outage and delivered after it closes nothing:
    the keys' idle clocks restart at delivery, and ticks that waited behind it in the
    partition still reach their window."""
    a = agg()
    wall = T0 + 10 * MIN
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=wall)
    written = wall + 10_000                       # idle by then
    received = written + 10_000                   # delivered 10 s later: a stall
    r = a.process_idle(0, written, received)
    assert r.closed == [] and r.idle_clocks_restarted == 1 and r.dirty == {"ex:BTCUSDT"}
    assert a.store["ex:BTCUSDT"]["seen_ms"] == received
    assert not a.has_idle_work(0, received + 9_999)
    late = a.process_ticks(0, 1, [tick(T0 + 2)], wall_ms=received + 500)
    assert late.late == [] and late.applied == 1
    # a prompt check after 10 s of silence with the pipeline up closes the window
    r = a.process_idle(0, received + 500 + 10_000, received + 500 + 10_050)
    assert [b["trade_count"] for b in r.closed] == [2] and r.idle_clocks_restarted == 0


def test_idle_check_only_touches_its_partition() -> None:
    a = agg()
    wall = T0 + 10 * MIN
    a.process_ticks(0, 0, [tick(T0, sym="A")], wall_ms=wall)
    a.process_ticks(1, 0, [tick(T0, sym="B")], wall_ms=wall)
    r = a.process_idle(1, wall + 60_000)
    assert [b["symbol"] for b in r.closed] == ["B"]


def test_replay_namespace_has_its_own_watermark() -> None:
    """Old replayed ticks beside a live feed on one partition: the namespace keeps its own
    event time (applied, closed by its own watermark); under a real exchange name the same
    old ticks are late."""
    from tables.aggregator import clock_of

    assert (clock_of("binance"), clock_of("replay.binance"), clock_of("sim.x.y")) == (
        "", "replay", "sim.x")
    now = T0 + 400 * 86_400_000
    a = agg()
    a.process_ticks(0, 0, [tick(now, ex="binance")], wall_ms=now)
    r = a.process_ticks(0, 1, [tick(T0 + 1, ex="replay.binance"),
                               tick(T0 + 2, ex="binance")], wall_ms=now)
    assert r.applied == 1 and [t.exchange for t in r.late] == ["binance"]
    assert a.watermark(0, "replay.binance") == T0 + 1 - GRACE
    assert a.watermark(0, "binance") == a.watermark(0) == now - GRACE
    r = a.process_ticks(0, 2, [tick(T0 + MIN + GRACE, ex="replay.binance")], wall_ms=now)
    assert [(b["exchange"], b["bucket_start_ms"], b["trade_count"]) for b in r.closed] == [
        ("replay.binance", T0, 1)]
    # the live key's open window was not closed by the replay's progress, nor vice versa
    assert str(now - now % MIN) in a.store["binance:BTCUSDT"]["bars"]
    # recovery from the store rebuilds both clocks
    b = agg(dict(a.store))
    assert b.watermark(0, "replay.binance") == T0 + MIN + GRACE - GRACE
    assert b.watermark(0, "binance") == now - GRACE


def test_watermark_is_per_exchange() -> None:
    """Two exchanges on one partition, one 40 s behind the other (a backlog drained after a
    broker outage, or a clock that disagrees): the slower one's ticks are not late, each
    exchange's windows close by its own progress, and both keys of one exchange share its
    watermark."""
    a = agg()
    a.process_ticks(0, 0, [tick(T0 + 50_000, ex="fast"), tick(T0 + 1_000, ex="slow")], 1)
    r = a.process_ticks(0, 1, [tick(T0 + MIN + 40_000, ex="fast")], 1)
    assert [(b["exchange"], b["bucket_start_ms"]) for b in r.closed] == [("fast", T0)]
    r = a.process_ticks(0, 2, [tick(T0 + 30_000, ex="slow", sym="ETHUSDT")], 1)
    assert r.late == [] and r.applied == 1 and r.closed == []
    assert a.watermark(0, "slow") == T0 + 30_000 - GRACE
    r = a.process_ticks(0, 3, [tick(T0 + MIN + GRACE, ex="slow")], 1)
    assert sorted((b["symbol"], b["trade_count"]) for b in r.closed) == [
        ("BTCUSDT", 1), ("ETHUSDT", 1)]


# --------------------------------------------------------------- late policy, duplicates

HORIZON = 3 * MIN


def tid_tick(ts: int, trade_id: str | None, price: float = 100.0, qty: float = 1.0,
             sym: str = "BTCUSDT") -> Tick:
    return Tick("ex", sym, price, qty, ts, trade_id, "test")


def corr_agg(store: dict | None = None, policy: str = "correct") -> WindowAggregator:
    return WindowAggregator({} if store is None else store, grace_ms=GRACE,
                            idle_timeout_ms=10_000, late_policy=policy,
                            correction_horizon_ms=HORIZON)


def test_dead_letter_policy_reports_late_and_keeps_no_closed_bars() -> None:
    store: dict = {}
    a = corr_agg(store, "dead_letter")
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=1)
    a.process_ticks(0, 1, [tick(T0 + MIN + GRACE)], wall_ms=1)
    late = tick(T0 + 2, price=50.0)
    r = a.process_ticks(0, 2, [late], wall_ms=1)
    assert r.late == [late] and r.corrected == [] and r.corrections == 0
    assert "done" not in store["ex:BTCUSDT"]
    assert a.late_detail(late) == f"window {T0} already closed"


def test_correct_policy_applies_late_tick_and_re_emits_flagged_bar() -> None:
    store: dict = {}
    a = corr_agg(store)
    a.process_ticks(0, 0, [tick(T0 + 1, price=10.0), tick(T0 + 2, price=11.0)], wall_ms=1)
    r = a.process_ticks(0, 1, [tick(T0 + MIN + GRACE, price=12.0)], wall_ms=1)
    assert [b["trade_count"] for b in r.closed] == [2] and "correction" not in r.closed[0]
    late = [tick(T0 + 30_000, price=5.0, qty=2.0), tick(T0, price=20.0)]
    r = a.process_ticks(0, 2, late, wall_ms=1)
    assert r.late == [] and r.corrections == 2 and r.applied == 0
    assert len(r.corrected) == 1  # one re-emission per bar and message
    bar = r.corrected[0]
    assert bar["correction"] is True and bar["bucket_start_ms"] == T0
    assert (bar["open"], bar["high"], bar["low"], bar["close"], bar["trade_count"]) == (
        20.0, 20.0, 5.0, 5.0, 4)  # open = earliest ts (T0), close = latest ts (T0+30s)
    assert bar["volume"] == "5"
    assert "ex:BTCUSDT" in r.dirty
    # the state went through JSON (changelog) and still corrects identically
    b = corr_agg(via_changelog(store))
    r = b.process_ticks(0, 3, [tick(T0 + 59_999, price=7.0)], wall_ms=1)
    assert r.corrected[0]["trade_count"] == 5 and r.corrected[0]["close"] == 7.0


def test_correct_policy_dead_letters_beyond_horizon_and_prunes() -> None:
    store: dict = {}
    a = corr_agg(store)
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=1)
    a.process_ticks(0, 1, [tick(T0 + MIN + GRACE)], wall_ms=1)
    assert list(store["ex:BTCUSDT"]["done"]) == [str(T0)]
    # the watermark moves to exactly end + horizon of T0's window: it leaves the horizon
    r = a.process_ticks(0, 2, [tick(T0 + MIN + HORIZON + GRACE)], wall_ms=1)
    assert str(T0) not in store["ex:BTCUSDT"]["done"]
    late = tick(T0 + 5)
    r = a.process_ticks(0, 3, [late], wall_ms=1)
    assert r.late == [late] and r.corrected == []
    assert "beyond the correction horizon" in a.late_detail(late)


def test_correct_policy_empty_closed_minute_gets_a_bar_but_not_before_retention() -> None:
    store: dict = {}
    a = corr_agg(store, "dead_letter")
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=1)
    a.process_ticks(0, 1, [tick(T0 + 2 * MIN + GRACE)], wall_ms=1)  # closes T0
    b = corr_agg(store)  # policy switched to correct on the same state
    early = tick(T0 + 3)  # closed while corrections were off: no bar to correct
    r = b.process_ticks(0, 2, [early], wall_ms=1)
    assert r.late == [early]
    # T0+MIN had no trade and closed under the new policy: a late trade creates its bar
    r = b.process_ticks(0, 3, [tick(T0 + 3 * MIN + GRACE)], wall_ms=1)
    assert [x["bucket_start_ms"] for x in r.closed] == [T0 + 2 * MIN]
    r = b.process_ticks(0, 4, [tick(T0 + MIN + 7, price=3.0)], wall_ms=1)
    assert [(x["bucket_start_ms"], x["trade_count"]) for x in r.corrected] == [(T0 + MIN, 1)]


def test_late_within_message_for_still_open_window_is_applied_once() -> None:
    """A message that moves the watermark past a window and then carries a tick of it:
    with corrections on, the tick joins the (still open) bar, which then closes whole."""
    a = corr_agg()
    a.process_ticks(0, 0, [tick(T0 + 1)], wall_ms=1)
    r = a.process_ticks(0, 1, [tick(T0 + MIN + GRACE), tick(T0 + 2, price=9.0)], wall_ms=1)
    assert r.late == [] and r.corrected == [] and r.applied == 2
    assert [(x["bucket_start_ms"], x["trade_count"]) for x in r.closed] == [(T0, 2)]


def test_retained_state_is_bounded_by_the_horizon() -> None:
    store: dict = {}
    a = corr_agg(store)
    for i in range(60):  # one trade per minute for an hour
        a.process_ticks(0, i, [tick(T0 + i * MIN + 1)], wall_ms=1)
    st = store["ex:BTCUSDT"]
    bound = (HORIZON + MIN + GRACE) // MIN + 1
    assert 0 < len(st["done"]) <= bound and len(st["bars"]) <= 2
    assert len(json.dumps(st)) < 4_000


def test_duplicate_trade_ids_counted_once_per_window() -> None:
    store: dict = {}
    a = agg(store)
    r = a.process_ticks(0, 0, [tid_tick(T0 + 1, "100", price=1.0),
                               tid_tick(T0 + 2, "101", price=2.0),
                               tid_tick(T0 + 3, "100", price=99.0),  # feed re-sent it
                               tid_tick(T0 + 4, "abc", price=3.0),
                               tid_tick(T0 + 5, "abc", price=98.0),
                               tid_tick(T0 + 6, None, price=4.0),
                               tid_tick(T0 + 7, None, price=4.0)], wall_ms=1)
    assert (r.applied, r.duplicate_trades, r.duplicates) == (5, 2, 0)
    assert len(r.applied_ticks) == 5 and r.latest["ex:BTCUSDT"] == (4.0, T0 + 7)
    # same id on another symbol, or in another window, is a different trade
    r = a.process_ticks(0, 1, [tid_tick(T0 + 8, "100", sym="ETHUSDT"),
                               tid_tick(T0 + MIN + 1, "100")], wall_ms=1)
    assert (r.applied, r.duplicate_trades) == (2, 0)
    a = agg(via_changelog(store))  # the ids survive the changelog (JSON)
    r = a.process_ticks(0, 2, [tid_tick(T0 + 9, "101"), tid_tick(T0 + 9, "abc")], wall_ms=1)
    assert (r.applied, r.duplicate_trades) == (0, 2)
    r = a.process_ticks(0, 3, [tid_tick(T0 + 2 * MIN + GRACE, "1")], wall_ms=1)
    bar = next(b for b in r.closed if b["symbol"] == "BTCUSDT" and b["bucket_start_ms"] == T0)
    assert bar["trade_count"] == 5 and bar["high"] == 4.0 and bar["low"] == 1.0
    assert "ids" not in json.dumps(r.closed)
    assert str(T0) not in a.store["ex:BTCUSDT"]["bars"]  # ids dropped with the closed bar


def test_duplicate_late_trade_is_not_a_second_correction() -> None:
    a = corr_agg()
    a.process_ticks(0, 0, [tid_tick(T0 + 1, "5")], wall_ms=1)
    a.process_ticks(0, 1, [tid_tick(T0 + MIN + GRACE, "9")], wall_ms=1)
    r = a.process_ticks(0, 2, [tid_tick(T0 + 2, "6"), tid_tick(T0 + 2, "6"),
                               tid_tick(T0 + 1, "5")], wall_ms=1)
    assert (r.corrections, r.duplicate_trades) == (1, 2)
    assert r.corrected[0]["trade_count"] == 2


def test_trade_id_ranges_stay_compact_and_exact() -> None:
    import random

    from tables.window import add_trade_id, new_trade_ids

    ids = new_trade_ids()
    for i in range(1000, 3000):
        assert add_trade_id(ids, str(i))
    assert ids["r"] == [1000, 2999] and ids["s"] == {}
    rng = random.Random(7)
    ref: set[str] = set()
    ids = new_trade_ids()
    for _ in range(3000):
        tid = str(rng.randrange(0, 400)) if rng.random() < 0.9 else rng.choice(
            ["007", "x", "-1", "1e3", ""])
        assert add_trade_id(ids, tid) == (tid not in ref)
        ref.add(tid)
    r = ids["r"]
    assert r == sorted(r) and all(r[i + 1] > r[i] + 1 for i in range(1, len(r) - 1, 2))
    assert json.loads(json.dumps(ids)) == ids


def test_unknown_late_policy_is_a_config_error() -> None:
    import pytest

    from core.errors import ConfigError

    with pytest.raises(ConfigError):
        corr_agg(policy="ignore")
