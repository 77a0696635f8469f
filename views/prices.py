"""``GET /prices/latest/{symbol}`` and ``GET /prices/latest/{exchange}/{symbol}``.

Response 200::

    {"symbol": "BTCUSDT", "exchange": "binance", "price": 61837.63,
     "timestamp": 1723161255342, "time": "2024-08-08T23:54:15.342Z"}

404 when no price is known, 400 on a malformed name, 503 when Redis is unreachable.
"""

from __future__ import annotations

from faust.web import Request, Response, View
from redis.exceptions import RedisError

from app.errors import QueryError
from app.faust_app import app
from app.services import latest_prices
from views.params import iso_ms, parse_name

__all__ = ["LatestPrice", "LatestPriceOnExchange"]


async def _latest(view: View, symbol: str, exchange: str | None) -> Response:
    try:
        parse_name(symbol, "symbol")
        parse_name(exchange, "exchange", required=False)
    except QueryError as exc:
        return view.json({"error": str(exc)}, status=400)
    try:
        found = await latest_prices.get(symbol, exchange)
    except (RedisError, OSError) as exc:
        return view.json({"error": f"redis unavailable: {type(exc).__name__}"}, status=503)
    if found is None:
        where = f" on exchange {exchange!r}" if exchange else ""
        return view.json({"error": f"unknown symbol {symbol!r}{where}: no price seen"},
                         status=404)
    return view.json({
        "symbol": symbol,
        "exchange": found["exchange"],
        "price": found["price"],
        "timestamp": found["ts_ms"],
        "time": iso_ms(found["ts_ms"]),
    })


@app.page("/prices/latest/{symbol}")
class LatestPrice(View):
    """Newest trade price of ``symbol`` on any exchange."""

    async def get(self, request: Request, symbol: str) -> Response:
        return await _latest(self, symbol, None)


@app.page("/prices/latest/{exchange}/{symbol}")
class LatestPriceOnExchange(View):
    """Newest trade price of ``symbol`` on ``exchange``."""

    async def get(
        self, request: Request, exchange: str, symbol: str
    ) -> Response:
        return await _latest(self, symbol, exchange)
