"""The project's exception hierarchy: everything raised on purpose derives from
:class:`MarketflowError`."""

from __future__ import annotations

__all__ = ["ConfigError", "HistoryError", "InvalidTick", "MarketflowError", "PublishError",
           "QueryError", "ReplayError", "StorageUnavailable"]


class MarketflowError(Exception):
    """Root of every error raised by marketflow code."""


class ConfigError(MarketflowError):
    """The configuration file or an environment override is invalid."""


class InvalidTick(MarketflowError):
    """A tick failed validation.

    Attributes:
        reason: short machine-readable reason, used as the dead-letter ``reason`` and
            as the ``reason`` label of the dead-letter counter (e.g. ``missing_field``).
        detail: human-readable detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class QueryError(MarketflowError):
    """A malformed API query parameter (reported as HTTP 400).

    Attributes:
        param: the offending parameter's name, when known.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ReplayError(MarketflowError):
    """A replay input file is unreadable or not in the trades CSV format."""


class HistoryError(MarketflowError):
    """A historical-data fetch failed for good (bad request, auth refused, retries
    exhausted, malformed response); ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StorageUnavailable(MarketflowError):
    """The database or Redis did not answer, so a query cannot be answered.

    The message names what failed and how, e.g. ``database unavailable: OSError``; the
    views answer 503 with it as is.
    """


class PublishError(MarketflowError):
    """Ticks could not be handed to the broker (a send failed or was not acked).

    The ticks stay buffered in the publisher and go out with its next flush; the message
    says how many messages failed and why.
    """
