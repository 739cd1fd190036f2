"""Triton's system shared-memory extension on the agent, driven by tritonclient's own
utilities (`tritonclient.utils.shared_memory`, the C helper every Triton user has) and its
HTTP client: regions registered, inputs read from one and outputs written to another,
status and unregister; and a hostile client (paths out of /dev/shm, sizes past the object,
an object shrunk after registration) answered with 400 while the daemon keeps serving."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixture_agent import AgentProcess, digits_input, write_config
from fixture_mqtt import free_port

from agent.serving.runtime import open_model

PI4 = "raspberry-pi-4"
TOKEN = "s3cret-s3cret-s3cret"
IN, OUT_BYTES = "serving_default_args_0", 10 * 4


def _agent(tmp_path: Path, releases: dict[str, Path], **api: Any) -> AgentProcess:
    token = tmp_path / "api.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    a = AgentProcess(write_config(tmp_path, releases["keys"], profile=PI4, api={
        "tcp_port": port, "token_file": str(token), **api})).start()
    a.port = port  # type: ignore[attr-defined]
    assert a.install(releases["tflite1"])[0] == 200
    return a


@pytest.fixture
def agent(tmp_path: Path, releases: dict[str, Path]) -> Iterator[AgentProcess]:
    a = _agent(tmp_path, releases, shared_memory=True, shared_memory_max_regions=4)
    yield a
    assert a.stop() == 0, a.log


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[Any]:
    import tritonclient.http as triton

    c = triton.InferenceServerClient(url=f"127.0.0.1:{agent.port}")  # type: ignore[attr-defined]
    yield c
    c.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def regions() -> Iterator[dict[str, Any]]:
    """An input region holding one digits sample and an output region, made with
    tritonclient's helper (shm_open + mmap, as a camera process would)."""
    import tritonclient.utils.shared_memory as shm

    tag = f"edge{os.getpid()}"
    x = np.asarray(digits_input(1), dtype=np.float32).reshape(1, 1, 8, 8)
    made = {"in": shm.create_shared_memory_region(f"{tag}_in", f"/{tag}_in", x.nbytes),
            "out": shm.create_shared_memory_region(f"{tag}_out", f"/{tag}_out", 64)}
    shm.set_shared_memory_region(made["in"], [x])
    yield {"tag": tag, "x": x, **made}
    for handle in (made["in"], made["out"]):
        shm.destroy_shared_memory_region(handle)


def test_inputs_and_outputs_pass_through_registered_regions(
        agent: AgentProcess, client: Any, regions: dict[str, Any], releases: dict[str, Path]
) -> None:
    import tritonclient.http as triton
    import tritonclient.utils.shared_memory as shm

    tag, x = regions["tag"], regions["x"]
    assert "system_shared_memory" in client.get_server_metadata(headers=AUTH)["extensions"]
    client.register_system_shared_memory(f"{tag}_in", f"/{tag}_in", x.nbytes, headers=AUTH)
    client.register_system_shared_memory(f"{tag}_out", f"/{tag}_out", 64, headers=AUTH)
    status = client.get_system_shared_memory_status(headers=AUTH)
    assert {r["name"]: r["byte_size"] for r in status} == {f"{tag}_in": x.nbytes,
                                                           f"{tag}_out": 64}
    out_name = client.get_model_metadata("digits", headers=AUTH)["outputs"][0]["name"]
    inp = triton.InferInput(IN, list(x.shape), "FP32")
    inp.set_shared_memory(f"{tag}_in", x.nbytes)
    out = triton.InferRequestedOutput(out_name, binary_data=True)
    out.set_shared_memory(f"{tag}_out", 64)
    result = client.infer("digits", [inp], outputs=[out], headers=dict(AUTH))
    got = result.get_output(out_name)
    assert got["parameters"]["shared_memory_region"] == f"{tag}_out"
    assert got["parameters"]["shared_memory_byte_size"] == OUT_BYTES
    assert "data" not in got
    y = shm.get_contents_as_numpy(regions["out"], np.float32, [1, 10])
    bundle_model = open_model(_model_file(agent), "tflite")
    np.testing.assert_allclose(y, bundle_model.run(x), atol=1e-6)
    # The same frame again, changed in place by the "camera": a new answer, no new bytes
    # on the socket.
    shm.set_shared_memory_region(regions["in"], [np.zeros_like(x)])
    client.infer("digits", [inp], outputs=[out], headers=dict(AUTH))
    np.testing.assert_allclose(shm.get_contents_as_numpy(regions["out"], np.float32, [1, 10]),
                               bundle_model.run(np.zeros_like(x)), atol=1e-6)
    client.unregister_system_shared_memory(f"{tag}_out", headers=AUTH)
    assert [r["name"] for r in client.get_system_shared_memory_status(headers=AUTH)] == [
        f"{tag}_in"]
    with pytest.raises(Exception, match="not registered"):
        client.infer("digits", [inp], outputs=[out], headers=dict(AUTH))
    client.unregister_system_shared_memory(headers=AUTH)
    assert client.get_system_shared_memory_status(headers=AUTH) == []


