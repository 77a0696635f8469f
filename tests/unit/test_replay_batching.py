"""Replay ordering and batching (pure parts of feeds.replay.simulator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ReplayError
from core.models import Tick
from feeds.replay.simulator import batch_ticks
from feeds.replay.sources import merge_by_time
from feeds.replay.trade_files import read_trades

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "trades"


def t(ts: int, sym: str = "A") -> Tick:
    return Tick("ex", sym, 1.0, 1.0, ts, None, "replay")


def test_merge_is_time_ordered_and_stable() -> None:
    a = [t(1, "A"), t(3, "A"), t(3, "A2")]
    b = [t(2, "B"), t(3, "B")]
    merged = list(merge_by_time([a, b]))
    assert [x.ts_ms for x in merged] == [1, 2, 3, 3, 3]
    assert [x.symbol for x in merged if x.ts_ms == 3] == ["A", "A2", "B"]


def test_batches_bound_skew_between_keys() -> None:
    ticks = [t(i * 100, "A" if i % 2 else "B") for i in range(100)]
    flushes = list(batch_ticks(ticks, batch_max=1000, batch_span_ms=1000))
    seen = [x for flush in flushes for _, batch in flush for x in batch]
    assert sorted(seen, key=lambda x: x.ts_ms) == ticks  # nothing lost or duplicated
    for flush in flushes:
        tss = [x.ts_ms for _, batch in flush for x in batch]
        assert max(tss) - min(tss) < 1000
        assert all(len({x.symbol for x in batch}) == 1 for _, batch in flush)


def test_batch_max() -> None:
    flushes = list(batch_ticks([t(0)] * 25, batch_max=10, batch_span_ms=10_000))
    assert [sum(len(b) for _, b in f) for f in flushes] == [10, 10, 5]


def test_read_sample_file() -> None:
    ticks = list(read_trades(SAMPLE / "binance_spot_btcusdt_2020-09-27_trades.csv"))
    assert len(ticks) == 1000
    assert ticks[0] == Tick("binance", "BTCUSDT", 10683.02, 0.012474, 1601215442197,
                            "423831297", "replay")


def test_bad_file(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("exchange,symbol\nbinance,BTCUSDT\n")
    with pytest.raises(ReplayError, match="missing column"):
        list(read_trades(p))
    p.write_text("exchange,symbol,trade_id,ts_ms,price,qty\nb,BTC,1,notanumber,1,1\n")
    with pytest.raises(ReplayError, match="notanumber"):
        list(read_trades(p))
