"""Gap detection logic (pure, no services): the outage state machine, the expansion of an
outage into minute gaps per pair, the scan rule, the /gaps query parsing."""

from __future__ import annotations

import pytest

from core.config import FeedsSection
from core.errors import QueryError
from core.state import StateHolder
from feeds.history.gaps import (
    MINUTE_MS,
    SCAN_MIN_MINUTES,
    GapRange,
    Outage,
    OutageRecorder,
    ceil_minute,
    feed_pairs,
    floor_minute,
    outage_gaps,
    select_scan_holes,
    stored_end_ms,
)

M = 1_723_161_600_000  # a minute boundary (2024-08-09T00:00:00Z)


def test_minute_rounding() -> None:
    assert floor_minute(M) == M and ceil_minute(M) == M
    assert floor_minute(M + 1) == M and ceil_minute(M + 1) == M + MINUTE_MS
    assert floor_minute(M - 1) == M - MINUTE_MS and ceil_minute(M - 1) == M
    assert stored_end_ms(M + 65_000, grace_ms=5_000) == M  # minute M ends at M+60s+5s+5s
    assert stored_end_ms(M + 130_000, grace_ms=5_000) == M + 2 * MINUTE_MS


def test_connected_reconnecting_connected_is_one_outage() -> None:
    r = OutageRecorder()
    assert r.observe("exchange2", "connected", M + 1_000) is None
    assert r.observe("exchange2", "reconnecting", M + 30_000) is None
    assert r.down() == {"exchange2": M + 30_000}
    # repeated failures while down do not move the start
    assert r.observe("exchange2", "reconnecting", M + 40_000) is None
    assert r.observe("exchange2", "connected", M + 100_000) == Outage(
        "exchange2", M + 30_000, M + 100_000)
    assert r.down() == {}
    # the feed is up again: a later drop is a new outage
    assert r.observe("exchange2", "reconnecting", M + 200_000) is None
    assert r.observe("exchange2", "connected", M + 210_000) == Outage(
        "exchange2", M + 200_000, M + 210_000)


def test_outage_starts_at_the_last_message_of_the_connection() -> None:
    r = OutageRecorder()
    r.observe("x", "connected", M)
    # a silent feed is dropped after the idle timeout; the data stopped at the last message
    r.observe("x", "reconnecting", M + 50_000, last_message_ms=M + 40_000)
    assert r.observe("x", "connected", M + 90_000) == Outage("x", M + 40_000, M + 90_000)
    # a last message from an earlier connection does not count
    r.observe("x", "reconnecting", M + 120_000, last_message_ms=M + 80_000)
    assert r.observe("x", "connected", M + 130_000) == Outage("x", M + 120_000, M + 130_000)


def test_never_connected_or_stopped_while_up_is_no_outage() -> None:
    r = OutageRecorder()
    assert r.observe("x", "starting", M) is None
    assert r.observe("x", "reconnecting", M + 1_000) is None  # never connected
    assert r.observe("x", "connected", M + 5_000) is None
    assert r.observe("x", "stopped", M + 9_000) is None  # mode switched off while up
    assert r.down() == {}


def test_stopped_while_down_ends_the_outage_and_feeds_are_independent() -> None:
    r = OutageRecorder()
    r.observe("a", "connected", M)
    r.observe("b", "connected", M)
    r.observe("a", "reconnecting", M + 10_000)
    assert r.observe("b", "reconnecting", M + 11_000) is None
    assert r.observe("b", "connected", M + 12_000) == Outage("b", M + 11_000, M + 12_000)
    assert r.observe("a", "stopped", M + 20_000) == Outage("a", M + 10_000, M + 20_000)
    assert r.observe("a", "connected", M + 30_000) is None


def test_outage_expands_to_whole_minutes_per_pair() -> None:
    pairs = [("exchange2", "BTCUSDT"), ("exchange2", "ETHUSDT")]
    gaps = outage_gaps(Outage("exchange2", M + 55_000, M + 125_000), pairs)
    assert gaps == [GapRange("exchange2", "BTCUSDT", M, M + 3 * MINUTE_MS),
                    GapRange("exchange2", "ETHUSDT", M, M + 3 * MINUTE_MS)]
    assert gaps[0].minutes == 3
    # on the boundaries: [floor(t0), ceil(t1)) adds nothing
    assert outage_gaps(Outage("e", M, M + MINUTE_MS), [("e", "X")]) == [
        GapRange("e", "X", M, M + MINUTE_MS)]
    # a short outage inside one minute still marks that minute
    assert outage_gaps(Outage("e", M + 1_000, M + 3_000), [("e", "X")]) == [
        GapRange("e", "X", M, M + MINUTE_MS)]
    assert outage_gaps(Outage("e", M, M), [("e", "X")]) == []


