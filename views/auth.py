"""HTTP API access control: bearer tokens (API keys, JWTs), scopes, market restrictions
and the rate limit (token buckets per client and for the cluster). No I/O after
construction except through the injected shared limiter (:class:`SharedLimiter`); no Faust
imports. The user-facing description is docs/security.md.

Configuration (the ``[auth]`` table of the TOML file, or environment overrides)::

    [auth]
    enabled = true                       # MARKETFLOW_AUTH__ENABLED=true
    api_keys = ["<16+ visible chars>"]   # a bare key: every scope
    jwt_hs256_secret_file = "/run/secrets/jwt"   # or jwt_hs256_secret = "<32+ bytes>"
    jwt_audience = "marketflow"
    rate_limit_per_s = 10                # MARKETFLOW_AUTH__RATE_LIMIT_PER_S (0 = off)

    [[auth.api_keys]]                    # a key with scopes and restrictions
    key_file = "/run/secrets/reader"
    name = "reader"
    scopes = ["read"]
    symbols = ["BTCUSDT", "ETHUSDT"]

The settings are :class:`core.config.AuthSection` (``settings.auth``).

Rules:

* A request carries ``Authorization: Bearer <token>``. The token is accepted when it
  equals one of ``api_keys`` (constant-time comparison, every key compared) or is a JWT
  verified by :class:`TokenVerifier`: HS256 with ``jwt_hs256_secret``, RS256/ES256 with
  ``jwt_public_key_file`` or a ``jwt_jwks_file`` key (chosen by the token's ``kid``);
  the algorithm comes from the configured key, never from the token alone (``none`` and
  an HS256 token signed with a public key are refused). ``exp`` is required (unless
  ``jwt_require_exp`` is off) and ``exp``/``nbf``/``iat`` are checked with
  ``jwt_leeway_s`` of clock skew; ``aud`` must equal ``jwt_audience`` (a token with an
  ``aud`` is refused when none is configured) and ``iss`` ``jwt_issuer`` when set.
  RFC 7519 section 4.1.
* Scopes (:data:`core.config.ALL_SCOPES`): ``read`` (every GET view and the stream),
  ``control`` (mode switch, replay control), ``admin`` (on-demand history). A bare API
  key has every scope; a key table names its own; a JWT's come from its ``scope`` claim
  (space-separated, RFC 8693 section 4.2) or ``scp`` (a list), else
  ``jwt_default_scopes``. Unknown scope names are ignored.
* Restrictions: a key table's ``symbols``/``exchanges``, or a JWT's ``symbols``/
  ``exchanges`` claims (lists of strings), limit the series it may read
  (:meth:`Principal.check_market`).
* Errors: a missing or invalid credential is 401 (:class:`Unauthorized`, with
  ``WWW-Authenticate``, RFC 6750 section 3); a valid one without the scope or outside
  its restrictions is 403 (:class:`Forbidden`, ``error="insufficient_scope"``).
* The client id (rate-limit key, safe to log) is ``key:<name or sha256(key)[:12]>`` for
  an API key, ``jwt:<sub>`` for a JWT (``jwt:<sha256(token)[:12]>`` without ``sub``), and
  ``addr:<remote address>`` for requests that are not authenticated (auth off, or a
  failed attempt: failed attempts are throttled per address).
* Rate limit: a token bucket per client, ``rate_limit_per_s`` tokens per second up to
  ``rate_limit_burst``, and with ``global_rate_limit_per_s`` one bucket for every client
  together. Counted in Redis for the whole cluster (``rate_limit_shared``, default on:
  :class:`stores.rate_limit.SharedRateLimiter`); while Redis fails, and with
  ``rate_limit_shared`` off, per worker process (N workers then allow N times the rate).

Secrets are :class:`pydantic.SecretStr` (hidden in ``repr``); nothing here logs a token,
and no error message repeats one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import SecretStr
from redis.exceptions import RedisError

from core.config import ALL_SCOPES, ApiKey, AuthSection
from core.errors import ConfigError, MarketflowError
from stores.rate_limit import GLOBAL_CLIENT

__all__ = [
    "MAX_CLIENTS",
    "OPEN",
    "AccessDenied",
    "AccessGuard",
    "Forbidden",
    "Principal",
    "RateLimited",
    "RateLimiter",
    "SharedLimiter",
    "TokenVerifier",
    "Unauthorized",
    "check_token",
]

log = logging.getLogger(__name__)

#: realm announced in ``WWW-Authenticate``
REALM = "marketflow"
#: most clients the rate limiter remembers (least recently seen are forgotten first)
MAX_CLIENTS = 10_000

class AccessDenied(MarketflowError):
    """A request is refused before reaching its view.

    Attributes:
        status: HTTP status.
        message: human-readable reason (never contains the token).
        headers: headers the response must carry.
    """

    status = 403

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(AccessDenied):
    """401: missing, malformed, unknown, expired or badly signed bearer token.

    ``error`` is the RFC 6750 error code announced in ``WWW-Authenticate`` (none when
    the request carried no bearer token at all, as RFC 6750 3.1 asks).
    """

    status = 401

    def __init__(self, message: str, error: str | None = "invalid_token") -> None:
        challenge = f'Bearer realm="{REALM}"'
        if error:
            challenge += f', error="{error}", error_description="{message}"'
        super().__init__(message, {"WWW-Authenticate": challenge})
        self.error = error


class Forbidden(AccessDenied):
    """403: a valid credential that lacks the scope, or a series outside its
    restrictions (RFC 6750 section 3.1, ``insufficient_scope``)."""

    status = 403

    def __init__(self, message: str, scope: str | None = None) -> None:
        challenge = f'Bearer realm="{REALM}", error="insufficient_scope"'
        if scope:
            challenge += f', scope="{scope}"'
        super().__init__(message, {"WWW-Authenticate": challenge})
        self.scope = scope


@dataclass(frozen=True)
class Principal:
    """Who a request acts as, and what it may do.

    Attributes:
        client_id: see the module docstring (safe to log).
        scopes: granted scopes.
        symbols: the only symbols it may read (None: any).
        exchanges: the only exchanges it may read (None: any).
    """

    client_id: str
    scopes: frozenset[str]
    symbols: frozenset[str] | None = None
    exchanges: frozenset[str] | None = None

    def may(self, scope: str) -> bool:
        """Whether ``scope`` was granted."""
        return scope in self.scopes

    def require(self, scope: str) -> None:
        """Raises:
            Forbidden: ``scope`` was not granted (the message names it)."""
        if scope not in self.scopes:
            raise Forbidden(f"this credential lacks the '{scope}' scope", scope)

    def allows(self, symbol: str, exchange: str | None) -> bool:
        """Whether :meth:`check_market` passes (for filtering listings)."""
        try:
            self.check_market(symbol, exchange)
        except Forbidden:
            return False
        return True

    def check_market(self, symbol: str | None, exchange: str | None) -> None:
        """Check a series read: ``symbol`` (None: no symbol named) on ``exchange`` (None:
        consolidated over every exchange).

        Raises:
            Forbidden: the symbol or exchange is outside the restrictions; a consolidated
                series when exchanges are restricted.
        """
        if self.symbols is not None and symbol is not None and symbol not in self.symbols:
            raise Forbidden(f"this credential may not read symbol {symbol!r}")
        if self.exchanges is not None:
            if exchange is None:
                raise Forbidden("this credential may read only exchanges "
                                f"{', '.join(sorted(self.exchanges))}: name one")
            if exchange not in self.exchanges:
                raise Forbidden(f"this credential may not read exchange {exchange!r}")


#: the principal of every request while auth is off: every scope, no restriction
OPEN = Principal("open", frozenset(ALL_SCOPES))


class RateLimited(AccessDenied):
    """429: the client's bucket is empty; retry after ``retry_after_s`` seconds."""

    status = 429

    def __init__(self, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(f"rate limit exceeded: retry in {seconds} s",
                         {"Retry-After": str(seconds)})
        self.retry_after_s = retry_after_s


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def _scopes(names: Iterable[Any]) -> frozenset[str]:
    return frozenset(n for n in names if n in ALL_SCOPES)


def _str_set(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Unauthorized("invalid token")
    return frozenset(value)


class TokenVerifier:
    """Checks bearer tokens against the configured keys (module docstring, "Rules").

    Args:
        settings: the auth settings. The public key and JWKS files are read here, once.

    Raises:
        ConfigError: a key file cannot be read or holds no usable RSA/P-256 key.
    """

    def __init__(self, settings: AuthSection) -> None:
        self.settings = settings
        #: (secret bytes, principal) of each API key
        self._keys: list[tuple[bytes, Principal]] = []
        for key in settings.api_keys:
            if isinstance(key, SecretStr):
                value = key.get_secret_value()
                self._keys.append((value.encode(), Principal(
                    "key:" + _fingerprint(value), frozenset(ALL_SCOPES))))
            else:
                self._keys.append((key.secret.encode(), self._key_principal(key)))
        #: algorithm -> verification key, for tokens without ``kid``
        self._jwt_keys: dict[str, Any] = {}
        if settings.jwt_hs256_secret is not None:
            self._jwt_keys["HS256"] = settings.jwt_hs256_secret.get_secret_value()
        if settings.jwt_public_key_file is not None:
            alg, key = _load_public_key(settings.jwt_public_key_file)
            self._jwt_keys[alg] = key
        #: kid -> (algorithm, key) of the JWKS file
        self._jwks: dict[str, tuple[str, Any]] = {}
        if settings.jwt_jwks_file is not None:
            self._jwks = _load_jwks(settings.jwt_jwks_file)

    @staticmethod
    def _key_principal(key: ApiKey) -> Principal:
        return Principal("key:" + (key.name or _fingerprint(key.secret)),
                         _scopes(key.scopes),
                         frozenset(key.symbols) if key.symbols is not None else None,
                         frozenset(key.exchanges) if key.exchanges is not None else None)

    @property
    def accepts_jwt(self) -> bool:
        """Whether any JWT key is configured."""
        return bool(self._jwt_keys or self._jwks)

    def verify(self, header_value: str | None) -> Principal:
        """Authenticate an ``Authorization`` header value.

        Args:
            header_value: the raw header (``Bearer <token>``), or None when absent.

        Returns:
            Principal: who the token acts as.

        Raises:
            Unauthorized: missing or non-bearer header, unknown key, invalid, expired or
                not yet valid JWT, wrong audience or issuer.
        """
        if not header_value or not header_value.strip():
            raise Unauthorized("missing bearer token", error=None)
        parts = header_value.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise Unauthorized("expected 'Authorization: Bearer <token>'", error=None)
        token = parts[1].strip()
        if not token or any(c.isspace() for c in token):
            raise Unauthorized("malformed bearer token", error="invalid_request")
        token_b = token.encode("utf-8", "surrogateescape")
        matched: Principal | None = None
        for value, principal in self._keys:  # compare with every key: no early exit
            if hmac.compare_digest(token_b, value):
                matched = principal
        if matched is not None:
            return matched
        if self.accepts_jwt and token.count(".") == 2:
            return self._verify_jwt(token)
        raise Unauthorized("invalid token")

    def _verify_jwt(self, token: str) -> Principal:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if isinstance(kid, str) and kid in self._jwks:
            jwk_alg, key = self._jwks[kid]
            if alg != jwk_alg:
                raise Unauthorized("invalid token")
        elif alg in self._jwt_keys:
            key = self._jwt_keys[alg]
        else:
            raise Unauthorized("invalid token")
        require = ["exp"] if s.jwt_require_exp else []
        if s.jwt_issuer is not None:
            require.append("iss")
        if s.jwt_audience is not None:
            require.append("aud")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=s.jwt_audience,
                                issuer=s.jwt_issuer, leeway=s.jwt_leeway_s,
                                options={"require": require})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the '{exc.claim}' claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            what = "audience" if isinstance(exc, jwt.InvalidAudienceError) else "issuer"
            raise Unauthorized(f"token has the wrong {what}") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        sub = claims.get("sub")
        client = "jwt:" + (sub[:64] if isinstance(sub, str) and sub else _fingerprint(token))
        if isinstance(claims.get("scope"), str):
            scopes = _scopes(claims["scope"].split())
        elif isinstance(claims.get("scp"), list):
            scopes = _scopes(claims["scp"])
        else:
            scopes = _scopes(s.jwt_default_scopes)
        return Principal(client, scopes, _str_set(claims.get("symbols")),
                         _str_set(claims.get("exchanges")))


def _load_public_key(path: Any) -> tuple[str, Any]:
    """(algorithm, key) of a PEM public key file: RS256 for RSA, ES256 for P-256."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"auth.jwt_public_key_file: cannot load {path}: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ConfigError(f"auth.jwt_public_key_file: {path} is neither an RSA nor a P-256 key")


def _load_jwks(path: Any) -> dict[str, tuple[str, Any]]:
    """kid -> (algorithm, key) of the RS256/ES256 signing keys of a JWKS file (RFC 7517
    section 5); keys without ``kid``, other algorithms and ``use`` other than ``sig`` are
    left out."""
    try:
        jwks = jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8"))
    except (OSError, jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError) as exc:
        raise ConfigError(f"auth.jwt_jwks_file: cannot load {path}: {exc}") from None
    out: dict[str, tuple[str, Any]] = {}
    for k in jwks.keys:
        alg = k.algorithm_name
        if k.key_id and alg in ("RS256", "ES256") and k.public_key_use in (None, "sig"):
            out[k.key_id] = (alg, k.key)
    if not out:
        raise ConfigError(f"auth.jwt_jwks_file: {path} has no RS256/ES256 key with a kid")
    return out


def check_token(header_value: str | None, settings: AuthSection) -> str:
    """Authenticate an ``Authorization`` header value (a :class:`TokenVerifier` built
    for the call; a worker keeps one in its :class:`AccessGuard`).

    Returns:
        str: the client id, ``key:<name or fingerprint>`` or ``jwt:<sub>`` (safe to log).

    Raises:
        Unauthorized: see :meth:`TokenVerifier.verify`.
    """
    return TokenVerifier(settings).verify(header_value).client_id


class RateLimiter:
    """Token buckets keyed by client id, with bounded memory.

    Each client may spend ``burst`` requests at once and then ``rate_per_s`` per second.
    A bucket idle long enough to be full again (``burst / rate_per_s`` seconds) is
    forgotten, which changes nothing; beyond ``max_clients`` the least recently seen
    client is forgotten too (it then starts with a full bucket again). Not thread-safe:
    meant for one event loop.
    """

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = MAX_CLIENTS) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError("rate_per_s must be a positive number")
        if burst < 1 or max_clients < 1:
            raise ValueError("burst and max_clients must be >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._full_after_s = burst / rate_per_s
        #: client id -> (tokens, last update), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, client_id: str, now_s: float) -> float | None:
        """Take one token for ``client_id`` at monotonic time ``now_s``.

        Returns:
            None when the request may proceed, else the seconds until a token is
            available (the request must be refused; nothing is taken).
        """
        self._evict_idle(now_s)
        entry = self._buckets.pop(client_id, None)
        if entry is None:
            tokens = float(self.burst)
        else:
            tokens, last = entry
            now_s = max(now_s, last)
            tokens = min(float(self.burst), tokens + (now_s - last) * self.rate_per_s)
        retry: float | None = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            retry = (1.0 - tokens) / self.rate_per_s
        self._buckets[client_id] = (tokens, now_s)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return retry

    def _evict_idle(self, now_s: float) -> None:
        while self._buckets:
            _, last = next(iter(self._buckets.values()))
            if now_s - last < self._full_after_s:
                return
            self._buckets.popitem(last=False)


class SharedLimiter(Protocol):
    """A cluster-wide rate limiter (:class:`stores.rate_limit.SharedRateLimiter`)."""

    async def acquire(self, client_id: str) -> float | None:
        """None: proceed; else the seconds to wait. Raises RedisError/OSError."""


class AccessGuard:
    """The access policy of one worker: authentication, the rate limit, then the scope.

    :meth:`acheck` is all an HTTP layer needs: it returns the :class:`Principal` or raises
    :class:`Unauthorized` / :class:`RateLimited` / :class:`Forbidden`. With ``shared``,
    the rate limit (per client and, with ``global_rate_limit_per_s``, for the whole
    cluster) is counted in Redis for every worker together; while Redis fails it falls back
    to this process's own buckets (the same rates). :meth:`check` is the per-process path
    alone (no I/O).

    Raises:
        ConfigError: (construction) a JWT key file cannot be loaded.
    """

    def __init__(self, settings: AuthSection, max_clients: int = MAX_CLIENTS,
                 shared: SharedLimiter | None = None) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings)
        self.limiter: RateLimiter | None = None
        if settings.rate_limit_per_s > 0:
            self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst,
                                       max_clients)
        self.global_limiter: RateLimiter | None = None
        if settings.global_rate_limit_per_s > 0:
            self.global_limiter = RateLimiter(settings.global_rate_limit_per_s,
                                              settings.global_rate_limit_burst, 1)
        limited = self.limiter is not None or self.global_limiter is not None
        self.shared = shared if limited else None
        #: the shared limiter failed last time (logged once per outage)
        self.shared_down = False

    @property
    def active(self) -> bool:
        """Whether any check applies (auth on or a rate limit set)."""
        return (self.settings.enabled or self.limiter is not None
                or self.global_limiter is not None)

    async def acheck(self, authorization: str | None, remote: str | None, now_s: float,
                     scope: str | None = "read") -> Principal:
        """:meth:`check`, with the shared rate limit when configured (class docstring)."""
        if self.shared is None:
            return self.check(authorization, remote, now_s, scope)
        address = "addr:" + (remote or "unknown")
        if not self.settings.enabled:
            await self._alimit(address, now_s)
            return Principal(address, OPEN.scopes)
        try:
            principal = self.verifier.verify(authorization)
        except Unauthorized:
            await self._alimit(address, now_s)
            raise
        await self._alimit(principal.client_id, now_s)
        if scope is not None:
            principal.require(scope)
        return principal

    async def _alimit(self, client: str, now_s: float) -> None:
        shared = cast(SharedLimiter, self.shared)
        try:
            retry = await shared.acquire(client)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self.shared_down:
                self.shared_down = True
                log.warning("rate limit: Redis unavailable (%s); per-process limits until it "
                            "returns", type(exc).__name__)
            self._limit(client, now_s)
            return
        if self.shared_down:
            self.shared_down = False
            log.info("rate limit: Redis back; limits shared by the cluster again")
        if retry is not None:
            raise RateLimited(retry)

    def check(self, authorization: str | None, remote: str | None, now_s: float,
              scope: str | None = "read") -> Principal:
        """Check one request.

        Args:
            authorization: the ``Authorization`` header, or None.
            remote: the peer address (for unauthenticated clients).
            now_s: monotonic time in seconds.
            scope: the scope the request needs (None: only authenticate).

        Returns:
            Principal: with auth off, the address with every scope.

        Raises:
            Unauthorized: auth is on and the token is missing or invalid (failed attempts
                also spend the address's rate-limit tokens).
            RateLimited: the client's bucket is empty.
            Forbidden: the credential lacks ``scope``.
        """
        address = "addr:" + (remote or "unknown")
        if not self.settings.enabled:
            self._limit(address, now_s)
            return Principal(address, OPEN.scopes)
        try:
            principal = self.verifier.verify(authorization)
        except Unauthorized:
            self._limit(address, now_s)
            raise
        self._limit(principal.client_id, now_s)
        if scope is not None:
            principal.require(scope)
        return principal

    def admit(self, authorization: str | None, remote: str | None, now_s: float) -> str:
        """:meth:`check` for the ``read`` scope, returning only the client id."""
        return self.check(authorization, remote, now_s).client_id

    def _limit(self, client: str, now_s: float) -> None:
        if self.limiter is not None:
            retry = self.limiter.acquire(client, now_s)
            if retry is not None:
                raise RateLimited(retry)
        if self.global_limiter is not None:
            retry = self.global_limiter.acquire(GLOBAL_CLIENT, now_s)
            if retry is not None:
                raise RateLimited(retry)
