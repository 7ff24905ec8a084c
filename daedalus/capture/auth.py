"""Coinbase Developer Platform (CDP) API keys -> the ES256 JWT a subscribe message carries.

Only needed when ``coinbase.api_key`` is set: the public market-data channels work
without it. Each subscribe gets a fresh token (they expire after two minutes). Signing
needs the optional ``auth`` extra (``pip install 'daedalus[auth]'``, PyJWT + cryptography).
"""

from __future__ import annotations

import secrets
import time

TOKEN_LIFETIME_S = 120


class AuthError(Exception):
    """The API key or secret cannot produce a token; the message says why."""


def ws_jwt(api_key: str, api_secret: str, now: float | None = None) -> str:
    """A signed JWT for the Advanced Trade WebSocket (no ``uri`` claim, unlike REST)."""
    try:
        import jwt
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise AuthError("coinbase.api_key is set but PyJWT is missing: pip install 'daedalus[auth]'") from None
    issued = int(time.time() if now is None else now)
    # keys copied from the JSON file Coinbase hands out often keep their "\n" escapes
    key = api_secret.replace("\\n", "\n")
    payload = {"iss": "cdp", "sub": api_key, "nbf": issued, "exp": issued + TOKEN_LIFETIME_S}
    try:
        return jwt.encode(payload, key, algorithm="ES256", headers={"kid": api_key, "nonce": secrets.token_hex(16)})
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise AuthError(
            f"coinbase.api_secret is not a usable EC private key (PEM, ES256): {type(exc).__name__}"
        ) from None
