"""Tick decoding and validation."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidTick
from core.models import (
    MAX_MESSAGE_BYTES,
    MIN_TS_MS,
    Tick,
    control_message,
    dead_letter_message,
    decode_ticks_payload,
    encode_ticks,
    parse_tick,
    parse_ticks,
    tick_objects,
    tick_to_json,
)

NOW = 1_732_170_000_000
GOOD = {"exchange": "binance", "symbol": "BTCUSDT", "price": 61837.63, "qty": 0.02,
        "ts_ms": 1_723_161_255_342, "trade_id": "3735683259", "source": "replay"}


def reason(obj: object) -> str:
    with pytest.raises(InvalidTick) as ei:
        parse_tick(obj, NOW, 300_000)
    return ei.value.reason


def test_good_tick_round_trips() -> None:
    t = parse_tick(GOOD, NOW, 300_000)
    assert t.price == 61837.63 and t.ts_ms == 1_723_161_255_342 and t.key == "binance:BTCUSDT"
    assert parse_tick(tick_to_json(t), NOW, 300_000) == t


def test_decode_single_array_and_control() -> None:
    assert decode_ticks_payload(orjson.dumps(GOOD)) == [GOOD]
    assert decode_ticks_payload(orjson.dumps([GOOD, GOOD])) == [GOOD, GOOD]
    assert decode_ticks_payload(b'{"control":"idle_check","wall_ms":1}')["control"] == (
        "idle_check")


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "empty"),
    (None, "empty"),
    (b"{not json", "invalid_json"),
    (b'"a string"', "not_object"),
    (b"42", "not_object"),
    (b"[" + b" " * MAX_MESSAGE_BYTES + b"]", "oversized"),
])
def test_bad_payloads(raw: bytes | None, why: str) -> None:
    with pytest.raises(InvalidTick) as ei:
        decode_ticks_payload(raw)
    assert ei.value.reason == why


@pytest.mark.parametrize(("change", "why"), [
    ({"price": None}, "missing_field"),
    ({"symbol": None}, "missing_field"),
    ({"ts_ms": None}, "missing_field"),
    ({"price": "61837.63"}, "bad_type"),
    ({"price": True}, "bad_type"),
    ({"price": 0}, "bad_price"),
    ({"price": -1.5}, "bad_price"),
    ({"price": math.nan}, "bad_price"),
    ({"price": math.inf}, "bad_price"),
    ({"qty": -1}, "bad_qty"),
    ({"qty": "1"}, "bad_type"),
    ({"ts_ms": "1723161255342"}, "bad_type"),
    ({"ts_ms": 1.5}, "bad_type"),
    ({"ts_ms": 1_723_161_255}, "ts_too_old"),  # seconds, not milliseconds
    ({"ts_ms": NOW + 300_001}, "ts_in_future"),
    ({"exchange": "bin:ance"}, "bad_name"),
    ({"symbol": ""}, "bad_name"),
    ({"symbol": 5}, "bad_type"),
    ({"source": "prod"}, "bad_source"),
    ({"source": ["live"]}, "bad_source"),  # unhashable: an InvalidTick, not a TypeError
    ({"source": {"live": 1}}, "bad_source"),
    ({"trade_id": [1]}, "bad_type"),
])
def test_bad_ticks(change: dict, why: str) -> None:
    obj = {**GOOD, **change}
    obj = {k: v for k, v in obj.items() if v is not None}
    assert reason(obj) == why


def test_not_an_object() -> None:
    assert reason([1, 2]) == "not_object"


def test_optional_fields() -> None:
    t = parse_tick({k: v for k, v in GOOD.items() if k not in ("qty", "trade_id", "source")},
                   NOW, 300_000)
    assert t.qty == 0.0 and t.trade_id is None and t.source == "live"
    assert parse_tick({**GOOD, "ts_ms": NOW + 300_000}, NOW, 300_000).ts_ms == NOW + 300_000


def test_dead_letter_keeps_payload_and_reason() -> None:
    msg = orjson.loads(dead_letter_message(b"\xff{bad", "invalid_json", "x", 1, 42, NOW))
    assert msg["reason"] == "invalid_json" and msg["source_offset"] == 42
    assert msg["payload"].endswith("{bad")
    msg = orjson.loads(dead_letter_message({"price": -1}, "bad_price", "d", 0, 1, NOW))
    assert msg["payload"] == {"price": -1}


def _one_by_one(objs: list[object]) -> tuple[list[Tick], list[tuple[object, str, str]]]:
    """The reference: parse_tick on each object, the errors as (object, reason, detail)."""
    ticks, bad = [], []
    for obj in objs:
        try:
            ticks.append(parse_tick(obj, NOW, 300_000))
        except InvalidTick as exc:
            bad.append((obj, exc.reason, exc.detail))
    return ticks, bad


_ABSENT = object()
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_ODD = st.sampled_from([None, True, False, "1", [1], {"a": 1}, 1.5])
_FIELDS = {
    "exchange": st.one_of(st.sampled_from(["binance", "kraken", "bin:ance", "", "x" * 80]),
                          _ODD, st.just(_ABSENT)),
    "symbol": st.one_of(st.sampled_from(["BTCUSDT", "ETHUSDT", "", "BTC USDT"]), _ODD,
                        st.just(_ABSENT)),
    "price": st.one_of(_FLOATS, st.integers(-2, 10**6), _ODD, st.just(_ABSENT)),
    "qty": st.one_of(_FLOATS, st.integers(-2, 10**6), _ODD, st.just(_ABSENT)),
    "ts_ms": st.one_of(
        st.sampled_from([MIN_TS_MS - 1, MIN_TS_MS, NOW + 300_000, NOW + 300_001,
                         float(NOW), 1_723_161_255_342]),
        st.integers(MIN_TS_MS - 10, NOW + 300_010), _ODD, st.just(_ABSENT)),
    "trade_id": st.one_of(st.sampled_from(["3735683259", "abc", 42]), _ODD, st.just(_ABSENT)),
    "source": st.one_of(st.sampled_from(["live", "replay", "test", "prod"]), _ODD,
                        st.just(_ABSENT)),
    "recv_ms": st.one_of(st.integers(0, NOW), _ODD, st.just(_ABSENT)),
}


@st.composite
def _tick_objects(draw: st.DrawFn) -> object:
    """A decoded tick object: mostly GOOD with a few fields changed, sometimes not a dict."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(_ODD, st.lists(st.integers(), max_size=2)))
    obj = dict(GOOD)
    for name in draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=3)):
        value = draw(_FIELDS[name])
        if value is _ABSENT:
            obj.pop(name, None)
        else:
            obj[name] = value
    return obj


