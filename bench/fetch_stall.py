#!/usr/bin/env python
"""Reproduces the consumer-side stall that limits the worker on the local Tansu broker.

No Faust, no marketflow worker: the bench's pre-produced tick messages go to a scratch
topic, then a plain aiokafka consumer reads them back with a simulated processing time per
message (``asyncio.sleep``, so the event loop is idle, like the worker's mostly-idle loop),
once with Faust's hard-coded ``fetch_max_wait_ms=1500``
(``faust/transport/drivers/aiokafka.py``) and once with 100 ms. Run::

    .venv/bin/python bench/fetch_stall.py [--ticks 200000] [--ms-per-message 1.0]

Services must be up (``scripts/services.sh up``); the scratch topic is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from run import load_sample, make_ticks  # bench/run.py

from app.config import load_settings
from app.models import tick_to_json
from feeds.replay import batch_ticks


async def consume(bs: list[str], topic: str, last: dict[int, int], wait_ms: int,
                  busy_s: float) -> tuple[float, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bs, fetch_max_wait_ms=wait_ms,
                         max_partition_fetch_bytes=1 << 20, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(topic, p) for p in last])
        await c.seek_to_beginning()
        done: set[int] = set()
        n = 0
        t0 = time.monotonic()
        while len(done) < len(last):
            got = await c.getmany(timeout_ms=3000, max_records=100)
            for tp, recs in got.items():
                n += len(recs)
                if recs and recs[-1].offset >= last[tp.partition]:
                    done.add(tp.partition)
            await asyncio.sleep(busy_s * sum(len(r) for r in got.values()))
        return time.monotonic() - t0, n
    finally:
        await c.stop()


async def main(args: argparse.Namespace) -> None:
    s = load_settings()
    bs = s.broker.bootstrap_servers
    topic = f"bench-stall-{secrets.token_hex(3)}"
    ticks, _, _ = make_ticks(load_sample(), args.ticks)
    msgs = [m for f in batch_ticks(iter(ticks), 2000, 5000) for m in f]
    admin = AIOKafkaAdminClient(bootstrap_servers=bs)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
        p = AIOKafkaProducer(bootstrap_servers=bs, linger_ms=5, max_batch_size=1 << 20,
                             max_request_size=8 << 20)
        await p.start()
        futs = [await p.send(topic, orjson.dumps([tick_to_json(t) for t in b]),
                             key=k.encode()) for k, b in msgs]
        last: dict[int, int] = {}
        for md in await asyncio.gather(*futs):
            last[md.partition] = max(last.get(md.partition, -1), md.offset)
        await p.stop()
        print(f"{args.ticks:,} ticks in {len(msgs):,} messages on 2 partitions; consumer "
              f"sleeps {args.ms_per_message} ms per message (simulated processing)")
        for wait_ms in (1500, 100):
            secs, n = await consume(bs, topic, last, wait_ms, args.ms_per_message / 1000)
            ideal = n * args.ms_per_message / 1000
            print(f"  fetch_max_wait_ms={wait_ms:>4}: {secs:6.2f} s -> {args.ticks / secs:>9,.0f}"
                  f" ticks/s  (processing alone: {ideal:.2f} s -> "
                  f"{args.ticks / ideal:,.0f} ticks/s)")
    finally:
        await admin.delete_topics([topic])
        await admin.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=200_000)
    ap.add_argument("--ms-per-message", type=float, default=1.0)
    asyncio.run(main(ap.parse_args()))
