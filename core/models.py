"""Wire formats of the ``ticks``, closed-bars and dead-letter topics, the ``/ohlcv`` bar,
and tick validation.

Everything here is pure (no I/O) so it is unit-tested without a broker.

``ticks`` message value (UTF-8 JSON), key ``"<exchange>:<symbol>"``:

* one tick object, or a JSON array of tick objects, or a *columnar batch* of ticks of
  one key (our producers batch ticks of one key per message, :func:`encode_ticks`;
  Faust's per-event overhead caps an agent at ~11k events/s);
* tick object::

    {"exchange": "binance", "symbol": "BTCUSDT", "price": 61837.63, "qty": 0.02,
     "ts_ms": 1723161255342, "trade_id": "3735683259", "source": "replay"}

  ``price`` quote currency per base unit (> 0, finite); ``qty`` base units (optional,
  ``null``/absent/0 for price-only feeds); ``ts_ms`` exchange event time, UTC epoch
  milliseconds; ``trade_id`` optional string or integer; ``source`` one of
  ``live``, ``test``, ``replay`` (default ``live``); ``recv_ms`` optional, when our
  feed received the trade (UTC epoch ms), kept apart from the exchange time ``ts_ms``.
* columnar batch: the tick fields as parallel arrays, the fields every tick shares once
  (a third of the array's bytes, decoded without an object per tick)::

    {"layout": "columns", "exchange": "binance", "symbol": "BTCUSDT", "source": "replay",
     "price": [61837.63, 61837.64], "qty": [0.02, 0.0011],
     "ts_ms": [1723161255342, 1723161255342], "trade_id": ["3735683259", "3735683260"]}

  ``price`` and ``ts_ms`` are required, ``qty``, ``trade_id`` and ``recv_ms`` optional
  (``null`` items allowed), all of the same length. It means exactly the array of tick
  objects it expands to (:func:`tick_objects`): each item is validated and dead-lettered
  on its own (reason ``bad_columns`` for a malformed batch as a whole);
* a control object ``{"control": "idle_check", "wall_ms": <epoch ms>}`` is written by
  the worker itself into each partition it owns, to close windows of idle keys in
  stream order (see :mod:`agents.bars`). Consumers of ``ticks`` other than marketflow
  should ignore objects that carry ``control``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import repeat
from time import gmtime
from typing import Any, NamedTuple

import orjson

from core.errors import InvalidTick
from core.names import NAME_RE

__all__ = [
    "BAR_ALIASES",
    "BAR_FIELDS",
    "BAR_VALUES",
    "CLOSED_BAR_FIELDS",
    "CONTROL_IDLE_CHECK",
    "DECIMAL_FIELDS",
    "MAX_MESSAGE_BYTES",
    "MIN_TS_MS",
    "SOURCES",
    "Tick",
    "TickColumns",
    "TickList",
    "closed_bar",
    "control_message",
    "dead_letter_message",
    "decode_ticks_payload",
    "encode_columns",
    "encode_ticks",
    "iso_ms",
    "ohlcv_bar",
    "parse_tick",
    "parse_ticks",
    "tick_objects",
    "tick_to_json",
]

SOURCES = frozenset({"live", "test", "replay"})
CONTROL_IDLE_CHECK = "idle_check"
#: Largest accepted ``ticks`` message value; larger ones are dead-lettered whole.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: 2009-01-03T00:00:00Z (the Bitcoin genesis block): anything older is not a crypto trade.
MIN_TS_MS = 1_230_940_800_000



class Tick(NamedTuple):
    """One validated trade.

    Attributes:
        exchange: exchange id, e.g. ``"binance"`` (no ``:``).
        symbol: exchange's pair name, e.g. ``"BTCUSDT"``.
        price: quote currency per base unit, finite and > 0.
        qty: base units, >= 0 (0 when the feed carries no size).
        ts_ms: exchange event time, UTC epoch milliseconds.
        trade_id: exchange trade id, or ``None``.
        source: ``live``, ``test`` or ``replay``.
        recv_ms: when our feed received it (wall clock, UTC epoch ms), kept apart from
            the exchange's ``ts_ms``; ``None`` for replayed data.
    """

    exchange: str
    symbol: str
    price: float
    qty: float
    ts_ms: int
    trade_id: str | None
    source: str
    recv_ms: int | None = None

    @property
    def key(self) -> str:
        """Partition key ``"<exchange>:<symbol>"``."""
        return f"{self.exchange}:{self.symbol}"


def decode_ticks_payload(raw: bytes | str | None) -> dict[str, Any] | list[Any]:
    """Decode one ``ticks`` message value.

    Args:
        raw: the message value as received.

    Returns:
        A control object (dict with ``"control"``), a columnar batch (dict with
        ``"layout": "columns"``), or a list of candidate tick objects (a single tick
        object is wrapped in a list). Nothing is validated yet (:func:`parse_ticks`).

    Raises:
        InvalidTick: ``empty`` / ``oversized`` / ``invalid_json`` / ``not_object``.
    """
    if raw is None or len(raw) == 0:
        raise InvalidTick("empty", "message value is empty")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidTick("oversized", f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidTick("invalid_json", str(exc)) from exc
    if isinstance(obj, dict):
        if "control" in obj or obj.get("layout") == "columns":
            return obj
        return [obj]
    if isinstance(obj, list):
        return obj
    raise InvalidTick("not_object", f"expected a JSON object or array, got {type(obj).__name__}")


def _name(obj: dict[str, Any], field: str) -> str:
    v = obj.get(field)
    if v is None:
        raise InvalidTick("missing_field", field)
    if not isinstance(v, str):
        raise InvalidTick("bad_type", f"{field} must be a string")
    if not NAME_RE.match(v):
        raise InvalidTick("bad_name", f"{field}={v[:60]!r}")
    return v


def parse_tick(obj: Any, now_ms: int, max_future_ms: int) -> Tick:
    """Validate one decoded tick object.

    Args:
        obj: one element of :func:`decode_ticks_payload`'s list.
        now_ms: wall-clock time, UTC epoch ms, for the far-future check.
        max_future_ms: how far ``ts_ms`` may lie ahead of ``now_ms``.

    Returns:
        Tick: the validated tick.

    Raises:
        InvalidTick: with reason ``not_object``, ``missing_field``, ``bad_type``,
            ``bad_name``, ``bad_price`` (not finite or <= 0), ``bad_qty`` (negative or
            not finite), ``ts_in_future``, ``ts_too_old`` or ``bad_source``.
    """
    if not isinstance(obj, dict):
        raise InvalidTick("not_object", f"tick must be a JSON object, got {type(obj).__name__}")
    exchange = _name(obj, "exchange")
    symbol = _name(obj, "symbol")
    if ":" in exchange:
        raise InvalidTick("bad_name", "exchange must not contain ':'")

    price = obj.get("price")
    if price is None:
        raise InvalidTick("missing_field", "price")
    if isinstance(price, bool) or not isinstance(price, (int, float)):
        raise InvalidTick("bad_type", "price must be a number")
    price = float(price)
    if not math.isfinite(price) or price <= 0.0:
        raise InvalidTick("bad_price", f"price={price!r} must be finite and > 0")

    qty = obj.get("qty")
    if qty is None:
        qty = 0.0
    elif isinstance(qty, bool) or not isinstance(qty, (int, float)):
        raise InvalidTick("bad_type", "qty must be a number")
    else:
        qty = float(qty)
        if not math.isfinite(qty) or qty < 0.0:
            raise InvalidTick("bad_qty", f"qty={qty!r} must be finite and >= 0")

    ts_ms = obj.get("ts_ms")
    if ts_ms is None:
        raise InvalidTick("missing_field", "ts_ms")
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        if isinstance(ts_ms, float) and ts_ms.is_integer():
            ts_ms = int(ts_ms)
        else:
            raise InvalidTick("bad_type", "ts_ms must be an integer (epoch milliseconds)")
    if ts_ms < MIN_TS_MS:
        raise InvalidTick("ts_too_old", f"ts_ms={ts_ms} is before 2009-01-03 (seconds?)")
    if ts_ms > now_ms + max_future_ms:
        raise InvalidTick("ts_in_future", f"ts_ms={ts_ms} is {ts_ms - now_ms} ms ahead")

    trade_id = obj.get("trade_id")
    if trade_id is not None:
        if isinstance(trade_id, bool) or not isinstance(trade_id, (str, int)):
            raise InvalidTick("bad_type", "trade_id must be a string or integer")
        trade_id = str(trade_id)

    source = obj.get("source", "live")
    if not isinstance(source, str) or source not in SOURCES:  # (a list is unhashable)
        raise InvalidTick("bad_source", f"source={str(source)[:20]!r}, expected {sorted(SOURCES)}")

    recv_ms = obj.get("recv_ms")
    if recv_ms is not None and (isinstance(recv_ms, bool) or not isinstance(recv_ms, int)):
        raise InvalidTick("bad_type", "recv_ms must be an integer (epoch milliseconds)")

    return Tick(exchange, symbol, price, qty, ts_ms, trade_id, source, recv_ms)


_INF = math.inf
#: ``_new_tuple(Tick, fields)`` builds a Tick without NamedTuple's Python-level __new__
_new_tuple = tuple.__new__


_COLUMNS = ("price", "qty", "ts_ms", "trade_id", "recv_ms")
_SHARED = ("exchange", "symbol", "source")
_FLOAT = {float}
class TickList(list[Tick]):
    """The ticks of one valid columnar batch (one key), with the batch's columns kept
    beside them, so that consumers can work on the columns (slices, C-level builtins)
    instead of on each tick. ``price[i]``, ``qty[i]``, ``ts_ms[i]`` and ``trade_id[i]``
    are the fields of ``self[i]``; ``trade_id`` is None when no tick has one. Built by
    :func:`parse_ticks`; a plain ``list`` of ticks means the same without the columns.
    """

    __slots__ = ("price", "qty", "trade_id", "ts_ms")

    price: list[float]
    qty: list[float]
    ts_ms: list[int]
    trade_id: list[str | None] | None


_INT = {int}
_ID_TYPES = {str, type(None)}
_RECV_TYPES = {int, type(None)}


def _columns(batch: dict[str, Any]) -> tuple[int, dict[str, list[Any]]]:
    """The columns of a columnar batch and their common length.

    Raises:
        InvalidTick: ``bad_columns``: ``price`` or ``ts_ms`` missing, a column that is not
            an array, or columns of different lengths.
    """
    cols: dict[str, list[Any]] = {}
    n = -1
    for name in _COLUMNS:
        col = batch.get(name)
        if col is None:
            if name in ("price", "ts_ms"):
                raise InvalidTick("bad_columns", f"columnar batch without a {name} column")
            continue
        if type(col) is not list:
            raise InvalidTick("bad_columns", f"column {name} must be an array")
        if n < 0:
            n = len(col)
        elif len(col) != n:
            raise InvalidTick("bad_columns",
                              f"column {name} has {len(col)} items, price has {n}")
        cols[name] = col
    return n, cols


def tick_objects(payload: dict[str, Any] | list[Any]) -> list[Any]:
    """The tick objects a decoded ``ticks`` value stands for (module docstring).

    Args:
        payload: :func:`decode_ticks_payload`'s result.

    Returns:
        The list itself, the objects a columnar batch expands to (the shared fields plus
        item ``i`` of each column), or ``[]`` for a control object.

    Raises:
        InvalidTick: ``bad_columns`` (a malformed columnar batch).
    """
    if isinstance(payload, list):
        return payload
    if "control" in payload:
        return []
    n, cols = _columns(payload)
    shared = {k: payload[k] for k in _SHARED if k in payload}
    return [{**shared, **{name: col[i] for name, col in cols.items()}} for i in range(n)]


def _parse_columns(batch: dict[str, Any], now_ms: int, max_future_ms: int
                   ) -> tuple[list[Tick], list[tuple[Any, InvalidTick]]]:
    """:func:`parse_ticks` of a columnar batch: checked column by column with C-level
    builtins when every item is of the common form, else item by item."""
    try:
        n, cols = _columns(batch)
    except InvalidTick as exc:
        return [], [(batch, exc)]
    exchange = batch.get("exchange")
    symbol = batch.get("symbol")
    source = batch.get("source", "live")
    price = cols["price"]
    ts = cols["ts_ms"]
    qty = cols.get("qty")
    ids = cols.get("trade_id")
    recv = cols.get("recv_ms")
    if n == 0:
        return [], []
    if (type(exchange) is str and ":" not in exchange and NAME_RE.match(exchange)
            and type(symbol) is str and NAME_RE.match(symbol)
            and type(source) is str and source in SOURCES
            and set(map(type, price)) == _FLOAT and all(map(math.isfinite, price))
            and min(price) > 0.0
            and (qty is None or (set(map(type, qty)) == _FLOAT
                                 and all(map(math.isfinite, qty)) and min(qty) >= 0.0))
            and set(map(type, ts)) == _INT and min(ts) >= MIN_TS_MS
            and max(ts) <= now_ms + max_future_ms
            and (ids is None or set(map(type, ids)) <= _ID_TYPES)
            and (recv is None or set(map(type, recv)) <= _RECV_TYPES)):
        qtys = [0.0] * n if qty is None else qty
        rows = zip(repeat(exchange, n), repeat(symbol, n), price, qtys, ts,
                   repeat(None, n) if ids is None else ids, repeat(source, n),
                   repeat(None, n) if recv is None else recv, strict=True)
        out = TickList(map(_new_tuple, repeat(Tick, n), rows))
        out.price, out.qty, out.ts_ms = price, qtys, ts
        out.trade_id = None if ids is None or not any(i is not None for i in ids) else ids
        return out, []
    return parse_ticks(tick_objects(batch), now_ms, max_future_ms)


def parse_ticks(
    payload: list[Any] | dict[str, Any], now_ms: int, max_future_ms: int
) -> tuple[list[Tick], list[tuple[Any, InvalidTick]]]:
    """Validate one message's decoded ticks: :func:`parse_tick` for each, faster.

    The result equals ``parse_tick`` applied to each item in order, with the
    :class:`~core.errors.InvalidTick` of a bad item kept beside it. The common case (a
    float ``price`` and ``qty``, an int ``ts_ms`` in range, names already accepted
    earlier in the same message) is checked inline, without the name regex; anything
    else goes through :func:`parse_tick` itself (so its errors are the same).

    A columnar batch is checked column by column (type sets, ``min``/``max``) and gives
    the same as the tick objects it stands for (:func:`tick_objects`); a malformed one
    is rejected whole (``bad_columns``).

    Args:
        payload: :func:`decode_ticks_payload`'s list, or a columnar batch.
        now_ms: wall-clock time, UTC epoch ms, for the far-future check.
        max_future_ms: how far ``ts_ms`` may lie ahead of ``now_ms``.

    Returns:
        ``(ticks, rejected)``: the valid ticks in message order, and ``(item, error)``
        for each invalid item (or the whole batch), in message order. ``ticks`` is a
        :class:`TickList` (its columns kept) when a columnar batch was valid throughout.
    """
    if isinstance(payload, dict):
        return _parse_columns(payload, now_ms, max_future_ms)
    objs = payload
    ticks: list[Tick] = []
    rejected: list[tuple[Any, InvalidTick]] = []
    exchanges: set[str] = set()  # names parse_tick accepted in this message
    symbols: set[str] = set()
    hi_ms = now_ms + max_future_ms
    append = ticks.append
    for obj in objs:
        if type(obj) is dict:
            exchange = obj.get("exchange")
            symbol = obj.get("symbol")
            price = obj.get("price")
            qty = obj.get("qty", 0.0)
            ts_ms = obj.get("ts_ms")
            trade_id = obj.get("trade_id")
            source = obj.get("source", "live")
            recv_ms = obj.get("recv_ms")
            if (type(exchange) is str and exchange in exchanges
                    and type(symbol) is str and symbol in symbols
                    and type(price) is float and 0.0 < price < _INF
                    and type(qty) is float and 0.0 <= qty < _INF
                    and type(ts_ms) is int and MIN_TS_MS <= ts_ms <= hi_ms
                    and (trade_id is None or type(trade_id) is str)
                    and type(source) is str and source in SOURCES
                    and (recv_ms is None or type(recv_ms) is int)):
                append(_new_tuple(Tick, (exchange, symbol, price, qty, ts_ms, trade_id, source,
                                         recv_ms)))
                continue
        try:
            t = parse_tick(obj, now_ms, max_future_ms)
        except InvalidTick as exc:
            rejected.append((obj, exc))
            continue
        append(t)
        exchanges.add(t.exchange)
        symbols.add(t.symbol)
    return ticks, rejected


@dataclass(slots=True)
class TickColumns:
    """Ticks of one key as parallel columns: a columnar batch (module docstring) in memory.

    Attributes:
        exchange, symbol, source: shared by every tick (see :class:`Tick`).
        price: quote currency per base unit, one per tick.
        qty: base units, one per tick.
        ts_ms: exchange event times, UTC epoch ms, one per tick.
        trade_id: exchange trade ids (items may be ``None``), or ``None`` for no column.
        recv_ms: receive times, UTC epoch ms (items may be ``None``), or ``None``.
    """

    exchange: str
    symbol: str
    source: str
    price: list[float]
    qty: list[float]
    ts_ms: list[int]
    trade_id: list[str | None] | None = None
    recv_ms: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.ts_ms)

    @property
    def key(self) -> str:
        """Partition key ``"<exchange>:<symbol>"``."""
        return f"{self.exchange}:{self.symbol}"

    def ticks(self) -> list[Tick]:
        """The batch as :class:`Tick` values, in order."""
        n = len(self.ts_ms)
        ids = repeat(None, n) if self.trade_id is None else self.trade_id
        recv = repeat(None, n) if self.recv_ms is None else self.recv_ms
        rows = zip(repeat(self.exchange, n), repeat(self.symbol, n), self.price, self.qty,
                   self.ts_ms, ids, repeat(self.source, n), recv, strict=True)
        return list(map(_new_tuple, repeat(Tick, n), rows))


def encode_columns(batch: TickColumns) -> bytes:
    """A ``ticks`` message value holding ``batch`` as a columnar batch.

    Args:
        batch: at least one tick.

    Returns:
        UTF-8 JSON (module docstring); the ``trade_id`` and ``recv_ms`` columns only when
        some item is not ``None``. Equal to :func:`encode_ticks` of ``batch.ticks()``.
    """
    value: dict[str, Any] = {
        "layout": "columns", "exchange": batch.exchange, "symbol": batch.symbol,
        "source": batch.source, "price": batch.price, "qty": batch.qty,
        "ts_ms": batch.ts_ms,
    }
    ids = batch.trade_id
    if ids is not None and any(i is not None for i in ids):
        value["trade_id"] = ids
    recv = batch.recv_ms
    if recv is not None and any(r is not None for r in recv):
        value["recv_ms"] = recv
    return orjson.dumps(value)


def encode_ticks(ticks: list[Tick]) -> bytes:
    """A ``ticks`` message value: a columnar batch when the ticks share exchange, symbol
    and source (as a producer's per-key batch does, :func:`encode_columns`), else a JSON
    array of tick objects.

    Args:
        ticks: at least one tick, in order.

    Returns:
        UTF-8 JSON (module docstring).
    """
    t0 = ticks[0]
    ex, sym, src = t0.exchange, t0.symbol, t0.source
    if not all(t.exchange == ex and t.symbol == sym and t.source == src for t in ticks):
        return orjson.dumps([tick_to_json(t) for t in ticks])
    return encode_columns(TickColumns(
        ex, sym, src, [t.price for t in ticks], [t.qty for t in ticks],
        [t.ts_ms for t in ticks], [t.trade_id for t in ticks], [t.recv_ms for t in ticks]))


def tick_to_json(t: Tick) -> dict[str, Any]:
    """The ``ticks`` wire object of a tick (inverse of :func:`parse_tick`)."""
    d: dict[str, Any] = {
        "exchange": t.exchange,
        "symbol": t.symbol,
        "price": t.price,
        "qty": t.qty,
        "ts_ms": t.ts_ms,
        "source": t.source,
    }
    if t.trade_id is not None:
        d["trade_id"] = t.trade_id
    if t.recv_ms is not None:
        d["recv_ms"] = t.recv_ms
    return d


def control_message(wall_ms: int) -> bytes:
    """The idle-check control value written by the worker into its own partitions."""
    return orjson.dumps({"control": CONTROL_IDLE_CHECK, "wall_ms": wall_ms})


def dead_letter_message(
    payload: Any, reason: str, detail: str, partition: int | None, offset: int | None,
    wall_ms: int,
) -> bytes:
    """Dead-letter topic value (JSON).

    Schema::

        {"reason": "bad_price", "detail": "price=-1.0 must be finite and > 0",
         "payload": <the offending tick object, or the raw message text>,
         "source_topic_partition": 0, "source_offset": 1234, "wall_ms": 1732170000000}

    Args:
        payload: the decoded offending object, or the raw bytes when undecodable
            (then stored as text, invalid UTF-8 replaced).
        reason: machine-readable reason (see :func:`parse_tick`, plus ``late``).
        detail: human-readable detail.
        partition: source partition, if known.
        offset: source offset, if known.
        wall_ms: when it was dead-lettered, UTC epoch ms.
    """
    if isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload[:65536]).decode("utf-8", errors="replace")
    msg = {
        "reason": reason,
        "detail": detail,
        "payload": payload,
        "source_topic_partition": partition,
        "source_offset": offset,
        "wall_ms": wall_ms,
    }
    try:
        return orjson.dumps(msg)
    except TypeError:  # e.g. integers beyond 64 bits in the payload
        msg["payload"] = repr(payload)[:65536]
        return orjson.dumps(msg)


# ---- bars: the closed-bars topic message and the /ohlcv bar -----------------------------

#: The OHLCV values of a bar, in response order: a 1-minute bar (``bars_1m`` columns, live
#: bars in Redis) or a rolled-up bucket (:func:`sql.bars_1m.fetch_rollup` record fields).
#: ``open``..``close`` quote currency per base unit (JSON numbers), ``volume`` base units,
#: ``quote_volume`` sum of price * qty (quote units), ``trade_count`` trades, ``avg_price``
#: mean trade price (number), ``vwap`` volume-weighted average price (null without
#: quantities). ``volume``, ``quote_volume`` and ``vwap`` are exact decimal strings
#: (:data:`DECIMAL_FIELDS`).
BAR_VALUES: tuple[str, ...] = ("open", "high", "low", "close", "volume", "quote_volume",
                               "trade_count", "avg_price", "vwap")
#: Bar fields served as exact decimal strings in plain notation without trailing zeros
#: (``"0.04201"``, ``"0"``; :func:`core.decimals.format_scaled`, PostgreSQL's
#: ``trim_scale(x)::text``), the same in ``/ohlcv``, ``/udf/history``, the closed-bars
#: topic and ``/stream``: a JSON number would be rounded to a double by most readers.
#: ``quote_volume`` is null for a fetched bar whose source gives no quote volume, ``vwap``
#: when the bar has no quote volume or a volume of 0.
DECIMAL_FIELDS: tuple[str, ...] = ("volume", "quote_volume", "vwap")
#: Fields that repeat a value under another name: ``min_price`` is ``low``, ``max_price``
#: is ``high``.
BAR_ALIASES: dict[str, str] = {"min_price": "low", "max_price": "high"}
#: One ``/ohlcv`` bar (also the cached and the PostgreSQL-serialised JSON, see
#: :data:`sql.bars_1m.BAR_JSON_SQL`), in response order: ``exchange`` (null when
#: consolidated across exchanges), ``symbol``, ``bucket_start_ms`` (UTC epoch ms),
#: ``time`` (:func:`iso_ms` of it), :data:`BAR_VALUES`, :data:`BAR_ALIASES`, ``closed``
#: (false for a bucket still open).
BAR_FIELDS: tuple[str, ...] = ("exchange", "symbol", "bucket_start_ms", "time", *BAR_VALUES,
                               *BAR_ALIASES, "closed")
#: One closed-bars topic message (and the row source of ``bars_1m``), in wire order; a
#: re-emitted corrected bar adds ``"correction": true``, a live bar in Redis ``"closed"``.
CLOSED_BAR_FIELDS: tuple[str, ...] = (
    "exchange", "symbol", "bucket_start_ms", "bucket_end_ms", "open", "high", "low", "close",
    "volume", "quote_volume", "trade_count", "avg_price", "min_price", "max_price", "vwap",
    "open_ts_ms", "close_ts_ms")


def iso_ms(ms: int) -> str:
    """UTC ISO-8601 with milliseconds and ``Z``, e.g. ``2024-08-08T23:55:00.000Z``.

    Args:
        ms: UTC epoch milliseconds, 0 .. year 9999.

    Returns:
        str: the bar ``time`` format (PostgreSQL writes the same in
        :data:`sql.bars_1m.BAR_JSON_SQL`).
    """
    s, rest = divmod(ms, 1000)
    t = gmtime(s)
    return f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}.{rest:03d}Z"


def ohlcv_bar(exchange: str | None, symbol: str, bucket_start_ms: int,
              values: Mapping[str, Any], closed: bool) -> dict[str, Any]:
    """One ``/ohlcv`` bar (:data:`BAR_FIELDS`, in that order).

    Args:
        exchange: the bar's exchange, None for a bar consolidated across exchanges.
        symbol: the symbol.
        bucket_start_ms: bucket start, UTC epoch ms.
        values: holds every :data:`BAR_VALUES` field (a rollup record, a bar dict;
            ``quote_volume`` may be missing).
        closed: whether the bucket is over and none of its minutes is still open.

    Returns:
        dict: the bar.
    """
    bar: dict[str, Any] = {"exchange": exchange, "symbol": symbol,
                           "bucket_start_ms": bucket_start_ms, "time": iso_ms(bucket_start_ms)}
    for field in BAR_VALUES:
        # quote_volume came later: a live bar from an older worker has none (null)
        bar[field] = values.get(field) if field == "quote_volume" else values[field]
    for alias, field in BAR_ALIASES.items():
        bar[alias] = values[field]
    bar["closed"] = closed
    return bar


def closed_bar(exchange: str, symbol: str, bucket_start_ms: int, bucket_end_ms: int, *,
               open: float, high: float, low: float, close: float, volume: str,
               quote_volume: str | None, trade_count: int, avg_price: float,
               vwap: str | None, open_ts_ms: int,
               close_ts_ms: int) -> dict[str, Any]:
    """One closed-bars topic message (:data:`CLOSED_BAR_FIELDS`, in that order).

    Args:
        exchange: exchange id.
        symbol: the exchange's pair name.
        bucket_start_ms: window start, UTC epoch ms.
        bucket_end_ms: window end (exclusive), UTC epoch ms.
        open: first trade price by event time (quote currency per base unit).
        high: highest trade price.
        low: lowest trade price.
        close: last trade price by event time.
        volume: sum of quantities, base units, an exact decimal string
            (:data:`DECIMAL_FIELDS`).
        quote_volume: sum of price * quantity, quote units, exact decimal string (None
            when a fetched bar's source gives none).
        trade_count: number of trades.
        avg_price: mean trade price.
        vwap: ``quote_volume / volume`` rounded half-up to 16 places
            (:func:`core.decimals.vwap_string`), None when no trade carried a quantity.
        open_ts_ms: event time of the open trade, UTC epoch ms.
        close_ts_ms: event time of the close trade, UTC epoch ms.

    Returns:
        dict: the message (``min_price``/``max_price`` repeat ``low``/``high``,
        :data:`BAR_ALIASES`).
    """
    return {"exchange": exchange, "symbol": symbol, "bucket_start_ms": bucket_start_ms,
            "bucket_end_ms": bucket_end_ms, "open": open, "high": high, "low": low,
            "close": close, "volume": volume, "quote_volume": quote_volume,
            "trade_count": trade_count,
            "avg_price": avg_price, "min_price": low, "max_price": high, "vwap": vwap,
            "open_ts_ms": open_ts_ms, "close_ts_ms": close_ts_ms}
