"""Redis protocol between a running replay (``faust -A app replay``) and the workers'
``/replay/...`` HTTP views.

Keys (``<p>`` = ``redis.key_prefix``):

* ``<p>:replay:state`` — JSON state of the running replay, rewritten every
  :data:`STATE_INTERVAL_S` with TTL :data:`STATE_TTL_MS` (a crashed replay disappears
  within seconds); kept :data:`FINAL_TTL_MS` after it stopped or finished::

      {"session": "3f2a9c1e", "pid": 4242, "state": "running",   # running|paused|stopped|finished
       "speed": 60.0,                 # 0 = as fast as possible
       "clock_ms": 1723161255342,     # simulated clock: event time the pipeline sees now
       "source_clock_ms": 1723161255342,   # the same in the input's own time (no re-basing)
       "first_ts_ms": ..., "last_ts_ms": ...,   # input range (source time)
       "position": 12000, "total": 70808,     # ticks of the merged sequence before the clock
       "rate": 5400.0, "eta_s": 12.5,         # ticks/s over the last interval; null if paused
       "published": 12000, "loops": 0, "namespace": "replay", "rebase_now": false,
       "source": {"files": [...]} | {"bars": {"exchange", "symbol", "from_ms", "to_ms"}},
       "started_ms": ..., "updated_ms": ..., "ack": 3}   # id of the last command applied

* ``<p>:replay:control`` — list of JSON commands, ``RPUSH`` by the views, ``BLPOP`` by the
  replay: ``{"id": 3, "cmd": "pause"|"resume"|"stop"|"seek"|"speed", "to_ms": <int>,
  "speed": <float>}``; ids come from ``INCR <p>:replay:seq``. The list expires after
  :data:`COMMAND_TTL_S` so a command nobody took cannot reach a later replay.

Everything but the ``async`` helpers is pure and unit-tested.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import redis.asyncio as aioredis

from core.models import iso_ms
from stores.keys import replay_control_key, replay_seq_key, replay_state_key
from stores.latest import exchanges_of

__all__ = [
    "ACTIVE_STATES",
    "COMMANDS",
    "COMMAND_TTL_S",
    "FINAL_TTL_MS",
    "MAX_SPEED",
    "STATE_INTERVAL_S",
    "STATE_TTL_MS",
    "active_clock_ms",
    "check_transition",
    "is_active",
    "parse_speed",
    "pop_commands",
    "read_state",
    "send_command",
    "series_clock_ms",
    "status_body",
    "write_state",
]

#: states in which a replay accepts commands and drives the simulated clock
ACTIVE_STATES = ("running", "paused")
COMMANDS = ("pause", "resume", "stop", "seek", "speed")
STATE_INTERVAL_S = 0.2
STATE_TTL_MS = 3_000
FINAL_TTL_MS = 10_000
COMMAND_TTL_S = 30
#: largest accepted speed factor (0 = as fast as possible)
MAX_SPEED = 1_000_000.0








def is_active(state: dict[str, Any] | None) -> bool:
    """Whether ``state`` (as read from Redis, None when absent) is a running or paused
    replay."""
    return state is not None and state.get("state") in ACTIVE_STATES


def check_transition(state: dict[str, Any] | None, cmd: str) -> tuple[int, str] | None:
    """Whether ``cmd`` may be sent to the replay in ``state``.

    Args:
        state: the replay state (None: no replay).
        cmd: one of :data:`COMMANDS`.

    Returns:
        None when allowed, else ``(http_status, message)``: 404 no replay runs, 409 the
        command does not apply in that state (pause when paused, resume when running,
        anything once stopped or finished).

    Raises:
        ValueError: ``cmd`` is not one of :data:`COMMANDS`.
    """
    if cmd not in COMMANDS:
        raise ValueError(f"unknown replay command {cmd!r}")
    if state is None:
        return 404, "no replay is running"
    current = state.get("state")
    if current not in ACTIVE_STATES:
        return 409, f"the replay has {current}"
    if cmd == "pause" and current == "paused":
        return 409, "the replay is already paused"
    if cmd == "resume" and current == "running":
        return 409, "the replay is not paused"
    return None


def parse_speed(text: str | None) -> float:
    """Parse a speed factor (``0`` = as fast as possible, ``1`` = real time, ``60`` = one
    minute per second).

    Raises:
        ValueError: missing, not a number, negative, not finite or above
            :data:`MAX_SPEED`.
    """
    if text is None or not text.strip():
        raise ValueError("missing speed factor")
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"invalid speed factor {text[:20]!r}: use a number >= 0") from None
    if not math.isfinite(x) or x < 0 or x > MAX_SPEED:
        raise ValueError(f"speed factor must be between 0 and {MAX_SPEED:g} (0 = max)")
    return x


async def read_state(client: aioredis.Redis, prefix: str) -> dict[str, Any] | None:
    """The replay's state, or None when no replay ran within the last seconds.

    Raises:
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    raw = await client.get(replay_state_key(prefix))
    if not raw:
        return None
    state = orjson.loads(raw)
    return state if isinstance(state, dict) else None


