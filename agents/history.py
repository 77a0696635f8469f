"""On-demand history (the Data Platform flow): coordinator, dynamic topics, writer.

1. ``GET /ohlcv`` finds a range missing from TimescaleDB and calls :func:`ask`: one Redis
   ``SET NX`` per request id (so concurrent identical requests, on any worker, trigger one
   fetch) and, for the first asker only, a request on the ``history-requests`` topic.
2. The **coordinator** agent (:func:`coordinate`, keyed by ``exchange:symbol``) creates a
   **dynamic topic** ``<history.topic_prefix>.<exchange>.<symbol>.<request hash>`` (one
   partition; names sanitised to ``[A-Za-z0-9._-]``), and a fetch task pages the REST
   source (:mod:`feeds.history.rest`) into it: one message per page
   ``{"request_id", "source", "bars": [...]}``, then an end marker
   ``{"control": "end", "request_id", "bars": n, "error": null|"..."}``.
3. The **writer** (:class:`HistoryWriter`) consumes every dynamic topic through a
   *pattern* subscription (``^<prefix>\\.``; a plain aiokafka consumer in group
   ``<app.id>-history-writer``, because Faust's aiokafka driver does not implement
   pattern subscriptions), upserts the bars with the conflict policy
   (:func:`sql.bars_1m.upsert_fetched_bars`), invalidates the ``/ohlcv`` cache, commits,
   and on the end marker marks the request ``done`` (or ``error``/``empty``) and deletes
   the topic.
4. The view waits up to ``history.on_demand_wait_s`` for that state, then answers with the
   merged series, or with what it has and ``"history": {"state": "fetching", ...}``.

Request state (Redis ``<p>:history:req:<request id>``, JSON, TTL :data:`REQUEST_TTL_S`;
a finished request is not fetched again while it lives): ``requested`` → ``fetching`` →
``writing`` → ``done`` | ``empty`` | ``error``. Actor states (coordinator: ``idle``,
``creating_topic``, ``fetching``, ``publishing``, ``error``; writer: ``idle``,
``writing``, ``error``) are logged on every transition and shown in ``/health``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from mode import Service
from redis.exceptions import RedisError, WatchError

from app import settings
from app.faust_app import app
from app.services import database, latest_prices, ohlcv_cache
from app.topics import history_requests_topic
from core.admin import create_topic, delete_topics
from core.errors import HistoryError
from sql.bars_1m import upsert_fetched_bars

__all__ = ["REQUEST_TTL_S", "STALE_REQUEST_MS", "ActorStatus", "HistoryWriter", "ask", "coordinate",
           "coordinator_status", "dynamic_topic_name", "request_id", "request_key",
           "request_state", "wait_for_request", "writer", "writer_status"]

log = logging.getLogger(__name__)

#: how long a request's state lives in Redis (a finished range is not fetched again)
REQUEST_TTL_S = 3600
#: an unfinished request not updated for this long is taken over by the next asker
STALE_REQUEST_MS = 120_000
_FINAL = frozenset({"done", "empty", "error"})


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def request_id(exchange: str, symbol: str, start_ms: int, end_ms: int) -> str:
    """Identifier of an on-demand fetch of ``[start_ms, end_ms)`` for one pair."""
    return f"{exchange}:{symbol}:{start_ms}:{end_ms}"


def request_key(prefix: str, req_id: str) -> str:
    """Redis key of a request's state."""
    return f"{prefix}:history:req:{req_id}"


def dynamic_topic_name(prefix: str, exchange: str, symbol: str, req_id: str) -> str:
    """``<prefix>.<exchange>.<symbol>.<8 hex of sha1(request id)>``, characters outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` (Kafka topic name rules)."""
    digest = hashlib.sha1(req_id.encode(), usedforsecurity=False).hexdigest()[:8]
    raw = f"{prefix}.{exchange}.{symbol}.{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:249]