def _model_file(agent: AgentProcess) -> Path:
    found = sorted(agent.dir.rglob("model.tflite"))
    assert found, "no installed model file"
    return found[0]


def _register(agent: AgentProcess, name: str, body: Any) -> tuple[int, Any]:
    return agent.call("POST", f"/v2/systemsharedmemory/region/{name}/register", body)


def test_hostile_registrations_are_refused_naming_the_problem(
        agent: AgentProcess, client: Any, regions: dict[str, Any]) -> None:
    tag, size = regions["tag"], regions["x"].nbytes
    for body, message in (
            ({"key": "/../../etc/passwd", "offset": 0, "byte_size": 4}, "key must name"),
            ({"key": "/etc/passwd", "offset": 0, "byte_size": 4}, "key must name"),
            ({"key": f"/{tag}_nothing", "offset": 0, "byte_size": 4}, "cannot be opened"),
            ({"key": f"/{tag}_in", "offset": 0, "byte_size": size + 1}, "fewer than"),
            ({"key": f"/{tag}_in", "offset": -1, "byte_size": 4}, "non-negative"),
            ({"key": f"/{tag}_in", "offset": 0, "byte_size": 10**12}, "byte_size must be"),
            ({"key": f"/{tag}_in", "byte_size": 4, "mode": "x"}, "register takes"),
            ("not an object", "JSON object")):
        status, reply = _register(agent, "r", body)
        assert status == 400 and message in reply["error"], (body, reply)
    assert _register(agent, "bad/name", {"key": f"/{tag}_in", "byte_size": 4})[0] == 404
    for i in range(4):
        assert _register(agent, f"r{i}", {"key": f"/{tag}_in", "byte_size": 4})[0] == 200
    status, reply = _register(agent, "r4", {"key": f"/{tag}_in", "byte_size": 4})
    assert status == 400 and "4 regions are registered by this client" in reply["error"]
    # the cap is per client: the TCP token's owner still has its own four
    for i in range(4):
        client.register_system_shared_memory(f"t{i}", f"/{tag}_in", 4, headers=AUTH)
    status, reply = _register(agent, "r0", {"key": f"/{tag}_in", "byte_size": 4})
    assert status == 400 and "already registered" in reply["error"]
    assert agent.call("POST", "/v2/systemsharedmemory/region/nope/unregister")[0] == 404


def test_an_object_shrunk_after_registration_is_a_400_not_a_crash(
        agent: AgentProcess, regions: dict[str, Any]) -> None:
    """Mapped, a shrunk object would kill the daemon with SIGBUS on the next read; read
    with pread after checking its size, it is one refused request."""
    tag, x = regions["tag"], regions["x"]
    assert _register(agent, "frame", {"key": f"/{tag}_in", "offset": 0,
                                      "byte_size": x.nbytes})[0] == 200
    body = {"inputs": [{"name": IN, "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "parameters": {"shared_memory_region": "frame",
                                       "shared_memory_byte_size": x.nbytes}}]}
    status, reply = agent.call("POST", "/v2/models/digits/infer", body)
    assert status == 200, reply
    os.truncate(f"/dev/shm/{tag}_in", 16)
    status, reply = agent.call("POST", "/v2/models/digits/infer", body)
    assert status == 400 and "was it shrunk" in reply["error"], reply
    for params, message in (
            ({"shared_memory_region": "frame"}, "go together"),
            ({"shared_memory_region": "frame", "shared_memory_byte_size": 12}, "must be 256"),
            ({"shared_memory_region": "other", "shared_memory_byte_size": 256},
             "not registered")):
        status, reply = agent.call("POST", "/v2/models/digits/infer", {"inputs": [{
            "name": IN, "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": params}]})
        assert status == 400 and message in reply["error"], (params, reply)
    assert agent.call("GET", "/v2/health/live")[0] == 200
    assert agent.proc is not None and agent.proc.poll() is None


