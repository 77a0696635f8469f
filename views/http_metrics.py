"""HTTP request metrics: the aiohttp middleware :func:`http_metrics` counts every request
of the worker's web server (``marketflow_http_requests_total{route,status}``) and observes
its latency (``marketflow_http_request_duration_seconds{route,status}``).

* ``route`` is the matched route's template (``/ohlcv``, ``/static/{name}``,
  ``/prices/latest/{symbol}``), never the raw URL, so the label set stays bounded; a
  request no route matches (aiohttp's own 404, or 405 for a method no route has) is
  ``unmatched``.
* ``status`` is the response status, also when the handler raises: an aiohttp
  ``HTTPException`` counts with its status, any other exception as 500 (what aiohttp
  answers); the exception propagates unchanged. A handler cancelled before it answers
  (the worker stopping) is not counted.
* Latency is from the middleware's call to the handler's return, i.e. before the body is
  written to the socket.
* WebSocket sessions (``/stream``): the handler returns only when the socket closes, so
  its duration is the session's length, not a latency. A session is counted (status 101)
  when it ends and is **not** observed in the histogram; open sessions are
  ``marketflow_stream_connections``. A ``/stream`` request answered without an upgrade
  (426, 401) is an ordinary request and observed.

The composition root installs the middleware (Faust's ``web_application_options``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from core.metrics import HTTP_REQUEST_SECONDS, HTTP_REQUESTS

__all__ = ["UNMATCHED_ROUTE", "http_metrics", "route_label"]

#: ``route`` label of a request that matched no route
UNMATCHED_ROUTE = "unmatched"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_label(request: web.Request) -> str:
    """The ``route`` label of ``request``: its route's canonical template.

    Args:
        request: a request the router has resolved (as every middleware sees it).

    Returns:
        str: e.g. ``/static/{name}``; :data:`UNMATCHED_ROUTE` when no route matched.
    """
    resource = request.match_info.route.resource
    return UNMATCHED_ROUTE if resource is None else resource.canonical


def _record(route: str, status: int, elapsed_s: float) -> None:
    labels = (route, str(status))
    HTTP_REQUESTS.labels(*labels).inc()
    HTTP_REQUEST_SECONDS.labels(*labels).observe(elapsed_s)


@web.middleware
async def http_metrics(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Count and time ``request`` (see the module docstring), then return the handler's
    response.

    Raises:
        Exception: whatever the handler raises, unchanged (after it is counted).
    """
    route = route_label(request)
    start_s = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _record(route, exc.status, time.perf_counter() - start_s)
        raise
    except Exception:
        _record(route, 500, time.perf_counter() - start_s)
        raise
    if isinstance(response, web.WebSocketResponse) and response.prepared:
        HTTP_REQUESTS.labels(route, str(response.status)).inc()  # a session, not a latency
    else:
        _record(route, response.status, time.perf_counter() - start_s)
    return response