async def write_state(client: aioredis.Redis, prefix: str, state: dict[str, Any],
                      ttl_ms: int = STATE_TTL_MS) -> None:
    """Publish the replay's state (expires after ``ttl_ms`` unless rewritten).

    Raises:
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    await client.set(replay_state_key(prefix), orjson.dumps(state), px=ttl_ms)


async def send_command(client: aioredis.Redis, prefix: str, cmd: str,
                       **args: Any) -> int:
    """Queue a command for the running replay.

    Args:
        client: Redis client.
        prefix: key prefix.
        cmd: one of :data:`COMMANDS`.
        **args: ``to_ms`` (seek, UTC epoch ms), ``speed`` (speed).

    Returns:
        int: the command id (the replay's state ``ack`` reaches it once applied).

    Raises:
        ValueError: unknown command.
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    if cmd not in COMMANDS:
        raise ValueError(f"unknown replay command {cmd!r}")
    cmd_id = int(await client.incr(replay_seq_key(prefix)))
    async with client.pipeline(transaction=True) as pipe:
        pipe.rpush(replay_control_key(prefix), orjson.dumps({"id": cmd_id, "cmd": cmd, **args}))
        pipe.expire(replay_control_key(prefix), COMMAND_TTL_S)
        await pipe.execute()
    return cmd_id


async def pop_commands(client: aioredis.Redis, prefix: str, timeout_s: float
                       ) -> list[dict[str, Any]]:
    """Wait up to ``timeout_s`` for commands, then take every queued one.

    Returns:
        list of command objects, oldest first (malformed entries are returned as
        ``{"cmd": "invalid", "raw": <text>}`` for the caller to report).

    Raises:
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    got = await client.blpop([replay_control_key(prefix)], timeout=timeout_s)
    if not got:
        return []
    raws = [got[1]]
    more = await client.lpop(replay_control_key(prefix), 1000)
    if isinstance(more, list):
        raws += more
    out: list[dict[str, Any]] = []
    for raw in raws:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        out.append(obj if isinstance(obj, dict) else {"cmd": "invalid", "raw": str(raw)[:200]})
    return out


async def active_clock_ms(client: aioredis.Redis, prefix: str,
                          exchange: str | None = None) -> int | None:
    """The simulated clock of a running or paused replay.

    Args:
        client: Redis client.
        prefix: key prefix.
        exchange: when given, the clock applies only if ``exchange`` is in the replay's
            namespace (``<namespace>.<name>``; a replay without namespace never matches).

    Returns:
        int | None: the replay's ``clock_ms`` (UTC epoch ms), None when no replay runs
        (or ``exchange`` is not replayed data).

    Raises:
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    state = await read_state(client, prefix)
    return _clock_for(state, None if exchange is None else [exchange])


def status_body(state: dict[str, Any]) -> dict[str, Any]:
    """The ``/replay/status`` body (and the stream's replay frames): the Redis state plus
    ISO-8601 ``clock``, ``source_clock`` and ``active`` (running or paused)."""
    body = dict(state)
    body["clock"] = iso_ms(int(state["clock_ms"]))
    body["source_clock"] = iso_ms(int(state["source_clock_ms"]))
    body["active"] = state.get("state") in ACTIVE_STATES
    return body


async def series_clock_ms(client: aioredis.Redis, prefix: str, symbol: str,
                          exchange: str | None, wall_ms: int) -> int:
    """"Now" for a series of ``/ohlcv`` and ``/udf/history``: the simulated clock while a
    replay runs (or is paused) and the series is replayed data (``exchange`` in the
    replay's namespace; for the consolidated series, every exchange of ``symbol``), so
    the replay's open bucket is served open and its live minutes are read; else
    ``wall_ms``.

    Raises:
        redis.exceptions.RedisError, OSError: Redis unreachable.
    """
    state = await read_state(client, prefix)
    if not is_active(state):
        return wall_ms
    exchanges = [exchange] if exchange is not None else await exchanges_of(client, prefix,
                                                                           symbol)
    clock = _clock_for(state, exchanges) if exchanges else None
    return wall_ms if clock is None else clock


def _clock_for(state: dict[str, Any] | None, exchanges: list[str] | None) -> int | None:
    """The replay's ``clock_ms`` when ``state`` is active and (unless ``exchanges`` is
    None) every one of ``exchanges`` is in its namespace; else None."""
    if state is None or not is_active(state):
        return None
    if exchanges is not None:
        ns = state.get("namespace") or ""
        if not ns or not all(e.startswith(f"{ns}.") for e in exchanges):
            return None
    clock = state.get("clock_ms")
    return int(clock) if isinstance(clock, (int, float)) else None
