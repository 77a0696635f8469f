"""Runtime mode switch: ``GET /mode``, ``POST /mode/live``, ``POST /mode/test``.

* ``POST /mode/{live|test}`` — 200 ``{"mode": "test", "previous": "live"}`` when switched;
  **409** ``{"error": "already in test mode", "mode": "test"}`` when that mode is already
  requested; 400 for another mode name; 503 when Redis is down. Any worker accepts it;
  the ingesting worker (the group leader) applies it within about a second.
* ``GET /mode`` — ``{"mode": <requested>, "ingest": <status of the ingesting worker or
  null>}``; the status lists every feed's state (see ``GET /health``).
"""

from __future__ import annotations

from faust.web import Request, Response, View
from redis.exceptions import RedisError

from app import settings
from app.faust_app import app
from app.mode import get_mode, read_ingest_status, set_mode
from app.services import latest_prices

__all__ = ["Mode", "SwitchMode"]

_SWITCHABLE = ("live", "test")


@app.page("/mode")
class Mode(View):
    """The requested mode and the ingesting worker's status."""

    async def get(self, request: Request) -> Response:
        prefix = settings.redis.key_prefix
        try:
            mode = await get_mode(latest_prices.client, prefix, settings.feeds.mode)
            status = await read_ingest_status(latest_prices.client, prefix)
        except (RedisError, OSError) as exc:
            return self.json({"error": f"redis unavailable: {type(exc).__name__}"}, status=503)
        return self.json({"mode": mode, "ingest": status})


@app.page("/mode/{mode}")
class SwitchMode(View):
    """Switch the cluster to ``live`` or ``test`` ingest."""

    async def post(self, request: Request, mode: str) -> Response:
        if mode not in _SWITCHABLE:
            return self.json({"error": f"unknown mode {mode[:20]!r}: use live or test"},
                             status=400)
        try:
            previous = await set_mode(latest_prices.client, settings.redis.key_prefix, mode,
                                      settings.feeds.mode)
        except (RedisError, OSError) as exc:
            return self.json({"error": f"redis unavailable: {type(exc).__name__}"}, status=503)
        if previous == mode:
            return self.json({"error": f"already in {mode} mode", "mode": mode}, status=409)
        return self.json({"mode": mode, "previous": previous})
