"""Controllers on separate hosts (`hosts.Lan`: a network namespace each, with its own
address, hostname, process ids and state directory) sharing one PostgreSQL record, on the
broker as shipped (mutual TLS, the ACL, persistence), driving real agents and simulated
devices with `edge-fleet controller`, the service an operator runs on each host.

- a host that dies (every process killed, its link down) mid-wave: the other host's
  controller claims the rollout once the lease ran out, carries it on from the record,
  and completes it; the record equals what every device runs, no healthy device was
  rolled back;
- two hosts, two rollouts on two groups at once: each claimed and driven by exactly one
  controller, one per host; the hosts' ingest consumers split the fleet's events and
  results between them, and every event lands in the one record once.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixture_agent import start_group
from fixture_mqtt import SecureBroker
from hosts import Lan
from polling import wait_until
from test_rollout import versions

from agent.trust.root import load_pinned_root
from fleet._mqtt import close, connect
from fleet.devices.registry import FleetDB
from fleet.postgres import LocalPostgres
from fleet.rollout.policy import Criteria, Exec, Status
from fleet.rollout.record import Rollouts
from fleet.sim.processes import SimulatedFleet
from fleet.sim.settings import SimSettings, device_names
from fleet.trust.artifacts import serve_in_thread

pytestmark = pytest.mark.skipif(not Lan.available(), reason="needs root, ip and unshare")
LEASE_S = 3


@pytest.fixture
def site(tmp_path: Path, releases: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """Two hosts on a LAN; the broker and PostgreSQL listen on its gateway address (and
    loopback, where the devices are); a new fleet database."""
    lan = Lan(tmp_path / "hosts", 2).up()
    broker = pg = server = None
    try:
        broker = SecureBroker(tmp_path / "mosquitto", hosts=("127.0.0.1", lan.gateway)).start()
        # under /var/tmp: the postgres user cannot enter pytest's directories
        pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="edge-pg-", dir="/var/tmp")),
                           hosts=("127.0.0.1", lan.gateway), clients=(lan.cidr,)).start()
        name = f"t_{uuid.uuid4().hex}"
        pg.create_database(name)
        server, url = serve_in_thread(releases["onnx1"].parent)
        yield {"lan": lan, "broker": broker, "pg": pg, "db": pg.url(name), "url": url,
               "db_on_lan": pg.url(name, host=lan.gateway),
               "fleet": load_pinned_root((releases["keys"] / "root.json").read_bytes()).fleet}
    finally:
        lan.down()
        if server is not None:
            server.shutdown()
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.remove()


def controller_on(site: dict[str, Any], host: str, releases: dict[str, Path],
                  *extra: str) -> subprocess.Popen[bytes]:
    """`edge-fleet controller` on `host`, reaching the broker and the database over the
    LAN."""
    lan, broker = site["lan"], site["broker"]
    auth = broker.auth("fleet-controller", host=lan.gateway)
    keys = releases["keys"]
    argv = [sys.executable, "-m", "fleet.cli", "controller", "--db", site["db_on_lan"],
            "--broker", auth.url, "--ca-file", str(auth.ca_file), "--cert-file",
            str(auth.cert_file), "--key-file", str(auth.key_file),
            "--key", str(next((keys / "keys").glob("command-*.key"))),
            "--root", str(keys / "root.json"), "--lease", str(LEASE_S), *extra]
    log = (lan.dir(host) / "controller.log").open("ab")
    return lan.popen(host, argv, log=log)


def simulated(site: dict[str, Any], releases: dict[str, Path], count: int, group: str,
              prefix: str) -> SimulatedFleet:
    broker = site["broker"]
    broker.issue_many(device_names(count, prefix))
    settings = SimSettings(broker=broker.url, root_file=releases["keys"] / "root.json",
                           groups=(group,), profile="x86_64-generic",
                           initial=releases["onnx1"], telemetry_interval_s=1.0,
                           health_window_s=1.0, ca_file=broker.pki / "ca.crt",
                           certs_dir=broker.pki)
    sims = SimulatedFleet(settings, count, prefix=prefix)
    db = FleetDB(site["db"])
    for name, key in sims.inventory().items():
        db.register(name, key)
    assert sims.start() == count
    return sims


def rollout_of(site: dict[str, Any], releases: dict[str, Path], group: str,
               devices: list[str], fractions: list[float]) -> str:
    """A rollout left to the controllers (as `rollout start --detach` leaves it)."""
    archive = releases["onnx2"]
    return Rollouts(FleetDB(site["db"])).create(
        archive=archive, urls=[f"{site['url']}/{archive.name}"], group=group,
        devices=devices, fractions=fractions, criteria=Criteria(), wave_timeout_s=60,
        health_window_s=1.0)


def stop(lan: Lan) -> None:
    """Every host's controller stopped as systemd stops a service (SIGTERM)."""
    for host in lan.names:
        lan.stop(host)