@settings(max_examples=300, deadline=None)
@given(st.lists(_tick_objects(), max_size=40))
def test_parse_ticks_equals_parse_tick_per_item(objs: list[object]) -> None:
    """The batch validator gives exactly what parse_tick gives item by item: the same
    ticks (compared by repr: 0.0 and -0.0, 1 and 1.0 differ) and the same errors."""
    want_ticks, want_bad = _one_by_one(objs)
    ticks, bad = parse_ticks(objs, NOW, 300_000)
    assert repr(ticks) == repr(want_ticks)
    assert [(o, e.reason, e.detail) for o, e in bad] == want_bad
    assert all(o is w for (o, _), (w, _, _) in zip(bad, want_bad, strict=True))


_CLEAN = {  # values parse_tick accepts as they are: the columnar fast path
    "price": st.sampled_from([61837.63, 0.1, 2.5e-05, 123456.789]),
    "qty": st.sampled_from([0.0, -0.0, 0.02, 1e-09, 7.0]),
    "ts_ms": st.integers(MIN_TS_MS, NOW + 300_000),
    "trade_id": st.one_of(st.none(), st.sampled_from(["1", "3735683259", "a-b"])),
    "recv_ms": st.one_of(st.none(), st.integers(0, NOW)),
}


_EDGE = {  # just outside what each field accepts, or another type that passes as one
    "exchange": st.sampled_from(["bin:ance", "", "BTC USDT", None]),
    "symbol": st.sampled_from(["", "BTC USDT", None]),
    "source": st.sampled_from(["prod", "", None]),
    "price": st.sampled_from([0.0, -0.0, -0.5, math.nan, math.inf, 1, True]),
    "qty": st.sampled_from([-0.5, -1e-300, -1.0, math.nan, math.inf, -math.inf, 1, True]),
    "ts_ms": st.sampled_from([MIN_TS_MS - 1, NOW + 300_001, float(NOW), 1.5, True]),
    "trade_id": st.sampled_from([7, True, 1.5]),
    "recv_ms": st.sampled_from([True, 1.5, "1"]),
}


@st.composite
def _columnar(draw: st.DrawFn) -> dict[str, object]:
    """A columnar batch: clean columns, or columns with any value parse_tick may meet,
    sometimes a column missing, of another type or of another length."""
    n = draw(st.integers(0, 12))
    mode = draw(st.sampled_from(["clean", "near", "wild"]))
    clean = mode != "wild"
    batch: dict[str, object] = {"layout": "columns"}
    for name in ("exchange", "symbol", "source"):
        value = draw(st.just(GOOD[name]) if clean else _FIELDS[name])
        if value is not _ABSENT:
            batch[name] = value
    for name in ("price", "qty", "ts_ms", "trade_id", "recv_ms"):
        if draw(st.integers(0, 9)) == 0 and not clean:
            if draw(st.booleans()):
                continue  # column absent
            batch[name] = draw(st.one_of(_ODD, st.lists(_CLEAN[name], max_size=n + 1)))
            continue
        values = _CLEAN[name] if clean else st.one_of(_CLEAN[name], _FIELDS[name].filter(
            lambda v: v is not _ABSENT))
        batch[name] = [draw(values) for _ in range(n)]
    if mode == "near":  # clean but for one value: the fast path must notice it
        name = draw(st.sampled_from(sorted(_FIELDS)))
        value = draw(st.one_of(_EDGE[name], _FIELDS[name].filter(lambda v: v is not _ABSENT)))
        if name in ("exchange", "symbol", "source"):
            batch[name] = value
        elif n:
            column = batch[name]
            assert isinstance(column, list)
            column[draw(st.integers(0, n - 1))] = value
    return batch


