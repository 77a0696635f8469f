"""Control of a running market replay (``faust -A app replay``) over HTTP.

The replay is a separate process; these views talk to it through Redis
(:mod:`stores.replay_control`), so any worker answers them.

* ``GET /replay/status`` — 200: the replay state (session, ``state``
  running|paused|stopped|finished, ``speed``, simulated ``clock_ms`` and ``clock``
  (ISO-8601), ``position``/``total`` ticks, ``rate`` ticks/s, ``eta_s``, ``source``,
  ``namespace``, ...); a stopped or finished replay stays visible for 10 s. 404 when no
  replay ran lately.
* ``POST /replay/pause``, ``/replay/resume``, ``/replay/stop``,
  ``/replay/seek?to=<ISO-8601 or epoch ms>`` (source time), ``/replay/speed?x=<factor, 0 =
  as fast as possible>`` — 200 with the state once the replay applied the command
  (``"applied": true``), 202 with the current state when it did not within 3 s
  (``"applied": false``). 404 no replay runs; 409 not in that state (pause when paused,
  resume when running, anything once stopped or finished); 400 bad ``to``/``x`` or an
  unknown command; 503 Redis down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faust.web import Request, Response
from redis.exceptions import RedisError

from core.errors import QueryError
from stores.replay_control import (
    COMMANDS,
    check_transition,
    parse_speed,
    read_state,
    send_command,
    status_body,
)
from views.base import ApiView, Routes
from views.params import parse_time_ms

__all__ = ["ACK_TIMEOUT_S", "ROUTES", "ReplayCommand", "ReplayStatus"]

#: how long a command view waits for the replay to apply the command
ACK_TIMEOUT_S = 3.0


class ReplayStatus(ApiView):
    """State and simulated clock of the running replay."""

    async def get(self, request: Request) -> Response:
        try:
            state = await read_state(self.ctx.redis, self.ctx.settings.redis.key_prefix)
        except (RedisError, OSError) as exc:
            return self.fail(503, f"redis unavailable: {type(exc).__name__}")
        if state is None:
            return self.fail(404, "no replay is running")
        return self.ok(status_body(state))


class ReplayCommand(ApiView):
    """``pause``, ``resume``, ``stop``, ``seek?to=``, ``speed?x=`` for the running replay."""

    async def post(self, request: Request, command: str) -> Response:
        if command not in COMMANDS:
            return self.fail(400, f"unknown replay command {command[:20]!r}: use "
                                  f"{', '.join(COMMANDS)}", param="command")
        args: dict[str, Any] = {}
        try:
            if command == "seek":
                to = request.query.get("to")
                if not to:
                    raise QueryError("missing required parameter 'to'", "to")
                args["to_ms"] = parse_time_ms(to, "to")
            elif command == "speed":
                try:
                    args["speed"] = parse_speed(request.query.get("x"))
                except ValueError as exc:
                    raise QueryError(str(exc), "x") from None
        except QueryError as exc:
            return self.fail(400, str(exc), param=exc.param)
        client = self.ctx.redis
        prefix = self.ctx.settings.redis.key_prefix
        try:
            state = await read_state(client, prefix)
            refused = check_transition(state, command)
            if refused is not None:
                return self.fail(*refused)
            cmd_id = await send_command(client, prefix, command, **args)
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while True:
                state = await read_state(client, prefix)
                if state is not None and int(state.get("ack", 0)) >= cmd_id:
                    return self.ok({**status_body(state), "applied": True})
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
        except (RedisError, OSError) as exc:
            return self.fail(503, f"redis unavailable: {type(exc).__name__}")
        if state is None:
            return self.fail(404, "the replay ended")
        return self.ok({**status_body(state), "applied": False}, status=202)


ROUTES: Routes = [("/replay/status", ReplayStatus), ("/replay/{command}", ReplayCommand)]
