"""``GET /metrics``: Prometheus text exposition of :mod:`core.metrics`."""

from __future__ import annotations

from faust.web import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from views.base import ApiView, Routes

__all__ = ["ROUTES", "Metrics"]


class Metrics(ApiView):
    """Prometheus scrape endpoint."""

    async def get(self, request: Request) -> Response:
        return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


ROUTES: Routes = [("/metrics", Metrics)]
