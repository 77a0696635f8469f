"""Suite-wide rule: a skipped test is a failed run (a test that did not run proves nothing;
every service the tests need is started by ``scripts/services.sh``)."""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Turn a green run with skipped tests into exit status 1."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped: failing the run "
                            "(see tests/conftest.py)", red=True)
        session.exitstatus = 1
