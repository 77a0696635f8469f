"""Every topic marketflow uses, declared once (:func:`declare_topics`).

* ``ticks`` — key ``"<exchange>:<symbol>"``, value one tick or a JSON array of ticks of
  that key (schema in :mod:`core.models`).
* closed bars (``bars-1m``) — key ``"<exchange>:<symbol>"``, value one closed bar (schema
  in :mod:`core.models`).
* dead letter — key ``"<exchange>:<symbol>"`` when known, value
  :func:`core.models.dead_letter_message`.
* history requests (``history-requests``) — key ``"<exchange>:<symbol>"``, value
  ``{"request_id", "exchange", "symbol", "start_ms", "end_ms"}``: on-demand fetches for
  the coordinator (:mod:`agents.on_demand`).
* dynamic ``<history.topic_prefix>.<exchange>.<symbol>`` topics (one partition) are
  created and deleted at runtime by the coordinator, not declared here; see
  :func:`feeds.history.on_demand.dynamic_topic_name`.

All carry raw bytes: marketflow encodes and decodes JSON itself (orjson), so a malformed
value reaches our validation instead of failing inside Faust's deserializer. Partition
counts and creation: :func:`core.admin.ensure_topics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from core.config import Settings

__all__ = ["Topics", "declare_topics"]


@dataclass(frozen=True)
class Topics:
    """The declared topics of one app (module docstring)."""

    ticks: TopicT
    bars: TopicT
    dead_letter: TopicT
    history_requests: TopicT


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    """Declare every topic on ``app`` (names and partition counts from ``[topics]``)."""

    def raw(name: str) -> TopicT:
        return app.topic(name, partitions=settings.topics.partitions, key_type=bytes,
                         value_type=bytes, key_serializer="raw", value_serializer="raw")

    t = settings.topics
    return Topics(ticks=raw(t.ticks), bars=raw(t.bars), dead_letter=raw(t.dead_letter),
                  history_requests=raw(t.history_requests))
