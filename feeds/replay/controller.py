"""The replay controller: state, simulated clock and commands of one replay (no I/O);
see :mod:`feeds.replay.simulator` for the clocks and the control protocol.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from core.errors import ReplayError
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.replay.sources import TickSource

__all__ = ["ReplayController"]


class ReplayController:
    """State, simulated clock and commands of one replay (no I/O; driven by
    :func:`replay_source`, commanded by Redis and signals).

    Clocks: *source* time is the input's own ``ts_ms``; *output* time is what the pipeline
    sees (source time re-based when ``rebase_now``). ``clock_ms()`` is output time.
    """

    @property
    def state(self) -> str:
        """The replay's state (see :attr:`status`)."""
        return self.status.state

    @state.setter
    def state(self, value: str) -> None:
        self.status.set_state(value)

    def __init__(self, source: TickSource, speed: float, rebase_now: bool,
                 namespace: str) -> None:
        if speed < 0:
            raise ReplayError("speed must be >= 0")
        self.source = source
        self.session = uuid.uuid4().hex[:8]
        #: the replay's state (``running`` | ``paused`` | ``stopped`` | ``finished``),
        #: transitions logged
        self.status = StateHolder("replay", "replay", "running")
        self.speed = speed
        self.rebase_now = rebase_now
        self.namespace = namespace
        self.started_ms = now_ms()
        self.position = 0
        self.published = 0
        self.loops = 0
        self.ack = 0
        self.seek_to: int | None = None
        self.stop_requested = False
        self.closing = False  # set when the run ends: helper loops exit
        self.wake = asyncio.Event()
        self.last_src_ms = source.first_ts_ms  # source ts of the last published tick
        self.next_src_ms: int | None = None  # source ts of the flush waiting to go
        self._frozen_src_ms = source.first_ts_ms
        self._anchor_src_ms = source.first_ts_ms
        self._anchor_mono = time.monotonic()
        self._rb_wall_ms = 0
        self._rb_src_ms = source.first_ts_ms
        self.last_out_ms = 0  # highest output ts published
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0

    # -- clocks ----------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Source ms per output ms when re-basing (the speed, 1 at max speed)."""
        return self.speed if self.speed > 0 else 1.0

    def source_clock_ms(self) -> int:
        """The simulated clock in source time."""
        if self.seek_to is not None:
            return self.seek_to
        if self.state != "running":
            return self._frozen_src_ms
        if self.speed > 0 and self.next_src_ms is not None:
            est = self._anchor_src_ms + (time.monotonic() - self._anchor_mono) * self.speed * 1000
            return max(self.last_src_ms, min(int(est), self.next_src_ms))
        return self.last_src_ms

    def to_output_ms(self, src_ms: int) -> int:
        """Output time of source time ``src_ms`` (identity without re-basing)."""
        if not self.rebase_now:
            return src_ms
        return self._rb_wall_ms + int((src_ms - self._rb_src_ms) / self.scale)

    def clock_ms(self) -> int:
        """The simulated clock (output time, UTC epoch ms)."""
        return self.to_output_ms(self.source_clock_ms())

    def anchor(self, src_ms: int) -> None:
        """Restart pacing and re-basing at source time ``src_ms`` (now)."""
        self._anchor_src_ms = src_ms
        self._anchor_mono = time.monotonic()
        self._rb_src_ms = src_ms
        self._rb_wall_ms = max(now_ms(), self.last_out_ms + 1)

    def due_in_s(self, src_ms: int) -> float:
        """Seconds until the simulated clock reaches ``src_ms`` (<= 0: due; 0 at max
        speed)."""
        if self.speed <= 0:
            return 0.0
        due = self._anchor_mono + (src_ms - self._anchor_src_ms) / (self.speed * 1000)
        return due - time.monotonic()

    # -- commands ---------------------------------------------------------------------

    def pause(self) -> str | None:
        """Stop publishing after the flush in flight; returns an error text or None."""
        if self.state != "running":
            return f"cannot pause: {self.state}"
        self._frozen_src_ms = self.source_clock_ms()
        self.state = "paused"
        self.wake.set()
        return None

    def resume(self) -> str | None:
        """Continue publishing from the frozen clock; returns an error text or None."""
        if self.state != "paused":
            return f"cannot resume: {self.state}"
        self.state = "running"
        if self.seek_to is None:
            self.anchor(self._frozen_src_ms)
        self.wake.set()
        return None

    def seek(self, to_ms: int) -> str | None:
        """Jump to source time ``to_ms`` (forward or back); returns an error text or None."""
        if self.state not in ("running", "paused"):
            return f"cannot seek: {self.state}"
        self.seek_to = int(to_ms)
        self._frozen_src_ms = int(to_ms)
        self.wake.set()
        return None

    def set_speed(self, speed: float) -> str | None:
        """Change the speed factor (0 = max); returns an error text or None."""
        if speed < 0:
            return "speed must be >= 0"
        if self.state not in ("running", "paused"):
            return f"cannot change speed: {self.state}"
        src = self.source_clock_ms()
        self.speed = float(speed)
        self.anchor(src)
        self.wake.set()
        return None

    def stop(self) -> str | None:
        """End the replay after the flush in flight; returns an error text or None."""
        if self.state not in ("running", "paused"):
            return f"cannot stop: {self.state}"
        self.stop_requested = True
        self._frozen_src_ms = self.source_clock_ms()
        self.wake.set()
        return None

    def apply(self, command: dict[str, Any]) -> str | None:
        """Apply one Redis command object (:mod:`stores.replay_control`); returns an error
        text or None. Records its ``id`` as acknowledged either way."""
        cmd = command.get("cmd")
        cid = command.get("id")
        if isinstance(cid, int):
            self.ack = max(self.ack, cid)
        if cmd == "pause":
            return self.pause()
        if cmd == "resume":
            return self.resume()
        if cmd == "stop":
            return self.stop()
        if cmd == "seek":
            to_ms = command.get("to_ms")
            if isinstance(to_ms, bool) or not isinstance(to_ms, int):
                return f"seek needs an integer to_ms, got {to_ms!r}"
            return self.seek(to_ms)
        if cmd == "speed":
            speed = command.get("speed")
            if isinstance(speed, bool) or not isinstance(speed, (int, float)):
                return f"speed needs a number, got {speed!r}"
            return self.set_speed(float(speed))
        return f"unknown command {str(cmd)[:40]!r}"

    # -- state ------------------------------------------------------------------------

    def update_rate(self) -> None:
        """Recompute ``rate`` (ticks/s) since the previous call."""
        now = time.monotonic()
        t0, n0 = self._rate_mark
        if now - t0 >= 0.5:
            self.rate = (self.published - n0) / (now - t0)
            self._rate_mark = (now, self.published)

    def snapshot(self) -> dict[str, Any]:
        """The replay state (the ``<prefix>:replay:state`` schema)."""
        src = self.source_clock_ms()
        eta: float | None = None
        if self.state == "running":
            if self.speed > 0:
                eta = max(0.0, (self.source.last_ts_ms - src) / (self.speed * 1000))
            elif self.rate > 0:
                eta = max(0, self.source.total - self.position) / self.rate
        return {
            "session": self.session, "pid": os.getpid(), "state": self.state,
            "speed": self.speed, "clock_ms": self.to_output_ms(src), "source_clock_ms": src,
            "first_ts_ms": self.source.first_ts_ms, "last_ts_ms": self.source.last_ts_ms,
            "position": self.position, "total": self.source.total,
            "rate": round(self.rate, 1), "eta_s": None if eta is None else round(eta, 1),
            "published": self.published, "loops": self.loops, "namespace": self.namespace,
            "rebase_now": self.rebase_now, "source": self.source.description,
            "started_ms": self.started_ms, "updated_ms": now_ms(), "ack": self.ack,
        }


