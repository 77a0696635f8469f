"""A circuit breaker per dependency on the request path (:class:`CircuitBreaker`).

Closed, calls go through. After ``threshold`` consecutive errors, or one call without an
answer within its timeout (a hang: :meth:`CircuitBreaker.trip`), it opens: calls fail at
once instead of waiting for a dependency that hangs, and a background probe
(:meth:`CircuitBreaker.probe_loop`) tries the dependency every ``probe_interval_s``; the
first probe that succeeds closes the breaker. Pure state and timing, no I/O of its own:
the probe is a callable of the owner (``stores/connection.py`` for Redis,
``sql/pool.py`` for TimescaleDB).

State is exported as ``marketflow_breaker_open{dependency}`` (1 while open) and
``marketflow_breaker_trips_total{dependency}``, and shown in ``/health`` under
``breakers``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from core.errors import MarketflowError
from core.metrics import BREAKER_OPEN, BREAKER_TRIPS
from core.timeutil import now_ms

__all__ = ["CircuitBreaker", "CircuitOpen"]

log = logging.getLogger(__name__)


class CircuitOpen(MarketflowError):
    """A call was refused at once because the dependency's breaker is open."""


class CircuitBreaker:
    """Consecutive-failure breaker of one dependency.

    Args:
        name: the dependency (``redis``, ``database``): the metrics' label.
        threshold: consecutive failures that open the breaker.
        probe_interval_s: how often the probe runs while open, seconds.
    """

    def __init__(self, name: str, threshold: int = 3, probe_interval_s: float = 0.5) -> None:
        self.name = name
        self.threshold = threshold
        self.probe_interval_s = probe_interval_s
        self.is_open = False
        self.failures = 0
        self.trips = 0
        self.opened_ms: int | None = None
        self.last_error: str | None = None
        BREAKER_OPEN.labels(name).set(0)
        BREAKER_TRIPS.labels(name)  # exported as 0 from the start

    def check(self) -> None:
        """Raise :class:`CircuitOpen` when open (call before using the dependency)."""
        if self.is_open:
            raise CircuitOpen(f"{self.name} unavailable (circuit open since "
                              f"{self.opened_ms} ms: {self.last_error})")

    def success(self) -> None:
        """A call succeeded: the failure run is over."""
        self.failures = 0

    def failure(self, exc: BaseException) -> None:
        """A call failed or timed out; opens the breaker at ``threshold`` in a row."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if not self.is_open and self.failures >= self.threshold:
            self.is_open = True
            self.opened_ms = now_ms()
            self.trips += 1
            BREAKER_OPEN.labels(self.name).set(1)
            BREAKER_TRIPS.labels(self.name).inc()
            log.warning("%s: circuit open after %d failures (%s); requests skip it until "
                        "a probe succeeds", self.name, self.failures, self.last_error,
                        extra={"dependency": self.name})

    def trip(self, exc: BaseException) -> None:
        """A hang (no answer within the call's timeout): open at once."""
        self.failures = max(self.failures, self.threshold - 1)
        self.failure(exc)

    def close(self) -> None:
        """The probe succeeded: calls go through again."""
        if self.is_open:
            log.warning("%s: circuit closed (probe answered after %d ms)", self.name,
                        now_ms() - (self.opened_ms or now_ms()),
                        extra={"dependency": self.name})
        self.is_open = False
        self.failures = 0
        BREAKER_OPEN.labels(self.name).set(0)

    def status(self) -> dict[str, Any]:
        """For ``/health``: ``{"state": "closed"|"open", "failures", "trips",
        "opened_ms", "last_error"}``."""
        return {"state": "open" if self.is_open else "closed", "failures": self.failures,
                "trips": self.trips, "opened_ms": self.opened_ms if self.is_open else None,
                "last_error": self.last_error}

    async def probe_loop(self, probe: Callable[[], Awaitable[Any]], timeout_s: float,
                         errors: tuple[type[BaseException], ...],
                         should_stop: Callable[[], bool] = lambda: False) -> None:
        """Until ``should_stop()``: while open, every ``probe_interval_s`` await
        ``probe()`` with ``timeout_s``; close on the first success. ``errors`` (the
        driver's error classes), :class:`OSError` and :class:`TimeoutError` mean "still
        down"; anything else is raised."""
        down: tuple[type[BaseException], ...] = (OSError, TimeoutError, MarketflowError,
                                                  *errors)
        while not should_stop():
            await asyncio.sleep(self.probe_interval_s)
            if not self.is_open:
                continue
            try:
                async with asyncio.timeout(timeout_s):
                    await probe()
            except down as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            self.close()
