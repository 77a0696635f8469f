"""HTTP API (Faust web views, aiohttp): latest prices and statistics, OHLCV, TradingView
UDF, gaps, health, metrics, mode switch, replay control, the OpenAPI and AsyncAPI
documents, the WebSocket stream (``/stream``) and the chart page (``/``).

Importing the views registers nothing: each module lists its routes (``ROUTES``), and
the composition root (:func:`app.factory.create_app`) calls :func:`register_views` with
the views' dependencies (:class:`views.context.ViewContext`).

May import: everything below it (:mod:`core`, :mod:`sql`, :mod:`tables`, :mod:`stores`,
:mod:`feeds`, :mod:`query`, :mod:`agents`); never :mod:`app`. Layer 5 of
``docs/architecture.md``.
"""

from __future__ import annotations

import faust

from views import (
    asyncapi,
    chart,
    gaps,
    health,
    metrics,
    mode,
    ohlcv,
    openapi,
    prices,
    replay,
    stream,
    udf,
)
from views.base import Routes, bind_view
from views.context import ViewContext

__all__ = ["ROUTES", "register_views"]

#: every route of the API, in registration order (aiohttp matches in that order: the
#: ``/prices/latest/...`` pages come before ``/prices/{stat}/...``)
ROUTES: Routes = (*chart.ROUTES, *stream.ROUTES, *asyncapi.ROUTES, *gaps.ROUTES,
                  *health.ROUTES, *metrics.ROUTES, *mode.ROUTES, *ohlcv.ROUTES,
                  *openapi.ROUTES, *prices.ROUTES, *replay.ROUTES, *udf.ROUTES)


def register_views(app: faust.App, ctx: ViewContext) -> None:
    """Register every route of :data:`ROUTES` on ``app``.

    Each view class is registered as a subclass carrying ``ctx`` (:func:`views.base.bind_view`),
    so the views read their dependencies from ``self.ctx`` and the module classes stay
    unbound (the same classes can be registered on several apps, e.g. in tests).

    Args:
        app: the Faust app (its web server serves the views).
        ctx: the views' dependencies.
    """
    for path, cls in ROUTES:
        app.page(path)(bind_view(cls, ctx))
