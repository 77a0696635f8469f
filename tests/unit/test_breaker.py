"""The circuit breaker of the request path (``core/breaker.py``), without services."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from core.breaker import CircuitBreaker, CircuitOpen


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("marketflow_breaker_open", {"dependency": name})


def trips(name: str) -> float | None:
    return REGISTRY.get_sample_value("marketflow_breaker_trips_total", {"dependency": name})


def test_opens_after_consecutive_failures_and_on_a_hang() -> None:
    b = CircuitBreaker("t-consecutive", threshold=3)
    b.check()
    b.failure(OSError("refused"))
    b.failure(OSError("refused"))
    b.success()  # the run is broken: two more failures do not open it
    b.failure(OSError("refused"))
    b.failure(OSError("refused"))
    b.check()
    assert gauge("t-consecutive") == 0
    b.failure(OSError("refused"))
    with pytest.raises(CircuitOpen, match="t-consecutive unavailable"):
        b.check()
    assert b.status()["state"] == "open" and b.status()["trips"] == 1
    assert gauge("t-consecutive") == 1 and trips("t-consecutive") == 1
    b.close()
    b.check()
    assert gauge("t-consecutive") == 0 and b.status()["opened_ms"] is None
    b.trip(TimeoutError())  # a single hang opens it
    assert b.is_open and trips("t-consecutive") == 2


async def test_probe_closes_once_the_dependency_answers() -> None:
    b = CircuitBreaker("t-probe", threshold=1, probe_interval_s=0.01)
    answers = iter([OSError("still down"), TimeoutError(), None])
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        exc = next(answers)
        if exc is not None:
            raise exc

    stop = False
    task = asyncio.ensure_future(b.probe_loop(probe, 1.0, (), lambda: stop))
    await asyncio.sleep(0.05)
    assert calls == 0  # closed: no probing
    b.failure(OSError("refused"))
    for _ in range(200):
        if not b.is_open:
            break
        await asyncio.sleep(0.01)
    assert not b.is_open and calls == 3  # two failed probes, then the one that closed it
    stop = True
    await asyncio.wait_for(task, 1.0)


async def test_a_hanging_probe_is_bounded() -> None:
    b = CircuitBreaker("t-hang", threshold=1, probe_interval_s=0.01)
    b.failure(OSError("down"))

    async def probe() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(b.probe_loop(probe, 0.05, (), lambda: False))
    await asyncio.sleep(0.3)
    assert b.is_open and "TimeoutError" in (b.last_error or "")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
