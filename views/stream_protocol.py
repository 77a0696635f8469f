"""Client frames of ``GET /stream`` (``docs/stream.md``), parsed into requests; pure, no
I/O, unit-tested without a server.

A frame is a JSON text object with an ``op``; :func:`parse_frame` returns one of
:class:`Subscribe`, :class:`Unsubscribe`, :class:`Auth`, :class:`Ping`, or raises
:class:`ProtocolError` whose ``code`` and message go into the error frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from core.errors import MarketflowError
from core.names import is_name
from query.series import INTERVALS_MS

__all__ = ["CHANNELS", "Auth", "Ping", "PriceItem", "ProtocolError", "Subscribe",
           "Unsubscribe", "error_frame", "parse_frame", "parse_price_item"]

#: subscription channels
CHANNELS = ("bars", "prices", "replay")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


class ProtocolError(MarketflowError):
    """A client frame is refused (the socket stays open).

    Attributes:
        code: ``bad_json``, ``bad_request``, ``duplicate_id``, ``unknown_id``, ``limit``,
            ``unauthorized``, ``forbidden`` or ``unavailable``.
        message: for humans; never holds a token.
        sub_id: the subscription the frame named, when it named a valid one.
    """

    def __init__(self, code: str, message: str, sub_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sub_id = sub_id


@dataclass(frozen=True)
class PriceItem:
    """One item of a prices subscription: a symbol (newest across exchanges, ``exchange``
    None) or an exchange's pair."""

    symbol: str
    exchange: str | None

    @property
    def key(self) -> str:
        """``"SYMBOL"`` or ``"exchange:SYMBOL"``."""
        return self.symbol if self.exchange is None else f"{self.exchange}:{self.symbol}"


@dataclass(frozen=True)
class Subscribe:
    """``{"op": "subscribe", ...}``.

    Attributes:
        sub_id: the client's subscription id.
        channel: one of :data:`CHANNELS`.
        symbol: bars: the symbol.
        exchange: bars: one exchange, None = consolidated.
        interval: bars: an interval name of :data:`query.series.INTERVALS_MS`.
        items: prices: the items, in the order given, without repeats.
    """

    sub_id: str
    channel: Literal["bars", "prices", "replay"]
    symbol: str = ""
    exchange: str | None = None
    interval: str = "1m"
    items: tuple[PriceItem, ...] = ()


@dataclass(frozen=True)
class Unsubscribe:
    """``{"op": "unsubscribe", "id"}``."""

    sub_id: str


@dataclass(frozen=True)
class Auth:
    """``{"op": "auth", "token"}``."""

    token: str


@dataclass(frozen=True)
class Ping:
    """``{"op": "ping"}``."""


Request = Subscribe | Unsubscribe | Auth | Ping


def error_frame(code: str, message: str, sub_id: str | None = None) -> dict[str, Any]:
    """The error frame ``{"type": "error", "code", "message"[, "id"]}``."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if sub_id is not None:
        frame["id"] = sub_id
    return frame


def parse_price_item(text: Any) -> PriceItem:
    """``"SYMBOL"`` or ``"exchange:SYMBOL"``.

    Raises:
        ProtocolError: not a string of one or two valid names.
    """
    if not isinstance(text, str):
        raise ProtocolError("bad_request", "symbols items must be strings")
    exchange, sep, symbol = text.rpartition(":")
    if not is_name(symbol) or (sep and not is_name(exchange)):
        raise ProtocolError("bad_request", f"invalid symbols item {text[:60]!r}: "
                                           "'SYMBOL' or 'exchange:SYMBOL'")
    return PriceItem(symbol, exchange if sep else None)


def parse_frame(data: str | bytes, *, max_symbols: int) -> Request:
    """Parse one client frame.

    Args:
        data: the frame's text.
        max_symbols: most items of a prices subscription.

    Returns:
        The request.

    Raises:
        ProtocolError: not JSON, not an object, an unknown ``op``/``channel``, or a bad
            field (the error says which).
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not JSON: {exc}"[:200]) from exc
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object with an 'op'")
    op = obj.get("op")
    if op == "ping":
        return Ping()
    if op == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("bad_request", "auth needs a 'token' string")
        return Auth(token)
    if op not in ("subscribe", "unsubscribe"):
        raise ProtocolError("bad_request", f"unknown op {str(op)[:30]!r}: subscribe, "
                                           "unsubscribe, auth or ping")
    sub_id = obj.get("id")
    if not isinstance(sub_id, str) or not _ID_RE.match(sub_id):
        raise ProtocolError("bad_request", "'id' must be 1-64 letters, digits, _ . : -")
    if op == "unsubscribe":
        return Unsubscribe(sub_id)
    channel = obj.get("channel")
    if channel == "replay":
        return Subscribe(sub_id, "replay")
    if channel == "prices":
        raw = obj.get("symbols")
        if not isinstance(raw, list) or not raw:
            raise ProtocolError("bad_request", "prices needs a non-empty 'symbols' list",
                                sub_id)
        if len(raw) > max_symbols:
            raise ProtocolError("limit", f"at most {max_symbols} symbols per subscription",
                                sub_id)
        try:
            items = tuple(dict.fromkeys(parse_price_item(x) for x in raw))
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, sub_id) from exc
        return Subscribe(sub_id, "prices", items=items)
    if channel == "bars":
        symbol = obj.get("symbol")
        exchange = obj.get("exchange")
        interval = obj.get("interval", "1m")
        if not is_name(symbol):
            raise ProtocolError("bad_request", "bars needs a valid 'symbol'", sub_id)
        if exchange is not None and not is_name(exchange):
            raise ProtocolError("bad_request", "invalid 'exchange' (omit it or null for "
                                               "consolidated bars)", sub_id)
        if interval not in INTERVALS_MS:
            raise ProtocolError("bad_request", f"unknown interval {str(interval)[:20]!r}: "
                                               f"{', '.join(INTERVALS_MS)}", sub_id)
        return Subscribe(sub_id, "bars", symbol=str(symbol), exchange=exchange,
                         interval=str(interval))
    raise ProtocolError("bad_request", f"unknown channel {str(channel)[:30]!r}: "
                                       f"{', '.join(CHANNELS)}", sub_id)