class ActorStatus:
    """State of one actor of the flow, logged on every transition (``/health``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "idle"
        self.since_ms = _now_ms()
        self.detail: str | None = None
        self.handled = 0

    def set(self, state: str, detail: str | None = None) -> None:
        """Move to ``state`` (logged when it changes)."""
        if state != self.state:
            log.info("history %s: %s -> %s%s", self.name, self.state, state,
                     f" ({detail})" if detail else "",
                     extra={"actor": self.name, "state": state, "previous": self.state})
            self.state = state
            self.since_ms = _now_ms()
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return {"state": self.state, "since_ms": self.since_ms, "detail": self.detail,
                "handled": self.handled}


coordinator_status = ActorStatus("coordinator")
writer_status = ActorStatus("writer")


async def request_state(req_id: str) -> dict[str, Any] | None:
    """The request's state dict, None when unknown.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    raw = await latest_prices.client.get(request_key(settings.redis.key_prefix, req_id))
    return orjson.loads(raw) if raw else None


async def _set_request(req_id: str, state: str, **fields: Any) -> None:
    key = request_key(settings.redis.key_prefix, req_id)
    cur = await request_state(req_id) or {"request_id": req_id}
    cur.update(fields, state=state, updated_ms=_now_ms())
    await latest_prices.client.set(key, orjson.dumps(cur).decode(), ex=REQUEST_TTL_S)


async def ask(exchange: str, symbol: str, start_ms: int, end_ms: int
              ) -> tuple[str, dict[str, Any]]:
    """Ask for ``[start_ms, end_ms)`` of a pair to be fetched, once per request id.

    Returns:
        ``(request id, state dict)``; only the first asker publishes the request.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    req_id = request_id(exchange, symbol, start_ms, end_ms)
    state = {"request_id": req_id, "exchange": exchange, "symbol": symbol,
             "start_ms": start_ms, "end_ms": end_ms, "state": "requested",
             "updated_ms": _now_ms()}
    key = request_key(settings.redis.key_prefix, req_id)
    first = await latest_prices.client.set(key, orjson.dumps(state).decode(), nx=True,
                                           ex=REQUEST_TTL_S)
    if not first:
        cur = await request_state(req_id)
        if (cur is not None and cur["state"] not in _FINAL
                and cur.get("updated_ms", 0) < _now_ms() - STALE_REQUEST_MS):
            # its fetch died with a worker: take it over (compare-and-set on the old value)
            async with latest_prices.client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                if orjson.loads(await pipe.get(key) or "null") == cur:
                    pipe.multi()
                    pipe.set(key, orjson.dumps(state).decode(), ex=REQUEST_TTL_S)
                    try:
                        await pipe.execute()
                        first = True
                    except WatchError:
                        first = False
    if first:
        await history_requests_topic.send(key=f"{exchange}:{symbol}".encode(),
                                          value=orjson.dumps(state))
        return req_id, state
    return req_id, await request_state(req_id) or state


async def wait_for_request(req_id: str, timeout_s: float) -> dict[str, Any] | None:
    """Poll the request's state until it is final or ``timeout_s`` passed; returns the
    last state seen.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = await request_state(req_id)
        if state is None or state["state"] in _FINAL or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(0.1)


_tasks: set[asyncio.Task[None]] = set()


