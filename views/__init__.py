"""HTTP API (Faust web views, aiohttp): latest prices, 1-minute OHLCV, health, metrics."""

from views import health, metrics, ohlcv, prices

__all__ = ["health", "metrics", "ohlcv", "prices"]
