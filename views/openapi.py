"""``GET /openapi.json`` (OpenAPI 3.0 document of the HTTP API) and ``GET /docs`` (the
same document as a self-contained HTML page, rendered server-side: no script, no CDN).

The document is built in one place, :data:`PATHS` plus :data:`SCHEMAS`: a new view adds
its path entry (and its response schemas) there. Every operation gets the common error
responses (401, 429, 500; 405 is implicit) from :func:`build_spec` unless it is public
(``security: []``, like ``/health``).
"""

from __future__ import annotations

import html
import json
import re
from functools import cache
from importlib import metadata
from typing import Any

from faust.web import Request, Response

from core.models import BAR_FIELDS
from core.names import NAME_PATTERN
from query.series import FILLS, INTERVALS_MS, MAX_BARS
from views.base import ApiView, Routes

__all__ = ["PATHS", "ROUTES", "SCHEMAS", "Docs", "OpenApi", "build_spec", "render_html",
           "spec", "spec_html"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref(schema)}}}


def _error(description: str) -> dict[str, Any]:
    return _json("Error", description)


def _static_file(operation_id: str, summary: str) -> dict[str, Any]:
    """A public ``GET`` of one file named by the path parameter ``name``."""
    return {"get": {
        "operationId": operation_id, "tags": ["chart"], "security": [], "summary": summary,
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string",
                                   "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"}}],
        "responses": {"200": {"description": "the file",
                              "content": {"*/*": {"schema": {"type": "string"}}}},
                      "404": _error("no such file")},
    }}


def _name_param(name: str, where: str, description: str, required: bool = True
                ) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": {"type": "string", "pattern": NAME_PATTERN},
            "example": "BTCUSDT" if name == "symbol" else "binance"}


_NUMBER = {"type": "number", "format": "double"}
#: an exact decimal (``core.models.DECIMAL_FIELDS``): a JSON string in plain notation,
#: no exponent, no trailing zeros, so no reader rounds it to a double
_DECIMAL = {"type": "string", "format": "decimal", "pattern": r"^-?[0-9]+(\.[0-9]*[1-9])?$"}
_INTERVALS = list(INTERVALS_MS)
_MS = {"type": "integer", "format": "int64", "description": "UTC epoch milliseconds"}
_ISO = {"type": "string", "format": "date-time",
        "description": "UTC ISO-8601 with milliseconds, e.g. 2024-08-08T23:55:00.000Z"}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


