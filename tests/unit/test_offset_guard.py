"""``agents.skipped.OffsetGuard`` without a broker: which offsets a stream skipped (a jump,
or a first message of an assignment past the group's start), and which offsets it marks
as a consumer gap (offsets without a record at once, a read-back record once acked)."""

from __future__ import annotations

from typing import Any

from faust.types import TP

from agents.skipped import FetchedEvent, OffsetGuard, _Message


class FakeSkipped:
    """Start offsets and records of one topic, as the broker would give them."""

    topic = "ticks"

    def __init__(self, start: dict[int, int], records: dict[int, list[int]]) -> None:
        self.start = start
        self.records = records
        self.fetched: list[tuple[int, int, int]] = []
        self.start_calls = 0

    async def start_offset(self, partition: int, group_id: str) -> int:
        assert group_id == "app-id"
        self.start_calls += 1
        return self.start[partition]

    async def fetch(self, partition: int, start: int, end: int) -> list[FetchedEvent]:
        self.fetched.append((partition, start, end))
        return [FetchedEvent(b"k", b"v", _Message(self.topic, partition, o))
                for o in self.records.get(partition, []) if start <= o < end]


class FakeConsumer:
    def __init__(self) -> None:
        self.gaps: list[tuple[TP, int, int]] = []
        self.fetched_offsets: dict[TP, int] = {}

    async def _add_gap(self, tp: TP, first: int, last: int) -> None:
        self.gaps.append((tp, first, last))


class FakeFlowControl:
    active = True

    def is_active(self) -> bool:
        return self.active


class FakeAssignor:
    def __init__(self) -> None:
        self.actives = {TP("ticks", 0), TP("ticks", 1), TP("other", 0)}

    def assigned_actives(self) -> set[TP]:
        return self.actives


class FakeApp:
    def __init__(self) -> None:
        self.consumer = FakeConsumer()
        self.rebalancing = False
        self.flow_control = FakeFlowControl()
        self.assignor = FakeAssignor()


def guard(skipped: FakeSkipped) -> tuple[OffsetGuard, FakeApp]:
    app = FakeApp()
    return OffsetGuard(app, skipped, "app-id", agent="bars"), app  # type: ignore[arg-type]


async def test_first_message_at_the_group_start_and_consecutive_ones_miss_nothing() -> None:
    skipped = FakeSkipped({0: 40}, {})
    g, _ = guard(skipped)
    assert [await g.missing_before(0, o) for o in (40, 41, 42)] == [None, None, None]
    assert skipped.start_calls == 1  # asked once per assignment


async def test_first_message_past_the_group_start_misses_the_offsets_between() -> None:
    skipped = FakeSkipped({0: 40, 1: 0}, {})
    g, _ = guard(skipped)
    assert await g.missing_before(0, 43) == (40, 43)
    assert await g.missing_before(1, 5) == (0, 5)
    assert await g.missing_before(0, 44) is None
    assert await g.missing_before(0, 47) == (45, 47)  # a jump later on


async def test_reset_asks_for_the_start_again() -> None:
    skipped = FakeSkipped({0: 10}, {})
    g, _ = guard(skipped)
    assert await g.missing_before(0, 10) is None
    assert await g.missing_before(0, 11) is None
    skipped.start[0] = 20  # another worker committed up to 20 meanwhile
    g.reset()
    assert await g.missing_before(0, 23) == (20, 23)
    assert skipped.start_calls == 2


async def test_a_redelivered_older_message_misses_nothing_and_keeps_the_position() -> None:
    skipped = FakeSkipped({0: 10}, {})
    g, _ = guard(skipped)
    assert await g.missing_before(0, 8) is None  # before the start: nothing to read back
    assert await g.missing_before(0, 10) is None
    assert await g.missing_before(0, 12) == (11, 12)


async def test_read_back_marks_offsets_without_records_at_once_and_records_when_acked() -> None:
    skipped = FakeSkipped({0: 0}, {0: [3, 4, 7]})
    g, app = guard(skipped)
    events = await g.read_back(0, 2, 9)
    assert [e.message.offset for e in events] == [3, 4, 7]
    tp = TP("ticks", 0)
    assert app.consumer.gaps == [(tp, 2, 2), (tp, 5, 6), (tp, 8, 8)]
    for e in events:
        await g.ack(e)
    assert app.consumer.gaps[3:] == [(tp, 3, 3), (tp, 4, 4), (tp, 7, 7)]


async def test_read_back_of_a_range_with_only_records_marks_nothing_before_the_acks() -> None:
    skipped = FakeSkipped({0: 0}, {0: [5, 6]})
    g, app = guard(skipped)
    got: Any = await g.read_back(0, 5, 7)
    assert [e.message.offset for e in got] == [5, 6] and app.consumer.gaps == []


async def test_a_skipped_tail_is_reported_on_the_second_check_in_a_row() -> None:
    skipped = FakeSkipped({0: 10, 1: 0}, {})
    g, app = guard(skipped)
    fetched = app.consumer.fetched_offsets
    g.reset()
    assert await g.missing_before(0, 10) is None
    fetched[TP("ticks", 0)] = 10  # everything fetched was seen
    assert await g.stalled_ranges() == [] and await g.stalled_ranges() == []
    fetched[TP("ticks", 0)] = 13  # 11..13 handed to the stream, never seen
    assert await g.stalled_ranges() == []  # may still be on its way
    assert await g.stalled_ranges() == [(0, 11, 14)]
    assert await g.stalled_ranges() == []  # reported once
    assert await g.missing_before(0, 14) is None  # the range counts as seen


async def test_a_partition_with_every_record_skipped_is_checked_from_the_group_start() -> None:
    skipped = FakeSkipped({0: 10, 1: 5}, {})
    g, app = guard(skipped)
    app.consumer.fetched_offsets[TP("ticks", 1)] = 7
    g.reset()  # assignment: 7 was fetched before it
    assert await g.stalled_ranges() == [] and await g.stalled_ranges() == []
    app.consumer.fetched_offsets[TP("ticks", 1)] = 6  # seek back, 5..6 fetched, none seen
    await g.stalled_ranges()
    assert await g.stalled_ranges() == [(1, 5, 7)]


async def test_progress_between_checks_is_no_stall() -> None:
    skipped = FakeSkipped({0: 0}, {})
    g, app = guard(skipped)
    g.reset()
    fetched = app.consumer.fetched_offsets
    assert await g.missing_before(0, 0) is None
    fetched[TP("ticks", 0)] = 2
    await g.stalled_ranges()
    assert await g.missing_before(0, 1) is None and await g.missing_before(0, 2) is None
    assert await g.stalled_ranges() == [] and await g.stalled_ranges() == []


async def test_no_stall_is_reported_while_rebalancing_or_suspended_or_unassigned() -> None:
    skipped = FakeSkipped({0: 0, 1: 0}, {})
    g, app = guard(skipped)
    g.reset()
    app.consumer.fetched_offsets[TP("ticks", 0)] = 4
    for state in ("rebalancing", "suspended", "unassigned"):
        app.rebalancing = state == "rebalancing"
        app.flow_control.active = state != "suspended"
        app.assignor.actives = ({TP("ticks", 1)} if state == "unassigned"
                                else {TP("ticks", 0), TP("ticks", 1)})
        assert await g.stalled_ranges() == [] and await g.stalled_ranges() == [], state
    app.assignor.actives = {TP("ticks", 0)}
    app.flow_control.active = True
    await g.stalled_ranges()
    assert await g.stalled_ranges() == [(0, 0, 5)]
