"""Worker lifecycle: --help, startup errors exit non-zero with a clear message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import REPO, Stack

pytestmark = pytest.mark.integration


def _run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faust", "-A", "app", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands_and_options() -> None:
    out = _run({}, "--help")
    assert out.returncode == 0
    for word in ("worker", "replay", "migrate", "create-topics"):
        assert word in out.stdout
    out = _run({}, "replay", "--help")
    assert out.returncode == 0 and "--rebase-now" in out.stdout and "--repeat" in out.stdout


def test_unreachable_broker_exits_nonzero_after_retries(stack: Stack) -> None:
    t0 = time.monotonic()
    out = _run({**stack.env, "MARKETFLOW_BROKER__URL": "kafka://127.0.0.1:1",
                "MARKETFLOW_BROKER__CONNECT_TIMEOUT_S": "3"}, "worker", "-l", "info")
    took = time.monotonic() - t0
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "broker unreachable at kafka://127.0.0.1:1" in log
    assert log.count("broker not reachable yet") >= 2  # it retried
    assert 2.5 < took < 50


def test_web_port_in_use_exits_nonzero(stack: Stack) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stack.settings.web.port))
        busy.listen()
        out = _run(stack.env, "worker", "-l", "info")
    assert out.returncode != 0
    assert "address already in use" in out.stdout + out.stderr
