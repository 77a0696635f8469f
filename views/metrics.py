"""``GET /metrics``: Prometheus text exposition of :mod:`app.metrics`."""

from __future__ import annotations

from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.faust_app import app

__all__ = ["Metrics"]


@app.page("/metrics")
class Metrics(View):
    """Prometheus scrape endpoint."""

    async def get(self, request: Request) -> Response:
        return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])