@settings(max_examples=400, deadline=None)
@given(_columnar())
def test_columnar_batch_means_the_tick_objects_it_expands_to(batch: dict[str, object]) -> None:
    """A columnar batch gives what parse_tick gives for each object it stands for, or one
    bad_columns rejection of the whole batch when it is malformed."""
    try:
        objs = tick_objects(batch)
    except InvalidTick as exc:
        assert exc.reason == "bad_columns"
        ticks, bad = parse_ticks(batch, NOW, 300_000)
        assert ticks == [] and [(o is batch, e.reason, e.detail) for o, e in bad] == [
            (True, "bad_columns", exc.detail)]
        return
    want_ticks, want_bad = _one_by_one(objs)
    ticks, bad = parse_ticks(batch, NOW, 300_000)
    assert repr(ticks) == repr(want_ticks)
    assert [(o, e.reason, e.detail) for o, e in bad] == want_bad


def test_encode_ticks_columnar_per_key_array_otherwise() -> None:
    ticks = [parse_tick({**GOOD, "trade_id": str(i), "ts_ms": GOOD["ts_ms"] + i}, NOW, 300_000)
             for i in range(3)]
    raw = encode_ticks(ticks)
    payload = decode_ticks_payload(raw)
    assert isinstance(payload, dict) and payload["layout"] == "columns"
    assert payload["trade_id"] == ["0", "1", "2"] and "recv_ms" not in payload
    assert len(raw) < len(orjson.dumps([tick_to_json(t) for t in ticks]))
    assert parse_ticks(payload, NOW, 300_000) == (ticks, [])
    mixed = [*ticks, ticks[0]._replace(symbol="ETHUSDT", recv_ms=NOW)]
    payload = decode_ticks_payload(encode_ticks(mixed))
    assert isinstance(payload, list) and parse_ticks(payload, NOW, 300_000) == (mixed, [])
    assert tick_objects(decode_ticks_payload(control_message(NOW))) == []


@pytest.mark.parametrize(("batch", "detail"), [
    ({"ts_ms": [1]}, "without a price column"),
    ({"price": [1.0]}, "without a ts_ms column"),
    ({"price": 1.0, "ts_ms": [1]}, "column price must be an array"),
    ({"price": [1.0, 2.0], "ts_ms": [1]}, "column ts_ms has 1 items, price has 2"),
])
def test_malformed_columnar_batch_is_rejected_whole(batch: dict[str, object],
                                                    detail: str) -> None:
    batch = {"layout": "columns", "exchange": "binance", "symbol": "BTCUSDT", **batch}
    ticks, bad = parse_ticks(batch, NOW, 300_000)
    assert ticks == [] and len(bad) == 1 and bad[0][0] is batch
    assert bad[0][1].reason == "bad_columns" and detail in bad[0][1].detail


_EDGES = [("exchange", v) for v in ["bin:ance", "", "BTC USDT", None, 5]] + [
    ("symbol", v) for v in ["", "BTC USDT", None, 5]] + [
    ("source", v) for v in ["prod", "", None, ["live"]]] + [
    ("price", v) for v in [0.0, -0.0, -0.5, math.nan, math.inf, 1, True, "1"]] + [
    ("qty", v) for v in [-0.5, -1e-300, -1.0, math.nan, math.inf, -math.inf, 1, True,
                         None]] + [
    ("ts_ms", v) for v in [MIN_TS_MS - 1, NOW + 300_001, float(NOW), 1.5, True]] + [
    ("trade_id", v) for v in [7, True, 1.5]] + [
    ("recv_ms", v) for v in [True, 1.5, "1"]]


@pytest.mark.parametrize(("name", "value"), _EDGES)
def test_columnar_batch_with_one_edge_value(name: str, value: object) -> None:
    """A clean batch of three ticks with one value just outside what parse_tick accepts
    (or of another type it converts): the same ticks and errors as item by item."""
    batch: dict[str, object] = {
        "layout": "columns", "exchange": "binance", "symbol": "BTCUSDT", "source": "replay",
        "price": [61837.63, 61837.64, 61837.65], "qty": [0.02, 0.5, 1.0],
        "ts_ms": [NOW - 2, NOW - 1, NOW], "trade_id": ["1", "2", "3"],
        "recv_ms": [NOW, NOW, NOW]}
    if name in ("exchange", "symbol", "source"):
        batch[name] = value
    else:
        column = batch[name]
        assert isinstance(column, list)
        column[1] = value
    want_ticks, want_bad = _one_by_one(tick_objects(batch))
    ticks, bad = parse_ticks(batch, NOW, 300_000)
    assert repr(ticks) == repr(want_ticks)
    assert [(o, e.reason, e.detail) for o, e in bad] == want_bad
