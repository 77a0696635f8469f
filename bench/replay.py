#!/usr/bin/env python3
"""Replay throughput per trade-file format: file -> ``ticks`` topic at full speed.

Builds one input of ``--copies`` x the real USD-M sample (21,313 trades of
``data/sample/trades/binance_usdm_btcusdt_2024-08-08T2354_trades.csv``, each copy shifted
by the sample's span in time and in trade id) in every format of
``feeds/replay/trade_files.py``, then for each format prints: the rows read per second by
the reader alone (:func:`feeds.replay.trade_files.read_trades`, ticks built), and the
ticks per second of :func:`feeds.replay.simulator.replay_source` at speed 0 publishing them
to a fresh ``ticks`` topic on the real broker (no worker; no Redis control). Run it on the
services of ``scripts/services.sh`` (``bench/README.md``)::

    .venv/bin/python bench/replay.py                 # 20 copies: 426,260 trades
    .venv/bin/python bench/replay.py --copies 100 --formats marketflow-csv,parquet
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import io
import os
import platform
import resource
import secrets
import tempfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import REPO, say  # puts the repository root on sys.path

from core.config import load_settings
from core.kafka_security import client_security
from feeds.replay.simulator import replay_source
from feeds.replay.sources import FileSource
from feeds.replay.trade_files import read_trades
from tests.support.harness import delete_topics

SOURCE = REPO / "data" / "sample" / "trades" / "binance_usdm_btcusdt_2024-08-08T2354_trades.csv"
FORMATS = ("marketflow-csv", "binance-zip-ms", "binance-zip-us", "tardis-gz", "parquet")


def tiled_rows(copies: int) -> list[tuple[str, int, str, str, bool]]:
    """``(trade_id, ts_ms, price, qty, is_buyer_maker)`` of ``copies`` shifted copies."""
    with SOURCE.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    first, last = int(rows[0]["ts_ms"]), int(rows[-1]["ts_ms"])
    span_ms = (last - first) // 60_000 * 60_000 + 120_000
    id0, id_span = int(rows[0]["trade_id"]), len(rows) + 1
    return [(str(int(r["trade_id"]) - id0 + 1 + c * id_span), int(r["ts_ms"]) + c * span_ms,
             r["price"], r["qty"], r["is_buyer_maker"] == "True")
            for c in range(copies) for r in rows]


def write_inputs(rows: list[tuple[str, int, str, str, bool]], out: Path) -> dict[str, Path]:
    """The rows in every format (exchange ``bench``, symbol ``BTCUSDT``)."""
    files: dict[str, Path] = {}

    def text(header: list[str] | None, body: object) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(body)  # type: ignore[arg-type]
        return buf.getvalue()

    files["marketflow-csv"] = out / "trades.csv"
    files["marketflow-csv"].write_text(text(
        ["exchange", "market", "symbol", "trade_id", "ts_ms", "price", "qty",
         "is_buyer_maker"],
        (("bench", "usdm", "BTCUSDT", i, ts, p, q, m) for i, ts, p, q, m in rows)))
    for name, scale, header in (("binance-zip-ms", 1, True), ("binance-zip-us", 1000, False)):
        body = text(["id", "price", "qty", "quote_qty", "time", "is_buyer_maker"]
                    if header else None,
                    ((i, p, q, "0", ts * scale, str(m).lower()) for i, ts, p, q, m in rows))
        path = out / name / "BTCUSDT-trades-2024-08-08.zip"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("BTCUSDT-trades-2024-08-08.csv", body)
        files[name] = path
    files["tardis-gz"] = out / "bench_trades_2024-08-08_BTCUSDT.csv.gz"
    files["tardis-gz"].write_bytes(gzip.compress(text(
        ["exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price",
         "amount"],
        (("bench", "BTCUSDT", ts * 1000, ts * 1000, i, "sell" if m else "buy", p, q)
         for i, ts, p, q, m in rows)).encode(), compresslevel=6))
    files["parquet"] = out / "trades.parquet"
    pq.write_table(pa.table({
        "exchange": ["bench"] * len(rows), "symbol": ["BTCUSDT"] * len(rows),
        "trade_id": [r[0] for r in rows], "ts_ms": [r[1] for r in rows],
        "price": [r[2] for r in rows], "qty": [r[3] for r in rows]}), files["parquet"],
        compression="zstd")
    return files


async def replay_once(path: Path, suffix: str) -> tuple[int, float, float, float]:
    """Publish ``path`` to a fresh topic: ``(ticks, wall s of the replay, wall s from
    opening the file (its scan included), CPU s of this process)``."""
    prefix = f"bench-replay-{secrets.token_hex(4)}"
    os.environ["MARKETFLOW_TOPICS__TICKS"] = f"{prefix}-{suffix}"
    for var, name in (("MARKETFLOW_TOPICS__BARS", "bars"),
                      ("MARKETFLOW_TOPICS__DEAD_LETTER", "dlq"),
                      ("MARKETFLOW_TOPICS__HISTORY_REQUESTS", "history")):
        os.environ[var] = f"{prefix}-{name}"
    settings = load_settings()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        stats = await replay_source(settings, FileSource([path], ""), speed=0.0,
                                    control=False, signals=False)
        whole_s = time.perf_counter() - t0
    finally:
        await delete_topics(settings.broker.bootstrap_servers, prefix,
                            client_security(settings.broker))
    return stats.ticks, stats.seconds, whole_s, time.process_time() - cpu0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    chosen = [f for f in args.formats.split(",") if f]
    unknown = set(chosen) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; known: {FORMATS}")
    say(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    rows = tiled_rows(args.copies)
    say(f"input: {len(rows):,} trades ({args.copies} x {SOURCE.name})")
    with tempfile.TemporaryDirectory(prefix="marketflow-bench-replay-") as tmp:
        files = write_inputs(rows, Path(tmp))
        say("| format | file size | read: ticks/s | replay to topic: ticks/s | same, with "
            "the file's scan: ticks/s | replay CPU s |")
        say("|---|---|---|---|---|---|")
        for name in chosen:
            path = files[name]
            t0 = time.perf_counter()
            n = sum(1 for _ in read_trades(path))
            read_s = time.perf_counter() - t0
            assert n == len(rows), (name, n)
            ticks, wall_s, whole_s, cpu_s = await replay_once(path, name)
            assert ticks == len(rows), (name, ticks)
            say(f"| {name} | {path.stat().st_size / 2**20:.1f} MiB | {n / read_s:,.0f} | "
                f"{ticks / wall_s:,.0f} | {ticks / whole_s:,.0f} | {cpu_s:.1f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say(f"bench process peak RSS: {peak:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
