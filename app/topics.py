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

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from app import settings
from app.faust_app import app
from app.settings import Settings

__all__ = ["bars_topic", "dead_letter_topic", "ensure_topics", "ticks_topic"]

_raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}

ticks_topic = app.topic(settings.topics.ticks, partitions=settings.topics.partitions, **_raw)
bars_topic = app.topic(settings.topics.bars, partitions=settings.topics.partitions, **_raw)
dead_letter_topic = app.topic(
    settings.topics.dead_letter, partitions=settings.topics.partitions, **_raw
)


async def ensure_topics(s: Settings) -> None:
    """Create the source topics with explicit partition counts when missing.

    Producers outside the worker (replay, feeds) call this before producing, so a
    broker that auto-creates topics (Tansu: 4 partitions) never picks the count.

    Raises:
        aiokafka.errors.KafkaError: the broker is unreachable or refuses.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=s.topics.partitions,
                     replication_factor=s.topics.replication)
            for name in (s.topics.ticks, s.topics.bars, s.topics.dead_letter)
            if name not in existing
        ]
        if wanted:
            resp = await admin.create_topics(wanted)
            for err in getattr(resp, "topic_errors", ()):
                name, code = err[0], err[1]
                # 36 = TOPIC_ALREADY_EXISTS: created concurrently by another process.
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"cannot create topic {name}: {err[2:]}")
    finally:
        await admin.close()
