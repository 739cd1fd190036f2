"""The agent as a real subprocess serving converter-built, signed bundles over its Unix
socket and TCP, with a real HTTP client: installs, hot swap under load, refusals, thermal
shedding, crashes (kill -9) during install, systemd notifications, bad input."""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import needs_onnxruntime
from fixture_agent import AgentProcess, call, digits_input, infer_body, write_config
from polling import wait_until

from agent.profiles import load_profile
from agent.serving.runtime import open_model
from agent.trust.bundle import read_manifest

X86, PI4 = "x86_64-generic", "raspberry-pi-4"
IN_ONNX, IN_TFLITE = "input", "serving_default_args_0"


@pytest.fixture
def agent_factory(tmp_path: Path, releases: dict[str, Path]) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def make(profile: str = X86, env: dict[str, str] | None = None, start: bool = True,
             **sections: dict[str, Any]) -> AgentProcess:
        where = tmp_path / f"agent{len(started)}"
        where.mkdir()
        cfg = write_config(where, releases["keys"], profile=profile, **sections)
        a = AgentProcess(cfg, env)
        started.append(a)
        return a.start() if start else a

    yield make
    for a in started:
        if a.proc is not None:
            a.stop()


def installed(agent: AgentProcess, archive: Path) -> dict[str, Any]:
    status, body = agent.install(archive)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def test_tflite_bundle_served_over_kserve_v2_and_tf_serving(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(PI4)
    assert agent.call("GET", "/v2/health/ready")[0] == 503  # nothing installed yet
    body = installed(agent, releases["tflite1"])
    assert (body["model"], body["version"]) == ("digits", 1)
    assert agent.call("GET", "/v2/health/ready") == (200, {"ready": True})
    meta = agent.call("GET", "/v2/models/digits")[1]
    assert meta["platform"] == "tensorflow_lite" and meta["versions"] == ["1"]

    status, out = agent.call("POST", "/v2/models/digits/infer", infer_body(IN_TFLITE, 3))
    assert status == 200, out
    y = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
    # The installed bundle run here with the bare runtime gives the same numbers.
    state = agent.dir / "state/store/bundles/digits"
    d = next(state.iterdir())
    m = read_manifest(d)
    x = np.asarray(digits_input(3), dtype=np.float32).reshape(3, 1, 8, 8)
    np.testing.assert_allclose(y, open_model(d / m.model_file, "tflite").run(x), atol=1e-6)

    status, pred = agent.call("POST", "/v1/models/digits:predict",
                              {"instances": x.tolist()})
    assert status == 200 and np.asarray(pred["predictions"]).shape == (3, 10)
    # TF Serving's versioned predict and model status; the v2 repository index that /v2
    # advertises (it was 404).
    status, pred = agent.call("POST", "/v1/models/digits/versions/1:predict",
                              {"instances": x.tolist()})
    assert status == 200 and np.asarray(pred["predictions"]).shape == (3, 10)
    assert agent.call("POST", "/v1/models/digits/versions/7:predict",
                      {"instances": x.tolist()})[0] == 404
    assert agent.call("GET", "/v1/models/digits") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]})
    assert agent.call("GET", "/v1/models/digits/versions/1")[0] == 200
    assert agent.call("GET", "/v1/models/digits/versions/2")[0] == 404
    assert agent.call("GET", "/v1/models/nope")[0] == 404
    assert "model_repository" in agent.call("GET", "/v2")[1]["extensions"]
    index = [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]
    assert agent.call("POST", "/v2/repository/index") == (200, index)
    assert agent.call("POST", "/v2/repository/index", {"ready": True}) == (200, index)
    assert agent.call("POST", "/v2/repository/index", {"ready": "yes"})[0] == 400
    metrics = agent.call("GET", "/metrics")[1]
    assert 'edge_agent_inferences_total{model="digits"} 9' in metrics
    assert "edge_agent_request_duration_seconds_bucket" in metrics


def test_a_device_key_readable_by_others_is_refused_at_start(
        agent_factory: Any, tmp_path: Path) -> None:
    from agent.trust.identity import generate_device_key

    key, _ = generate_device_key("dev-1", tmp_path / "keys")
    key.chmod(0o640)
    agent = agent_factory(X86, start=False, paths={"device_key": str(key)})
    with pytest.raises(AssertionError, match=r"device key .* mode 640.*chmod 600"):
        agent.start()
    key.chmod(0o600)
    agent.start()