def test_shared_memory_is_off_unless_configured(tmp_path: Path, releases: dict[str, Path],
                                                regions: dict[str, Any]) -> None:
    a = _agent(tmp_path, releases)
    try:
        status, reply = _register(a, "r", {"key": f"/{regions['tag']}_in", "byte_size": 4})
        assert status == 400 and "not enabled" in reply["error"]
        assert "system_shared_memory" not in a.call("GET", "/v2")[1]["extensions"]
    finally:
        assert a.stop() == 0


def _as_nobody(socket_path: Path, method: str, path: str) -> tuple[int, str]:
    """One request on the agent's Unix socket from another user (uid 65534): the child
    opens the socket's path as root (the test's directories are root's alone), becomes
    nobody, then connects through /proc/self/fd, so the kernel's peer credential is
    nobody's."""
    import subprocess
    import sys

    code = ("import os,socket,sys; fd=os.open(sys.argv[1], os.O_PATH); os.setgid(65534); "
            "os.setuid(65534); s=socket.socket(socket.AF_UNIX); "
            "s.connect(f'/proc/self/fd/{fd}'); "
            "s.sendall(f'{sys.argv[2]} {sys.argv[3]} HTTP/1.1\\r\\nHost: x\\r\\n"
            "Content-Length: 0\\r\\nConnection: close\\r\\n\\r\\n'.encode()); "
            "b=b''\nwhile (c := s.recv(65536)): b += c\nsys.stdout.buffer.write(b)")
    done = subprocess.run([sys.executable, "-c", code, str(socket_path), method, path],
                          capture_output=True, timeout=30, check=True)
    head, _, body = done.stdout.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.skipif(os.geteuid() != 0, reason="a second user needs root to become it")
def test_a_region_belongs_to_the_credential_that_registered_it(
        agent: AgentProcess, client: Any, regions: dict[str, Any],
        releases: dict[str, Path]) -> None:
    """Regions registered with the TCP token are not seen, used, nor freed by a client on
    the Unix socket (root) or by another user there (nobody): unregister-all frees only
    one's own, a name the owner uses names another object for another owner, and the
    owner's inference still reads its own object. Before, any client could unregister
    every region and register its own object under a freed name."""
    import tritonclient.http as triton

    tag, x = regions["tag"], regions["x"]
    client.register_system_shared_memory(f"{tag}_in", f"/{tag}_in", x.nbytes, headers=AUTH)
    agent.socket.chmod(0o666)  # let the second user reach the socket at all
    for method, path, status, text in (
            ("GET", "/v2/systemsharedmemory/status", 200, "[]"),
            ("POST", f"/v2/systemsharedmemory/region/{tag}_in/unregister", 404, "no region"),
            ("POST", "/v2/systemsharedmemory/unregister", 200, "{}")):
        got = _as_nobody(agent.socket, method, path)
        assert got[0] == status and text in got[1], (path, got)
    assert agent.call("GET", "/v2/systemsharedmemory/status") == (200, [])
    assert agent.call("POST", "/v2/systemsharedmemory/unregister")[0] == 200
    # root on the Unix socket takes the same name for another object (zeros)
    assert _register(agent, f"{tag}_in", {"key": f"/{tag}_out", "byte_size": 64})[0] \
        == 200
    assert [r["name"] for r in client.get_system_shared_memory_status(headers=AUTH)] == [
        f"{tag}_in"]
    out_name = client.get_model_metadata("digits", headers=AUTH)["outputs"][0]["name"]
    inp = triton.InferInput(IN, list(x.shape), "FP32")
    inp.set_shared_memory(f"{tag}_in", x.nbytes)
    got = client.infer("digits", [inp], headers=dict(AUTH)).as_numpy(out_name)
    bundle_model = open_model(_model_file(agent), "tflite")
    np.testing.assert_allclose(got, bundle_model.run(x), atol=1e-6)  # its own frame
