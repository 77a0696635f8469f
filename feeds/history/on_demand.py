"""On-demand history (the Data Platform flow): request state, fetches into dynamic topics,
the writer.

1. ``GET /ohlcv`` finds a range missing from TimescaleDB and calls
   :meth:`OnDemandHistory.ask`: one Redis ``SET NX`` per request id (so concurrent
   identical requests, on any worker, trigger one fetch) and, for the first asker only,
   a request on the ``history-requests`` topic.
2. The **coordinator** agent (:mod:`agents.on_demand`, keyed by ``exchange:symbol``) hands
   each request to :meth:`OnDemandHistory.handle_request`, which creates a
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
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from mode import Service
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from core.admin import create_topic, delete_topics
from core.config import Settings
from core.errors import HistoryError
from core.kafka_security import client_security
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.history.rest import make_history_client
from sql.bars_1m import upsert_fetched_bars
from sql.pool import Database
from stores.keys import history_request_key

__all__ = ["REQUEST_TTL_S", "STALE_REQUEST_MS", "HistoryWriter", "OnDemandHistory",
           "dynamic_topic_name", "request_id"]

log = logging.getLogger(__name__)

#: how long a request's state lives in Redis (a finished range is not fetched again)
REQUEST_TTL_S = 3600
#: an unfinished request not updated for this long is taken over by the next asker
STALE_REQUEST_MS = 120_000
_FINAL = frozenset({"done", "empty", "error"})

#: ``send_request(key, value)``: publish a request on the ``history-requests`` topic
SendRequest = Callable[[bytes, bytes], Awaitable[Any]]
#: ``send_page(topic, value)``: publish one record to partition 0 of a dynamic topic and
#: wait for the broker's ack
SendPage = Callable[[str, bytes], Awaitable[Any]]


def request_id(exchange: str, symbol: str, start_ms: int, end_ms: int) -> str:
    """Identifier of an on-demand fetch of ``[start_ms, end_ms)`` for one pair."""
    return f"{exchange}:{symbol}:{start_ms}:{end_ms}"


def dynamic_topic_name(prefix: str, exchange: str, symbol: str, req_id: str) -> str:
    """``<prefix>.<exchange>.<symbol>.<8 hex of sha1(request id)>``, characters outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` (Kafka topic name rules)."""
    digest = hashlib.sha1(req_id.encode(), usedforsecurity=False).hexdigest()[:8]
    raw = f"{prefix}.{exchange}.{symbol}.{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:249]


class OnDemandHistory:
    """Request state in Redis and the fetch side of the flow (module docstring).

    Args:
        settings: the worker's settings (``history``, ``broker``, ``redis.key_prefix``,
            ``topics.history_requests``).
        redis: the worker's Redis connection.
        send_request: publishes a request (see :data:`SendRequest`).
        send_page: publishes a page or the end marker (see :data:`SendPage`).
    """

    def __init__(self, settings: Settings, redis: Redis, send_request: SendRequest,
                 send_page: SendPage) -> None:
        self.settings = settings
        self.redis = redis
        self.send_request = send_request
        self.send_page = send_page
        self.coordinator = StateHolder("coordinator", "history", "idle")
        self.writer = StateHolder("writer", "history", "idle")
        self._tasks: set[asyncio.Task[None]] = set()

    def status(self) -> dict[str, Any]:
        """The actors' states, for ``/health``."""
        return {"coordinator": self.coordinator.as_dict(), "writer": self.writer.as_dict()}

    def _key(self, req_id: str) -> str:
        return history_request_key(self.settings.redis.key_prefix, req_id)

    async def request_state(self, req_id: str) -> dict[str, Any] | None:
        """The request's state dict, None when unknown.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        raw = await self.redis.get(self._key(req_id))
        return orjson.loads(raw) if raw else None

    async def set_request(self, req_id: str, state: str, **fields: Any) -> None:
        """Move a request to ``state``, merging ``fields`` into its stored dict.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        cur = await self.request_state(req_id) or {"request_id": req_id}
        cur.update(fields, state=state, updated_ms=now_ms())
        await self.redis.set(self._key(req_id), orjson.dumps(cur).decode(), ex=REQUEST_TTL_S)

    async def ask(self, exchange: str, symbol: str, start_ms: int, end_ms: int
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
                 "updated_ms": now_ms()}
        key = self._key(req_id)
        first = await self.redis.set(key, orjson.dumps(state).decode(), nx=True,
                                     ex=REQUEST_TTL_S)
        if not first:
            cur = await self.request_state(req_id)
            if (cur is not None and cur["state"] not in _FINAL
                    and cur.get("updated_ms", 0) < now_ms() - STALE_REQUEST_MS):
                # its fetch died with a worker: take it over (compare-and-set on the old value)
                async with self.redis.pipeline(transaction=True) as pipe:
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
            await self.send_request(f"{exchange}:{symbol}".encode(), orjson.dumps(state))
            return req_id, state
        return req_id, await self.request_state(req_id) or state

    async def wait_for_request(self, req_id: str, timeout_s: float) -> dict[str, Any] | None:
        """Poll the request's state until it is final or ``timeout_s`` passed; returns the
        last state seen.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            state = await self.request_state(req_id)
            if state is None or state["state"] in _FINAL or time.monotonic() >= deadline:
                return state
            await asyncio.sleep(0.1)

    async def handle_request(self, value: bytes) -> None:
        """One ``history-requests`` record: start its fetch task unless the request is
        already past ``requested`` (so a re-delivered message never starts a second fetch).
        Malformed records and an unreachable Redis are logged, never raised."""
        try:
            req = orjson.loads(value)
            req_id = str(req["request_id"])
            exchange, symbol = str(req["exchange"]), str(req["symbol"])
            start_ms, end_ms = int(req["start_ms"]), int(req["end_ms"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("history: skipping a malformed request %r: %s", value[:200], exc)
            return
        try:
            state = await self.request_state(req_id)
        except (RedisError, OSError) as exc:
            self.coordinator.set_state("error", f"redis: {exc}")
            log.error("history: request %s not started, Redis unavailable: %s", req_id, exc)
            return
        if state is not None and state["state"] != "requested":
            return
        task = asyncio.ensure_future(self._fetch(req_id, exchange, symbol, start_ms, end_ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, req_id: str, exchange: str, symbol: str, start_ms: int,
                     end_ms: int) -> None:
        h = self.settings.history
        topic = dynamic_topic_name(h.topic_prefix, exchange, symbol, req_id)
        self.coordinator.handled += 1
        client = None
        n = 0
        error: str | None = None
        try:
            self.coordinator.set_state("creating_topic", detail=topic)
            await self.set_request(req_id, "fetching", topic=topic)
            await create_topic(self.settings, topic)
            client = make_history_client(h)
            if client is None:
                raise HistoryError("history.source is none: nothing to fetch from")
            self.coordinator.set_state("fetching", detail=req_id)
            async for page in client.fetch_minutes(exchange, symbol, start_ms, end_ms):
                if not page:
                    continue
                self.coordinator.set_state("publishing", detail=req_id)
                await self.send_page(
                    topic, orjson.dumps({"request_id": req_id, "source": client.source,
                                               "bars": page}))
                n += len(page)
                await self.set_request(req_id, "fetching", bars=n)  # progress (and not stale)
        except HistoryError as exc:
            error = str(exc)
        except (KafkaError, RedisError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                await client.close()
        if error:
            self.coordinator.set_state("error", f"{req_id}: {error}")
            log.error("history: fetch %s failed: %s", req_id, error)
        try:
            await self.send_page(
                topic, orjson.dumps({"control": "end", "request_id": req_id, "bars": n,
                                           "error": error}))
            await self.set_request(req_id, "writing", bars=n)
        except (KafkaError, RedisError, OSError) as exc:
            log.error("history: end of fetch %s not published: %s", req_id, exc)
            try:
                await self.set_request(req_id, "error", error=f"{type(exc).__name__}: {exc}")
            except (RedisError, OSError) as exc2:
                log.error("history: request %s state not saved: %s", req_id, exc2)
        if not error:
            self.coordinator.set_state("idle")


class HistoryWriter(Service):
    """Writes the bars of every dynamic topic (pattern subscription) to TimescaleDB.

    Args:
        settings: the worker's settings (``history``, ``broker``, ``app.id``).
        database: the TimescaleDB pool service.
        on_demand: where request states are kept (its ``writer`` state is this writer's).
        invalidate: drops the cached ``/ohlcv`` ranges of a set of symbols.
    """

    def __init__(self, settings: Settings, database: Database, on_demand: OnDemandHistory,
                 invalidate: Callable[[set[str]], Awaitable[Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.database = database
        self.on_demand = on_demand
        self.invalidate = invalidate
        self.status = on_demand.writer
        self._consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        """Join the writer group with a pattern subscription on the dynamic topics."""
        if self.settings.history.source == "none":
            return
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.broker.bootstrap_servers,
            group_id=f"{self.settings.app.id}-history-writer", enable_auto_commit=False,
            auto_offset_reset="earliest", metadata_max_age_ms=1000,
            session_timeout_ms=6000, heartbeat_interval_ms=2000,
            **client_security(self.settings.broker))
        await self._consumer.start()
        self._consumer.subscribe(
            pattern=f"^{re.escape(self.settings.history.topic_prefix)}\\..+")

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
                self.status.set_state("error", f"{type(exc).__name__}: {exc}")
                log.warning("history writer: %s; retrying in %.1f s", exc, delay)
                for tp in batch:
                    await self._consumer.seek_to_committed(tp)
                await self.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            for req_id, topic, n, error in finished:
                state = "error" if error else ("done" if n else "empty")
                await self.on_demand.set_request(req_id, state, bars=n, error=error)
                try:
                    await delete_topics(self.settings, [topic])
                except KafkaError as exc:
                    log.warning("history writer: topic %s not deleted: %s", topic, exc)
            self.status.set_state("idle")

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
                self.status.set_state("writing", detail=str(msg.get("request_id")))
                self.status.handled += len(bars)
                pool = await self.database.pool()
                async with pool.acquire() as conn:
                    await upsert_fetched_bars(conn, bars, str(msg.get("source", "rest")),
                                              self.settings.history.overwrite_own)
                await self.invalidate({b["symbol"] for b in bars})
        return finished