def test_a_host_that_dies_mid_wave_is_replaced_by_the_other_hosts_controller(
        site: dict[str, Any], releases: dict[str, Path], tmp_path: Path) -> None:
    lan = site["lan"]
    agents = start_group(tmp_path, releases["keys"], site["broker"].url,
                         ["dev-1", "dev-2", "dev-3"], [releases["onnx1"]],
                         mqtt_for=site["broker"].agent_mqtt, db=site["db"],
                         health_window_s=0.5, telemetry_interval_s=0.5)
    sims = simulated(site, releases, 120, "lab", "sim")
    try:
        rid = rollout_of(site, releases, "lab", [*sims.names, "dev-1", "dev-2", "dev-3"],
                         [0.02, 0.2, 0.6, 1.0])
        for h in lan.names:
            controller_on(site, h, releases)
        rollouts = Rollouts(FleetDB(site["db"]))
        wait_until(lambda: rollouts.get(rid).owner is not None, timeout_s=60,
                   what="a controller's claim")
        first = rollouts.get(rid)
        dead = first.owner.split(":")[0]  # type: ignore[union-attr]  # the host's name
        assert dead in lan.names
        wait_until(lambda: rollouts.get(rid).wave >= 2 and any(
            d.status in (Exec.SENT, Exec.IN_PROGRESS, Exec.TO_SEND)
            for d in rollouts.devices(rid)), timeout_s=120, every_s=0.05,
            what="the third wave under way")
        lan.kill(dead)  # the host dies mid-wave
        wait_until(lambda: (rollouts.get(rid).owner or "").split(":")[0] not in ("", dead),
                   timeout_s=60, every_s=0.05, what="the other host's claim")
        after = rollouts.get(rid)
        assert after.lease_token == first.lease_token + 1  # claimed once, by one controller
        wait_until(lambda: rollouts.get(rid).status is Status.COMPLETED, timeout_s=240,
                   what="the rollout's completion")
        running = {n: v.get("digits", 0) for n, v in sims.versions().items()}
        running |= dict(zip(["dev-1", "dev-2", "dev-3"], versions(agents), strict=True))
        record = {d.device: d.status for d in rollouts.devices(rid)}
        assert set(running.values()) == {2}
        assert set(record.values()) == {Exec.COMMITTED}, record
        assert not any(d.rollback_id for d in rollouts.devices(rid))
        assert rollouts.get(rid).lease_token == after.lease_token  # the survivor finished it
    finally:
        stop(lan)
        sims.stop()
        for a in agents:
            a.stop()


