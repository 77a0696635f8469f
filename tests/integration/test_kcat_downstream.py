"""A standard client downstream (issue 10, item 7): Debian's ``kcat`` (librdkafka) reads
the closed-bars topic from the shared Apache Kafka broker, and its keys and values match the
bars in TimescaleDB."""

from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal

import orjson
import pytest

from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration

KCAT = shutil.which("kcat") or "/usr/bin/kcat"
TRADES = ("binance_usdm_btcusdt_2024-08-08T2354_trades.csv",
          "binance_spot_ethusdt_2024-08-08T2354_trades.csv")
#: record separator kcat prints between records (not in any JSON value or key)
_SEP = "\x1e"


async def _kcat(stack: Stack, topic: str) -> list[tuple[str, dict[str, object], int]]:
    """Every record of ``topic`` as ``(key, JSON value, partition)``, read by kcat from the
    beginning to the end (``-e``) as a plain consumer."""
    proc = await asyncio.create_subprocess_exec(
        KCAT, "-C", "-b", ",".join(stack.settings.broker.bootstrap_servers), "-t", topic,
        "-o", "beginning", "-e", "-q", "-f", f"%k\t%p\t%s{_SEP}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    records = []
    for rec in out.decode().split(_SEP):
        if rec.strip():
            key, part, value = rec.split("\t", 2)
            records.append((key, orjson.loads(value), int(part)))
    return records


async def test_kcat_reads_the_bars_topic(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", *(str(SAMPLE / "trades" / f) for f in TRADES))
    # the topic and the table converge (the sink writes what the topic carries)
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        want = {}
        for exchange, symbol in (("binance-usdm", "BTCUSDT"), ("binance", "ETHUSDT")):
            rows = await stack.bars(exchange, symbol)
            want.update({(exchange, symbol, m): r for m, r in rows.items()})
        records = await _kcat(stack, stack.settings.topics.bars)
        got = {(v["exchange"], v["symbol"], v["bucket_start_ms"]) for _, v, _ in records}
        if (want and got == set(want)) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(1)
    assert len(want) >= 10
    assert got == set(want)
    partitions = {}
    for key, bar, part in records:
        assert key == f"{bar['exchange']}:{bar['symbol']}"  # keyed like the ticks
        partitions.setdefault(key, set()).add(part)
        row = want[(bar["exchange"], bar["symbol"], bar["bucket_start_ms"])]
        assert bar["bucket_end_ms"] == bar["bucket_start_ms"] + 60_000
        for f in ("open", "high", "low", "close", "trade_count", "open_ts_ms",
                  "close_ts_ms"):
            assert bar[f] == row[f], (key, bar["bucket_start_ms"], f)
        for f in ("volume", "quote_volume", "vwap"):  # exact decimal strings
            assert Decimal(bar[f]) == row[f], (key, f)
    assert all(len(p) == 1 for p in partitions.values())  # one partition per key
    w.assert_alive()