@needs_onnxruntime
def test_onnx_over_tcp_needs_the_bearer_token_and_serves_a_standard_client(
        agent_factory: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o644)  # readable by others: the agent refuses it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = agent_factory(X86, start=False, api={"tcp_port": port, "token_file": str(token)})
    with pytest.raises(AssertionError, match="chmod 600"):
        refused.start()
    token.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = agent_factory(X86, api={"tcp_port": port, "token_file": str(token)},
                          scheduler={"max_batch": 16, "max_wait_ms": 20})
    installed(agent, releases["onnx1"])
    import http.client

    def tcp(headers: dict[str, str]) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, _, raw = call(conn, "POST", "/v2/models/digits/infer", infer_body(IN_ONNX),
                              headers)
        conn.close()
        return status, json.loads(raw)

    assert tcp({})[0] == 401
    assert tcp({"Authorization": "Bearer wrong"})[0] == 401
    status, out = tcp({"Authorization": "Bearer s3cret-token-0123456789"})
    assert status == 200 and out["outputs"][0]["shape"] == [1, 10]
    _standard_client(port, "s3cret-token-0123456789")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert call(conn, "POST", "/v1/admin/install", {"path": "/x"},
                {"Authorization": "Bearer s3cret-token-0123456789"})[0] == 404

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX))[0]))
        for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    metrics = agent.call("GET", "/metrics")[1]
    assert 'edge_agent_inferences_total{model="digits"} 21' in metrics  # 1+2*2 before


def _standard_client(port: int, token: str) -> None:
    """NVIDIA's Triton client, an Open Inference Protocol client, works unchanged."""
    import tritonclient.http as triton

    auth = {"Authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live(headers=auth) and client.is_model_ready("digits",
                                                                          headers=auth)
    meta = client.get_model_metadata("digits", headers=auth)
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    x = np.asarray(digits_input(2), dtype=np.float32).reshape(2, 1, 8, 8)
    for binary in (True, False):
        inp = triton.InferInput(IN_ONNX, [2, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
        # A fresh dict each call: the client adds its binary header to the dict it is given.
        result = client.infer("digits", [inp], outputs=[out], headers=dict(auth))
        assert result.as_numpy(meta["outputs"][0]["name"]).shape == (2, 10)
    client.close()


@needs_onnxruntime
def test_hot_swap_under_a_steady_request_stream_fails_no_request(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()

    def stream() -> None:
        conn = agent.connection()
        while not stop.is_set():
            status, _, raw = call(conn, "POST", "/v2/models/digits/infer", infer_body(IN_ONNX))
            statuses.append(status)
            if status == 200:
                versions.add(json.loads(raw)["model_version"])
        conn.close()

    workers = [threading.Thread(target=stream) for _ in range(3)]
    for w in workers:
        w.start()
    wait_until(lambda: len(statuses) >= 30, what="requests flowing before the swap")
    body = installed(agent, releases["onnx2"])
    swapped = len(statuses)
    wait_until(lambda: "2" in versions and len(statuses) >= swapped + 30,
               what="requests served by v2 after the swap")
    stop.set()
    for w in workers:
        w.join()
    assert body["version"] == 2 and body["previous"] is not None
    assert versions == {"1", "2"}
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} succeeded"
    assert versions == {"1", "2"}


@needs_onnxruntime
def test_updates_that_fail_leave_the_old_model_serving(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(X86)
    installed(agent, releases["onnx2"])
    status, body = agent.install(releases["onnx3_bad"])
    assert status == 422 and "self-test" in body["error"]
    status, body = agent.install(releases["onnx1"])
    assert (status, body["check"]) == (422, "rollback")
    status, body = agent.install(releases["onnx2"])
    assert (status, body["check"]) == (422, "equal_version")
    out = agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX))[1]
    assert out["model_version"] == "2"
    journal = [json.loads(line) for line in
               (agent.dir / "state/store/journal.jsonl").read_text().splitlines()]
    assert [e["state"] for e in journal if e["version"] == 3] == ["verified", "staged",
                                                                  "loaded", "failed"]


@needs_onnxruntime
def test_refusals_carry_a_reason_and_the_daemon_goes_on(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(X86, scheduler={"memory_budget_bytes": 1000},
                          api={"max_body_bytes": 65536})
    installed(agent, releases["onnx1"])
    status, body = agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX))
    # The resident model alone passes the budget: no request can ever fit.
    assert (status, body["reason"]) == (413, "too_large")
    assert "budget of 1000" in body["error"]
    bad = [
        (b"{not json", 400), (json.dumps({"inputs": [{"name": "nope"}]}).encode(), 400),
        (json.dumps(infer_body(IN_ONNX) | {"inputs": [{"name": IN_ONNX, "shape": [1, 64],
                                                        "datatype": "FP32",
                                                        "data": [0] * 64}]}).encode(), 400),
        (b"x" * 100_000, 413),
    ]
    for raw, want in bad:
        conn = agent.connection()
        status, _, out = call(conn, "POST", "/v2/models/digits/infer", raw)
        conn.close()
        assert status == want, out
        assert json.loads(out)["error"]
    assert agent.call("POST", "/v2/models/nope/infer", infer_body(IN_ONNX))[0] == 404
    assert agent.call("GET", "/v2/health/live")[0] == 200
    assert agent.proc is not None and agent.proc.poll() is None


