"""Schema-driven fuzzing of the HTTP API (schemathesis 4.x) against a real worker.

The OpenAPI document is loaded from the worker's own ``/openapi.json``; every documented
operation gets generated requests (a bounded number each). For every response: no 5xx,
the status code, content type and body are the documented ones, and no stack trace leaks.
``POST /mode/{mode}`` is fuzzed too: the stack is isolated per test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import SAMPLE, Stack

pytestmark = pytest.mark.integration

KEY = "fuzz-key-0123456789abcdef"
TRADES = SAMPLE / "trades" / "binance_spot_btcusdt_2020-09-27_trades.csv"
MAX_EXAMPLES = 30
#: a third, positive pass per operation with these parameters fixed to the replayed data
#: (the others generated), so that generated requests also reach the data-bearing paths
ANCHORS: dict[str, dict[str, dict[str, Any]]] = {
    "GET /prices/latest/{symbol}": {"path_parameters": {"symbol": "BTCUSDT"}},
    "GET /prices/latest/{exchange}/{symbol}": {
        "path_parameters": {"exchange": "binance", "symbol": "BTCUSDT"}},
    "GET /prices/{stat}/{symbol}": {"path_parameters": {"symbol": "BTCUSDT"}},
    "GET /prices/{stat}/{exchange}/{symbol}": {
        "path_parameters": {"exchange": "binance", "symbol": "BTCUSDT"}},
    "GET /ohlcv": {"query": {"symbol": "BTCUSDT", "start": "2020-09-27T14:00:00Z",
                             "end": "2020-09-27T15:00:00Z"}},
    "GET /udf/symbols": {"query": {"symbol": "BTCUSDT"}},
    "GET /udf/search": {"query": {"query": "btc"}},
    "GET /udf/history": {"query": {"symbol": "BTCUSDT", "from": 1601215200,
                                   "to": 1601218800}},
    "GET /static/{name}": {"path_parameters": {"name": "chart.js"}},
    "GET /static/vendor/{name}": {"path_parameters": {"name": "lightweight-charts.LICENSE"}},
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _fuzz_operation(operation: Any, mode: GenerationMode, fixed: dict[str, Any],
                    base_url: str, session: requests.Session,
                    calls: list[tuple[str, int]]) -> None:
    """Generated requests for one operation; raises on the first (shrunk) failure."""
    strategy = operation.as_strategy(generation_mode=mode, **fixed)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=15)
        calls.append((case.operation.label, response.status_code))
        case.validate_response(response, checks=CHECKS)
        assert "Traceback" not in response.text, (case.as_curl_command(), response.text)

    run()


def _fuzz_all(schema: Any, base_url: str, token: str | None = None
              ) -> tuple[list[tuple[str, int]], list[str]]:
    """((operation label, status) of every request sent, failure reports); with
    ``token``, every request carries it as a bearer token."""
    calls: list[tuple[str, int]] = []
    failures: list[str] = []
    with requests.Session() as session:
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        for result in schema.get_all_operations():
            operation = result.ok()
            passes: list[tuple[GenerationMode, dict[str, Any]]] = [
                (GenerationMode.POSITIVE, {})]
            if _has_parameters(operation):  # else nothing to make invalid
                passes.append((GenerationMode.NEGATIVE, {}))
            if operation.label in ANCHORS:
                passes.append((GenerationMode.POSITIVE, ANCHORS[operation.label]))
            for mode, fixed in passes:
                # collect (schemathesis' FailureGroup is a BaseExceptionGroup): every
                # operation gets fuzzed, all failures are reported together
                try:
                    _fuzz_operation(operation, mode, fixed, base_url, session, calls)
                except (AssertionError, BaseExceptionGroup,
                        requests.RequestException) as exc:
                    failures.append(f"{operation.label} ({mode.value}"
                                    f"{', anchored' if fixed else ''}): "
                                    f"{type(exc).__name__}: {exc}")
    return calls, failures


def _has_parameters(operation: Any) -> bool:
    return bool(operation.definition.raw.get("parameters"))


async def _wait_for_data(stack: Stack, token: str | None, timeout: float = 60) -> None:
    """Until the replayed trades show as a latest price and as stored 1-minute bars."""
    paths = ["/prices/latest/binance/BTCUSDT",
             "/ohlcv?symbol=BTCUSDT&start=2020-09-27T14:00:00Z&end=2020-09-27T15:00:00Z"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (s1, _), (s2, bars) = [await stack.http(p, token=token) for p in paths]
        if s1 == 200 and s2 == 200 and any(b["closed"] for b in bars["bars"]):
            return
        await asyncio.sleep(0.5)
    raise AssertionError("the replayed trades never showed up as a price and bars")


@pytest.mark.parametrize("auth", [False, True], ids=["auth_off", "auth_on"])
async def test_every_operation_conforms_to_the_openapi_document(stack: Stack,
                                                                auth: bool) -> None:
    """Generated requests for every documented operation conform to the document; with
    auth on (a key with every scope, docs/security.md) too, and then the same operations
    without a token answer the documented 401."""
    token = KEY if auth else None
    env = ({"MARKETFLOW_AUTH__ENABLED": "true",
            "MARKETFLOW_AUTH__API_KEYS": orjson.dumps([KEY]).decode()} if auth else {})
    w = stack.worker(**env).start()
    await w.wait_ready()
    await stack.replay_cli("--namespace", "", str(TRADES))
    await _wait_for_data(stack, token)
    # from_dict, not from_url: from_url leaves out the document's own operation
    status, document = await stack.http("/openapi.json", token=token)
    assert status == 200, document
    schema = schemathesis.openapi.from_dict(document)
    if auth:  # no token: every protected operation is a 401, public ones answer
        for path, ops in document["paths"].items():
            for method, op in ops.items():
                if method != "get" or "{" in path:
                    continue
                got, _ = await stack.http(path)
                # /stream takes its token in the first frame: a plain GET is a 426
                want = 200 if op.get("security") == [] else 426 if path == "/stream" else 401
                assert got == want, (path, got)
    t = time.monotonic()
    calls, failures = await asyncio.to_thread(_fuzz_all, schema, stack.base_url, token)
    took = time.monotonic() - t
    print(f"fuzzing: {len(calls)} requests in {took:.1f}s")
    assert not failures, "\n\n".join(failures)
    documented = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items()
                  for m in ops}
    assert {label for label, _ in calls} == documented
    # the generated requests reached the working paths too, not only the error answers;
    # the replay views answer 200 only while (or up to 10 s after) a replay runs; a plain
    # GET /stream is answered 426 (the WebSocket tests are in test_stream.py)
    needs_replay = {"GET /replay/status", "POST /replay/{command}"}
    ok = {label for label, status in calls if status == 200}
    assert ok - needs_replay == documented - needs_replay - {"GET /stream"}
    assert {status for label, status in calls if label == "GET /stream"} == {426}
    # (with auth on, negative cases may replace the bearer token: 401)
    assert {status for label, status in calls if label in needs_replay} <= {
        200, 400, 404, 409} | ({401} if auth else set())
    w.assert_alive()
