"""API parameter parsing (HTTP 400 cases) and configuration validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from core.config import load_settings
from core.errors import ConfigError, QueryError
from core.models import iso_ms
from views.params import parse_name, parse_time_ms

REPO = Path(__file__).resolve().parents[2]


def test_time_forms() -> None:
    assert parse_time_ms("1723161300000", "start") == 1_723_161_300_000
    assert parse_time_ms("2024-08-08T23:55:00Z", "start") == 1_723_161_300_000
    assert parse_time_ms("2024-08-08T23:55:00", "start") == 1_723_161_300_000  # naive = UTC
    assert parse_time_ms("2024-08-09T01:55:00+02:00", "start") == 1_723_161_300_000
    assert iso_ms(1_723_161_300_000) == "2024-08-08T23:55:00.000Z"


@pytest.mark.parametrize("bad", ["yesterday", "-5", "2024-13-01", "99999999999999999"])
def test_bad_times(bad: str) -> None:
    with pytest.raises(QueryError):
        parse_time_ms(bad, "start")


def test_names() -> None:
    assert parse_name("BTC-USD", "symbol") == "BTC-USD"
    assert parse_name(None, "exchange", required=False) is None
    for bad in ["", "BTC USD", "<script>", "x" * 41]:
        with pytest.raises(QueryError):
            parse_name(bad, "symbol")


def test_ohlcv_query_rules() -> None:
    from query.series import MAX_BARS
    from views.ohlcv import parse_ohlcv_query

    now = 1_732_170_000_123
    assert parse_ohlcv_query({"symbol": "BTCUSDT"}, now) == (
        "BTCUSDT", None, (now - 100 * 60_000) // 60_000 * 60_000, now, "1m", "none")
    _s, e, start, _end, iv, fill = parse_ohlcv_query(
        {"symbol": "BTCUSDT", "exchange": "x", "interval": "4h", "fill": "previous",
         "start": "2024-08-08T05:30:00Z", "end": "2024-08-09T00:00:00Z"}, now)
    assert (e, iv, fill) == ("x", "4h", "previous")
    assert start == 1_723_089_600_000  # 2024-08-08T04:00Z: aligned down to the interval
    assert parse_ohlcv_query({"symbol": "B", "start": "0", "end": str(MAX_BARS * 60_000)},
                             now)[3] == MAX_BARS * 60_000
    for q in [{}, {"symbol": "BTCUSDT", "start": "60000", "end": "60000"},
              {"symbol": "BTCUSDT", "start": "0", "end": str(MAX_BARS * 60_000 + 1)},
              {"symbol": "BTCUSDT", "interval": "2m"}, {"symbol": "BTCUSDT", "fill": "zero"},
              {"symbol": "BTCUSDT", "foo": "1"}]:
        with pytest.raises(QueryError):
            parse_ohlcv_query(q, now)


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[web]\nport = 7000\n[window]\ngrace_ms = 1000\n')
    monkeypatch.setenv("MARKETFLOW_CONFIG", str(cfg))
    monkeypatch.setenv("MARKETFLOW_WINDOW__GRACE_MS", "2500")
    s = load_settings()
    assert s.web.port == 7000 and s.window.grace_ms == 2500
    assert s.broker.session_timeout_s is None  # production default: Faust's own


@pytest.mark.parametrize("toml", [
    "[web]\nport = 70000\n",
    "[window]\nsize_ms = 1000\n",
    "[broker]\nurl = 'http://x'\n",
    "[nosuchsection]\na = 1\n",
    "[topics]\nticks = 'a'\nbars = 'a'\n",
    "this is not toml",
])
def test_invalid_config_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   toml: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    monkeypatch.setenv("MARKETFLOW_CONFIG", str(cfg))
    with pytest.raises(ConfigError):
        load_settings()


def test_worker_exits_nonzero_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[web]\nport = 'eighty'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "faust", "-A", "app", "worker"], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MARKETFLOW_CONFIG": str(cfg)},
    )
    assert proc.returncode == 2
    assert "web.port" in proc.stderr


def test_faust_options_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.faust_app import faust_options

    monkeypatch.setenv("MARKETFLOW_CONFIG", str(REPO / "docker" / "marketflow.toml"))
    prod = faust_options(load_settings())
    assert prod["broker"].startswith("kafka://redpanda")
    assert prod["processing_guarantee"] == "at_least_once"
    for key in ("producer_max_batch_size", "broker_session_timeout",
                "broker_rebalance_timeout", "broker_heartbeat_interval"):
        assert key not in prod  # Faust's defaults
    monkeypatch.setenv("MARKETFLOW_CONFIG", str(REPO / "marketflow.toml"))
    monkeypatch.setenv("MARKETFLOW_APP__PROCESSING_GUARANTEE", "exactly_once")
    dev = faust_options(load_settings())
    assert "producer_max_batch_size" not in dev
    assert dev["broker_session_timeout"] == 10.0 and dev["broker_heartbeat_interval"] == 3.0
    assert dev["processing_guarantee"] == "exactly_once"


def test_worker_keeps_the_root_logger_at_the_chosen_level() -> None:
    """Faust's worker lowers the root logger to DEBUG at ``-l warn`` (for its spinner),
    so every debug call of aiokafka and Faust would build a record; ours keeps WARNING
    and still adds the spinner's handler."""
    import io
    import logging

    import faust
    from faust.utils import terminal

    from app.faust_app import _Worker, faust_options

    assert faust_options(load_settings())["Worker"] is _Worker
    for cls, want in ((faust.Worker, logging.DEBUG), (_Worker, logging.WARNING)):
        worker = object.__new__(cls)
        worker.spinner = terminal.Spinner(file=io.StringIO())
        root = logging.Logger("root-under-test")
        root.addHandler(logging.NullHandler())
        worker.on_setup_root_logger(root, logging.WARNING)
        assert root.level == want, cls
        assert len(root.handlers) == 2  # the spinner's handler was added


def test_heartbeat_must_fit_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETFLOW_BROKER__SESSION_TIMEOUT_S", "6")
    monkeypatch.setenv("MARKETFLOW_BROKER__HEARTBEAT_INTERVAL_S", "3")
    with pytest.raises(ConfigError, match="heartbeat_interval_s"):
        load_settings()


async def test_worker_consumer_gets_the_fetch_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust builds its Kafka consumer with fetch.max.wait.ms fixed at 1500; the worker's
    consumer gets ``broker.fetch_max_wait_ms`` instead (a fetch parked for a quiet
    partition delays the others by that long: docs/architecture.md)."""
    from app.factory import create_app

    monkeypatch.setenv("MARKETFLOW_BROKER__FETCH_MAX_WAIT_MS", "123")
    app = create_app(load_settings())
    consumer = cast(Any, app.consumer)._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == 123
    finally:
        await consumer.stop()
    assert load_settings().broker.fetch_max_wait_ms == 123
    monkeypatch.delenv("MARKETFLOW_BROKER__FETCH_MAX_WAIT_MS")
    assert load_settings().broker.fetch_max_wait_ms < 1500
