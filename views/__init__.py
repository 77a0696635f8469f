"""HTTP API (Faust web views, aiohttp): latest prices, 1-minute OHLCV, health, metrics,
mode switch."""

from views import health, metrics, mode, ohlcv, openapi, prices, udf

__all__ = ["health", "metrics", "mode", "ohlcv", "openapi", "prices", "udf"]
