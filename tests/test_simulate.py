"""Rollouts over a mixed fleet: real agents (subprocesses) and simulated devices (the
agent's own fleet link and model store over a stand-in runtime), all on a real mosquitto.
Faults injected into simulated devices halt the rollout, and every device it touched
serves the previous release again."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import command_controller, start_group
from fixture_mqtt import Broker, Subscriber
from polling import wait_until

from fleet.devices.registry import FleetDB
from fleet.errors import FleetError
from fleet.rollout.controller import Controller
from fleet.rollout.policy import Criteria
from fleet.rollout.record import Rollouts
from fleet.rollout.status import rollout_lines
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, fault_plan
from fleet.trust.artifacts import serve_in_thread as serve


def test_faults_are_spread_and_the_first_device_is_one() -> None:
    names = [f"d{i:03d}" for i in range(100)]
    plan = fault_plan(names, 5)
    assert len(plan) == 5 and "d000" in plan
    assert sorted(plan.values()) == ["drift", "latency", "latency", "selftest", "selftest"]
    assert fault_plan(names, 0) == {}
    assert fault_plan(names[:3], 1) == {"d000": "selftest"}  # at least one device
    with pytest.raises(FleetError, match="unknown fault kinds"):
        fault_plan(names, 5, ("meltdown",))


@pytest.fixture
def world(broker: Broker, releases: dict[str, Path]) -> Iterator[Any]:
    server, url = serve(releases["onnx1"].parent)
    yield broker, url
    server.shutdown()


def sim_fleet(broker: Broker, releases: dict[str, Path], db: FleetDB, count: int, *,
              health_window_s: float = 1.0, **kw: Any) -> SimulatedFleet:
    settings = SimSettings(broker=broker.url, root_file=releases["keys"] / "root.json",
                           groups=("lab",), profile="x86_64-generic",
                           initial=releases["onnx1"], telemetry_interval_s=0.5,
                           health_window_s=health_window_s, requests_per_s=40)
    fleet = SimulatedFleet(settings, count, **kw)
    for name, key in fleet.inventory().items():
        db.register(name, key)
    assert fleet.start() == count
    return fleet


def rollout(db: FleetDB, broker: Broker, releases: dict[str, Path], url: str,
            devices: list[str], fractions: list[float], health_window_s: float,
            archive: str = "onnx2", criteria: Criteria | None = None,
            wave_timeout_s: float = 60) -> tuple[Controller, str]:
    c = command_controller(db, broker.url, releases["keys"])
    a = releases[archive]
    rid = Rollouts(db).create(archive=a, urls=[f"{url}/{a.name}"], group="lab",
                              devices=devices, fractions=fractions,
                              criteria=criteria or Criteria(),
                              wave_timeout_s=wave_timeout_s, health_window_s=health_window_s)
    return c, rid


def run_rollout(*args: Any, timeout_s: float, **kw: Any) -> tuple[str, str]:
    """`rollout(...)` run by a controller to its end; (final status, rollout id)."""
    c, rid = rollout(*args, **kw)
    try:
        return c.run(rid, poll_s=0.2, timeout_s=timeout_s), rid
    finally:
        c.close()


def test_a_rollout_over_real_agents_and_simulated_devices_completes(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, url = world
    agents = start_group(tmp_path, releases["keys"], broker.url, ["dev-1", "dev-2"],
                         [releases["onnx1"]], health_window_s=0.5, telemetry_interval_s=0.5)
    db = FleetDB(tmp_path / "fleet.sqlite")
    try:
        with sim_fleet(broker, releases, db, 12) as sims:
            status, rid = run_rollout(db, broker, releases, url,
                                      ["dev-1", "dev-2", *sims.names], [0.1, 0.5, 1.0],
                                      health_window_s=1.0, timeout_s=120)
            assert status == "completed"
            assert all(v == {"digits": 2} for v in sims.versions().values())
        for a in agents:
            assert a.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"] == 2
        outcomes = [d.status for d in Rollouts(db).devices(rid)]
        assert outcomes == ["committed"] * 14
    finally:
        for a in agents:
            a.stop()


def test_injected_faults_halt_in_the_first_wave_and_every_touched_device_is_back(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, url = world
    db = FleetDB(tmp_path / "fleet.sqlite")
    with sim_fleet(broker, releases, db, 40, faulty_percent=5) as sims:
        assert sims.faults == {"sim-0000": "selftest", "sim-0020": "latency"}
        c, rid = rollout(db, broker, releases, url, sims.names, [0.25, 1.0],
                         health_window_s=1.0)
        try:
            assert c.run(rid, poll_s=0.2, timeout_s=60) == "halted"
            rollouts = Rollouts(db)
            ro = rollouts.get(rid)
            assert ro.wave == 0 and "sim-0000" in ro.reason
            touched = [d for d in rollouts.devices(rid) if d.command_id is not None]
            assert [d.device for d in touched] == sims.names[:10]
            assert all(d.command_id is None for d in rollouts.devices(rid)[10:])
            # Run again, as `rollout run ID` after a restart: a halted rollout stays halted
            # and its rollbacks' results are awaited (this once deadlocked on its lock).
            assert c.run(rid, poll_s=0.2, timeout_s=30) == "halted"
            assert all(d.rollback_result for d in rollouts.devices(rid) if d.rollback_id)
        finally:
            c.close()
        versions = sims.versions()
    assert all(v == {"digits": 1} for v in versions.values()), versions
    by_device = {d.device: d for d in Rollouts(db).devices(rid)}
    assert by_device["sim-0000"].status == "failed"  # never activated: nothing to undo
    assert by_device["sim-0000"].rollback_id is None
    rolled = [d for d in by_device.values() if d.rollback_id]
    assert rolled and all(d.rollback_result.startswith("ok") for d in rolled)


def test_drifting_updated_devices_halt_against_the_baseline(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, url = world
    db = FleetDB(tmp_path / "fleet.sqlite")
    with sim_fleet(broker, releases, db, 10, faulty_percent=30, fault_kinds=("drift",)) as sims:
        status, rid = run_rollout(db, broker, releases, url, sims.names, [0.5, 1.0],
                                  health_window_s=5.0, timeout_s=60)
        assert status == "halted"
        ro = Rollouts(db).get(rid)
        assert ro.wave == 0, ro.reason
        assert "of updated devices reported anomalies" in ro.reason, ro.reason
        # the rollbacks go out; the devices answer
        def all_on_v1() -> bool:
            versions = sims.versions()
            return len(versions) == 10 and all(v == {"digits": 1} for v in versions.values())

        wait_until(all_on_v1, timeout_s=30, what="every simulated device back on v1")


def test_an_error_rate_in_the_health_window_rolls_the_device_back_by_itself(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    broker, url = world
    db = FleetDB(tmp_path / "fleet.sqlite")
    with sim_fleet(broker, releases, db, 4, health_window_s=2.0, faulty_percent=25,
                   fault_kinds=("errors",)) as sims:
        status, rid = run_rollout(db, broker, releases, url, sims.names, [0.25, 1.0],
                                  health_window_s=1.0, timeout_s=60)
        assert status == "halted"
        first = Rollouts(db).devices(rid)[0]
        assert (first.device, first.status) == ("sim-0000", "rolled_back")
        assert first.detail is not None and "error_rate" in first.detail, first.detail
        assert sims.versions()["sim-0000"] == {"digits": 1}


def test_updated_devices_slower_than_the_baseline_halt_the_rollout(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    """No device window here (health_window 0: they commit at once) and the anomaly share
    is not a criterion: only the controller's p95 comparison with the baseline halts."""
    broker, url = world
    db = FleetDB(tmp_path / "fleet.sqlite")
    with sim_fleet(broker, releases, db, 8, health_window_s=0.0, faulty_percent=100,
                   fault_kinds=("latency",)) as sims:
        status, rid = run_rollout(db, broker, releases, url, sims.names, [0.5, 1.0],
                                  health_window_s=5.0, timeout_s=60,
                                  criteria=Criteria(max_anomalous_excess=1.0))
        assert status == "halted"
        ro = Rollouts(db).get(rid)
        assert ro.wave == 0 and "p95 latency" in ro.reason, ro.reason
        rollouts = Rollouts(db)
        # each committed (its own window saw nothing), then the fleet's rollback undid it
        for d in rollouts.devices(rid)[:4]:
            events = [h.event for h in rollouts.history(rid, d.device)]
            assert d.status == "rolled_back" and "committed" in events, events
            assert events[-1] == "fleet_rollback", events


