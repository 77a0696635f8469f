"""CryptoCompare (CoinDesk) legacy streaming trades: websocket client and message parser.

Protocol (``docs/formats.md#cryptocompare-streaming-trades``, confirmed against the
sources listed below):

* connect to ``wss://streamer.cryptocompare.com/v2?api_key=KEY`` (the key may also go in
  an ``Authorization: Apikey KEY`` header; we use the query parameter and never log it);
* subscribe with ``{"action":"SubAdd","subs":["0~Coinbase~BTC~USD", ...]}``
  (``0~{market}~{base}~{quote}`` is the trade channel); the server replays the latest 20
  trades of each subscription, then streams new ones, one JSON object per frame;
* every frame carries ``TYPE`` (a string such as ``"0"``; some clients report integers,
  so both are accepted). The types handled here:

  ====  ===========================================  ==========================================
  TYPE  MESSAGE                                      handling
  ====  ===========================================  ==========================================
  0     (trade)                                      :func:`parse_trade` -> ``sink.publish``
  20    STREAMERWELCOME (first frame, rate limits)   logged at debug
  16    SUBSCRIBECOMPLETE (``SUB``)                  logged at debug
  3     LOADCOMPLETE (all subs loaded)               logged at debug
  17/18 UNSUBSCRIBECOMPLETE / UNSUBSCRIBEALLCOMPLETE logged at debug
  999   HEARTBEAT (``TIMEMS``), every 30-60 s        liveness only
  401   UNAUTHORIZED (key missing/invalid/no access) logged, counted, ``state.last_error``
  429   RATE_LIMIT_OPENING_SOCKETS_TOO_FAST,         logged, counted, ``state.last_error``
        TOO_MANY_SOCKETS_MAX_{X}_PER_CLIENT,
        TOO_MANY_SUBSCRIPTIONS_MAX_{X}_PER_SOCKET
  500   INVALID_JSON, INVALID_SUB, INVALID_PARAMETER, logged, counted, ``state.last_error``
        SUBSCRIPTION_UNRECOGNIZED,
        SUBSCRIPTION_ALREADY_ACTIVE, FORCE_DISCONNECT
  else  (other channels, future types)               ignored, counted in ``state.ignored``
  ====  ===========================================  ==========================================

  Error frames look like ``{"TYPE":"500","MESSAGE":"INVALID_SUB",
  "PARAMETER":"5~CCCAGG~FOO~USD","INFO":"We have not integrated any of the exchanges FOO
  trades on ..."}``; welcome ``{"TYPE":"20","MESSAGE":"STREAMERWELCOME",
  "SERVER_NAME":"ccc-streamer01","SOCKETS_REMAINING":0,...}``; subscribe complete
  ``{"TYPE":"16","MESSAGE":"SUBSCRIBECOMPLETE","SUB":"0~Coinbase~ETH~BTC"}``; heartbeat
  ``{"TYPE":"999","MESSAGE":"HEARTBEAT","TIMEMS":1582817678330}``.

* reconnection advice from the provider: wait at least 5 s before reconnecting (more than
  60 connects a minute gets the client refused for a minute), so reconnect delays are
  ``max(backoff.next(), min_reconnect_delay_s)`` with a 5 s default; everyone is
  disconnected at least weekly and on deployments; two missed heartbeats (over a minute
  of silence) mean the socket is stale.

A trade frame (TYPE ``"0"``), with the optional ``CCSEQ`` and nanosecond parts::

    {"TYPE": "0", "M": "Coinbase", "FSYM": "BTC", "TSYM": "USD", "F": "2",
     "ID": "12345678", "TS": 1593768260, "Q": 0.01, "P": 32500.12, "TOTAL": 325.0012,
     "RTS": 1593768260, "CCSEQ": 987654321, "TSNS": 123456789, "RTSNS": 456789012}

``F`` is a side bitmask (1 SELL, 2 BUY, 4 UNKNOWN, 8 REVERSED); ``ID`` the exchange's
trade id (or seconds + 0..999 when the exchange has none); ``TS`` the exchange time in
**seconds** (CryptoCompare's receive time when the exchange gives none) with ``TSNS`` its
nanosecond part; ``RTS``/``RTSNS`` when CryptoCompare received it. The tick keeps the
exchange time (``ts_ms = TS * 1000 + TSNS // 1e6``) apart from *our* receive time
(``recv_ms``); ``RTS`` is not used.

Because the server replays the latest 20 trades of every subscription after each
(re)subscribe, the feed drops trades whose ``(market, pair, ID)`` it has already published
(a bounded memory per pair), or every reconnect would count those trades twice in bars.

Sources (public documentation; summary in ``docs/formats.md#cryptocompare-streaming-trades``):

* developers.cryptocompare.com/documentation/legacy-websockets/Trade (field meanings, the
  20-trade snapshot);
* min-api.cryptocompare.com/documentation/websockets "How To Connect" (message-type table
  20/16/3/17/18/999/401/429/500 with example frames, reconnection and stale-connection
  advice);
* github.com/api-evangelist/cryptocompare ``asyncapi/cryptocompare-asyncapi.yml`` (AsyncAPI
  description of the same protocol: envelopes, the trade example above, error MESSAGE
  values);
* client code handling ``{"TYPE":"500","MESSAGE":"INVALID_SUB","PARAMETER":...}`` and
  ``{"TYPE":"429","MESSAGE":"TOO_MANY_SOCKETS_MAX_1_PER_CLIENT",...}`` frames in several
  public repositories.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import orjson
import yarl

from core.errors import InvalidTick
from core.models import MIN_TS_MS, Tick
from core.names import NAME_RE
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import Backoff, TickSink

__all__ = [
    "ERROR_TYPES",
    "LIFECYCLE_TYPES",
    "TYPE_HEARTBEAT",
    "TYPE_TRADE",
    "CryptoCompareFeed",
    "message_type",
    "parse_message",
    "parse_trade",
    "subadd_message",
]

log = logging.getLogger(__name__)

TYPE_TRADE = "0"
TYPE_LOAD_COMPLETE = "3"
TYPE_SUBSCRIBE_COMPLETE = "16"
TYPE_UNSUBSCRIBE_COMPLETE = "17"
TYPE_UNSUBSCRIBE_ALL_COMPLETE = "18"
TYPE_WELCOME = "20"
TYPE_HEARTBEAT = "999"
TYPE_UNAUTHORIZED = "401"
TYPE_RATE_LIMIT = "429"
TYPE_SERVER_ERROR = "500"

#: Acknowledgements and connection information: logged at debug, nothing else.
LIFECYCLE_TYPES = frozenset({
    TYPE_WELCOME, TYPE_SUBSCRIBE_COMPLETE, TYPE_LOAD_COMPLETE, TYPE_UNSUBSCRIBE_COMPLETE,
    TYPE_UNSUBSCRIBE_ALL_COMPLETE,
})
#: Error envelopes (``MESSAGE`` names the error, ``PARAMETER``/``INFO`` give detail).
ERROR_TYPES = frozenset({TYPE_UNAUTHORIZED, TYPE_RATE_LIMIT, TYPE_SERVER_ERROR})

#: ``TS`` is seconds; anything this large is a unit mistake (ms/us/ns), not a date.
_MAX_TS_S = 1e11
_MAX_FRAME_CHARS_DEAD_LETTER = 65_536
#: receive has its own idle timeout; a close handshake may take at most 2 s.
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)


# --------------------------------------------------------------------------- parser


def message_type(obj: dict[str, Any]) -> str | None:
    """The frame's ``TYPE`` as a string (``"0"``, ``"999"``...), or None when absent.

    The streamer sends strings; integers (seen in some client code) are accepted too.
    """
    t = obj.get("TYPE")
    if t is None or isinstance(t, bool):
        return None
    if isinstance(t, int):
        return str(t)
    if isinstance(t, str):
        return t.strip()
    return None


def _text(obj: dict[str, Any], field: str) -> str:
    v = obj.get(field)
    if v is None:
        raise InvalidTick("missing_field", field)
    if not isinstance(v, str):
        raise InvalidTick("bad_type", f"{field} must be a string")
    v = v.strip()
    if not v:
        raise InvalidTick("missing_field", f"{field} is empty")
    return v


def _number(obj: dict[str, Any], field: str) -> float | None:
    """A JSON number (or numeric string) field, None when absent/null."""
    v = obj.get(field)
    if v is None:
        return None
    if isinstance(v, bool):
        raise InvalidTick("bad_type", f"{field} must be a number")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise InvalidTick("bad_type", f"{field}={v[:40]!r} is not a number") from None
    raise InvalidTick("bad_type", f"{field} must be a number")


def _ts_ms(obj: dict[str, Any]) -> int:
    ts_s = _number(obj, "TS")
    if ts_s is None:
        raise InvalidTick("missing_field", "TS")
    if not math.isfinite(ts_s) or ts_s < 0:
        raise InvalidTick("bad_timestamp", f"TS={ts_s!r} must be finite and >= 0")
    if ts_s >= _MAX_TS_S:
        raise InvalidTick("bad_timestamp", f"TS={ts_s!r} is not in seconds")
    ts_ms = round(ts_s * 1000)
    tsns = obj.get("TSNS")
    if tsns is not None:
        if isinstance(tsns, bool) or not isinstance(tsns, int):
            raise InvalidTick("bad_type", "TSNS must be an integer (nanoseconds)")
        if not 0 <= tsns < 1_000_000_000:
            raise InvalidTick("bad_timestamp", f"TSNS={tsns} is not a nanosecond part")
        ts_ms += tsns // 1_000_000
    if ts_ms < MIN_TS_MS:
        raise InvalidTick("ts_too_old", f"TS={ts_s:g} is before 2009-01-03")
    return ts_ms


def parse_trade(obj: dict[str, Any], recv_ms: int) -> Tick:
    """Turn one TYPE ``"0"`` trade frame into a tick.

    Mapping: ``exchange = M.lower()``, ``symbol = FSYM + TSYM``, ``price = P``,
    ``qty = Q`` (0 when absent), ``ts_ms = TS * 1000 + TSNS // 1_000_000``,
    ``trade_id = str(ID)`` (None when absent), ``source = "live"``, ``recv_ms`` ours.

    Args:
        obj: the decoded frame (its ``TYPE`` is not checked here).
        recv_ms: wall clock when our feed received the frame, UTC epoch ms.

    Returns:
        Tick: the trade.

    Raises:
        InvalidTick: ``not_object``, ``missing_field``, ``bad_type``, ``bad_name``,
            ``bad_price``, ``bad_qty``, ``bad_timestamp`` or ``ts_too_old``.
    """
    if not isinstance(obj, dict):
        raise InvalidTick("not_object", f"expected a JSON object, got {type(obj).__name__}")
    exchange = _text(obj, "M").lower()
    if not NAME_RE.match(exchange) or ":" in exchange:
        raise InvalidTick("bad_name", f"M={exchange[:60]!r}")
    symbol = _text(obj, "FSYM") + _text(obj, "TSYM")
    if not NAME_RE.match(symbol):
        raise InvalidTick("bad_name", f"FSYM+TSYM={symbol[:60]!r}")

    price = _number(obj, "P")
    if price is None:
        raise InvalidTick("missing_field", "P")
    if not math.isfinite(price) or price <= 0.0:
        raise InvalidTick("bad_price", f"P={price!r} must be finite and > 0")
    qty = _number(obj, "Q")
    if qty is None:
        qty = 0.0
    elif not math.isfinite(qty) or qty < 0.0:
        raise InvalidTick("bad_qty", f"Q={qty!r} must be finite and >= 0")

    ts_ms = _ts_ms(obj)

    raw_id = obj.get("ID")
    trade_id: str | None
    if raw_id is None or raw_id == "":
        trade_id = None
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise InvalidTick("bad_type", "ID must be a string or integer")
    else:
        trade_id = str(raw_id)

    return Tick(exchange, symbol, price, qty, ts_ms, trade_id, "live", recv_ms)


def parse_message(obj: dict[str, Any], recv_ms: int) -> Tick | None:
    """Parse one decoded streamer frame.

    Args:
        obj: the decoded JSON frame.
        recv_ms: wall clock when our feed received it, UTC epoch ms.

    Returns:
        The tick of a trade frame (TYPE ``"0"``), None for every other frame.

    Raises:
        InvalidTick: a malformed trade (see :func:`parse_trade`), or ``obj`` is not a
            JSON object.
    """
    if not isinstance(obj, dict):
        raise InvalidTick("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if message_type(obj) != TYPE_TRADE:
        return None
    return parse_trade(obj, recv_ms)


def subadd_message(subs: Sequence[str]) -> str:
    """The subscribe frame, ``{"action":"SubAdd","subs":[...]}``, as text."""
    return orjson.dumps({"action": "SubAdd", "subs": list(subs)}).decode()


def _dead_letter_key(obj: dict[str, Any]) -> str | None:
    m, f, t = obj.get("M"), obj.get("FSYM"), obj.get("TSYM")
    if isinstance(m, str) and isinstance(f, str) and isinstance(t, str):
        return f"{m.lower()}:{f}{t}"
    return None


# --------------------------------------------------------------------------- feed


class _RecentIds:
    """Trade ids published recently, per ``exchange:symbol`` (bounded, FIFO eviction)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._ids: dict[str, OrderedDict[str, None]] = {}

    def seen(self, key: str, trade_id: str) -> bool:
        """True if ``trade_id`` was already recorded for ``key``; records it otherwise."""
        ids = self._ids.setdefault(key, OrderedDict())
        if trade_id in ids:
            return True
        ids[trade_id] = None
        if len(ids) > self.per_key:
            ids.popitem(last=False)
        return False


