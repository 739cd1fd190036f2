"""Devices spread over site brokers: two mosquitto brokers with the shipped configuration
(mutual TLS, the ACL, the guard, persistence), each bridged to a core broker as
`fleet-bridge` (`fleet.broker.Bridge`); the controller connects to the core only. Real
agents and simulated devices at both sites.

- a rollout across both sites completes: every device's state, telemetry, events and
  results cross the bridges out, its commands in, and the record equals what each
  device runs;
- with faulty devices at both sites, the rollout halts and the rollbacks cross the
  bridges: every device ends on the release it had.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import start_group
from fixture_mqtt import SecureBroker
from polling import wait_until
from test_rollout import versions

from fleet._mqtt import close, connect
from fleet.cli.rollout import ROLLOUT_EXIT
from fleet.devices.registry import FleetDB
from fleet.devices.watcher import FleetWatcher
from fleet.rollout.policy import Criteria, Exec
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, device_names
from fleet.trust.artifacts import serve_in_thread


@pytest.fixture
def sites(tmp_path: Path, releases: dict[str, Path]) -> Iterator[dict[str, Any]]:
    core = SecureBroker(tmp_path / "core").start()
    brokers = [core]
    server = None
    try:
        for name in ("a", "b"):
            brokers.append(SecureBroker(tmp_path / f"site-{name}", bridge_to=core,
                                        site=name).start())
        server, url = serve_in_thread(releases["onnx1"].parent)
        yield {"core": core, "a": brokers[1], "b": brokers[2], "url": url,
               "db": str(tmp_path / "fleet.sqlite")}
    finally:
        if server is not None:
            server.shutdown()
        for b in reversed(brokers):
            b.stop()


def _devices(sites: dict[str, Any], releases: dict[str, Path], tmp_path: Path,
             faulty_percent: float = 0.0) -> tuple[list[Any], list[SimulatedFleet]]:
    """dev-a at site a and dev-b at site b (real agents), 30 simulated devices at each."""
    agents, sims = [], []
    try:
        for site in ("a", "b"):
            broker = sites[site]
            (tmp_path / site).mkdir()
            agents += start_group(tmp_path / site, releases["keys"], broker.url,
                                  [f"dev-{site}"], [releases["onnx1"]],
                                  mqtt_for=broker.agent_mqtt, db=sites["db"],
                                  health_window_s=0.5, telemetry_interval_s=0.5)
            broker.issue_many(device_names(30, f"{site}sim"))
            settings = SimSettings(broker=broker.url, root_file=releases["keys"] / "root.json",
                                   groups=("lab",), profile="x86_64-generic",
                                   initial=releases["onnx1"], telemetry_interval_s=1.0,
                                   health_window_s=1.0, ca_file=broker.pki / "ca.crt",
                                   certs_dir=broker.pki)
            fleet = SimulatedFleet(settings, 30, prefix=f"{site}sim",
                                   faulty_percent=faulty_percent, fault_kinds=("selftest",))
            sims.append(fleet)
            db = FleetDB(sites["db"])
            for name, key in fleet.inventory().items():
                db.register(name, key)
            assert fleet.start() == 30
    except BaseException:
        _stop(agents, sims)
        raise
    return agents, sims


def _stop(agents: list[Any], sims: list[SimulatedFleet]) -> None:
    for s in sims:
        s.stop()
    for a in agents:
        a.stop()


def _run(sites: dict[str, Any], releases: dict[str, Path], rid: str) -> \
        subprocess.CompletedProcess[str]:
    """`edge-fleet rollout run` against the core broker."""
    auth = sites["core"].auth("fleet-controller")
    keys = releases["keys"]
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", "rollout", "run", rid, "--db", sites["db"],
         "--broker", auth.url, "--ca-file", str(auth.ca_file), "--cert-file",
         str(auth.cert_file), "--key-file", str(auth.key_file), "--key",
         str(next((keys / "keys").glob("command-*.key"))), "--root",
         str(keys / "root.json"), "--timeout", "240"],
        capture_output=True, text=True, timeout=300, check=False)


def _retained_heartbeat(broker: SecureBroker, site: str) -> bool:
    """Whether a new subscriber at `broker` is given the heartbeat as retained."""
    got: list[bool] = []
    c, _ = connect(broker.auth("fleet-monitor"), f"edge-fleet-test-{site}",
                   topics=["edge/v1/acme/heartbeat"],
                   on_message=lambda c, u, m: got.append(bool(m.retain)))
    try:
        wait_until(lambda: got, timeout_s=10, what=f"the heartbeat at site {site}")
    finally:
        close(c)
    return got[0]


def _running(agents: list[Any], sims: list[SimulatedFleet]) -> dict[str, int]:
    out = {n: v.get("digits", 0) for s in sims for n, v in s.versions().items()}
    return out | dict(zip(["dev-a", "dev-b"], versions(agents), strict=True))


def _rollout(sites: dict[str, Any], releases: dict[str, Path], names: list[str]) -> str:
    db = FleetDB(sites["db"])
    # every device's retained state crossed its bridge: a monitor at the core sees it online
    monitor = FleetWatcher(db, sites["core"].auth("fleet-monitor"), "acme")
    try:
        wait_until(lambda: {r.device for r in db.devices(group="lab") if r.online}
                   >= set(names), timeout_s=60, what="every device's state at the core")
    finally:
        monitor.stop()
    archive = releases["onnx2"]
    return Rollouts(db).create(archive=archive, urls=[f"{sites['url']}/{archive.name}"],
                               group="lab", devices=names, fractions=[3.5 / len(names), 0.5, 1.0],
                               criteria=Criteria(), wave_timeout_s=60, health_window_s=1.0)


def test_a_rollout_across_two_bridged_sites_completes(
        sites: dict[str, Any], releases: dict[str, Path], tmp_path: Path) -> None:
    agents, sims = _devices(sites, releases, tmp_path)
    try:
        names = ["dev-a", "dev-b", *(n for s in sims for n in s.names)]
        rid = _rollout(sites, releases, names)
        done = _run(sites, releases, rid)
        assert done.returncode == ROLLOUT_EXIT["completed"], done.stdout + done.stderr
        running = _running(agents, sims)
        rollouts = Rollouts(FleetDB(sites["db"]))
        assert set(running.values()) == {2}
        assert {d.device: d.status for d in rollouts.devices(rid)} == \
            dict.fromkeys(names, Exec.COMMITTED)
        # the results crossed the bridges: each execution moved by its device's answer
        causes = {d.device: [h.event for h in rollouts.history(rid, d.device)]
                  for d in rollouts.devices(rid)}
        assert all("committed" in c for c in causes.values()), causes
        # the controller's heartbeat, published retained at the core, is retained at each
        # site: a device connecting there later finds it
        for site in ("a", "b"):
            assert _retained_heartbeat(sites[site], site)
    finally:
        _stop(agents, sims)


def test_a_rollout_with_faulty_devices_at_both_sites_halts_and_rolls_back_across_them(
        sites: dict[str, Any], releases: dict[str, Path], tmp_path: Path) -> None:
    agents, sims = _devices(sites, releases, tmp_path, faulty_percent=20)
    try:
        # the first wave: both real agents and each site's first (faulty) device
        first = ["dev-a", "dev-b", sims[0].names[0], sims[1].names[0]]
        names = [*first, *(n for s in sims for n in s.names if n not in first)]
        rid = _rollout(sites, releases, names)
        done = _run(sites, releases, rid)
        assert done.returncode == ROLLOUT_EXIT["halted"], done.stdout + done.stderr
        rollouts = Rollouts(FleetDB(sites["db"]))
        wait_until(lambda: set(_running(agents, sims).values()) == {1}, timeout_s=60,
                   what="every device back on v1")
        record = {d.device: d for d in rollouts.devices(rid)}
        # each site's faulty device failed; each site's agent committed and was rolled
        # back by a command that crossed its bridge, and answered through it
        for faulty in first[2:]:
            assert record[faulty].status is Exec.FAILED
        for agent in first[:2]:
            assert record[agent].status is Exec.ROLLED_BACK
            assert (record[agent].rollback_result or "").startswith("ok"), record[agent]
        assert not any(d.status is Exec.COMMITTED for d in record.values())
    finally:
        _stop(agents, sims)
