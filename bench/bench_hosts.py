"""Controllers on separate hosts (issue 27's figures): one rollout to N simulated devices
driven by `edge-fleet controller` on one host with SQLite, against two hosts on one
PostgreSQL, side by side in one run; then the same on PostgreSQL with the driving host
killed (every process SIGKILLed, its link down) in the second wave.

Hosts are network namespaces (`tests/hosts.py`) with their own address, hostname,
process ids and state directory; the broker (as shipped: mutual TLS, the ACL,
persistence) and PostgreSQL listen on the LAN's gateway. Waves 1/10/50/100 %, 3 s health
windows, telemetry every 2 s. Printed per run: the rollout's time, records unlike the
device, what each host's controller took from the controllers' shared subscription
(telemetry, events, results; per second of the run), and the load average; for the kill,
the time from the kill to the other host's claim.

    .venv/bin/python bench/bench_hosts.py [--devices 3000] [--lease 15]   (as root)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fleet import WAVES, _load, _publish, _signer, poll, registered, takeover_setup
from fixture_mqtt import SecureBroker
from hosts import Lan

from agent.link.wire import StatePayload
from fleet.devices.registry import FleetDB
from fleet.postgres import LocalPostgres
from fleet.rollout.policy import DONE, Criteria, Status
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet


def _controller(lan: Lan, host: str, broker: SecureBroker, keys: Path, db: str,
                lease_s: float) -> None:
    auth = broker.auth("fleet-controller", host=lan.gateway)
    argv = [sys.executable, "-m", "fleet.cli", "controller", "--db", db, "--broker",
            auth.url, "--ca-file", str(auth.ca_file), "--cert-file", str(auth.cert_file),
            "--key-file", str(auth.key_file), "--key",
            str(next((keys / "keys").glob("command-*.key"))), "--root",
            str(keys / "root.json"), "--lease", str(lease_s)]
    lan.popen(host, argv, log=(lan.dir(host) / "controller.log").open("w"))


def run_once(label: str, lan: Lan, hosts: list[str], db_local: str, db_hosts: str,
             broker: SecureBroker, keys: Path, url: str, archive: Path,
             sims: SimulatedFleet, lease_s: float, *, kill: bool) -> None:
    db = registered(FleetDB(db_local), sims)
    rollouts = Rollouts(db)
    rid = rollouts.create(archive=archive, urls=[f"{url}/{archive.name}"], group="sim",
                          devices=sims.names, fractions=WAVES, criteria=Criteria(),
                          wave_timeout_s=60, health_window_s=3.0)
    t0 = time.monotonic()
    for h in hosts:
        _controller(lan, h, broker, keys, db_hosts, lease_s)
    took_over = ""
    if kill:
        poll(lambda: rollouts.get(rid).wave >= 1 and rollouts.get(rid).owner, 600,
              "the second wave")
        ro = rollouts.get(rid)
        dead = (ro.owner or "").split(":")[0]
        lan.kill(dead)
        killed = time.monotonic()
        poll(lambda: (rollouts.get(rid).owner or dead).split(":")[0] != dead, 300,
              "the other host's claim", every_s=0.01)
        took_over = (f"; {dead} killed in wave {ro.wave + 1}, the other host claimed it "
                     f"{time.monotonic() - killed:.1f} s later (lease {lease_s:g} s)")
    poll(lambda: rollouts.get(rid).status is not Status.RUNNING, 1200, "the rollout's end",
          every_s=0.2)
    total = time.monotonic() - t0
    ro = rollouts.get(rid)
    runs = sims.versions()
    wrong = [d.device for d in rollouts.devices(rid)
             if (d.status in DONE) != (runs.get(d.device, {}).get("digits") == ro.version)]
    load = _load()
    took = []
    for h in hosts:
        lan.stop(h)
        text = (lan.dir(h) / "controller.log").read_text()
        m = re.search(r"took (\d+) state, (\d+) telemetry, (\d+) event, (\d+) result", text)
        if m is None and not took_over.startswith(f"; {h} killed"):
            print(f"  ({h} said: {text[-1500:]})")
        took.append(f"{h}: " + ("killed" if m is None else
                                f"{int(m[2]) / total:.0f} telemetry/s, {m[3]} events, "
                                f"{m[4]} results"))
    print(f"  {label:24} {ro.status.value} in {total:.1f} s; record != device: "
          f"{len(wrong)}{took_over}; {'; '.join(took)}; {load}", flush=True)
    db.close()


def ingest_once(label: str, lan: Lan, hosts: list[str], db_local: str, db_hosts: str,
                broker: SecureBroker, keys: Path, messages: int, lease_s: float) -> None:
    """A backlog of `messages` signed telemetry reports of 400 devices, published while
    the hosts' controllers are stopped (SIGSTOP: connected, their share of the
    controllers' group queued at the broker), then drained: the clock runs from SIGCONT
    until every device's last report is stored in the record (its mark reached it). The
    controllers run with a 60-s lease here: their MQTT keepalive is one lease, and a
    controller stopped longer than 1.5 of it is dropped by the broker, with the QoS 0
    telemetry queued for it."""
    db = FleetDB(db_local)
    devices = [f"pub-{k + i:04d}" for k in (0, 1000) for i in range(200)]
    for dev in devices:
        db.register(dev, _signer(dev).public)
        db.put_state(StatePayload(device=dev, fleet="acme", online=True, agent_version="0.1.0",
                                  profile="x86_64-generic", groups=["ingest"],
                                  at=datetime.now(UTC)))
    for h in hosts:
        _controller(lan, h, broker, keys, db_hosts, lease_s)
    poll(lambda: all("serving the rollouts" in (lan.dir(h) / "controller.log").read_text()
                      for h in hosts), 120, "the controllers' subscriptions")
    time.sleep(1.0)  # their subscriptions acknowledged (the line is printed right after)
    stopped = [pid for h in hosts for pid in lan.pids(h)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    armed = [ctx.Event() for _ in range(2)]
    took = [ctx.Value("d", 0.0) for _ in range(2)]
    auth = broker.auth("fleet-controller")
    pubs = [ctx.Process(target=_publish, args=(auth, messages // 2, k * 1000, armed[k], ready,
                                               took[k])) for k in range(2)]
    for p in pubs:
        p.start()
    for a in armed:
        a.wait(600)
    ready.set()
    poll(lambda: all(v.value for v in took), 600, "the publishers")
    last = messages // 2 // 200
    st = db.store
    t0 = time.monotonic()
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    poll(lambda: int(st.one("SELECT COUNT(*) FROM report_marks WHERE kind = 'telemetry' "
                             "AND seq >= ?", (last,))[0]) == len(devices), 600,
          "the backlog stored", every_s=0.05)
    drained = time.monotonic() - t0
    load = _load()
    for p in pubs:
        p.join(30)
    took_by = []
    for h in hosts:
        lan.stop(h)
        m = re.search(r"took \d+ state, (\d+) telemetry", (lan.dir(h) / "controller.log")
                      .read_text())
        took_by.append(f"{h} {m[1] if m else '?'}")
    print(f"  {label:24} {messages} signed telemetry reports drained in {drained:.2f} s = "
          f"{messages / drained:,.0f} msg/s handled (stored, or superseded by a later one "
          f"of its device in a batch; stored per host: {', '.join(took_by)}); {load}",
          flush=True)
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3000)
    ap.add_argument("--lease", type=float, default=15.0)
    ap.add_argument("--runs", default="sqlite,postgresql,kill,ingest")
    ap.add_argument("--messages", type=int, default=40_000)
    ns = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped: clean up all the same
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        where = Path(tmp)
        lan = Lan(where / "hosts", 2).up()
        broker = SecureBroker(where / "mosq", hosts=("127.0.0.1", lan.gateway)).start()
        pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="edge-pg-", dir="/var/tmp")),
                           hosts=("127.0.0.1", lan.gateway), clients=(lan.cidr,)).start()
        server = None
        try:
            keys, v2, server, url, settings = takeover_setup(where, broker, ns.devices)
            print(f"a rollout to {ns.devices} simulated devices driven by edge-fleet "
                  f"controller on separate hosts (lease {ns.lease:g} s):")
            for run in ns.runs.split(","):
                if run == "ingest":
                    path = str(lan.dir("host-a") / f"ingest-{time.time_ns()}.sqlite")
                    ingest_once("sqlite, 1 host", lan, ["host-a"], path, path, broker, keys,
                                ns.messages, 60.0)
                    name = f"bench_ingest_{time.time_ns()}"
                    pg.create_database(name)
                    ingest_once("postgresql, 2 hosts", lan, lan.names, pg.url(name),
                                pg.url(name, host=lan.gateway), broker, keys, ns.messages,
                                60.0)
                    continue
                with SimulatedFleet(settings, ns.devices) as sims:  # every device on v1
                    sims.start()
                    if run == "sqlite":
                        path = str(lan.dir("host-a") / f"fleet-{time.time_ns()}.sqlite")
                        run_once("sqlite, 1 host", lan, ["host-a"], path, path, broker,
                                 keys, url, v2, sims, ns.lease, kill=False)
                        continue
                    name = f"bench_{run}_{time.time_ns()}"
                    pg.create_database(name)
                    run_once("postgresql, 2 hosts" + (", kill" if run == "kill" else ""),
                             lan, lan.names, pg.url(name), pg.url(name, host=lan.gateway),
                             broker, keys, url, v2, sims, ns.lease, kill=run == "kill")
                    for h in lan.names:  # a killed host comes back for the next run
                        lan.revive(h)
        finally:
            if server is not None:
                server.terminate()
            lan.down()
            pg.remove()
            broker.stop()


if __name__ == "__main__":
    main()
