"""Prometheus metrics (served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BARS_CLOSED",
    "BARS_WRITTEN",
    "CACHE_REQUESTS",
    "DEAD_LETTERED",
    "DUPLICATE_TICKS",
    "LATE_TICKS",
    "PENDING_BARS",
    "SINK_ERRORS",
    "SINK_RETRIES",
    "TICKS_APPLIED",
    "TICKS_IN",
    "WATERMARK_MS",
]

TICKS_IN = Counter("marketflow_ticks_in_total", "Tick objects received on the ticks topic")
TICKS_APPLIED = Counter("marketflow_ticks_applied_total", "Ticks counted into a window")
DUPLICATE_TICKS = Counter(
    "marketflow_duplicate_ticks_total", "Ticks skipped as re-deliveries of an applied offset"
)
LATE_TICKS = Counter("marketflow_late_ticks_total", "Ticks whose window had already closed")
DEAD_LETTERED = Counter(
    "marketflow_dead_lettered_ticks_total", "Ticks sent to the dead-letter topic", ["reason"]
)
BARS_CLOSED = Counter("marketflow_bars_closed_total", "Bars closed and published", ["trigger"])
BARS_WRITTEN = Counter("marketflow_bars_written_total", "Bar rows upserted into TimescaleDB")
SINK_ERRORS = Counter("marketflow_sink_errors_total", "Failed sink writes", ["sink"])
SINK_RETRIES = Counter("marketflow_sink_retries_total", "Sink write retries", ["sink"])
WATERMARK_MS = Gauge("marketflow_watermark_ms", "Event-time watermark per partition", ["partition"])
FLUSH_SECONDS = Histogram("marketflow_bar_flush_seconds", "TimescaleDB batch upsert duration")
CACHE_REQUESTS = Counter(
    "marketflow_ohlcv_cache_requests_total",
    "Sealed-range cache lookups of /ohlcv and /udf/history", ["result"],
)

# --------------------------------------------------------------------------- history
# (REST history clients, feeds/history/rest.py; appended — keep the sections above as they are)

__all__ += ["HISTORY_BARS", "HISTORY_ERRORS", "HISTORY_REQUESTS", "HISTORY_RETRIES"]

HISTORY_REQUESTS = Counter(
    "marketflow_history_requests_total",
    "HTTP requests to a history REST source, by outcome (ok, rate_limited, server_error, "
    "timeout, connection, client_error, bad_response)", ["source", "result"],
)
HISTORY_RETRIES = Counter(
    "marketflow_history_retries_total", "History requests retried, by reason",
    ["source", "reason"],
)
HISTORY_ERRORS = Counter(
    "marketflow_history_errors_total", "History page fetches that failed for good (HistoryError)",
    ["source", "kind"],
)
HISTORY_BARS = Counter(
    "marketflow_history_bars_total", "1-minute bars received from a history source", ["source"],
)

# ---- gaps (feeds/history/gaps.py)

__all__ += ["GAPS_RECORDED", "GAP_ERRORS", "GAP_REPAIRS"]

GAPS_RECORDED = Counter("marketflow_gaps_recorded_total", "Gaps recorded, by cause",
                        ["cause"])
GAP_REPAIRS = Counter("marketflow_gap_repairs_total", "Gap repairs finished, by result",
                      ["result"])
GAP_ERRORS = Counter("marketflow_gap_errors_total",
                     "Failures of the gap job (retried), by stage", ["stage"])

# ---- Redis outages and consumer lag (stores/latest.py, agents/bars.py; appended)

__all__ += ["CONSUMER_LAG", "REDIS_BACKLOG", "REDIS_DROPPED", "REDIS_FALLBACKS",
            "REDIS_REPUBLISHED", "REDIS_WRITER_UP"]

REDIS_DROPPED = Counter(
    "marketflow_redis_dropped_total",
    "Buffered Redis writes dropped (oldest first) because the backlog hit its bound while "
    "Redis was unreachable, by kind (seconds: per-second statistics, bars: live bars)",
    ["kind"],
)
for _kind in ("seconds", "bars"):
    REDIS_DROPPED.labels(_kind)  # exported as 0 from the start
REDIS_BACKLOG = Gauge(
    "marketflow_redis_backlog", "Redis writes waiting in the worker's buffer, by kind "
    "(latest, seconds, bars)", ["kind"],
)
REDIS_REPUBLISHED = Counter(
    "marketflow_redis_republished_total",
    "Keys re-published to Redis after it came back (latest prices, open live bars)", ["kind"],
)
REDIS_FALLBACKS = Counter(
    "marketflow_redis_fallback_total",
    "HTTP answers served from TimescaleDB because a Redis read failed, by view", ["view"],
)
REDIS_WRITER_UP = Gauge(
    "marketflow_redis_writer_up", "1 while the worker's last Redis write or probe succeeded",
)
CONSUMER_LAG = Gauge(
    "marketflow_consumer_lag",
    "Messages behind on an assigned ticks partition: broker high watermark minus the "
    "committed offset (the consumer position before the first commit)",
    ["topic", "partition"],
)

# ---- late policy and trade-id dedupe (tables/aggregator.py, agents/bars.py)

__all__ += ["CORRECTIONS", "DUPLICATE_TRADES"]

CORRECTIONS = Counter(
    "marketflow_corrections_total",
    "Late ticks applied to an already-closed bar (window.late_policy = correct); the bar is "
    "re-emitted with correction=true (counted in marketflow_bars_closed_total{trigger="
    "\"correction\"})",
)
DUPLICATE_TRADES = Counter(
    "marketflow_duplicate_trades_total",
    "Ticks skipped because their window already has their (exchange, symbol, trade_id)",
)


# ---- stream integrity (agents/bars.py)

__all__ += ["SKIPPED_RECOVERED"]

SKIPPED_RECOVERED = Counter(
    "marketflow_skipped_messages_recovered_total",
    "Messages an agent's Faust stream skipped (an offset jump, or a first message of an "
    "assignment past the group's start) that the agent read back and handled, by agent "
    "(bars: ticks, sink: closed bars)",
    ["agent"],
)
#: Bars held in memory by the sink (pending + being written); at most 2 x batch_size.
PENDING_BARS = Gauge("marketflow_sink_pending_bars",
                     "Closed bars held in memory by the TimescaleDB sink (bounded)")

# ---- the WebSocket stream (views/stream_hub.py)

__all__ += ["STREAM_CONNECTIONS", "STREAM_DISCONNECTS", "STREAM_FRAMES", "STREAM_SUBSCRIPTIONS"]

STREAM_CONNECTIONS = Gauge("marketflow_stream_connections", "Open /stream sockets")
STREAM_SUBSCRIPTIONS = Gauge("marketflow_stream_subscriptions",
                             "Subscriptions on the open /stream sockets", ["channel"])
STREAM_FRAMES = Counter("marketflow_stream_frames_total", "Frames sent on /stream", ["type"])
STREAM_DISCONNECTS = Counter(
    "marketflow_stream_disconnects_total",
    "/stream sockets closed by the server, by reason (slow_consumer, send_timeout, "
    "too_many_connections, unauthorized)", ["reason"])

# ---- ingest supervision (feeds/live/supervisor.py)

__all__ += ["FEED_RESTARTS"]

FEED_RESTARTS = Counter(
    "marketflow_feed_restarts_total",
    "Ingest tasks restarted by their supervisor after a crash, by feed (an exchange name, "
    "cryptocompare, generator, or publisher)", ["feed"],
)

# ---- retention (agents/retention.py; appended)

__all__ += ["RETENTION_CHUNKS", "RETENTION_DELETED", "RETENTION_RUNS"]

RETENTION_RUNS = Counter(
    "marketflow_retention_runs_total",
    "Retention cleanup runs of the leader, by result (ok; error: a step failed, logged, "
    "retried)", ["result"],
)
for _result in ("ok", "error"):
    RETENTION_RUNS.labels(_result)  # exported as 0 from the start
RETENTION_DELETED = Counter(
    "marketflow_retention_deleted_total",
    "Rows deleted by retention, by table (bars_1m: the rows of the dropped chunks)",
    ["table"],
)
RETENTION_CHUNKS = Counter(
    "marketflow_retention_chunks_dropped_total", "bars_1m chunks dropped by retention",
)

# ---- observability: HTTP requests (views/http_metrics.py), feed and TimescaleDB writer
# state (feeds/live/manager.py, agents/sink.py; appended)

__all__ += ["FEED_CONNECTED", "HTTP_LATENCY_BUCKETS_S", "HTTP_REQUESTS", "HTTP_REQUEST_SECONDS",
            "TIMESCALEDB_WRITER_UP"]

#: upper bounds (seconds) of the HTTP latency histogram's buckets
HTTP_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0)
HTTP_REQUESTS = Counter(
    "marketflow_http_requests_total",
    "HTTP requests answered by the worker, by route template (unmatched: no route) and "
    "response status; a /stream WebSocket session is counted when it ends (status 101)",
    ["route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "marketflow_http_request_duration_seconds",
    "Time from a request reaching the worker's web server to its handler's response, by "
    "route template and status; WebSocket sessions (101) are not observed",
    ["route", "status"], buckets=HTTP_LATENCY_BUCKETS_S,
)
FEED_CONNECTED = Gauge(
    "marketflow_feed_connected",
    "1 while an ingest feed of this worker is connected, 0 while it starts, reconnects, "
    "crashed or stopped; no series while the worker runs no feed (mode off, not the leader)",
    ["feed", "kind"],
)
TIMESCALEDB_WRITER_UP = Gauge(
    "marketflow_timescaledb_writer_up",
    "1 while the worker's last bar write to TimescaleDB succeeded (1 from the sink's start "
    "until a write fails), 0 while the sink retries",
)
for _sink in ("timescaledb", "redis"):
    SINK_RETRIES.labels(_sink)  # exported as 0 from the start (the alert rules' increase())

# ---- circuit breakers of the request path (core/breaker.py)

__all__ += ["BREAKER_OPEN", "BREAKER_TRIPS"]

BREAKER_OPEN = Gauge("marketflow_breaker_open",
                     "1 while the dependency's circuit breaker is open (requests skip it)",
                     ["dependency"])
BREAKER_TRIPS = Counter("marketflow_breaker_trips_total",
                        "Times the dependency's circuit breaker opened", ["dependency"])