def test_a_device_that_is_away_is_neither_sent_nor_waited_for_nor_failed(
        world: Any, releases: dict[str, Path], tmp_path: Path) -> None:
    """A group member that never came online during the rollout: nothing is published to
    it, the waves do not wait for it, and its record says queued (shown offline)."""
    broker, url = world
    db = FleetDB(tmp_path / "fleet.sqlite")
    ghost = "aaa-ghost"  # in the group's list, first in wave 1, never connected
    sent = Subscriber(broker, [f"edge/v1/acme/{ghost}/cmd"], client_id="ghost-watch")
    with sim_fleet(broker, releases, db, 3) as sims:
        status, rid = run_rollout(db, broker, releases, url, [ghost, *sims.names],
                                  [0.5, 1.0], health_window_s=0.5, wave_timeout_s=3,
                                  timeout_s=60)
        assert status == "completed"
    rows = {d.device: d for d in Rollouts(db).devices(rid)}
    assert rows[ghost].status == "queued" and rows[ghost].attempts == 0
    assert all(rows[n].status == "committed" for n in sims.names)
    assert not sent.on("/cmd")
    assert any(ghost in line and "offline" in line for line in rollout_lines(Rollouts(db), rid))
    sent.close()


def test_the_simulator_removes_what_it_made_however_its_workers_end(
        broker: Broker, releases: dict[str, Path], tmp_path: Path) -> None:
    """A worker killed (SIGKILL) leaves its devices' state on tmpfs; the fleet's stop
    removes it, and a run killed before it could stop is cleaned up by the next one.
    (Seven such directories, 82 MB, were found in /dev/shm after a day of benches.)"""
    import os
    import subprocess
    import sys

    from fleet.sim.settings import remove_orphans

    fleet = sim_fleet(broker, releases, FleetDB(tmp_path / "f.sqlite"), 4, per_process=2)
    made = [fleet.state_root, fleet.keys_dir]
    assert all(d.is_dir() for d in made) and any(fleet.state_root.iterdir())
    os.kill(fleet._workers[0][0].pid, signal.SIGKILL)  # the fault
    fleet.stop()
    assert not any(d.exists() for d in made)
    # a whole run killed: its directories stay until the next simulator starts
    child = subprocess.run([sys.executable, "-c", "import fleet.sim.settings as s, sys; "
                            "print(s.scratch_dir('')); print(s.scratch_dir('keys'))"],
                           capture_output=True, text=True, check=True)
    left = [Path(line) for line in child.stdout.split()]
    assert all(d.is_dir() for d in left)
    assert set(left) <= set(remove_orphans()) and not any(d.exists() for d in left)
