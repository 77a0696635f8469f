"""Query-parameter parsing shared by the views and the CLI commands (pure; raises
QueryError -> HTTP 400). The API's time format, :func:`core.models.iso_ms`, is defined
with the bar shape."""

from __future__ import annotations

from datetime import UTC, datetime

from core.errors import QueryError
from core.names import NAME_RE

__all__ = ["parse_name", "parse_time_ms"]

#: accepted epoch-ms range: 1970-01-01 .. 2100-01-01
_MAX_MS = 4_102_444_800_000


def parse_name(value: str | None, field: str, required: bool = True) -> str | None:
    """Validate a symbol/exchange name.

    Raises:
        QueryError: missing (when required) or not ``[A-Za-z0-9][A-Za-z0-9._/-]{0,39}``.
    """
    if value is None or value == "":
        if required:
            raise QueryError(f"missing required parameter {field!r}", field)
        return None
    if not NAME_RE.match(value):
        raise QueryError(f"invalid {field} {value[:60]!r}: expected letters, digits, . _ / -",
                         field)
    return value


def parse_time_ms(value: str, field: str) -> int:
    """Parse epoch milliseconds (digits) or ISO-8601 (naive means UTC) to epoch ms.

    Raises:
        QueryError: neither form, or outside 1970..2100.
    """
    v = value.strip()
    if v.isdigit():
        ms = int(v)
    else:
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise QueryError(
                f"invalid {field} {value[:40]!r}: use epoch milliseconds or ISO-8601", field
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms = int(dt.timestamp() * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise QueryError(f"{field} out of range (1970-01-01 .. 2100-01-01)", field)
    return ms
