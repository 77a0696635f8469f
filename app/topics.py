"""Every topic marketflow uses, declared once.

* ``ticks`` — key ``"<exchange>:<symbol>"``, value one tick or a JSON array of ticks of
  that key (schema in :mod:`app.models`).
* closed bars (``bars-1m``) — key ``"<exchange>:<symbol>"``, value one closed bar (schema
  in :func:`tables.window.finalize_bar` and the README).
* dead letter — key ``"<exchange>:<symbol>"`` when known, value
  :func:`app.models.dead_letter_message`.

All carry raw bytes: marketflow encodes and decodes JSON itself (orjson), so a malformed
value reaches our validation instead of failing inside Faust's deserializer.
"""

from __future__ import annotations

from app import settings
from app.faust_app import app

__all__ = ["bars_topic", "dead_letter_topic", "ticks_topic"]

_raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}

ticks_topic = app.topic(settings.topics.ticks, partitions=settings.topics.partitions, **_raw)
bars_topic = app.topic(settings.topics.bars, partitions=settings.topics.partitions, **_raw)
dead_letter_topic = app.topic(
    settings.topics.dead_letter, partitions=settings.topics.partitions, **_raw
)