@app.agent(history_requests_topic)
async def coordinate(stream: Any) -> None:
    """Handle on-demand requests: start one fetch task per new request (the agent keeps
    consuming while fetches run). A request already past ``requested`` is skipped, so a
    re-delivered message never starts a second fetch."""
    async for value in stream:
        try:
            req = orjson.loads(value)
            req_id = str(req["request_id"])
            exchange, symbol = str(req["exchange"]), str(req["symbol"])
            start_ms, end_ms = int(req["start_ms"]), int(req["end_ms"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("history: skipping a malformed request %r: %s", value[:200], exc)
            continue
        try:
            state = await request_state(req_id)
        except (RedisError, OSError) as exc:
            coordinator_status.set("error", f"redis: {exc}")
            log.error("history: request %s not started, Redis unavailable: %s", req_id, exc)
            continue
        if state is not None and state["state"] != "requested":
            continue
        task = asyncio.ensure_future(_fetch(req_id, exchange, symbol, start_ms, end_ms))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


async def _fetch(req_id: str, exchange: str, symbol: str, start_ms: int, end_ms: int) -> None:
    from feeds.history.rest import make_history_client

    h = settings.history
    topic = dynamic_topic_name(h.topic_prefix, exchange, symbol, req_id)
    coordinator_status.handled += 1
    client = None
    n = 0
    error: str | None = None
    try:
        coordinator_status.set("creating_topic", topic)
        await _set_request(req_id, "fetching", topic=topic)
        await create_topic(settings, topic)
        client = make_history_client(h)
        if client is None:
            raise HistoryError("history.source is none: nothing to fetch from")
        coordinator_status.set("fetching", req_id)
        async for page in client.fetch_minutes(exchange, symbol, start_ms, end_ms):
            if not page:
                continue
            coordinator_status.set("publishing", req_id)
            await app.producer.send_and_wait(
                topic, None, orjson.dumps({"request_id": req_id, "source": client.source,
                                           "bars": page}), 0, None, None)
            n += len(page)
            await _set_request(req_id, "fetching", bars=n)  # progress (and not stale)
    except HistoryError as exc:
        error = str(exc)
    except (KafkaError, RedisError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            await client.close()
    if error:
        coordinator_status.set("error", f"{req_id}: {error}")
        log.error("history: fetch %s failed: %s", req_id, error)
    try:
        await app.producer.send_and_wait(
            topic, None, orjson.dumps({"control": "end", "request_id": req_id, "bars": n,
                                       "error": error}), 0, None, None)
        await _set_request(req_id, "writing", bars=n)
    except (KafkaError, RedisError, OSError) as exc:
        log.error("history: end of fetch %s not published: %s", req_id, exc)
        try:
            await _set_request(req_id, "error", error=f"{type(exc).__name__}: {exc}")
        except (RedisError, OSError) as exc2:
            log.error("history: request %s state not saved: %s", req_id, exc2)
    if not error:
        coordinator_status.set("idle")


class HistoryWriter(Service):
    """Writes the bars of every dynamic topic (pattern subscription) to TimescaleDB."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        """Join the writer group with a pattern subscription on the dynamic topics."""
        if settings.history.source == "none":
            return
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.broker.bootstrap_servers,
            group_id=f"{settings.app.id}-history-writer", enable_auto_commit=False,
            auto_offset_reset="earliest", metadata_max_age_ms=1000,
            session_timeout_ms=6000, heartbeat_interval_ms=2000)
        await self._consumer.start()
        self._consumer.subscribe(
            pattern=f"^{re.escape(settings.history.topic_prefix)}\\..+")

    async def on_stop(self) -> None:
        """Leave the group."""
        if self._consumer is not None:
            await self._consumer.stop()

    @Service.task
    async def _run(self) -> None:
        delay = 0.5
        while not self.should_stop:
            if self._consumer is None:
                await self.sleep(1.0)
                continue
            batch = await self._consumer.getmany(timeout_ms=500, max_records=100)
            if not batch:
                continue
            try:
                finished = await self._write(batch)
                await self._consumer.commit()
                delay = 0.5
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError,
                    RedisError) as exc:
                writer_status.set("error", f"{type(exc).__name__}: {exc}")
                log.warning("history writer: %s; retrying in %.1f s", exc, delay)
                for tp in batch:
                    await self._consumer.seek_to_committed(tp)
                await self.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            for req_id, topic, n, error in finished:
                state = "error" if error else ("done" if n else "empty")
                await _set_request(req_id, state, bars=n, error=error)
                try:
                    await delete_topics(settings, [topic])
                except KafkaError as exc:
                    log.warning("history writer: topic %s not deleted: %s", topic, exc)
            writer_status.set("idle")

    async def _write(self, batch: dict[Any, list[Any]]
                     ) -> list[tuple[str, str, int, str | None]]:
        finished = []
        for tp, records in batch.items():
            for rec in records:
                try:
                    msg = orjson.loads(rec.value)
                except orjson.JSONDecodeError:
                    log.error("history writer: undecodable message at %s@%d", tp, rec.offset)
                    continue
                if msg.get("control") == "end":
                    finished.append((str(msg["request_id"]), tp.topic, int(msg["bars"]),
                                     msg.get("error")))
                    continue
                bars = msg.get("bars") or []
                if not bars:
                    continue
                writer_status.set("writing", str(msg.get("request_id")))
                writer_status.handled += len(bars)
                pool = await database.pool()
                async with pool.acquire() as conn:
                    await upsert_fetched_bars(conn, bars, str(msg.get("source", "rest")),
                                              settings.history.overwrite_own)
                await ohlcv_cache.invalidate({b["symbol"] for b in bars})
        return finished


writer = HistoryWriter()
app.service(writer)  # type: ignore[arg-type]
