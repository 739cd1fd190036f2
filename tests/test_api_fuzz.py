"""Schemathesis against a live daemon, from the OpenAPI document it serves
(docs/openapi.json): every route, on the socket it belongs to (admin routes on the admin
socket), with generated bodies, headers and parameters. Every request gets an answer, no
answer is a 5xx, each status, content type and JSON body is one the document declares, and
the daemon is live and within its memory budget afterwards."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import schemathesis
from fixture_agent import AgentProcess, write_config
from hypothesis import HealthCheck, given, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from agent.config import load_config
from agent.unit import memory_max_bytes

BUDGET = 96 << 20
EXAMPLES = 60  # per operation; 24 operations


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__("localhost", **kw)
        self._path = path

    def _new_conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(self._path)
        return s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._path)


class UnixAdapter(HTTPAdapter):
    """requests over a Unix socket (the daemon's sockets are not TCP)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._pool = _UnixPool(str(path))

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        return self._pool

    def close(self) -> None:
        super().close()
        self._pool.close()


def _session(path: Path) -> requests.Session:
    s = requests.Session()
    s.mount("http://", UnixAdapter(path))
    return s


@pytest.fixture
def agent(tmp_path: Path, releases: dict[str, Path]) -> Iterator[AgentProcess]:
    a = AgentProcess(write_config(tmp_path, releases["keys"], profile="x86_64-generic",
                                  scheduler={"memory_budget_bytes": BUDGET},
                                  api={"shared_memory": True})).start()
    assert a.install(releases["onnx1"])[0] == 200
    yield a
    a.stop()


def _document(agent: AgentProcess) -> dict[str, Any]:
    """The served document, its path parameters pointed at the installed model (and one that
    is not) so generated requests reach it rather than 404 on random names."""
    status, doc = agent.call("GET", "/openapi.json")
    assert status == 200
    assert doc == json.loads((Path(__file__).parents[1] / "docs/openapi.json").read_text())
    doc["components"]["schemas"]["ModelName"] = {"type": "string",
                                                 "enum": ["digits", "no-such-model"]}
    for item in doc["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["name"] == "version":
                    p["schema"] = {"type": "string", "enum": ["1", "2", "x"]}
    return doc


def _fuzz(operation: Any, session: requests.Session, checks: list[Any]) -> int:
    """Run one operation's generated cases; how many requests were sent."""
    calls = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        nonlocal calls
        calls += 1  # a dropped connection raises requests.ConnectionError here
        case.call_and_validate(base_url="http://localhost", session=session, checks=checks)

    fuzz()
    return calls


def test_schemathesis_finds_no_5xx_no_dropped_connection_and_no_undocumented_answer(
        agent: AgentProcess) -> None:
    schema = schemathesis.openapi.from_dict(_document(agent))
    sessions = {False: _session(agent.socket), True: _session(agent.admin_socket)}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 24
    calls = sum(_fuzz(op, sessions[op.path.startswith("/v1/admin/")], checks)
                for op in operations)
    for session in sessions.values():
        session.close()  # no keep-alive connection left to hold the daemon's shutdown
    assert calls >= 19 * 10
    assert agent.call("GET", "/v2/health/live")[0] == 200
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    assert agent.proc is not None
    rss = psutil.Process(agent.proc.pid).memory_info().rss
    limit = memory_max_bytes(load_config(agent.config))  # the unit's MemoryMax
    assert rss < limit, f"{rss >> 20} MiB after the fuzzing, MemoryMax {limit >> 20} MiB"
