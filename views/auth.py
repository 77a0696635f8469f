"""HTTP API access control: bearer tokens (static API keys, HS256 JWTs) and a per-client
token-bucket rate limit. Pure: no I/O, no Faust imports.

Configuration (the ``[auth]`` table of the TOML file, or environment overrides)::

    [auth]
    enabled = true                       # MARKETFLOW_AUTH__ENABLED=true
    api_keys = ["<16+ visible chars>"]   # MARKETFLOW_AUTH__API_KEYS='["...", "..."]'
    jwt_hs256_secret = "<32+ bytes>"     # MARKETFLOW_AUTH__JWT_HS256_SECRET=...
    rate_limit_per_s = 10                # MARKETFLOW_AUTH__RATE_LIMIT_PER_S (0 = off)
    rate_limit_burst = 20                # MARKETFLOW_AUTH__RATE_LIMIT_BURST

The settings are :class:`core.config.AuthSection` (``settings.auth``).

Rules:

* A request carries ``Authorization: Bearer <token>``. The token is accepted when it
  equals one of ``api_keys`` (constant-time comparison) or, when ``jwt_hs256_secret`` is
  set, is a JWT signed with it using HS256 (any other algorithm, ``none`` included, is
  refused; ``exp`` and ``nbf`` are checked when present; a token carrying ``aud`` is
  refused since no audience is configured).
* The client id (rate-limit key, safe to log) is ``key:<sha256(key)[:12]>`` for an API
  key, ``jwt:<sub>`` for a JWT (``jwt:<sha256(token)[:12]>`` without ``sub``), and
  ``addr:<remote address>`` for requests that are not authenticated (auth off, or a
  failed attempt: failed attempts are throttled per address).
* Rate limit: a token bucket per client, ``rate_limit_per_s`` tokens per second up to
  ``rate_limit_burst``; per worker process (N workers allow N times the rate).

Secrets are :class:`pydantic.SecretStr` (hidden in ``repr``); nothing here logs a token.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import OrderedDict

import jwt

from core.config import AuthSection
from core.errors import MarketflowError

__all__ = [
    "MAX_CLIENTS",
    "AccessDenied",
    "AccessGuard",
    "RateLimited",
    "RateLimiter",
    "Unauthorized",
    "check_token",
]

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


def check_token(header_value: str | None, settings: AuthSection) -> str:
    """Authenticate an ``Authorization`` header value.

    Args:
        header_value: the raw header (``Bearer <token>``), or None when absent.
        settings: the auth settings (keys, JWT secret).

    Returns:
        str: the client id, ``key:<fingerprint>`` or ``jwt:<sub>`` (safe to log).

    Raises:
        Unauthorized: missing or non-bearer header, unknown key, invalid/expired JWT.
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
    matched: str | None = None
    for key in settings.api_keys:  # compare with every key: no early exit
        value = key.get_secret_value()
        if hmac.compare_digest(token_b, value.encode()):
            matched = value
    if matched is not None:
        return "key:" + _fingerprint(matched)
    secret = settings.jwt_hs256_secret
    if secret is not None and token.count(".") == 2:
        try:
            claims = jwt.decode(token, secret.get_secret_value(), algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        sub = claims.get("sub")
        if isinstance(sub, str) and sub:
            return "jwt:" + sub[:64]
        return "jwt:" + _fingerprint(token)
    raise Unauthorized("invalid token")


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


class AccessGuard:
    """The access policy of one worker: authentication, then the rate limit.

    ``admit`` is all an HTTP layer needs: it returns the client id or raises
    :class:`Unauthorized` / :class:`RateLimited`.
    """

    def __init__(self, settings: AuthSection, max_clients: int = MAX_CLIENTS) -> None:
        self.settings = settings
        self.limiter: RateLimiter | None = None
        if settings.rate_limit_per_s > 0:
            self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst,
                                       max_clients)

    @property
    def active(self) -> bool:
        """Whether any check applies (auth on or a rate limit set)."""
        return self.settings.enabled or self.limiter is not None

    def admit(self, authorization: str | None, remote: str | None, now_s: float) -> str:
        """Check one request.

        Args:
            authorization: the ``Authorization`` header, or None.
            remote: the peer address (for unauthenticated clients).
            now_s: monotonic time in seconds.

        Returns:
            str: the client id.

        Raises:
            Unauthorized: auth is on and the token is missing or invalid (failed attempts
                also spend the address's rate-limit tokens).
            RateLimited: the client's bucket is empty.
        """
        address = "addr:" + (remote or "unknown")
        if not self.settings.enabled:
            self._limit(address, now_s)
            return address
        try:
            client = check_token(authorization, self.settings)
        except Unauthorized:
            self._limit(address, now_s)
            raise
        self._limit(client, now_s)
        return client

    def _limit(self, client: str, now_s: float) -> None:
        if self.limiter is not None:
            retry = self.limiter.acquire(client, now_s)
            if retry is not None:
                raise RateLimited(retry)