class CryptoCompareFeed:
    """Streams CryptoCompare trades into a :class:`~feeds.live.base.TickSink` until cancelled.

    Connects, sends one ``SubAdd`` with all ``subs``, publishes trades, dead-letters
    malformed trades, and reconnects (and resubscribes) after a server close, a websocket
    error, a refused connection or ``idle_timeout_s`` without any frame. Reconnect delays
    are ``max(backoff.next(), min_reconnect_delay_s)``; the backoff is reset once a trade or
    heartbeat arrives. The API key goes in the connection URL's ``api_key`` query parameter
    and is masked in every log line and error text.

    Attributes:
        errors: count of server error frames by ``"<TYPE> <MESSAGE>"``
            (e.g. ``"401 UNAUTHORIZED"``, ``"500 INVALID_SUB"``).
        duplicates: trades skipped as re-deliveries of an already published trade id
            (the 20-trade replay after each resubscribe); also counted in
            ``state.ignored``.

    Args:
        url: streamer URL without the key, e.g. ``wss://streamer.cryptocompare.com/v2``.
        api_key: CryptoCompare API key (added as ``?api_key=``; omitted when empty).
        subs: subscription strings, e.g. ``["0~Coinbase~BTC~USD"]``.
        sink: where ticks and malformed trades go.
        state: this feed's :class:`~core.state.StateHolder` (reported in ``/health``).
        idle_timeout_s: reconnect when no frame (trade, heartbeat...) arrives for this long.
        backoff: reconnect delays.
        min_reconnect_delay_s: floor of every reconnect delay (the provider asks for 5 s).
        connect_timeout_s: limit for the TCP/TLS connect and websocket handshake.
        dedup_ids_per_pair: how many recent trade ids per pair are remembered.
    """

    def __init__(self, url: str, api_key: str, subs: Sequence[str], sink: TickSink,
                 state: StateHolder, idle_timeout_s: float, backoff: Backoff, *,
                 min_reconnect_delay_s: float = 5.0, connect_timeout_s: float = 10.0,
                 dedup_ids_per_pair: int = 1000) -> None:
        if not subs:
            raise ValueError("at least one subscription is required")
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        self.url = url
        self.subs = list(subs)
        self.sink = sink
        self.state = state
        self.idle_timeout_s = idle_timeout_s
        self.backoff = backoff
        self.min_reconnect_delay_s = min_reconnect_delay_s
        self.connect_timeout_s = connect_timeout_s
        self.errors: Counter[str] = Counter()
        self.duplicates = 0
        self._api_key = api_key
        encoded = yarl.URL().with_query(api_key=api_key).raw_query_string
        forms = {api_key, quote(api_key, safe=""), quote_plus(api_key, safe=""),
                 encoded.removeprefix("api_key=")}
        self._secrets = sorted((f for f in forms if f), key=len, reverse=True)
        self._recent = _RecentIds(dedup_ids_per_pair)
        self._conn_error: str | None = None  # last error frame on the current connection
        self._ignored_types: set[str] = set()

    def __repr__(self) -> str:
        return f"CryptoCompareFeed(url={self.url!r}, subs={self.subs!r})"

    @property
    def connect_url(self) -> yarl.URL:
        """The URL dialled, including the API key (never log it; see :meth:`redact`)."""
        u = yarl.URL(self.url)
        return u.update_query(api_key=self._api_key) if self._api_key else u

    def redact(self, text: str) -> str:
        """``text`` with the API key (raw or URL-encoded) replaced by ``***``."""
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    async def run(self) -> None:
        """Connect, subscribe, read and publish until cancelled (then state ``stopped``).

        Raises:
            asyncio.CancelledError: when cancelled (after closing socket and session).
            Exception: an unexpected error, e.g. from the sink; logged and re-raised after
                the socket and session are closed.
        """
        log.info("cryptocompare feed %s: %s, %d subscriptions", self.state.name,
                 self.redact(self.url), len(self.subs), extra={"feed": self.state.name})
        session = aiohttp.ClientSession()
        try:
            while True:
                error = await self._connect_once(session)
                delay = max(self.backoff.next(), self.min_reconnect_delay_s)
                self.state.reconnects += 1
                self.state.set_state("reconnecting", error)
                log.warning("cryptocompare feed %s: %s; reconnecting in %.2f s",
                            self.state.name, error, delay,
                            extra={"feed": self.state.name, "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            log.info("cryptocompare feed %s: stopping", self.state.name,
                     extra={"feed": self.state.name})
            raise
        except Exception as exc:
            text = self.redact(f"{type(exc).__name__}: {exc}")
            self.state.set_state("stopped", f"crashed: {text}")
            log.exception("cryptocompare feed %s crashed: %s", self.state.name, text,
                          extra={"feed": self.state.name})
            raise
        finally:
            await session.close()
            self.state.set_state("stopped")

    async def _connect_once(self, session: aiohttp.ClientSession) -> str:
        """One connection: dial, subscribe, read until it ends. Returns why it ended."""
        self._conn_error = None
        try:
            # asyncio.timeout, not wait_for (3.11's drops a cancel arriving as it completes)
            async with asyncio.timeout(self.connect_timeout_s):
                ws = await session.ws_connect(self.connect_url, autoping=True,
                                              timeout=_WS_TIMEOUT)
        except TimeoutError:
            return f"connect timed out after {self.connect_timeout_s:g} s"
        except aiohttp.WSServerHandshakeError as exc:
            return self.redact(f"websocket handshake refused: HTTP {exc.status} {exc.message}")
        except (aiohttp.ClientError, OSError) as exc:
            return self.redact(f"connect failed: {type(exc).__name__}: {exc}")
        try:
            self.state.set_state("connected")
            log.info("cryptocompare feed %s connected to %s; subscribing %s", self.state.name,
                     self.redact(self.url), ",".join(self.subs),
                     extra={"feed": self.state.name})
            await ws.send_str(subadd_message(self.subs))
            reason = await self._read(ws)
        except (aiohttp.ClientError, OSError) as exc:
            reason = self.redact(f"connection error: {type(exc).__name__}: {exc}")
        finally:
            await ws.close()
        if self._conn_error:
            reason = f"{reason} (after server error {self._conn_error})"
        return reason

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Handle frames until the connection ends; returns why it ended."""
        while True:
            try:
                msg = await ws.receive(timeout=self.idle_timeout_s)
            except TimeoutError:
                return f"no frame for {self.idle_timeout_s:g} s (idle timeout)"
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                await self._on_frame(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return self.redact(f"websocket error: {ws.exception()!r}")
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED):
                extra = f" {msg.extra}" if isinstance(msg.extra, str) and msg.extra else ""
                return self.redact(f"closed by server (code {ws.close_code}{extra})")
            else:  # PING/PONG are answered by aiohttp (autoping); nothing else is expected
                log.debug("cryptocompare feed %s: websocket %s frame", self.state.name,
                          msg.type.name)

    async def _on_frame(self, data: str | bytes) -> None:
        st = self.state
        recv = now_ms()
        st.messages += 1
        st.last_message_ms = recv
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            await self._dead_letter(data, "invalid_json", str(exc), None)
            return
        if not isinstance(obj, dict):
            await self._dead_letter(data, "not_object",
                                    f"expected a JSON object, got {type(obj).__name__}", None)
            return
        mtype = message_type(obj)
        if mtype == TYPE_TRADE:
            await self._on_trade(obj, recv)
        elif mtype == TYPE_HEARTBEAT:
            self.backoff.reset()
            log.debug("cryptocompare feed %s: heartbeat", st.name)
        elif mtype in LIFECYCLE_TYPES:
            log.debug("cryptocompare feed %s: %s %s %s", st.name, mtype, obj.get("MESSAGE"),
                      obj.get("SUB") or obj.get("INFO") or "")
        elif mtype in ERROR_TYPES:
            self._on_error(mtype, obj)
        else:
            st.ignored += 1
            label = mtype if mtype is not None else "<none>"
            if label not in self._ignored_types and len(self._ignored_types) < 100:
                self._ignored_types.add(label)
                log.info("cryptocompare feed %s: ignoring frames of TYPE %s", st.name,
                         label[:20], extra={"feed": st.name})

    async def _on_trade(self, obj: dict[str, Any], recv_ms: int) -> None:
        try:
            tick = parse_trade(obj, recv_ms)
        except InvalidTick as exc:
            await self._dead_letter(obj, exc.reason, exc.detail, _dead_letter_key(obj))
            return
        if tick.trade_id is not None and self._recent.seen(tick.key, tick.trade_id):
            self.duplicates += 1
            self.state.ignored += 1
            log.debug("cryptocompare feed %s: duplicate trade %s %s", self.state.name,
                      tick.key, tick.trade_id)
            return
        self.state.ticks += 1
        await self.sink.publish([tick])
        self.backoff.reset()

    def _on_error(self, mtype: str, obj: dict[str, Any]) -> None:
        message = str(obj.get("MESSAGE") or "")[:100]
        text = f"{mtype} {message}".strip()
        self.errors[text] += 1
        param = obj.get("PARAMETER")
        info = obj.get("INFO")
        if param:
            text += f" [{str(param)[:100]}]"
        if info:
            text += f": {str(info)[:200]}"
        text = self.redact(text)
        self._conn_error = text
        self.state.set_state(self.state.state, error=text)
        log.error("cryptocompare feed %s: server error %s", self.state.name, text,
                  extra={"feed": self.state.name, "cc_type": mtype})

    async def _dead_letter(self, payload: Any, reason: str, detail: str,
                           key: str | None) -> None:
        if isinstance(payload, str) and len(payload) > _MAX_FRAME_CHARS_DEAD_LETTER:
            payload = payload[:_MAX_FRAME_CHARS_DEAD_LETTER]
        self.state.dead_lettered += 1
        log.debug("cryptocompare feed %s: dead-letter %s: %s", self.state.name, reason,
                  detail)
        await self.sink.dead_letter(payload, reason, detail, key)
