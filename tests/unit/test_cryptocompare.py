"""CryptoCompare streamer: the pure parser, and the feed against a local fake streamer
(:mod:`tests.support.cc_server`) speaking the documented protocol."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.errors import InvalidTick
from core.models import Tick, parse_tick, tick_to_json
from core.state import StateHolder
from feeds.live.base import Backoff
from feeds.live.cryptocompare import CryptoCompareFeed, message_type, parse_message, subadd_message
from tests.support.cc_server import CryptoCompareServer, make_trade, wait_until

KEY = "s3cret-key-0123456789abcdef"
SUBS = ["0~Coinbase~BTC~USD", "0~Coinbase~ETH~USD"]
RECV = 1_700_000_000_123

# The documented trade example (developers.cryptocompare.com legacy-websockets/Trade fields,
# AsyncAPI example payload), plus the optional nanosecond parts.
DOC_TRADE: dict[str, Any] = {
    "TYPE": "0", "M": "Coinbase", "FSYM": "BTC", "TSYM": "USD", "F": "2",
    "ID": "12345678", "TS": 1593768260, "Q": 0.01, "P": 32500.12, "TOTAL": 325.0012,
    "RTS": 1593768261, "CCSEQ": 987654321,
}


# --------------------------------------------------------------------------- parser


def test_documented_trade_maps_to_exact_tick() -> None:
    tick = parse_message(DOC_TRADE, RECV)
    assert tick == Tick(exchange="coinbase", symbol="BTCUSD", price=32500.12, qty=0.01,
                        ts_ms=1_593_768_260_000, trade_id="12345678", source="live",
                        recv_ms=RECV)
    # exchange time from TS, not CryptoCompare's receive time RTS, nor ours
    assert tick.ts_ms == DOC_TRADE["TS"] * 1000 != DOC_TRADE["RTS"] * 1000
    # and it passes the ticks-topic validation unchanged
    assert parse_tick(tick_to_json(tick), now_ms=RECV, max_future_ms=300_000) == tick


def test_tsns_adds_milliseconds() -> None:
    tick = parse_message({**DOC_TRADE, "TSNS": 987_654_321, "RTSNS": 5}, RECV)
    assert tick is not None and tick.ts_ms == 1_593_768_260_987
    tick = parse_message({**DOC_TRADE, "TSNS": 999_999}, RECV)  # < 1 ms
    assert tick is not None and tick.ts_ms == 1_593_768_260_000


def test_optional_fields() -> None:
    trade = {k: v for k, v in DOC_TRADE.items() if k not in ("Q", "ID", "CCSEQ", "TOTAL")}
    tick = parse_message(trade, RECV)
    assert tick is not None and tick.qty == 0.0 and tick.trade_id is None
    tick = parse_message({**DOC_TRADE, "ID": 42, "TYPE": 0}, RECV)  # integer TYPE / ID
    assert tick is not None and tick.trade_id == "42"


@pytest.mark.parametrize(("change", "reason"), [
    ({"P": None}, "missing_field"),
    ({"P": 0}, "bad_price"),
    ({"P": -1.5}, "bad_price"),
    ({"P": "abc"}, "bad_type"),
    ({"P": True}, "bad_type"),
    ({"Q": -1}, "bad_qty"),
    ({"TS": None}, "missing_field"),
    ({"TS": 1593768260000}, "bad_timestamp"),  # milliseconds, not seconds
    ({"TS": 12}, "ts_too_old"),
    ({"TSNS": 2_000_000_000}, "bad_timestamp"),
    ({"TSNS": 1.5}, "bad_type"),
    ({"M": None}, "missing_field"),
    ({"M": 7}, "bad_type"),
    ({"M": "Coin base"}, "bad_name"),
    ({"FSYM": ""}, "missing_field"),
    ({"TSYM": "U:SD"}, "bad_name"),
    ({"ID": [1]}, "bad_type"),
])
def test_malformed_trade_raises(change: dict[str, Any], reason: str) -> None:
    trade = {k: v for k, v in {**DOC_TRADE, **change}.items() if v is not None}
    with pytest.raises(InvalidTick) as err:
        parse_message(trade, RECV)
    assert err.value.reason == reason


@pytest.mark.parametrize("frame", [
    {"TYPE": "20", "MESSAGE": "STREAMERWELCOME", "SERVER_NAME": "ccc-streamer01"},
    {"TYPE": "16", "MESSAGE": "SUBSCRIBECOMPLETE", "SUB": "0~Coinbase~ETH~BTC"},
    {"TYPE": "3", "MESSAGE": "LOADCOMPLETE", "INFO": "All your valid subs have been loaded."},
    {"TYPE": "999", "MESSAGE": "HEARTBEAT", "TIMEMS": 1582817678330},
    {"TYPE": "401", "MESSAGE": "UNAUTHORIZED", "PARAMETER": "format"},
    {"TYPE": "500", "MESSAGE": "INVALID_SUB", "PARAMETER": "5~CCCAGG~FOO~USD"},
    {"TYPE": "2", "MARKET": "Coinbase", "FROMSYMBOL": "BTC", "TOSYMBOL": "USD", "PRICE": 1.0},
    {"MESSAGE": "no type at all"},
])
def test_non_trade_frames_give_none(frame: dict[str, Any]) -> None:
    assert parse_message(frame, RECV) is None


def test_message_type_and_subadd() -> None:
    assert message_type({"TYPE": 429}) == "429"
    assert message_type({"TYPE": " 0"}) == "0"
    assert message_type({"TYPE": None}) is None
    assert subadd_message(SUBS) == '{"action":"SubAdd","subs":["0~Coinbase~BTC~USD",' \
                                   '"0~Coinbase~ETH~USD"]}'


# --------------------------------------------------------------------------- feed


class MemorySink:
    """Records what a feed publishes and dead-letters."""

    def __init__(self) -> None:
        self.batches: list[list[Tick]] = []
        self.dead: list[tuple[Any, str, str, str | None]] = []

    @property
    def ticks(self) -> list[Tick]:
        return [t for b in self.batches for t in b]

    async def publish(self, ticks: list[Tick]) -> None:
        self.batches.append(list(ticks))

    async def dead_letter(self, payload: Any, reason: str, detail: str,
                          key: str | None = None) -> None:
        self.dead.append((payload, reason, detail, key))


def make_feed(url: str, sink: MemorySink, *, api_key: str = KEY, subs: list[str] | None = None,
              idle_timeout_s: float = 5.0) -> CryptoCompareFeed:
    return CryptoCompareFeed(
        url, api_key, SUBS if subs is None else subs, sink,
        StateHolder("cryptocompare", "cryptocompare"), idle_timeout_s,
        Backoff(initial_s=0.05, max_s=0.2, jitter=0.0, rng=random.Random(1)),
        min_reconnect_delay_s=0.0, connect_timeout_s=2.0)


@contextlib.asynccontextmanager
async def running(feed: CryptoCompareFeed) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(feed.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
        assert feed.state.state == "stopped"


async def test_subscribes_and_maps_trades() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY) as server:
        feed = make_feed(server.url, sink)
        async with running(feed):
            conn = await server.wait_loaded(1)
            assert conn.api_key == KEY
            assert conn.sub_messages == [{"action": "SubAdd", "subs": SUBS}]
            assert feed.state.state == "connected"
            sent = await server.send_trades([
                make_trade("Coinbase", "BTC", "USD", price=61000.5, qty=0.25,
                           ts_s=1_723_161_255, trade_id="1001", tsns=342_000_000),
                make_trade("Coinbase", "ETH", "USD", price=2600.0, qty=1.5,
                           ts_s=1_723_161_256, trade_id=1002),
                make_trade("Kraken", "BTC", "USD", trade_id="x"),  # not subscribed: not sent
            ])
            assert sent == 2
            await wait_until(lambda: len(sink.ticks) == 2, 5.0, "2 ticks")
    btc, eth = sink.ticks
    assert btc[:7] == ("coinbase", "BTCUSD", 61000.5, 0.25, 1_723_161_255_342, "1001", "live")
    assert eth[:7] == ("coinbase", "ETHUSD", 2600.0, 1.5, 1_723_161_256_000, "1002", "live")
    assert btc.recv_ms is not None and btc.recv_ms > btc.ts_ms  # our clock, apart from TS
    st = feed.state
    assert st.ticks == 2 and st.dead_lettered == 0 and st.ignored == 0 and st.reconnects == 0
    assert st.last_message_ms is not None and st.messages >= 2 + 2 + 2  # welcome, 16s, 3
    assert not feed.errors


async def test_malformed_trade_is_dead_lettered_and_feed_continues() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY) as server:
        feed = make_feed(server.url, sink)
        async with running(feed):
            await server.wait_loaded(1)
            bad = make_trade(trade_id="b1")
            del bad["P"]
            await server.send_trades([bad])
            await server.broadcast("{not json")
            await server.send_trades([make_trade(trade_id="ok1")])
            await wait_until(lambda: len(sink.ticks) == 1, 5.0, "the good tick")
    (p1, r1, d1, k1), (p2, r2, _, k2) = sink.dead
    assert (p1, r1, d1, k1) == (bad, "missing_field", "P", "coinbase:BTCUSD")
    assert (p2, r2, k2) == ("{not json", "invalid_json", None)
    assert sink.ticks[0].trade_id == "ok1"
    assert feed.state.dead_lettered == 2 and feed.state.state == "stopped"


async def test_unknown_type_ignored_heartbeat_and_server_errors_counted() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY) as server:
        feed = make_feed(server.url, sink, subs=[*SUBS, "0~Coinbase~BTC"])  # last invalid
        async with running(feed):
            await server.wait_loaded(1)
            await wait_until(lambda: feed.errors["500 INVALID_SUB"] == 1, 5.0, "INVALID_SUB")
            assert "INVALID_SUB [0~Coinbase~BTC]" in (feed.state.last_error or "")
            before = feed.state.last_message_ms
            await asyncio.sleep(0.01)
            await server.broadcast({"TYPE": "77", "MESSAGE": "SOMETHING_NEW"})
            await server.broadcast({"TYPE": "2", "MARKET": "Coinbase", "PRICE": 1.0})
            await server.send_heartbeat()
            await server.send_trades([make_trade(trade_id="after")])
            await wait_until(lambda: len(sink.ticks) == 1, 5.0, "a tick")
            assert feed.state.last_message_ms is not None and before is not None
            assert feed.state.last_message_ms > before
    assert feed.state.ignored == 2
    assert feed.state.dead_lettered == 0
    assert feed.state.reconnects == 0
    assert dict(feed.errors) == {"500 INVALID_SUB": 1}


async def test_reconnects_and_resubscribes_after_server_drop() -> None:
    sink = MemorySink()
    snapshot = {"0~Coinbase~BTC~USD": [make_trade(trade_id=f"s{i}") for i in range(3)]}
    async with CryptoCompareServer(api_key=KEY, snapshot=snapshot) as server:
        feed = make_feed(server.url, sink)
        async with running(feed):
            await server.wait_loaded(1)
            await server.send_trades([make_trade(trade_id="before")])
            await wait_until(lambda: len(sink.ticks) == 4, 5.0, "snapshot + 1 tick")

            await server.drop_all()  # clean websocket close (code 1001)
            await server.wait_loaded(2)
            assert feed.state.reconnects == 1
            assert "closed by server (code 1001" in (feed.state.last_error or "")
            await server.send_trades([make_trade(trade_id="after")])
            await wait_until(lambda: len(sink.ticks) == 5, 5.0, "tick after reconnect")

            await server.drop_all(abrupt=True)  # TCP close without a close frame
            await server.wait_loaded(3)
            await server.send_trades([make_trade(trade_id="after2")])
            await wait_until(lambda: len(sink.ticks) == 6, 5.0, "tick after 2nd reconnect")
            assert feed.state.state == "connected"
    assert server.subscription_messages == [[{"action": "SubAdd", "subs": SUBS}]] * 3
    assert [t.trade_id for t in sink.ticks] == ["s0", "s1", "s2", "before", "after", "after2"]
    # the snapshot replayed on each resubscribe was not published twice
    assert feed.duplicates == 6 and feed.state.ignored == 6
    assert feed.state.reconnects == 2


async def test_wrong_api_key_reports_error_and_keeps_retrying(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = MemorySink()
    caplog.set_level(logging.DEBUG, logger="feeds.live.cryptocompare")
    async with CryptoCompareServer(api_key="the-right-key") as server:
        feed = make_feed(server.url, sink, api_key=KEY)
        async with running(feed):
            await wait_until(lambda: feed.state.reconnects >= 3, 5.0, "3 retries")
            assert feed.state.state in ("reconnecting", "connected")
            assert "401 UNAUTHORIZED" in (feed.state.last_error or "")
            assert feed.errors["401 UNAUTHORIZED"] >= 3
            assert all(c.api_key == KEY for c in server.connections)
    assert not sink.ticks
    assert KEY not in caplog.text and KEY not in (feed.state.last_error or "")
    assert "401 UNAUTHORIZED" in caplog.text


async def test_idle_server_triggers_reconnect() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY, silent=True) as server:
        feed = make_feed(server.url, sink, idle_timeout_s=0.2)
        async with running(feed):
            await wait_until(lambda: feed.state.reconnects >= 2, 5.0, "2 idle reconnects")
            assert "idle timeout" in (feed.state.last_error or "")
            assert len(server.connections) >= 2
            # the feed subscribed on every connection, even though nobody answered
            assert all(c.sub_messages == [{"action": "SubAdd", "subs": SUBS}]
                       for c in server.connections[:2])
            # a server that speaks again is picked up on the next connection
            server.silent = False
            await server.wait_loaded(1)
            await server.send_trades([make_trade(trade_id="t")])
            await wait_until(lambda: len(sink.ticks) == 1, 5.0, "a tick")


async def test_heartbeats_keep_an_otherwise_quiet_connection() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY, heartbeat_interval_s=0.05) as server:
        feed = make_feed(server.url, sink, idle_timeout_s=0.3)
        async with running(feed):
            await server.wait_loaded(1)
            await asyncio.sleep(1.0)
            assert feed.state.reconnects == 0 and feed.state.state == "connected"
            assert feed.state.ignored == 0


async def test_refused_connection_and_http_rejection_retry() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY, reject_status=403) as server:
        feed = make_feed(server.url, sink)
        async with running(feed):
            await wait_until(lambda: feed.state.reconnects >= 2, 5.0, "2 retries")
            assert "handshake refused: HTTP 403" in (feed.state.last_error or "")
        url = server.url
    feed = make_feed(url, sink)  # nothing listens there any more
    async with running(feed):
        await wait_until(lambda: feed.state.reconnects >= 2, 5.0, "2 retries")
        assert feed.state.state == "reconnecting"
        assert "connect failed" in (feed.state.last_error or "")
        assert KEY not in (feed.state.last_error or "")


async def test_cancel_closes_socket_and_stops() -> None:
    sink = MemorySink()
    async with CryptoCompareServer(api_key=KEY) as server:
        feed = make_feed(server.url, sink)
        async with running(feed) as task:
            conn = await server.wait_loaded(1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
            assert task.cancelled()
            await asyncio.wait_for(conn.closed.wait(), 5.0)
            assert feed.state.state == "stopped"


async def test_sink_failure_propagates_and_stops() -> None:
    class FailingSink(MemorySink):
        async def publish(self, ticks: list[Tick]) -> None:
            raise RuntimeError("broker down")

    sink = FailingSink()
    async with CryptoCompareServer(api_key=KEY) as server:
        feed = make_feed(server.url, sink)
        task = asyncio.create_task(feed.run())
        await server.wait_loaded(1)
        await server.send_trades([make_trade()])
        with pytest.raises(RuntimeError, match="broker down"):
            await asyncio.wait_for(task, 5.0)
        assert feed.state.state == "stopped"
        assert "crashed: RuntimeError: broker down" in (feed.state.last_error or "")


def test_constructor_validation_and_url() -> None:
    sink = MemorySink()
    with pytest.raises(ValueError, match="subscription"):
        make_feed("ws://x/v2", sink, subs=[])
    feed = make_feed("wss://streamer.cryptocompare.com/v2", sink, api_key="a b&c")
    assert str(feed.connect_url) == "wss://streamer.cryptocompare.com/v2?api_key=a+b%26c"
    assert feed.redact(f"error at {feed.connect_url}") == \
        "error at wss://streamer.cryptocompare.com/v2?api_key=***"
    assert "a b&c" not in repr(feed)
