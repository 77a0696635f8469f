"""The pub/sub channel ``<p>:stream`` (:func:`stores.keys.stream_channel`): every change of
a live 1-minute bar or a latest price that a worker writes to Redis, published in the same
pipeline right after the writes (so a reader that gets a message and then reads the keys
sees at least that state). Read by every worker's stream hub (:mod:`views.stream_hub`).

Message (UTF-8 JSON, one per write-buffer flush)::

    {"bars": [<live bar: closed-bar schema of core.models plus "closed", maybe
               "correction">, ...],
     "prices": [["binance", "BTCUSDT", 61837.63, 1723161255342], ...]}

``prices`` items are ``[exchange, symbol, price, ts_ms]``; either list may be empty.
Pub/sub is at most once: a reader that lost its connection must re-read the keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline

from core.errors import MarketflowError
from stores.keys import stream_channel

__all__ = ["StreamChange", "StreamChannel", "decode_change"]


@dataclass(frozen=True)
class StreamChange:
    """One decoded channel message.

    Attributes:
        bars: live 1-minute bars (dicts of the closed-bar schema plus ``closed``).
        prices: ``(exchange, symbol, price, ts_ms)`` tuples.
    """

    bars: list[dict[str, Any]]
    prices: list[tuple[str, str, float, int]]


def decode_change(data: bytes | str) -> StreamChange:
    """Decode one channel message.

    Raises:
        MarketflowError: not a message of this channel's format.
    """
    try:
        obj = orjson.loads(data)
        bars = obj["bars"]
        prices = [(str(e), str(s), float(p), int(t)) for e, s, p, t in obj["prices"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MarketflowError(f"bad stream channel message: {exc}") from exc
    if not isinstance(bars, list) or not all(isinstance(b, dict) for b in bars):
        raise MarketflowError("bad stream channel message: bars is not a list of objects")
    return StreamChange(bars, prices)


class StreamChannel:
    """Publisher side of the channel, under ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.channel = stream_channel(prefix)

    def queue_publish(self, pipe: Pipeline, bars: list[dict[str, Any]],
                      prices: Iterable[tuple[str, tuple[float, int]]]) -> bool:
        """Add one ``PUBLISH`` of ``bars`` and ``prices`` (``("exchange:symbol", (price,
        ts_ms))`` pairs) to ``pipe``; nothing when both are empty. Returns whether a
        message was queued."""
        items = [[*key.split(":", 1), price, ts_ms] for key, (price, ts_ms) in prices]
        if not bars and not items:
            return False
        pipe.publish(self.channel, orjson.dumps({"bars": bars, "prices": items}))
        return True
