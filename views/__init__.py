"""HTTP API (Faust web views, aiohttp): latest prices, 1-minute OHLCV, health, metrics,
mode switch."""

from views import gaps, health, metrics, mode, ohlcv, openapi, prices, replay, udf

__all__ = ["gaps", "health", "metrics", "mode", "ohlcv", "openapi", "prices", "replay", "udf"]
