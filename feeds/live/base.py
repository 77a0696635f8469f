"""Shared plumbing of the live/test feeds: feed state for ``/health``, reconnect backoff,
timestamp-unit normalisation, and the sink interface feeds publish into."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.models import Tick

__all__ = ["Backoff", "FeedState", "TickSink", "normalise_ts_ms", "now_ms"]


def now_ms() -> int:
    """Wall clock, UTC epoch milliseconds."""
    return time.time_ns() // 1_000_000


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


@dataclass
class FeedState:
    """Live state of one feed, reported in ``GET /health``.

    Attributes:
        name: feed name (an exchange name such as ``exchange1``, or ``cryptocompare``).
        kind: ``marketflow_tcp``, ``cryptocompare`` or ``generator``.
        state: ``starting`` | ``connected`` | ``reconnecting`` | ``stopped``.
        last_message_ms: wall clock of the last message received (UTC epoch ms) or None.
        messages: lines/frames received; ticks: ticks published; dead_lettered: rejected.
        reconnects: reconnect attempts; last_error: text of the last connection error.
        on_change: optional ``(state, previous_state) -> None`` called synchronously after
            every state change (:mod:`feeds.history.gaps` records outages with it); not reported.
    """

    name: str
    kind: str
    state: str = "starting"
    since_ms: int = field(default_factory=now_ms)
    last_message_ms: int | None = None
    messages: int = 0
    ticks: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    reconnects: int = 0
    last_error: str | None = None
    on_change: Callable[[FeedState, str], None] | None = field(
        default=None, repr=False, compare=False)

    def set_state(self, state: str, error: str | None = None) -> None:
        """Change state (and remember the error that caused it, if any)."""
        if error is not None:
            self.last_error = error[:300]
        if state != self.state:
            previous, self.state = self.state, state
            self.since_ms = now_ms()
            if self.on_change is not None:
                self.on_change(self, previous)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view for ``/health``."""
        return {
            "kind": self.kind, "state": self.state, "since_ms": self.since_ms,
            "last_message_ms": self.last_message_ms, "messages": self.messages,
            "ticks": self.ticks, "dead_lettered": self.dead_lettered, "ignored": self.ignored,
            "reconnects": self.reconnects, "last_error": self.last_error,
        }


class TickSink(Protocol):
    """Where feeds put their output (implemented by :class:`feeds.live.manager.TickPublisher`)."""

    async def publish(self, ticks: list[Tick]) -> None:
        """Queue validated ticks for the ``ticks`` topic (may wait: back-pressure)."""

    async def dead_letter(self, payload: Any, reason: str, detail: str,
                          key: str | None = None) -> None:
        """Send a rejected input (raw line/frame or object) to the dead-letter topic."""
