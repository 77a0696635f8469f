"""``ApiView``: the base class of every HTTP API view.

Every response of an :class:`ApiView` that is not a success has one shape::

    {"error": {"status": 400, "message": "invalid symbol 'x y'", "param": "symbol"}}

``status`` repeats the HTTP status, ``message`` is for humans, ``param`` (present only
when the error concerns one request parameter) names the query or path parameter at
fault. Views produce it with ``self.fail(status, message, param=None)`` and successes
with ``self.ok(body)``.

What :meth:`ApiView.dispatch` adds to Faust's ``View``:

* **Dependencies**: a registered view class carries its :class:`views.context.ViewContext`
  as the class attribute ``ctx`` (bound by :func:`bind_view`, called by
  :func:`views.register_views`); the access guard is ``ctx.access_guard``.
* **Access control** (:mod:`views.auth`) on every path except ``/health`` and the chart
  page with its static files (``/``, ``/static/...``: no data in them): with
  ``auth.enabled`` a missing/invalid bearer token gets 401 with
  ``WWW-Authenticate: Bearer ...``; with ``auth.rate_limit_per_s`` > 0 a client over its
  limit gets 429 with ``Retry-After: <seconds>``; a valid credential without the scope
  the method needs (``read`` for GET/HEAD, the view's ``write_scope`` otherwise) gets 403
  naming the scope. The client id is kept in ``request[CLIENT_ID_KEY]``, the
  :class:`views.auth.Principal` in ``request[PRINCIPAL_KEY]``; a handler checks the
  series it reads with :meth:`ApiView.check_market` (403 outside the credential's
  symbols/exchanges).
* **405** as JSON with an ``Allow`` header for a method the view does not implement
  (routes are registered for every standard method, so aiohttp's plain-text 405 never
  answers); ``OPTIONS`` is answered 204 with ``Allow`` unless the view defines it.
* **500** as JSON without any stack trace for an unexpected exception; the traceback is
  logged server-side with a short ``ref`` that the response message repeats.
* Faust ``WebError`` exceptions (``raise self.NotFound("...")``) become the error shape.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar, TypeVar, cast

import orjson
from faust.web import Request, Response, View
from faust.web.exceptions import WebError
from redis.exceptions import RedisError

from stores.replay_control import series_clock_ms
from views.auth import OPEN, AccessDenied, Principal
from views.context import ViewContext

__all__ = ["CLIENT_ID_KEY", "PRINCIPAL_KEY", "PUBLIC_PATHS", "ApiView", "Routes", "bind_view",
           "error_body"]

log = logging.getLogger(__name__)

#: view paths served without authentication or rate limit
PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/", "/static/{name}",
                                                "/static/vendor/{name}"})
#: request key of the client id (``request.get(CLIENT_ID_KEY)``, ``key:...``/``jwt:...``/
#: ``addr:...``; set only when access control is active)
CLIENT_ID_KEY: Any
#: request key of the :class:`views.auth.Principal` (set only when access control is active)
PRINCIPAL_KEY: Any
try:
    from aiohttp.web import RequestKey

    CLIENT_ID_KEY = RequestKey("marketflow.client_id", str)
    PRINCIPAL_KEY = RequestKey("marketflow.principal", Principal)
except ImportError:  # aiohttp < 3.13
    CLIENT_ID_KEY = "marketflow.client_id"
    PRINCIPAL_KEY = "marketflow.principal"

#: methods that only read (scope ``read``); the others need the view's ``write_scope``
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: methods routed to every ApiView (the view answers 405 for those it lacks)
_ROUTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HANDLERS = ("get", "head", "post", "put", "patch", "delete", "options")

def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The documented error body."""
    err: dict[str, Any] = {"status": status, "message": message}
    if param is not None:
        err["param"] = param
    return {"error": err}


