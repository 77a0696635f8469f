"""Topic administration through the broker's admin API (aiokafka), no Faust needed."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from core.config import Settings
from core.errors import ConfigError
from core.kafka_security import check_security, client_security
from core.models import MAX_MESSAGE_BYTES

__all__ = ["TICKS_TOPIC_MAX_MESSAGE_BYTES", "create_topic", "delete_topics", "ensure_topics"]

#: the ticks topic's ``max.message.bytes``: 1 MiB above what the worker accepts
TICKS_TOPIC_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES + (1 << 20)


async def ensure_topics(s: Settings) -> None:
    """Create the ticks, closed-bars, dead-letter and history-request topics with explicit
    partition counts.

    Runs before the worker subscribes and before any producer publishes, so a broker that
    auto-creates topics (with its own ``num.partitions``) never picks the count. The ticks
    topic accepts messages up to ``TICKS_TOPIC_MAX_MESSAGE_BYTES`` (the broker default is
    1 MiB).

    Raises:
        ConfigError: a topic exists with a different partition count than configured,
            or the broker refused the security settings (:func:`check_security`).
        aiokafka.errors.KafkaError: the broker is unreachable or refuses.
    """
    names = (s.topics.ticks, s.topics.bars, s.topics.dead_letter, s.topics.history_requests)
    # ticks: room above MAX_MESSAGE_BYTES, so the worker (not the broker's 1 MiB default)
    # refuses an oversized message, with a dead letter saying so
    configs = {s.topics.ticks: {"max.message.bytes": str(TICKS_TOPIC_MAX_MESSAGE_BYTES)}}
    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker.bootstrap_servers,
                                **client_security(s.broker))
    try:
        await admin.start()
    except KafkaConnectionError:
        await admin.close()
        if s.broker.security_protocol != "PLAINTEXT":
            await check_security(s.broker)  # refused credentials: say so, don't retry
        raise
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=s.topics.partitions,
                     replication_factor=s.topics.replication,
                     topic_configs=configs.get(name, {}))
            for name in names if name not in existing
        ]
        if wanted:
            resp = await admin.create_topics(wanted)
            for err in getattr(resp, "topic_errors", ()):
                name, code = err[0], err[1]
                # TOPIC_ALREADY_EXISTS: created concurrently by another process.
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"cannot create topic {name}: {err[2:]}")
        meta = await admin.describe_topics(list(names))
        for t in meta:
            n = len(t.get("partitions", ()))
            if n and n != s.topics.partitions:
                raise ConfigError(
                    f"topic {t['topic']!r} has {n} partitions but topics.partitions = "
                    f"{s.topics.partitions}; use a new topic name or recreate the topic"
                )
    finally:
        await admin.close()


async def create_topic(s: Settings, name: str, partitions: int = 1) -> bool:
    """Create topic ``name`` (a dynamic topic); False when it already existed.

    Raises:
        aiokafka.errors.KafkaError: the broker is unreachable or refuses.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker.bootstrap_servers,
                                **client_security(s.broker))
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=s.topics.replication)])
        for err in getattr(resp, "topic_errors", ()):
            code = err[1]
            if code == TopicAlreadyExistsError.errno:
                return False
            if code != 0:
                raise for_code(code)(f"cannot create topic {name}: {err[2:]}")
        return True
    finally:
        await admin.close()


async def delete_topics(s: Settings, names: list[str]) -> None:
    """Delete topics (dynamic topics whose work is done).

    Raises:
        aiokafka.errors.KafkaError: the broker is unreachable or refuses.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker.bootstrap_servers,
                                **client_security(s.broker))
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()
