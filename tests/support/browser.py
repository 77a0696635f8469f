"""Headless Chromium for the browser tests (Python Playwright on Debian's ``chromium``).

``scripts/browser.sh`` installs ``/usr/bin/chromium`` when it is missing. A test opens a
:class:`WatchedPage`: a page in a fresh browser context that records what a user would
not see but a test must — console errors, uncaught page errors, failed requests, and any
request that leaves the page's origin (the chart page must work with no internet).

    async with chromium() as browser, watched_page(browser, base_url) as wp:
        await wp.page.goto(base_url + "/")
        ...
        assert wp.problems() == []
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Route,
    async_playwright,
)

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "WatchedPage", "browser_page", "chromium",
           "watched_page"]

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium (``scripts/browser.sh``); Playwright's own browser download is not used."""

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--no-first-run"]
"""Flags for a root user in a container with no GPU, and no traffic of Chromium's own."""


@dataclass
class WatchedPage:
    """A page and what went wrong on it.

    Attributes:
        page: the Playwright page.
        origin: the only origin the page may load from (``http://host:port``).
        console_errors: text and location of each ``console.error`` (and of the errors
            Chromium itself logs to the console, e.g. a 404 resource).
        page_errors: uncaught exceptions and unhandled rejections of the page.
        failed_requests: requests that got no response (network errors).
        foreign_requests: requests to another origin; they are aborted.
    """

    page: Page
    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Everything recorded so far, one line each (empty: a clean page)."""
        return ([f"console error: {e}" for e in self.console_errors]
                + [f"page error: {e}" for e in self.page_errors]
                + [f"request failed: {e}" for e in self.failed_requests]
                + [f"foreign request: {e}" for e in self.foreign_requests])

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            loc = msg.location
            self.console_errors.append(f"{msg.text} ({loc.get('url')}:{loc.get('lineNumber')})")

    def _on_request_failed(self, request: Request) -> None:
        if _origin(request.url) == self.origin:  # a foreign one was aborted on purpose
            self.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    async def _route(self, route: Route) -> None:
        url = route.request.url
        if _origin(url) == self.origin or url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            self.foreign_requests.append(url)
            await route.abort()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@asynccontextmanager
async def chromium(executable: Path = CHROMIUM) -> AsyncIterator[Browser]:
    """Launch headless Chromium.

    Args:
        executable: the browser binary (default: Debian's ``/usr/bin/chromium``).

    Yields:
        The browser; it is closed on exit.

    Raises:
        FileNotFoundError: the binary is missing (run ``scripts/browser.sh``).
    """
    if not executable.exists():
        raise FileNotFoundError(f"{executable} missing: run scripts/browser.sh")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(executable), headless=True,
                                           args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def watched_page(browser: Browser, origin: str,
                       viewport: tuple[int, int] = (1280, 720),
                       ignore_https_errors: bool = False) -> AsyncIterator[WatchedPage]:
    """A page in a fresh context that records errors and blocks other origins.

    Args:
        browser: from :func:`chromium`.
        origin: the server's ``http://host:port``; every other origin is aborted and
            recorded in :attr:`WatchedPage.foreign_requests`.
        viewport: width and height in CSS pixels.
        ignore_https_errors: accept a certificate the browser does not trust (a test's
            self-signed one).

    Yields:
        The watched page; its context is closed on exit.
    """
    context = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                        ignore_https_errors=ignore_https_errors)
    try:
        page = await context.new_page()
        wp = WatchedPage(page, origin.rstrip("/"))
        page.on("console", wp._on_console)
        page.on("pageerror", lambda exc: wp.page_errors.append(str(exc)))
        page.on("requestfailed", wp._on_request_failed)
        await page.route("**/*", wp._route)
        yield wp
    finally:
        await context.close()


@asynccontextmanager
async def browser_page(origin: str) -> AsyncIterator[WatchedPage]:
    """:func:`chromium` and :func:`watched_page` in one (a test with one page).

    Args:
        origin: the server's ``http://host:port``.

    Yields:
        The watched page.
    """
    async with chromium() as browser, watched_page(browser, origin) as wp:
        yield wp
