"""Staged rollouts over real agents and a real mosquitto: waves to completion, a halt with
rollbacks when the first wave fails, and a controller killed mid-rollout that resumes from
its database; plus the pure wave and verdict policy."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import AgentProcess, command_controller
from fixture_mqtt import Broker, Subscriber, report
from polling import wait_until

from fleet.devices.registry import FleetDB
from fleet.errors import FleetError
from fleet.rollout.controller import Controller
from fleet.rollout.policy import (
    FINAL,
    OPEN,
    STATUS_TRANSITIONS,
    Criteria,
    Exec,
    Health,
    Status,
    judge,
    next_status,
    wave_sizes,
)
from fleet.rollout.record import Rollouts, pause_after
from fleet.rollout.status import rollout_lines


def test_waves_are_cumulative_and_never_empty() -> None:
    assert wave_sizes(1000, [0.01, 0.1, 0.5, 1.0]) == [10, 100, 500, 1000]
    assert wave_sizes(3, [0.01, 0.1, 0.5, 1.0]) == [1, 2, 3]
    assert wave_sizes(1, [0.01, 1.0]) == [1]


def test_verdicts() -> None:
    c = Criteria()
    ok = {"a": Exec.COMMITTED, "b": Exec.ALREADY_CURRENT}
    assert judge(ok, criteria=c).action == "advance"
    assert judge({"a": Exec.COMMITTED, "b": Exec.SENT}, criteria=c).action == "wait"
    late = judge({"a": Exec.COMMITTED, "b": Exec.TIMED_OUT}, criteria=c)
    assert late.action == "advance" and "1 timed out or away" in late.reason
    away = judge({"a": Exec.COMMITTED, "b": Exec.QUEUED}, criteria=c, away=frozenset("b"))
    assert away.action == "advance"
    assert judge({"a": Exec.COMMITTED, "b": Exec.QUEUED}, criteria=c).action == "wait"
    bad = judge({"a": Exec.COMMITTED, "b": Exec.ROLLED_BACK}, criteria=c)
    assert bad.action == "halt" and "b" in bad.reason
    assert judge(ok, criteria=c,
                 health=Health(updated_anomalous=0.5, baseline_anomalous=0.1)).action == "halt"
    assert judge(ok, criteria=c,
                 health=Health(updated_anomalous=0.12, baseline_anomalous=0.1)
                 ).action == "advance"
    slow = judge(ok, criteria=c,
                 health=Health(updated_latency_ms=9.0, baseline_latency_ms=4.0))
    assert slow.action == "halt" and "9.0 ms" in slow.reason
    assert judge({"a": Exec.TIMED_OUT}, criteria=c).action == "halt"
    assert judge({"a": Exec.QUEUED}, criteria=c, away=frozenset("a")).action == "wait"


def test_a_rollouts_status_table_has_one_way_back_to_running_and_final_ends() -> None:
    assert next_status(Status.RUNNING, "pause") is Status.PAUSED
    assert next_status(Status.PAUSED, "resume") is Status.RUNNING
    assert [k for k in STATUS_TRANSITIONS if k[1] == "resume"] == [(Status.PAUSED, "resume")]
    assert not [k for k in STATUS_TRANSITIONS if k[0] in FINAL]
    for final in FINAL:
        with pytest.raises(ValueError, match="final"):
            next_status(final, "resume")


def test_pause_resume_and_a_halted_rollout_that_cannot_be_resumed(
        releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """Through the command line, as an operator types it; no broker is needed to pause."""
    db_path = fleet_db
    rollouts = Rollouts(FleetDB(db_path))
    rid = rollouts.create(archive=releases["onnx2"], urls=["http://127.0.0.1:9/a"],
                          group="lab", devices=["dev-1", "dev-2"], fractions=[1.0],
                          criteria=Criteria(), wave_timeout_s=60)

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return rollout_cli(db_path, action, rid)

    assert f"rollout {rid}: paused" in cli("pause").stdout
    assert rollouts.get(rid).status is Status.PAUSED
    assert cli("pause").returncode != 0  # paused already: not a step of the table
    assert f"rollout {rid}: running" in cli("resume").stdout
    rollouts.move(rid, "halt", "2 of 2 device(s) failed")
    refused = cli("resume")
    assert refused.returncode != 0 and "halted (final) rollout cannot resume" in refused.stderr
    assert rollouts.get(rid).status is Status.HALTED  # a halt is never undone by resume
    with pytest.raises(FleetError, match="cannot complete"):
        rollouts.move(rid, "complete")
    with pytest.raises(TypeError):
        rollouts.set(rid, status="running")  # status is written by move only


def controller(db: FleetDB, broker: Broker, releases: dict[str, Path]) -> Controller:
    return command_controller(db, broker.url, releases["keys"])


def signing(broker: Broker, releases: dict[str, Path]) -> list[object]:
    """The options a rollout command that sends commands needs."""
    keys = releases["keys"]
    return ["--broker", broker.url, "--key", next((keys / "keys").glob("command-*.key")),
            "--root", keys / "root.json"]


def rollout_argv(db: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", "rollout", *map(str, args), "--db", str(db)]


def rollout_cli(db: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """`edge-fleet rollout ARGS --db DB`, as an operator types it."""
    return subprocess.run(rollout_argv(db, *args), capture_output=True, text=True,
                          timeout=180, check=False)


def lab_rollout(rollouts: Rollouts, releases: dict[str, Path], url: str, *,
                devices: tuple[str, ...] = ("dev-1", "dev-2", "dev-3"),
                fractions: tuple[float, ...] = (0.3, 1.0), archive: str = "onnx2",
                criteria: Criteria | None = None, **kw: Any) -> str:
    """A rollout of `archive` to group "lab" served from `url` (wave timeout 60 s unless
    given)."""
    a = releases[archive]
    return rollouts.create(archive=a, urls=[f"{url}/{a.name}"], group="lab",
                           devices=list(devices), fractions=list(fractions),
                           criteria=criteria or Criteria(), **{"wave_timeout_s": 60, **kw})


def versions(agents: list[AgentProcess]) -> list[int]:
    return [a.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] for a in agents]


def test_a_rollout_in_waves_completes_and_survives_a_controller_killed_mid_wave(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """`edge-fleet rollout run` is killed (SIGKILL) while the first wave's device is in
    its health window; the device commits while no controller runs; a new controller
    finishes the rollout once the killed one's lease ran out (nothing local, such as its
    process id, tells it is gone), the device's result or its retained state settling
    what happened meanwhile."""
    broker, agents, url = group
    db = FleetDB(fleet_db)
    archive = releases["onnx2"]
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=["dev-1", "dev-2", "dev-3"], fractions=[0.3, 1.0],
                          criteria=Criteria(), wave_timeout_s=60)
    run = subprocess.Popen(rollout_argv(fleet_db, "run", rid,
                                        *signing(broker, releases), "--lease", "3"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def slot(agent: AgentProcess) -> tuple[int, int | None]:
        d = agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]
        return d["version"], d["committed"]

    try:
        wait_until(lambda: slot(agents[0]) == (2, 1), timeout_s=60, every_s=0.01,
                   what="dev-1 serving v2 in its health window")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    first = rollouts.devices(rid)[0]
    # An observer of its own sees dev-1's result go by while no controller runs.
    observer = Subscriber(broker, ["edge/v1/acme/+/cmd/result"], client_id="observer")
    try:
        observer.wait_for(lambda: any(report(r)["command_id"] == first.command_id
                                      for r in observer.on("/cmd/result")), timeout=30)
    finally:
        observer.close()
    assert slot(agents[0]) == (2, 2)
    # nobody recorded its result: it is still in flight (sent, perhaps with the broker's
    # ack not yet recorded, or in progress when its deploy events reached the watcher)
    assert first.device == "dev-1" and first.status in OPEN
    assert [d.command_id is None for d in rollouts.devices(rid)] == [False, True, True]
    second = controller(db, broker, releases)
    assert second.run(rid, timeout_s=90) == "completed"
    second.close()
    assert versions(agents) == [2, 2, 2]
    assert [d.status for d in rollouts.devices(rid)] == [Exec.COMMITTED] * 3
    # dev-1's result is the one it sent while no controller ran (the persistent session
    # kept it), not the answer to a second deploy after the wave timed out
    assert rollouts.devices(rid)[0].command_id == first.command_id
    lines = rollout_lines(rollouts, rid)
    assert "completed" in lines[0] and sum("committed" in ln for ln in lines[1:]) == 3


def test_a_failing_first_wave_halts_and_nothing_else_changes(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    broker, agents, url = group
    db = FleetDB(fleet_db)
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
    assert [d.status for d in rollouts.devices(rid)] == ["failed", "queued", "queued"]
    assert [d.command_id is None for d in rollouts.devices(rid)] == [False, True, True]
    assert versions(agents) == [1, 1, 1]


def test_the_rollout_command_line(group: Any, releases: dict[str, Path], fleet_db: str) -> None:
    broker, agents, url = group

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return rollout_cli(fleet_db, *args)

    start = cli("start", "--bundle", releases["onnx2"], "--url-base", url, "--group", "lab",
                *signing(broker, releases), "--waves", "30,100", "--health-window", "0.5")
    assert start.returncode == 0, start.stderr
    rid = re.search(r"rollout (\w+): 3 device\(s\)", start.stdout).group(1)  # type: ignore[union-attr]
    assert f"rollout {rid}: completed" in start.stdout
    status = cli("status", rid)
    assert len(re.findall(r"dev-\d +committed +v2", status.stdout)) == 3
    assert "completed" in status.stdout.splitlines()[0]
    assert "group runs: 3 on v2" in status.stdout
    history = cli("status", rid, "--device", "dev-1").stdout
    steps = re.findall(r"(\S+) -> (\S+) +(\S+)", history)
    assert steps[0] == ("-", "queued", "queued") and steps[-1][1:] == ("committed", "committed")
    assert ("queued", "to_send", "send") in steps, history
    assert versions(agents) == [2, 2, 2]


def test_abort_rolls_back_what_the_rollout_touched_and_cannot_be_resumed(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    broker, agents, url = group
    db_path = fleet_db
    rollouts = Rollouts(FleetDB(db_path))
    archive = releases["onnx2"]
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="lab",
                          devices=["dev-1", "dev-2", "dev-3"], fractions=[0.3, 1.0],
                          criteria=Criteria(), wave_timeout_s=60, health_window_s=60)
    c = controller(FleetDB(db_path), broker, releases)
    try:
        assert c.step(rid) == "running"  # wave 1 (dev-1) sent; the wave's window is long
        wait_until(lambda: versions(agents) == [2, 1, 1], timeout_s=30,
                   what="dev-1 on v2")
    finally:
        c.close()
    abort = rollout_cli(db_path, "abort", rid, *signing(broker, releases))
    assert abort.returncode == 5, abort.stderr  # aborted (0 is for completed only)
    assert f"rollout {rid}: aborted" in abort.stdout
    assert versions(agents) == [1, 1, 1]
    dev1 = rollouts.devices(rid)[0]
    assert dev1.rollback_result is not None and dev1.rollback_result.startswith("ok")
    assert [d.command_id is None for d in rollouts.devices(rid)] == [False, True, True]
    with pytest.raises(FleetError, match="aborted"):
        rollouts.move(rid, "resume")


def test_late_and_replayed_reports_never_flip_a_commit_and_are_counted(
        group: Any, releases: dict[str, Path], tmp_path: Path, fleet_db: str) -> None:
    """The retained state dev-2 published before the rollout (v1), captured and published
    again after dev-2 committed v2 (a late retained state, as a loaded controller would
    receive it), and dev-2's genuine deploy result and events published again (replays):
    the record does not change, no rollback is sent, and each is counted stale. Before
    reports were put in their device's order, the old state flipped dev-2 to rolled_back."""
    broker, agents, url = group
    tap = Subscriber(broker, ["edge/v1/acme/dev-2/#"], client_id="tap")
    tap.wait_for(lambda: tap.on("/dev-2/state"))
    before = tap.on("/dev-2/state")[-1]  # retained: online, v1
    assert b'"version":1' in before
    db = FleetDB(fleet_db)
    rollouts = Rollouts(db)
    rid = lab_rollout(rollouts, releases, url, fractions=(1.0,), health_window_s=0.5)
    c = controller(db, broker, releases)
    try:
        assert c.run(rid, poll_s=0.2, timeout_s=90) == "completed"
        tap.wait_for(lambda: tap.on("/dev-2/cmd/result") and tap.on("/dev-2/event"))
        replays = [("state", before), ("cmd/result", tap.on("/dev-2/cmd/result")[-1]),
                   *(("event", e) for e in tap.on("/dev-2/event"))]
        stale = db.counter("ignored_stale")
        for kind, raw in replays:
            tap.publish(f"edge/v1/acme/dev-2/{kind}", raw, retain=kind == "state")
        wait_until(lambda: db.counter("ignored_stale") >= stale + len(replays),
                   what="every replay counted stale")
        for _ in range(3):
            assert c.step(rid) is Status.COMPLETED
    finally:
        c.close()
        tap.close()
    assert [(d.device, d.status.value, d.rollback_id) for d in rollouts.devices(rid)] == [
        ("dev-1", "committed", None), ("dev-2", "committed", None),
        ("dev-3", "committed", None)]
    assert db.models_of("dev-2")["digits"]["version"] == 2  # the watcher kept the truth
    assert versions(agents) == [2, 2, 2]


def test_a_controller_waits_its_poll_or_as_long_as_its_last_step_took() -> None:
    assert pause_after(0.01, 0.5) == 0.5
    assert pause_after(0.5, 0.5) == 0.5
    assert pause_after(2.25, 0.5) == 2.25  # a step that took long: at most half a core