class ApiView(View):
    """Faust ``View`` with access control, JSON 405/500 and the one error shape.

    Subclass it like ``View`` (``async def get(self, request, **match_info)``), answer
    with :meth:`ok` / :meth:`fail`, read dependencies from :attr:`ctx`, and list the class
    in the module's routes (:data:`Routes`) instead of decorating it with ``@app.page``.
    """

    #: the view's dependencies, set on the registered subclass by :func:`bind_view`
    ctx: ClassVar[ViewContext]
    #: set by ``app.page``
    view_path: str
    #: with auth on, a request without ``Authorization`` reaches the view, which checks a
    #: token itself (the WebSocket stream: browsers cannot set the header)
    auth_in_first_frame: ClassVar[bool] = False
    #: the scope a POST (or other writing method) needs; GET and HEAD need ``read``
    write_scope: ClassVar[str] = "control"

    @classmethod
    def required_scope(cls, method: str) -> str:
        """The scope ``method`` needs on this view (docs/security.md#scopes)."""
        return "read" if method.upper() in _READ_METHODS else cls.write_scope

    @staticmethod
    def principal(request: Any) -> Principal:
        """Who ``request`` acts as (:data:`views.auth.OPEN` while access control is off)."""
        return cast(Principal, request.get(PRINCIPAL_KEY) or OPEN)

    def check_market(self, request: Any, symbol: str | None, exchange: str | None) -> None:
        """Check that ``request`` may read ``symbol`` on ``exchange`` (None: consolidated).

        Raises:
            views.auth.Forbidden: outside the credential's restrictions (the view's
                dispatch answers 403).
        """
        self.principal(request).check_market(symbol, exchange)

    # -- helpers for views ------------------------------------------------------------

    def ok(self, body: Any, status: int = 200, *,
           headers: Mapping[str, str] | None = None) -> Response:
        """A JSON success response (``body`` serialised as is with orjson: NaN/inf become
        null, ``Decimal`` a number).

        Raises:
            TypeError: ``body`` holds a value JSON cannot represent (a bug: answered 500).
        """
        return self.bytes(orjson.dumps(body, default=_json_default),
                          content_type="application/json", status=status,
                          headers=dict(headers) if headers else None)

    def fail(self, status: int, message: str, param: str | None = None, *,
             headers: Mapping[str, str] | None = None) -> Response:
        """A JSON error response ``{"error": {"status", "message"[, "param"]}}``.

        Args:
            status: HTTP status (4xx/5xx).
            message: human-readable reason; never put secrets or tracebacks in it.
            param: the query/path parameter at fault, if any.
            headers: extra response headers (e.g. ``Retry-After``).
        """
        return self.bytes(orjson.dumps(error_body(status, message, param)),
                          content_type="application/json", status=status,
                          headers=dict(headers) if headers else None)

    async def clock_ms(self, symbol: str, exchange: str | None, wall_ms: int) -> int:
        """"Now" for a series (:func:`stores.replay_control.series_clock_ms`: the replay
        clock for replayed data); ``wall_ms`` when Redis cannot tell."""
        try:
            return await series_clock_ms(self.ctx.redis, self.ctx.settings.redis.key_prefix,
                                         symbol, exchange, wall_ms)
        except (RedisError, OSError) as exc:
            log.warning("replay clock unavailable (%s); wall clock used", type(exc).__name__)
            return wall_ms

    # -- method handling --------------------------------------------------------------

    def get_methods(self) -> set[str]:
        """Methods Faust registers routes for: all standard ones, so that
        :meth:`dispatch` (not aiohttp) answers the unsupported ones."""
        return set(_ROUTED_METHODS)

    @classmethod
    def allowed_methods(cls) -> frozenset[str]:
        """Methods this view answers (its ``Allow`` header)."""
        names = {m.upper() for m in _overridden(cls)}
        if "GET" in names:
            names.add("HEAD")
        names.add("OPTIONS")
        return frozenset(names)

    async def dispatch(self, request: Any) -> Any:
        """Method check, access control, then the handler; errors become JSON."""
        app = self.app
        sensor_state = app.sensors.on_web_request_start(app, request, view=self)
        response: Response | None = None
        try:
            response = await self._dispatch(request)
        finally:
            app.sensors.on_web_request_end(app, request, response, sensor_state, view=self)
        return response

    async def _dispatch(self, request: Any) -> Response:
        method = str(request.method).upper()
        allowed = self.allowed_methods()
        allow_header = {"Allow": ", ".join(sorted(allowed))}
        if method not in allowed:
            return self.fail(405, f"method {method} not allowed", headers=allow_header)
        if method == "OPTIONS" and "options" not in _overridden(type(self)):
            return self.bytes(b"", status=204, headers=allow_header)
        if getattr(self, "view_path", None) not in PUBLIC_PATHS:
            guard = self.ctx.access_guard
            deferred = (self.auth_in_first_frame and guard.settings.enabled
                        and "Authorization" not in request.headers)
            if guard.active and not deferred:
                try:
                    principal = await guard.acheck(
                        request.headers.get("Authorization"),
                        getattr(request, "remote", None), time.monotonic(),
                        self.required_scope(method))
                except AccessDenied as exc:
                    return self.fail(exc.status, exc.message, headers=exc.headers)
                request[CLIENT_ID_KEY] = principal.client_id
                request[PRINCIPAL_KEY] = principal
        handler = cast(Callable[..., Awaitable[Response]], self.methods[method.lower()])
        try:
            return await handler(cast(Request, request), **(request.match_info or {}))
        except AccessDenied as exc:  # a handler's own check (check_market)
            return self.fail(exc.status, exc.message, headers=exc.headers)
        except WebError as exc:
            status = int(exc.code or 500)
            if status >= 500:
                log.error("%s %s failed: %s", method, getattr(request, "path", "?"), exc.detail)
            return self.fail(status, str(exc.detail))
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("unhandled error in %s %s (ref %s)", method,
                          getattr(request, "path", "?"), ref)
            return self.fail(500, f"internal server error (ref {ref})")


#: a view module's routes: ``(path, view class)``, registered in this order
Routes = Sequence[tuple[str, type[ApiView]]]

_V = TypeVar("_V", bound=ApiView)


def bind_view(cls: type[_V], ctx: ViewContext) -> type[_V]:
    """A subclass of ``cls`` carrying ``ctx`` (same name, so Faust names the view as
    before); ``cls`` itself stays unbound, so it can be registered on several apps.

    Args:
        cls: the view class.
        ctx: the dependencies.

    Returns:
        type: the subclass, to pass to ``app.page(path)``.
    """
    attrs = {"ctx": ctx, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
             "__doc__": cls.__doc__}
    return cast(type[_V], type(cls.__name__, (cls,), attrs))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _overridden(cls: type[View]) -> set[str]:
    return {m for m in _HANDLERS if getattr(cls, m) is not getattr(View, m)}
