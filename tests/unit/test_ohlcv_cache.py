"""Seal boundary and invalidation rule of the /ohlcv cache (pure functions)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from core.timeutil import SEAL_MARGIN_MS, live_window_ms, sealed_end_ms, stale_write_ms
from query.series import INTERVALS_MS, splice_json_arrays

MIN = 60_000
T0 = 1_700_000_000_000


def test_live_window_grows_with_grace() -> None:
    assert live_window_ms(5_000) == 5 * MIN
    assert live_window_ms(10 * MIN) == 14 * MIN
    assert stale_write_ms(5_000) == 3 * MIN


@given(now=st.integers(T0, T0 + 400 * 86_400_000), grace=st.integers(0, 3_600_000),
       interval=st.sampled_from(sorted(INTERVALS_MS.values())))
def test_sealed_buckets_end_before_the_live_window(now: int, grace: int, interval: int
                                                    ) -> None:
    seal = sealed_end_ms(now, grace, interval)
    assert seal % interval == 0
    live_from = now - now % MIN - live_window_ms(grace)
    # the last sealed bucket ends at or before the live window; the next one does not
    assert seal <= live_from < seal + interval


@given(write_ms=st.integers(T0, T0 + 10 * 86_400_000),
       age_ms=st.integers(0, 30 * MIN), read_delta_ms=st.integers(-30 * MIN, 30 * MIN),
       grace=st.integers(0, 3_600_000),
       interval=st.sampled_from(sorted(INTERVALS_MS.values())))
def test_a_write_that_does_not_invalidate_is_outside_every_earlier_seal(
        write_ms: int, age_ms: int, read_delta_ms: int, grace: int, interval: int) -> None:
    """A bar committed at ``write_ms`` without invalidating (younger than the stale age)
    can only lie in the sealed range of a reader that started more than the margin after
    the commit, i.e. one whose database read already saw it."""
    bucket = write_ms - age_ms
    bucket -= bucket % MIN
    invalidates = bucket < write_ms - stale_write_ms(grace)
    read_ms = write_ms + read_delta_ms
    if not invalidates and bucket < sealed_end_ms(read_ms, grace, interval):
        assert read_ms - write_ms > SEAL_MARGIN_MS


def test_splice_json_arrays() -> None:
    for a, b in (([], []), ([1], []), ([], [2]), ([1, {"x": [3]}], [2, 3])):
        assert orjson.loads(splice_json_arrays(orjson.dumps(a), orjson.dumps(b))) == a + b
