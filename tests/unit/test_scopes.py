"""Scopes, market restrictions and JWT verification (:mod:`views.auth`, docs/security.md):
key tables and secret files, RS256/ES256 public keys and JWKS files, audience, issuer,
expiry and clock skew, and the 403 of :class:`views.base.ApiView` dispatch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import faust
import jwt
import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from faust.web import Request, Response

from core.config import AuthSection
from core.errors import ConfigError
from tests.unit.test_auth import _ctx
from views.auth import AccessGuard, Forbidden, Principal, TokenVerifier, Unauthorized
from views.base import ApiView, bind_view

READER = "r-0123456789abcdef"
OPERATOR = "o-0123456789abcdef"
ALL = "a-0123456789abcdef"
SECRET = "s" * 32


def _jwt(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256",
         kid: str | None = None) -> str:
    claims = {"exp": int(time.time()) + 300, **claims}
    if claims["exp"] is None:
        del claims["exp"]
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _verify(token: str, **settings: Any) -> Principal:
    return TokenVerifier(AuthSection(enabled=True, **settings)).verify(f"Bearer {token}")


def _refused(token: str, **settings: Any) -> str:
    with pytest.raises(Unauthorized) as info:
        _verify(token, **settings)
    assert info.value.status == 401
    return info.value.message


def _keys() -> list[Any]:
    return [ALL,
            {"key": READER, "name": "reader", "symbols": ["BTCUSDT"]},
            {"key": OPERATOR, "scopes": ["read", "control"], "exchanges": ["binance"]}]


def _pem(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


# -- scopes and restrictions ------------------------------------------------------------

def test_key_tables_carry_scopes_and_a_bare_key_has_all() -> None:
    guard = AccessGuard(AuthSection(enabled=True, api_keys=_keys()))
    everything = guard.check(f"Bearer {ALL}", None, 0.0, "admin")
    assert everything.scopes == {"read", "control", "admin"} and everything.symbols is None
    reader = guard.check(f"Bearer {READER}", None, 0.0, "read")
    assert reader.client_id == "key:reader" and reader.scopes == {"read"}
    with pytest.raises(Forbidden) as info:
        guard.check(f"Bearer {READER}", None, 0.0, "control")
    assert info.value.status == 403 and "'control'" in info.value.message
    assert info.value.headers["WWW-Authenticate"] == (
        'Bearer realm="marketflow", error="insufficient_scope", scope="control"')
    operator = guard.check(f"Bearer {OPERATOR}", None, 0.0, "control")
    assert operator.client_id.startswith("key:") and OPERATOR not in operator.client_id
    with pytest.raises(Forbidden, match="'admin'"):
        guard.check(f"Bearer {OPERATOR}", None, 0.0, "admin")
    with pytest.raises(Unauthorized):  # 401 before 403: an unknown key is not "forbidden"
        guard.check("Bearer x-0123456789abcdef", None, 0.0, "read")
    # auth off: the address, every scope
    off = AccessGuard(AuthSection(rate_limit_per_s=5)).check(None, "10.0.0.1", 0.0, "admin")
    assert off.client_id == "addr:10.0.0.1" and off.may("admin")


def test_market_restrictions() -> None:
    reader = Principal("key:r", frozenset({"read"}), symbols=frozenset({"BTCUSDT"}))
    reader.check_market("BTCUSDT", None)
    reader.check_market("BTCUSDT", "binance")
    with pytest.raises(Forbidden, match="symbol 'ETHUSDT'"):
        reader.check_market("ETHUSDT", "binance")
    binance = Principal("key:o", frozenset({"read"}), exchanges=frozenset({"binance"}))
    binance.check_market("ETHUSDT", "binance")
    with pytest.raises(Forbidden, match="exchange 'kraken'"):
        binance.check_market("ETHUSDT", "kraken")
    with pytest.raises(Forbidden, match="only exchanges binance: name one"):
        binance.check_market("ETHUSDT", None)  # consolidated mixes every exchange
    assert binance.allows("ETHUSDT", "binance") and not binance.allows("ETHUSDT", "kraken")


def test_jwt_scopes_and_restriction_claims() -> None:
    hs = {"jwt_hs256_secret": SECRET}
    assert _verify(_jwt({"sub": "a", "scope": "read control bogus"}), **hs).scopes == {
        "read", "control"}
    assert _verify(_jwt({"sub": "a", "scp": ["admin"]}), **hs).scopes == {"admin"}
    assert _verify(_jwt({"sub": "a"}), **hs).scopes == {"read"}  # jwt_default_scopes
    assert _verify(_jwt({"sub": "a"}), jwt_default_scopes=[], **hs).scopes == set()
    p = _verify(_jwt({"sub": "a", "symbols": ["BTCUSDT"], "exchanges": ["kraken"]}), **hs)
    assert p.symbols == {"BTCUSDT"} and p.exchanges == {"kraken"}
    assert _refused(_jwt({"sub": "a", "symbols": "BTCUSDT"}), **hs) == "invalid token"


# -- JWT claims -------------------------------------------------------------------------

def test_jwt_expiry_is_required_and_skew_bounded() -> None:
    hs = {"jwt_hs256_secret": SECRET}
    now = int(time.time())
    assert _refused(_jwt({"sub": "a", "exp": None}), **hs) == "token lacks the 'exp' claim"
    assert _verify(_jwt({"sub": "a", "exp": None}), jwt_require_exp=False, **hs).client_id \
        == "jwt:a"
    # 10 s past exp / 10 s before nbf: inside the default 30 s leeway, outside 0 s
    assert _verify(_jwt({"sub": "a", "exp": now - 10}), **hs).client_id == "jwt:a"
    assert _refused(_jwt({"sub": "a", "exp": now - 10}), jwt_leeway_s=0, **hs) \
        == "token expired"
    assert _verify(_jwt({"sub": "a", "nbf": now + 10}), **hs).client_id == "jwt:a"
    assert _refused(_jwt({"sub": "a", "nbf": now + 10}), jwt_leeway_s=0, **hs) \
        == "token not yet valid"
    assert _refused(_jwt({"sub": "a", "exp": now - 120}), **hs) == "token expired"
    with pytest.raises(ValueError):
        AuthSection(jwt_leeway_s=301)


def test_jwt_audience_and_issuer() -> None:
    cfg = {"jwt_hs256_secret": SECRET, "jwt_audience": "marketflow",
           "jwt_issuer": "https://idp.example"}
    good = {"sub": "a", "aud": "marketflow", "iss": "https://idp.example"}
    assert _verify(_jwt(good), **cfg).client_id == "jwt:a"
    assert _verify(_jwt({**good, "aud": ["other", "marketflow"]}), **cfg).client_id == "jwt:a"
    assert _refused(_jwt({**good, "aud": "other"}), **cfg) == "token has the wrong audience"
    assert _refused(_jwt({**good, "iss": "https://evil.example"}), **cfg) \
        == "token has the wrong issuer"
    no_aud = {k: v for k, v in good.items() if k != "aud"}
    assert _refused(_jwt(no_aud), **cfg) == "token lacks the 'aud' claim"
    no_iss = {k: v for k, v in good.items() if k != "iss"}
    assert _refused(_jwt(no_iss), **cfg) == "token lacks the 'iss' claim"
    # no audience configured: a token meant for some audience is refused
    assert _refused(_jwt(good), jwt_hs256_secret=SECRET) == "token has the wrong audience"


# -- public keys ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_public_key_file(tmp_path: Path, kind: str) -> None:
    if kind == "rsa":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alg = "RS256"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        alg = "ES256"
    pem = tmp_path / "jwt.pub"
    pem.write_bytes(_pem(private.public_key()))
    cfg = {"jwt_public_key_file": pem}
    assert _verify(_jwt({"sub": "svc", "scope": "read"}, private, alg), **cfg).client_id \
        == "jwt:svc"
    other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
             else ec.generate_private_key(ec.SECP256R1()))
    assert _refused(_jwt({"sub": "svc"}, other, alg), **cfg) == "invalid token"
    # the algorithm comes from the key: HS256 "signed" with the public key is refused
    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(
        {"sub": "mallory", "exp": int(time.time()) + 60}).encode()).rstrip(b"=")
    signing = head + b"." + body
    sig = base64.urlsafe_b64encode(
        hmac.new(pem.read_bytes(), signing, hashlib.sha256).digest()).rstrip(b"=")
    assert _refused((signing + b"." + sig).decode(), **cfg) == "invalid token"
    assert _refused(_jwt({"sub": "a"}), **cfg) == "invalid token"  # no HS256 secret set


def test_jwks_file(tmp_path: Path) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k1.public_key())), "kid": "2026-a",
         "alg": "RS256", "use": "sig"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k2.public_key())), "kid": "2026-b",
         "alg": "ES256"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    cfg = {"jwt_jwks_file": path}
    assert _verify(_jwt({"sub": "x"}, k1, "RS256", kid="2026-a"), **cfg).client_id == "jwt:x"
    assert _verify(_jwt({"sub": "y"}, k2, "ES256", kid="2026-b"), **cfg).client_id == "jwt:y"
    assert _refused(_jwt({"sub": "x"}, k1, "RS256", kid="2026-b"), **cfg) == "invalid token"
    assert _refused(_jwt({"sub": "x"}, k1, "RS256", kid="gone"), **cfg) == "invalid token"
    assert _refused(_jwt({"sub": "x"}, k1, "RS256"), **cfg) == "invalid token"  # no kid
    path.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="jwt_jwks_file"):
        TokenVerifier(AuthSection(enabled=True, jwt_jwks_file=path))


def test_bad_public_key_file_is_a_config_error(tmp_path: Path) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("not a key")
    with pytest.raises(ConfigError, match="jwt_public_key_file"):
        AccessGuard(AuthSection(enabled=True, jwt_public_key_file=pem))
    with pytest.raises(ConfigError, match="jwt_public_key_file"):
        AccessGuard(AuthSection(enabled=True, jwt_public_key_file=tmp_path / "missing"))


# -- secrets from files -----------------------------------------------------------------

def test_secrets_read_from_files_and_never_echoed(tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET + "\n")
    key_file = tmp_path / "reader-key"
    key_file.write_text(READER + "\n")
    s = AuthSection(enabled=True, jwt_hs256_secret_file=secret_file,
                    api_keys=[{"key_file": key_file, "name": "reader"}])
    assert SECRET not in repr(s) and READER not in repr(s)
    assert _verify(_jwt({"sub": "a"}), jwt_hs256_secret_file=secret_file).client_id == "jwt:a"
    guard = AccessGuard(s)
    assert guard.check(f"Bearer {READER}", None, 0.0).client_id == "key:reader"
    short = tmp_path / "short"
    short.write_text("too-short")
    with pytest.raises(ValueError, match="at least 32 bytes") as info:
        AuthSection(jwt_hs256_secret_file=short)
    assert "too-short" not in str(info.value).split("input_value")[0]
    with pytest.raises(ValueError, match="cannot read"):
        AuthSection(jwt_hs256_secret_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="exactly one of key and key_file"):
        AuthSection(api_keys=[{"key": READER, "key_file": key_file}])
    with pytest.raises(ValueError, match="both"):
        AuthSection(jwt_hs256_secret=SECRET, jwt_hs256_secret_file=secret_file)


# -- dispatch ---------------------------------------------------------------------------

class _Series(ApiView):
    async def get(self, request: Request, symbol: str = "") -> Response:
        self.check_market(request, symbol, request.query.get("exchange"))
        return self.ok({"symbol": symbol, "client": self.principal(request).client_id})

    async def post(self, request: Request, symbol: str = "") -> Response:
        return self.ok({"switched": symbol})


async def _call(view: ApiView, method: str, path: str, token: str) -> tuple[int, Any]:
    symbol = path.split("?")[0].rsplit("/", 1)[1]
    req = make_mocked_request(method, path, headers={"Authorization": f"Bearer {token}"},
                              match_info={"symbol": symbol})
    resp = await view(req)
    return resp.status, json.loads(resp.body)


async def test_dispatch_answers_403_naming_the_scope_or_the_market() -> None:
    ctx = _ctx(AccessGuard(AuthSection(enabled=True, api_keys=_keys())))
    app = faust.App("unit-scopes", web_enabled=False)
    app.page("/series/{symbol}")(bind_view(_Series, ctx))
    view = app.web.views["/series/{symbol}"]
    assert (await _call(view, "GET", "/series/BTCUSDT", READER)) == (
        200, {"symbol": "BTCUSDT", "client": "key:reader"})
    assert await _call(view, "POST", "/series/BTCUSDT", READER) == (403, {"error": {
        "status": 403, "message": "this credential lacks the 'control' scope"}})
    assert await _call(view, "GET", "/series/ETHUSDT", READER) == (403, {"error": {
        "status": 403, "message": "this credential may not read symbol 'ETHUSDT'"}})
    assert (await _call(view, "POST", "/series/x", OPERATOR))[0] == 200
    assert (await _call(view, "GET", "/series/ETHUSDT?exchange=kraken", OPERATOR))[0] == 403
    assert (await _call(view, "GET", "/series/ETHUSDT?exchange=binance", OPERATOR))[0] == 200
    assert (await _call(view, "GET", "/series/ETHUSDT", ALL))[0] == 200


def test_loopback_bind_addresses() -> None:
    """The worker warns at start when it binds beyond loopback with auth off
    (app/factory.py); these addresses count as loopback, the others do not."""
    from app.factory import _is_loopback

    assert all(map(_is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "10.1.2.3", "example.com")))
