""":func:`views.register_views`: every route registered once, in order, each view bound to
the context it was given, and the module classes left unbound."""

from __future__ import annotations

import json
from typing import Any, cast

import faust
from aiohttp.test_utils import make_mocked_request

from core.config import AuthSection
from views import ROUTES, register_views
from views.auth import AccessGuard
from views.base import ApiView
from views.context import ViewContext
from views.openapi import spec


class _Redis:
    """The mode and ingest-status keys only."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def get(self, key: str) -> Any:
        return self.values.get(key)

    async def set(self, key: str, value: Any, get: bool = False, **kw: Any) -> Any:
        old = self.values.get(key)
        self.values[key] = value
        return old if get else True


def _ctx(redis: Any = None) -> ViewContext:
    stub = cast(Any, None)
    settings = cast(Any, type("S", (), {
        "redis": type("R", (), {"key_prefix": "t"})(),
        "feeds": type("F", (), {"mode": "off"})()})())
    return ViewContext(settings=settings, database=stub, redis=redis, latest=stub,
                       stats=stub, live_bars=stub, redis_writes=stub, ohlcv_cache=stub,
                       on_demand=stub,
                       access_guard=AccessGuard(AuthSection()), stream_hub=stub)


def test_every_route_registered_bound_and_documented() -> None:
    ctx = _ctx()
    app = faust.App("unit-views", web_enabled=False)
    register_views(app, ctx)
    assert list(app.web.views) == [path for path, _ in ROUTES]
    for path, cls in ROUTES:
        view = app.web.views[path]
        assert isinstance(view, cls) and type(view) is not cls
        assert isinstance(view, ApiView) and view.ctx is ctx
        assert type(view).__name__ == cls.__name__ and "ctx" not in vars(cls)
    assert set(app.web.views) <= set(spec()["paths"])
    # the same classes register on a second app with another context
    other = faust.App("unit-views-2", web_enabled=False)
    ctx2 = _ctx()
    register_views(other, ctx2)
    assert all(cast(ApiView, v).ctx is ctx2 for v in other.web.views.values())
    assert all(cast(ApiView, v).ctx is ctx for v in app.web.views.values())


async def test_views_answer_from_their_context() -> None:
    app = faust.App("unit-views-3", web_enabled=False)
    register_views(app, _ctx(_Redis()))
    resp = await app.web.views["/openapi.json"](make_mocked_request("GET", "/openapi.json"))
    assert resp.status == 200 and json.loads(resp.body) == spec()
    resp = await app.web.views["/mode"](make_mocked_request("GET", "/mode"))
    assert (resp.status, json.loads(resp.body)) == (200, {"mode": "off", "ingest": None})
    switch = app.web.views["/mode/{mode}"]
    resp = await switch(make_mocked_request("POST", "/mode/test", match_info={"mode": "test"}))
    assert (resp.status, json.loads(resp.body)) == (200, {"mode": "test", "previous": "off"})
    resp = await switch(make_mocked_request("POST", "/mode/test", match_info={"mode": "test"}))
    assert resp.status == 409
