"""Exchange emulator: a TCP server byte-compatible with the marketflow exchange programs.

Run it with ``python -m feeds.emulator`` (``--help`` lists the options). Every connected
client receives newline-delimited JSON, one object per line, compact and with the key
order of Go's ``json.Marshal`` of the exchanges' struct::

    {"symbol":"BTCUSDT","price":96391.79,"timestamp":1744631432487}

``timestamp`` is the wall clock at emission, UTC epoch milliseconds. The server never
reads what clients send (it discards it) but notices disconnects and forgets the client.

Sources of lines:

* **random walk** (default): one geometric random walk per pair (``--pairs``) from
  realistic starting prices, ``--rate`` lines per second per pair, pairs interleaved
  evenly; prices are rounded by magnitude (>= 1000: 2 decimals, >= 1: 3, else 6) like the
  provided exchange programs;
* **trades files** (``--trades``): recorded trades in the trades-CSV format
  (:func:`feeds.replay.trade_files.read_trades`), merged by trade time, paced at real speed times
  ``--speed``, re-stamped with the emission wall clock; the files loop forever (each pass
  starts :data:`PASS_GAP_S` trade-time seconds after the previous one ended).

Broadcast and slow clients: every burst of lines is written to every client's transport
without waiting (``transport.write`` never blocks). A client whose transport write buffer
(the bytes the kernel has not accepted yet) exceeds ``--max-client-buffer`` bytes is
disconnected at once (``abort``) and logged; so one slow reader neither delays the others
nor makes the server's memory grow without bound.

Pacing uses the monotonic clock: a line is due at ``start + offset`` and every line due is
sent in one burst (up to :data:`MAX_BURST_LINES` per loop turn), so high rates (1000/s per
pair) work despite the event loop's ~1 ms timer resolution. When the server falls more
than :data:`MAX_LAG_S` behind (CPU-bound, suspended), the schedule is shifted instead of
sending the backlog in one flood: lines are delayed, never dropped.

``--bad-every N`` (tests of the worker's dead-lettering): lines number N, 2N, 3N... (counted
from 1 over everything the server sends) are bad ones, cycling through
:data:`BAD_KINDS`; a bad line takes its own slot, the good line that was due goes in the
next slot, so the stream of good lines is the same as without ``--bad-every``
(with ``N = 1`` every line is bad and no good line is sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import math
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType

from core.config import DEFAULT_PAIRS
from core.errors import MarketflowError
from core.models import Tick
from core.timeutil import now_ms
from feeds.live.generator import START_PRICES
from feeds.replay.trade_files import read_trades

__all__ = [
    "BAD_KINDS",
    "DEFAULT_HOST",
    "DEFAULT_MAX_CLIENT_BUFFER",
    "DEFAULT_PORT",
    "DEFAULT_RATE",
    "MAX_BURST_LINES",
    "MAX_LAG_S",
    "PASS_GAP_S",
    "EmulatorConfig",
    "EmulatorServer",
    "LineMaker",
    "RandomWalk",
    "bad_line",
    "format_line",
    "format_price",
    "main",
    "parse_args",
    "round_price",
    "trades_schedule",
    "walk_schedule",
]

log = logging.getLogger("feeds.emulator")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 40101
#: Lines per second per pair (random-walk mode).
DEFAULT_RATE = 2.0
#: A client whose unsent bytes exceed this is disconnected (bytes).
DEFAULT_MAX_CLIENT_BUFFER = 1024 * 1024
#: Most lines sent in one event-loop turn before yielding to other tasks.
MAX_BURST_LINES = 2000
#: Largest tolerated delay behind schedule before the schedule is shifted (seconds).
MAX_LAG_S = 1.0
#: Pause between two passes over the trades files, in trade time (seconds).
PASS_GAP_S = 1.0
#: Typical volatility of the random walk: standard deviation of the log-return over one
#: second (per sqrt(second); 3e-4 gives about 0.23 % per minute).
VOL_PER_SQRT_S = 3e-4

#: The cycle of ``--bad-every`` lines, in order.
BAD_KINDS = ("not_json", "negative_price", "unknown_symbol", "missing_price", "empty")
_UNKNOWN_SYMBOL = "XYZUSDT"

# --------------------------------------------------------------------------- formatting


def round_price(price: float) -> float:
    """Round a price by magnitude like the marketflow exchange programs.

    Args:
        price: quote currency per base unit.

    Returns:
        float: ``price`` rounded to 2 decimals when >= 1000, 3 decimals when >= 1,
        else 6 decimals.
    """
    if price >= 1000:
        return round(price, 2)
    if price >= 1:
        return round(price, 3)
    return round(price, 6)


def format_price(value: float) -> str:
    """Format a float exactly like Go's ``encoding/json`` does for a ``float64``.

    Shortest round-trip digits; positional notation when ``1e-6 <= |value| < 1e21``
    (``96000.0`` -> ``96000``, ``0.000015`` -> ``0.000015``), otherwise exponent notation
    without zero padding of negative exponents (``1e-7``, ``1.5e+21``).

    Args:
        value: the number (any unit).

    Returns:
        str: the JSON number text.

    Raises:
        ValueError: ``value`` is NaN or infinite (``json.Marshal`` fails on them too).
    """
    if not math.isfinite(value):
        raise ValueError(f"unsupported value {value!r}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    d = Decimal(repr(value))
    a = abs(value)
    if 1e-6 <= a < 1e21:
        text = format(d.normalize(), "f")
        return text
    sign, digits, exp = d.as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    sci_exp = int(exp) + len(digits) - 1
    mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
    return f"{'-' if sign else ''}{mant}e{'-' if sci_exp < 0 else '+'}{abs(sci_exp):02d}".replace(
        "e-0", "e-"
    )


def _go_string(s: str) -> str:
    """JSON string like Go's ``json.Marshal`` (HTML-safe escapes of ``<``, ``>``, ``&``)."""
    return (
        json.dumps(s, ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def format_line(symbol: str, price: float, ts_ms: int) -> bytes:
    """One wire line: ``{"symbol":...,"price":...,"timestamp":...}`` plus ``\\n``.

    Args:
        symbol: pair name, e.g. ``"BTCUSDT"``.
        price: quote currency per base unit (written with :func:`format_price`).
        ts_ms: UTC epoch milliseconds.

    Returns:
        bytes: the UTF-8 line, newline-terminated.

    Raises:
        ValueError: ``price`` is not finite.
    """
    return (
        f'{{"symbol":{_go_string(symbol)},"price":{format_price(price)},'
        f'"timestamp":{int(ts_ms)}}}\n'
    ).encode()


def bad_line(kind: str, symbol: str, price: float, ts_ms: int) -> bytes:
    """A deliberately bad wire line (see :data:`BAD_KINDS`).

    Args:
        kind: ``not_json`` (``not json at all``), ``negative_price`` (``-price``),
            ``unknown_symbol`` (symbol ``XYZUSDT``), ``missing_price`` (no ``price`` key)
            or ``empty`` (an empty line).
        symbol: pair used by the JSON kinds (except ``unknown_symbol``).
        price: a valid price (quote per base unit) the JSON kinds derive theirs from.
        ts_ms: UTC epoch milliseconds.

    Returns:
        bytes: the newline-terminated line.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "not_json":
        return b"not json at all\n"
    if kind == "negative_price":
        return format_line(symbol, -abs(price) or -1.0, ts_ms)
    if kind == "unknown_symbol":
        return format_line(_UNKNOWN_SYMBOL, abs(price) or 1.0, ts_ms)
    if kind == "missing_price":
        return f'{{"symbol":{_go_string(symbol)},"timestamp":{int(ts_ms)}}}\n'.encode()
    if kind == "empty":
        return b"\n"
    raise ValueError(f"unknown bad-line kind {kind!r}")


@dataclass
class LineMaker:
    """Turns emitted ticks into wire lines, inserting bad lines every ``bad_every`` lines.

    Attributes:
        bad_every: 0 = never; N >= 1 = lines N, 2N, 3N... (1-based, over all lines made)
            are bad, cycling through :data:`BAD_KINDS`.
        lines: lines made so far (good and bad).
        bad: bad lines made so far.
    """

    bad_every: int = 0
    lines: int = 0
    bad: int = 0

    def __post_init__(self) -> None:
        if self.bad_every < 0:
            raise ValueError("bad_every must be >= 0")

    def make(self, symbol: str, price: float, ts_ms: int) -> list[bytes]:
        """Lines for one tick: its own line, preceded by a bad one when that slot is due.

        Args:
            symbol: pair name.
            price: quote currency per base unit.
            ts_ms: emission wall clock, UTC epoch milliseconds.

        Returns:
            list[bytes]: one or two lines (``bad_every == 1``: exactly one, bad).
        """
        out: list[bytes] = []
        n = self.bad_every
        if n and (self.lines + 1) % n == 0:
            out.append(bad_line(BAD_KINDS[self.bad % len(BAD_KINDS)], symbol, price, ts_ms))
            self.bad += 1
            self.lines += 1
            if n == 1:
                return out
        out.append(format_line(symbol, price, ts_ms))
        self.lines += 1
        return out


# --------------------------------------------------------------------------- sources


class RandomWalk:
    """Geometric random walk per pair, with prices rounded by :func:`round_price`.

    Each step multiplies the (unrounded) price by ``exp(N(0, sigma))`` with
    ``sigma = vol_per_sqrt_s * sqrt(step_s)``, so prices stay > 0 and the volatility per
    unit of time does not depend on the emission rate.

    Args:
        pairs: symbols to walk.
        seed: seed of the private RNG (``None``: nondeterministic).
        step_s: time between two steps of one pair, in seconds (``1 / rate``).
        vol_per_sqrt_s: standard deviation of the log-return over one second.
        start_prices: starting price per symbol (quote per base unit); symbols missing
            from it (and from :data:`START_PRICES`) start at a random price in [1, 100).
    """

    def __init__(
        self,
        pairs: Iterable[str],
        seed: int | None = None,
        step_s: float = 1.0 / DEFAULT_RATE,
        vol_per_sqrt_s: float = VOL_PER_SQRT_S,
        start_prices: dict[str, float] | None = None,
    ) -> None:
        if step_s <= 0 or vol_per_sqrt_s < 0:
            raise ValueError("step_s must be > 0 and vol_per_sqrt_s >= 0")
        self._rng = random.Random(seed)
        self.sigma = vol_per_sqrt_s * math.sqrt(step_s)
        starts = {**START_PRICES, **(start_prices or {})}
        self._prices: dict[str, float] = {}
        for s in pairs:
            p = starts.get(s)
            self._prices[s] = float(p) if p is not None else self._rng.uniform(1.0, 100.0)
            if not self._prices[s] > 0:
                raise ValueError(f"start price of {s} must be > 0")

    @property
    def pairs(self) -> list[str]:
        """The walked symbols, in construction order."""
        return list(self._prices)

    def next(self, symbol: str) -> float:
        """Advance ``symbol`` one step.

        Args:
            symbol: one of :attr:`pairs`.

        Returns:
            float: the new price, rounded by magnitude, always > 0.

        Raises:
            KeyError: ``symbol`` is not walked.
        """
        p = self._prices[symbol] * math.exp(self._rng.gauss(0.0, self.sigma))
        p = min(max(p, 1e-6), 1e12)
        self._prices[symbol] = p
        r = round_price(p)
        return r if r > 0 else 1e-6


#: A scheduled emission: (offset from the start in seconds, symbol, price).
Emission = tuple[float, str, float]


def walk_schedule(walk: RandomWalk, rate: float) -> Iterator[Emission]:
    """Endless random-walk emissions, ``rate`` per second per pair, pairs interleaved.

    Args:
        walk: the random walk (its :attr:`RandomWalk.pairs` are emitted round-robin).
        rate: lines per second per pair (> 0).

    Yields:
        (offset_s, symbol, price): line ``k`` is due ``k / (rate * len(pairs))`` seconds
        after the start.
    """
    pairs = walk.pairs
    if not pairs or rate <= 0:
        raise ValueError("need at least one pair and rate > 0")
    total = rate * len(pairs)
    k = 0
    while True:
        sym = pairs[k % len(pairs)]
        yield k / total, sym, walk.next(sym)
        k += 1


def trades_schedule(
    paths: Sequence[str | Path],
    speed: float = 1.0,
    passes: int | None = None,
    reader: Callable[[str | Path], Iterable[Tick]] = read_trades,
) -> Iterator[Emission]:
    """Emissions of recorded trades, merged by trade time, at ``speed`` times real time.

    Args:
        paths: trades-CSV files (each in trade-time order).
        speed: pacing factor (> 0): 2 = twice as fast as the trades happened.
        passes: number of passes over the files (``None``: forever).
        reader: file -> ticks (default :func:`feeds.replay.trade_files.read_trades`).

    Yields:
        (offset_s, symbol, price): a trade at ``ts_ms`` is due
        ``pass_start + (ts_ms - first_ts_ms) / 1000 / speed`` seconds after the start;
        each pass starts ``PASS_GAP_S / speed`` after the previous pass's last trade.

    Raises:
        feeds.replay.trade_files.ReplayError: unreadable or malformed file.
        ValueError: ``speed <= 0``, no paths, or the files hold no trades.
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    if not paths:
        raise ValueError("no trades files")
    base = 0.0
    done = 0
    while passes is None or done < passes:
        first: int | None = None
        last = base
        for t in heapq.merge(*(reader(p) for p in paths), key=lambda t: t.ts_ms):
            if first is None:
                first = t.ts_ms
            last = base + (t.ts_ms - first) / 1000.0 / speed
            yield last, t.symbol, t.price
        if first is None:
            raise ValueError("the trades files hold no trades")
        base = last + PASS_GAP_S / speed
        done += 1


# --------------------------------------------------------------------------- server


@dataclass
class EmulatorConfig:
    """Settings of one emulator (the CLI options).

    Attributes:
        name: exchange name, used in logs only.
        host: bind address; port: TCP port (0 = any free port).
        pairs: symbols of the random walk.
        rate: random-walk lines per second per pair.
        trades: trades-CSV files; when given they replace the random walk.
        speed: trades pacing factor (1 = real time).
        bad_every: every Nth line is bad (0 = never), see :class:`LineMaker`.
        seed: random-walk seed (``None``: nondeterministic).
        max_client_buffer: unsent bytes after which a client is dropped.
        sndbuf: ``SO_SNDBUF`` of each client socket in bytes (0 = the kernel's
            autotuning, which lets a few MB queue up in the kernel before
            ``max_client_buffer`` applies).
        wait_clients: emission starts once this many clients are connected (0 = at once).
    """

    name: str = "exchange1"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    pairs: list[str] = field(default_factory=lambda: list(DEFAULT_PAIRS))
    rate: float = DEFAULT_RATE
    trades: list[Path] = field(default_factory=list)
    speed: float = 1.0
    bad_every: int = 0
    seed: int | None = None
    max_client_buffer: int = DEFAULT_MAX_CLIENT_BUFFER
    sndbuf: int = 0
    wait_clients: int = 0

    def schedule(self) -> Iterator[Emission]:
        """The emission schedule this configuration describes (trades or random walk).

        Raises:
            feeds.replay.trade_files.ReplayError: a trades file is unreadable or lacks columns.
            ValueError: invalid rate/pairs, or the trades files hold no trades.
        """
        if self.trades:
            has_trades = False
            for path in self.trades:  # fail fast: unreadable file, missing columns
                has_trades = next(iter(read_trades(path)), None) is not None or has_trades
            if not has_trades:
                raise ValueError("the trades files hold no trades")
            return trades_schedule(self.trades, self.speed)
        walk = RandomWalk(self.pairs, seed=self.seed, step_s=1.0 / self.rate)
        return walk_schedule(walk, self.rate)


class _ClientProtocol(asyncio.Protocol):
    """One client connection: registers itself, ignores input, unregisters on close."""

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._add_client(transport)

    def data_received(self, data: bytes) -> None:
        """Clients have nothing to say: input is discarded."""

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server._remove_client(self._transport, exc)


class EmulatorServer:
    """The TCP server and its emission task; an async context manager.

    ``async with EmulatorServer(cfg) as srv:`` binds (``srv.port`` is the real port) and
    starts emitting; leaving the block stops emission and closes every client.

    Attributes:
        config: the settings.
        lines_sent: lines broadcast so far (good and bad); bursts: broadcasts so far.
        dropped_slow: clients disconnected for exceeding ``max_client_buffer``.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.lines_sent = 0
        self.bursts = 0
        self.dropped_slow = 0
        self._clients: dict[asyncio.Transport, str] = {}
        self._server: asyncio.Server | None = None
        self._emitter: asyncio.Task[None] | None = None
        self._clients_changed = asyncio.Event()
        self._maker = LineMaker(config.bad_every)

    # -- clients

    @property
    def client_count(self) -> int:
        """Connected clients."""
        return len(self._clients)

    def _add_client(self, transport: asyncio.Transport) -> None:
        if self.config.sndbuf:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.sndbuf)
        peer = transport.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._clients[transport] = who
        self._clients_changed.set()
        log.info("emulator %s: client %s connected (%d)", self.config.name, who,
                 len(self._clients))

    def _remove_client(self, transport: asyncio.Transport, exc: Exception | None) -> None:
        who = self._clients.pop(transport, None)
        if who is not None:
            self._clients_changed.set()
            log.info("emulator %s: client %s disconnected (%d)%s", self.config.name, who,
                     len(self._clients), f": {exc}" if exc else "")

    async def wait_clients(self, n: int) -> None:
        """Wait until at least ``n`` clients are connected."""
        while len(self._clients) < n:
            self._clients_changed.clear()
            await self._clients_changed.wait()

    def broadcast(self, data: bytes) -> int:
        """Write ``data`` to every client without blocking; drop clients that lag.

        A client whose transport buffer holds more than ``config.max_client_buffer``
        unsent bytes after the write is aborted (its buffer is freed at once).

        Args:
            data: bytes to send (whole lines).

        Returns:
            int: clients the data was written to (not counting dropped ones).
        """
        limit = self.config.max_client_buffer
        sent = 0
        for tr, who in list(self._clients.items()):
            if tr.is_closing():
                continue
            tr.write(data)
            if tr.get_write_buffer_size() > limit:
                self.dropped_slow += 1
                log.warning("emulator %s: dropping slow client %s (%d unsent bytes > %d)",
                            self.config.name, who, tr.get_write_buffer_size(), limit)
                self._clients.pop(tr, None)
                self._clients_changed.set()
                tr.abort()
            else:
                sent += 1
        return sent

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind, then start the emission task.

        Raises:
            OSError: the address cannot be bound.
            ValueError, ReplayError: the line source cannot start (bad options or file).
        """
        schedule = self.config.schedule()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientProtocol(self), self.config.host, self.config.port
        )
        self._emitter = asyncio.create_task(self._emit(schedule), name="emulator-emit")

    @property
    def emitter(self) -> asyncio.Task[None] | None:
        """The emission task (finishes only on error or when the schedule ends)."""
        return self._emitter

    async def stop(self, close_timeout_s: float = 1.0) -> None:
        """Stop emitting, stop accepting, close clients (aborting any still open after
        ``close_timeout_s`` seconds)."""
        if self._emitter is not None:
            self._emitter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._emitter
        if self._server is not None:
            self._server.close()
        for tr in list(self._clients):
            tr.close()
        deadline = time.monotonic() + close_timeout_s
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for tr in list(self._clients):
            tr.abort()
        self._clients.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), close_timeout_s)

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _emit(self, schedule: Iterator[Emission]) -> None:
        """Send every scheduled line when it is due (monotonic clock), in bursts."""
        if self.config.wait_clients:
            await self.wait_clients(self.config.wait_clients)
        t0 = time.monotonic()
        pending: Emission | None = next(schedule, None)
        while pending is not None:
            now = time.monotonic()
            wait = t0 + pending[0] - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if -wait > MAX_LAG_S:  # far behind: shift the schedule, don't flood
                t0 += -wait
            burst: list[bytes] = []
            due = now - t0
            count = 0
            while pending is not None and pending[0] <= due and count < MAX_BURST_LINES:
                _, sym, price = pending
                burst.extend(self._maker.make(sym, price, now_ms()))
                count += 1
                pending = next(schedule, None)
            if burst:
                self.broadcast(b"".join(burst))
                self.lines_sent += len(burst)
                self.bursts += 1
            await asyncio.sleep(0)


