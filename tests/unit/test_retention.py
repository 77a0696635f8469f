"""Retention settings, cutoffs and scheduling (``agents/retention.py``); the cleanup itself
runs against TimescaleDB in ``tests/integration/test_retention.py``."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from agents.retention import (
    CHECK_MAX_S,
    DAY_MS,
    RetentionJob,
    check_interval_s,
    retention_cutoffs,
)
from core.config import RetentionSection, load_settings
from core.errors import ConfigError

NOW = 1_723_161_600_000  # 2024-08-09T00:00:00Z


def test_cutoffs_are_now_minus_the_days_of_each_horizon() -> None:
    c = retention_cutoffs(NOW + 12_345, RetentionSection(bars_1m_days=30, gaps_days=7))
    assert c.bars_1m_ms == NOW + 12_345 - 30 * 86_400_000
    assert c.gaps_ms == NOW + 12_345 - 7 * 86_400_000
    assert c.backfill_jobs_ms is None
    assert DAY_MS == 86_400_000


def test_everything_is_off_by_default() -> None:
    r = RetentionSection()
    assert (r.bars_1m_days, r.gaps_days, r.backfill_jobs_days) == (None, None, None)
    assert not r.enabled
    c = retention_cutoffs(NOW, r)
    assert (c.bars_1m_ms, c.gaps_ms, c.backfill_jobs_ms) == (None, None, None)
    assert RetentionSection(backfill_jobs_days=1).enabled


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETFLOW_RETENTION__BARS_1M_DAYS", "90")
    monkeypatch.setenv("MARKETFLOW_RETENTION__GAPS_DAYS", "14")
    monkeypatch.setenv("MARKETFLOW_RETENTION__INTERVAL_S", "600")
    r = load_settings().retention
    assert (r.bars_1m_days, r.gaps_days, r.backfill_jobs_days, r.interval_s) == (
        90, 14, None, 600.0)


@pytest.mark.parametrize("env", [("BARS_1M_DAYS", "0"), ("GAPS_DAYS", "-1"),
                                 ("BACKFILL_JOBS_DAYS", "1.5"), ("INTERVAL_S", "0.5"),
                                 ("TYPO_DAYS", "3")])
def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch,
                                      env: tuple[str, str]) -> None:
    monkeypatch.setenv(f"MARKETFLOW_RETENTION__{env[0]}", env[1])
    with pytest.raises(ConfigError, match="retention"):
        load_settings()


def test_the_timer_checks_at_least_once_a_minute() -> None:
    assert check_interval_s(RetentionSection(interval_s=3_600)) == CHECK_MAX_S == 60.0
    assert check_interval_s(RetentionSection(interval_s=5)) == 5.0


class _DownDatabase:
    """A database service whose pool cannot be created (what ``Database.pool`` raises
    when TimescaleDB is unreachable)."""

    def __init__(self) -> None:
        self.calls = 0

    async def pool(self) -> None:
        self.calls += 1
        raise OSError("connection refused")


async def _no_invalidate(symbols: object) -> None:
    raise AssertionError(f"nothing was dropped, nothing to invalidate: {symbols}")


def _runs(result: str) -> float:
    return REGISTRY.get_sample_value("marketflow_retention_runs_total",
                                     {"result": result}) or 0.0


async def test_a_failed_run_is_reported_counted_and_retried_after_one_check() -> None:
    clock = [1000.0]
    db = _DownDatabase()
    job = RetentionJob(RetentionSection(bars_1m_days=1, interval_s=3_600), db,
                       _no_invalidate, clock=lambda: clock[0])
    errors = _runs("error")
    report = await job.tick()  # due at the first tick
    assert report is not None and not report.ok
    assert report.errors["database"] == "OSError: connection refused"
    assert "database unavailable" in report.summary()
    assert _runs("error") == errors + 1 and db.calls == 1
    clock[0] += CHECK_MAX_S - 1
    assert await job.tick() is None and db.calls == 1  # not due yet
    clock[0] += 1
    assert await job.tick() is not None and db.calls == 2  # retried one check later
    assert job.last_report is not None and job.last_report.cutoffs.bars_1m_ms is not None
