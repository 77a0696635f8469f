"""The chart page and its static files, served by every worker from the package itself
(no CDN, no build step at run time; ``docs/chart.md``).

* ``GET /`` — ``views/static/index.html``: candlesticks and volume of a series drawn
  with TradingView Lightweight Charts, live over ``/stream``, with the replay panel.
* ``GET /static/<name>`` and ``GET /static/vendor/<name>`` — the files of
  ``views/static/`` (the page's modules, the TradingView datafeed ``/static/datafeed.js``)
  and of ``views/static/vendor/`` (the pinned Lightweight Charts build with its license
  and NOTICE). Only files that exist there are served (no path outside those folders can
  be named); 404 otherwise.
"""

from __future__ import annotations

import mimetypes
from functools import cache
from pathlib import Path

from faust.web import Request, Response

from views.base import ApiView, Routes

__all__ = ["ROUTES", "STATIC_DIR", "ChartPage", "StaticFile", "VendorFile", "static_files"]

#: where the page's files live (inside the package: ``setup.cfg`` package data)
STATIC_DIR = Path(__file__).with_name("static")

_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".css": "text/css",
          ".html": "text/html", ".md": "text/markdown", ".LICENSE": "text/plain",
          ".NOTICE": "text/plain", ".svg": "image/svg+xml", ".png": "image/png"}
#: security headers of the page and its files
#: the CSP and the other security headers come from views/security_headers.py
_HEADERS = {"Cache-Control": "no-cache"}


@cache
def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Relative path (``/`` separated) -> file, for every file under ``root`` (read once
    per process)."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _content_type(path: Path) -> str:
    return (_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
            or "application/octet-stream")


class ChartPage(ApiView):
    """The chart page."""

    async def get(self, request: Request) -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return self.fail(404, "chart page not installed (views/static/index.html)")
        return self.bytes(page.read_bytes(), content_type="text/html", headers=_HEADERS)


class StaticFile(ApiView):
    """One file of ``views/static/``."""

    folder = ""

    async def get(self, request: Request, name: str) -> Response:
        f = static_files().get(self.folder + name)
        if f is None:
            return self.fail(404, f"no static file {name[:80]!r}", param="name")
        return self.bytes(f.read_bytes(), content_type=_content_type(f), headers=_HEADERS)


class VendorFile(StaticFile):
    """One file of ``views/static/vendor/``."""

    folder = "vendor/"


ROUTES: Routes = [("/", ChartPage), ("/static/{name}", StaticFile),
                  ("/static/vendor/{name}", VendorFile)]