@needs_onnxruntime
def test_thermal_throttle_sheds_low_priority_at_critical_with_hysteresis(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    prof = load_profile(X86).thermal
    temp = agent.dir / "temp"

    def sensed() -> float | None:
        """The temperature the scheduler last read (it reads at most every poll_s, when a
        request arrives: a high-priority one is served even at critical)."""
        agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX, priority="high"))
        m = re.search(r"^edge_agent_temperature_celsius (\S+)$",
                      agent.call("GET", "/metrics")[1], re.M)
        return float(m.group(1)) if m else None

    def at(celsius: float, priority: str = "normal") -> tuple[int, Any]:
        temp.write_text(f"{int(celsius * 1000)}\n")
        wait_until(lambda: sensed() == int(celsius * 1000) / 1000, what=f"{celsius} °C read")
        return agent.call("POST", "/v2/models/digits/infer",
                          infer_body(IN_ONNX, priority=priority))

    crit, hyst = prof.critical_c, prof.hysteresis_c
    assert at(crit - hyst - 10)[0] == 200
    status, body = at(crit + 1)
    assert (status, body["reason"]) == (503, "thermal")
    assert at(crit + 1, "high")[0] == 200
    assert at(crit - hyst / 2)[0] == 503  # cooled, but not by the hysteresis yet
    assert at(crit - hyst - 0.5)[0] == 200
    metrics = agent.call("GET", "/metrics")[1]
    assert 'edge_agent_refusals_total{reason="thermal"} 2' in metrics


@needs_onnxruntime
def test_an_idle_device_knows_its_temperature_and_a_dead_sensor_is_unknown(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """Sensors are polled at rest (no request is sent here); a sensor that gives no reading
    is the state "unknown", served by the configured policy, never a TypeError."""
    agent = agent_factory(X86, start=False, thermal={"poll_s": 0.05, "on_unknown": "critical"})
    temp = agent.dir / "temp"
    temp.write_text("not a number\n")
    agent.start()
    installed(agent, releases["onnx1"])
    status = agent.call("GET", "/v1/admin/status")[1]
    assert status["thermal"] == "unknown" and status["temperature_c"] is None
    assert any("no thermal sensor reading" in n for n in status["start_notes"])
    code, body = agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX))
    assert (code, body["reason"]) == (503, "thermal") and "unknown" in body["error"], body
    assert agent.call("POST", "/v2/models/digits/infer",
                      infer_body(IN_ONNX, priority="high"))[0] == 200
    temp.write_text("91000\n")  # hot, and nobody asks
    wait_until(lambda: agent.call("GET", "/v1/admin/status")[1]["temperature_c"] == 91.0,
               what="91 °C read at rest")
    assert agent.call("GET", "/v1/admin/status")[1]["thermal"] == "critical"
    metrics = agent.call("GET", "/metrics")[1]
    assert re.search(r"^edge_agent_temperature_celsius 91(\.0)?$", metrics, re.M), metrics
    assert "thermal.state" in agent.log


