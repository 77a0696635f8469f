"""Broker faults against real Apache Kafka (issue 10, item 4): the broker SIGKILLed
mid-stream and restarted, and one node of a 3-broker KRaft cluster SIGKILLed mid-replay.
Each test runs its own Kafka (``PrivateKafka``, started by ``scripts/services.sh`` with the
shared broker's settings), so the shared broker is never touched, and checks that every
bar is stored exactly once with the values of a clean computation or the exchange's
klines."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.conftest import (
    PrivateKafka,
    Stack,
    _settings_with,
    assert_bars_equal_klines,
    complete_minutes,
    load_klines,
)
from tests.integration.test_faults_db_and_workers import (
    FILES,
    assert_exactly_once_and_clean,
    assert_no_rewrites,
    clean_bars,
    replay_args,
    wait_all_bars,
)

pytestmark = pytest.mark.integration


def use_broker(stack: Stack, kafka: PrivateKafka, **env: str) -> None:
    """Point ``stack`` (its workers, replays and helpers) at ``kafka``."""
    stack.env.update({"MARKETFLOW_BROKER__URL": kafka.url, **env})
    stack.settings = _settings_with(stack.env)


async def test_broker_sigkill_mid_replay_and_restart(private_kafka: PrivateKafka,
                                                     stack: Stack) -> None:
    """SIGKILL the only broker while the replay publishes and the worker consumes; restart
    it 5 s later on the same log dir. The worker and the replay ride it out (clients
    reconnect, the replay's idempotent producer re-sends what was not acknowledged), and
    every bar is stored once, equal to the clean computation; nothing is dead-lettered."""
    use_broker(stack, private_kafka)
    want = clean_bars(FILES)
    w = stack.worker().start()
    await w.wait_ready()
    replay = asyncio.create_task(stack.replay_cli(
        *replay_args("--speed", "30", "--batch-span-ms", "200"), timeout=300))
    await asyncio.sleep(6)
    assert not replay.done()
    before = await wait_all_bars_partial(stack)
    private_kafka.kill()
    await asyncio.sleep(5)
    w.assert_alive()
    out = await private_kafka.up()
    assert "started Apache Kafka" in out, out
    await replay
    rows = await wait_all_bars(stack, want, timeout_s=120)
    assert before < len(want)  # the kill really was mid-stream
    assert_exactly_once_and_clean(rows, want)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w.assert_alive()


async def wait_all_bars_partial(stack: Stack) -> int:
    """Number of bars stored so far."""
    conn = await stack.db()
    try:
        return int(await conn.fetchval("SELECT count(*) FROM bars_1m"))
    finally:
        await conn.close()


async def _topic_replication(kafka: PrivateKafka, topics: list[str]
                             ) -> dict[str, tuple[int, str]]:
    """``{topic: (replicas of partition 0, min.insync.replicas)}``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.url.removeprefix("kafka://").replace(";", ","))
    await admin.start()
    try:
        meta = await admin.describe_topics(topics)
        resp = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, ["min.insync.replicas"])
             for t in topics])
    finally:
        await admin.close()
    isr: dict[str, str] = {}
    for r in resp:
        for res in r.resources:
            # (error_code, error_message, resource_type, resource_name, configs)
            for entry in res[4]:
                if entry[0] == "min.insync.replicas":
                    isr[res[3]] = entry[1]
    return {t["topic"]: (len(t["partitions"][0]["replicas"]), isr.get(t["topic"], "?"))
            for t in meta}


async def test_three_broker_cluster_survives_a_broker_kill(kafka_cluster: PrivateKafka,
                                                           stack: Stack) -> None:
    """A 3-node KRaft cluster, topics and changelogs with replication 3 and
    ``min.insync.replicas=2``, producers with ``acks=all``. One broker is SIGKILLed
    mid-replay (and stays down): the pipeline continues on the other two, and every bar is
    stored once and equal to the exchange's klines."""
    use_broker(stack, kafka_cluster, MARKETFLOW_TOPICS__REPLICATION="3")
    usdm = "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
    klines = load_klines("binance_usdm_btcusdt_2024-08-08T2353_klines_1m.csv")
    minutes, rows = complete_minutes(usdm, klines)
    want = clean_bars(FILES)
    w = stack.worker().start()
    await w.wait_ready(timeout=90)
    changelog = f"{stack.settings.app.id}-window-state-changelog"
    s = stack.settings.topics
    topics = [s.ticks, s.bars, s.dead_letter, changelog]
    repl = await _topic_replication(kafka_cluster, topics)
    assert repl == {t: (3, "2") for t in topics}, repl
    replay = asyncio.create_task(stack.replay_cli(
        *replay_args("--speed", "30", "--batch-span-ms", "200"), timeout=300))
    await asyncio.sleep(6)
    assert not replay.done()
    before = await wait_all_bars_partial(stack)
    kafka_cluster.kill(2)
    await replay
    stored = await wait_all_bars(stack, want, timeout_s=120)
    assert before < len(want)  # the kill really was mid-replay
    assert_exactly_once_and_clean(stored, want)
    bars = await stack.bars("binance-usdm", "BTCUSDT")
    assert_bars_equal_klines(bars, klines, minutes)
    assert sum(b["trade_count"] for b in bars.values()) == len(rows)
    await assert_no_rewrites(stack)
    assert await stack.read_topic(stack.settings.topics.dead_letter, idle_s=1.0) == []
    w.assert_alive()
