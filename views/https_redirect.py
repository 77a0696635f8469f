"""Plain-HTTP listener that sends every request to HTTPS (``web.https_redirect_port``).

With ``web.tls_cert_file`` set, the worker's web server speaks only HTTPS on
``web.port``. :class:`HttpsRedirect`, when ``web.https_redirect_port`` is set (off by
default), listens for plain HTTP on that port of ``web.host`` and answers every method and
path with ``308 Permanent Redirect`` to ``https://<host>:<web.port><path>?<query>`` (308
keeps the method and body, RFC 9110 section 15.4.9), with the security headers of
:mod:`views.security_headers`. ``<host>`` is the request's ``Host`` without its port.
"""

from __future__ import annotations

import logging

from aiohttp import web
from mode import Service

from core.config import WebSection
from views.security_headers import security_headers

__all__ = ["HttpsRedirect", "redirect_location"]

log = logging.getLogger(__name__)


def redirect_location(host_header: str | None, path_qs: str, https_port: int,
                      fallback_host: str) -> str:
    """The HTTPS URL a plain-HTTP request goes to.

    Args:
        host_header: the request's ``Host`` (``name``, ``name:port``, ``[v6]:port``), or
            None.
        path_qs: path and query, e.g. ``/ohlcv?symbol=BTCUSDT``.
        https_port: ``web.port``.
        fallback_host: used when the request has no ``Host`` (``web.host``).

    Returns:
        str: e.g. ``https://127.0.0.1:6066/ohlcv?symbol=BTCUSDT`` (no port when 443).
    """
    host = (host_header or "").strip() or fallback_host
    if host.startswith("["):  # [v6]:port
        host = host[:host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    elif ":" in host:  # a bare IPv6 address
        host = f"[{host}]"
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{host}{port}{path_qs}"


class HttpsRedirect(Service):
    """The redirect listener (module docstring); a service of the app, started and
    stopped with it.

    Args:
        settings: the web settings (``host``, ``port``, ``https_redirect_port``).
    """

    def __init__(self, settings: WebSection) -> None:
        super().__init__()
        self.web = settings
        self._runner: web.AppRunner | None = None

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(redirect_location(
            request.headers.get("Host"), request.path_qs, self.web.port, self.web.host))

    async def on_start(self) -> None:
        """Listen on ``web.host:web.https_redirect_port``."""
        app = web.Application(middlewares=[security_headers])
        app.router.add_route("*", "/{tail:.*}", self._redirect)
        runner = self._runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.web.https_redirect_port
        await web.TCPSite(runner, self.web.host, port).start()
        log.info("plain HTTP on %s:%s redirects to HTTPS port %s", self.web.host, port,
                 self.web.port)

    async def on_stop(self) -> None:
        """Close the listener."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
