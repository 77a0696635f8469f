"""Runtime mode switch: ``GET /mode``, ``POST /mode/live``, ``POST /mode/test``.

* ``POST /mode/{live|test}`` — 200 ``{"mode": "test", "previous": "live"}`` when switched;
  **409** ``{"error": {"status": 409, "message": "already in test mode", "param": "mode"}}``
  when that mode is already
  requested; 400 for another mode name; 503 when Redis is down. Any worker accepts it;
  the ingesting worker (the group leader) applies it within about a second.
* ``GET /mode`` — ``{"mode": <requested>, "ingest": <status of the ingesting worker or
  null>}``; the status lists every feed's state (see ``GET /health``).
"""

from __future__ import annotations

from faust.web import Request, Response
from redis.exceptions import RedisError

from stores.control import get_mode, read_ingest_status, set_mode
from views.base import ApiView, Routes

__all__ = ["ROUTES", "Mode", "SwitchMode"]

_SWITCHABLE = ("live", "test")


class Mode(ApiView):
    """The requested mode and the ingesting worker's status."""

    async def get(self, request: Request) -> Response:
        settings = self.ctx.settings
        prefix = settings.redis.key_prefix
        try:
            mode = await get_mode(self.ctx.redis, prefix, settings.feeds.mode)
            status = await read_ingest_status(self.ctx.redis, prefix)
        except (RedisError, OSError) as exc:
            return self.fail(503, f"redis unavailable: {type(exc).__name__}")
        return self.ok({"mode": mode, "ingest": status})


class SwitchMode(ApiView):
    """Switch the cluster to ``live`` or ``test`` ingest."""

    async def post(self, request: Request, mode: str) -> Response:
        if mode not in _SWITCHABLE:
            return self.fail(400, f"unknown mode {mode[:20]!r}: use live or test", param="mode")
        settings = self.ctx.settings
        try:
            previous = await set_mode(self.ctx.redis, settings.redis.key_prefix, mode,
                                      settings.feeds.mode)
        except (RedisError, OSError) as exc:
            return self.fail(503, f"redis unavailable: {type(exc).__name__}")
        if previous == mode:
            return self.fail(409, f"already in {mode} mode", param="mode")
        return self.ok({"mode": mode, "previous": previous})


ROUTES: Routes = [("/mode", Mode), ("/mode/{mode}", SwitchMode)]
