"""BarWriter (TimescaleDB sink batching) with an in-memory stand-in for the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from mode import Service

from agents.sink import BarWriter


class FakePool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


class FakeDb(Service):
    def __init__(self) -> None:
        super().__init__()
        self.fail_next = 0

    async def pool(self) -> FakePool:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("connection refused")
        return FakePool()


class FakeStream:
    def __init__(self, written: list[dict[str, Any]]) -> None:
        self.written = written
        self.acked: list[int] = []

    async def ack(self, event: int) -> None:
        assert any(b["n"] == event for b in self.written), "acked before written"
        self.acked.append(event)


def make(batch_size: int, db: FakeDb | None = None) -> tuple[BarWriter, list[dict[str, Any]],
                                                            FakeStream]:
    written: list[dict[str, Any]] = []

    async def slow_upsert(conn: object, bars: list[dict[str, Any]]) -> int:
        await asyncio.sleep(0.02)  # bars keep arriving meanwhile
        written.extend(bars)
        return len(bars)

    w = BarWriter(db or FakeDb(), batch_size=batch_size, flush_interval_s=0.01,  # type: ignore[arg-type]
                  retry_max_s=0.05, upsert=slow_upsert)
    stream = FakeStream(written)
    return w, written, stream


async def test_bars_added_during_a_flush_are_written_before_ack() -> None:
    w, written, stream = make(batch_size=100)  # flushes come from the timer

    async def producer() -> None:
        for i in range(20):
            await w.add({"n": i}, i, stream)  # type: ignore[arg-type]
            await asyncio.sleep(0.003)

    async def timer() -> None:
        for _ in range(40):
            await w.flush_if_due()
            await asyncio.sleep(0.005)

    await asyncio.gather(producer(), timer())
    await w.flush()
    assert sorted(b["n"] for b in written) == list(range(20))
    assert sorted(stream.acked) == list(range(20))


async def test_database_down_is_retried_not_dropped() -> None:
    db = FakeDb()
    db.fail_next = 3
    w, written, stream = make(batch_size=2, db=db)
    await w.add({"n": 1}, 1, stream)  # type: ignore[arg-type]
    await w.add({"n": 2}, 2, stream)  # full: flushes, retrying through three failures
    assert [b["n"] for b in written] == [1, 2] and stream.acked == [1, 2]


async def test_postgres_error_is_retried() -> None:
    w, written, stream = make(batch_size=1)
    calls = 0
    upsert = w.upsert

    async def flaky(conn: object, bars: list[dict[str, Any]]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock")
        return await upsert(conn, bars)

    w.upsert = flaky
    await w.add({"n": 7}, 7, stream)  # type: ignore[arg-type]
    assert calls == 2 and stream.acked == [7] and written == [{"n": 7}]


async def test_flusher_writes_at_once_when_idle_and_batches_within_the_gap() -> None:
    """The service's own flusher: a bar that finds the writer idle is written at once
    (the 600 s backstop plays no part); bars arriving within ``min_flush_gap_s`` of that
    flush wait for the gap and are written together, in one upsert."""
    calls: list[list[int]] = []
    written: list[dict[str, Any]] = []

    async def upsert(conn: object, bars: list[dict[str, Any]]) -> int:
        calls.append([b["n"] for b in bars])
        written.extend(bars)
        return len(bars)

    w = BarWriter(FakeDb(), batch_size=100, flush_interval_s=600,  # type: ignore[arg-type]
                  retry_max_s=0.05, upsert=upsert, min_flush_gap_s=2.0)
    stream = FakeStream(written)
    loop = asyncio.get_running_loop()
    await w.start()
    try:
        t0 = loop.time()
        await w.add({"n": 1}, 1, stream)  # type: ignore[arg-type]
        while not calls:
            assert loop.time() - t0 < 5, "an idle writer did not write at once"
            await asyncio.sleep(0.01)
        t1 = loop.time()
        await w.add({"n": 2}, 2, stream)  # type: ignore[arg-type]
        await w.add({"n": 3}, 3, stream)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        assert calls == [[1]]  # held for the gap
        while len(calls) < 2:
            assert loop.time() - t1 < 15
            await asyncio.sleep(0.05)
        assert calls == [[1], [2, 3]]
        assert loop.time() - t0 >= 1.9  # the gap was kept (a sleep cannot end early)
        assert stream.acked == [1, 2, 3]
    finally:
        await w.stop()
