"""Restart-with-backoff supervision of the ingest tasks (:class:`Supervisor`).

A feed handles the failures it expects itself (a refused connection, EOF, silence: it
reconnects; a bad line: it is dead-lettered). Anything else that escapes a feed's
``run()`` — a :class:`~aiokafka.errors.KafkaError` from the publisher, a bug in a parser
— used to end its task for good, leaving ingest stopped until the next mode or leader
change. :class:`IngestManager <feeds.live.manager.IngestManager>` runs every feed under a
:class:`Supervisor` instead: the crash is logged with its traceback, counted in
``marketflow_feed_restarts_total{feed}``, shown in the feed's state (``/health``:
``ingest.feeds.<name>.restarts`` / ``last_error``), and the feed starts again after a
backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from core.metrics import FEED_RESTARTS
from core.state import StateHolder
from feeds.live.base import Backoff

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)


class Supervisor:
    """Runs ``start()`` until it returns or is cancelled, restarting it after a crash.

    Args:
        name: the task's name (the ``feed`` label of the restart counter).
        start: ``() -> awaitable``: a fresh run of the task each call.
        backoff: delay before each restart (reset after a run that lasted ``stable_s``).
        state: the task's :class:`StateHolder`; a crash sets its state ``crashed`` with
            the error, and counts :attr:`StateHolder.restarts`.
        stable_s: a run at least this long counts as healthy: the next crash restarts
            after ``backoff.initial_s`` again.

    Cancellation (a mode switch, the worker stopping) is never treated as a crash.
    """

    def __init__(self, name: str, start: Callable[[], Awaitable[None]], backoff: Backoff,
                 state: StateHolder | None = None, stable_s: float = 30.0) -> None:
        self.name = name
        self.start = start
        self.backoff = backoff
        self.state = state
        self.stable_s = stable_s
        self.restarts = 0
        FEED_RESTARTS.labels(name)  # exported as 0 from the start

    async def run(self) -> None:
        """Supervise until the task returns normally or this is cancelled."""
        while True:
            t0 = time.monotonic()
            try:
                await self.start()
                return
            except Exception as exc:  # anything a feed did not handle: restart it
                if time.monotonic() - t0 >= self.stable_s:
                    self.backoff.reset()
                delay = self.backoff.next()
                self.restarts += 1
                FEED_RESTARTS.labels(self.name).inc()
                error = f"{type(exc).__name__}: {exc}"
                if self.state is not None:
                    self.state.restarts = self.restarts
                    self.state.set_state("crashed", f"{error}; restarting in {delay:.1f} s")
                log.exception("ingest: %s crashed (%s); restart %d in %.1f s", self.name,
                              error, self.restarts, delay,
                              extra={"feed": self.name, "restarts": self.restarts})
                await asyncio.sleep(delay)
