"""The request path's Redis bound (``stores/connection.py``: ``bounded``, ``_guarded``):
a stalled event loop is not a hung Redis, a hung Redis still fails and trips the breaker.
No Redis needed: the "commands" are futures completed by loop callbacks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from core.breaker import CircuitBreaker
from stores.connection import RedisUnavailable, _guarded, bounded, stall_allowance_s

TIMEOUT_S = 0.1


async def _answer(fut: asyncio.Future[str]) -> str:
    """A command: wait for the reply, then a few loop iterations to read and parse it (as
    redis-py's reader does)."""
    value = await fut
    for _ in range(3):
        await asyncio.sleep(0)
    return value


def _answer_at(delay_s: float, value: str = "PONG") -> asyncio.Future[str]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    loop.call_later(delay_s, fut.set_result, value)
    return fut


def _stall_loop(at_s: float, for_s: float) -> None:
    """Block the event loop for ``for_s`` (a CPU-bound callback) starting at ``at_s``."""
    asyncio.get_running_loop().call_later(at_s, time.sleep, for_s)


async def test_a_stalled_loop_is_not_a_hung_redis() -> None:
    breaker = CircuitBreaker("t-stall")
    # the answer is due after 5 ms, but the loop is blocked from 1 ms for 3 x the bound:
    # the deadline and the answer are both handled after the stall
    fut = _answer_at(0.005)
    _stall_loop(0.001, 3 * TIMEOUT_S)
    assert await _guarded(breaker, TIMEOUT_S, _answer(fut)) == "PONG"
    assert not breaker.is_open and breaker.status()["trips"] == 0


async def test_a_hung_redis_fails_and_trips_the_breaker() -> None:
    breaker = CircuitBreaker("t-hang")
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="no answer within 100 ms"):
        await _guarded(breaker, TIMEOUT_S, _answer(never))
    assert time.monotonic() - t0 >= TIMEOUT_S  # it waited for the bound, no less
    assert breaker.is_open
    # open: the next call is refused at once, without awaiting the command
    with pytest.raises(RedisUnavailable, match="t-hang unavailable"):
        await _guarded(breaker, TIMEOUT_S, _answer(never))


async def test_a_hang_during_a_stall_still_fails() -> None:
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _stall_loop(0.001, 3 * TIMEOUT_S)
    with pytest.raises(TimeoutError):
        await bounded(_answer(never), TIMEOUT_S)


async def test_the_command_is_cancelled_with_its_caller() -> None:
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def command() -> None:
        await never

    caller = asyncio.ensure_future(bounded(command(), 10.0))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert never.cancelled()  # the command's await was cancelled, not left running


def test_stall_allowance() -> None:
    assert stall_allowance_s(0.1) == pytest.approx(0.02)
    assert stall_allowance_s(0.01) == 0.01
