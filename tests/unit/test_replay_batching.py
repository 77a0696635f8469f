"""Replay ordering and batching (pure parts of feeds.replay.simulator)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ReplayError
from core.models import Tick
from feeds.replay.simulator import batch_columns, batch_ticks
from feeds.replay.sources import FileSource, merge_by_time, merge_columns
from feeds.replay.trade_files import TradeColumns, chunk_ticks, read_trades

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


# ---- the columnar path: same flushes and merge as the per-tick reference ----------------

def reference_batches(ticks: list[Tick], batch_max: int, span_ms: int
                      ) -> list[list[tuple[str, list[Tick]]]]:
    """The flush rule tick by tick (what the replay did before the columnar path)."""
    out: list[list[tuple[str, list[Tick]]]] = []
    buffers: dict[str, list[Tick]] = {}
    oldest: int | None = None
    count = 0
    for x in ticks:
        if oldest is not None and (x.ts_ms - oldest >= span_ms or count >= batch_max):
            out.append(list(buffers.items()))
            buffers, oldest, count = {}, None, 0
        buffers.setdefault(x.key, []).append(x)
        oldest = x.ts_ms if oldest is None else oldest
        count += 1
    if buffers:
        out.append(list(buffers.items()))
    return out


_gaps = st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, 2, 7, 40]), st.sampled_from("ABC"),
                           st.sampled_from(["ex1", "ex2"])), min_size=1, max_size=300)


def _ticks(rows: list[tuple[int, str, str]], file: int = 0) -> list[Tick]:
    ts = 1_700_000_000_000
    out = []
    for i, (gap, sym, ex) in enumerate(rows):
        ts += gap
        out.append(Tick(ex, sym, 1.0 + i, 0.5 * i, ts, f"{file}-{i}", "replay"))
    return out


def _chunked(ticks: list[Tick], cuts: list[int]) -> list[TradeColumns]:
    bounds = sorted({0, len(ticks), *(c % (len(ticks) + 1) for c in cuts)})
    return [chunk for a, b in pairwise(bounds)
            for chunk in chunk_ticks(ticks[a:b])]


@settings(max_examples=300, deadline=None)
@given(_gaps, st.integers(1, 50), st.integers(1, 200), st.lists(st.integers(0, 300)))
def test_batch_columns_equals_the_per_tick_rule(rows: list[tuple[int, str, str]],
                                                 batch_max: int, span_ms: int,
                                                 cuts: list[int]) -> None:
    ticks = _ticks(rows)
    got = [[(b.key, b.ticks()) for b in flush]
           for flush in batch_columns(_chunked(ticks, cuts), batch_max, span_ms)]
    assert got == reference_batches(ticks, batch_max, span_ms)
    assert list(batch_ticks(ticks, batch_max, span_ms)) == got


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_gaps, st.lists(st.integers(0, 300))), min_size=1, max_size=4))
def test_merge_columns_equals_heap_merge(
        files: list[tuple[list[tuple[int, str, str]], list[int]]]) -> None:
    streams = [_ticks(rows, i) for i, (rows, _) in enumerate(files)]
    got = [t for c in merge_columns([_chunked(s, cuts)
                                     for s, (_, cuts) in zip(streams, files, strict=True)])
           for t in c.ticks()]
    assert got == list(merge_by_time(streams))


def test_file_source_chunks_skip_and_rename() -> None:
    path = SAMPLE / "binance_spot_btcusdt_2020-09-27_trades.csv"
    ticks = list(read_trades(path))
    mid = ticks[len(ticks) // 2].ts_ms
    src = FileSource([path, path], "ns")
    pos, chunks = src.chunks(mid)
    got = [t for c in chunks for t in c.ticks()]
    want = [t._replace(exchange=f"ns.{t.exchange}")
            for t in merge_by_time([ticks, ticks]) if t.ts_ms >= mid]
    assert got == want
    assert pos == 2 * len(ticks) - len(want) > 0