def test_feed_pairs() -> None:
    f = FeedsSection(pairs=["BTCUSDT", "solusdt"])
    assert feed_pairs("marketflow_tcp", "exchange1", f) == [
        ("exchange1", "BTCUSDT"), ("exchange1", "SOLUSDT")]
    f.cryptocompare.subs = ["0~Coinbase~BTC~USD", "bad", "5~CCCAGG~BTC~USD"]
    assert feed_pairs("cryptocompare", "cryptocompare", f) == [("coinbase", "BTCUSD")]
    assert feed_pairs("generator", "generator", f) == []


def test_scan_rule_quiet_market_long_hole_and_outage() -> None:
    min_ms = SCAN_MIN_MINUTES * MINUTE_MS
    holes = [
        ("ex1", "TONUSDT", M, M + 2 * MINUTE_MS),              # short, no outage: quiet
        ("ex1", "BTCUSDT", M, M + min_ms),                     # exactly the minimum: gap
        ("ex1", "ETHUSDT", M, M + min_ms - MINUTE_MS),         # one short of it: quiet
        ("ex2", "SOLUSDT", M + 5 * MINUTE_MS, M + 6 * MINUTE_MS),  # short, in ex2's outage
        ("ex3", "SOLUSDT", M + 5 * MINUTE_MS, M + 6 * MINUTE_MS),  # outage of ex2 only
        ("ex2", "DOGEUSDT", M + 9 * MINUTE_MS, M + 10 * MINUTE_MS),  # after the outage
    ]
    outages = [("ex2", M + 4 * MINUTE_MS, M + 9 * MINUTE_MS)]
    kept = select_scan_holes(holes, outages)
    assert [(h.gap.exchange, h.gap.symbol, h.reason) for h in kept] == [
        ("ex1", "BTCUSDT", "long"), ("ex2", "SOLUSDT", "feed_outage")]
    assert kept[0].gap.minutes == SCAN_MIN_MINUTES
    # the minimum is a parameter
    assert len(select_scan_holes(holes, [], min_minutes=1)) == len(holes)
    assert select_scan_holes([], outages) == []


def test_feed_state_reports_transitions_once() -> None:
    seen: list[tuple[str, str, str | None]] = []
    st = StateHolder("exchange1", "marketflow_tcp")
    st.on_change = lambda s, prev: seen.append((prev, s.state, s.last_error))
    st.set_state("connected")
    st.set_state("connected")  # no change: no call
    st.set_state("reconnecting", "EOF")
    st.set_state("reconnecting", "refused")
    assert seen == [("starting", "connected", None), ("connected", "reconnecting", "EOF")]
    assert "on_change" not in st.as_dict()


def test_recorder_driven_by_feed_states(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([M + 5_000, M + 30_000, M + 95_000])
    monkeypatch.setattr("core.state.now_ms", lambda: next(clock))
    r = OutageRecorder()
    out: list[Outage] = []

    def listen(s: StateHolder, prev: str) -> None:
        o = r.observe(s.name, s.state, s.since_ms, s.last_message_ms)
        if o is not None:
            out.append(o)

    st = StateHolder("exchange1", "marketflow_tcp", on_change=listen)
    st.set_state("connected")
    st.last_message_ms = M + 20_000
    st.set_state("reconnecting", "EOF")
    st.set_state("connected")
    # down from the last message received (M+20s) until connected again (M+95s)
    assert out == [Outage("exchange1", M + 20_000, M + 95_000)]


def test_parse_gaps_query() -> None:
    from views.gaps import DEFAULT_LIMIT, parse_gaps_query

    assert parse_gaps_query({}) == (None, None, None, DEFAULT_LIMIT)
    assert parse_gaps_query({"exchange": "exchange2", "symbol": "BTCUSDT",
                             "state": "repaired", "limit": "5"}) == (
        "exchange2", "BTCUSDT", "repaired", 5)
    for q, param in [({"state": "fixed"}, "state"), ({"limit": "0"}, "limit"),
                     ({"limit": "1001"}, "limit"), ({"limit": "x"}, "limit"),
                     ({"symbol": "a b"}, "symbol"), ({"exchange": "-x"}, "exchange"),
                     ({"since": "1"}, "since")]:
        with pytest.raises(QueryError) as exc:
            parse_gaps_query(q)
        assert exc.value.param == param


def test_scan_ignores_replay_namespaces() -> None:
    from feeds.history.gaps import select_scan_holes

    m = 60_000
    holes = [("replay.binance", "BTCUSDT", 0, 30 * m), ("binance", "BTCUSDT", 0, 30 * m)]
    got = select_scan_holes(holes, [("replay.binance", 0, 30 * m)])
    assert [(h.gap.exchange, h.reason) for h in got] == [("binance", "long")]
