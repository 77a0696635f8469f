"""The access guard with a shared (cluster) rate limiter (:meth:`views.auth.AccessGuard.
acheck`): the shared verdict wins while it answers; when it fails, the per-process buckets
take over (logged once) and the shared one is used again when it answers."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.config import AuthSection
from views.auth import AccessGuard, RateLimited, Unauthorized

KEY = "k-0123456789abcdef"


class FakeShared:
    """Answers from a script: a retry value, None, or an exception to raise."""

    def __init__(self) -> None:
        self.answer: float | BaseException | None = None
        self.asked: list[str] = []

    async def acquire(self, client_id: str) -> float | None:
        self.asked.append(client_id)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _guard(shared: FakeShared, **kw: object) -> AccessGuard:
    s = AuthSection(enabled=True, api_keys=[KEY], rate_limit_per_s=1, rate_limit_burst=2,
                    **kw)  # type: ignore[arg-type]
    return AccessGuard(s, shared=shared)


async def test_shared_verdict_is_used_and_keyed_by_client() -> None:
    shared = FakeShared()
    guard = _guard(shared)
    for _ in range(5):  # more than the local burst: only the shared bucket counts
        assert (await guard.acheck(f"Bearer {KEY}", "10.0.0.1", 0.0)).client_id.startswith(
            "key:")
    shared.answer = 2.5
    with pytest.raises(RateLimited) as info:
        await guard.acheck(f"Bearer {KEY}", "10.0.0.1", 0.0)
    assert info.value.headers["Retry-After"] == "3"
    shared.answer = None
    with pytest.raises(Unauthorized):  # a failed attempt spends the address's tokens
        await guard.acheck("Bearer nope-nope-nope-nope", "10.0.0.9", 0.0)
    assert shared.asked[-1] == "addr:10.0.0.9"
    assert len(set(shared.asked)) == 2


async def test_falls_back_to_process_buckets_while_redis_fails(
        caplog: pytest.LogCaptureFixture) -> None:
    shared = FakeShared()
    guard = _guard(shared)
    shared.answer = RedisConnectionError("refused")
    with caplog.at_level(logging.WARNING, logger="views.auth"):
        assert await guard.acheck(f"Bearer {KEY}", None, 0.0)
        assert await guard.acheck(f"Bearer {KEY}", None, 0.0)
        with pytest.raises(RateLimited):  # the local burst of 2 is spent
            await guard.acheck(f"Bearer {KEY}", None, 0.0)
    assert sum("per-process limits" in r.getMessage() for r in caplog.records) == 1
    assert guard.shared_down
    shared.answer = None  # Redis back: the shared verdict again
    assert await guard.acheck(f"Bearer {KEY}", None, 0.0)
    assert not guard.shared_down


async def test_global_bucket_applies_in_the_fallback() -> None:
    shared = FakeShared()
    shared.answer = OSError("down")
    guard = _guard(shared, global_rate_limit_per_s=1, global_rate_limit_burst=1,
                   rate_limit_shared=True)
    assert await guard.acheck(f"Bearer {KEY}", None, 0.0)
    with pytest.raises(RateLimited):  # one request per second for everyone together
        await guard.acheck(f"Bearer {KEY}", None, 0.0)
    # auth off: per address, no token needed
    off = AccessGuard(AuthSection(rate_limit_per_s=1, rate_limit_burst=1), shared=shared)
    assert (await off.acheck(None, "10.0.0.2", 0.0)).client_id == "addr:10.0.0.2"
    with pytest.raises(RateLimited):
        await off.acheck(None, "10.0.0.2", 0.0)
