"""Staged rollouts over real agents and a real mosquitto: waves to completion, a halt with
rollbacks when the first wave fails, and a controller killed mid-rollout that resumes from
its database; plus the pure wave and verdict policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import AgentProcess, start_group
from fixture_mqtt import Broker

from fleet.artifacts import serve_in_thread as serve
from fleet.keys import KeyDir
from fleet.policy import Criteria, Health, Outcome, judge, wave_sizes
from fleet.rollout import Controller, Rollouts
from fleet.state import FleetDB


def test_waves_are_cumulative_and_never_empty() -> None:
    assert wave_sizes(1000, [0.01, 0.1, 0.5, 1.0]) == [10, 100, 500, 1000]
    assert wave_sizes(3, [0.01, 0.1, 0.5, 1.0]) == [1, 2, 3]
    assert wave_sizes(1, [0.01, 1.0]) == [1]


def test_verdicts() -> None:
    c = Criteria()
    ok = {"a": Outcome.COMMITTED, "b": Outcome.COMMITTED}
    assert judge(ok, deadline_passed=False, criteria=c).action == "advance"
    assert judge({"a": Outcome.COMMITTED, "b": Outcome.PENDING}, deadline_passed=False,
                 criteria=c).action == "wait"
    late = judge({"a": Outcome.COMMITTED, "b": Outcome.PENDING}, deadline_passed=True,
                 criteria=c)
    assert late.action == "advance" and "1 offline" in late.reason
    bad = judge({"a": Outcome.COMMITTED, "b": Outcome.ROLLED_BACK}, deadline_passed=False,
                criteria=c)
    assert bad.action == "halt" and "b" in bad.reason
    assert judge(ok, deadline_passed=False, criteria=c,
                 health=Health(updated_anomalous=0.5, baseline_anomalous=0.1)).action == "halt"
    assert judge(ok, deadline_passed=False, criteria=c,
                 health=Health(updated_anomalous=0.12, baseline_anomalous=0.1)
                 ).action == "advance"
    slow = judge(ok, deadline_passed=False, criteria=c,
                 health=Health(updated_latency_ms=9.0, baseline_latency_ms=4.0))
    assert slow.action == "halt" and "9.0 ms" in slow.reason
    assert judge({"a": Outcome.PENDING}, deadline_passed=True, criteria=c).action == "halt"


@pytest.fixture
def group(tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> Iterator[Any]:
    agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1", "dev-2", "dev-3"],
                         [releases["onnx1"]], health_window_s=0.5, telemetry_interval_s=0.25)
    server, url = serve(releases["onnx1"].parent)
    yield broker, agents, url
    server.shutdown()
    for a in agents:
        a.stop()


def controller(db: FleetDB, broker: Broker, releases: dict[str, Path]) -> Controller:
    kd = KeyDir(releases["keys"])
    return Controller(db, broker.url, "acme", kd.keys_of(kd.root(), "command", None))


def versions(agents: list[AgentProcess]) -> list[int]:
    return [a.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] for a in agents]


def test_a_rollout_in_waves_completes_and_survives_a_controller_restart(
        group: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, agents, url = group
    db = FleetDB(tmp_path / "fleet.sqlite")
    archive = releases["onnx2"]
    rid = Rollouts(db).create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                              devices=["dev-1", "dev-2", "dev-3"], fractions=[0.3, 1.0],
                              criteria=Criteria(), wave_timeout_s=60)
    first = controller(db, broker, releases)
    assert first.step(rid) == "running"  # wave 1 sent
    first.close()  # the controller dies; results arrive while it is gone
    time.sleep(2)
    second = controller(db, broker, releases)
    assert second.run(rid, timeout_s=90) == "completed"
    second.close()
    assert versions(agents) == [2, 2, 2]
    lines = Rollouts(db).status_lines(rid)
    assert "completed" in lines[0] and sum("committed" in ln for ln in lines[1:]) == 3


def test_a_failing_first_wave_halts_and_nothing_else_changes(
        group: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, agents, url = group
    db = FleetDB(tmp_path / "fleet.sqlite")
    archive = releases["onnx3_bad"]  # fails its self-test on the device
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=["dev-1", "dev-2", "dev-3"], fractions=[0.3, 1.0],
                          criteria=Criteria(), wave_timeout_s=60)
    c = controller(db, broker, releases)
    assert c.run(rid, timeout_s=90) == "halted"
    c.close()
    ro = rollouts.get(rid)
    assert "dev-1" in ro.reason and ro.wave == 0
    assert [d.outcome for d in rollouts.devices(rid)] == ["failed", "pending", "pending"]
    assert [d.command_id is None for d in rollouts.devices(rid)] == [False, True, True]
    assert versions(agents) == [1, 1, 1]


def test_the_rollout_command_line(group: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    broker, agents, url = group
    keys = releases["keys"]
    key = next((keys / "keys").glob("command-*.key"))

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet.cli", "rollout", *map(str, args),
                               "--db", tmp_path / "fleet.sqlite"], capture_output=True,
                              text=True, timeout=180, check=False)

    start = cli("start", "--bundle", releases["onnx2"], "--url-base", url, "--group", "lab",
                "--broker", broker.url, "--key", key, "--root", keys / "root.json",
                "--waves", "30,100", "--health-window", "0.5")
    assert start.returncode == 0, start.stderr
    rid = re.search(r"rollout (\w+): 3 device\(s\)", start.stdout).group(1)  # type: ignore[union-attr]
    assert f"rollout {rid}: completed" in start.stdout
    status = cli("status", rid)
    assert status.stdout.count(" committed ") == 3 and "completed" in status.stdout
    assert versions(agents) == [2, 2, 2]
