"""Every topic marketflow uses, declared once.

* ``ticks`` — key ``"<exchange>:<symbol>"``, value one tick or a JSON array of ticks of
  that key (schema in :mod:`core.models`).
* closed bars (``bars-1m``) — key ``"<exchange>:<symbol>"``, value one closed bar (schema
  in :func:`tables.window.finalize_bar` and the README).
* dead letter — key ``"<exchange>:<symbol>"`` when known, value
  :func:`core.models.dead_letter_message`.
* history requests (``history-requests``) — key ``"<exchange>:<symbol>"``, value
  ``{"request_id", "exchange", "symbol", "start_ms", "end_ms"}``: on-demand fetches for
  the coordinator (:mod:`agents.history`).
* dynamic ``<history.topic_prefix>.<exchange>.<symbol>`` topics (one partition) are
  created and deleted at runtime by the coordinator, not declared here; see
  :func:`agents.history.dynamic_topic_name`.

All carry raw bytes: marketflow encodes and decodes JSON itself (orjson), so a malformed
value reaches our validation instead of failing inside Faust's deserializer.
"""

from __future__ import annotations

from faust.types import TopicT

from app import settings
from app.faust_app import app

__all__ = ["bars_topic", "dead_letter_topic", "history_requests_topic", "ticks_topic"]


def _raw_topic(name: str) -> TopicT:
    return app.topic(name, partitions=settings.topics.partitions, key_type=bytes,
                     value_type=bytes, key_serializer="raw", value_serializer="raw")


ticks_topic = _raw_topic(settings.topics.ticks)
bars_topic = _raw_topic(settings.topics.bars)
dead_letter_topic = _raw_topic(settings.topics.dead_letter)
history_requests_topic = _raw_topic(settings.topics.history_requests)
