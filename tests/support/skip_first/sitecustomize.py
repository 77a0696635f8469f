"""Fault injection for one test (``tests/integration/test_faults_db_and_workers.py``): with
``MF_TEST_SKIP_FIRST=N`` and ``MF_TEST_SKIP_TOPICS=<topic>[,<topic>...]`` set, a worker
started with this directory on ``PYTHONPATH`` has its Faust streams skip the first ``N``
records of every partition of those topics after each assignment.

The records take Faust's own skip path: they are built with a generation id that is not
the app's (``faust/streams.py`` skips them, "Skipping message ... generation_id"), so the
consumer counts them as read and never fetches them again, as with the skips seen after
rebalances. Each skip is printed to stderr as ``injected skip <topic>[<p>]@<offset>``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_N = int(os.environ.get("MF_TEST_SKIP_FIRST", "0") or 0)
_TOPICS = frozenset(t for t in os.environ.get("MF_TEST_SKIP_TOPICS", "").split(",") if t)


def _install(driver: ModuleType) -> None:
    remaining: dict[tuple[str, int], int] = {}
    assigned = driver.ConsumerRebalanceListener.on_partitions_assigned
    to_message = driver.Consumer._to_message

    async def on_partitions_assigned(self: Any, tps: Any) -> None:
        for tp in tps:
            if tp.topic in _TOPICS:
                remaining[tp.topic, tp.partition] = _N
        await assigned(self, tps)

    def _to_message(self: Any, tp: Any, record: Any) -> Any:
        msg = to_message(self, tp, record)
        key = (record.topic, record.partition)
        if remaining.get(key, 0) > 0:
            remaining[key] -= 1
            msg.generation_id = -1
            print(f"injected skip {record.topic}[{record.partition}]@{record.offset}",
                  file=sys.stderr, flush=True)
        return msg

    driver.ConsumerRebalanceListener.on_partitions_assigned = on_partitions_assigned
    driver.Consumer._to_message = _to_message


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches Faust's aiokafka driver once it is imported (importing Faust here would
    break ``python -m faust``: Faust replaces its package module with a lazy one)."""

    NAME = "faust.transport.drivers.aiokafka"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _install(module)

        loader.exec_module = exec_and_patch
        return spec


if _N > 0 and _TOPICS:
    sys.meta_path.insert(0, _PatchOnImport())
