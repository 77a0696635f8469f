"""The peer side of ``bench/run.py --peer quix``: a Quix Streams application computing
the same 1-minute OHLCV windows as marketflow from the same ``ticks`` messages.

Runs in its own virtualenv (``bench/peers/requirements.txt``; ``bench/run.py`` makes it),
not in marketflow's: Quix Streams brings confluent-kafka and RocksDB. Prints one JSON
line of figures on stdout.

The application: ``ticks`` messages (a columnar batch of ticks of one ``exchange:symbol``,
as ``core/models.py`` ``encode_ticks`` writes them, or a JSON array of ticks; the worker's
control messages are skipped) are expanded into one row per tick (``apply(expand=True)``),
stamped with the tick's ``ts_ms`` (``set_timestamp``), and aggregated in a tumbling 60 s
window with the bench's grace: open / high / low / close of ``price``, sum of ``qty``,
count, emitted once per closed window (``.final()``). It stops when every partition's last
offset was processed (``on_message_processed``).

Usage: ``python quix_ohlcv.py BROKER TOPIC GROUP GRACE_MS LAST_OFFSETS_JSON STATE_DIR``
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from quixstreams import Application
from quixstreams.dataframe.windows import Count, First, Last, Max, Min, Sum


def rows(value: Any) -> list[dict[str, Any]]:
    """The ticks of one message: a columnar batch expanded into one row per tick, an array
    of ticks as it is; nothing for the worker's own control messages (idle checks)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value.get("layout") == "columns":
        qty = value.get("qty") or [0.0] * len(value["price"])
        return [{"price": p, "qty": q, "ts_ms": t}
                for p, q, t in zip(value["price"], qty, value["ts_ms"], strict=True)]
    return []


def main() -> int:
    """Run the application; print ``{"t_launch", "t_first", "t_last", "ticks",
    "windows"}`` (``time.time()`` seconds; ``ticks`` rows aggregated, ``windows``
    closed windows emitted)."""
    broker, topic_name, group, grace_ms, last_json, state_dir = sys.argv[1:7]
    t_launch = time.time()
    last = {int(p): int(o) for p, o in json.loads(last_json).items()}
    pending = dict(last)
    fig: dict[str, Any] = {"t_launch": t_launch, "t_first": None, "t_last": None,
                           "ticks": 0, "windows": 0}
    app: Application | None = None

    def processed(topic: str, partition: int, offset: int) -> None:
        if fig["t_first"] is None:
            fig["t_first"] = time.time()
        if partition in pending and offset >= pending[partition]:
            del pending[partition]
            if not pending:
                fig["t_last"] = time.time()
                assert app is not None
                app.stop()

    app = Application(broker_address=broker, consumer_group=group,
                      auto_offset_reset="earliest", state_dir=state_dir,
                      on_message_processed=processed, loglevel="WARNING")
    topic = app.topic(topic_name, value_deserializer="json")
    sdf = app.dataframe(topic)
    sdf = sdf.apply(rows, expand=True)
    sdf = sdf.set_timestamp(lambda value, key, ts, headers: value["ts_ms"])

    def count_tick(value: dict[str, Any]) -> None:
        fig["ticks"] += 1

    sdf = sdf.update(count_tick)
    windows = sdf.tumbling_window(duration_ms=60_000, grace_ms=int(grace_ms)).agg(
        open=First("price"), high=Max("price"), low=Min("price"), close=Last("price"),
        volume=Sum("qty"), count=Count()).final()

    def count_window(value: dict[str, Any]) -> None:
        fig["windows"] += 1

    windows.update(count_window)
    app.run()
    print(json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