@needs_onnxruntime
def test_a_crash_kill_9_during_install_restarts_into_a_verified_model(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """A crash (kill -9: the page cache survives it, so this is not a power cut; those are
    tests/test_powercut.py). Kill moments are drawn over the install's own measured
    duration, and the test checks that most landed before the install answered."""
    rng = random.Random(7)
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    t = time.perf_counter()
    installed(agent, releases["onnx2"])
    window = time.perf_counter() - t

    def reset() -> None:
        shutil.rmtree(agent.dir / "state")
        agent.stop()
        agent.start()
        installed(agent, releases["onnx1"])

    reset()
    inside = 0
    for _ in range(6):
        answers: list[int] = []
        t = threading.Thread(target=_quiet_install, args=(agent, releases["onnx2"], answers))
        start = time.perf_counter()
        t.start()
        time.sleep(max(0.0, rng.uniform(0.0, window) - (time.perf_counter() - start)))
        agent.kill9()
        t.join()
        inside += not answers
        agent.start()
        st = agent.call("GET", "/v1/admin/status")[1]
        version = st["models"]["digits"]["version"]
        assert version == 2 if answers == [200] else version in (1, 2)
        out = agent.call("POST", "/v2/models/digits/infer", infer_body(IN_ONNX))[1]
        assert out["model_version"] == str(version)
        assert not list((agent.dir / "state/store/staging").iterdir())
        if version == 2:  # go back to 1 for the next round
            reset()
    assert inside >= 3, f"only {inside} of 6 kills landed inside the install"


def _quiet_install(agent: AgentProcess, archive: Path, answers: list[int] | None = None
                   ) -> None:
    with contextlib.suppress(OSError):  # the agent died mid-request: that is the point
        status = agent.install(archive)[0]
        if answers is not None:
            answers.append(status)


@needs_onnxruntime
def test_sd_notify_ready_watchdog_status_and_stopping(
        agent_factory: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    agent = agent_factory(X86, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    messages = []
    while not any("WATCHDOG=1" in m for m in messages):
        messages.append(sock.recv(4096).decode())
    first = "\n".join(messages)
    assert "READY=1" in first and "STATUS=serving no model yet on" in first
    assert f"MAINPID={agent.proc.pid}" in first
    # STATUS= follows the served models: an install is said without a restart
    installed(agent, releases["onnx1"])
    end = time.monotonic() + 20  # watchdog pings keep coming: bound the wait by time
    while not any("STATUS=serving digits v1 on" in m for m in messages):
        assert time.monotonic() < end, "STATUS= never said the installed model"
        messages.append(sock.recv(4096).decode())
    assert agent.stop() == 0  # SIGTERM: a clean stop
    rest = []
    sock.settimeout(0)  # what it said before it exited is queued on the socket already
    with contextlib.suppress(BlockingIOError):
        while True:
            rest.append(sock.recv(4096).decode())
    sock.close()
    stopping = [m for m in rest if "STOPPING=1" in m]
    assert len(stopping) == 1 and "STATUS=" in stopping[0], rest


@needs_onnxruntime
def test_ready_comes_only_after_the_installed_model_was_verified_and_loaded(
        agent_factory: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    agent.stop()
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    agent.env = {**agent.env, "NOTIFY_SOCKET": path}
    agent.start(wait=False)
    try:
        said = []
        while not any("READY=1" in m for m in said):
            said.append(sock.recv(4096).decode())
        # at READY, and not a moment later, the model is verified, loaded and ready
        assert agent.call("GET", "/v2/models/digits/ready")[0] == 200
    finally:
        sock.close()
    assert "STATUS=verifying installed models" in said[0], said
    ready = next(m for m in said if "READY=1" in m)
    assert "digits v1" in ready, ready
    notes = agent.call("GET", "/v1/admin/status")[1]["start_notes"]
    assert any("digits v1 verified, self-tested and serving" in n for n in notes), notes


@needs_onnxruntime
def test_a_damaged_active_bundle_falls_back_to_previous_at_start(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    installed(agent, releases["onnx2"])
    agent.stop()
    slots = json.loads((agent.dir / "state/store/slots/digits.json").read_text())
    model = agent.dir / "state/store/bundles/digits" / slots["active"] / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    agent.start()
    st = agent.call("GET", "/v1/admin/status")[1]
    assert st["models"]["digits"]["version"] == 1
    assert any("sha256" in n for n in st["start_notes"]), st["start_notes"]


def test_a_bad_config_fails_at_start_naming_the_field(tmp_path: Path,
                                                      releases: dict[str, Path]) -> None:
    import subprocess
    import sys

    cfg = write_config(tmp_path, releases["keys"], profile=X86,
                       scheduler={"queue_max": 0, "max_wait_ms": "soon"})
    p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 2
    assert "scheduler.queue_max" in p.stderr and "scheduler.max_wait_ms" in p.stderr
    check = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", "--config",
                            str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 2 and "scheduler.queue_max" in check.stderr


@needs_onnxruntime
def test_edge_agent_install_works_directly_when_stopped_and_through_the_daemon(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    import subprocess
    import sys

    agent = agent_factory(X86, start=False)

    def install(archive: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", "install", str(archive),
                               "--config", str(agent.config)], capture_output=True,
                              text=True, timeout=120, check=False)

    direct = install(releases["onnx1"])
    assert direct.returncode == 0 and "directly (daemon stopped)" in direct.stdout, direct
    agent.start()
    assert agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 1
    assert agent.socket.stat().st_mode & 0o777 == 0o660
    live = install(releases["onnx2"])
    assert live.returncode == 0 and json.loads(live.stdout)["version"] == 2, live
    bad = install(releases["onnx3_bad"])
    assert bad.returncode == 3 and "self-test" in bad.stdout


@needs_onnxruntime
def test_admin_install_of_what_is_not_a_bundle_and_rollback_through_the_admin_api(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """A path is no longer taken from clients (415, whatever it names); `/v1/admin/rollback`
    serves the previous version, and a second one has nothing to go back to (409). (One
    install at a time: tests/test_install.py; uploads: tests/test_api_limits.py.)"""
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    status, body = agent.call("POST", "/v1/admin/install", {"path": str(releases["onnx2"])})
    assert status == 415 and "paths" in body["error"], body
    installed(agent, releases["onnx2"])
    status, body = agent.call("POST", "/v1/admin/rollback", {"model": "digits",
                                                            "reason": "operator"})
    assert status == 200 and "digits v1" in body["result"], body
    st = agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]
    assert (st["version"], st["previous"], st["committed"]) == (1, None, 2)
    assert agent.call("POST", "/v2/models/digits/infer",
                      infer_body(IN_ONNX))[1]["model_version"] == "1"
    status, body = agent.call("POST", "/v1/admin/rollback", {"model": "digits"})
    assert status == 409 and "no previous" in body["error"], body
    assert agent.call("POST", "/v1/admin/rollback", {})[0] == 400


@needs_onnxruntime
def test_edge_agent_status_unit_and_schema_commands(agent_factory: Any,
                                                    releases: dict[str, Path],
                                                    tmp_path: Path) -> None:
    import subprocess
    import sys

    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                              text=True, timeout=60, check=False)

    status = cli("status", "--config", str(agent.config))
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert (body["device"], body["models"]["digits"]["version"]) == ("dev-1", 1)
    unit = cli("unit", "--config", str(agent.config))
    assert unit.returncode == 0 and f"--config {agent.config}" in unit.stdout
    assert "Type=notify" in unit.stdout and "MemoryMax=" in unit.stdout
    out = tmp_path / "schemas"
    assert cli("schema", "--out", str(out)).returncode == 0
    names = sorted(p.name for p in out.iterdir())
    assert "telemetry.schema.json" in names and "event.schema.json" in names, names
    telemetry = json.loads((out / "telemetry.schema.json").read_text())
    assert "interval_s" in telemetry["properties"]["signed"]["properties"]  # the envelope
    agent.stop()
    gone = cli("status", "--config", str(agent.config))
    assert gone.returncode == 2 and "cannot reach the agent" in gone.stderr


@needs_onnxruntime
def test_models_share_the_memory_budget_and_an_evicted_one_reloads_on_demand(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """Two models of 40 MiB each: under a 64 MiB budget loading the second unloads the
    first (least recently used), and a request for the first loads it again; under
    128 MiB both stay resident."""
    def infer(agent: AgentProcess, name: str) -> tuple[int, Any]:
        return agent.call("POST", f"/v2/models/{name}/infer", infer_body(IN_ONNX))

    def resident(agent: AgentProcess) -> set[str]:
        return set(agent.call("GET", "/v1/admin/status")[1]["models"])

    def counter(agent: AgentProcess, name: str, model: str) -> float:
        m = re.search(rf'^{name}{{model="{model}"}} (\S+)$', agent.call("GET", "/metrics")[1],
                      re.M)
        return float(m.group(1)) if m else 0.0

    tight = agent_factory(X86, scheduler={"memory_budget_bytes": 64 << 20})
    installed(tight, releases["model_b"])
    installed(tight, releases["model_c"])
    assert resident(tight) == {"digits-c"}
    assert counter(tight, "edge_agent_model_unloads_total", "digits-b") == 1
    status, body = infer(tight, "digits-b")  # installed, not resident: loaded again
    assert status == 200 and body["model_name"] == "digits-b", body
    assert resident(tight) == {"digits-b"}
    assert counter(tight, "edge_agent_model_reloads_total", "digits-b") == 1
    assert infer(tight, "nope")[0] == 404  # not installed at all
    roomy = agent_factory(X86, scheduler={"memory_budget_bytes": 128 << 20})
    installed(roomy, releases["model_b"])
    installed(roomy, releases["model_c"])
    assert resident(roomy) == {"digits-b", "digits-c"}
    assert infer(roomy, "digits-b")[0] == 200 and infer(roomy, "digits-c")[0] == 200
    assert counter(roomy, "edge_agent_model_unloads_total", "digits-b") == 0


def test_the_readme_inference_example_runs_as_written(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """The README's curl example once sent "name":"input" to a TFLite model (400)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- tests/test_agent_e2e.py runs this block as written against a live agent -->"
    block = readme.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    agent = agent_factory(PI4)
    installed(agent, releases["tflite1"])
    script = block.replace("sock=/run/edge-agent/api.sock", f"sock={agent.socket}")
    assert script != block
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_name"] == "digits" and out["outputs"][0]["shape"] == [1, 10], out


def _metric(agent: AgentProcess, family: str) -> float:
    """The digits model's sample of a counter family (0 before its first increment)."""
    line = next((ln for ln in agent.call("GET", "/metrics")[1].splitlines()
                 if ln.startswith(f'{family}{{model="digits"}}')), None)
    return 0.0 if line is None else float(line.rsplit(" ", 1)[1])


@needs_onnxruntime
def test_concurrent_clients_are_batched_not_run_one_by_one_on_the_event_loop(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """Eight connections each send a request at once, eight rounds. Run inline, each
    request would hold the event loop until its answer, the others would not even be read:
    one batch per request. Handed off (more than one connection is open), the loop reads
    them while the worker runs, and they batch."""
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    body = json.dumps(infer_body(IN_ONNX)).encode()
    raw = (f"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: "
           f"application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    conns = []
    for _ in range(8):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(agent.socket))
        conns.append(s)
    before = _metric(agent, "edge_agent_batches_total")
    for _ in range(8):
        for s in conns:
            s.sendall(raw)
        for s in conns:
            data = b""
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                    data.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
    for s in conns:
        s.close()
    batches = _metric(agent, "edge_agent_batches_total") - before
    assert batches <= 0.75 * 64, f"{batches:.0f} batches for 64 requests"


@needs_onnxruntime
def test_a_client_holding_idle_keep_alive_connections_gets_the_fast_path(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """Two more keep-alive connections open and idle (as a client's pool holds them): a
    request on a third one still runs at once on the event loop, as a lone client's does
    (it was handed to a worker thread whenever more than one connection was open). The
    batching test above holds the other side: requests that arrive together still batch."""
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    pool = [agent.connection()]

    def inline_runs() -> float:
        before = _metric(agent, "edge_agent_inline_runs_total")
        for _ in range(20):
            status, _, raw = call(pool[0], "POST", "/v2/models/digits/infer",
                                  infer_body(IN_ONNX), {})
            assert status == 200, raw
        return _metric(agent, "edge_agent_inline_runs_total") - before

    # a first request: the scheduler learns how long the model runs (the fast path is
    # only for models quicker than its limit, 1 ms)
    assert call(pool[0], "POST", "/v2/models/digits/infer", infer_body(IN_ONNX), {})[0] == 200
    alone = inline_runs()  # the control: one connection
    if alone < 20:  # under emulation (scripts/test-aarch64.sh) the model runs slower
        pytest.skip(f"the model is too slow for the fast path here ({alone:.0f} of 20 "
                    "inline on a lone connection)")
    pool += [agent.connection() for _ in range(2)]
    for c in pool[1:]:  # established keep-alive connections, then idle
        assert call(c, "GET", "/v2/health/live", None, {})[0] == 200
    inline = inline_runs()
    for c in pool:
        c.close()
    assert inline == 20, f"{inline:.0f} of 20 requests ran inline with idle connections open"


def _churn(agent: AgentProcess) -> None:
    """One round of what wears a server: 60 short connections (half closed by the client
    after its answer, half with `Connection: close`), 15 cut in the middle of a request,
    10 idle then closed, 3 keep-alive clients sending 40 infers each at once (batched),
    and the model unloaded and loaded again through the repository API."""
    body = json.dumps(infer_body(IN_ONNX)).encode()
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n" % len(body))
    for i in range(60):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(agent.socket))
        s.sendall(head + (b"connection: close\r\n" if i % 2 else b"") + b"\r\n" + body)
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 200")
        s.close()
    held = []
    for i in range(25):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(agent.socket))
        if i < 15:  # the head and half the body, then gone
            s.sendall(head + b"\r\n" + body[:len(body) // 2])
        held.append(s)
    for s in held:
        s.close()

    statuses: list[int] = []

    def client() -> None:  # an assert here would not fail the test: the thread would end
        conn = agent.connection()
        for _ in range(40):
            statuses.append(call(conn, "POST", "/v2/models/digits/infer",
                                 infer_body(IN_ONNX), {})[0])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 120, f"{statuses.count(200)} of 120 concurrent infers 200"
    for verb in ("unload", "load"):
        assert agent.call("POST", f"/v2/repository/models/digits/{verb}", {})[0] == 200


@needs_onnxruntime
def test_connection_churn_and_model_reloads_leave_no_descriptor_or_thread_behind(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """The suite's leak check (the hour-long soak is `bench/bench_soak.py`): after a round
    that fills every pool (threads, sessions), three more rounds of connection churn,
    requests cut short, concurrent batched clients and model reloads leave the daemon
    with the descriptors and threads it had, and its RSS within 8 MiB."""
    import psutil

    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    _churn(agent)

    def quiet() -> bool:
        """The server has let every client connection go: of the sockets on its API path
        it holds only the listener (an accepted socket carries the listener's path). A
        scrape of the connection gauges would race its own close."""
        return sum(c.laddr == str(agent.socket)
                   for c in proc.net_connections(kind="unix")) == 1

    def steady() -> tuple[int, int]:
        wait_until(quiet, what="the clients' connections closed", timeout_s=10)
        return proc.num_fds(), proc.num_threads()

    before, rss = steady(), proc.memory_info().rss
    for _ in range(3):
        _churn(agent)
    after = steady()
    assert after == before, f"(descriptors, threads) {after}; {before} before three rounds"
    grown = (proc.memory_info().rss - rss) / 2**20
    assert grown < 8, f"RSS grew {grown:.1f} MiB over three rounds"


@needs_onnxruntime
def test_an_install_the_journal_cannot_record_is_503_and_the_daemon_goes_on(
        agent_factory: Any, releases: dict[str, Path]) -> None:
    """The update journal cannot be written (here: a directory where its file was): the
    install answers 503 naming the journal, never 500, leaves nothing staged, the model
    that served keeps serving, and once the journal is writable again an install works."""
    agent = agent_factory(X86)
    installed(agent, releases["onnx1"])
    journal = agent.dir / "state" / "store" / "journal.jsonl"
    kept = journal.read_bytes()
    journal.unlink()
    journal.mkdir()
    status, body = agent.install(releases["onnx2"])
    assert status == 503 and body["reason"] == "store" and "journal" in body["error"], body
    assert not any((agent.dir / "state" / "store" / "staging").iterdir())
    assert agent.call("POST", "/v2/models/digits/infer",
                      infer_body(IN_ONNX))[1]["model_version"] == "1"
    journal.rmdir()
    journal.write_bytes(kept)
    installed(agent, releases["onnx2"])
