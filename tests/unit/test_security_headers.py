""":func:`views.security_headers.security_headers` on a small aiohttp app (JSON, HTML, raised
and router errors, a view's own CSP, prepared responses, a WebSocket), and the page
policies checked against what the chart page and the docs page really load."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from views.openapi import spec_html
from views.security_headers import (
    API_CSP,
    CHART_CSP,
    COMMON_HEADERS,
    DOCS_CSP,
    security_headers,
)

STATIC = Path(__file__).resolve().parents[2] / "views" / "static"
CHART_HTML = STATIC / "index.html"
VENDOR_JS = STATIC / "vendor" / "lightweight-charts.standalone.production.mjs"
CSP = "Content-Security-Policy"
OWN_CSP = "default-src 'self'"
#: the response ``/streamed`` prepared (to check the middleware left it unchanged)
STREAMED = web.AppKey("streamed", web.StreamResponse)


async def _json(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


async def _chart(request: web.Request) -> web.StreamResponse:
    return web.Response(body=CHART_HTML.read_bytes(), content_type="text/html")


async def _docs(request: web.Request) -> web.StreamResponse:
    return web.Response(text=spec_html(), content_type="text/html")


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound(text="no such thing")


async def _own(request: web.Request) -> web.StreamResponse:
    return web.Response(text="<p>x</p>", content_type="text/html",
                        headers={CSP: OWN_CSP, "X-Frame-Options": "SAMEORIGIN"})


async def _streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"streamed")
    request.app[STREAMED] = response
    return response


async def _boom(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("bug")


async def _ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str("echo " + msg.data)
    return ws


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[security_headers])
    for path, handler in [("/", _chart), ("/docs", _docs), ("/json", _json),
                          ("/other", _chart), ("/missing", _not_found), ("/own", _own),
                          ("/streamed", _streamed), ("/boom", _boom), ("/stream", _ws)]:
        app.router.add_get(path, handler)
    async with TestClient(TestServer(app)) as c:
        yield c


def _policy(csp: str) -> dict[str, list[str]]:
    """``directive -> sources`` of a CSP header value."""
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _assert_common(headers: Mapping[str, str]) -> None:
    for name, value in COMMON_HEADERS.items():
        assert headers[name] == value, name


@pytest.mark.parametrize(("path", "status", "csp"), [
    ("/json", 200, API_CSP), ("/", 200, CHART_CSP), ("/docs", 200, DOCS_CSP),
    ("/other", 200, API_CSP),  # HTML of a route without a page policy fails closed
    ("/missing", 404, API_CSP), ("/no/such/route", 404, API_CSP),
])
async def test_every_response_gets_the_headers(
        client: TestClient[web.Request, web.Application], path: str, status: int,
        csp: str) -> None:
    resp = await client.get(path)
    assert resp.status == status
    _assert_common(resp.headers)
    assert resp.headers[CSP] == csp


async def test_router_405_gets_the_headers(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post("/json")
    assert resp.status == 405
    _assert_common(resp.headers)
    assert resp.headers[CSP] == API_CSP


async def test_headers_the_handler_set_are_kept(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/own")
    assert resp.headers.getall(CSP) == [OWN_CSP]
    assert resp.headers.getall("X-Frame-Options") == ["SAMEORIGIN"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"


async def test_prepared_response_is_left_alone(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/streamed")
    assert (resp.status, await resp.read()) == (200, b"streamed")
    assert CSP not in resp.headers  # sent before the middleware saw it
    # and not set afterwards either (aiohttp 3 would accept it and never send it)
    sent = client.app[STREAMED]
    assert sent.prepared and not {CSP, *COMMON_HEADERS} & set(sent.headers)


async def test_other_exceptions_propagate(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/boom")
    # aiohttp's own 500, built after the middlewares: the error was not swallowed
    assert resp.status == 500 and CSP not in resp.headers


async def test_websocket_session(client: TestClient[web.Request, web.Application]) -> None:
    ws = await client.ws_connect("/stream")
    await ws.send_str("hi")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo hi")
    await ws.close()
    assert ws.closed and ws.close_code == 1000


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each ``<script>``/``<style>``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag in self.inline:
            self._open = tag
            self.inline[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.inline[self._open][-1] += data


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _same_origin_file(url: str) -> bool:
    """A root-relative URL of a file the worker serves from ``views/static/``."""
    if not url.startswith("/static/") or "//" in url:
        return False
    return (STATIC / url.removeprefix("/static/")).is_file()


def test_the_chart_csp_fits_the_chart_page() -> None:
    page = _parse(CHART_HTML.read_text())
    policy = _policy(CHART_CSP)
    assert [s for s in page.inline["script"] if s.strip()] == []
    assert page.inline["style"] == []
    assert not [(t, n) for t, a in page.tags for n in a if n == "style" or n.startswith("on")]
    scripts = [a["src"] for t, a in page.tags if t == "script"]
    links = [(a.get("rel"), a["href"]) for t, a in page.tags if t == "link"]
    assert scripts == ["/static/chart.js"] and all(map(_same_origin_file, scripts))
    assert not [t for t, a in page.tags if t in ("img", "iframe", "object", "embed", "base")]
    for rel, href in links:
        if href.startswith("data:"):  # the empty favicon
            assert rel == "icon" and policy["img-src"] == ["data:"]
        else:
            assert rel == "stylesheet" and _same_origin_file(href), href
    # the modules import only same-origin modules, and nothing needs eval or a worker
    for module in [*STATIC.glob("*.js"), VENDOR_JS]:
        code = module.read_text()
        for spec in re.findall(r"""(?:^|[;}\s])(?:import|from)\s*\(?\s*['"]([^'"]+)['"]""",
                               code):
            assert _same_origin_file(spec), (module.name, spec)
        for banned in ("eval(", "new Function", "Worker(", 'setAttribute("style"',
                       "setAttribute('style'", "cssText", "importScripts"):
            assert banned not in code, (module.name, banned)
    assert policy["script-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]


def test_the_chart_csp_allows_the_vendored_attribution_style() -> None:
    styles = re.findall(r'createElement\("style"\),this\.\w+\.innerText="([^"]*)"',
                        VENDOR_JS.read_text())
    assert len(styles) == 1 and "tv-attr-logo" in styles[0]
    assert _policy(CHART_CSP)["style-src"] == ["'self'", f"'{_sha256(styles[0])}'"]


def test_the_docs_csp_fits_the_docs_page() -> None:
    page = _parse(spec_html())
    assert page.inline["script"] == [] and len(page.inline["style"]) == 1
    assert not [t for t, a in page.tags if t in ("script", "link", "img", "iframe", "base")]
    assert not [(t, n) for t, a in page.tags for n in a if n == "style" or n.startswith("on")]
    policy = _policy(DOCS_CSP)
    assert policy["default-src"] == ["'none'"]
    assert policy["style-src"] == [f"'{_sha256(page.inline['style'][0])}'"]


def test_the_api_csp() -> None:
    assert _policy(API_CSP) == {"default-src": ["'none'"], "frame-ancestors": ["'none'"]}
