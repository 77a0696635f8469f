"""Every Redis key marketflow uses, in one place (``<p>`` is ``redis.key_prefix``, default
``mf``). The modules that read and write them say what the values hold:

* ``<p>:latest:<exchange>:<symbol>`` and ``<p>:latest:<symbol>``: latest prices
  (:mod:`stores.latest`);
* ``<p>:exchanges:<symbol>``: exchanges that traded a symbol (:mod:`stores.latest`);
* ``<p>:sec:<exchange>:<symbol>:<epoch minute>``: per-second statistics (:mod:`stores.latest`);
* ``<p>:bar:<exchange>:<symbol>:<bucket_start_ms>``: live bars (:mod:`stores.latest`);
* ``<p>:ohlcv:gen:<symbol>`` and ``<p>:ohlcv:<symbol>:<gen>:...``: the ``/ohlcv`` cache
  (:mod:`stores.ohlcv_cache`);
* ``<p>:mode`` and ``<p>:ingest``: ingest mode and status (:mod:`stores.control`);
* ``<p>:replay:state``, ``<p>:replay:control``, ``<p>:replay:seq``: the replay protocol
  (:mod:`stores.replay_control`);
* ``<p>:gaps``: the gap job's status (:mod:`feeds.history.gaps`);
* ``<p>:history:req:<request id>``: on-demand history requests
  (:mod:`feeds.history.on_demand`);
* ``<p>:stream``: the pub/sub channel of live-bar and latest-price changes
  (:mod:`stores.stream_channel`);
* ``<p>:ratelimit:<client id>`` and ``<p>:ratelimit:@global``: the shared rate-limit
  buckets, ``<p>:streamconns:<client id>``: a client's open ``/stream`` sockets
  (:mod:`stores.rate_limit`).
"""

from __future__ import annotations

__all__ = [
    "bar_key",
    "exchanges_key",
    "gap_status_key",
    "history_request_key",
    "ingest_status_key",
    "latest_key",
    "mode_key",
    "ohlcv_entry_key",
    "ohlcv_gen_key",
    "rate_limit_key",
    "replay_control_key",
    "replay_seq_key",
    "replay_state_key",
    "seconds_key",
    "stream_channel",
    "stream_conns_key",
]


def latest_key(prefix: str, symbol: str, exchange: str | None = None) -> str:
    """Redis key of the latest price (``exchange=None``: across exchanges)."""
    if exchange is None:
        return f"{prefix}:latest:{symbol}"
    return f"{prefix}:latest:{exchange}:{symbol}"

def exchanges_key(prefix: str, symbol: str) -> str:
    """Redis key of the set of exchanges trading ``symbol``."""
    return f"{prefix}:exchanges:{symbol}"

def seconds_key(prefix: str, exchange: str, symbol: str, minute: int) -> str:
    """Redis key of one minute of per-second state (``minute`` = epoch minutes)."""
    return f"{prefix}:sec:{exchange}:{symbol}:{minute}"

def bar_key(prefix: str, exchange: str, symbol: str, bucket_start_ms: int) -> str:
    """Redis key of one live 1-minute bar."""
    return f"{prefix}:bar:{exchange}:{symbol}:{bucket_start_ms}"

def ohlcv_gen_key(prefix: str, symbol: str) -> str:
    """Redis key of the symbol's stored-bars generation."""
    return f"{prefix}:ohlcv:gen:{symbol}"

def ohlcv_entry_key(prefix: str, symbol: str, gen: int, exchange: str | None, interval: str,
              fill: str, start_ms: int, sealed_end: int) -> str:
    """Redis key of one cached sealed range."""
    return (f"{prefix}:ohlcv:{symbol}:{gen}:{exchange or '*'}:{interval}:{fill}:"
            f"{start_ms}:{sealed_end}")

def mode_key(prefix: str) -> str:
    """Redis key of the requested mode."""
    return f"{prefix}:mode"

def ingest_status_key(prefix: str) -> str:
    """Redis key of the ingesting worker's status."""
    return f"{prefix}:ingest"

def replay_state_key(prefix: str) -> str:
    """Redis key of the running replay's state (JSON string)."""
    return f"{prefix}:replay:state"

def replay_control_key(prefix: str) -> str:
    """Redis key of the command list the replay pops."""
    return f"{prefix}:replay:control"

def replay_seq_key(prefix: str) -> str:
    """Redis key of the command id counter."""
    return f"{prefix}:replay:seq"

def gap_status_key(prefix: str) -> str:
    """Redis key of the gap job's status."""
    return f"{prefix}:gaps"

def history_request_key(prefix: str, req_id: str) -> str:
    """Redis key of a request's state."""
    return f"{prefix}:history:req:{req_id}"


def stream_channel(prefix: str) -> str:
    """Redis pub/sub channel of live-bar and latest-price changes."""
    return f"{prefix}:stream"


def rate_limit_key(prefix: str, client_id: str) -> str:
    """Redis key of a client's shared token bucket (``@global``: the cluster's)."""
    return f"{prefix}:ratelimit:{client_id}"


def stream_conns_key(prefix: str, client_id: str) -> str:
    """Redis key of a client's open stream sockets (sorted set: socket id -> expiry ms)."""
    return f"{prefix}:streamconns:{client_id}"


def stream_subs_key(prefix: str, client_id: str) -> str:
    """Redis key of a client's stream subscriptions (sorted set: ``<socket id>/<sub id>``
    -> expiry ms)."""
    return f"{prefix}:streamsubs:{client_id}"
