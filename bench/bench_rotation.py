"""A root rotation that revokes a release key, over fresh labs: how long from `root
publish` until every device runs the new root, and does the revoked key stop working?

Each lab is new: mosquitto as the project ships it (mutual TLS, the ACL, the guard plugin,
persistence), its own copy of the fleet's keys, `--devices` simulated devices and `--agents`
real agents provisioned with root v1 (all of group "lab", each with its own certificate),
an artifact server for the chain of roots, and a fleet watcher (the fleet-monitor
certificate) filling a fleet database from the devices' signed states, as
`edge-fleet root publish --wait` does. Once every device reports root v1, the operator's
step: `rotate_keys(revoke=["release-1"], add={"release": 1})` (v2: release-1 out, a new
release key in) and `publish_root`. The clock starts when the publish begins (its own TLS
connection included); each device's time is when its signed state naming v2 is in the
database. Then a bundle signed only by the revoked key is sent to a real agent's local
API: it must be refused.

    .venv/bin/python bench/bench_rotation.py [--labs 20] [--devices 300] [--agents 2]

Prints per lab: devices adopted of all, p50 / max seconds to adopt, the revoked bundle's
answer, the load average; then the summary against the target (every lab adopted by every
device, none over 10 s). Run it alone: it measures latency on a machine it loads itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_chaos import releases  # the digits releases the suite uses
from fixture_agent import start_group  # tests/ holds the harness
from fixture_mqtt import SecureBroker

from fleet.devices.registry import FleetDB
from fleet.devices.status import root_reach
from fleet.devices.watcher import FleetWatcher
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, device_names
from fleet.trust.artifacts import serve_in_thread
from fleet.trust.keys import KeyDir, rotate_keys
from fleet.trust.publish import copy_roots, publish_root

TARGET_S = 10.0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def lab(where: Path, rel: dict[str, Path], devices: int, agents: int,
        limit_s: float) -> dict[str, object]:
    """One fresh lab, one rotation; what it took."""
    provision = Path(shutil.copytree(rel["keys"], where / "provision"))  # root v1, pinned
    kd = KeyDir(Path(shutil.copytree(rel["keys"], where / "keys")))  # the operator's
    broker = SecureBroker(where / "mosquitto").start()
    (where / "artifacts").mkdir()
    server, url = serve_in_thread(where / "artifacts")
    started: list[object] = []
    try:
        group = start_group(where, provision, broker.url,
                            [f"dev-{i + 1}" for i in range(agents)], [rel["onnx1"]],
                            mqtt_for=broker.agent_mqtt, telemetry_interval_s=5.0)
        started.extend(group)
        db = FleetDB(where / "fleet.sqlite")
        broker.issue_many(device_names(devices))
        sims = SimulatedFleet(SimSettings(
            broker=broker.url, root_file=provision / "root.json", groups=("lab",),
            profile="x86_64-generic", initial=rel["onnx1"], telemetry_interval_s=5.0,
            ca_file=broker.pki / "ca.crt", certs_dir=broker.pki), devices)
        started.append(sims)
        for name, key in sims.inventory().items():
            db.register(name, key)
        if sims.start() != devices:
            raise SystemExit("not every simulated device connected")
        watcher = FleetWatcher(db, broker.auth("fleet-monitor"), kd.root().fleet).start()
        try:
            t0 = time.monotonic()
            while len(root_reach(db, 1).adopted) != devices + agents:
                if time.monotonic() - t0 > 120:
                    raise SystemExit("the devices never all reported root v1")
                time.sleep(0.1)
            rotate_keys(kd.path, revoke=["release-1"], add={"release": 1})
            copy_roots(kd, where / "artifacts")
            returned: list[float] = []
            published = time.monotonic()  # the operator's command starts
            tool = threading.Thread(target=lambda: (
                publish_root(broker.auth("fleet-controller"), kd, [url]),
                returned.append(time.monotonic() - published)))
            tool.start()  # the devices are watched while the tool still runs
            seen: dict[str, float] = {}
            while len(seen) < devices + agents and time.monotonic() - published < limit_s:
                now = time.monotonic()
                for dev in root_reach(db, 2).adopted:
                    seen.setdefault(dev, now - published)
                time.sleep(0.05)
            tool.join()
        finally:
            watcher.stop()
        status, body = group[0].install(rel["onnx2"])  # signed by release-1 only
        times = sorted(seen.values())
        return {"adopted": len(seen), "of": devices + agents,
                "publish_s": returned[0] if returned else float("nan"),
                "p50": statistics.median(times) if times else None,
                "max": times[-1] if times else None,
                "revoked_install": f"{status} {str(body)[:80]}", "load": load()}
    finally:
        for thing in started:
            thing.stop()  # type: ignore[attr-defined]
        server.shutdown()
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labs", type=int, default=20)
    ap.add_argument("--devices", type=int, default=300, help="simulated devices")
    ap.add_argument("--agents", type=int, default=2, help="real agents")
    ap.add_argument("--limit", type=float, default=60.0,
                    help="seconds to wait for every device to adopt")
    ns = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        print(f"building releases; load average {load()}", flush=True)
        rel = releases(Path(tmp) / "build")
        for i in range(ns.labs):
            where = Path(tmp) / f"lab-{i + 1}"
            where.mkdir()
            r = lab(where, rel, ns.devices, ns.agents, ns.limit)
            rows.append(r)
            p50 = "-" if r["p50"] is None else f"{r['p50']:.2f}"
            top = "-" if r["max"] is None else f"{r['max']:.2f}"
            print(f"lab {i + 1:2d}: publish returned in {r['publish_s']:.2f} s; "
                  f"{r['adopted']}/{r['of']} on root v2, p50 {p50} s, max {top} s; "
                  f"revoked key's bundle: {r['revoked_install']}; load average "
                  f"{r['load']}", flush=True)
            shutil.rmtree(where, ignore_errors=True)
    full = [r for r in rows if r["adopted"] == r["of"]]
    worst = max((float(r["max"]) for r in full), default=float("nan"))  # type: ignore[arg-type]
    refused = sum(not str(r["revoked_install"]).startswith("200") for r in rows)
    print(f"\n{len(full)} of {len(rows)} labs: every device on the new root; slowest "
          f"device {worst:.2f} s (target: every lab, none over {TARGET_S:g} s); the revoked "
          f"key's bundle refused in {refused} of {len(rows)}")
    ok = len(full) == len(rows) and worst <= TARGET_S and refused == len(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