#: reusable response bodies (``components.schemas``)
SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {"error": _obj({
            "status": {"type": "integer", "description": "the HTTP status", "example": 400},
            "message": {"type": "string", "description": "human-readable reason",
                        "example": "missing required parameter 'symbol'"},
            "param": {"type": "string", "example": "symbol",
                      "description": "query or path parameter at fault (only when one is)"},
        }, ["status", "message"])},
        ["error"],
        "The one error shape of the API (every 4xx/5xx JSON response)."),
    "LatestPrice": _obj({
        "symbol": {"type": "string", "example": "BTCUSDT"},
        "exchange": {"type": "string", "example": "binance",
                     "description": "exchange of the newest trade"},
        "price": {**_NUMBER, "example": 61837.63},
        "timestamp": {**_MS, "example": 1723161255342,
                      "description": "trade event time, UTC epoch milliseconds"},
        "time": {**_ISO, "example": "2024-08-08T23:54:15.342Z"},
        "source": {"type": "string", "enum": ["redis", "database"],
                   "description": "redis: the newest trade; database (Redis unreachable): "
                                  "close of the newest stored 1-minute bar, stale by up to "
                                  "about a minute plus window.grace_ms"},
        "degraded": {"type": "boolean",
                     "description": "present (true) when answered from the fallback source"},
    }, ["symbol", "exchange", "price", "timestamp", "time"], "Newest trade price."),
    "Bar": _obj({
        "exchange": {"type": "string", "example": "binance-usdm", "nullable": True,
                     "description": "the requested exchange; null for bars consolidated "
                                    "across exchanges"},
        "symbol": {"type": "string", "example": "BTCUSDT"},
        "bucket_start_ms": {**_MS, "description": "bucket start (UTC-aligned to the interval)"},
        "time": _ISO,
        "open": _NUMBER, "high": _NUMBER, "low": _NUMBER, "close": _NUMBER,
        "volume": {**_DECIMAL, "example": "136.45",
                   "description": "sum of quantities (base units), exact"},
        "quote_volume": {**_DECIMAL, "nullable": True, "example": "8433295.6621",
                         "description": "sum of price * quantity (quote units), exact; "
                                        "null when a backfilled bar's source gives none"},
        "trade_count": {"type": "integer"},
        "avg_price": {**_NUMBER, "nullable": True,
                      "description": "mean trade price; null on a filled (empty) bucket"},
        "vwap": {**_DECIMAL, "nullable": True, "example": "61802.0977",
                 "description": "quote_volume / volume rounded half-up to 16 decimal "
                                "places; null without quantities or on a filled bucket"},
        "min_price": {**_NUMBER, "description": "= low"},
        "max_price": {**_NUMBER, "description": "= high"},
        "closed": {"type": "boolean",
                   "description": "false for the still-open bucket (from live state)"},
    }, list(BAR_FIELDS), "One OHLCV bucket."),
    "Ohlcv": _obj({
        "symbol": {"type": "string"},
        "exchange": {"type": "string", "nullable": True,
                     "description": "null when bars of every exchange were asked for"},
        "interval": {"type": "string", "enum": _INTERVALS},
        "fill": {"type": "string", "enum": list(FILLS)},
        "start": {**_MS, "description": "range start aligned down to the interval "
                                        "(inclusive), epoch ms"},
        "end": {**_MS, "description": "range end (exclusive), epoch ms"},
        "bars": {"type": "array", "items": _ref("Bar")},
        "degraded": {"type": "boolean", "description":
                     "present (true) when Redis was unavailable: stored bars plus only the "
                     "open minutes this worker holds in its window state"},
        "history": _obj({
            "request_id": {"type": "string"},
            "state": {"type": "string", "enum": ["requested", "fetching", "writing", "done",
                                                 "empty", "error"]},
            "bars": {"type": "integer", "description": "bars fetched so far"},
            "error": {"type": "string", "nullable": True},
        }, ["request_id", "state"], "present when part of the range was missing and an "
           "on-demand fetch was asked for (history.source configured, exchange given): "
           "state done/empty/error once finished, else the fetch is still running and a "
           "later request returns more bars"),
    }, ["symbol", "exchange", "interval", "fill", "start", "end", "bars"],
        "OHLCV buckets, oldest first."),
    "PriceStat": _obj({
        "symbol": {"type": "string", "example": "BTCUSDT"},
        "exchange": {"type": "string", "nullable": True,
                     "description": "the requested exchange; null for all exchanges"},
        "stat": {"type": "string", "enum": ["highest", "lowest", "average"]},
        "price": {**_NUMBER, "nullable": True, "example": 61860.8,
                  "description": "null (count 0) when the symbol traded, but not in the "
                                 "period"},
        "period": {"type": "string", "example": "5m"},
        "period_s": {"type": "integer", "example": 300},
        "from": {**_MS, "description": "first millisecond of the period covered"},
        "to": {**_MS, "description": "last millisecond of the period covered (inclusive)"},
        "count": {"type": "integer", "description": "ticks in the period"},
        "granularity": {"type": "string", "enum": ["second", "minute"],
                        "description": "second: exact to the second (periods up to 15 "
                                       "minutes); minute: exact to the minute at the start"},
        "source": {"type": "string", "enum": ["database"],
                   "description": "present when Redis is unreachable: computed from the "
                                  "stored 1-minute bars only (the newest minute or so is "
                                  "missing)"},
        "degraded": {"type": "boolean",
                     "description": "present (true) when answered from the fallback source"},
    }, ["symbol", "exchange", "stat", "price", "period", "period_s", "from", "to", "count",
        "granularity"], "Highest, lowest or average tick price over a period."),
    "FeedStatus": _obj({
        "kind": {"type": "string", "example": "marketflow_tcp"},
        "state": {"type": "string", "enum": ["starting", "connected", "reconnecting",
                                             "stopped"]},
        "last_message_ms": {**_MS, "nullable": True},
        "messages": {"type": "integer"},
        "ticks": {"type": "integer"},
        "dead_lettered": {"type": "integer"},
        "ignored": {"type": "integer"},
        "reconnects": {"type": "integer"},
        "restarts": {"type": "integer", "description":
                     "crashes its supervisor restarted it after (state crashed meanwhile)"},
        "last_error": {"type": "string", "nullable": True},
    }, description="One live/test feed of the ingesting worker."),
    "IngestStatus": _obj({
        "worker": {"type": "string", "example": "host:6066",
                   "description": "the ingesting worker (consumer-group leader)"},
        "mode": {"type": "string", "enum": ["live", "test", "off"]},
        "updated_ms": _MS,
        "buffered_ticks": {"type": "integer", "description":
                           "ticks waiting for the broker (grows during a broker outage)"},
        "max_buffered_ticks": {"type": "integer", "description":
                               "feeds.max_buffered_ticks: beyond it the feeds stop reading"},
        "publisher": {"allOf": [_ref("FeedStatus")], "description":
                      "the periodic flush to the broker (state running or crashed, "
                      "restarts, last_error)"},
        "feeds": {"type": "object", "additionalProperties": _ref("FeedStatus"),
                  "description": "by feed name (exchange1, cryptocompare, ...)"},
    }, description="Status written by the ingesting worker; null when none ingests."),
    "Health": _obj({
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "broker": {"type": "string", "enum": ["up", "down"]},
        "database": {"type": "string", "enum": ["up", "down"]},
        "redis": {"type": "string", "enum": ["up", "down"]},
        "details": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "error of each dependency that is down"},
        "mode": {"type": "string", "enum": ["live", "test", "off"],
                 "description": "requested ingest mode (absent when Redis is down)"},
        "ingest": {"allOf": [_ref("IngestStatus")], "nullable": True},
        "gaps": {"allOf": [_ref("GapStatus")], "nullable": True},
        "event_loop": {"type": "string", "description": "event loop of this worker",
                       "example": "uvloop"},
        "history": {"type": "object", "description": "on-demand history actors of this "
                    "worker (coordinator, writer): state, since_ms, detail, handled"},
        "redis_writer": {"type": "object", "description": "this worker's Redis writer: up, "
                         "outage_since_ms, backlog {latest, seconds, bars}, dropped "
                         "{seconds, bars}, republished_ms, last_error"},
        "breakers": {"type": "object", "description": "the request path's circuit "
                     "breakers by dependency (redis, database): state closed|open, "
                     "failures, trips, opened_ms, last_error"},
        "redis_fallback": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "present when Redis is down: where the price "
                                          "views answer from meanwhile"},
    }, ["status", "broker", "database", "redis", "details"],
        "Dependency health; a feed outage shows in ingest.feeds but keeps status ok."),
    "GapStatus": _obj({
        "state": {"type": "string", "enum": ["idle", "scanning", "repairing", "error"]},
        "last_scan_ms": {**_MS, "nullable": True},
        "open": {"type": "integer", "description": "gaps open or being repaired"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "gaps by state"},
        "source": {"type": "string", "enum": ["cryptocompare", "coindesk", "none"],
                   "description": "history source used for repairs (none: no repair)"},
        "last_error": {"type": "string", "nullable": True},
        "updated_ms": _MS,
    }, description="Gap job of the leader worker; null when no worker runs it."),
    "Gap": _obj({
        "exchange": {"type": "string", "example": "exchange2"},
        "symbol": {"type": "string", "example": "BTCUSDT"},
        "start_ms": {**_MS, "description": "first missing minute (inclusive)"},
        "end_ms": {**_MS, "description": "end of the gap (exclusive)"},
        "start": _ISO, "end": _ISO,
        "minutes": {"type": "integer"},
        "cause": {"type": "string", "enum": ["feed_outage", "scan"]},
        "state": {"type": "string",
                  "enum": ["open", "repairing", "repaired", "unrepairable"]},
        "detail": {"type": "string", "nullable": True},
        "detected_ms": _MS, "updated_ms": _MS,
    }, ["exchange", "symbol", "start_ms", "end_ms", "start", "end", "minutes", "cause",
        "state", "detail", "detected_ms", "updated_ms"],
        "Minutes [start, end) of one pair without bars while it was active."),
    "Gaps": _obj({"gaps": {"type": "array", "items": _ref("Gap")}}, ["gaps"],
                 "Known gaps, newest first."),
    "Mode": _obj({
        "mode": {"type": "string", "enum": ["live", "test", "off"]},
        "ingest": {"allOf": [_ref("IngestStatus")], "nullable": True},
    }, ["mode", "ingest"], "Requested mode and the ingesting worker's status."),
    "ModeSwitched": _obj({
        "mode": {"type": "string", "enum": ["live", "test"]},
        "previous": {"type": "string", "enum": ["live", "test", "off"]},
    }, ["mode", "previous"]),
}

