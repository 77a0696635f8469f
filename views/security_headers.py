"""Security response headers: the aiohttp middleware :func:`security_headers` adds
:data:`COMMON_HEADERS` and a ``Content-Security-Policy`` to every response of the worker's
web server.

* Every response gets them: a handler's (JSON, HTML, its error answers), an aiohttp
  ``HTTPException`` the handler raises, and aiohttp's own 404/405 for a request no route
  matches (the router raises those inside the middleware chain). Not covered: the 500
  aiohttp writes for an exception that is not an ``HTTPException`` (it builds that response
  after every middleware; our views answer their own errors as JSON, ``views/base.py``).
* A header the handler set itself is kept (a view may send its own CSP).
* Over HTTPS (``web.tls_cert_file``) also :data:`HSTS`.
* The CSP is chosen by the response's ``Content-Type``: anything but ``text/html`` (JSON,
  plain text, JS, CSS) is never rendered as a page, so it gets :data:`API_CSP`, which allows
  nothing. ``text/html`` gets its page's policy by route template (:data:`PAGE_CSP`: ``/``
  the chart, ``/docs`` the API documentation); HTML of any other route gets
  :data:`API_CSP` too, so an unknown page fails closed (renders without scripts and styles).
* The page policies allow same-origin scripts, styles and connections only; the two inline
  ``<style>`` blocks the pages need are allowed by hash, not ``'unsafe-inline'``: the one
  Lightweight Charts inserts for its attribution logo (``views/static/vendor/``) and the
  docs page's (``views/openapi.py``). Editing either changes its hash (the unit test checks
  them). ``connect-src 'self'`` covers ``fetch`` and the same-origin ``ws:``/``wss:``
  ``/stream``.
* A response already prepared (headers sent: a WebSocket session, status 101, returns only
  after it closed) is returned untouched; its headers can no longer change.

The composition root installs the middleware (Faust's ``web_application_options``), first in
the list, so that it wraps every other middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from views.http_metrics import route_label

__all__ = ["API_CSP", "CHART_CSP", "COMMON_HEADERS", "DOCS_CSP", "HSTS", "PAGE_CSP",
           "security_headers"]

#: headers of every response
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                  "X-Frame-Options": "DENY"}

#: ``Strict-Transport-Security`` of every response served over HTTPS (one year)
HSTS = "max-age=31536000"

#: CSP of every response that is not an HTML page: nothing may load, nothing may frame it
API_CSP = "default-src 'none'; frame-ancestors 'none'"

#: sha256 of the ``<style>`` text Lightweight Charts 5.2.1 inserts (attribution logo)
_CHART_STYLE_SHA256 = "sha256-3pRED1tOXas1FXFoPb9TGCjmYe9XQsmO9OV23khV2nY="
#: sha256 of the docs page's ``<style>`` text (``views.openapi.render_html``)
_DOCS_STYLE_SHA256 = "sha256-gbuBWHCwZ/By1dTr2qB7hx0vwsQpwu122dBpTVJjh30="
_PAGE_TAIL = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

#: the chart page (``views/static/index.html``): its module scripts and stylesheet, the
#: ``data:`` favicon, ``fetch`` of the API and the ``/stream`` WebSocket, all same-origin
CHART_CSP = ("default-src 'none'; script-src 'self'; "
             f"style-src 'self' '{_CHART_STYLE_SHA256}'; img-src data:; "
             f"connect-src 'self'; {_PAGE_TAIL}")
#: the docs page: one inline ``<style>``, no script, no subresource
DOCS_CSP = f"default-src 'none'; style-src '{_DOCS_STYLE_SHA256}'; {_PAGE_TAIL}"
#: route template -> CSP of its ``text/html`` responses
PAGE_CSP = {"/": CHART_CSP, "/docs": DOCS_CSP}

_CSP = "Content-Security-Policy"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Set every missing security header on ``response`` unless it is prepared."""
    if response.prepared:
        return
    headers = response.headers
    for name, value in COMMON_HEADERS.items():
        headers.setdefault(name, value)
    if request.secure:  # over HTTPS: browsers keep to HTTPS for this host from now on
        headers.setdefault("Strict-Transport-Security", HSTS)
    if _CSP not in headers:
        html = response.content_type == "text/html"
        headers[_CSP] = PAGE_CSP.get(route_label(request), API_CSP) if html else API_CSP


@web.middleware
async def security_headers(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Return the handler's response with the security headers of the module docstring.

    Raises:
        web.HTTPException: the one the handler raised, with the headers added.
        Exception: any other exception of the handler, unchanged.
    """
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp 3: the exception is the response it sends
        _add_headers(request, exc)
        raise
    _add_headers(request, response)
    return response
