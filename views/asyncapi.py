"""``GET /asyncapi.json``: the AsyncAPI 2.6 document of the WebSocket stream ``/stream``
(the prose is ``docs/stream.md``; the frames are parsed by :mod:`views.stream_protocol`
and written by :mod:`views.stream_hub`). Linked from ``/docs`` and the OpenAPI entry of
``/stream``.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any

from faust.web import Request, Response

from core.models import BAR_FIELDS, DECIMAL_FIELDS
from core.names import NAME_PATTERN
from query.series import INTERVALS_MS
from views.base import ApiView, Routes

__all__ = ["ROUTES", "AsyncApi", "build_asyncapi"]

_BAR_EXAMPLE = {"exchange": "binance-usdm", "symbol": "BTCUSDT",
                "bucket_start_ms": 1723161240000, "time": "2024-08-08T23:54:00.000Z",
                "open": 61837.6, "high": 61850.0, "low": 61820.1, "close": 61841.2,
                "volume": "12.345", "quote_volume": "763399.5012",
                "trade_count": 812, "avg_price": 61838.9, "vwap": "61839.4011",
                "min_price": 61820.1, "max_price": 61850.0, "closed": False}


def _msg(name: str, summary: str, payload: dict[str, Any], example: dict[str, Any]
         ) -> dict[str, Any]:
    return {"name": name, "summary": summary, "contentType": "application/json",
            "payload": payload, "examples": [{"payload": example}]}


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_NAME = {"type": "string", "pattern": NAME_PATTERN}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:\\-]{1,64}$"}
_SEQ = {"type": "integer", "minimum": 1, "description": "per subscription, +1 per frame"}


def build_asyncapi() -> dict[str, Any]:
    """The document (a dict, JSON-serialisable)."""
    decimal = {"type": ["string", "null"], "format": "decimal",
               "description": "exact decimal string (as in /ohlcv)"}
    bar = _obj({f: decimal if f in DECIMAL_FIELDS else {} for f in BAR_FIELDS}
               | {"correction": {"type": "boolean"}}, list(BAR_FIELDS))
    price = _obj({"item": {"type": "string"}, "symbol": _NAME, "exchange": _NAME,
                  "price": {"type": "number"}, "ts_ms": {"type": "integer"}},
                 ["item", "symbol", "exchange", "price", "ts_ms"])
    client = [
        _msg("subscribeBars", "Bars of one series (exchange absent/null: consolidated)",
             _obj({"op": {"const": "subscribe"}, "id": _ID, "channel": {"const": "bars"},
                   "symbol": _NAME, "exchange": {"oneOf": [_NAME, {"type": "null"}]},
                   "interval": {"enum": list(INTERVALS_MS), "default": "1m"}},
                  ["op", "id", "channel", "symbol"]),
             {"op": "subscribe", "id": "c1", "channel": "bars", "symbol": "BTCUSDT",
              "exchange": "binance-usdm", "interval": "1m"}),
        _msg("subscribePrices", "Latest prices: 'SYMBOL' or 'exchange:SYMBOL' items",
             _obj({"op": {"const": "subscribe"}, "id": _ID, "channel": {"const": "prices"},
                   "symbols": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                  ["op", "id", "channel", "symbols"]),
             {"op": "subscribe", "id": "p1", "channel": "prices",
              "symbols": ["BTCUSDT", "binance-usdm:ETHUSDT"]}),
        _msg("subscribeReplay", "State and simulated clock of the running replay",
             _obj({"op": {"const": "subscribe"}, "id": _ID, "channel": {"const": "replay"}},
                  ["op", "id", "channel"]),
             {"op": "subscribe", "id": "r", "channel": "replay"}),
        _msg("unsubscribe", "End a subscription",
             _obj({"op": {"const": "unsubscribe"}, "id": _ID}, ["op", "id"]),
             {"op": "unsubscribe", "id": "c1"}),
        _msg("auth", "Bearer token as the first frame (auth on, no Authorization header)",
             _obj({"op": {"const": "auth"}, "token": {"type": "string"}}, ["op", "token"]),
             {"op": "auth", "token": "<api key or JWT>"}),
        _msg("ping", "Application-level ping", _obj({"op": {"const": "ping"}}, ["op"]),
             {"op": "ping"}),
    ]
    server = [
        _msg("welcome", "First frame of every connection",
             _obj({"type": {"const": "welcome"}, "server_time_ms": {"type": "integer"},
                   "auth_required": {"type": "boolean"}, "limits": {"type": "object"}},
                  ["type", "server_time_ms", "auth_required", "limits"]),
             {"type": "welcome", "server_time_ms": 1723161255342, "auth_required": False,
              "limits": {"max_subscriptions": 50, "max_updates_per_s": 10.0,
                         "max_symbols": 100, "heartbeat_s": 15.0}}),
        _msg("snapshot", "First frame of a subscription (seq 1): bars, prices or replay",
             _obj({"type": {"const": "snapshot"}, "id": _ID, "seq": _SEQ,
                   "channel": {"enum": ["bars", "prices", "replay"]},
                   "bars": {"type": "array", "items": bar},
                   "prices": {"type": "array", "items": price},
                   "replay": {"type": ["object", "null"]}},
                  ["type", "id", "seq", "channel"]),
             {"type": "snapshot", "id": "c1", "seq": 1, "channel": "bars",
              "symbol": "BTCUSDT", "exchange": "binance-usdm", "interval": "1m",
              "bars": [_BAR_EXAMPLE]}),
        _msg("bar", "A bar changed (open: throttled; closed: once; then corrections)",
             _obj({"type": {"const": "bar"}, "id": _ID, "seq": _SEQ, "bar": bar},
                  ["type", "id", "seq", "bar"]),
             {"type": "bar", "id": "c1", "seq": 2, "bar": _BAR_EXAMPLE}),
        _msg("price", "A newer latest price",
             _obj({"type": {"const": "price"}, "id": _ID, "seq": _SEQ, "price": price},
                  ["type", "id", "seq", "price"]),
             {"type": "price", "id": "p1", "seq": 2,
              "price": {"item": "BTCUSDT", "symbol": "BTCUSDT", "exchange": "binance-usdm",
                        "price": 61841.2, "ts_ms": 1723161255342}}),
        _msg("replay", "The replay's state changed or its clock moved (null: none runs)",
             _obj({"type": {"const": "replay"}, "id": _ID, "seq": _SEQ,
                   "replay": {"type": ["object", "null"]}}, ["type", "id", "seq", "replay"]),
             {"type": "replay", "id": "r", "seq": 5,
              "replay": {"state": "running", "speed": 60.0, "clock_ms": 1723161255342,
                         "clock": "2024-08-08T23:54:15.342Z", "position": 12000,
                         "total": 70808, "active": True}}),
        _msg("error", "A refused frame; the socket stays open",
             _obj({"type": {"const": "error"}, "id": _ID,
                   "code": {"enum": ["bad_json", "bad_request", "duplicate_id", "unknown_id",
                                     "limit", "unauthorized", "forbidden",
                                     "unavailable"]},
                   "message": {"type": "string"}}, ["type", "code", "message"]),
             {"type": "error", "id": "c1", "code": "bad_request",
              "message": "unknown interval '2m': 1m, 5m, 15m, 30m, 1h, 4h, 1d"}),
        _msg("unsubscribed", "A subscription ended",
             _obj({"type": {"const": "unsubscribed"}, "id": _ID}, ["type", "id"]),
             {"type": "unsubscribed", "id": "c1"}),
        _msg("pong", "Answer to ping",
             _obj({"type": {"const": "pong"}, "server_time_ms": {"type": "integer"}},
                  ["type", "server_time_ms"]),
             {"type": "pong", "server_time_ms": 1723161255342}),
    ]
    try:
        version = metadata.version("marketflow")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "asyncapi": "2.6.0",
        "info": {"title": "marketflow stream", "version": version,
                 "description": "Bars, latest prices and the replay state over one "
                                "WebSocket. Close codes: 1009 frame too big, 1013 too many "
                                "connections, 4001 unauthorized, 4008 slow consumer."},
        "servers": {"worker": {"url": "ws://127.0.0.1:6066", "protocol": "ws",
                               "description": "every worker serves /stream"}},
        "channels": {"/stream": {
            "publish": {"summary": "client to server", "message": {"oneOf": client}},
            "subscribe": {"summary": "server to client", "message": {"oneOf": server}},
        }},
    }


@cache
def _doc() -> dict[str, Any]:
    return build_asyncapi()


class AsyncApi(ApiView):
    """The AsyncAPI document of ``/stream``."""

    async def get(self, request: Request) -> Response:
        return self.ok(_doc())


ROUTES: Routes = [("/asyncapi.json", AsyncApi)]
