"""The agent's guard against messages its Faust stream skipped: ``SkippedMessages`` reads
an offset range of a ``ticks`` partition back from the real broker."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


async def test_skipped_messages_are_read_back_in_offset_order(stack: Stack) -> None:
    from agents.skipped import SkippedMessages

    topic = stack.settings.topics.ticks
    admin_topics = await stack.partitions(topic)
    assert admin_topics == []  # no worker started: create it through the first produce
    await stack.produce_raw([(b"k", f"m{i}".encode()) for i in range(10)], topic=topic)
    tps = await stack.partitions(topic)
    p = next(tp.partition for tp in tps)
    fetcher = SkippedMessages(stack.settings.broker, topic)
    try:
        got = await fetcher.fetch(p, 3, 7)
        assert [(e.message.offset, e.key, e.value) for e in got] == [
            (o, b"k", f"m{o}".encode()) for o in range(3, 7)]
        assert all(e.message.partition == p and e.message.topic == topic for e in got)
        again = await fetcher.fetch(p, 8, 10)  # the consumer is reused
        assert [e.value for e in again] == [b"m8", b"m9"]
    finally:
        await fetcher.close()
