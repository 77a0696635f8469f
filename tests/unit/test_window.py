"""Window maths and bar aggregation (pure functions)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext

from tables.window import (
    apply_tick,
    bucket_start_ms,
    closable_by_idle,
    closable_by_watermark,
    correctable,
    finalize_bar,
    is_late,
    watermark_ms,
)

MIN = 60_000
T0 = 1_723_161_300_000  # 2024-08-08T23:55:00Z, a minute boundary


def test_bucket_start_is_floor_and_half_open() -> None:
    assert T0 % MIN == 0
    assert bucket_start_ms(T0) == T0  # start belongs to its own window
    assert bucket_start_ms(T0 + 1) == T0
    assert bucket_start_ms(T0 + MIN - 1) == T0  # last ms of [T0, T0+60s)
    assert bucket_start_ms(T0 + MIN) == T0 + MIN  # end belongs to the next window
    assert bucket_start_ms(T0 - 1) == T0 - MIN


def test_watermark_closing_is_half_open() -> None:
    assert not closable_by_watermark(T0, T0 + MIN - 1)
    assert closable_by_watermark(T0, T0 + MIN)


def test_watermark_and_correction_horizon_are_half_open() -> None:
    assert watermark_ms(T0 + MIN + 2_000, grace_ms=2_000) == T0 + MIN
    assert watermark_ms(-1, grace_ms=2_000) == -2_001  # nothing seen yet
    # a closed window accepts corrections while end + horizon > watermark
    assert correctable(T0, wm_ms=T0 + MIN + 9_999, horizon_ms=10_000)
    assert not correctable(T0, wm_ms=T0 + MIN + 10_000, horizon_ms=10_000)
    # horizon 0: only while the watermark has not reached the end (an idle close)
    assert correctable(T0, wm_ms=T0 + MIN - 1, horizon_ms=0)
    assert not correctable(T0, wm_ms=T0 + MIN, horizon_ms=0)


def test_is_late_by_watermark_or_closed_bucket() -> None:
    assert not is_late(T0, wm_ms=T0 + MIN - 1, closed_bucket_ms=-1)
    assert is_late(T0, wm_ms=T0 + MIN, closed_bucket_ms=-1)
    assert is_late(T0, wm_ms=0, closed_bucket_ms=T0)
    assert not is_late(T0 + MIN, wm_ms=0, closed_bucket_ms=T0)


def test_idle_close_needs_idleness_and_finished_minute() -> None:
    end = T0 + MIN
    # idle long enough, but wall clock not past end + grace: a live minute stays open
    assert not closable_by_idle(T0, last_seen_wall_ms=end - 20_000, now_wall_ms=end + 1_000,
                                idle_timeout_ms=10_000, grace_ms=2_000)
    # past end + grace and idle: closes
    assert closable_by_idle(T0, last_seen_wall_ms=end - 20_000, now_wall_ms=end + 2_000,
                            idle_timeout_ms=10_000, grace_ms=2_000)
    # past end + grace but a tick arrived recently: stays open
    assert not closable_by_idle(T0, last_seen_wall_ms=end + 1_500, now_wall_ms=end + 2_000,
                                idle_timeout_ms=10_000, grace_ms=2_000)


def test_bar_ohlcv_with_out_of_order_ticks_and_ties() -> None:
    bars: dict = {}
    trades = [  # (price, qty, ts_ms) in arrival order
        (100.0, 1.0, T0 + 5_000),
        (105.0, 2.0, T0 + 1_000),   # earlier event time arrives later: becomes open
        (99.0, 0.5, T0 + 30_000),
        (101.0, 1.5, T0 + 59_999),  # last ms of the window: close
        (102.0, 1.0, T0 + 1_000),   # same ts as open but arrived later: open unchanged
        (103.0, 1.0, T0 + 59_999),  # same ts as close, arrived later: becomes close
    ]
    for p, q, ts in trades:
        apply_tick(bars, p, q, ts, wall_ms=0)
    assert list(bars) == [str(T0)]
    bar = finalize_bar("x", "BTCUSDT", bars[str(T0)])
    assert bar["open"] == 105.0 and bar["open_ts_ms"] == T0 + 1_000
    assert bar["close"] == 103.0 and bar["close_ts_ms"] == T0 + 59_999
    assert bar["high"] == 105.0 == bar["max_price"]
    assert bar["low"] == 99.0 == bar["min_price"]
    assert bar["trade_count"] == 6
    v = sum(Decimal(repr(q)) for _, q, _ in trades)
    pq = sum(Decimal(repr(p)) * Decimal(repr(q)) for p, q, _ in trades)
    assert (Decimal(bar["volume"]), Decimal(bar["quote_volume"])) == (v, pq)
    assert (bar["volume"], bar["quote_volume"]) == ("7", "716")  # served trimmed
    assert bar["avg_price"] == sum(p for p, _, _ in trades) / 6
    with localcontext() as ctx:
        ctx.prec = 60
        vwap = (pq / v).quantize(Decimal("1e-16"), ROUND_HALF_UP)
    assert bar["vwap"] == str(vwap) == "102.2857142857142857"  # half-up at 16 places
    assert bar["bucket_start_ms"] == T0 and bar["bucket_end_ms"] == T0 + MIN


def test_ticks_split_at_the_boundary() -> None:
    bars: dict = {}
    apply_tick(bars, 1.0, 1.0, T0 + MIN - 1, wall_ms=0)
    apply_tick(bars, 2.0, 1.0, T0 + MIN, wall_ms=0)
    assert sorted(bars) == [str(T0), str(T0 + MIN)]
    assert bars[str(T0)]["n"] == 1 and bars[str(T0 + MIN)]["n"] == 1


def test_price_only_feed_has_no_vwap() -> None:
    bars: dict = {}
    apply_tick(bars, 10.0, 0.0, T0, wall_ms=0)
    apply_tick(bars, 20.0, 0.0, T0 + 1, wall_ms=0)
    bar = finalize_bar("x", "y", bars[str(T0)])
    assert bar["vwap"] is None and bar["avg_price"] == 15.0
    assert (bar["volume"], bar["quote_volume"]) == ("0", "0")
