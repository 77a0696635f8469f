"""``GET /gaps?exchange=&symbol=&state=&limit=``: known gaps of the stored 1-minute bars and
their repair state (see :mod:`feeds.history.gaps`).

Response 200, newest gap first::

    {"gaps": [{"exchange": "exchange2", "symbol": "BTCUSDT",
               "start_ms": 1723161300000, "end_ms": 1723161480000,
               "start": "2024-08-08T23:55:00.000Z", "end": "2024-08-08T23:58:00.000Z",
               "minutes": 3, "cause": "feed_outage", "state": "repaired",
               "detail": "1 minute(s) filled from cryptocompare",
               "detected_ms": 1723161485000, "updated_ms": 1723161497000}, ...]}

``[start_ms, end_ms)`` is half-open, UTC. ``cause``: ``feed_outage`` | ``scan``;
``state``: ``open`` | ``repairing`` | ``repaired`` | ``unrepairable``. 400 on an unknown
or malformed parameter (``limit`` 1..1000, default 100), 503 when the database is down.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from faust.web import Request, Response

from core.errors import QueryError
from core.models import iso_ms
from core.timeutil import MINUTE_MS
from sql.gaps import STATES, list_gaps
from views.base import ApiView, Routes
from views.params import parse_name

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "ROUTES", "Gaps", "gap_json", "parse_gaps_query"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_ALLOWED = {"exchange", "symbol", "state", "limit"}


def parse_gaps_query(q: dict[str, str]) -> tuple[str | None, str | None, str | None, int]:
    """Validate ``/gaps`` parameters.

    Returns:
        ``(exchange, symbol, state, limit)``; None = any.

    Raises:
        QueryError: unknown parameter, malformed name, unknown state, ``limit`` not an
            integer in 1..:data:`MAX_LIMIT`.
    """
    unknown = set(q) - _ALLOWED
    if unknown:
        raise QueryError(f"unknown parameter(s): {', '.join(sorted(unknown))}",
                         sorted(unknown)[0])
    exchange = parse_name(q.get("exchange"), "exchange", required=False)
    symbol = parse_name(q.get("symbol"), "symbol", required=False)
    state = q.get("state") or None
    if state is not None and state not in STATES:
        raise QueryError(f"state {state[:20]!r}: use one of {', '.join(STATES)}", "state")
    raw = q.get("limit") or str(DEFAULT_LIMIT)
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise QueryError(f"limit {raw[:20]!r}: use an integer in 1..{MAX_LIMIT}", "limit")
    return exchange, symbol, state, int(raw)


def gap_json(r: Any) -> dict[str, Any]:
    """One ``gaps`` record (:func:`sql.gaps.list_gaps`) in the response shape."""
    start, end = int(r["start_ms"]), int(r["end_ms"])
    return {"exchange": r["exchange"], "symbol": r["symbol"], "start_ms": start,
            "end_ms": end, "start": iso_ms(start), "end": iso_ms(end),
            "minutes": (end - start) // MINUTE_MS, "cause": r["cause"], "state": r["state"],
            "detail": r["detail"], "detected_ms": int(r["detected_ms"]),
            "updated_ms": int(r["updated_ms"])}


class Gaps(ApiView):
    """Known gaps and their repair state."""

    async def get(self, request: Request) -> Response:
        try:
            exchange, symbol, state, limit = parse_gaps_query(dict(request.query))
        except QueryError as exc:
            return self.fail(400, str(exc), param=exc.param)
        try:
            async with self.ctx.database.request() as conn:
                rows = await list_gaps(conn, exchange, symbol, state, limit)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return self.fail(503, f"database unavailable: {type(exc).__name__}")
        principal = self.principal(request)  # outside its restrictions: left out
        return self.ok({"gaps": [gap_json(r) for r in rows
                                 if principal.allows(r["symbol"], r["exchange"])]})


ROUTES: Routes = [("/gaps", Gaps)]