# --------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    v = float(text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text!r}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return v


def _pairs(text: str) -> list[str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if not pairs or any(any(c.isspace() or c == '"' for c in p) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected a comma list of symbols, not {text!r}")
    return list(dict.fromkeys(pairs))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m feeds.emulator",
        description="Emulated marketflow exchange: newline-delimited JSON ticks "
        '({"symbol":...,"price":...,"timestamp":<epoch ms>}) broadcast over TCP.',
    )
    p.add_argument("--name", default="exchange1", help="exchange name, for logs (exchange1)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address ({DEFAULT_HOST})")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port, 0 = any free one ({DEFAULT_PORT})")
    p.add_argument("--pairs", type=_pairs, default=list(DEFAULT_PAIRS),
                   help=f"random-walk symbols, comma list ({','.join(DEFAULT_PAIRS)})")
    p.add_argument("--rate", type=_positive_float, default=DEFAULT_RATE,
                   help=f"random-walk lines per second per pair ({DEFAULT_RATE:g})")
    p.add_argument("--seed", type=int, default=None, help="random-walk seed (random)")
    p.add_argument("--trades", action="append", default=[], metavar="FILE[,FILE...]",
                   help="serve these trades-CSV files (merged by time, looped, re-stamped) "
                   "instead of the random walk; repeatable")
    p.add_argument("--speed", type=_positive_float, default=1.0,
                   help="trades pacing factor, 1 = real time (1)")
    p.add_argument("--bad-every", type=_non_negative_int, default=0, metavar="N",
                   help="every Nth line is a bad one, cycling through "
                   f"{', '.join(BAD_KINDS)} (0 = never)")
    p.add_argument("--max-client-buffer", type=_non_negative_int,
                   default=DEFAULT_MAX_CLIENT_BUFFER, metavar="BYTES",
                   help="disconnect a client with more unsent bytes than this "
                   f"({DEFAULT_MAX_CLIENT_BUFFER})")
    p.add_argument("--sndbuf", type=_non_negative_int, default=0, metavar="BYTES",
                   help="SO_SNDBUF of each client socket (0 = kernel autotuning)")
    p.add_argument("--wait-clients", type=_non_negative_int, default=0, metavar="N",
                   help="start emitting once N clients are connected (0 = at once)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[EmulatorConfig, str]:
    """Parse the command line.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        (config, log_level).

    Raises:
        SystemExit: ``--help`` (code 0) or invalid arguments (code 2).
    """
    ns = _build_parser().parse_args(argv)
    trades = [Path(f.strip()) for arg in ns.trades for f in arg.split(",") if f.strip()]
    cfg = EmulatorConfig(
        name=ns.name, host=ns.host, port=ns.port, pairs=ns.pairs, rate=ns.rate,
        trades=trades, speed=ns.speed, bad_every=ns.bad_every, seed=ns.seed,
        max_client_buffer=ns.max_client_buffer, sndbuf=ns.sndbuf,
        wait_clients=ns.wait_clients,
    )
    return cfg, ns.log_level


async def _serve(cfg: EmulatorConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    server = EmulatorServer(cfg)
    try:
        await server.start()
    except (OSError, ValueError, MarketflowError) as exc:
        print(f"emulator {cfg.name}: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"emulator {cfg.name} listening on {cfg.host}:{server.port}", flush=True)
    mode = (f"trades {','.join(map(str, cfg.trades))} x{cfg.speed:g}" if cfg.trades
            else f"random walk {','.join(cfg.pairs)} at {cfg.rate:g}/s per pair")
    log.info("emulator %s: %s, bad_every=%d", cfg.name, mode, cfg.bad_every)
    emitter = server.emitter
    assert emitter is not None
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, emitter}, return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if emitter.done() and not emitter.cancelled() and emitter.exception() is not None:
        log.error("emulator %s: emission failed: %s", cfg.name, emitter.exception())
        rc = 1
    stopper.cancel()
    await server.stop()
    log.info("emulator %s: stopped after %d lines", cfg.name, server.lines_sent)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m feeds.emulator``).

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        int: exit status (0 after SIGINT/SIGTERM, 1 when the server cannot start or the
        trades files fail mid-way).
    """
    cfg, level = parse_args(argv)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if cfg.trades and cfg.pairs != list(DEFAULT_PAIRS):
        log.warning("--pairs is ignored with --trades (symbols come from the files)")
    return asyncio.run(_serve(cfg))


