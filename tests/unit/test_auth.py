"""Access control (:mod:`views.auth`): bearer tokens, JWTs, the rate limiter, the settings
loader, and :class:`views.base.ApiView` dispatch in-process (405, 500, error shape; the
guard comes from the view's :class:`views.context.ViewContext`)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import faust
import jwt
import pytest
from aiohttp.test_utils import make_mocked_request
from faust.web import Request, Response

from core.config import AuthSection, load_settings
from core.errors import ConfigError, MarketflowError
from views.auth import (
    AccessGuard,
    RateLimited,
    RateLimiter,
    Unauthorized,
    check_token,
)
from views.base import CLIENT_ID_KEY, ApiView, bind_view
from views.context import ViewContext

KEY = "k-0123456789abcdef"
OTHER_KEY = "k-fedcba9876543210"
SECRET = "s" * 32


def _settings(**kw: Any) -> AuthSection:
    base: dict[str, Any] = {"enabled": True, "api_keys": [KEY, OTHER_KEY],
                            "jwt_hs256_secret": SECRET}
    return AuthSection(**{**base, **kw})


def _jwt(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256",
         headers: dict[str, Any] | None = None) -> str:
    """A JWT of ``claims``, with an ``exp`` 5 minutes ahead unless ``claims`` sets one
    (``"exp": None``: no ``exp`` claim)."""
    claims = {"exp": int(time.time()) + 300, **claims}
    if claims["exp"] is None:
        del claims["exp"]
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _unauthorized(header: str | None, settings: AuthSection | None = None) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        check_token(header, settings or _settings())
    assert info.value.status == 401
    assert isinstance(info.value, MarketflowError)
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer realm="marketflow"')
    return info.value


# -- static keys ------------------------------------------------------------------------

def test_static_keys_accepted_with_a_stable_fingerprint() -> None:
    a = check_token(f"Bearer {KEY}", _settings())
    assert a.startswith("key:") and KEY not in a
    assert check_token(f"bearer   {KEY} ", _settings()) == a  # scheme case, spacing
    b = check_token(f"Bearer {OTHER_KEY}", _settings())
    assert b.startswith("key:") and b != a


def test_missing_and_non_bearer_headers() -> None:
    for header in (None, "", "   "):
        exc = _unauthorized(header)
        assert exc.message == "missing bearer token"
        assert "error=" not in exc.headers["WWW-Authenticate"]  # RFC 6750 3.1
    for header in (f"Basic {KEY}", KEY, "Bearer"):
        assert "error=" not in _unauthorized(header).headers["WWW-Authenticate"]


def test_wrong_keys_refused_without_echoing_them() -> None:
    for token in (KEY[:-1], KEY + "x", KEY.upper(), "k-ünïcödé-0123456789"):
        exc = _unauthorized(f"Bearer {token}")
        assert exc.message == "invalid token"
        assert 'error="invalid_token"' in exc.headers["WWW-Authenticate"]
        assert token not in str(exc) and token not in exc.headers["WWW-Authenticate"]
    assert _unauthorized(f"Bearer {KEY} extra").message == "malformed bearer token"


def test_no_credentials_configured_refuses_everything() -> None:
    s = AuthSection(enabled=False)
    _unauthorized(f"Bearer {KEY}", s)
    _unauthorized("Bearer " + _jwt({"sub": "a"}), s)


# -- JWT --------------------------------------------------------------------------------

def test_valid_jwt_keyed_by_subject() -> None:
    now = int(time.time())
    token = _jwt({"sub": "alice", "exp": now + 60, "nbf": now - 5, "iat": now})
    assert check_token(f"Bearer {token}", _settings()) == "jwt:alice"
    anon = _jwt({"scope": "read"})
    cid = check_token(f"Bearer {anon}", _settings())
    assert cid.startswith("jwt:") and anon not in cid


def test_jwt_refused_when_expired_not_yet_valid_or_badly_signed() -> None:
    now = int(time.time())
    assert _unauthorized("Bearer " + _jwt({"sub": "a", "exp": now - 120})).message \
        == "token expired"
    assert _unauthorized("Bearer " + _jwt({"sub": "a", "nbf": now + 600})).message \
        == "token not yet valid"
    assert _unauthorized("Bearer " + _jwt({"sub": "a"}, key="x" * 32)).message \
        == "invalid token"
    # an expired token with a bad signature is only "invalid": claims are not revealed
    assert _unauthorized("Bearer " + _jwt({"sub": "a", "exp": now - 120}, key="x" * 32)
                         ).message == "invalid token"
    good = _jwt({"sub": "a"})
    head, _, sig = good.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "root"}).encode()).rstrip(b"=")
    _unauthorized(f"Bearer {head}.{forged.decode()}.{sig}")
    _unauthorized("Bearer a.b.c")
    _unauthorized("Bearer " + _jwt({"sub": "a", "aud": "someone-else"}))


def test_jwt_other_algorithms_and_alg_none_refused() -> None:
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=")
    claims = base64.urlsafe_b64encode(b'{"sub":"mallory"}').rstrip(b"=")
    unsigned = f"{none_header.decode()}.{claims.decode()}."
    assert _unauthorized(f"Bearer {unsigned}").message == "invalid token"
    _unauthorized("Bearer " + _jwt({"sub": "a"}, key=SECRET + SECRET, alg="HS512"))


def test_jwt_ignored_without_secret() -> None:
    s = _settings(jwt_hs256_secret=None)
    _unauthorized("Bearer " + _jwt({"sub": "alice"}), s)
    assert check_token(f"Bearer {KEY}", s).startswith("key:")


# -- settings ---------------------------------------------------------------------------

def test_settings_validation_and_secrets_hidden() -> None:
    s = _settings()
    assert KEY not in repr(s) and SECRET not in repr(s)
    with pytest.raises(ValueError, match="needs api_keys, jwt_hs256_secret"):
        AuthSection(enabled=True)
    with pytest.raises(ValueError, match="16 visible"):
        AuthSection(api_keys=["short"])
    with pytest.raises(ValueError, match="16 visible"):
        AuthSection(api_keys=["has space 0123456789"])
    with pytest.raises(ValueError, match="32 bytes"):
        AuthSection(jwt_hs256_secret="too-short")
    with pytest.raises(ValueError):
        AuthSection(rate_limit_burst=0)
    with pytest.raises(ValueError):
        AuthSection(rate_limit_per_s=-1)


@pytest.fixture
def auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in ("ENABLED", "API_KEYS", "JWT_HS256_SECRET", "RATE_LIMIT_PER_S",
                 "RATE_LIMIT_BURST"):
        monkeypatch.delenv(f"MARKETFLOW_AUTH__{name}", raising=False)
    cfg = tmp_path / "marketflow.toml"
    monkeypatch.setenv("MARKETFLOW_CONFIG", str(cfg))
    yield cfg


def test_loader_reads_toml_table_and_env_wins(auth_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    auth_env.write_text('[web]\nport = 1\n')
    assert load_settings().auth == AuthSection()  # no [auth] table: defaults
    auth_env.write_text(f'[auth]\nenabled = true\napi_keys = ["{KEY}"]\n'
                        'rate_limit_per_s = 5\n')
    s = load_settings().auth
    assert s.enabled and [k.get_secret_value() for k in s.api_keys] == [KEY]
    assert s.rate_limit_per_s == 5 and s.rate_limit_burst == 20
    monkeypatch.setenv("MARKETFLOW_AUTH__API_KEYS", json.dumps([OTHER_KEY]))
    monkeypatch.setenv("MARKETFLOW_AUTH__RATE_LIMIT_BURST", "3")
    monkeypatch.setenv("MARKETFLOW_AUTH__JWT_HS256_SECRET", SECRET)
    s = load_settings().auth
    assert [k.get_secret_value() for k in s.api_keys] == [OTHER_KEY]
    assert s.rate_limit_burst == 3 and s.jwt_hs256_secret is not None


def test_loader_errors_name_the_setting_not_the_secret(
        auth_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth_env.write_text('[auth]\nenabeld = true\n')
    with pytest.raises(ConfigError, match=r"auth\.enabeld"):
        load_settings()
    auth_env.write_text("")
    monkeypatch.setenv("MARKETFLOW_AUTH__JWT_HS256_SECRET", "leaky-but-short")
    with pytest.raises(ConfigError, match=r"auth\.jwt_hs256_secret") as info:
        load_settings()
    assert "leaky-but-short" not in str(info.value)
    auth_env.write_text("[auth\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings()


# -- rate limiter -----------------------------------------------------------------------

def test_bucket_burst_then_refill() -> None:
    rl = RateLimiter(rate_per_s=2, burst=3)
    assert [rl.acquire("a", 100.0) for _ in range(3)] == [None, None, None]
    retry = rl.acquire("a", 100.0)
    assert retry == pytest.approx(0.5)
    assert rl.acquire("a", 100.25) == pytest.approx(0.25)  # refused requests cost nothing
    assert rl.acquire("a", 100.5) is None  # one token refilled
    assert rl.acquire("a", 100.5) is not None
    assert [rl.acquire("a", 110.0) for _ in range(3)] == [None, None, None]  # capped at burst
    assert rl.acquire("a", 110.0) is not None
    assert rl.acquire("b", 110.0) is None  # clients are independent


def test_bucket_tolerates_clock_going_backwards() -> None:
    rl = RateLimiter(rate_per_s=1, burst=1)
    assert rl.acquire("a", 50.0) is None
    assert rl.acquire("a", 49.0) == pytest.approx(1.0)


def test_idle_clients_evicted_and_memory_capped() -> None:
    rl = RateLimiter(rate_per_s=10, burst=5, max_clients=100)
    for i in range(100):
        rl.acquire(f"c{i}", 0.0)
    assert len(rl) == 100
    rl.acquire("new", 0.1)  # over the cap: the least recently seen is dropped
    assert len(rl) == 100
    rl.acquire("c1", 0.2)
    rl.acquire("late", 0.45)  # full again after burst/rate = 0.5 s: not yet
    assert len(rl) == 100
    rl.acquire("late", 0.55)  # c2..c99 idle 0.55 s: full buckets, forgotten
    assert len(rl) == 3  # new, c1, late
    for _ in range(5):  # c5's bucket was full anyway: forgetting it changed nothing
        assert rl.acquire("c5", 1.0) is None
    assert rl.acquire("c5", 1.0) is not None


def test_limiter_rejects_bad_parameters() -> None:
    for rate, burst in ((0, 1), (float("inf"), 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimiter(rate, burst)


# -- guard ------------------------------------------------------------------------------

def test_guard_authenticates_then_limits_per_client() -> None:
    g = AccessGuard(_settings(rate_limit_per_s=1, rate_limit_burst=2))
    assert g.active
    header = f"Bearer {KEY}"
    cid = g.admit(header, "10.0.0.1", 0.0)
    assert g.admit(header, "10.0.0.2", 0.0) == cid  # keyed by key, not address
    with pytest.raises(RateLimited) as info:
        g.admit(header, "10.0.0.3", 0.0)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    assert g.admit(f"Bearer {OTHER_KEY}", "10.0.0.1", 0.0) != cid


def test_guard_throttles_failed_attempts_per_address() -> None:
    g = AccessGuard(_settings(rate_limit_per_s=1, rate_limit_burst=2))
    for _ in range(2):
        with pytest.raises(Unauthorized):
            g.admit("Bearer wrong-wrong-wrong-wrong", "10.0.0.9", 0.0)
    with pytest.raises(RateLimited):
        g.admit("Bearer wrong-wrong-wrong-wrong", "10.0.0.9", 0.0)
    assert g.admit(f"Bearer {KEY}", "10.0.0.9", 0.0).startswith("key:")


def test_guard_with_auth_off() -> None:
    assert not AccessGuard(AuthSection()).active
    g = AccessGuard(AuthSection(rate_limit_per_s=1, rate_limit_burst=1))
    assert g.admit(None, "1.2.3.4", 0.0) == "addr:1.2.3.4"
    with pytest.raises(RateLimited):
        g.admit("Bearer anything", "1.2.3.4", 0.1)
    assert g.admit(None, None, 0.1) == "addr:unknown"


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert RateLimited(0.01).headers["Retry-After"] == "1"
    assert RateLimited(2.2).headers["Retry-After"] == "3"


# -- ApiView dispatch (in-process, no worker) --------------------------------------------

class _Thing(ApiView):
    async def get(self, request: Request, name: str = "") -> Response:
        if name == "boom":
            raise RuntimeError("secret internals /etc/passwd")
        if name == "nf":
            raise self.NotFound("no such thing")
        if name == "bad":
            return self.fail(400, "bad name", param="name")
        return self.ok({"name": name, "client": request.get(CLIENT_ID_KEY)})

    async def post(self, request: Request, name: str = "") -> Response:
        return self.ok({"created": name}, status=201)


class _Health(ApiView):
    async def get(self, request: Request) -> Response:
        return self.ok({"status": "ok"})


def _ctx(guard: AccessGuard) -> ViewContext:
    """A context with a real guard; the views under test use nothing else."""
    stub = cast(Any, None)
    return ViewContext(settings=stub, database=stub, redis=stub, latest=stub,
                       stats=stub, live_bars=stub, redis_writes=stub, ohlcv_cache=stub,
                       on_demand=stub, access_guard=guard, stream_hub=stub)


def _set_guard(view: ApiView, guard: AccessGuard) -> None:
    cls = type(view)
    cls.ctx = dataclasses.replace(cls.ctx, access_guard=guard)


@pytest.fixture
def views() -> tuple[ApiView, ApiView]:
    ctx = _ctx(AccessGuard(_settings(rate_limit_per_s=1, rate_limit_burst=1)))
    app = faust.App("unit-apiview", web_enabled=False)
    app.page("/things/{name}")(bind_view(_Thing, ctx))
    app.page("/health")(bind_view(_Health, ctx))
    thing, health = app.web.views["/things/{name}"], app.web.views["/health"]
    assert isinstance(thing, _Thing) and isinstance(health, _Health)
    assert not hasattr(_Thing, "ctx")  # the module class stays unbound
    return thing, health


async def _call(view: ApiView, method: str, name: str | None = None,
                token: str | None = KEY) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = view.view_path.replace("{name}", name or "")
    match = {"name": name} if name is not None else {}
    req = make_mocked_request(method, path, headers=headers, match_info=match)
    resp = await view(req)
    body = json.loads(resp.body) if resp.body else None
    return resp.status, dict(resp.headers), body


async def test_view_success_error_shape_and_client_id(views: tuple[ApiView, ApiView]) -> None:
    thing, _ = views
    status, _, body = await _call(thing, "GET", "x")
    assert status == 200 and body["name"] == "x" and body["client"].startswith("key:")
    status, _, body = await _call(thing, "GET", "bad", token=OTHER_KEY)
    assert (status, body) == (400, {"error": {"status": 400, "message": "bad name",
                                              "param": "name"}})
    _set_guard(thing, AccessGuard(_settings()))  # no rate limit from here on
    status, _, body = await _call(thing, "GET", "nf")
    assert (status, body) == (404, {"error": {"status": 404, "message": "no such thing"}})
    status, _, body = await _call(thing, "POST", "y")
    assert (status, body) == (201, {"created": "y"})


async def test_view_500_without_traceback(views: tuple[ApiView, ApiView],
                                          caplog: pytest.LogCaptureFixture) -> None:
    thing, _ = views
    status, _, body = await _call(thing, "GET", "boom")
    assert status == 500
    message = body["error"]["message"]
    assert message.startswith("internal server error (ref ")
    assert "passwd" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    ref = message.split("ref ")[1].rstrip(")")
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # traceback kept server-side


async def test_view_405_and_options(views: tuple[ApiView, ApiView]) -> None:
    thing, health = views
    status, headers, body = await _call(thing, "DELETE", "x")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    assert body == {"error": {"status": 405, "message": "method DELETE not allowed"}}
    status, headers, _ = await _call(health, "POST", token=None)
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
    status, headers, body = await _call(thing, "OPTIONS", "x", token=None)
    assert status == 204 and headers["Allow"] == "GET, HEAD, OPTIONS, POST" and body is None
    assert thing.get_methods() >= {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


async def test_view_auth_and_rate_limit(views: tuple[ApiView, ApiView]) -> None:
    thing, health = views
    status, headers, body = await _call(thing, "GET", "x", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="marketflow"'
    assert body == {"error": {"status": 401, "message": "missing bearer token"}}
    status, headers, _ = await _call(thing, "GET", "x", token="nope-nope-nope-nope")
    assert status == 429 and int(headers["Retry-After"]) >= 1  # the address's bucket
    assert (await _call(thing, "GET", "x"))[0] == 200
    assert (await _call(thing, "GET", "x"))[0] == 429
    for _ in range(3):  # /health: no token, no limit
        assert (await _call(health, "GET", token=None))[0] == 200
