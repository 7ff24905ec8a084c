"""REST responses shaped like Coinbase's, enough for ``ccxt.pro.coinbase`` to load markets.

ccxt's ``load_markets`` calls ``GET /api/v3/brokerage/market/products`` (spot, then
``?product_type=FUTURE``), ``/v2/currencies``, ``/v2/currencies/crypto`` and
``/v2/exchange-rates``. A replayed recording may carry a real products response; the
currency endpoints are then derived from it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from daedalus.sim.market import ProductSpec, format_decimal

FIAT = {"USD": "United States Dollar", "EUR": "Euro", "GBP": "British Pound", "JPY": "Japanese Yen"}


def product_object(spec: ProductSpec, price: int, volume: int) -> dict[str, Any]:
    pd = spec.price_decimals
    price_text = format_decimal(price, pd)
    return {
        "product_id": spec.product_id,
        "price": price_text,
        "price_percentage_change_24h": "0",
        "volume_24h": format_decimal(volume, 8),
        "volume_percentage_change_24h": "0",
        "base_increment": spec.base_increment,
        "quote_increment": spec.price_increment,
        "quote_min_size": "1",
        "quote_max_size": "150000000",
        "base_min_size": spec.base_increment,
        "base_max_size": "10000000",
        "base_name": spec.base_name,
        "quote_name": spec.quote_name,
        "watched": False,
        "is_disabled": False,
        "new": False,
        "status": "online",
        "cancel_only": False,
        "limit_only": False,
        "post_only": False,
        "trading_disabled": False,
        "auction_mode": False,
        "product_type": "SPOT",
        "quote_currency_id": spec.quote,
        "base_currency_id": spec.base,
        "fcm_trading_session_details": None,
        "mid_market_price": "",
        "alias": "",
        "alias_to": [],
        "base_display_symbol": spec.base,
        "quote_display_symbol": spec.quote,
        "view_only": False,
        "price_increment": spec.price_increment,
        "display_name": spec.product_id,
        "product_venue": "CBE",
        "approximate_quote_24h_volume": "0",
    }


def products_body(products: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"products": products, "num_products": len(products), "pagination": {"has_next": False}})


def currency_codes(products_json: bytes) -> set[str]:
    """Every base and quote currency named by a products response."""
    products = orjson.loads(products_json).get("products", [])
    codes: set[str] = set()
    for p in products:
        codes.update(c for c in (p.get("base_currency_id"), p.get("quote_currency_id")) if c)
    return codes


def fiat_currencies_body(codes: set[str]) -> bytes:
    data = [{"id": c, "name": FIAT[c], "min_size": "0.01"} for c in sorted(codes) if c in FIAT]
    return orjson.dumps({"data": data})


def crypto_currencies_body(codes: set[str]) -> bytes:
    data = []
    for i, code in enumerate(sorted(c for c in codes if c not in FIAT)):
        digest = hashlib.sha1(code.encode()).hexdigest()
        data.append(
            {
                "asset_id": f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}",
                "code": code,
                "name": code.title(),
                "color": "#0052FF",
                "sort_index": str(100 + i),
                "exponent": 8,
                "type": "crypto",
                "address_regex": "^.+$",
            }
        )
    return orjson.dumps({"data": data})


def exchange_rates_body(codes: set[str]) -> bytes:
    return orjson.dumps({"data": {"currency": "USD", "rates": {c: "1" for c in sorted(codes)}}})
