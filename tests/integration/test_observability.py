"""Observability (issue 13, item 5): the HTTP request metrics of a live worker, ``promtool
check metrics`` on its scrape, the alert rules' unit tests (``promtool test rules``), and
every metric the rules and the Grafana dashboard use existing in a live scrape.

promtool comes from Debian's ``prometheus`` package (``scripts/promtool.sh``, run by
``scripts/test.sh``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack, until
from tests.support.harness import REPO

pytestmark = pytest.mark.integration

PROMTOOL = "/usr/bin/promtool"
PROM_DIR = REPO / "docker" / "prometheus"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "marketflow.json"
COMPOSE = REPO / "docker" / "compose.yaml"

#: referenced metrics a healthy worker does not export a sample of (the family is declared,
#: so its HELP/TYPE lines are in the scrape): name -> when its series appear
ONLY_IN_STATES = {
    "marketflow_sink_errors_total": "labelled by sink: a series appears at the sink's "
                                    "first failed write",
}
#: promtool lint problems left as they are (docs/observability.md): metric -> promtool's line.
#: marketflow_watermark_ms is event time as epoch ms; the Prometheus name would be
#: marketflow_watermark_timestamp_seconds, but renaming it breaks existing users (bench/api.py).
LINT_EXCEPTIONS = {
    "marketflow_watermark_ms": "marketflow_watermark_ms metric names should not contain "
                               "abbreviated units",
}
#: promtool's exit code for lint problems (1: a parse or usage error)
LINT_FAILED = 3
#: series Prometheus itself adds to every scrape (not in /metrics)
SYNTHETIC = {"up"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def promtool(*args: str, stdin: bytes | None = None, cwd: Path = REPO
             ) -> subprocess.CompletedProcess[str]:
    """Run promtool (fails the test when it is not installed)."""
    if not Path(PROMTOOL).exists():
        pytest.fail(f"{PROMTOOL} missing: run scripts/promtool.sh")
    return subprocess.run([PROMTOOL, *args], input=stdin, cwd=cwd, capture_output=True,
                          timeout=60, check=False, text=stdin is None)


def parse(text: str) -> tuple[Samples, set[str]]:
    """The samples ``(name, labels) -> value`` and the declared family names of a scrape."""
    samples: Samples = {}
    families = set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when the series is absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


async def scrape(stack: Stack) -> str:
    status, text = await stack.http("/metrics")
    assert status == 200 and isinstance(text, str), (status, text)
    return text


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names the alert rules and the dashboard query: name -> where."""
    out: dict[str, set[str]] = {}
    exprs = [("alerts.yml", (PROM_DIR / "alerts.yml").read_text())]
    exprs += [(f"dashboard: {title}", expr) for title, expr in dashboard_exprs()]
    for where, text in exprs:
        for name in re.findall(r"\b(marketflow_[a-z0-9_]+|up(?=\{))", text):
            out.setdefault(name, set()).add(where)
    return out


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield p["title"], t["expr"]
            yield from walk(p.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


# ------------------------------------------------------------------ without a worker


def test_alert_rules_pass_their_unit_tests() -> None:
    check = promtool("check", "rules", "docker/prometheus/alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
    unit = promtool("test", "rules", "docker/prometheus/alerts_test.yml")
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # every rule has a unit test
    rules = set(re.findall(r"- alert: (\w+)", (PROM_DIR / "alerts.yml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert len(rules) == 9 and rules == tested


def test_prometheus_config_loads_the_rules() -> None:
    check = promtool("check", "config", "docker/prometheus/prometheus.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 rule files found" in check.stdout and "9 rules found" in check.stdout


def test_dashboard_and_compose_wiring() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert dash["uid"] == "marketflow" and len(panels) >= 10
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    # every panel queries the provisioned datasource
    ds = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s+uid: (\S+)$", ds, re.M)
    assert uid is not None
    assert {p["datasource"]["uid"] for p in panels} == {uid.group(1)}
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    # what compose mounts exists, and the provisioned dashboard path is the mount point
    compose = COMPOSE.read_text()
    mounts = dict(re.findall(r"^\s+- \./(\S+?):(\S+?)(?::ro)?$", compose, re.M))
    assert {"prometheus", "grafana/provisioning", "grafana/dashboards"} <= set(mounts)
    assert all((REPO / "docker" / src).is_dir() for src in mounts)
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "marketflow.yml").read_text()
    assert f"path: {mounts['grafana/dashboards']}" in provider
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose
    assert mounts["prometheus"] == "/etc/prometheus"


# ------------------------------------------------------------------ a live worker


async def test_http_metrics_on_a_live_worker(stack: Stack) -> None:
    w = stack.worker().start()
    await w.wait_ready()
    base = stack.base_url
    s0, _ = parse(await scrape(stack))

    async with aiohttp.ClientSession() as http:
        async def call(method: str, path: str) -> int:
            async with http.request(method, base + path) as r:
                await r.read()
                return r.status

        assert [await call("GET", "/health") for _ in range(2)] == [200, 200]
        assert await call("GET", "/openapi.json") == 200
        for name in ("chart.js", "chart.css", "stream.js"):
            assert await call("GET", f"/static/{name}") == 200
        assert await call("GET", "/static/nosuch.js") == 404
        assert await call("GET", "/ohlcv") == 400  # no symbol
        assert await call("GET", "/prices/latest/NOSUCH") == 404
        assert await call("DELETE", "/health") == 405
        assert await call("GET", "/no/such/path") == 404  # aiohttp's own (an HTTPException)
        assert await call("GET", "/also/missing?x=1") == 404
        assert await call("GET", "/stream") == 426  # no upgrade: an ordinary request
        assert await call("POST", "/mode/test") == 200
        s1, _ = parse(await scrape(stack))

        want = {("/health", "200"): 2, ("/openapi.json", "200"): 1,
                ("/static/{name}", "200"): 3, ("/static/{name}", "404"): 1,
                ("/ohlcv", "400"): 1, ("/prices/latest/{symbol}", "404"): 1,
                ("/health", "405"): 1, ("unmatched", "404"): 2, ("/stream", "426"): 1,
                ("/mode/{mode}", "200"): 1, ("/metrics", "200"): 1}  # /metrics: scrape s0
        got = {}
        for labels in series(s1, "marketflow_http_requests_total"):
            key = (labels["route"], labels["status"])
            delta = (value(s1, "marketflow_http_requests_total", **labels)
                     - value(s0, "marketflow_http_requests_total", **labels))
            if delta:
                got[key] = delta
        assert got == want
        for (route, status), n in want.items():
            lab = {"route": route, "status": status}
            hist = "marketflow_http_request_duration_seconds"
            assert (value(s1, f"{hist}_count", **lab) - value(s0, f"{hist}_count", **lab)
                    == n), (route, status)
            assert value(s1, f"{hist}_bucket", **lab, le="+Inf") == value(
                s1, f"{hist}_count", **lab)
            assert value(s1, f"{hist}_sum", **lab) > 0
        routes = {lab["route"] for lab in series(s1, "marketflow_http_requests_total")}
        assert not {r for r in routes if "chart" in r or "such" in r or "missing" in r}

        # a WebSocket session: counted (101) when it ends, never in the latency histogram
        async with http.ws_connect(base.replace("http", "ws", 1) + "/stream") as ws:
            welcome = await ws.receive_json(timeout=10)
            assert welcome["type"] == "welcome"

        async def session_counted() -> tuple[Samples, set[str]] | None:
            got = parse(await scrape(stack))
            labels = {"route": "/stream", "status": "101"}
            return got if value(got[0], "marketflow_http_requests_total", **labels) == 1 \
                else None

        s2, _ = await until(session_counted, 15, "the /stream session in the counter")
        assert not [lab for lab in series(s2, "marketflow_http_request_duration_seconds_count")
                    if lab["status"] == "101"]

    # states that make the referenced series appear: a connected feed (test mode, switched
    # above), a dead letter, a closed and written bar (an old tick of an exchange of its own:
    # its window closes once the key is idle), the consumer lag of assigned partitions
    old_ms = int(time.time() * 1000) // 60_000 * 60_000 - 600_000
    await stack.produce_raw([
        (b"obs:BTCUSDT", b"{not json"),
        (b"obs:BTCUSDT", orjson.dumps({"exchange": "obs", "symbol": "BTCUSDT", "price": 100.0,
                                       "qty": 1.0, "ts_ms": old_ms + 1_000}))])

    async def all_states() -> str | None:
        text = await scrape(stack)
        s, _ = parse(text)
        ready = (value(s, "marketflow_feed_connected", feed="generator", kind="generator") == 1
                 and value(s, "marketflow_dead_lettered_ticks_total", reason="invalid_json") == 1
                 and value(s, "marketflow_bars_written_total") >= 1
                 and value(s, "marketflow_ticks_in_total") > 0
                 and series(s, "marketflow_bars_closed_total")
                 and series(s, "marketflow_consumer_lag"))
        return text if ready else None

    text = await until(all_states, 60, "a connected feed, a dead letter, a written bar, lag")
    samples, families = parse(text)
    assert value(samples, "marketflow_timescaledb_writer_up") == 1
    assert value(samples, "marketflow_redis_writer_up") == 1

    # promtool's lint of the live scrape (counters end in _total, units, names): clean but
    # for the documented exception, whose lines alone it reports
    lint = promtool("check", "metrics", stdin=text.encode())
    problems = {line.strip() for line in lint.stderr.decode().splitlines() if line.strip()}
    assert problems == set(LINT_EXCEPTIONS.values()), lint.stderr.decode()
    assert lint.returncode == LINT_FAILED
    kept = "\n".join(line for line in text.splitlines()
                     if not any(name in line for name in LINT_EXCEPTIONS)) + "\n"
    lint = promtool("check", "metrics", stdin=kept.encode())
    assert lint.returncode == 0, lint.stderr.decode()

    # every metric the rules and the dashboard use is in the scrape (or documented above)
    refs = referenced_metrics()
    assert {"marketflow_http_request_duration_seconds_bucket", "marketflow_feed_connected",
            "marketflow_timescaledb_writer_up", "marketflow_sink_retries_total",
            "marketflow_consumer_lag", "up"} <= set(refs)
    names = {n for n, _ in samples}
    missing = {n: sorted(where) for n, where in refs.items()
               if n not in names and n not in SYNTHETIC and n not in ONLY_IN_STATES}
    assert missing == {}
    for name in ONLY_IN_STATES:
        assert name in refs and name not in SYNTHETIC
        assert re.sub(r"_total$", "", name) in families, f"{name} not declared"
    assert "job_name: marketflow" in (PROM_DIR / "prometheus.yml").read_text()
