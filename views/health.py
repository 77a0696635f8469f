"""``GET /health``: broker, database and Redis, each ``up``/``down``; 200 when all are up,
503 otherwise. Body::

    {"status": "ok"|"degraded", "broker": "up", "database": "up", "redis": "up",
     "details": {<dependency>: <error>}, "mode": "live", "event_loop": "uvloop",
     "history": {"coordinator": {"state": "idle", ...}, "writer": {...}},
     "ingest": {"worker": "host:6066", "mode": "live", "updated_ms": ...,
                "buffered_ticks": 0, "max_buffered_ticks": 20000,
                "feeds": {"exchange1": {"kind": "marketflow_tcp", "state": "connected",
                                        "last_message_ms": ..., "messages": 120,
                                        "ticks": 118, "dead_lettered": 2, "ignored": 0,
                                        "reconnects": 0, "restarts": 0,
                                        "last_error": null}, ...},
                "publisher": {"kind": "publisher", "state": "running", "restarts": 0, ...}}}

A feed outage (state ``reconnecting``) shows in ``ingest.feeds`` but does not turn the
HTTP status to 503: the pipeline itself is healthy. A feed (or the publisher's flush)
that crashed is restarted by its supervisor (:mod:`feeds.live.supervisor`): state
``crashed`` until then, ``restarts`` counts it. ``ingest`` is null when no worker
ingests (mode ``off``). ``gaps`` is the leader's gap job (:mod:`feeds.history.gaps`):
``{"state": "idle"|"scanning"|"repairing"|"error", "last_scan_ms", "open", "counts",
"source", "last_error", "updated_ms"}``, null when no worker runs it. ``stream`` is this
worker's WebSocket hub (:meth:`views.stream_hub.StreamHub.status`): ``{"channel":
"up"|"down", "channel_error", "connections", "subscriptions", "feeds", "messages"}``.

Redis down (``"redis": "down"``, 503): the pipeline keeps running — ticks are aggregated,
bars reach TimescaleDB and the closed-bars topic — and ``"redis_fallback"`` says how the
API answers meanwhile: ``{"prices_latest": "database", "prices_stats": "database
(minute granularity)", "redis_writes": "buffered"}``. ``"redis_writer"`` (always present)
is this worker's Redis writer (:meth:`stores.buffer.RedisWriteBuffer.status`): ``{"up",
"outage_since_ms", "backlog": {"latest", "seconds", "bars"}, "dropped": {"seconds",
"bars"}, "republished_ms", "last_error"}``. Once Redis answers again the status returns to
200 and the writer re-publishes the worker's current state (no restart needed).

``"breakers"``: the request path's circuit breakers (:mod:`core.breaker`), ``{"redis":
{"state": "closed"|"open", "failures", "trips", "opened_ms", "last_error"}, "database":
{...}}``; while one is open, requests skip that dependency at once (a Redis problem
falls back to TimescaleDB; a database problem answers 503)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaClient
from faust.web import Request, Response
from redis.exceptions import RedisError

from core.kafka_security import client_security
from feeds.history.gaps import read_gap_status
from stores.control import get_mode, read_ingest_status
from views.base import ApiView, Routes
from views.context import ViewContext

__all__ = ["ROUTES", "Health", "check_all"]

_TIMEOUT_S = 2.0


async def _broker(ctx: ViewContext) -> None:
    client = AIOKafkaClient(bootstrap_servers=ctx.settings.broker.bootstrap_servers,
                            request_timeout_ms=int(_TIMEOUT_S * 1000),
                            **client_security(ctx.settings.broker))
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def _database(ctx: ViewContext) -> None:
    async with ctx.database.request() as conn:  # bounded; fails at once while the circuit
        await conn.fetchval("SELECT 1")          # is open


async def _redis(ctx: ViewContext) -> None:
    await ctx.latest.ping()


async def check_all(ctx: ViewContext) -> dict[str, Any]:
    """Probe each dependency concurrently (2 s timeout each) and collect the status.

    Args:
        ctx: the views' dependencies.

    Returns:
        dict: the ``/health`` body (see the module docstring).
    """
    names = ("broker", "database", "redis")
    results = await asyncio.gather(
        *(asyncio.wait_for(f(ctx), _TIMEOUT_S) for f in (_broker, _database, _redis)),
        return_exceptions=True,
    )
    out: dict[str, Any] = {"details": {}}
    for name, r in zip(names, results, strict=True):
        if isinstance(r, BaseException):
            out[name] = "down"
            out["details"][name] = f"{type(r).__name__}: {r}"[:200]
        else:
            out[name] = "up"
    out["status"] = "ok" if all(out[n] == "up" for n in names) else "degraded"
    out["redis_writer"] = ctx.redis_writes.status()
    out["breakers"] = {b.name: b.status() for b in ctx.breakers}
    if out["redis"] == "down":
        out["redis_fallback"] = {"prices_latest": "database",
                                 "prices_stats": "database (minute granularity)",
                                 "redis_writes": "buffered"}
    out["event_loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
    out["history"] = ctx.on_demand.status()
    out["stream"] = ctx.stream_hub.status()
    if out["redis"] == "up":
        prefix = ctx.settings.redis.key_prefix
        try:
            out["mode"] = await get_mode(ctx.redis, prefix, ctx.settings.feeds.mode)
            out["ingest"] = await read_ingest_status(ctx.redis, prefix)
            out["gaps"] = await read_gap_status(ctx.redis, prefix)
        except (RedisError, OSError) as exc:
            out["details"]["ingest"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


class Health(ApiView):
    """Dependency health."""

    async def get(self, request: Request) -> Response:
        body = await check_all(self.ctx)
        return self.ok(body, status=200 if body["status"] == "ok" else 503)


ROUTES: Routes = [("/health", Health)]
