"""Builds the :class:`faust.App` from :mod:`app.config`."""

from __future__ import annotations

from typing import Any

import faust

from app.config import Settings

__all__ = ["MarketflowApp", "app", "faust_options"]


def faust_options(s: Settings) -> dict[str, Any]:
    """Faust settings for ``s``.

    With ``broker.tansu_compat`` the options the local Tansu broker needs are added
    (see ``../shared/reference/broker.md``): 6 s session/rebalance timeout (Tansu makes a
    group join wait half the session timeout), 2 s heartbeat, and one record per produce
    batch (Tansu reports wrong end offsets for multi-record batches, which breaks
    changelog recovery). Production brokers (Redpanda, Kafka) keep Faust's defaults.
    """
    opts: dict[str, Any] = {
        "broker": s.broker.url,
        "store": "memory://",
        "datadir": s.app.datadir,
        "topic_partitions": s.topics.partitions,
        "topic_replication_factor": s.topics.replication,
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "web_bind": s.web.host,
        "web_host": s.web.host,
        "web_port": s.web.port,
        "web_enabled": True,
        "table_standby_replicas": 0,
    }
    if s.broker.tansu_compat:
        opts.update(
            broker_session_timeout=6.0,
            broker_rebalance_timeout=6.0,
            broker_heartbeat_interval=2.0,
            producer_max_batch_size=1,
        )
    return opts


class MarketflowApp(faust.App):
    """:class:`faust.App` that creates its topics (explicit partition counts) before the
    consumer subscribes."""

    async def on_first_start(self) -> None:
        """Create topics first: auto-created ones would get the broker's default count."""
        from app import settings
        from app.admin import ensure_topics

        await super().on_first_start()
        await ensure_topics(settings)


def _make_app() -> faust.App:
    from app import settings

    opts = faust_options(settings)
    return MarketflowApp(settings.app.id, **opts)


app: faust.App = _make_app()
