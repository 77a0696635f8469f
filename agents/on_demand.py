"""The on-demand history coordinator agent: one consumer of the ``history-requests`` topic
(keyed by ``exchange:symbol``) handing each request to
:meth:`feeds.history.on_demand.OnDemandHistory.handle_request` (the flow is described in
:mod:`feeds.history.on_demand`)."""

from __future__ import annotations

from typing import Any

import faust

from feeds.history.on_demand import OnDemandHistory

__all__ = ["register_on_demand_agent"]


def register_on_demand_agent(app: faust.App, requests_topic: faust.TopicT,
                           on_demand: OnDemandHistory) -> None:
    """Register the coordinator agent on ``app``.

    Args:
        app: the Faust app.
        requests_topic: the ``history-requests`` topic.
        on_demand: handles each request (starts its fetch task; never raises).
    """

    async def coordinate(stream: Any) -> None:
        async for value in stream:
            await on_demand.handle_request(value)

    app.agent(requests_topic, name="agents.on_demand.coordinate")(coordinate)
