"""Supervised ingest against the real broker and Redis: a parser crash inside a running
exchange feed and a failed publish to Kafka are both restarted by their supervisor
(``feeds/live/supervisor.py``); ingest resumes by itself, no published tick is lost, and
the restarts show in the ingest status that ``/health`` reads and in
``marketflow_feed_restarts_total``."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

import feeds.live.marketflow_tcp as marketflow_tcp
from core.admin import ensure_topics
from core.config import load_settings
from core.models import decode_ticks_payload, tick_objects
from feeds.live.manager import IngestManager
from feeds.live.publisher import TickPublisher
from stores.control import read_ingest_status
from tests.integration.conftest import Stack, until

pytestmark = pytest.mark.integration


def restarts_of(feed: str) -> float:
    return REGISTRY.get_sample_value("marketflow_feed_restarts_total", {"feed": feed}) or 0.0


async def test_a_crashed_feed_and_a_failed_publish_restart_by_themselves(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    (emu,) = await stack.emulators(1, "--rate", "20", "--seed", "7")
    for k, v in {**stack.env, "MARKETFLOW_FEEDS__MODE": "live"}.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    await ensure_topics(settings)
    topic = settings.topics.ticks

    # fault 1, a parser bug: the 50th line parsed raises something the feed does not handle
    parsed = {"n": 0}
    real_parse = marketflow_tcp.parse_line

    def buggy_parse(*args: Any, **kwargs: Any) -> Any:
        parsed["n"] += 1
        if parsed["n"] == 50:
            raise ZeroDivisionError("injected parser bug")
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(marketflow_tcp, "parse_line", buggy_parse)

    # fault 2, the broker refuses the sends of one flush (before anything is written)
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker.bootstrap_servers)
    await producer.start()
    refuse = {"flushes": 0, "armed": False}

    async def send_tick(key: bytes | None, value: bytes) -> Any:
        if refuse["armed"]:
            refuse["armed"] = False
            refuse["flushes"] += 1
            raise KafkaConnectionError("injected: broker refused the connection")
        return await producer.send(topic, value=value, key=key)

    async def send_dead(key: bytes | None, value: bytes) -> Any:
        return await producer.send(settings.topics.dead_letter, value=value, key=key)

    redis = stack.redis()
    feed_before, pub_before = restarts_of(emu.name), restarts_of("publisher")
    manager = IngestManager(settings, TickPublisher(send_tick, send_dead), redis,
                            is_leader=lambda: True, worker_id="test")
    await manager.start()
    try:
        async def feed_restarted() -> bool:
            st = manager.states.get(emu.name)
            return st is not None and st.restarts >= 1 and st.state == "connected"

        await until(feed_restarted, 30, "the feed restarted after the parser bug")
        feed_state = manager.states[emu.name]  # (the states are dropped at stop)
        ticks_at_restart = feed_state.ticks
        refuse["armed"] = True

        async def publisher_restarted() -> bool:
            return (refuse["flushes"] == 1 and manager.publisher_state.restarts >= 1
                    and manager.publisher_state.state == "running")

        await until(publisher_restarted, 30, "the flush restarted after the refused send")

        async def resumed() -> bool:  # ticks keep flowing after both faults
            return feed_state.ticks >= ticks_at_restart + 100

        await until(resumed, 30, "ticks after both faults")

        async def status_shows_restarts() -> Any:
            s = await read_ingest_status(redis, settings.redis.key_prefix)
            return (s and s["feeds"][emu.name]["restarts"] >= 1
                    and s["publisher"]["restarts"] >= 1 and s)

        status = await until(status_shows_restarts, 10, "restarts in the ingest status")
        assert "ZeroDivisionError: injected parser bug" in status["feeds"][emu.name][
            "last_error"]
        assert "not acked" in status["publisher"]["last_error"]
    finally:
        await manager.stop()  # flushes what the feed produced
        await producer.stop()
        await redis.aclose()
    assert restarts_of(emu.name) - feed_before == feed_state.restarts >= 1
    assert restarts_of("publisher") - pub_before == manager.publisher_state.restarts >= 1
    # no loss: every tick the feed handed to the publisher is on the topic, once
    published = feed_state.ticks
    records = await stack.read_topic(topic)
    on_topic = [t for _, v in records for t in tick_objects(decode_ticks_payload(v))]
    assert len(on_topic) == published, (len(on_topic), published)
    keys = [(t["symbol"], t["ts_ms"], t["price"]) for t in on_topic]
    assert len(set(keys)) == len(keys)
