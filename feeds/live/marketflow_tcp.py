"""marketflow exchange adapter: one TCP client per exchange program.

Wire format (the marketflow exchange programs; ``docs/formats.md#exchange-protocol``):
the server pushes newline-delimited JSON, one object per line; the client
sends nothing. Sample line::

    {"symbol":"BTCUSDT","price":96391.79,"timestamp":1744631432487}

The exchange name comes from our configuration, never from the line. Parsing is tolerant:
keys are case-insensitive, ``timestamp`` may be seconds, milliseconds or microseconds
(normalised by magnitude, :func:`feeds.live.base.normalise_ts_ms`) or an RFC 3339 string, and
the receive time is kept apart from the exchange time (``Tick.recv_ms``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection
from datetime import datetime
from typing import Any

import orjson

from core.errors import InvalidTick
from core.models import Tick
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import Backoff, TickSink, normalise_ts_ms

__all__ = ["MAX_LINE_BYTES", "MarketflowExchangeFeed", "parse_line"]

log = logging.getLogger(__name__)

#: longest accepted line (Go's bufio.Scanner default token limit is 64 KiB too)
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
#: how long closing a connection may wait for the peer
_CLOSE_TIMEOUT_S = 2.0
#: how long a dial may wait for an answer (a black-holed port) before a retry
_CONNECT_TIMEOUT_S = 5.0


def _ts_ms(v: Any) -> int:
    if isinstance(v, bool):
        raise InvalidTick("bad_type", "timestamp must be a number or RFC 3339 string")
    if isinstance(v, (int, float)):
        try:
            return normalise_ts_ms(v)
        except ValueError as exc:
            raise InvalidTick("bad_timestamp", str(exc)) from None
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise InvalidTick("bad_timestamp", f"timestamp {v[:40]!r}") from None
        if dt.tzinfo is None:
            raise InvalidTick("bad_timestamp", "RFC 3339 timestamp without a UTC offset")
        return int(dt.timestamp() * 1000)
    raise InvalidTick("bad_type", "timestamp must be a number or RFC 3339 string")


def parse_line(line: bytes, exchange: str, pairs: Collection[str], recv_ms: int) -> Tick:
    """Parse one exchange line into a tick.

    Args:
        line: one line without its newline (bytes as received).
        exchange: our configured name of the exchange (e.g. ``exchange1``).
        pairs: symbols to keep (upper-case); others raise ``unknown_symbol``.
        recv_ms: wall clock when the line arrived, UTC epoch ms.

    Returns:
        Tick: ``qty`` 0 (the feed carries prices only), ``source`` ``live``.

    Raises:
        InvalidTick: ``empty``, ``invalid_json``, ``not_object``, ``missing_field``,
            ``bad_type``, ``bad_price``, ``bad_timestamp`` or ``unknown_symbol``.
    """
    if not line.strip():
        raise InvalidTick("empty", "blank line")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidTick("invalid_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise InvalidTick("not_object", f"expected a JSON object, got {type(obj).__name__}")
    fields = {str(k).lower(): v for k, v in obj.items()}
    for name in ("symbol", "price", "timestamp"):
        if fields.get(name) is None:
            raise InvalidTick("missing_field", name)
    symbol = fields["symbol"]
    if not isinstance(symbol, str):
        raise InvalidTick("bad_type", "symbol must be a string")
    symbol = symbol.strip().upper()
    if symbol not in pairs:
        raise InvalidTick("unknown_symbol", f"symbol {symbol[:40]!r} is not configured")
    price = fields["price"]
    if isinstance(price, bool) or not isinstance(price, (int, float)):
        raise InvalidTick("bad_type", "price must be a number")
    price = float(price)
    if not math.isfinite(price) or price <= 0:
        raise InvalidTick("bad_price", f"price={price!r} must be finite and > 0")
    return Tick(exchange, symbol, price, 0.0, _ts_ms(fields["timestamp"]), None, "live",
                recv_ms)


class MarketflowExchangeFeed:
    """Reads one marketflow exchange program forever.

    Reconnects on refused connection, EOF, error, or no data for ``idle_timeout_s``,
    waiting ``backoff.next()`` (exponential with jitter) between attempts.

    Args:
        name: exchange name stamped on every tick.
        host, port: the exchange program's TCP address.
        pairs: symbols to keep.
        sink: where ticks and rejected lines go.
        state: this feed's :class:`StateHolder` (reported in ``/health``).
        idle_timeout_s: silence after which the connection is dropped and re-dialled.
        backoff: reconnect delays.
    """

    def __init__(self, name: str, host: str, port: int, pairs: Collection[str],
                 sink: TickSink, state: StateHolder, idle_timeout_s: float, backoff: Backoff
                 ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.pairs = frozenset(p.upper() for p in pairs)
        self.sink = sink
        self.state = state
        self.idle_timeout_s = idle_timeout_s
        self.backoff = backoff

    async def run(self) -> None:
        """Connect, read and publish until cancelled."""
        try:
            while True:
                try:
                    await self._session()
                    error = "connection closed by the exchange (EOF)"
                except TimeoutError:  # before OSError, of which it is a subclass
                    error = f"no data for {self.idle_timeout_s:g} s"
                except OSError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                delay = self.backoff.next()
                self.state.reconnects += 1
                self.state.set_state("reconnecting", error)
                log.warning("feed %s (%s:%d): %s; reconnecting in %.1f s", self.name,
                            self.host, self.port, error, delay,
                            extra={"exchange": self.name, "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
        finally:
            self.state.set_state("stopped")

    async def _session(self) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that arrives as
        # its awaitable completes, and a feed task must stop when it is cancelled
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError as exc:  # reported as a connect failure, not as silence
            raise ConnectionError(f"connect timed out after {_CONNECT_TIMEOUT_S:g} s") from exc
        self.state.set_state("connected")
        log.info("feed %s connected to %s:%d", self.name, self.host, self.port,
                 extra={"exchange": self.name})
        buf = b""
        skipping = False  # inside an oversized line: drop bytes up to its newline
        try:
            while True:
                async with asyncio.timeout(self.idle_timeout_s):
                    chunk = await reader.read(READ_BYTES)
                if not chunk:
                    return  # EOF
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if skipping and lines:
                    lines, skipping = lines[1:], False
                if len(buf) > MAX_LINE_BYTES:
                    await self._reject(buf[:200], "oversized", f"line over {MAX_LINE_BYTES} bytes")
                    buf, skipping = b"", True
                if lines:
                    await self._handle(lines)
                    self.backoff.reset()
        finally:
            writer.close()
            try:  # bounded: a stuck peer must not hold up a reconnect or the shutdown
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await writer.wait_closed()
            except (OSError, TimeoutError) as exc:
                log.debug("feed %s: close: %r", self.name, exc)

    async def _reject(self, line: bytes, reason: str, detail: str) -> None:
        self.state.dead_lettered += 1
        await self.sink.dead_letter(line, reason, detail, key=None)

    async def _handle(self, lines: list[bytes]) -> None:
        recv = now_ms()
        st = self.state
        st.last_message_ms = recv
        st.messages += len(lines)
        ticks = []
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line.strip():
                st.ignored += 1  # blank lines are framing noise, not bad data
                continue
            try:
                ticks.append(parse_line(line, self.name, self.pairs, recv))
            except InvalidTick as exc:
                await self._reject(line, exc.reason, exc.detail)
        if ticks:
            st.ticks += len(ticks)
            await self.sink.publish(ticks)