def test_two_hosts_drive_two_rollouts_at_once_and_split_the_ingest(
        site: dict[str, Any], releases: dict[str, Path], tmp_path: Path) -> None:
    lan, broker = site["lan"], site["broker"]
    seen: set[bytes] = set()  # every event the broker routed, by its digest
    lock = threading.Lock()

    def on_event(c: Any, u: Any, msg: Any) -> None:
        with lock:
            seen.add(hashlib.sha256(msg.topic.encode() + bytes(msg.payload)).digest())
    monitor, subscribed = connect(broker.auth("fleet-monitor"), "edge-fleet-test-monitor",
                                  topics=[f"edge/v1/{site['fleet']}/+/event"],
                                  on_message=on_event)
    assert subscribed.wait(10)
    north = simulated(site, releases, 60, "north", "nsim")
    south = simulated(site, releases, 60, "south", "ssim")
    try:
        rids = [rollout_of(site, releases, g, s.names, [0.1, 0.5, 1.0])
                for g, s in (("north", north), ("south", south))]
        for h in lan.names:
            controller_on(site, h, releases, "--max-rollouts", "1")
        rollouts = Rollouts(FleetDB(site["db"]))
        wait_until(lambda: all(rollouts.get(r).status is Status.COMPLETED for r in rids),
                   timeout_s=240, what="both rollouts' completion")
        # each claimed once (the lease's token), by one controller, one on each host
        assert [rollouts.get(r).lease_token for r in rids] == [1, 1]
        for s in (north, south):
            assert {v.get("digits", 0) for v in s.versions().values()} == {2}
        stop(lan)
        took = [(lan.dir(h) / "controller.log").read_text() for h in lan.names]
        drove = [{r for r in rids if f"rollout {r}: completed" in t} for t in took]
        assert sorted(drove, key=sorted) == sorted(({rids[0]}, {rids[1]}), key=sorted), took
        events = [int(t.split(" took ")[1].split(" event")[0].split(", ")[-1]) for t in took]
        results = [int(t.split(" event, ")[1].split(" result")[0]) for t in took]
        stored = int(FleetDB(site["db"]).store.one("SELECT SUM(events) FROM devices")[0])
        # both hosts took part, and every event the broker routed is stored once
        assert min(events) > 0 and min(results) > 0, took
        assert stored == len(seen) == sum(events), (stored, len(seen), events)
        assert sum(results) >= 120  # one deploy result per device at least
    finally:
        stop(lan)
        close(monitor)
        north.stop()
        south.stop()


HOLD_A_LOCK = """
import sys, time
from fleet.store.engine import PostgresStore
conn = PostgresStore(sys.argv[1])._live()  # the record's connection, as a controller opens it
conn.execute("BEGIN")
conn.execute("SELECT value FROM counters WHERE name = 'probe' FOR UPDATE")
with conn.cursor().copy("COPY anomalies FROM STDIN"):  # active, waiting for its data
    print("locked", flush=True)
    time.sleep(3600)
"""


def test_a_host_that_dies_inside_a_statement_leaves_no_lock_behind(
        site: dict[str, Any]) -> None:
    """A process on a host holds a row lock in a transaction and is inside a statement
    waiting for its client (a COPY; a pipelined batch of writes waits the same way: the
    server shows it active, not idle in a transaction) when the host dies, its link down
    before it could close anything. Another host's connection gets the row once the server
    has given up on the dead client (TCP keepalives, set by the record's connections),
    not after the kernel's two hours; the bench saw a controller host wait on exactly such
    a lock until it was stopped."""
    lan = site["lan"]
    db = FleetDB(site["db"])
    db.store.execute("INSERT INTO counters VALUES ('probe', 0)")
    log = lan.dir("host-a") / "lock.log"
    lan.popen("host-a", [sys.executable, "-c", HOLD_A_LOCK, site["db_on_lan"]],
              log=log.open("wb"))
    wait_until(lambda: "locked" in log.read_text(), timeout_s=30, what="the lock taken")
    lan.kill("host-a")
    st = db.store
    st.execute("SET lock_timeout = '1s'")

    def locked_here() -> bool:
        try:
            with st.tx():
                st.execute("SELECT value FROM counters WHERE name = 'probe' FOR UPDATE")
            return True
        except Exception as exc:  # psycopg's LockNotAvailable: held by the dead host
            assert "lock timeout" in str(exc), exc
            return False
    wait_until(locked_here, timeout_s=90, every_s=0.5, what="the dead host's lock released")