_LATEST_RESPONSES = {
    "200": _json("LatestPrice", "the newest price"),
    "400": _error("malformed symbol or exchange name"),
    "404": _error("no price known for the symbol (on that exchange)"),
    "503": _error("Redis unreachable"),
}

_STAT_DESCRIPTION = (
    "Over the ticks with event time in the period: exact to the second for periods up to "
    "15 minutes, exact to the minute at the start of longer ones. average is the mean of "
    "the tick prices.")
_STAT_PARAM = {"name": "stat", "in": "path", "required": True,
               "schema": {"type": "string", "enum": ["highest", "lowest", "average"]}}
_PERIOD_PARAM = {"name": "period", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": r"^[0-9]+[smhd]$",
                            "default": "24h"},
                 "description": "<n>s|m|h|d, e.g. 1s, 30s, 5m, 15m, 1h, 24h, 7d; at most 31d",
                 "example": "5m"}
_STAT_RESPONSES = {
    "200": _json("PriceStat", "the statistic"),
    "400": _error("malformed name or period, unknown statistic or parameter"),
    "404": _error("the symbol (on that exchange) never traded"),
    "503": _error("Redis or the database unavailable"),
}

#: every path of the API: one entry per view (method -> OpenAPI operation)
PATHS: dict[str, dict[str, Any]] = {
    "/prices/latest/{symbol}": {"get": {
        "operationId": "latestPrice", "tags": ["prices"],
        "summary": "Newest trade price of a symbol on any exchange",
        "parameters": [_name_param("symbol", "path", "trading pair, e.g. BTCUSDT")],
        "responses": _LATEST_RESPONSES,
    }},
    "/prices/latest/{exchange}/{symbol}": {"get": {
        "operationId": "latestPriceOnExchange", "tags": ["prices"],
        "summary": "Newest trade price of a symbol on one exchange",
        "parameters": [_name_param("exchange", "path", "exchange name, e.g. binance"),
                       _name_param("symbol", "path", "trading pair, e.g. BTCUSDT")],
        "responses": _LATEST_RESPONSES,
    }},
    "/prices/{stat}/{symbol}": {"get": {
        "operationId": "priceStat", "tags": ["prices"],
        "summary": "Highest, lowest or average price of a symbol over a period, all "
                   "exchanges",
        "description": _STAT_DESCRIPTION,
        "parameters": [_STAT_PARAM,
                       _name_param("symbol", "path", "trading pair, e.g. BTCUSDT"),
                       _PERIOD_PARAM],
        "responses": _STAT_RESPONSES,
    }},
    "/prices/{stat}/{exchange}/{symbol}": {"get": {
        "operationId": "priceStatOnExchange", "tags": ["prices"],
        "summary": "Highest, lowest or average price of a symbol over a period, one "
                   "exchange",
        "description": _STAT_DESCRIPTION,
        "parameters": [_STAT_PARAM,
                       _name_param("exchange", "path", "exchange name, e.g. binance"),
                       _name_param("symbol", "path", "trading pair, e.g. BTCUSDT"),
                       _PERIOD_PARAM],
        "responses": _STAT_RESPONSES,
    }},
    "/ohlcv": {"get": {
        "operationId": "ohlcv", "tags": ["bars"],
        "summary": "OHLCV bars (1m to 1d) from TimescaleDB plus the live open bucket",
        "description": "Buckets whose start lies in [start aligned down to the interval, "
                       "end); larger intervals are rolled up from the 1-minute bars, "
                       "aligned to UTC midnight. Defaults: end = now, start = end - 100 "
                       f"intervals; more than {MAX_BARS} buckets is refused. The still-open "
                       "bucket is included from live state with closed = false.",
        "parameters": [
            _name_param("symbol", "query", "trading pair, e.g. BTCUSDT"),
            _name_param("exchange", "query", "only bars of this exchange; absent: one bar "
                        "per bucket consolidated across exchanges", required=False),
            {"name": "start", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "epoch milliseconds or ISO-8601 (naive = UTC)",
             "example": "2024-08-08T23:50:00Z"},
            {"name": "end", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "epoch milliseconds or ISO-8601 (naive = UTC), exclusive",
             "example": "2024-08-09T00:10:00Z"},
            {"name": "interval", "in": "query", "required": False,
             "schema": {"type": "string", "enum": _INTERVALS, "default": "1m"},
             "description": "bucket length"},
            {"name": "fill", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(FILLS), "default": "none"},
             "description": "none: omit buckets without trades; previous: fill gaps after "
                          "the first bar with a flat bar at the previous close, volume 0"},
        ],
        "responses": {
            "200": _json("Ohlcv", "buckets in the range, oldest first"),
            "400": _error("unknown parameter, bad name, time, interval or fill, "
                          f"start >= end, or more than {MAX_BARS} buckets"),
            "404": _error("the symbol (on that exchange) has no bars at all (and an "
                          "on-demand fetch found none)"),
            "502": _error("the on-demand fetch of a pair without stored bars failed"),
            "503": _error("database or Redis unavailable"),
        },
    }},
    "/gaps": {"get": {
        "operationId": "gaps", "tags": ["bars"],
        "summary": "Known gaps of the 1-minute bars (feed outages, scan) and their repair",
        "description": "Gaps are minutes [start, end) of a pair without bars while it was "
                       "active: from feed outages, or found by the periodic scan. With a "
                       "history source they are backfilled (only minutes without a bar).",
        "parameters": [
            _name_param("exchange", "query", "only gaps of this exchange", required=False),
            _name_param("symbol", "query", "only gaps of this symbol", required=False),
            {"name": "state", "in": "query", "required": False,
             "schema": {"type": "string",
                        "enum": ["open", "repairing", "repaired", "unrepairable"]}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        ],
        "responses": {
            "200": _json("Gaps", "gaps, newest first"),
            "400": _error("unknown parameter, bad name, state or limit"),
            "503": _error("database unavailable"),
        },
    }},
    "/health": {"get": {
        "operationId": "health", "tags": ["operations"], "security": [],
        "summary": "Broker, database and Redis health (never needs a token)",
        "responses": {
            "200": _json("Health", "every dependency is up"),
            "503": _json("Health", "a dependency is down (status degraded)"),
        },
    }},
    "/metrics": {"get": {
        "operationId": "metrics", "tags": ["operations"],
        "summary": "Prometheus metrics (text exposition format)",
        "responses": {"200": {"description": "Prometheus text exposition",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/mode": {"get": {
        "operationId": "getMode", "tags": ["mode"],
        "summary": "Requested ingest mode and the ingesting worker's status",
        "responses": {
            "200": _json("Mode", "the mode"),
            "503": _error("Redis unavailable"),
        },
    }},
    "/mode/{mode}": {"post": {
        "operationId": "switchMode", "tags": ["mode"],
        "summary": "Switch the cluster's ingest to live or test",
        "description": "Any worker accepts it; the ingesting worker (the group leader) "
                       "applies it within about a second.",
        "parameters": [{"name": "mode", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": ["live", "test"]}}],
        "responses": {
            "200": _json("ModeSwitched", "switched"),
            "400": _error("unknown mode"),
            "409": _error("already in that mode"),
            "503": _error("Redis unavailable"),
        },
    }},
    "/udf/config": {"get": {
        "operationId": "udfConfig", "tags": ["tradingview"],
        "summary": "TradingView UDF configuration (supported resolutions, exchanges)",
        "responses": {"200": {"description": "UDF config",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/udf/symbols": {"get": {
        "operationId": "udfSymbols", "tags": ["tradingview"],
        "summary": "LibrarySymbolInfo of SYMBOL (consolidated) or EXCHANGE:SYMBOL",
        "parameters": [{"name": "symbol", "in": "query", "required": True,
                        "schema": {"type": "string", "maxLength": 81}}],
        "responses": {"200": {"description": "symbol info",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "400": {"description": "bad name",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "404": {"description": "unknown symbol",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/udf/search": {"get": {
        "operationId": "udfSearch", "tags": ["tradingview"],
        "summary": "Symbols whose exchange:symbol contains the query (case-insensitive)",
        "parameters": [
            {"name": "query", "in": "query", "schema": {"type": "string", "maxLength": 64}},
            {"name": "type", "in": "query", "schema": {"type": "string"}},
            {"name": "exchange", "in": "query", "schema": {"type": "string"}},
            {"name": "limit", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "maximum": 100}}],
        "responses": {"200": {"description": "matches",
                              "content": {"application/json": {"schema": {"type": "array"}}}},
                      "400": {"description": "bad parameter",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/udf/history": {"get": {
        "operationId": "udfHistory", "tags": ["tradingview"],
        "summary": "Bars {s, t, o, h, l, c, v} (t in Unix seconds, v exact decimal strings "
                   "as Bar.volume); s=no_data with nextTime",
        "description": (f"Bars starting in [from, to] (Unix seconds). A range of more than "
                        f"{MAX_BARS} buckets, or a countback above {MAX_BARS}, is not "
                        f"refused: the newest {MAX_BARS} buckets come back, and a chart "
                        "paging back (its next request ends before the oldest bar it got) "
                        "ends on s=no_data without nextTime once nothing older is stored. "
                        "While Redis is unavailable the body has degraded: true (stored "
                        "bars plus the open minutes this worker holds)."),
        "parameters": [
            {"name": "symbol", "in": "query", "required": True,
             "schema": {"type": "string", "maxLength": 81}},
            {"name": "resolution", "in": "query", "required": True,
             "schema": {"type": "string",
                        "enum": ["1", "5", "15", "30", "60", "240", "1D", "D"]}},
            {"name": "from", "in": "query", "required": True, "schema": {"type": "integer"}},
            {"name": "to", "in": "query", "required": True, "schema": {"type": "integer"}},
            {"name": "countback", "in": "query", "schema": {"type": "integer", "minimum": 1},
             "description": f"the newest N bars starting at or before to (from is then "
                            f"ignored); at most {MAX_BARS} come back"}],
        "responses": {"200": {"description": "bars or no_data",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "400": {"description": "bad parameter",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "404": {"description": "unknown symbol",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "503": {"description": "database unavailable",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/udf/time": {"get": {
        "operationId": "udfTime", "tags": ["tradingview"],
        "summary": "Server time, Unix seconds (text/plain)",
        "responses": {"200": {"description": "seconds",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/replay/status": {"get": {
        "operationId": "replayStatus", "tags": ["replay"],
        "summary": "State and simulated clock of the running market replay",
        "description": "A stopped or finished replay stays visible for 10 s.",
        "responses": {
            "200": {"description": "replay state: session, state, speed, clock_ms, clock, "
                                   "position, total, rate, eta_s, source, namespace",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "404": _error("no replay is running"),
            "503": _error("Redis unavailable"),
        },
    }},
    "/replay/{command}": {"post": {
        "operationId": "replayCommand", "tags": ["replay"],
        "summary": "pause, resume, stop, seek (?to=) or speed (?x=) the running replay",
        "parameters": [
            {"name": "command", "in": "path", "required": True,
             "schema": {"type": "string",
                        "enum": ["pause", "resume", "stop", "seek", "speed"]}},
            {"name": "to", "in": "query", "required": False,
             "description": "seek target: ISO-8601 or epoch ms (seek only)",
             "schema": {"type": "string"}},
            {"name": "x", "in": "query", "required": False,
             "description": "speed factor, 0 = as fast as possible (speed only)",
             "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {"description": "applied; the new state",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "202": {"description": "queued, not applied within 3 s; the current state",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": _error("unknown command or bad to/x"),
            "404": _error("no replay is running"),
            "409": _error("not in that state (already paused, not paused, ended)"),
            "503": _error("Redis unavailable"),
        },
    }},
    "/": {"get": {
        "operationId": "chartPage", "tags": ["chart"], "security": [],
        "summary": "The chart page: candlesticks and volume, live over /stream, replay panel",
        "responses": {"200": {"description": "HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}},
                      "404": _error("the page is not installed")},
    }},
    "/static/{name}": _static_file(
        "staticFile", "A file of the chart page (JS modules, CSS, /static/datafeed.js)"),
    "/static/vendor/{name}": _static_file(
        "vendorFile", "A vendored file (Lightweight Charts build, its LICENSE and NOTICE)"),
    "/stream": {"get": {
        "operationId": "stream", "tags": ["stream"],
        "summary": "WebSocket stream of bars, latest prices and the replay state",
        "description": ("Upgrade to a WebSocket (`Upgrade: websocket`); the frames are in "
                        "the AsyncAPI document [/asyncapi.json](asyncapi.json) and "
                        "docs/stream.md. Example: send `{\"op\": \"subscribe\", \"id\": "
                        "\"c1\", \"channel\": \"bars\", \"symbol\": \"BTCUSDT\"}`, "
                        "get a `snapshot` frame, then `bar` frames. With auth on, the token "
                        "goes in the Authorization header or a first `{\"op\": \"auth\"}` "
                        "frame."),
        "responses": {"101": {"description": "switching to the WebSocket protocol"},
                      "426": _error("not a WebSocket upgrade request")},
    }},
    "/asyncapi.json": {"get": {
        "operationId": "asyncapi", "tags": ["documentation"],
        "summary": "AsyncAPI 2.6 document of the WebSocket stream /stream",
        "responses": {"200": {"description": "the document",
                              "content": {"application/json": {
                                  "schema": {"type": "object"}}}}},
    }},
    "/openapi.json": {"get": {
        "operationId": "openapi", "tags": ["documentation"],
        "summary": "This OpenAPI 3.0 document",
        "responses": {"200": {"description": "the document",
                              "content": {"application/json": {
                                  "schema": {"type": "object"}}}}},
    }},
    "/docs": {"get": {
        "operationId": "docs", "tags": ["documentation"],
        "summary": "This document as an HTML page",
        "responses": {"200": {"description": "HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}},
    }},
}

_COMMON_ERRORS = {
    "401": {"description": "missing or invalid bearer token (when auth is enabled)",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                             "description": "Bearer challenge"}},
            "content": {"application/json": {"schema": _ref("Error")}}},
    "403": {"description": "the credential lacks the operation's scope "
                           "(`x-required-scope`), or the series is outside its symbols or "
                           "exchanges (docs/security.md)",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                             "description": "Bearer challenge, "
                                                            "error=\"insufficient_scope\""}},
            "content": {"application/json": {"schema": _ref("Error")}}},
    "429": {"description": "rate limit exceeded",
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds to wait"}},
            "content": {"application/json": {"schema": _ref("Error")}}},
    "500": _error("unexpected server error (no details; the server logs it with the ref)"),
}

_DESCRIPTION = """Real-time crypto market data: latest prices and 1-minute OHLCV bars.

**Authentication.** When the server enables it (`auth.enabled`), every path except
`/health` and the chart page needs `Authorization: Bearer <token>`: a configured API key or
a JWT (HS256 with the configured secret, RS256/ES256 with a configured public key or JWKS;
`exp`, `nbf`, `aud`, `iss` checked). Missing or invalid credentials get 401.

**Scopes.** Each operation names the scope it needs in `x-required-scope`: `read` (every
GET and the stream), `control` (mode switch, replay control); on-demand history fetches
happen only for `admin`. A valid credential without the scope, or outside the symbols or
exchanges it is limited to, gets 403 naming the reason. A per-client rate limit
(`auth.rate_limit_per_s`, `auth.rate_limit_burst`) answers 429 with `Retry-After`.

**Errors.** Every error is `{"error": {"status": 400, "message": "...", "param": "symbol"}}`
(`param` only when one parameter is at fault); a method a path does not support gets 405
with an `Allow` header."""


def _version() -> str:
    try:
        return metadata.version("marketflow")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.0 document: :data:`PATHS` and :data:`SCHEMAS` plus the bearer
    security scheme and, on every operation not marked public, the common errors."""
    paths: dict[str, Any] = {}
    for path, ops in PATHS.items():
        paths[path] = {}
        for method, op in ops.items():
            op = {**op, "responses": dict(op["responses"])}
            public = op.get("security") == []
            for code, resp in _COMMON_ERRORS.items():
                if public and code in ("401", "403", "429"):
                    continue
                op["responses"].setdefault(code, resp)
            if not public:
                op.setdefault("x-required-scope",
                              "read" if method in ("get", "head") else "control")
            paths[path][method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "marketflow HTTP API", "version": _version(),
                 "description": _DESCRIPTION,
                 "license": {"name": "Apache-2.0"}},
        "tags": [{"name": t} for t in
                 ("prices", "bars", "mode", "operations", "documentation")],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "API key or JWT (only when auth.enabled; scopes in each "
                               "operation's x-required-scope)"}},
        },
        "security": [{"bearerAuth": []}],
    }


# -- HTML rendering -----------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
    if "allOf" in schema:
        out = " &amp; ".join(_schema_type(s) for s in schema["allOf"])
    elif schema.get("type") == "array":
        out = "array of " + _schema_type(schema.get("items", {}))
    elif schema.get("type") == "object" and "additionalProperties" in schema:
        out = "map of " + _schema_type(schema["additionalProperties"])
    else:
        out = _e(schema.get("type", "any"))
        if "format" in schema:
            out += f" ({_e(schema['format'])})"
    if "enum" in schema:
        out += ": " + " | ".join(f"<code>{_e(v)}</code>" for v in schema["enum"])
    if schema.get("nullable"):
        out += " or null"
    return out


def _table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _paragraphs(text: str) -> str:
    """Escaped paragraphs; ``code`` and **bold** spans become tags."""
    out = []
    for p in text.split("\n\n"):
        h = _e(p).replace("\n", " ")
        h = re.sub(r"`([^`]+)`", r"<code>\1</code>", h)
        h = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", h)
        out.append(f"<p>{h}</p>")
    return "".join(out)


def _operation(path: str, method: str, op: dict[str, Any], spec: dict[str, Any]) -> str:
    anchor = _e(op.get("operationId", f"{method}-{path}"))
    open_ = op.get("security", spec.get("security")) == []
    lock = "" if open_ else (' <span class="lock">bearer token with scope '
                             f'{_e(op.get("x-required-scope", "read"))} when auth is '
                             'enabled</span>')
    parts = [f'<section class="op" id="{anchor}"><h3><span class="method">'
             f"{_e(method.upper())}</span> <code>{_e(path)}</code>{lock}</h3>",
             f"<p>{_e(op.get('summary', ''))}</p>"]
    if op.get("description"):
        parts.append(_paragraphs(op["description"]))
    params = [[f"<code>{_e(p['name'])}</code>", _e(p["in"]),
               "yes" if p.get("required") else "no", _schema_type(p.get("schema", {})),
               _e(p.get("description", "")),
               f"<code>{_e(p['example'])}</code>" if "example" in p else ""]
              for p in op.get("parameters", [])]
    if params:
        parts.append("<h4>Parameters</h4>" + _table(
            ["name", "in", "required", "type", "description", "example"], params))
    rows = []
    for code, resp in sorted(op["responses"].items()):
        content = resp.get("content", {})
        kinds = ", ".join(f"<code>{_e(ct)}</code> {_schema_type(c.get('schema', {}))}"
                          for ct, c in content.items())
        headers = ", ".join(f"<code>{_e(h)}</code>" for h in resp.get("headers", {}))
        rows.append([f"<b>{_e(code)}</b>", _e(resp.get("description", "")), kinds, headers])
    parts.append("<h4>Responses</h4>" + _table(
        ["status", "meaning", "body", "headers"], rows))
    parts.append("</section>")
    return "".join(parts)


def _schema_section(name: str, schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = [[f"<code>{_e(prop)}</code>", _schema_type(sub),
             "yes" if prop in required else "no", _e(sub.get("description", "")),
             f"<code>{_e(json.dumps(sub['example']))}</code>" if "example" in sub else ""]
            for prop, sub in schema.get("properties", {}).items()]
    out = [f'<section class="schema" id="schema-{_e(name)}"><h3>{_e(name)}</h3>']
    if schema.get("description"):
        out.append(f"<p>{_e(schema['description'])}</p>")
    out.append(_table(["field", "type", "required", "description", "example"], rows))
    for prop, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            out.append(f"<h4><code>{_e(name)}.{_e(prop)}</code></h4>")
            out.append(_schema_section(f"{name}.{prop}", sub))
    out.append("</section>")
    return "".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.4}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}code{background:#f5f5f5;padding:0 .2rem}
.op{border-top:2px solid #ddd;padding-top:.5rem}.method{background:#246;color:#fff;
padding:.1rem .4rem;border-radius:3px;font-size:.9em}
.lock{font-size:.75em;font-weight:normal;color:#a40}"""


def render_html(spec: dict[str, Any]) -> str:
    """A standalone HTML page for an OpenAPI 3.0 document (every value escaped)."""
    info = spec["info"]
    toc, ops = [], []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            anchor = _e(op.get("operationId", f"{method}-{path}"))
            toc.append(f'<li><a href="#{anchor}">{_e(method.upper())} {_e(path)}</a> '
                       f"&mdash; {_e(op.get('summary', ''))}</li>")
            ops.append(_operation(path, method, op, spec))
    schemas = [_schema_section(n, s) for n, s in spec["components"]["schemas"].items()]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(info['title'])}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(info['title'])} <small>{_e(info['version'])}</small></h1>"
        f"{_paragraphs(info.get('description', ''))}"
        f'<p>Machine-readable: <a href="openapi.json">/openapi.json</a> '
        f"(OpenAPI {_e(spec['openapi'])}); the WebSocket stream: "
        f'<a href="asyncapi.json">/asyncapi.json</a> (AsyncAPI 2.6).</p>'
        f"<h2>Endpoints</h2><ul>{''.join(toc)}</ul>{''.join(ops)}"
        f"<h2>Schemas</h2>{''.join(schemas)}</body></html>"
    )


@cache
def spec() -> dict[str, Any]:
    """The document (:func:`build_spec`), built on first use."""
    return build_spec()


@cache
def spec_html() -> str:
    """The document's HTML page (:func:`render_html`), built on first use."""
    return render_html(spec())


def __getattr__(name: str) -> Any:
    # ``views.openapi.SPEC``: the document, built on first access, not at import
    if name == "SPEC":
        return spec()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OpenApi(ApiView):
    """The OpenAPI 3.0 document."""

    async def get(self, request: Request) -> Response:
        return self.ok(spec())


class Docs(ApiView):
    """The API documentation page."""

    async def get(self, request: Request) -> Response:
        return self.html(spec_html())


ROUTES: Routes = [("/openapi.json", OpenApi), ("/docs", Docs)]
