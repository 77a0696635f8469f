"""Shared plumbing of the live/test feeds: reconnect backoff, timestamp-unit normalisation,
and the sink interface feeds publish into (each feed's state is a
:class:`core.state.StateHolder`)."""

from __future__ import annotations

import random
from typing import Any, Protocol

from core.models import Tick

__all__ = ["Backoff", "TickSink", "normalise_ts_ms"]


def normalise_ts_ms(value: float) -> int:
    """Exchange timestamp of unknown unit -> UTC epoch milliseconds, by magnitude.

    ``< 1e11`` seconds, ``< 1e14`` milliseconds, ``< 1e17`` microseconds, else
    nanoseconds (2001-09-09 is 1e9 s = 1e12 ms, so every plausible date falls in one band).

    Raises:
        ValueError: not a finite number >= 0.
    """
    v = float(value)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"timestamp {value!r} is not a finite number >= 0")
    if v < 1e11:
        return round(v * 1000)
    if v < 1e14:
        return int(v)
    if v < 1e17:
        return int(v // 1000)
    return int(v // 1_000_000)


class Backoff:
    """Exponential reconnect delay with jitter: ``initial_s``, doubling up to ``max_s``;
    each delay is multiplied by a random factor in ``[1 - jitter, 1 + jitter]``."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 30.0, jitter: float = 0.2,
                 rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next = initial_s

    def next(self) -> float:
        """The delay before the next attempt, in seconds (then doubles)."""
        base = self._next
        self._next = min(self._next * 2, self.max_s)
        return base * self._rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        """Back to ``initial_s`` (after a successful connection delivered data)."""
        self._next = self.initial_s


class TickSink(Protocol):
    """Where feeds put their output (implemented by :class:`feeds.live.manager.TickPublisher`)."""

    async def publish(self, ticks: list[Tick]) -> None:
        """Queue validated ticks for the ``ticks`` topic (may wait: back-pressure)."""

    async def dead_letter(self, payload: Any, reason: str, detail: str,
                          key: str | None = None) -> None:
        """Send a rejected input (raw line/frame or object) to the dead-letter topic."""
