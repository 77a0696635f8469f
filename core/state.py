"""The state holder of every long-running actor: each live feed, the on-demand history
coordinator and writer, and the replay controller (reported in ``GET /health`` or the
replay status, every transition logged)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.timeutil import now_ms

__all__ = ["StateHolder"]

log = logging.getLogger(__name__)


@dataclass
class StateHolder:
    """State of one actor, with counters; transitions are logged (``extra`` carries
    ``actor``, ``kind``, ``state`` and ``previous``).

    Attributes:
        name: actor name (an exchange name such as ``exchange1``, ``cryptocompare``,
            ``coordinator``, ``writer``, ``replay``).
        kind: ``marketflow_tcp``, ``cryptocompare``, ``generator``, ``history`` or
            ``replay``.
        state: the actor's current state (its own vocabulary, e.g. ``starting`` |
            ``connected`` | ``reconnecting`` | ``stopped`` for a feed).
        since_ms: wall clock of the last transition (UTC epoch ms).
        detail: what the actor is working on, or why it is in this state.
        last_error: text of the last error (kept across later transitions).
        last_message_ms: wall clock of the last message received (UTC epoch ms) or None.
        messages: lines/frames received; ticks: ticks published; dead_lettered: rejected;
            ignored: well-formed but not ticks; reconnects: reconnect attempts; handled:
            items done (requests, bars); restarts: crashes its supervisor restarted it
            after (:mod:`feeds.live.supervisor`).
        on_change: optional ``(holder, previous_state) -> None`` called synchronously after
            every transition (:mod:`feeds.history.gaps` records outages with it).
    """

    name: str
    kind: str
    state: str = "starting"
    since_ms: int = field(default_factory=now_ms)
    detail: str | None = None
    last_error: str | None = None
    last_message_ms: int | None = None
    messages: int = 0
    ticks: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    reconnects: int = 0
    handled: int = 0
    restarts: int = 0
    on_change: Callable[[StateHolder, str], None] | None = field(
        default=None, repr=False, compare=False)

    def set_state(self, state: str, error: str | None = None, *,
                  detail: str | None = None) -> None:
        """Move to ``state``; remember ``error`` (as :attr:`last_error`, at most 300
        characters) and ``detail``. A change of state is logged and reported to
        :attr:`on_change`."""
        if error is not None:
            self.last_error = error[:300]
        self.detail = detail if detail is not None else error
        if state != self.state:
            previous, self.state = self.state, state
            self.since_ms = now_ms()
            log.info("%s %s: %s -> %s%s", self.kind, self.name, previous, state,
                     f" ({self.detail})" if self.detail else "",
                     extra={"actor": self.name, "kind": self.kind, "state": state,
                            "previous": previous})
            if self.on_change is not None:
                self.on_change(self, previous)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view (every attribute except :attr:`name` and :attr:`on_change`)."""
        return {
            "kind": self.kind, "state": self.state, "since_ms": self.since_ms,
            "detail": self.detail, "last_error": self.last_error,
            "last_message_ms": self.last_message_ms, "messages": self.messages,
            "ticks": self.ticks, "dead_lettered": self.dead_lettered, "ignored": self.ignored,
            "reconnects": self.reconnects, "handled": self.handled,
            "restarts": self.restarts,
        }
