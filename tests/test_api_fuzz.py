"""Schemathesis against a live daemon, from the OpenAPI document it serves
(docs/openapi.json): every route, on the socket it belongs to (admin routes on the admin
socket), with generated bodies, headers and parameters, valid and invalid, then the
stateful phase (sequences along the links Schemathesis infers between operations). Every
check runs: every request gets an answer, no answer is a 5xx, each status, content type,
header and JSON body is one the document declares, invalid data is refused and valid data
accepted (except where acceptance depends on what no schema can say, written out in
`REFUSED_ALTHOUGH_VALID`), and the daemon is live and within its memory budget
afterwards."""

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
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from agent.config import load_config
from agent.unit import memory_max_bytes

BUDGET = 96 << 20
EXAMPLES = 40  # per operation and generation mode; 37 operations
STATEFUL_EXAMPLES = 30
#: Routes that refuse some requests the document allows, with the statuses and why: whether
#: a body fits the served model (its input names, datatypes, shapes), whether a key names a
#: shared-memory object that exists and is big enough, and whether an upload is a signed
#: bundle archive are facts of the device, not of the request's form.
REFUSED_ALTHOUGH_VALID = {
    "/v2/models/{name}/infer": ("400",),
    "/v2/models/{name}/versions/{version}/infer": ("400",),
    "/v1/models/{name}:predict": ("400",),
    "/v1/models/{name}/versions/{version}:predict": ("400",),
    # a classifier refuses :regress and a regressor :classify (400 naming :predict)
    "/v1/models/{name}:classify": ("400",),
    "/v1/models/{name}/versions/{version}:classify": ("400",),
    "/v1/models/{name}:regress": ("400",),
    "/v1/models/{name}/versions/{version}:regress": ("400",),
    "/v2/systemsharedmemory/region/{region}/register": ("400",),
    "/v1/admin/install": ("400", "415", "422"),
}
ACCEPTED = ("2xx", "3xx", "401", "403", "404", "409", "429", "5xx")  # Schemathesis' own


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


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({"operations": [
        {"include-path": path, "checks": {"positive_data_acceptance": {
            "expected-statuses": [*ACCEPTED, *statuses]}}}
        for path, statuses in REFUSED_ALTHOUGH_VALID.items()]})


def _has_inputs(operation: Any) -> bool:
    """Whether there is anything to make invalid (a route with no parameters and no body
    has no negative case)."""
    return any(len(getattr(operation, part)) for part in ("path_parameters", "query",
                                                          "headers", "body"))


def _fuzz(operation: Any, session: requests.Session, mode: GenerationMode) -> int:
    """Run one operation's generated cases under every check; how many requests were sent."""
    calls = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        nonlocal calls
        calls += 1  # a dropped connection raises requests.ConnectionError here
        case.call_and_validate(base_url="http://localhost", session=session)

    fuzz()
    return calls


def test_schemathesis_finds_no_5xx_no_dropped_connection_and_no_undocumented_answer(
        agent: AgentProcess) -> None:
    schema = schemathesis.openapi.from_dict(_document(agent), config=_config())
    sessions = {False: _session(agent.socket), True: _session(agent.admin_socket)}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 37
    assert {op.path for op in operations} >= set(REFUSED_ALTHOUGH_VALID)
    calls = sum(_fuzz(op, sessions[op.path.startswith("/v1/admin/")], mode)
                for op in operations for mode in GenerationMode
                if mode is GenerationMode.POSITIVE or _has_inputs(op))
    assert calls >= 2 * 19 * 10

    steps: list[str] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]  # Schemathesis' class
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": "http://localhost",
                    "session": sessions[case.path.startswith("/v1/admin/")]}

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            steps.append(case.path)

    Workflow.run(settings=settings(max_examples=STATEFUL_EXAMPLES, deadline=None,
                                   database=None, derandomize=True,
                                   suppress_health_check=list(HealthCheck)))
    assert len(steps) >= STATEFUL_EXAMPLES, steps  # sequences ran, each checked
    assert len(set(steps)) >= 2, steps  # along the links inferred (a model's infer routes)
    assert len(set(steps)) >= 2, set(steps)  # along links between operations
    for session in sessions.values():
        session.close()  # no keep-alive connection left to hold the daemon's shutdown
    assert agent.call("GET", "/v2/health/live")[0] == 200
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    assert agent.proc is not None
    rss = psutil.Process(agent.proc.pid).memory_info().rss
    limit = memory_max_bytes(load_config(agent.config))  # the unit's MemoryMax
    assert rss < limit, f"{rss >> 20} MiB after the fuzzing, MemoryMax {limit >> 20} MiB"
