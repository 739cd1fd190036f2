"""Takeover: a controller killed (SIGKILL) mid-rollout, a standby taking it over, on each
engine of the fleet record (issue 27's figure: takeover within one lease).

A rollout to N simulated devices on the broker as shipped (mutual TLS, the ACL,
persistence), waves 1/10/50/100 %, 3 s health windows. Two `edge-fleet rollout run`
processes, as an operator starts a controller and a standby; the driving one is killed
once the second wave is under way. Printed per engine: the time from the kill to the
standby holding the lease (target: at most one lease), the rollout's total time, its
outcome, and records unlike the device (target 0), with the load average.

    .venv/bin/python bench/bench_takeover.py [--devices 1000] [--lease 15]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import WAVES, _load, poll, registered, takeover_setup
from fixture_mqtt import SecureBroker

from fleet.devices.registry import FleetDB
from fleet.postgres import LocalPostgres
from fleet.rollout.policy import DONE, Criteria
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet


def run_once(engine: str, target: str, broker: SecureBroker, keys: Path, url: str,
             archive: Path, sims: SimulatedFleet, lease_s: float, where: Path) -> None:
    db = registered(FleetDB(target), sims)
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="sim",
                          devices=sims.names, fractions=WAVES, criteria=Criteria(),
                          wave_timeout_s=60, health_window_s=3.0)
    auth = broker.auth("fleet-controller")
    argv = [sys.executable, "-m", "fleet.cli", "rollout", "run", rid, "--db", target,
            "--broker", auth.url, "--ca-file", str(auth.ca_file), "--cert-file",
            str(auth.cert_file), "--key-file", str(auth.key_file), "--key",
            str(next((keys / "keys").glob("command-*.key"))), "--root",
            str(keys / "root.json"), "--lease", str(lease_s), "--timeout", "900"]
    logs = [(where / f"{engine}-{n}.log").open("w") for n in ("first", "standby")]
    t0 = time.monotonic()
    first = subprocess.Popen(argv, stdout=logs[0], stderr=subprocess.STDOUT)
    poll(lambda: rollouts.get(rid).owner is not None, 120, "the first controller's lease")
    owner = rollouts.get(rid).owner
    standby = subprocess.Popen(argv, stdout=logs[1], stderr=subprocess.STDOUT)
    poll(lambda: rollouts.get(rid).wave >= 1, 300, "the second wave")
    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait(10)
    poll(lambda: rollouts.get(rid).owner not in (None, owner), 120, "the standby's lease")
    took = time.monotonic() - killed
    wave = rollouts.get(rid).wave
    rc = standby.wait(900)
    total = time.monotonic() - t0
    ro = rollouts.get(rid)
    runs = sims.versions()
    wrong = [d.device for d in rollouts.devices(rid)
             if (d.status in DONE) != (runs.get(d.device, {}).get("digits") == ro.version)]
    for f in logs:
        f.close()
    print(f"  {engine:10} killed in wave {wave + 1}; the standby held the lease "
          f"{took:.1f} s after the kill (lease {lease_s:g} s); {ro.status.value} (exit {rc}) "
          f"in {total:.1f} s; record != device: {len(wrong)}; {_load()}", flush=True)
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--lease", type=float, default=15.0)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp:
        where = Path(tmp)
        broker = SecureBroker(where / "mosq").start()
        pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="edge-pg-", dir="/var/tmp"))).start()
        server = None
        try:
            keys, v2, server, url, settings = takeover_setup(where, broker, ns.devices)
            print(f"takeover of a rollout to {ns.devices} simulated devices, controller "
                  f"killed in its second wave, standby waiting (lease {ns.lease:g} s):")
            for engine in ("sqlite", "postgresql"):
                with SimulatedFleet(settings, ns.devices) as sims:  # every device on v1
                    sims.start()
                    target = (str(where / "fleet.sqlite") if engine == "sqlite"
                              else pg.create_database("takeover"))
                    run_once(engine, target, broker, keys, url, v2, sims, ns.lease, where)
        finally:
            if server is not None:
                server.terminate()
            pg.remove()
            broker.stop()


if __name__ == "__main__":
    main()
