"""WindowAggregator on a dict store: watermark, grace, late ticks, idle close, dedup."""

from __future__ import annotations

import json

from app.models import Tick
from tables.aggregator import WindowAggregator

MIN = 60_000
T0 = 1_723_161_300_000
GRACE = 5_000


def tick(ts: int, price: float = 100.0, qty: float = 1.0, ex: str = "ex", sym: str = "BTCUSDT"
         ) -> Tick:
    return Tick(ex, sym, price, qty, ts, None, "test")


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
    c = agg(json.loads(json.dumps(store)))  # "restart" from the changelog copy
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
    assert a.watermark(0, "replay") == T0 + 1 - GRACE
    assert a.watermark(0, "") == a.watermark(0) == now - GRACE
    r = a.process_ticks(0, 2, [tick(T0 + MIN + GRACE, ex="replay.binance")], wall_ms=now)
    assert [(b["exchange"], b["bucket_start_ms"], b["trade_count"]) for b in r.closed] == [
        ("replay.binance", T0, 1)]
    # the live key's open window was not closed by the replay's progress, nor vice versa
    assert str(now - now % MIN) in a.store["binance:BTCUSDT"]["bars"]
    # recovery from the store rebuilds both domains
    b = agg(dict(a.store))
    assert b.watermark(0, "replay") == T0 + MIN + GRACE - GRACE
    assert b.watermark(0, "") == now - GRACE
